package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"strconv"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/smolvm/smolvm/internal/api"
	"github.com/smolvm/smolvm/internal/network"
)

func newSandboxPortCmd(sf *sandboxFlags) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "port",
		Short: "Expose, list and close guest TCP ports on the host",
		Long: `Expose, list and close guest TCP ports on the host.

An exposed port listens on the host (127.0.0.1 unless --address says
otherwise) and forwards each connection to the guest port. It is recorded
with the sandbox and comes back when the sandbox restarts.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error { return cmd.Help() },
	}
	cmd.AddCommand(
		newPortExposeCmd(sf),
		newPortListCmd(sf),
		newPortCloseCmd(sf),
	)
	return cmd
}

func newPortExposeCmd(sf *sandboxFlags) *cobra.Command {
	var spec api.PortSpec
	cmd := &cobra.Command{
		Use:   "expose ID GUEST",
		Short: "Forward a host port to a guest TCP port",
		Example: `  smolvm sandbox port expose vm-a1b2c3d4 8080
  smolvm sandbox port expose vm-a1b2c3d4 8080 --host 8080 --address 0.0.0.0`,
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			guest, err := parseGuestArg(args[1])
			if err != nil {
				return err
			}
			if spec.Host < 0 || spec.Host > 65535 {
				return fmt.Errorf("--host %d is out of range: 1 to 65535, or 0 for a free port", spec.Host)
			}
			if spec.HostAddress != "" {
				if _, err := parseHostAddress(spec.HostAddress); err != nil {
					return fmt.Errorf("--address %q: %w", spec.HostAddress, err)
				}
			}
			spec.Guest = guest
			return withSandboxClient(cmd, sf, func(ctx context.Context, c sandboxClient) error {
				p, err := c.ExposePort(ctx, args[0], spec)
				if err != nil {
					return err
				}
				return printResult(cmd, sf, p, func(w io.Writer) {
					fmt.Fprintf(w, "%s (%s)\n", portMapping(p, " -> "), portURL(p))
				})
			})
		},
	}
	f := cmd.Flags()
	f.IntVar(&spec.Host, "host", 0, "host port to listen on (default: a free one)")
	f.StringVar(&spec.HostAddress, "address", "", "host address to listen on; 0.0.0.0 lets other machines connect (default "+network.DefaultHostAddress+")")
	return cmd
}

func newPortListCmd(sf *sandboxFlags) *cobra.Command {
	return &cobra.Command{
		Use:     "list ID",
		Aliases: []string{"ls"},
		Short:   "List a sandbox's exposed ports",
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return withSandboxClient(cmd, sf, func(ctx context.Context, c sandboxClient) error {
				list, err := c.Ports(ctx, args[0])
				if err != nil {
					return err
				}
				return printResult(cmd, sf, list, func(w io.Writer) { printPortTable(w, list.Ports) })
			})
		},
	}
}

func newPortCloseCmd(sf *sandboxFlags) *cobra.Command {
	return &cobra.Command{
		Use:     "close ID GUEST",
		Aliases: []string{"rm"},
		Short:   "Stop forwarding to a guest port; open connections finish",
		Args:    cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			guest, err := parseGuestArg(args[1])
			if err != nil {
				return err
			}
			return withSandboxClient(cmd, sf, func(ctx context.Context, c sandboxClient) error {
				res, err := c.ClosePort(ctx, args[0], guest)
				if err != nil {
					return err
				}
				return printResult(cmd, sf, res, func(w io.Writer) {
					fmt.Fprintf(w, "closed %d (%s)\n", res.Guest, hostPort(res.Port))
				})
			})
		},
	}
}

func parseGuestArg(s string) (int, error) {
	n, err := strconv.Atoi(s)
	if err != nil || n < 1 || n > 65535 {
		return 0, fmt.Errorf("GUEST %q: want a TCP port, 1 to 65535", s)
	}
	return n, nil
}

// parsePortFlag reads a --port value the way docker's -p is written, host
// side first: GUEST, HOST:GUEST or ADDRESS:HOST:GUEST, an empty HOST
// meaning a free port, an IPv6 ADDRESS in brackets, and an optional /tcp.
func parsePortFlag(s string) (api.PortSpec, error) {
	bad := func(format string, args ...any) (api.PortSpec, error) {
		return api.PortSpec{}, fmt.Errorf("--port %q: %s", s, fmt.Sprintf(format, args...))
	}
	v := s
	if i := strings.LastIndexByte(v, '/'); i >= 0 {
		if proto := v[i+1:]; !strings.EqualFold(proto, "tcp") {
			return bad("only TCP ports can be exposed, not %q", proto)
		}
		v = v[:i]
	}
	var spec api.PortSpec
	var host, guest string
	if strings.HasPrefix(v, "[") {
		end := strings.Index(v, "]:")
		if end < 0 {
			return bad("want [ADDRESS]:HOST:GUEST")
		}
		spec.HostAddress = v[1:end]
		var ok bool
		if host, guest, ok = strings.Cut(v[end+2:], ":"); !ok {
			return bad("want [ADDRESS]:HOST:GUEST")
		}
	} else {
		parts := strings.Split(v, ":")
		switch len(parts) {
		case 1:
			guest = parts[0]
		case 2:
			host, guest = parts[0], parts[1]
		default:
			// An unbracketed IPv6 address has colons of its own;
			// HOST and GUEST are always the last two fields.
			n := len(parts)
			spec.HostAddress = strings.Join(parts[:n-2], ":")
			host, guest = parts[n-2], parts[n-1]
		}
	}
	g, err := strconv.Atoi(guest)
	if err != nil || g < 1 || g > 65535 {
		return bad("guest port %q: want 1 to 65535 (the form is GUEST, HOST:GUEST or ADDRESS:HOST:GUEST)", guest)
	}
	spec.Guest = g
	if host != "" {
		h, err := strconv.Atoi(host)
		if err != nil || h < 0 || h > 65535 {
			return bad("host port %q: want 1 to 65535, or empty or 0 for a free one", host)
		}
		spec.Host = h
	}
	if spec.HostAddress != "" {
		a, err := parseHostAddress(spec.HostAddress)
		if err != nil {
			return bad("%v", err)
		}
		spec.HostAddress = a.String()
	}
	return spec, nil
}

func parseHostAddress(s string) (netip.Addr, error) {
	a, err := netip.ParseAddr(s)
	if err != nil || a.Zone() != "" {
		return netip.Addr{}, fmt.Errorf("host address %q is not an IP address such as 127.0.0.1 or 0.0.0.0", s)
	}
	return a, nil
}

// networkFlags are the network options of `sandbox create`.
type networkFlags struct {
	mode         string
	allow        []string
	hostLoopback bool
	private      bool
	ports        []string
}

// apply checks the flags and puts them into req, so that mistakes are
// reported, naming the flag, before any server or VM is involved. modeSet
// is whether --network was given.
func (nf *networkFlags) apply(req *api.CreateSandboxRequest, modeSet bool) error {
	mode := nf.mode
	if !modeSet && len(nf.allow) > 0 {
		// An allow list means nothing in any other mode.
		mode = string(network.ModeRestricted)
	}
	switch network.Mode(mode) {
	case network.ModeOpen, network.ModeOff, network.ModeRestricted:
	default:
		return fmt.Errorf("--network %q: use open, off or restricted", mode)
	}
	if len(nf.allow) > 0 && network.Mode(mode) == network.ModeOff {
		return errors.New("--allow needs a network: --network off has none")
	}
	if nf.private && network.Mode(mode) != network.ModeOpen {
		return fmt.Errorf("--allow-private applies only to --network open, not %s", mode)
	}
	for _, a := range nf.allow {
		p, err := network.ParsePrefixes([]string{a})
		if err != nil {
			return fmt.Errorf("--allow %q: want an IPv4 CIDR such as 10.0.0.0/8 or an address", a)
		}
		if !p[0].Addr().Is4() {
			return fmt.Errorf("--allow %q: the sandbox network is IPv4 only", a)
		}
	}
	if network.Mode(mode) == network.ModeOff && nf.hostLoopback {
		return errors.New("--allow-host-loopback needs a network: --network off has none")
	}
	if modeSet || len(nf.allow) > 0 || nf.hostLoopback || nf.private {
		req.Network = &api.NetworkSpec{Mode: mode, Allow: nf.allow, AllowHostLoopback: nf.hostLoopback, AllowPrivate: nf.private}
	}

	seen := map[int]string{}
	for _, s := range nf.ports {
		spec, err := parsePortFlag(s)
		if err != nil {
			return err
		}
		if prev, ok := seen[spec.Guest]; ok {
			return fmt.Errorf("--port %q: guest port %d is already given by --port %q", s, spec.Guest, prev)
		}
		seen[spec.Guest] = s
		req.Ports = append(req.Ports, spec)
	}
	if len(req.Ports) > 0 && network.Mode(mode) == network.ModeOff {
		return errors.New("--port: a sandbox with --network off has no network to expose ports from")
	}
	return nil
}

func (c localSandboxClient) ExposePort(ctx context.Context, id string, spec api.PortSpec) (api.Port, error) {
	f, err := c.m.ExposePort(ctx, id, spec.Forward())
	if err != nil {
		return api.Port{}, err
	}
	return api.PortFrom(f), nil
}

func (c localSandboxClient) Ports(ctx context.Context, id string) (api.PortList, error) {
	fs, err := c.m.Ports(ctx, id)
	if err != nil {
		return api.PortList{}, err
	}
	out := api.PortList{Ports: make([]api.Port, 0, len(fs))}
	for _, f := range fs {
		out.Ports = append(out.Ports, api.PortFrom(f))
	}
	return out, nil
}

func (c localSandboxClient) ClosePort(ctx context.Context, id string, guest int) (api.ClosePortResult, error) {
	f, err := c.m.ClosePort(ctx, id, guest)
	if err != nil {
		return api.ClosePortResult{}, err
	}
	return api.ClosePortResult{Port: api.PortFrom(f), Closed: true}, nil
}

func (c *httpSandboxClient) ExposePort(ctx context.Context, id string, spec api.PortSpec) (api.Port, error) {
	var p api.Port
	err := c.do(ctx, http.MethodPost, "/sandboxes/"+url.PathEscape(id)+"/ports", spec, &p)
	return p, err
}

func (c *httpSandboxClient) Ports(ctx context.Context, id string) (api.PortList, error) {
	var list api.PortList
	err := c.do(ctx, http.MethodGet, "/sandboxes/"+url.PathEscape(id)+"/ports", nil, &list)
	return list, err
}

func (c *httpSandboxClient) ClosePort(ctx context.Context, id string, guest int) (api.ClosePortResult, error) {
	var res api.ClosePortResult
	err := c.do(ctx, http.MethodDelete, "/sandboxes/"+url.PathEscape(id)+"/ports/"+strconv.Itoa(guest), nil, &res)
	return res, err
}

func printPortTable(w io.Writer, ports []api.Port) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "GUEST\tHOST ADDRESS\tHOST PORT\tURL")
	for _, p := range ports {
		fmt.Fprintf(tw, "%d\t%s\t%d\t%s\n", p.Guest, p.HostAddress, p.Host, portURL(p))
	}
	tw.Flush()
}

// hostPort is where p listens, as ADDRESS:PORT.
func hostPort(p api.Port) string {
	return net.JoinHostPort(p.HostAddress, strconv.Itoa(p.Host))
}

// portMapping is "GUEST<sep>ADDRESS:PORT", guest first as in `docker port`.
func portMapping(p api.Port, sep string) string {
	return strconv.Itoa(p.Guest) + sep + hostPort(p)
}

// portURL is an http URL that reaches p from this machine: a port on every
// interface is reached through loopback, since browsers refuse 0.0.0.0.
func portURL(p api.Port) string {
	host := p.HostAddress
	if a, err := netip.ParseAddr(host); err == nil && a.IsUnspecified() {
		host = "127.0.0.1"
		if a.Is6() {
			host = "::1"
		}
	}
	return "http://" + net.JoinHostPort(host, strconv.Itoa(p.Host))
}

// portsSummary is a sandbox's ports on one line, "-" when none.
func portsSummary(ports []api.Port, sep string) string {
	if len(ports) == 0 {
		return "-"
	}
	s := make([]string, len(ports))
	for i, p := range ports {
		s[i] = portMapping(p, sep)
	}
	return strings.Join(s, ", ")
}

// networkSummary is a sandbox's network policy on one line.
func networkSummary(n api.SandboxNetwork) string {
	s := orDash(n.Mode)
	if len(n.Allow) > 0 {
		s += " (allow " + strings.Join(n.Allow, ", ") + ")"
	}
	if n.AllowHostLoopback {
		s += ", host loopback allowed"
	}
	if n.AllowPrivate {
		s += ", private ranges allowed"
	}
	return s
}

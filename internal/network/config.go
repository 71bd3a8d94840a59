// Package network gives each sandbox its own virtual network: a user-space
// TCP/IP stack (gVisor's, through gvisor-tap-vsock) on the host end of the
// guest's virtio-net link. Every connection the guest opens arrives here as
// a request that smolvm accepts or refuses before dialing anything, which is
// how the guest is kept away from the host's loopback and the cloud
// metadata address without root or host firewall rules. The same stack
// carries ports exposed from the guest to the host.
//
// One network process (cmd/smolvm-net) runs per sandbox, beside its QEMU
// process, and ends when QEMU closes the link.
package network

import (
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
)

// The guest's side of every sandbox network is the same: each sandbox has
// a network of its own, so no two ever share an address space.
var (
	Subnet    = netip.MustParsePrefix("192.168.127.0/24")
	GatewayIP = netip.MustParseAddr("192.168.127.1")
	GuestIP   = netip.MustParseAddr("192.168.127.2")
	// HostIP is where the guest reaches the host's loopback, when allowed.
	HostIP = netip.MustParseAddr("192.168.127.254")
)

const (
	// HostName resolves to HostIP in the guest.
	HostName   = "host.smolvm.internal"
	GatewayMAC = "5a:94:ef:e4:0c:dd"
	GuestMAC   = "5a:94:ef:e4:0c:ee"
	// MTU is the guest link's MTU. A large one moves bulk data in far
	// fewer frames, which is what costs under software emulation.
	MTU = 65520
)

// Mode is how much of the network a sandbox may reach.
type Mode string

const (
	// ModeOpen lets the guest reach the public Internet: not the host
	// itself, link-local (metadata) addresses or private ranges, unless
	// allowed.
	ModeOpen Mode = "open"
	// ModeOff gives the guest no network interface but loopback.
	ModeOff Mode = "off"
	// ModeRestricted lets the guest reach only the addresses in Allow.
	ModeRestricted Mode = "restricted"
)

// Policy decides which connections a sandbox's guest may open.
type Policy struct {
	Mode Mode `json:"mode"`
	// Allow lists the destinations reachable in ModeRestricted; in
	// ModeOpen, the private destinations reachable besides the public
	// Internet.
	Allow []netip.Prefix `json:"allow,omitempty"`
	// AllowPrivate lets the guest of ModeOpen reach every private range
	// (RFC 1918, CGNAT, benchmarking): a LAN, a VPN, a cluster.
	AllowPrivate bool `json:"allow_private,omitempty"`
	// AllowHostLoopback lets the guest reach the host's own services: the
	// host's loopback at HostIP (HostName), and the host's own addresses.
	AllowHostLoopback bool `json:"allow_host_loopback,omitempty"`
}

// Equal reports whether p and q rule the same way.
func (p Policy) Equal(q Policy) bool {
	return p.Mode == q.Mode && p.AllowHostLoopback == q.AllowHostLoopback && p.AllowPrivate == q.AllowPrivate && slices.Equal(p.Allow, q.Allow)
}

// Enabled reports whether the guest gets a network interface at all.
func (p Policy) Enabled() bool { return p.Mode != ModeOff }

// Normalize fills in defaults and checks p, returning an error that names
// the field at fault.
func (p *Policy) Normalize() error {
	if p.Mode == "" {
		p.Mode = ModeOpen
	}
	switch p.Mode {
	case ModeOff:
		if len(p.Allow) > 0 {
			return &FieldError{Field: "network.allow", Message: "network.allow needs a network: mode \"off\" has none"}
		}
	case ModeOpen, ModeRestricted:
	default:
		return &FieldError{Field: "network.mode", Message: fmt.Sprintf("unknown network mode %q: use open, off or restricted", p.Mode)}
	}
	if p.Mode == ModeOff && p.AllowHostLoopback {
		return &FieldError{Field: "network.allow_host_loopback", Message: "allow_host_loopback needs a network: mode \"off\" has none"}
	}
	if p.Mode != ModeOpen && p.AllowPrivate {
		return &FieldError{Field: "network.allow_private", Message: fmt.Sprintf("allow_private applies only to mode \"open\"; mode %q reaches what allow lists", p.Mode)}
	}
	for i, a := range p.Allow {
		if !a.Addr().Is4() {
			return &FieldError{Field: "network.allow", Message: fmt.Sprintf("allow[%d] %s: the sandbox network is IPv4 only", i, a)}
		}
		p.Allow[i] = a.Masked()
	}
	return nil
}

// ParsePrefixes reads CIDRs ("10.0.0.0/8") or single addresses ("1.2.3.4").
func ParsePrefixes(ss []string) ([]netip.Prefix, error) {
	out := make([]netip.Prefix, 0, len(ss))
	for i, s := range ss {
		s = strings.TrimSpace(s)
		if p, err := netip.ParsePrefix(s); err == nil {
			out = append(out, p)
			continue
		}
		a, err := netip.ParseAddr(s)
		if err != nil {
			return nil, &FieldError{Field: "network.allow", Message: fmt.Sprintf("allow[%d] %q is not a CIDR such as 10.0.0.0/8 or an address", i, s)}
		}
		out = append(out, netip.PrefixFrom(a, a.BitLen()))
	}
	return out, nil
}

// FieldError is invalid input, naming the request field at fault.
type FieldError struct {
	Field   string
	Message string
}

func (e *FieldError) Error() string { return e.Message }

// refused are never dialed from the host on the guest's behalf: the host's
// loopback and "this host" (connecting to 0.0.0.0 reaches the loopback on
// Linux), link-local (169.254.169.254 is the cloud metadata service),
// multicast and broadcast, and the sandbox's own virtual subnet.
var refused = []netip.Prefix{
	netip.MustParsePrefix("0.0.0.0/8"),
	netip.MustParsePrefix("127.0.0.0/8"),
	netip.MustParsePrefix("169.254.0.0/16"),
	netip.MustParsePrefix("224.0.0.0/4"),
	netip.MustParsePrefix("240.0.0.0/4"), // reserved, and 255.255.255.255
	Subnet,
	// Metadata services that are not link-local: Azure's WireServer and
	// Alibaba Cloud's metadata address.
	netip.MustParsePrefix("168.63.129.16/32"),
	netip.MustParsePrefix("100.100.100.200/32"),
}

// private are the ranges of networks behind the host (a LAN, a VPN, a
// cluster, a carrier's NAT) that mode open does not reach unless allowed:
// RFC 1918, CGNAT (RFC 6598), the benchmarking range (RFC 2544) and
// IPv6 unique local addresses.
var private = []netip.Prefix{
	netip.MustParsePrefix("10.0.0.0/8"),
	netip.MustParsePrefix("172.16.0.0/12"),
	netip.MustParsePrefix("192.168.0.0/16"),
	netip.MustParsePrefix("100.64.0.0/10"),
	netip.MustParsePrefix("198.18.0.0/15"),
	netip.MustParsePrefix("fc00::/7"),
}

// Verdict is what the policy says about one destination.
type Verdict struct {
	Allowed bool
	// Dial is the address to connect to on the host, when allowed.
	Dial netip.Addr
	// Reason says why it was refused.
	Reason string
}

// Decide rules on a guest connection to dst. hostAddrs are the host's own
// interface addresses, which count as the host like its loopback does.
func (p Policy) Decide(dst netip.Addr, hostAddrs []netip.Addr) Verdict {
	dst = dst.Unmap()
	if p.Mode == ModeOff {
		return Verdict{Reason: "the network is off"}
	}
	if p.Mode == ModeRestricted && !p.allows(dst) {
		return Verdict{Reason: "not in the allow list"}
	}
	if dst == HostIP {
		if !p.AllowHostLoopback {
			return Verdict{Reason: "the host's loopback is not allowed"}
		}
		return Verdict{Allowed: true, Dial: netip.MustParseAddr("127.0.0.1")}
	}
	for _, r := range refused {
		if r.Contains(dst) {
			return Verdict{Reason: "a loopback, link-local, metadata, multicast or reserved address"}
		}
	}
	if slices.Contains(hostAddrs, dst) {
		if !p.AllowHostLoopback {
			return Verdict{Reason: "the host's own addresses are not allowed"}
		}
		return Verdict{Allowed: true, Dial: dst}
	}
	if !dst.Is4() {
		return Verdict{Reason: "not IPv4"}
	}
	if p.Mode == ModeOpen && !p.AllowPrivate && !p.allows(dst) {
		for _, r := range private {
			if r.Contains(dst) {
				return Verdict{Reason: "a private address: list it in allow, or set allow_private"}
			}
		}
	}
	return Verdict{Allowed: true, Dial: dst}
}

func (p Policy) allows(dst netip.Addr) bool {
	for _, a := range p.Allow {
		if a.Contains(dst) {
			return true
		}
	}
	return false
}

// Forward exposes a guest TCP port on the host.
type Forward struct {
	Guest int `json:"guest"`
	// Host is the host port; 0 asks for a free one, and the forward in
	// effect reports the one picked.
	Host int `json:"host"`
	// HostAddress is the host address the forward listens on.
	HostAddress string `json:"host_address"`
}

// DefaultHostAddress keeps exposed ports on this machine.
const DefaultHostAddress = "127.0.0.1"

// Normalize fills in defaults and checks f.
func (f *Forward) Normalize() error {
	if f.Guest < 1 || f.Guest > 65535 {
		return &FieldError{Field: "guest", Message: fmt.Sprintf("guest port must be between 1 and 65535, got %d", f.Guest)}
	}
	if f.Host < 0 || f.Host > 65535 {
		return &FieldError{Field: "host", Message: fmt.Sprintf("host port must be between 1 and 65535, or 0 for a free one, got %d", f.Host)}
	}
	if f.HostAddress == "" {
		f.HostAddress = DefaultHostAddress
	}
	a, err := netip.ParseAddr(f.HostAddress)
	if err != nil || a.Zone() != "" {
		return &FieldError{Field: "host_address", Message: fmt.Sprintf("host_address %q is not an IP address", f.HostAddress)}
	}
	f.HostAddress = a.String()
	return nil
}

// Listen is the host address the forward listens on.
func (f Forward) Listen() string {
	return net.JoinHostPort(f.HostAddress, strconv.Itoa(f.Host))
}

package api

import (
	"context"
	"net/http"
	"time"

	"github.com/danielgtaylor/huma/v2"

	"github.com/smolvm/smolvm/internal/network"
	"github.com/smolvm/smolvm/internal/sandbox"
)

// NetworkSpec is the network part of a create request.
type NetworkSpec struct {
	_                 struct{} `json:"-" additionalProperties:"false"`
	Mode              string   `json:"mode,omitempty" enum:"open,off,restricted" default:"open" example:"open" doc:"open: the guest reaches the public Internet, but not the host itself, link-local (cloud metadata) addresses or private ranges (RFC 1918, CGNAT 100.64.0.0/10, 198.18.0.0/15) unless allow lists them or allow_private is set. off: no network interface but loopback. restricted: only the destinations in allow."`
	Allow             []string `json:"allow,omitempty" maxItems:"256" example:"[\"10.0.0.0/8\"]" doc:"With mode restricted: the IPv4 CIDRs (or single addresses) the guest may connect to; everything else is refused by the host before any connection is made. With mode open: the private destinations the guest may reach besides the public Internet."`
	AllowedCIDRs      []string `json:"allowed_cidrs,omitempty" maxItems:"256" example:"[\"10.0.0.0/8\"]" doc:"A synonym of allow, as the reference server names it: the two lists are joined, and the mode is restricted unless it is off."`
	AllowHostLoopback bool     `json:"allow_host_loopback,omitempty" example:"false" doc:"Let the guest reach services on the host: the host's 127.0.0.1 appears as host.smolvm.internal (192.168.127.254), and the host's own addresses answer too. Off by default, so the guest cannot reach this API or anything else bound to the host's loopback."`
	AllowPrivate      bool     `json:"allow_private,omitempty" example:"false" doc:"With mode open: let the guest reach every private range (RFC 1918, CGNAT, 198.18.0.0/15), such as a LAN or a VPN. Link-local and metadata addresses stay refused, and the host needs allow_host_loopback."`
}

// SandboxNetwork is a sandbox's network policy as in effect.
type SandboxNetwork struct {
	Mode              string   `json:"mode" enum:"open,off,restricted" example:"open" doc:"Network mode."`
	Allow             []string `json:"allow,omitempty" example:"[\"10.0.0.0/8\"]" doc:"The destinations the guest may connect to (mode restricted), or the private ones it may reach besides the public Internet (mode open)."`
	AllowHostLoopback bool     `json:"allow_host_loopback" example:"false" doc:"Whether the guest may reach the host's own services (as host.smolvm.internal)."`
	AllowPrivate      bool     `json:"allow_private" example:"false" doc:"Whether the guest of mode open may reach private ranges."`
}

// PortSpec asks for a guest TCP port to be exposed on the host.
type PortSpec struct {
	_           struct{} `json:"-" additionalProperties:"false"`
	Guest       int      `json:"guest" minimum:"1" maximum:"65535" example:"8080" doc:"TCP port in the guest."`
	Host        int      `json:"host,omitempty" minimum:"0" maximum:"65535" default:"0" example:"0" doc:"Host port to listen on; 0 (the default) picks a free one, reported in the response."`
	HostAddress string   `json:"host_address,omitempty" maxLength:"64" default:"127.0.0.1" example:"127.0.0.1" doc:"Host address to listen on. Only this machine can connect to the default; another address (0.0.0.0 for every interface) is a deliberate opt-in."`
}

// Port is a guest port exposed on the host.
type Port struct {
	Guest       int    `json:"guest" minimum:"1" maximum:"65535" example:"8080" doc:"TCP port in the guest."`
	Host        int    `json:"host" minimum:"1" maximum:"65535" example:"41234" doc:"Host port that forwards to it."`
	HostAddress string `json:"host_address" example:"127.0.0.1" doc:"Host address the port listens on."`
}

// PortList is the body of GET /sandboxes/{id}/ports.
type PortList struct {
	Ports []Port `json:"ports" nullable:"false" doc:"The sandbox's exposed ports, by guest port."`
}

// ClosePortResult is the body of DELETE /sandboxes/{id}/ports/{guest}.
type ClosePortResult struct {
	Port
	Closed bool `json:"closed" example:"true" doc:"Always true: the host port no longer accepts connections."`
}

func (s *NetworkSpec) policy() (network.Policy, error) {
	if s == nil {
		return network.Policy{}, nil
	}
	p := network.Policy{Mode: network.Mode(s.Mode), AllowHostLoopback: s.AllowHostLoopback, AllowPrivate: s.AllowPrivate}
	list := append(append([]string(nil), s.Allow...), s.AllowedCIDRs...)
	if len(s.AllowedCIDRs) > 0 && (p.Mode == "" || p.Mode == network.ModeOpen) {
		// The reference's allowed_cidrs means: only these. Mode open is
		// also what an omitted mode defaults to.
		p.Mode = network.ModeRestricted
	}
	if len(list) > 0 {
		allow, err := network.ParsePrefixes(list)
		if err != nil {
			return p, err
		}
		p.Allow = allow
	}
	return p, nil
}

// Forward is the Manager's form of s.
func (s PortSpec) Forward() network.Forward {
	return network.Forward{Guest: s.Guest, Host: s.Host, HostAddress: s.HostAddress}
}

// PortFrom is the API representation of a forward.
func PortFrom(f network.Forward) Port {
	return Port{Guest: f.Guest, Host: f.Host, HostAddress: f.HostAddress}
}

func networkFrom(p network.Policy) SandboxNetwork {
	out := SandboxNetwork{Mode: string(p.Mode), AllowHostLoopback: p.AllowHostLoopback, AllowPrivate: p.AllowPrivate}
	if out.Mode == "" {
		out.Mode = string(network.ModeOpen)
	}
	for _, a := range p.Allow {
		if a.IsSingleIP() {
			out.Allow = append(out.Allow, a.Addr().String())
		} else {
			out.Allow = append(out.Allow, a.String())
		}
	}
	return out
}

func portsFrom(fs []network.Forward) []Port {
	out := make([]Port, 0, len(fs))
	for _, f := range fs {
		out = append(out, PortFrom(f))
	}
	return out
}

type exposeInput struct {
	ID   string `path:"id" example:"vm-a1b2c3d4" doc:"Sandbox id, as returned by create."`
	Body PortSpec
}

type portInput struct {
	ID    string `path:"id" example:"vm-a1b2c3d4" doc:"Sandbox id, as returned by create."`
	Guest int    `path:"guest" minimum:"1" maximum:"65535" example:"8080" doc:"The exposed guest port."`
}

type portOutput struct{ Body Port }
type portListOutput struct{ Body PortList }
type closePortOutput struct{ Body ClosePortResult }

func registerPorts(hapi huma.API, h *handlers, common, withBody []int) {
	huma.Register(hapi, huma.Operation{
		OperationID: "exposePort",
		Method:      http.MethodPost,
		Path:        "/sandboxes/{id}/ports",
		Summary:     "Expose a guest port",
		Description: "Forwards a host port to a TCP port in a running sandbox. The host side listens on 127.0.0.1 unless host_address says otherwise; host port 0 picks a free port, which the response names. " +
			"A host port in use is 409 port_in_use; a guest port already exposed is 409 port_already_exposed; a sandbox created with network mode off is 409 network_off; one whose network process has ended is 409 network_down (stop and start it).",
		Tags:   []string{"ports"},
		Errors: append(append([]int{http.StatusNotFound, http.StatusConflict}, withBody...), common...),
	}, h.expose)
	huma.Register(hapi, huma.Operation{
		OperationID: "listPorts",
		Method:      http.MethodGet,
		Path:        "/sandboxes/{id}/ports",
		Summary:     "List exposed ports",
		Description: "Lists a sandbox's exposed ports with the host ports in effect.",
		Tags:        []string{"ports"},
		Errors:      append([]int{http.StatusNotFound}, common...),
	}, h.listPorts)
	huma.Register(hapi, huma.Operation{
		OperationID: "closePort",
		Method:      http.MethodDelete,
		Path:        "/sandboxes/{id}/ports/{guest}",
		Summary:     "Close an exposed port",
		Description: "Stops forwarding the host port to the guest port: new connections are refused, connections already open finish. A guest port that is not exposed is 404 port_not_exposed.",
		Tags:        []string{"ports"},
		Errors:      append([]int{http.StatusNotFound, http.StatusConflict, http.StatusUnprocessableEntity}, common...),
	}, h.closePort)
}

func (h *handlers) expose(ctx context.Context, in *exposeInput) (*portOutput, error) {
	m, err := h.manager(in.ID)
	if err != nil {
		return nil, err
	}
	f, err := m.ExposePort(ctx, in.ID, in.Body.Forward())
	if err != nil {
		return nil, ProblemFrom(ctx, err)
	}
	return &portOutput{Body: PortFrom(f)}, nil
}

func (h *handlers) listPorts(ctx context.Context, in *sandboxID) (*portListOutput, error) {
	m, err := h.manager(in.ID)
	if err != nil {
		return nil, err
	}
	fs, err := m.Ports(ctx, in.ID)
	if err != nil {
		return nil, ProblemFrom(ctx, err)
	}
	return &portListOutput{Body: PortList{Ports: portsFrom(fs)}}, nil
}

func (h *handlers) closePort(ctx context.Context, in *portInput) (*closePortOutput, error) {
	m, err := h.manager(in.ID)
	if err != nil {
		return nil, err
	}
	f, err := m.ClosePort(ctx, in.ID, in.Guest)
	if err != nil {
		return nil, ProblemFrom(ctx, err)
	}
	return &closePortOutput{Body: ClosePortResult{Port: PortFrom(f), Closed: true}}, nil
}

// CreateRequest turns the API's create body into the Manager's request;
// the CLI's local path shares it.
func CreateRequest(body CreateSandboxRequest) (sandbox.CreateRequest, error) {
	req := sandbox.CreateRequest{
		OS:          body.OS,
		Image:       body.Image,
		MemoryMiB:   body.Memory,
		DiskSizeMiB: body.DiskSize,
		VCPUs:       body.VCPUs,
		Backend:     body.Backend,
		Name:        body.Name,
		Labels:      body.Labels,
		Env:         body.Env,
		Timeout:     time.Duration(body.Timeout) * time.Second,
		OnTimeout:   body.OnTimeout,
		Snapshot:    body.Snapshot,
	}
	for _, mt := range body.Mounts {
		ro := mt.ReadOnly == nil || *mt.ReadOnly
		req.Mounts = append(req.Mounts, sandbox.Mount{Host: mt.Host, Guest: mt.Guest, ReadOnly: ro})
	}
	p, err := body.Network.policy()
	if err != nil {
		return req, &sandbox.Error{Kind: sandbox.KindInvalid, Code: "invalid_network", Field: "network.allow", Message: err.Error()}
	}
	req.Network = p
	for _, ps := range body.Ports {
		req.Ports = append(req.Ports, ps.Forward())
	}
	return req, nil
}

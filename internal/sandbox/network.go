package sandbox

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strconv"

	"github.com/smolvm/smolvm/internal/network"
	"github.com/smolvm/smolvm/internal/store"
)

// netState is what a sandbox's record keeps about its network.
type netState struct {
	Policy network.Policy `json:"policy"`
	Ports  []port         `json:"ports,omitempty"`
}

// port is an exposed port as recorded: the forward in effect, and the
// host port first asked for (0: any), which decides whether a restart may
// move it to another port when its old one is taken.
type port struct {
	network.Forward
	Requested int `json:"requested_host"`
}

func readNet(rec store.Record) netState {
	var s netState
	if rec.Network == "" {
		// Recorded before sandboxes had networks: they had none.
		s.Policy.Mode = network.ModeOff
		return s
	}
	json.Unmarshal([]byte(rec.Network), &s)
	if s.Policy.Mode == "" {
		s.Policy.Mode = network.ModeOff
	}
	return s
}

// requestedNet is the network state a create request asks for, before
// any host port is picked.
func requestedNet(req CreateRequest) netState {
	s := netState{Policy: req.Network}
	for _, f := range req.Ports {
		s.Ports = append(s.Ports, port{Forward: f, Requested: f.Host})
	}
	return s
}

func writeNet(rec *store.Record, s netState) {
	b, _ := json.Marshal(s)
	rec.Network = string(b)
}

// forwards lists the ports in effect, by guest port.
func (s netState) forwards() []network.Forward {
	out := make([]network.Forward, len(s.Ports))
	for i, p := range s.Ports {
		out[i] = p.Forward
	}
	slices.SortFunc(out, func(a, b network.Forward) int { return a.Guest - b.Guest })
	return out
}

// normalizeNetwork checks the network part of a create request.
func normalizeNetwork(req *CreateRequest) error {
	if err := req.Network.Normalize(); err != nil {
		return networkInvalid(err)
	}
	if !req.Network.Enabled() && len(req.Ports) > 0 {
		return invalid("invalid_port", "ports", "ports cannot be exposed from a sandbox whose network is off")
	}
	seen := map[int]bool{}
	for i := range req.Ports {
		if err := req.Ports[i].Normalize(); err != nil {
			var fe *network.FieldError
			errors.As(err, &fe)
			return invalid("invalid_port", fmt.Sprintf("ports[%d].%s", i, fe.Field), "ports[%d]: %s", i, fe.Message)
		}
		if seen[req.Ports[i].Guest] {
			return invalid("invalid_port", fmt.Sprintf("ports[%d].guest", i), "guest port %d is listed twice", req.Ports[i].Guest)
		}
		seen[req.Ports[i].Guest] = true
	}
	return nil
}

func networkInvalid(err error) error {
	var fe *network.FieldError
	if errors.As(err, &fe) {
		return &Error{Kind: KindInvalid, Code: "invalid_network", Field: fe.Field, Message: fe.Message}
	}
	return err
}

// portError maps a network process's refusal to the API's errors.
func portError(err error) error {
	var fe *network.FieldError
	if errors.As(err, &fe) {
		return &Error{Kind: KindInvalid, Code: "invalid_port", Field: fe.Field, Message: fe.Message}
	}
	var pe *network.PortError
	if errors.As(err, &pe) {
		e := &Error{Code: pe.Code.Error(), Message: pe.Message}
		switch pe.Code {
		case network.ErrPortInUse, network.ErrAlreadyExposed:
			e.Kind, e.Field = KindConflict, "host"
			if pe.Code == network.ErrAlreadyExposed {
				e.Field = "guest"
			}
		case network.ErrNotExposed:
			e.Kind = KindNotFound
		case network.ErrBadHostAddress:
			e.Kind, e.Field = KindInvalid, "host_address"
		default:
			e.Kind, e.Field = KindInvalid, "host"
		}
		return e
	}
	return &Error{Kind: KindConflict, Code: "network_unavailable",
		Message: "the sandbox's network process did not answer; stop and start the sandbox to restart it", Err: err}
}

// runningNet returns rec's network state, refusing a sandbox that is not
// running or has no network.
func (m *Manager) runningNet(ctx context.Context, id string) (store.Record, netState, error) {
	rec, err := m.get(ctx, id)
	if err != nil {
		return rec, netState{}, err
	}
	if rec.Status != StatusRunning {
		return rec, netState{}, &Error{Kind: KindConflict, Code: "sandbox_not_running",
			Message: fmt.Sprintf("sandbox %s is %s, not running", id, rec.Status)}
	}
	s := readNet(rec)
	if !s.Policy.Enabled() {
		return rec, s, &Error{Kind: KindConflict, Code: "network_off",
			Message: fmt.Sprintf("sandbox %s was created with network mode \"off\": it has no network to expose ports from", id)}
	}
	if !network.Running(rec.Dir) {
		return rec, s, &Error{Kind: KindConflict, Code: "network_down",
			Message: fmt.Sprintf("the network process of sandbox %s has ended, so the guest has no network; stop and start the sandbox to bring it back", id)}
	}
	return rec, s, nil
}

// ExposePort forwards a host port (f.Host, or a free one for 0) on
// f.HostAddress (127.0.0.1 by default) to the guest's port f.Guest, and
// returns the forward in effect. It is recorded and survives restarts.
func (m *Manager) ExposePort(ctx context.Context, id string, f network.Forward) (network.Forward, error) {
	if err := f.Normalize(); err != nil {
		var fe *network.FieldError
		errors.As(err, &fe)
		return f, invalid("invalid_port", fe.Field, "%s", fe.Message)
	}
	if _, _, err := m.runningNet(ctx, id); err != nil {
		return f, err
	}
	unlock := m.lock(id)
	defer unlock()
	rec, s, err := m.runningNet(ctx, id)
	if err != nil {
		return f, err
	}
	for _, p := range s.Ports {
		if p.Guest == f.Guest {
			return f, &Error{Kind: KindConflict, Code: "port_already_exposed", Field: "guest",
				Message: fmt.Sprintf("guest port %d is already exposed on %s; close it first", f.Guest, p.Listen())}
		}
	}
	c := network.Dial(network.Files{Dir: rec.Dir}.Control())
	got, err := c.Expose(ctx, f)
	if err != nil {
		var pe *network.PortError
		var fe *network.FieldError
		if !errors.As(err, &pe) && !errors.As(err, &fe) {
			// The process may have opened it before the answer was lost:
			// an unrecorded forward could never be closed.
			c.Unexpose(context.WithoutCancel(ctx), f.Guest)
		}
		return f, portError(err)
	}
	s.Ports = append(s.Ports, port{Forward: got, Requested: f.Host})
	writeNet(&rec, s)
	if err := m.store.SetNetwork(ctx, id, rec.Network); err != nil {
		c.Unexpose(context.WithoutCancel(ctx), got.Guest)
		return f, fmt.Errorf("record port: %w", err)
	}
	m.l.publishSandbox(EventSandboxUpdated, toInfo(rec))
	return got, nil
}

// ClosePort removes the forward of the guest's port; connections already
// made through it are left to finish. On a sandbox that is not running it
// only removes the port from the record, so a port that keeps a stopped
// sandbox from starting (its host port taken) can be dropped.
func (m *Manager) ClosePort(ctx context.Context, id string, guest int) (network.Forward, error) {
	if _, err := m.get(ctx, id); err != nil {
		return network.Forward{}, err
	}
	unlock := m.lock(id)
	defer unlock()
	rec, err := m.get(ctx, id)
	if err != nil {
		return network.Forward{}, err
	}
	s := readNet(rec)
	running := rec.Status == StatusRunning && s.Policy.Enabled()
	c := network.Dial(network.Files{Dir: rec.Dir}.Control())
	i := -1
	for j, p := range s.Ports {
		if p.Guest == guest {
			i = j
		}
	}
	if i < 0 {
		if running {
			c.Unexpose(ctx, guest) // one a lost answer left unrecorded
		}
		return network.Forward{}, &Error{Kind: KindNotFound, Code: "port_not_exposed", Field: "guest",
			Message: fmt.Sprintf("guest port %d of sandbox %s is not exposed", guest, id)}
	}
	closed := s.Ports[i].Forward
	if running {
		if _, err := c.Unexpose(ctx, guest); err != nil && !errors.Is(err, network.ErrNotExposed) {
			return network.Forward{}, portError(err)
		}
	}
	s.Ports = append(s.Ports[:i], s.Ports[i+1:]...)
	writeNet(&rec, s)
	if err := m.store.SetNetwork(ctx, id, rec.Network); err != nil {
		return network.Forward{}, fmt.Errorf("record port: %w", err)
	}
	m.l.publishSandbox(EventSandboxUpdated, toInfo(rec))
	return closed, nil
}

// Ports lists a sandbox's exposed ports, by guest port.
func (m *Manager) Ports(ctx context.Context, id string) ([]network.Forward, error) {
	rec, err := m.get(ctx, id)
	if err != nil {
		return nil, err
	}
	return readNet(rec).forwards(), nil
}

// netCmdline is the kernel command line's network part: the guest's
// address, its gateway and the MTU, which the agent sets up.
func netCmdline(enabled bool) string {
	if !enabled {
		return ""
	}
	return "smolvm.net=" + network.GuestIP.String() + "/" + strconv.Itoa(network.Subnet.Bits()) + "," +
		network.GatewayIP.String() + "," + strconv.Itoa(network.MTU)
}

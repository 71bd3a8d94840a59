package api

import (
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/smolvm/smolvm/internal/network"
	"github.com/smolvm/smolvm/internal/testenv"
)

// Over HTTP: a sandbox's network and ports are set on create and shown on
// every read; the guest cannot reach the smolvm server; bad port and
// network requests get 4xx answers with stable codes and change nothing.
func TestNetworkOverHTTP(t *testing.T) {
	t.Parallel()
	m := testenv.Manager(t)
	srv := testServer(t, m, Options{})
	base := srv.URL
	apiPort := srv.Listener.Addr().(*net.TCPAddr).Port

	r := do(t, http.MethodPost, base+"/sandboxes", `{"ports":[{"guest":8080}],"network":{"allow":["10.9.0.0/16"]}}`, nil)
	if r.Status != http.StatusCreated {
		t.Fatalf("create: %d %s", r.Status, r.Body)
	}
	var sb Sandbox
	r.decode(t, &sb)
	if sb.Network.Mode != "open" || sb.Network.AllowHostLoopback || sb.Network.AllowPrivate ||
		len(sb.Network.Allow) != 1 || sb.Network.Allow[0] != "10.9.0.0/16" || len(sb.Ports) != 1 ||
		sb.Ports[0].Guest != 8080 || sb.Ports[0].Host == 0 || sb.Ports[0].HostAddress != "127.0.0.1" {
		t.Fatalf("create answered network %+v ports %+v", sb.Network, sb.Ports)
	}

	// The guest cannot reach this server by any of the host's addresses.
	targets := []string{network.HostName, network.HostIP.String()}
	addrs, _ := net.InterfaceAddrs()
	for _, a := range addrs {
		if p, err := netip.ParsePrefix(a.String()); err == nil && p.Addr().Is4() && !p.Addr().IsLoopback() {
			targets = append(targets, p.Addr().String())
		}
	}
	for _, target := range targets {
		cmd := fmt.Sprintf(`timeout 20 bash -c 'exec 3<>/dev/tcp/%s/%d && echo connected'`, target, apiPort)
		res, rr := execHTTP(t, base, sb.ID, map[string]any{"command": cmd})
		if rr.Status != http.StatusOK || res.ExitCode == 0 || strings.Contains(res.Stdout, "connected") ||
			!strings.Contains(res.Stderr, "Connection refused") {
			t.Errorf("guest to the smolvm server at %s:%d: %d, exit %d, %q, %q", target, apiPort, rr.Status, res.ExitCode, res.Stdout, res.Stderr)
		}
	}

	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	busyPort := busy.Addr().(*net.TCPAddr).Port
	ports := base + "/sandboxes/" + sb.ID + "/ports"
	for _, c := range []struct {
		method, url string
		body        string
		status      int
		code, field string
	}{
		{"POST", ports, `{"guest":0}`, 422, CodeValidationFailed, "guest"},
		{"POST", ports, `{"guest":65536}`, 422, CodeValidationFailed, "guest"},
		{"POST", ports, `{"guest":80,"host":70000}`, 422, CodeValidationFailed, "host"},
		{"POST", ports, `{"guest":80,"host_address":"example.com"}`, 422, "invalid_port", "host_address"},
		{"POST", ports, fmt.Sprintf(`{"guest":80,"host":%d}`, busyPort), 409, "port_in_use", "host"},
		{"POST", ports, `{"guest":8080}`, 409, "port_already_exposed", "guest"},
		{"DELETE", ports + "/9999", "", 404, "port_not_exposed", "guest"},
		{"DELETE", ports + "/0", "", 422, CodeValidationFailed, "guest"},
		{"POST", base + "/sandboxes/vm-00000000/ports", `{"guest":80}`, 404, CodeSandboxNotFound, ""},
		{"POST", base + "/sandboxes", `{"network":{"mode":"bogus"}}`, 422, CodeValidationFailed, "network.mode"},
		{"POST", base + "/sandboxes", `{"network":{"mode":"restricted","allow":["not-a-cidr"]}}`, 422, "invalid_network", "network.allow"},
		{"POST", base + "/sandboxes", `{"network":{"mode":"off","allow":["10.0.0.0/8"]}}`, 422, "invalid_network", "network.allow"},
		{"POST", base + "/sandboxes", `{"network":{"mode":"restricted","allow_private":true}}`, 422, "invalid_network", "network.allow_private"},
		{"POST", base + "/sandboxes", `{"network":{"mode":"off"},"ports":[{"guest":80}]}`, 422, "invalid_port", "ports"},
		{"POST", base + "/sandboxes", fmt.Sprintf(`{"ports":[{"guest":80,"host":%d}]}`, busyPort), 409, "port_in_use", "host"},
	} {
		var body any
		if c.body != "" {
			body = c.body
		}
		r := do(t, c.method, c.url, body, nil)
		if r.Status != c.status {
			t.Errorf("%s %s %s: %d %s, want %d %s", c.method, c.url, c.body, r.Status, r.Body, c.status, c.code)
			continue
		}
		if p := r.problem(t); p.Code != c.code || (c.field != "" && p.Field != c.field) {
			t.Errorf("%s %s %s: code %s field %q, want %s %q (%s)", c.method, c.url, c.body, p.Code, p.Field, c.code, c.field, p.Detail)
		}
	}

	// Nothing the refusals touched changed, and nothing was left behind.
	r = do(t, http.MethodGet, ports, nil, nil)
	var list PortList
	r.decode(t, &list)
	if len(list.Ports) != 1 || list.Ports[0] != sb.Ports[0] {
		t.Fatalf("ports after refused requests: %+v, want %+v", list.Ports, sb.Ports)
	}
	var all SandboxList
	do(t, http.MethodGet, base+"/sandboxes", nil, nil).decode(t, &all)
	if len(all.Sandboxes) != 1 {
		t.Fatalf("refused creates left sandboxes behind: %+v", all.Sandboxes)
	}

	// Expose, then close, over HTTP.
	r = do(t, http.MethodPost, ports, `{"guest":9090}`, nil)
	var p Port
	r.decode(t, &p)
	if r.Status != http.StatusOK || p.Guest != 9090 || p.Host == 0 {
		t.Fatalf("expose: %d %s", r.Status, r.Body)
	}
	c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", p.Host), 5*time.Second)
	if err != nil {
		t.Fatalf("the exposed port does not listen: %v", err)
	}
	c.Close()
	r = do(t, http.MethodDelete, fmt.Sprintf("%s/%d", ports, 9090), nil, nil)
	var closed ClosePortResult
	r.decode(t, &closed)
	if r.Status != http.StatusOK || !closed.Closed || closed.Port != p {
		t.Fatalf("close: %d %s", r.Status, r.Body)
	}
	if c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", p.Host), 5*time.Second); err == nil {
		c.Close()
		t.Fatal("the closed port still accepts connections")
	}
}

func (r response) decode(t *testing.T, v any) {
	t.Helper()
	if err := json.Unmarshal(r.Body, v); err != nil {
		t.Fatalf("decode %d %s: %v", r.Status, r.Body, err)
	}
}

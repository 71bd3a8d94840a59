package sandbox_test

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/smolvm/smolvm/internal/network"
	"github.com/smolvm/smolvm/internal/sandbox"
	"github.com/smolvm/smolvm/internal/testenv"
	"github.com/smolvm/smolvm/internal/vmm"
)

// fetchCmd fetches http://HOST:PORT/ from inside a Debian guest with bash
// alone (the minimal image has no HTTP client), resolving HOST through the
// guest's resolver.
func fetchCmd(host string, port int) string {
	return fmt.Sprintf(`timeout 20 bash -c 'exec 3<>/dev/tcp/%s/%d && printf "GET / HTTP/1.0\r\nHost: x\r\n\r\n" >&3 && cat <&3'`, host, port)
}

func hostServer(t *testing.T, body string) int {
	t.Helper()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, body)
	}))
	t.Cleanup(srv.Close)
	return srv.Listener.Addr().(*net.TCPAddr).Port
}

func run(t *testing.T, m *sandbox.Manager, id, cmd string) sandbox.ExecResult {
	t.Helper()
	res, err := m.Exec(context.Background(), id, sandbox.ExecRequest{Command: cmd, Timeout: 60 * time.Second})
	if err != nil {
		t.Fatalf("exec %q: %v", cmd, err)
	}
	return res
}

func create(t *testing.T, m *sandbox.Manager, req sandbox.CreateRequest) sandbox.Info {
	t.Helper()
	info, err := m.Create(context.Background(), req)
	if err != nil {
		t.Fatalf("create: %v", err)
	}
	return info
}

// A guest reaches the host's loopback only when the user allowed it, by
// the name the guest's DNS gives it; by default neither that nor the
// host's own addresses answer.
func TestNetworkHostLoopback(t *testing.T) {
	t.Parallel()
	m := testenv.Manager(t)
	port := hostServer(t, "hello from the host\n")

	allowed := create(t, m, sandbox.CreateRequest{Network: network.Policy{AllowHostLoopback: true}})
	res := run(t, m, allowed.ID, "getent hosts "+network.HostName)
	if !strings.HasPrefix(string(res.Stdout), network.HostIP.String()) {
		t.Fatalf("getent hosts %s = %q (exit %d, %s), want %s", network.HostName, res.Stdout, res.ExitCode, res.Stderr, network.HostIP)
	}
	res = run(t, m, allowed.ID, fetchCmd(network.HostName, port))
	if res.ExitCode != 0 || !strings.HasSuffix(string(res.Stdout), "\r\n\r\nhello from the host\n") {
		t.Fatalf("fetch with allow_host_loopback: exit %d, stdout %q, stderr %q", res.ExitCode, res.Stdout, res.Stderr)
	}

	// UDP goes out as well: an echo server on the host's loopback answers.
	udpPort := udpEcho(t)
	udp := fmt.Sprintf(`timeout 5 bash -c 'exec 3<>/dev/udp/%s/%d && echo ping >&3 && head -c 5 <&3'`, network.HostName, udpPort)
	if res := run(t, m, allowed.ID, udp); res.ExitCode != 0 || string(res.Stdout) != "ping\n" {
		t.Fatalf("UDP to the host: exit %d, %q, %q", res.ExitCode, res.Stdout, res.Stderr)
	}

	def := create(t, m, sandbox.CreateRequest{})
	if res := run(t, m, def.ID, udp); res.ExitCode == 0 {
		t.Errorf("UDP from the default network reached the host: %q", res.Stdout)
	}
	if def.Network.Mode != network.ModeOpen || def.Network.AllowHostLoopback {
		t.Fatalf("default network = %+v, want mode open without host loopback", def.Network)
	}
	targets := []string{network.HostName, network.HostIP.String()}
	for _, a := range hostAddrs(t) {
		targets = append(targets, a.String())
	}
	for _, target := range targets {
		res := run(t, m, def.ID, fetchCmd(target, port))
		if res.ExitCode == 0 || bytes.Contains(res.Stdout, []byte("hello")) {
			t.Errorf("default network reached the host's server at %s:%d: exit %d, %q", target, port, res.ExitCode, res.Stdout)
		}
		if !bytes.Contains(res.Stderr, []byte("Connection refused")) {
			t.Errorf("connecting to %s: stderr %q, want a prompt refusal", target, res.Stderr)
		}
	}
}

// udpEcho answers each datagram on the host's loopback with itself.
func udpEcho(t *testing.T) int {
	t.Helper()
	c, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	go func() {
		buf := make([]byte, 2048)
		for {
			n, from, err := c.ReadFrom(buf)
			if err != nil {
				return
			}
			c.WriteTo(buf[:n], from)
		}
	}()
	return c.LocalAddr().(*net.UDPAddr).Port
}

// hostAddrs are this machine's own IPv4 addresses but loopback: a guest
// must not reach the host through them either.
func hostAddrs(t *testing.T) []netip.Addr {
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		t.Fatal(err)
	}
	var out []netip.Addr
	for _, a := range addrs {
		p, err := netip.ParsePrefix(a.String())
		if err == nil && p.Addr().Is4() && !p.Addr().IsLoopback() {
			out = append(out, p.Addr())
		}
	}
	return out
}

// In restricted mode only the listed destinations answer, the host's
// included: allow_host_loopback alone does not open it.
func TestNetworkRestricted(t *testing.T) {
	t.Parallel()
	m := testenv.Manager(t)
	port := hostServer(t, "restricted ok\n")
	listed := create(t, m, sandbox.CreateRequest{Network: network.Policy{
		Mode: network.ModeRestricted, AllowHostLoopback: true,
		Allow: []netip.Prefix{netip.MustParsePrefix(network.HostIP.String() + "/32")},
	}})
	res := run(t, m, listed.ID, fetchCmd(network.HostName, port))
	if res.ExitCode != 0 || !bytes.HasSuffix(res.Stdout, []byte("restricted ok\n")) {
		t.Fatalf("listed destination: exit %d, %q, %q", res.ExitCode, res.Stdout, res.Stderr)
	}
	unlisted := create(t, m, sandbox.CreateRequest{Network: network.Policy{
		Mode: network.ModeRestricted, AllowHostLoopback: true,
		Allow: []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8")},
	}})
	res = run(t, m, unlisted.ID, fetchCmd(network.HostName, port))
	if res.ExitCode == 0 || !bytes.Contains(res.Stderr, []byte("Connection refused")) {
		t.Fatalf("unlisted destination: exit %d, %q, %q", res.ExitCode, res.Stdout, res.Stderr)
	}
}

// Mode off leaves the guest only loopback, and commands still run.
func TestNetworkOff(t *testing.T) {
	t.Parallel()
	m := testenv.Manager(t)
	info := create(t, m, sandbox.CreateRequest{Network: network.Policy{Mode: network.ModeOff}})
	res := run(t, m, info.ID, "ls /sys/class/net")
	if got := strings.Fields(string(res.Stdout)); len(got) != 1 || got[0] != "lo" {
		t.Fatalf("interfaces with network off: %q, want only lo", res.Stdout)
	}
	if info.Network.Mode != network.ModeOff {
		t.Fatalf("Info.Network = %+v", info.Network)
	}
	_, err := m.ExposePort(context.Background(), info.ID, network.Forward{Guest: 80})
	wantCode(t, err, "network_off")
	if _, err := m.Create(context.Background(), sandbox.CreateRequest{
		Network: network.Policy{Mode: network.ModeOff}, Ports: []network.Forward{{Guest: 80}},
	}); err == nil {
		t.Fatal("ports with network off were accepted")
	}
}

func wantCode(t *testing.T, err error, code string) {
	t.Helper()
	e, ok := sandbox.AsError(err)
	if !ok || e.Code != code {
		t.Fatalf("error = %v, want code %s", err, code)
	}
}

// webRoot is a busybox root whose httpd serves /www.
func webRoot(t *testing.T) string {
	t.Helper()
	bb, err := os.ReadFile("/bin/busybox")
	if err != nil {
		t.Skipf("Debian's busybox-static is needed to build a test image (scripts/test.sh installs it): %v", err)
	}
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	add := func(h *tar.Header, body string) {
		h.Size = int64(len(body))
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		io.WriteString(tw, body)
	}
	for _, d := range []string{"bin/", "etc/", "www/", "tmp/", "root/"} {
		add(&tar.Header{Name: d, Mode: 0o755, Typeflag: tar.TypeDir}, "")
	}
	add(&tar.Header{Name: "bin/busybox", Mode: 0o755, Typeflag: tar.TypeReg}, string(bb))
	for _, applet := range []string{"sh", "cat", "echo", "head", "httpd", "wget", "nc", "ls", "true", "hostname", "ping"} {
		add(&tar.Header{Name: "bin/" + applet, Mode: 0o777, Typeflag: tar.TypeSymlink, Linkname: "busybox"}, "")
	}
	add(&tar.Header{Name: "etc/passwd", Mode: 0o644, Typeflag: tar.TypeReg}, "root:x:0:0:root:/root:/bin/sh\n")
	add(&tar.Header{Name: "etc/group", Mode: 0o644, Typeflag: tar.TypeReg}, "root:x:0:\n")
	add(&tar.Header{Name: "www/index.html", Mode: 0o644, Typeflag: tar.TypeReg}, "served from the guest\n")
	tw.Close()
	path := filepath.Join(t.TempDir(), "web.tar")
	if err := os.WriteFile(path, buf.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
	return "file://" + path
}

func get(url string) (string, error) {
	c := http.Client{Timeout: 20 * time.Second}
	resp, err := c.Get(url)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return string(b), err
}

// A server in the guest is reached from the host through an exposed port,
// and not once the forward is removed; bad ports are refused clearly.
func TestNetworkExposePort(t *testing.T) {
	t.Parallel()
	m := testenv.Manager(t)
	ctx := context.Background()
	img := webRoot(t)
	info := create(t, m, sandbox.CreateRequest{Image: img, Ports: []network.Forward{{Guest: 8080}}})
	if len(info.Ports) != 1 || info.Ports[0].Guest != 8080 || info.Ports[0].Host == 0 || info.Ports[0].HostAddress != "127.0.0.1" {
		t.Fatalf("ports on create = %+v, want guest 8080 on 127.0.0.1 with a host port picked", info.Ports)
	}
	// Only the gateway answers pings: the stack would answer for every
	// address if let, and ping must not report as reachable what is not.
	if res := run(t, m, info.ID, "ping -c1 -W5 "+network.GatewayIP.String()); res.ExitCode != 0 {
		t.Errorf("ping the gateway: exit %d %s%s", res.ExitCode, res.Stdout, res.Stderr)
	}
	for _, addr := range []string{"169.254.169.254", "203.0.113.1"} {
		if res := run(t, m, info.ID, "ping -c1 -W2 "+addr); res.ExitCode == 0 {
			t.Errorf("ping %s answered: %s", addr, res.Stdout)
		}
	}
	if res := run(t, m, info.ID, "busybox httpd -p 8080 -h /www && busybox httpd -p 9090 -h /www"); res.ExitCode != 0 {
		t.Fatalf("start httpd: %d %s", res.ExitCode, res.Stderr)
	}
	url := fmt.Sprintf("http://127.0.0.1:%d/index.html", info.Ports[0].Host)
	if body, err := get(url); err != nil || body != "served from the guest\n" {
		t.Fatalf("GET %s through the port given on create = %q, %v", url, body, err)
	}

	f, err := m.ExposePort(ctx, info.ID, network.Forward{Guest: 9090})
	if err != nil {
		t.Fatal(err)
	}
	url = fmt.Sprintf("http://127.0.0.1:%d/index.html", f.Host)
	if body, err := get(url); err != nil || body != "served from the guest\n" {
		t.Fatalf("GET %s = %q, %v", url, body, err)
	}
	ports, err := m.Ports(ctx, info.ID)
	if err != nil || len(ports) != 2 || ports[1] != f {
		t.Fatalf("Ports = %+v, %v", ports, err)
	}

	// Bad input, each with its code, and nothing changed by it.
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	busyPort := busy.Addr().(*net.TCPAddr).Port
	for _, c := range []struct {
		f    network.Forward
		code string
	}{
		{network.Forward{Guest: 0}, "invalid_port"},
		{network.Forward{Guest: 65536}, "invalid_port"},
		{network.Forward{Guest: 22, Host: 70000}, "invalid_port"},
		{network.Forward{Guest: 22, Host: -1}, "invalid_port"},
		{network.Forward{Guest: 22, HostAddress: "localhost"}, "invalid_port"},
		{network.Forward{Guest: 22, HostAddress: "192.0.2.1"}, "invalid_host_address"},
		{network.Forward{Guest: 22, Host: busyPort}, "port_in_use"},
		{network.Forward{Guest: 9090}, "port_already_exposed"},
	} {
		_, err := m.ExposePort(ctx, info.ID, c.f)
		e, ok := sandbox.AsError(err)
		if !ok || e.Code != c.code || (e.Kind != sandbox.KindInvalid && e.Kind != sandbox.KindConflict) {
			t.Errorf("expose %+v: %v, want a client error %s", c.f, err, c.code)
		}
	}
	if after, _ := m.Ports(ctx, info.ID); len(after) != 2 {
		t.Fatalf("failed requests changed the ports: %+v", after)
	}
	if _, err := m.Create(ctx, sandbox.CreateRequest{Ports: []network.Forward{{Guest: 80, Host: busyPort}}}); err == nil {
		t.Fatal("create with a host port in use succeeded")
	} else {
		wantCode(t, err, "port_in_use")
	}

	if _, err := m.ClosePort(ctx, info.ID, 9090); err != nil {
		t.Fatal(err)
	}
	if _, err := get(url); err == nil || !isRefused(err) {
		t.Fatalf("GET %s after close: %v, want connection refused", url, err)
	}
	_, err = m.ClosePort(ctx, info.ID, 9090)
	wantCode(t, err, "port_not_exposed")
	if body, err := get(fmt.Sprintf("http://127.0.0.1:%d/index.html", info.Ports[0].Host)); err != nil || body != "served from the guest\n" {
		t.Fatalf("the other forward stopped working: %q, %v", body, err)
	}
}

func isRefused(err error) bool {
	var oe *net.OpError
	return errors.As(err, &oe) && strings.Contains(oe.Err.Error(), "connection refused")
}

// Template clones each get a network and forwards of their own; forwards
// outlive the process that made them, and come back after a stop and
// start.
func TestNetworkClonesRestartAndStopStart(t *testing.T) {
	t.Parallel()
	d := testenv.DataDir(t)
	ctx := context.Background()
	m := testenv.ManagerAt(t, d)
	img := webRoot(t)
	var sbs []sandbox.Info
	for range 2 {
		info := create(t, m, sandbox.CreateRequest{Image: img, Ports: []network.Forward{{Guest: 8080}}})
		if info.Boot != sandbox.BootTemplate && len(sbs) > 0 {
			t.Fatalf("second sandbox booted %s, want a template clone", info.Boot)
		}
		// Each serves its own hostname, to tell them apart.
		if res := run(t, m, info.ID, "mkdir -p /w && hostname > /w/index.html && busybox httpd -p 8080 -h /w"); res.ExitCode != 0 {
			t.Fatalf("httpd: %s", res.Stderr)
		}
		sbs = append(sbs, info)
	}
	if sbs[0].Ports[0].Host == sbs[1].Ports[0].Host {
		t.Fatalf("two clones share host port %d", sbs[0].Ports[0].Host)
	}
	check := func(info sandbox.Info, hostPort int) {
		t.Helper()
		body, err := get(fmt.Sprintf("http://127.0.0.1:%d/", hostPort))
		if err != nil || body != info.ID+"\n" {
			t.Fatalf("GET through %s's port %d = %q, %v; want its hostname", info.ID, hostPort, body, err)
		}
	}
	for _, s := range sbs {
		check(s, s.Ports[0].Host)
		// The network is IPv4 alone: eth0 has no IPv6 to send into it,
		// while loopback keeps ::1.
		v6 := run(t, m, s.ID, "cat /proc/sys/net/ipv6/conf/eth0/disable_ipv6; awk '{print $6, $1}' /proc/net/if_inet6")
		if want := "1\nlo 00000000000000000000000000000001\n"; string(v6.Stdout) != want {
			t.Errorf("%s: eth0's IPv6 switch and the IPv6 addresses are %q, want %q", s.ID, v6.Stdout, want)
		}
	}

	// A new process sees the same forwards, still working.
	m.Close()
	m2 := testenv.ManagerAt(t, d)
	for _, s := range sbs {
		got, err := m2.Get(ctx, s.ID)
		if err != nil || len(got.Ports) != 1 || got.Ports[0] != s.Ports[0] {
			t.Fatalf("after reopen, ports of %s = %+v, %v; want %+v", s.ID, got.Ports, err, s.Ports)
		}
		check(s, s.Ports[0].Host)
	}

	// Stop takes the forward away with the VM; Start brings it back on
	// the same host port, which is still free.
	s := sbs[0]
	if err := m2.Stop(ctx, s.ID, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := get(fmt.Sprintf("http://127.0.0.1:%d/", s.Ports[0].Host)); err == nil {
		t.Fatal("a stopped sandbox's port still answers")
	}
	if network.Running(d.Sandbox(s.ID)) {
		t.Fatal("the network process outlived the stopped VM")
	}
	started, err := m2.Start(ctx, s.ID)
	if err != nil {
		t.Fatal(err)
	}
	if len(started.Ports) != 1 || started.Ports[0] != s.Ports[0] {
		t.Fatalf("ports after start = %+v, want %+v", started.Ports, s.Ports)
	}
	if res := run(t, m2, s.ID, "busybox httpd -p 8080 -h /w"); res.ExitCode != 0 {
		t.Fatalf("httpd after start: %s", res.Stderr)
	}
	check(s, s.Ports[0].Host)

	// A port smolvm picked moves to another when its host port was taken
	// while the sandbox was stopped; a stopped sandbox's port can be closed.
	s1 := sbs[1]
	if err := m2.Stop(ctx, s1.ID, 0); err != nil {
		t.Fatal(err)
	}
	hold, err := net.Listen("tcp", s1.Ports[0].Listen())
	if err != nil {
		t.Fatal(err)
	}
	defer hold.Close()
	moved, err := m2.Start(ctx, s1.ID)
	if err != nil {
		t.Fatal(err)
	}
	if len(moved.Ports) != 1 || moved.Ports[0].Host == s1.Ports[0].Host || moved.Ports[0].Host == 0 {
		t.Fatalf("ports after a start with the old host port taken: %+v (was %+v)", moved.Ports, s1.Ports)
	}
	if err := m2.Stop(ctx, s1.ID, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := m2.ClosePort(ctx, s1.ID, 8080); err != nil {
		t.Fatalf("close a stopped sandbox's port: %v", err)
	}
	if got, _ := m2.Get(ctx, s1.ID); len(got.Ports) != 0 {
		t.Fatalf("ports after close = %+v", got.Ports)
	}

	// Delete leaves no network process behind.
	b, err := os.ReadFile(filepath.Join(d.Sandbox(s.ID), "net.pid"))
	if err != nil {
		t.Fatal(err)
	}
	pid, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	if err := m2.Delete(ctx, s.ID); err != nil {
		t.Fatal(err)
	}
	if vmm.ProcessAlive(pid, d.Sandbox(s.ID)) {
		t.Fatalf("the network process (pid %d) outlived its deleted sandbox", pid)
	}
}

// A pooled sandbox waits with the default network and is given the
// request's policy and ports when it is handed out; mode off (no NIC)
// never comes from the pool.
func TestNetworkPool(t *testing.T) {
	t.Parallel()
	d := testenv.DataDir(t)
	ctx := context.Background()
	m, err := sandbox.Open(ctx, sandbox.Options{DataDir: d, AgentPath: testenv.AgentPath(t), NetPath: testenv.NetPath(t), Pool: 1, PoolCleanup: true})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	port := hostServer(t, "pool ok\n")

	waitPool(t, m, 1)
	info := create(t, m, sandbox.CreateRequest{Network: network.Policy{AllowHostLoopback: true}, Ports: []network.Forward{{Guest: 8080}}})
	defer m.Delete(ctx, info.ID)
	if info.Boot != sandbox.BootPool || !info.Network.AllowHostLoopback || len(info.Ports) != 1 || info.Ports[0].Host == 0 {
		t.Fatalf("claimed: boot %s network %+v ports %+v", info.Boot, info.Network, info.Ports)
	}
	if res := run(t, m, info.ID, fetchCmd(network.HostName, port)); !bytes.HasSuffix(res.Stdout, []byte("pool ok\n")) {
		t.Fatalf("the claimed sandbox did not get its policy: exit %d %q %q", res.ExitCode, res.Stdout, res.Stderr)
	}
	c, err := net.DialTimeout("tcp", info.Ports[0].Listen(), 5*time.Second)
	if err != nil {
		t.Fatalf("the claimed sandbox's port does not listen: %v", err)
	}
	c.Close()

	waitPool(t, m, 1)
	def := create(t, m, sandbox.CreateRequest{})
	defer m.Delete(ctx, def.ID)
	if def.Boot != sandbox.BootPool {
		t.Fatalf("default create booted %s", def.Boot)
	}
	if res := run(t, m, def.ID, fetchCmd(network.HostName, port)); res.ExitCode == 0 {
		t.Fatalf("a default pooled sandbox reached the host: %q", res.Stdout)
	}

	waitPool(t, m, 1)
	off := create(t, m, sandbox.CreateRequest{Network: network.Policy{Mode: network.ModeOff}})
	defer m.Delete(ctx, off.ID)
	if off.Boot == sandbox.BootPool {
		t.Fatal("a sandbox without network came from the pool, whose members have a NIC")
	}
}

// The network process starts beside the VM; one that dies at start fails
// the create with what it said, and leaves no VM or network process.
func TestNetworkThatDiesAtStart(t *testing.T) {
	t.Parallel()
	d := testenv.DataDir(t)
	ctx := context.Background()
	// The same binary launches jailed QEMUs: that part of it works.
	bad := filepath.Join(t.TempDir(), "smolvm-net")
	script := "#!/bin/sh\n[ \"$1\" = qemu-launch ] && exec " + testenv.NetPath(t) + " \"$@\"\necho the network broke >&2\nexit 3\n"
	if err := os.WriteFile(bad, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	m, err := sandbox.Open(ctx, sandbox.Options{DataDir: d, AgentPath: testenv.AgentPath(t), NetPath: bad, NoTemplates: true})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	_, err = m.Create(ctx, sandbox.CreateRequest{})
	if err == nil || !strings.Contains(err.Error(), "network process exited at start") || !strings.Contains(err.Error(), "the network broke") {
		t.Fatalf("create with a network that dies: %v", err)
	}
	if pids := vmm.ProcessesWith(d.Path()); len(pids) > 0 {
		t.Errorf("processes %v left under the data directory", pids)
	}
	list, err := m.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range list {
		if s.Status == sandbox.StatusRunning {
			t.Errorf("sandbox %s is running after its create failed", s.ID)
		}
	}
}

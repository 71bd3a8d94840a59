package network_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/smolvm/smolvm/internal/cgroup"
	"github.com/smolvm/smolvm/internal/jail"
	"github.com/smolvm/smolvm/internal/network"
	"github.com/smolvm/smolvm/internal/testenv"
)

func TestDecide(t *testing.T) {
	host := []netip.Addr{netip.MustParseAddr("10.1.2.3"), netip.MustParseAddr("127.0.0.1")}
	open := network.Policy{Mode: network.ModeOpen}
	openPrivate := network.Policy{Mode: network.ModeOpen, AllowPrivate: true}
	openListed := network.Policy{Mode: network.ModeOpen, Allow: []netip.Prefix{netip.MustParsePrefix("10.9.0.0/16")}}
	withHost := network.Policy{Mode: network.ModeOpen, AllowHostLoopback: true}
	restricted := network.Policy{Mode: network.ModeRestricted, Allow: []netip.Prefix{
		netip.MustParsePrefix("93.184.0.0/16"), netip.MustParsePrefix("192.168.127.254/32"), netip.MustParsePrefix("127.0.0.0/8"),
	}}
	restrictedHost := restricted
	restrictedHost.AllowHostLoopback = true
	for _, c := range []struct {
		p      network.Policy
		dst    string
		allow  bool
		dialed string
	}{
		{open, "93.184.216.34", true, "93.184.216.34"},
		{open, "10.9.9.9", false, ""}, // another machine on the LAN
		{open, "172.20.0.1", false, ""},
		{open, "192.168.1.1", false, ""},
		{open, "100.64.0.1", false, ""}, // CGNAT
		{open, "198.18.0.1", false, ""},
		{open, "172.32.0.1", true, "172.32.0.1"}, // just past 172.16/12
		{openPrivate, "10.9.9.9", true, "10.9.9.9"},
		{openPrivate, "100.64.0.1", true, "100.64.0.1"},
		{openPrivate, "169.254.169.254", false, ""}, // metadata stays refused
		{openPrivate, "10.1.2.3", false, ""},        // the host's own address
		{openListed, "10.9.9.9", true, "10.9.9.9"},
		{openListed, "10.8.0.1", false, ""},
		{openListed, "93.184.216.34", true, "93.184.216.34"},
		{open, "127.0.0.1", false, ""},
		{open, "127.1.2.3", false, ""},
		{open, "0.0.0.0", false, ""}, // reaches the host's loopback on Linux
		{open, "169.254.169.254", false, ""},
		{open, "169.254.1.1", false, ""},
		{open, "168.63.129.16", false, ""},
		{open, "100.100.100.200", false, ""},
		{open, "224.0.0.251", false, ""},
		{open, "255.255.255.255", false, ""},
		{open, "192.168.127.254", false, ""},
		{open, "192.168.127.7", false, ""},
		{open, "10.1.2.3", false, ""}, // the host's own address
		{open, "::ffff:127.0.0.1", false, ""},
		{withHost, "192.168.127.254", true, "127.0.0.1"},
		{withHost, "10.1.2.3", true, "10.1.2.3"},
		{withHost, "169.254.169.254", false, ""},
		{withHost, "127.0.0.1", false, ""},
		{restricted, "93.184.216.34", true, "93.184.216.34"},
		{restricted, "8.8.8.8", false, ""},
		{restricted, "192.168.127.254", false, ""}, // listed, but the host needs allow_host_loopback
		{restricted, "127.0.0.1", false, ""},       // listed, but loopback is never dialed
		{restrictedHost, "192.168.127.254", true, "127.0.0.1"},
		{restrictedHost, "10.1.2.3", false, ""}, // the host, but not listed
		{network.Policy{Mode: network.ModeOff}, "93.184.216.34", false, ""},
	} {
		v := c.p.Decide(netip.MustParseAddr(c.dst), host)
		if v.Allowed != c.allow || (c.allow && v.Dial.String() != c.dialed) {
			t.Errorf("%+v to %s: %+v, want allowed=%v dial %s", c.p, c.dst, v, c.allow, c.dialed)
		}
		if !v.Allowed && v.Reason == "" {
			t.Errorf("%+v to %s: refused without a reason", c.p, c.dst)
		}
	}
}

func TestPolicyNormalize(t *testing.T) {
	for _, c := range []struct {
		p     network.Policy
		field string
	}{
		{network.Policy{}, ""},
		{network.Policy{Mode: "closed"}, "network.mode"},
		{network.Policy{Mode: network.ModeOpen, Allow: []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8")}}, ""}, // private exceptions
		{network.Policy{Mode: network.ModeOff, Allow: []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8")}}, "network.allow"},
		{network.Policy{Mode: network.ModeOpen, AllowPrivate: true}, ""},
		{network.Policy{Mode: network.ModeRestricted, AllowPrivate: true}, "network.allow_private"},
		{network.Policy{Mode: network.ModeOff, AllowPrivate: true}, "network.allow_private"},
		{network.Policy{Mode: network.ModeRestricted, Allow: []netip.Prefix{netip.MustParsePrefix("::/0")}}, "network.allow"},
		{network.Policy{Mode: network.ModeOff, AllowHostLoopback: true}, "network.allow_host_loopback"},
		{network.Policy{Mode: network.ModeRestricted}, ""}, // nothing allowed at all
	} {
		err := c.p.Normalize()
		var fe *network.FieldError
		switch {
		case c.field == "" && err != nil:
			t.Errorf("%+v: %v", c.p, err)
		case c.field != "" && (!errors.As(err, &fe) || fe.Field != c.field):
			t.Errorf("%+v: %v, want an error about %s", c.p, err, c.field)
		}
	}
	p := network.Policy{}
	p.Normalize()
	if p.Mode != network.ModeOpen {
		t.Errorf("default mode %q, want open", p.Mode)
	}
	if _, err := network.ParsePrefixes([]string{"10.0.0.0/8", "1.2.3.4", "nonsense"}); err == nil {
		t.Error("ParsePrefixes accepted nonsense")
	}
	if got, _ := network.ParsePrefixes([]string{"1.2.3.4"}); len(got) != 1 || got[0].String() != "1.2.3.4/32" {
		t.Errorf("a single address parsed as %v", got)
	}
}

// freeLowPort finds a port below 1024 that nothing on loopback holds.
func freeLowPort(t *testing.T) int {
	t.Helper()
	for p := 1023; p > 600; p-- {
		ln, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", p))
		if err == nil {
			ln.Close()
			return p
		}
	}
	t.Skip("no free port below 1024 on loopback")
	return 0
}

// The network process starts, answers on its control socket, manages
// forwards with the documented errors, and is gone after Stop.
func TestProcessAndForwards(t *testing.T) {
	bin := testenv.NetPath(t)
	dir, err := os.MkdirTemp("", "smolvm-net")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	ctx := context.Background()
	// As root the process runs as a user of its own, as the server's do.
	uid := 0
	if os.Geteuid() == 0 {
		u, release, err := jail.NewUsers(jail.NetworkBase, jail.PerRange).Allocate()
		if err != nil {
			t.Fatal(err)
		}
		defer release()
		uid = u
	}
	var j network.Jail
	j.UID = uid
	if uid != 0 {
		if h, err := cgroup.Detect(cgroup.Root); err == nil {
			j.Cgroups = &h
		}
	}
	pid, err := network.Start(ctx, bin, dir, network.Policy{Mode: network.ModeOpen}, j)
	if err != nil {
		t.Fatal(err)
	}
	defer network.Stop(ctx, dir)
	if !network.Running(dir) {
		t.Fatalf("network process %d is not running", pid)
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	status := string(b)
	// It filters its own system calls, as whoever it runs as.
	wants := []string{"NoNewPrivs:\t1\n", "Seccomp:\t2\n"}
	if uid != 0 {
		wants = append(wants, fmt.Sprintf("Uid:\t%d\t%d\t%d\t%d\n", uid, uid, uid, uid), "CapEff:\t0000000000000400\n")
	}
	for _, want := range wants {
		if !strings.Contains(status, want) {
			t.Errorf("the network process's status lacks %q:\n%s", want, status)
		}
	}
	if uid != 0 {
		checkNetJail(t, pid, status)
	}
	if j.Cgroups != nil {
		if g := cgroup.Of(pid); !strings.HasPrefix(g, "net-") {
			t.Errorf("the network process is in control group %q, not one of its own", g)
		}
	}
	c := network.Dial(network.Files{Dir: dir}.Control())
	st, err := c.Status(ctx)
	if err != nil || st.PID != pid || st.Policy.Mode != network.ModeOpen || len(st.Forwards) != 0 {
		t.Fatalf("status = %+v, %v", st, err)
	}

	f, err := c.Expose(ctx, network.Forward{Guest: 80})
	if err != nil || f.Host == 0 || f.HostAddress != "127.0.0.1" {
		t.Fatalf("expose = %+v, %v", f, err)
	}
	// The host side listens (no guest answers behind it here).
	conn, err := net.Dial("tcp", f.Listen())
	if err != nil {
		t.Fatalf("dial the forward: %v", err)
	}
	conn.Close()

	if uid != 0 {
		// Below 1024, which its one capability allows.
		low := freeLowPort(t)
		lf, err := c.Expose(ctx, network.Forward{Guest: 22, Host: low})
		if err != nil || lf.Host != low {
			t.Fatalf("expose on port %d: %+v, %v", low, lf, err)
		}
		if _, err := c.Unexpose(ctx, 22); err != nil {
			t.Fatal(err)
		}
	}

	busy, _ := net.Listen("tcp", "127.0.0.1:0")
	defer busy.Close()
	busyPort := busy.Addr().(*net.TCPAddr).Port
	for _, tc := range []struct {
		f    network.Forward
		want error
	}{
		{network.Forward{Guest: 80}, network.ErrAlreadyExposed},
		{network.Forward{Guest: 81, Host: busyPort}, network.ErrPortInUse},
		{network.Forward{Guest: 82, HostAddress: "192.0.2.1"}, network.ErrBadHostAddress},
	} {
		if _, err := c.Expose(ctx, tc.f); !errors.Is(err, tc.want) {
			t.Errorf("expose %+v: %v, want %v", tc.f, err, tc.want)
		}
	}
	var fe *network.FieldError
	if _, err := c.Expose(ctx, network.Forward{Guest: 0}); !errors.As(err, &fe) || fe.Field != "guest" {
		t.Errorf("expose guest 0: %v", err)
	}
	if err := c.SetPolicy(ctx, network.Policy{Mode: network.ModeOff}); !errors.As(err, &fe) {
		t.Errorf("turning a running network off: %v", err)
	}
	if err := c.SetPolicy(ctx, network.Policy{Mode: network.ModeOpen, AllowHostLoopback: true}); err != nil {
		t.Fatal(err)
	}
	if st, _ := c.Status(ctx); !st.Policy.AllowHostLoopback || len(st.Forwards) != 1 {
		t.Fatalf("status after changes = %+v", st)
	}
	if _, err := c.Unexpose(ctx, 80); err != nil {
		t.Fatal(err)
	}
	if _, err := net.Dial("tcp", f.Listen()); err == nil {
		t.Fatal("the closed forward still listens")
	}
	if _, err := c.Unexpose(ctx, 80); !errors.Is(err, network.ErrNotExposed) {
		t.Fatalf("second unexpose: %v", err)
	}

	if err := network.Stop(ctx, dir); err != nil {
		t.Fatal(err)
	}
	if network.Running(dir) {
		t.Fatal("still running after Stop")
	}
	if _, err := c.Status(ctx); err == nil {
		t.Fatal("the control socket answers after Stop")
	}
}

// A process whose binary cannot serve reports why instead of hanging.
func TestStartFailure(t *testing.T) {
	dir := t.TempDir()
	_, err := network.Start(context.Background(), "/bin/false", dir, network.Policy{}, network.Jail{})
	if err == nil || !strings.Contains(err.Error(), "exited") {
		t.Fatalf("start of /bin/false: %v", err)
	}
}

// checkNetJail checks, from the host, the walls around a network process
// started by root: its own mount namespace, a root that holds the host's
// /etc (read-only) and no more, and no capability but binding low ports.
func checkNetJail(t *testing.T, pid int, status string) {
	t.Helper()
	for _, want := range []string{"CapPrm:\t0000000000000400\n", "CapInh:\t0000000000000400\n"} {
		if !strings.Contains(status, want) {
			t.Errorf("the network process's status lacks %q:\n%s", want, status)
		}
	}
	ours, err := os.Readlink("/proc/self/ns/mnt")
	if err != nil {
		t.Fatal(err)
	}
	theirs, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/mnt", pid))
	if err != nil {
		t.Fatal(err)
	}
	if ours == theirs {
		t.Errorf("the network process shares the host's mount namespace (%s)", ours)
	}
	root := fmt.Sprintf("/proc/%d/root", pid)
	ents, err := os.ReadDir(root)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	// /etc, and where resolv.conf leads if it is a link out of /etc.
	allowed := []string{"etc", strings.Split(strings.TrimPrefix(resolvDir(), "/"), "/")[0]}
	if !slices.Contains(names, "etc") || slices.ContainsFunc(names, func(n string) bool { return !slices.Contains(allowed, n) }) {
		t.Errorf("the network process's root holds %q, want only %q", names, allowed)
	}
	if _, err := os.Stat(filepath.Join(root, "etc", "hostname")); err != nil {
		t.Errorf("the network process cannot see /etc: %v", err)
	}
	// Read-only to everyone, root included.
	if err := os.WriteFile(filepath.Join(root, "etc", "smolvm-jail-test"), nil, 0o644); err == nil {
		os.Remove(filepath.Join(root, "etc", "smolvm-jail-test"))
		t.Error("the network process's /etc is writable")
	}
	if err := os.Mkdir(filepath.Join(root, "x"), 0o755); err == nil {
		t.Error("the network process's root is writable")
	}
}

// resolvDir is where /etc/resolv.conf leads, if out of /etc.
func resolvDir() string {
	target, err := filepath.EvalSymlinks("/etc/resolv.conf")
	if err != nil || strings.HasPrefix(target, "/etc/") {
		return "/etc"
	}
	return filepath.Dir(target)
}

package libkrun

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/smolvm/smolvm/internal/agent/wire"
	"github.com/smolvm/smolvm/internal/cgroup"
	"github.com/smolvm/smolvm/internal/jail/jailtest"
	"github.com/smolvm/smolvm/internal/vmm"
	"github.com/smolvm/smolvm/internal/vmm/libkrun/libkruntest"
)

// These tests run the real smolvm-krun, built with CGO_ENABLED=0, through
// the driver's real Start, against a stub libkrun.so that records each
// call (libkruntest): this host has neither KVM nor libkrun.

func TestMain(m *testing.M) {
	code := m.Run()
	libkruntest.Cleanup()
	os.Exit(code)
}

type fixture struct {
	drv   *Driver
	spec  vmm.Spec
	calls string // the stub's record
	base  []byte // the base image's contents
	lib   string
}

const (
	testVCPUs  = 2
	testMemory = 512
	testDisk   = 8 // MiB
	testMAC    = "52:54:00:12:34:56"
)

// setup builds the helper and a stub library, and describes a sandbox in
// a directory of its own. omit leaves functions out of the stub.
func setup(t *testing.T, omit ...string) *fixture {
	t.Helper()
	helper, err := libkruntest.Helper()
	if err != nil {
		t.Fatal(err)
	}
	work := t.TempDir()
	lib, err := libkruntest.BuildStub(work, omit...)
	if err != nil {
		t.Fatal(err)
	}
	f := &fixture{lib: lib}
	t.Setenv(libkruntest.EnvFail, "")

	// A base image with data, a hole and more data, as an ext4 image has.
	base := filepath.Join(work, "base.ext4")
	f.base = make([]byte, 3<<20)
	copy(f.base, "not a real ext4 superblock, which the driver never reads")
	copy(f.base[2<<20:], "data after a hole")
	writeSparse(t, base, f.base)

	kernel := filepath.Join(work, "vmlinux")
	initrd := filepath.Join(work, "initramfs.cpio")
	for _, p := range []string{kernel, initrd} {
		if err := os.WriteFile(p, []byte("stub"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	dir := filepath.Join(work, "sb")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	// The stub records from inside the helper's jail, where of the host's
	// files only the sandbox's directory is there to write to: its record
	// is made there beforehand, for anyone to write.
	f.calls = filepath.Join(dir, stubRecord)
	if err := errors.Join(os.WriteFile(f.calls, nil, 0o666), os.Chmod(f.calls, 0o666)); err != nil {
		t.Fatal(err)
	}
	t.Setenv(libkruntest.EnvLog, f.calls)
	f.spec = vmm.Spec{
		ID:        "vm-test",
		Dir:       dir,
		Kernel:    kernel,
		Initrd:    initrd,
		Cmdline:   "console=ttyS0 quiet panic=-1 smolvm.hostname=vm-test",
		BaseImage: base,
		DiskMiB:   testDisk,
		MemoryMiB: testMemory,
		VCPUs:     testVCPUs,
		Net:       &vmm.NetAttachment{Kind: vmm.NetStream, Socket: filepath.Join(dir, "net.sock"), MAC: testMAC},
	}
	// The network process's socket, as it listens before a VM starts.
	ln, err := net.Listen("unix", f.spec.Net.Socket)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	f.drv = New(Options{Helper: helper, Library: lib, NoCgroup: true})
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := f.drv.Reap(ctx, dir); err != nil {
			t.Errorf("reap: %v", err)
		}
	})
	return f
}

// stubRecord is the stub's record in the sandbox's directory: the test's
// file, not the driver's.
const stubRecord = "calls.jsonl"

// writeSparse writes b to path, leaving its 4 KiB blocks of zeros as holes.
func writeSparse(t *testing.T, path string, b []byte) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for off := 0; off < len(b); off += 4096 {
		blk := b[off:min(off+4096, len(b))]
		if !allZero(blk) {
			if _, err := f.WriteAt(blk, int64(off)); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := f.Truncate(int64(len(b))); err != nil {
		t.Fatal(err)
	}
}

func (f *fixture) recorded(t *testing.T) []libkruntest.Call {
	t.Helper()
	calls, err := libkruntest.Calls(f.calls)
	if err != nil {
		t.Fatal(err)
	}
	return calls
}

func (f *fixture) start(t *testing.T) vmm.Machine {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	m, err := f.drv.Start(ctx, f.spec)
	if err != nil {
		t.Fatalf("Start: %v", err)
	}
	t.Cleanup(func() { m.Kill(context.Background()) })
	return m
}

func ctxFor(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// ctxCalls are libkrun.h's functions that take a context id first.
var ctxCalls = []string{
	"krun_set_vm_config", "krun_set_kernel", "krun_add_disk",
	"krun_disable_implicit_vsock", "krun_add_vsock", "krun_add_vsock_port2",
	"krun_add_net_unixstream", "krun_set_console_output", "krun_start_enter",
}

// argCount is how many arguments each recorded function has in libkrun.h.
var argCount = map[string]int{
	"krun_set_log_level": 1, "krun_create_ctx": 0, "krun_set_vm_config": 3,
	"krun_set_kernel": 5, "krun_add_disk": 4, "krun_disable_implicit_vsock": 1,
	"krun_add_vsock": 2, "krun_add_vsock_port2": 4, "krun_add_net_unixstream": 6,
	"krun_set_console_output": 2, "krun_start_enter": 1,
}

// checkOrder checks the rules libkrun.h sets for a sequence of calls:
// the context comes first and every call after names it; the VM config
// and the vsock device come before what depends on them; and
// krun_start_enter, which consumes the context, comes last and once.
func checkOrder(t *testing.T, calls []libkruntest.Call) {
	t.Helper()
	var names []string
	for _, c := range calls {
		names = append(names, c.Name)
		if n, ok := argCount[c.Name]; !ok {
			t.Errorf("call to %s, which the stub records but the test does not know", c.Name)
		} else if len(c.Args) != n {
			t.Errorf("%s has %d arguments, libkrun.h declares %d", c, len(c.Args), n)
		}
	}
	create := slices.Index(names, "krun_create_ctx")
	if create < 0 {
		t.Fatalf("no krun_create_ctx in %v", names)
	}
	for i, c := range calls {
		if !slices.Contains(ctxCalls, c.Name) {
			continue
		}
		if i < create {
			t.Errorf("%s before krun_create_ctx", c)
		}
		if string(c.Args[0]) != fmt.Sprint(libkruntest.StubCtx) {
			t.Errorf("%s: context id is not the %d krun_create_ctx returned", c, libkruntest.StubCtx)
		}
	}
	before := func(a, b string) {
		t.Helper()
		ia, ib := slices.Index(names, a), slices.Index(names, b)
		if ia < 0 || ib < 0 || ia > ib {
			t.Errorf("%s must come before %s: %v", a, b, names)
		}
	}
	before("krun_set_log_level", "krun_create_ctx")
	before("krun_set_vm_config", "krun_start_enter")
	before("krun_set_kernel", "krun_start_enter")
	before("krun_disable_implicit_vsock", "krun_add_vsock")
	before("krun_add_vsock", "krun_add_vsock_port2")
	before("krun_set_console_output", "krun_start_enter")
	if n := len(names); names[n-1] != "krun_start_enter" || slices.Index(names, "krun_start_enter") != n-1 {
		t.Errorf("krun_start_enter is not last and once: %v", names)
	}
	if n := len(slices.DeleteFunc(slices.Clone(names), func(n string) bool { return n != "krun_create_ctx" })); n != 1 {
		t.Errorf("%d krun_create_ctx calls, want 1", n)
	}
}

func TestStartConfiguresLibkrunAsTheSpecSays(t *testing.T) {
	f := setup(t)
	m := f.start(t)
	dir := f.spec.Dir
	q := libkruntest.Quote
	want := []string{
		"krun_set_log_level(2)",
		"krun_create_ctx()",
		fmt.Sprintf("krun_set_vm_config(7, %d, %d)", testVCPUs, testMemory),
		fmt.Sprintf("krun_set_kernel(7, %s, 1, %s, %s)", q(f.spec.Kernel), q(f.spec.Initrd),
			q("quiet panic=-1 smolvm.hostname=vm-test console=hvc0 reboot=k smolvm.poweroff=reset")),
		fmt.Sprintf("krun_add_disk(7, \"root\", %s, false)", q(filepath.Join(dir, "disk.raw"))),
		"krun_disable_implicit_vsock(7)",
		"krun_add_vsock(7, 0)",
		fmt.Sprintf("krun_add_vsock_port2(7, %d, %s, true)", wire.VsockPort, q(filepath.Join(dir, "run", "agent.sock"))),
		fmt.Sprintf("krun_add_net_unixstream(7, %s, -1, %s, 0, 0)", q(f.spec.Net.Socket), q(testMAC)),
		fmt.Sprintf("krun_set_console_output(7, %s)", q(filepath.Join(dir, "console.log"))),
		"krun_start_enter(7)",
	}
	calls := f.recorded(t)
	var got []string
	for _, c := range calls {
		got = append(got, c.String())
	}
	if !slices.Equal(got, want) {
		t.Errorf("libkrun calls:\n  %s\nwant\n  %s", strings.Join(got, "\n  "), strings.Join(want, "\n  "))
	}
	checkOrder(t, calls)

	if !m.Alive() {
		t.Fatal("machine not alive after Start")
	}
	if m.ConsoleLog() != filepath.Join(dir, "console.log") {
		t.Errorf("console log %s", m.ConsoleLog())
	}

	// The disk: the base's contents, grown to the spec's size, its holes
	// kept.
	disk := filepath.Join(dir, "disk.raw")
	b, err := os.ReadFile(disk)
	if err != nil {
		t.Fatal(err)
	}
	if len(b) != testDisk<<20 || !bytes.Equal(b[:len(f.base)], f.base) || len(bytes.Trim(b[len(f.base):], "\x00")) != 0 {
		t.Errorf("disk is %d bytes, want the base (%d bytes) grown to %d", len(b), len(f.base), testDisk<<20)
	}
	var st syscall.Stat_t
	if err := syscall.Stat(disk, &st); err != nil {
		t.Fatal(err)
	}
	if used := st.Blocks * 512; used >= 1<<20 {
		t.Errorf("disk takes %d bytes on the host; the base's holes should stay holes", used)
	}

	// Found again from its runtime record, as a later process would.
	m2, err := f.drv.Attach(m.Runtime())
	if err != nil {
		t.Fatal(err)
	}
	if m2.PID() != m.PID() || !m2.Alive() || m2.ConsoleLog() != m.ConsoleLog() {
		t.Errorf("attached machine: pid %d alive %v console %s; want pid %d", m2.PID(), m2.Alive(), m2.ConsoleLog(), m.PID())
	}
	var rt map[string]any
	if err := json.Unmarshal(m.Runtime(), &rt); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"pid", "dir", "agent_socket", "console", "disk", "config"} {
		if rt[k] == nil {
			t.Errorf("runtime record %s lacks %q", m.Runtime(), k)
		}
	}

	// The agent's socket: the stub listens on it as libkrun does.
	c, err := m2.DialAgent(ctxFor(t, 10*time.Second))
	if err != nil {
		t.Fatalf("DialAgent: %v", err)
	}
	c.Close()

	if err := m2.Kill(ctxFor(t, 10*time.Second)); err != nil {
		t.Fatal(err)
	}
	if m.Alive() || m2.Alive() {
		t.Error("machine alive after Kill")
	}
	if pids := vmm.ProcessesWith(filepath.Join(dir, "krun.json")); len(pids) > 0 {
		t.Errorf("helper processes %v left after Kill", pids)
	}
	if err := m.Kill(ctxFor(t, 10*time.Second)); err != nil {
		t.Errorf("a second Kill: %v", err)
	}
	// The kernel closes the listener as the last of the killed process's
	// threads exits, a moment after its main thread shows it gone.
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		c, err := m.DialAgent(ctxFor(t, 10*time.Second))
		if err != nil {
			break
		}
		c.Close()
		if time.Now().After(deadline) {
			t.Error("DialAgent reaches a killed machine")
			break
		}
	}

	if err := f.drv.Clear(dir); err != nil {
		t.Fatal(err)
	}
	left, _ := os.ReadDir(dir)
	for _, e := range left {
		if e.Name() != "net.sock" && e.Name() != stubRecord {
			t.Errorf("%s left after Clear", e.Name())
		}
	}
}

func TestStartWithoutNetworkAddsNoInterface(t *testing.T) {
	f := setup(t)
	f.spec.Net = nil
	f.start(t)
	calls := f.recorded(t)
	checkOrder(t, calls)
	for _, c := range calls {
		if strings.HasPrefix(c.Name, "krun_add_net") {
			t.Errorf("network interface added without Spec.Net: %s", c)
		}
	}
	// TSI stays off with no interface, where libkrun would turn it on.
	var names []string
	for _, c := range calls {
		names = append(names, c.String())
	}
	if !slices.Contains(names, "krun_disable_implicit_vsock(7)") || !slices.Contains(names, "krun_add_vsock(7, 0)") {
		t.Errorf("the vsock device is not one without TSI: %v", names)
	}
}

func TestStartReusesAnExistingDisk(t *testing.T) {
	f := setup(t)
	disk := filepath.Join(f.spec.Dir, "disk.raw")
	if err := os.WriteFile(disk, []byte("the sandbox's own disk"), 0o600); err != nil {
		t.Fatal(err)
	}
	m := f.start(t)
	if b, _ := os.ReadFile(disk); string(b) != "the sandbox's own disk" {
		t.Errorf("Start replaced an existing disk: %q", b)
	}
	m.Kill(ctxFor(t, 10*time.Second))
}

// Every call's failure makes Start fail naming it, and leaves no process
// and none of the files this Start made.
func TestStartFailureNamesTheCallAndLeavesNothing(t *testing.T) {
	f := setup(t)
	for _, name := range []string{
		"krun_set_log_level", "krun_create_ctx", "krun_set_vm_config", "krun_set_kernel",
		"krun_add_disk", "krun_disable_implicit_vsock", "krun_add_vsock", "krun_add_vsock_port2",
		"krun_add_net_unixstream", "krun_set_console_output", "krun_start_enter",
	} {
		t.Run(name, func(t *testing.T) {
			if err := os.Truncate(f.calls, 0); err != nil {
				t.Fatal(err)
			}
			t.Setenv(libkruntest.EnvFail, name)
			if name == "krun_start_enter" {
				// Start takes a helper still in krun_start_enter after
				// startSettle as a running VM; this one fails there,
				// and a loaded machine may take it a while.
				old := startSettle
				startSettle = 30 * time.Second
				defer func() { startSettle = old }()
			}
			_, err := f.drv.Start(ctxFor(t, 30*time.Second), f.spec)
			if err == nil {
				t.Fatal("Start succeeded")
			}
			msg := err.Error()
			t.Logf("Start: %v", err)
			if !strings.Contains(msg, name+": invalid argument (EINVAL, -22)") {
				t.Errorf("Start's error does not name the failed call %s and its error:\n%s", name, msg)
			}
			if pids := vmm.ProcessesWith(f.spec.Dir); len(pids) > 0 {
				t.Errorf("processes %v left after a failed Start", pids)
			}
			for _, file := range []string{"krun.json", "run", "disk.raw"} {
				if _, err := os.Stat(filepath.Join(f.spec.Dir, file)); err == nil {
					t.Errorf("%s left after a failed Start", file)
				}
			}
			// The helper stops at the first failure.
			calls := f.recorded(t)
			if len(calls) == 0 || calls[len(calls)-1].Name != name {
				t.Errorf("calls after the failed %s: %v", name, calls)
			}
		})
	}
}

// A start that fails leaves a disk that was there, and the directory,
// root's again, as they were.
func TestStartFailureGivesBackTheDisk(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("the jail needs root")
	}
	f := setup(t)
	disk := filepath.Join(f.spec.Dir, "disk.raw")
	if err := os.WriteFile(disk, []byte("the sandbox's own disk"), 0o600); err != nil {
		t.Fatal(err)
	}
	// Failing in the helper, and failing to start the helper at all.
	noExec := filepath.Join(t.TempDir(), "smolvm-krun")
	if err := os.WriteFile(noExec, []byte("not a program"), 0o644); err != nil {
		t.Fatal(err)
	}
	for name, drv := range map[string]*Driver{
		"in the helper":  f.drv,
		"no helper runs": New(Options{Helper: noExec, Library: f.lib, NoCgroup: true}),
	} {
		t.Setenv(libkruntest.EnvFail, "krun_set_vm_config")
		if _, err := drv.Start(ctxFor(t, 30*time.Second), f.spec); err == nil {
			t.Fatalf("%s: Start succeeded", name)
		}
		for _, p := range []string{f.spec.Dir, disk} {
			var st syscall.Stat_t
			if err := syscall.Stat(p, &st); err != nil || st.Uid != 0 || st.Gid != 0 {
				t.Errorf("%s: %s after a failed start: %d:%d (%v), want root's", name, p, st.Uid, st.Gid, err)
			}
		}
	}
	if b, _ := os.ReadFile(disk); string(b) != "the sandbox's own disk" {
		t.Errorf("the disk holds %q", b)
	}
}

func TestStartFailsOnALibkrunTooOld(t *testing.T) {
	f := setup(t, "krun_add_vsock_port2")
	_, err := f.drv.Start(ctxFor(t, 30*time.Second), f.spec)
	if err == nil || !strings.Contains(err.Error(), "krun_add_vsock_port2") {
		t.Fatalf("Start with a libkrun lacking krun_add_vsock_port2: %v", err)
	}
	if calls := f.recorded(t); len(calls) > 0 {
		t.Errorf("the helper called libkrun before finding it incomplete: %v", calls)
	}
	if pids := vmm.ProcessesWith(f.spec.Dir); len(pids) > 0 {
		t.Errorf("processes %v left after a failed Start", pids)
	}
}

func TestStartRefusesWhatLibkrunCannotTake(t *testing.T) {
	f := setup(t)
	for name, change := range map[string]func(*vmm.Spec){
		"mounts":      func(s *vmm.Spec) { s.Mounts = []vmm.Mount{{Tag: "m0", HostPath: "/tmp", GuestPath: "/mnt"}} },
		"no vCPUs":    func(s *vmm.Spec) { s.VCPUs = 0 },
		"256 vCPUs":   func(s *vmm.Spec) { s.VCPUs = 256 },
		"no memory":   func(s *vmm.Spec) { s.MemoryMiB = 0 },
		"bad MAC":     func(s *vmm.Spec) { s.Net.MAC = "52:54:00" },
		"other net":   func(s *vmm.Spec) { s.Net.Kind = "tap" },
		"long cmd":    func(s *vmm.Spec) { s.Cmdline = strings.Repeat("x", 2000) },
		"long dir":    func(s *vmm.Spec) { s.Dir = filepath.Join(s.Dir, strings.Repeat("d", 100)) },
		"small disk":  func(s *vmm.Spec) { s.DiskMiB = 1 },
		"no base":     func(s *vmm.Spec) { s.BaseImage = filepath.Join(s.Dir, "missing") },
		"no kernel":   func(s *vmm.Spec) { s.Kernel = "" },
		"no cmdline":  func(s *vmm.Spec) { s.Cmdline = "" },
		"long netsck": func(s *vmm.Spec) { s.Net.Socket = "/" + strings.Repeat("n", 110) },
	} {
		t.Run(name, func(t *testing.T) {
			spec := f.spec
			net := *f.spec.Net
			spec.Net = &net
			change(&spec)
			if _, err := f.drv.Start(ctxFor(t, 30*time.Second), spec); err == nil {
				t.Fatal("Start succeeded")
			}
			if calls := f.recorded(t); len(calls) > 0 {
				t.Errorf("libkrun was called: %v", calls)
			}
			if _, err := os.Stat(filepath.Join(f.spec.Dir, "disk.raw")); err == nil {
				t.Error("a disk was made")
			}
		})
	}
}

func TestReapEndsAVMNoRecordNames(t *testing.T) {
	f := setup(t)
	if err := f.drv.Reap(ctxFor(t, 10*time.Second), f.spec.Dir); err != nil {
		t.Fatalf("Reap with nothing running: %v", err)
	}
	m := f.start(t)
	if err := f.drv.Reap(ctxFor(t, 10*time.Second), f.spec.Dir); err != nil {
		t.Fatal(err)
	}
	if m.Alive() {
		t.Error("VM alive after Reap")
	}
}

func TestWaitReturnsOnceTheVMEnds(t *testing.T) {
	f := setup(t)
	m := f.start(t)
	if err := m.Wait(ctxFor(t, 100*time.Millisecond)); err == nil {
		t.Fatal("Wait returned while the VM runs")
	}
	// As libkrun's exit when the guest powers off.
	if err := syscall.Kill(m.PID(), syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := m.Wait(ctxFor(t, 10*time.Second)); err != nil {
		t.Fatal(err)
	}
	if m.Alive() {
		t.Error("alive after Wait")
	}
}

func TestStartPutsTheVMInItsControlGroup(t *testing.T) {
	h, err := cgroup.Detect(cgroup.Root)
	if os.Geteuid() != 0 || err != nil {
		t.Skipf("needs root and a cgroup hierarchy (%v)", err)
	}
	f := setup(t)
	f.drv = New(Options{Helper: f.drv.opts.Helper, Library: f.lib})
	if f.drv.cgroups == nil {
		t.Fatalf("no cgroups as root: %v", f.drv.cgroupErr)
	}
	m := f.start(t)
	name := vmm.GroupName(f.spec)
	if got := cgroup.Of(m.PID()); got != name {
		t.Errorf("VM in group %q, want %q", got, name)
	}
	if err := m.Kill(ctxFor(t, 10*time.Second)); err != nil {
		t.Fatal(err)
	}
	if dir := cgroup.Open(h, name).Dir("memory"); dir != "" {
		if _, err := os.Stat(dir); err == nil {
			t.Errorf("group %s left after Kill", dir)
		}
	}
}

func TestDialAgentWaitsForTheSocket(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "agent.sock")
	// This test process stands in for the VMM.
	self := &machine{rt: runtime{PID: os.Getpid(), AgentSocket: sock, Config: os.Args[0]}}
	listener := make(chan net.Listener, 1)
	go func() {
		time.Sleep(100 * time.Millisecond)
		l, err := net.Listen("unix", sock)
		if err != nil {
			t.Error(err)
		}
		listener <- l
	}()
	c, err := self.DialAgent(ctxFor(t, 10*time.Second))
	if l := <-listener; l != nil {
		defer l.Close()
	}
	if err != nil {
		t.Fatalf("DialAgent while the socket appears: %v", err)
	}
	c.Close()

	// A VMM that has gone is given up on at once, not at ctx's end.
	gone := &machine{rt: runtime{PID: 1 << 30, AgentSocket: filepath.Join(dir, "none.sock"), Config: "x"}}
	start := time.Now()
	if _, err := gone.DialAgent(ctxFor(t, 10*time.Second)); err == nil || time.Since(start) > 5*time.Second {
		t.Errorf("DialAgent to an ended VM: %v after %s", err, time.Since(start))
	}
	// And one that runs, until ctx ends.
	waiting := &machine{rt: runtime{PID: os.Getpid(), AgentSocket: filepath.Join(dir, "none.sock"), Config: os.Args[0]}}
	if _, err := waiting.DialAgent(ctxFor(t, 100*time.Millisecond)); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("DialAgent past its deadline: %v", err)
	}
}

func TestAttachRefusesAnotherRecord(t *testing.T) {
	d := New(Options{NoCgroup: true})
	for _, raw := range []string{`not json`, `{"pid":1}`, `{"pid":1,"agent_socket":"/a"}`} {
		if _, err := d.Attach(json.RawMessage(raw)); err == nil {
			t.Errorf("Attach(%s) succeeded", raw)
		}
	}
}

func TestAvailableNamesWhatIsMissing(t *testing.T) {
	f := setup(t) // before PATH goes: it needs cc
	d := New(Options{Helper: "/nonexistent/smolvm-krun", Library: "/nonexistent/libkrun.so.1", NoCgroup: true})
	t.Setenv(HelperEnv, "")
	t.Setenv("PATH", t.TempDir())
	err := d.Available()
	if err == nil || !strings.Contains(err.Error(), "libkrun") || !strings.Contains(err.Error(), "smolvm-krun not found") {
		t.Errorf("Available without library or helper: %v", err)
	}
	if kerr := kvmUsable(); kerr != nil && !strings.Contains(err.Error(), kerr.Error()) {
		t.Errorf("Available does not say KVM is unusable (%v): %v", kerr, err)
	}

	err = f.drv.Available()
	if kerr := kvmUsable(); kerr == nil && err != nil {
		t.Errorf("Available with KVM, library and helper: %v", err)
	} else if kerr != nil && (err == nil || err.Error() != kerr.Error()) {
		t.Errorf("Available with library and helper but no KVM (%v): %v", kerr, err)
	}
}

func TestIdentityIsTheLibrarysVersionAndHash(t *testing.T) {
	f := setup(t)
	// As distributions install it: the soname a link to the real file.
	link := filepath.Join(filepath.Dir(f.lib), "libkrun.so.1")
	if err := os.Symlink(filepath.Base(f.lib), link); err != nil {
		t.Fatal(err)
	}
	d := New(Options{Helper: f.drv.opts.Helper, Library: link, NoCgroup: true})
	id, err := d.Identity(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	prefix := "libkrun " + libkruntest.StubVersion + " (sha256 "
	if !strings.HasPrefix(id, prefix) || len(id) != len(prefix)+16+1 {
		t.Errorf("identity %q, want %q and 16 hex digits", id, prefix)
	}
}

func TestLibrarySearchFollowsLdSoConf(t *testing.T) {
	dir := t.TempDir()
	libdir := filepath.Join(dir, "lib")
	confd := filepath.Join(dir, "ld.so.conf.d")
	for _, d := range []string{libdir, confd} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	conf := filepath.Join(dir, "ld.so.conf")
	os.WriteFile(conf, []byte("# comment\ninclude "+confd+"/*.conf\n/first\n"), 0o644)
	os.WriteFile(filepath.Join(confd, "a.conf"), []byte(libdir+" # ours\n"), 0o644)
	if got, want := ldSoConf(conf, 0), []string{libdir, "/first"}; !slices.Equal(got, want) {
		t.Errorf("ldSoConf: %v, want %v", got, want)
	}

	os.WriteFile(filepath.Join(libdir, "libkrun.so.1"), []byte("lib"), 0o644)
	t.Setenv("LD_LIBRARY_PATH", libdir)
	d := New(Options{NoCgroup: true})
	if got, err := d.library(); err != nil || got != filepath.Join(libdir, "libkrun.so.1") {
		t.Errorf("library from LD_LIBRARY_PATH: %q, %v", got, err)
	}
}

func TestKernelCmdlineUsesLibkrunsConsole(t *testing.T) {
	for in, want := range map[string]string{
		"console=ttyS0 quiet panic=-1":        "quiet panic=-1 console=hvc0 reboot=k smolvm.poweroff=reset",
		"a console=tty0 console=ttyS0,115200": "a console=hvc0 reboot=k smolvm.poweroff=reset",
		"reboot=t b":                          "b console=hvc0 reboot=k smolvm.poweroff=reset",
	} {
		if got := kernelCmdline(in); got != want {
			t.Errorf("kernelCmdline(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestCreateDisk(t *testing.T) {
	dir := t.TempDir()
	base := filepath.Join(dir, "base")
	content := make([]byte, 1<<20)
	copy(content[4096*3:], "data")
	writeSparse(t, base, content)
	ctx := ctxFor(t, 10*time.Second)

	disk := filepath.Join(dir, "same")
	if err := createDisk(ctx, base, disk, 0); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(disk); !bytes.Equal(b, content) {
		t.Error("a disk of size 0 is not the base as it is")
	}
	if err := createDisk(ctx, base, filepath.Join(dir, "small"), 0); err != nil {
		t.Fatal(err)
	}

	big := make([]byte, 2<<20)
	copy(big, content)
	writeSparse(t, base, big)
	if err := createDisk(ctx, base, filepath.Join(dir, "smaller"), 1); err == nil {
		t.Error("made a disk smaller than its base")
	}

	// Without reflinks or SEEK_DATA, the copy still skips zero blocks.
	src, _ := os.Open(base)
	defer src.Close()
	dst, _ := os.Create(filepath.Join(dir, "copy"))
	defer dst.Close()
	if err := sparseCopy(ctx, src, dst, int64(len(big))); err != nil {
		t.Fatal(err)
	}
	dst.Truncate(int64(len(big)))
	if b, _ := os.ReadFile(dst.Name()); !bytes.Equal(b, big) {
		t.Error("sparse copy differs from its source")
	}

	qcow := filepath.Join(dir, "template.qcow2")
	os.WriteFile(qcow, append([]byte{'Q', 'F', 'I', 0xfb}, make([]byte, 4096)...), 0o644)
	if err := createDisk(ctx, qcow, filepath.Join(dir, "q"), 0); err == nil || !strings.Contains(err.Error(), "qcow2") {
		t.Errorf("disk over a qcow2 base: %v", err)
	}
	for _, name := range []string{"smaller", "smaller.tmp", "q", "q.tmp"} {
		if _, err := os.Stat(filepath.Join(dir, name)); err == nil {
			t.Errorf("%s left after a failed createDisk", name)
		}
	}
}

// As root the helper, and so libkrun and its VM, runs jailed: a user of
// its own with no capabilities and no new privileges, in a root of its
// own holding the host's libraries, the kernel, initramfs and library it
// was given and the sandbox's directory. What the user was given is
// root's again once the VM ends.
func TestStartJailsTheHelper(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("the jail needs root")
	}
	f := setup(t)
	if f.drv.jail == nil {
		t.Fatal("a root driver without NoJail has no jail")
	}
	m := f.start(t)
	dir := f.spec.Dir
	proc := fmt.Sprintf("/proc/%d", m.PID())
	uid := jailtest.CheckWalls(t, m.PID(), "the helper")
	// Its root, seen from here.
	names := func(d string) []string {
		ents, err := os.ReadDir(proc + "/root" + d)
		if err != nil {
			t.Errorf("the helper's %s: %v", d, err)
		}
		var out []string
		for _, e := range ents {
			out = append(out, e.Name())
		}
		return out
	}
	top := "/" + strings.Split(strings.TrimPrefix(dir, "/"), "/")[0]
	for _, n := range names("/") {
		if !slices.Contains([]string{"bin", "sbin", "lib", "lib32", "lib64", "libx32", "usr", "etc", "dev", "proc"}, n) && "/"+n != top {
			t.Errorf("the helper sees /%s", n)
		}
	}
	if got := names("/etc"); !slices.Equal(got, []string{"ld.so.cache"}) {
		t.Errorf("the helper's /etc holds %q", got)
	}
	// The test's work directory holds the kernel, initramfs, library and
	// base image beside the sandbox's: of those it sees only what it reads.
	want := []string{filepath.Base(f.lib), filepath.Base(f.spec.Initrd), "sb", filepath.Base(f.spec.Kernel)}
	slices.Sort(want)
	if got := names(filepath.Dir(dir)); !slices.Equal(got, want) {
		t.Errorf("the helper sees %q in %s, want %q", got, filepath.Dir(dir), want)
	}
	var st syscall.Stat_t
	owner := func(p string) (int, int, uint32) {
		t.Helper()
		if err := syscall.Lstat(p, &st); err != nil {
			t.Fatal(err)
		}
		return int(st.Uid), int(st.Gid), st.Mode & 0o7777
	}
	if u, g, mode := owner(dir); u != 0 || g != uid || mode != 0o710 {
		t.Errorf("the sandbox's directory is %d:%d %o, want 0:%d 0710", u, g, mode, uid)
	}
	for _, p := range []string{filepath.Join(dir, "disk.raw"), filepath.Join(dir, "run"), filepath.Join(dir, "console.log"), f.spec.Net.Socket} {
		if u, _, _ := owner(p); u != uid {
			t.Errorf("%s is %d's, not the jail user's", p, u)
		}
	}
	if err := m.Kill(ctxFor(t, 10*time.Second)); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{dir, filepath.Join(dir, "disk.raw"), filepath.Join(dir, "run"), filepath.Join(dir, "console.log")} {
		if u, g, _ := owner(p); u != 0 || g != 0 {
			t.Errorf("%s is %d:%d after the VM ended, want root's", p, u, g)
		}
	}
}

// The jail's user makes what is in the directory of the agent's socket:
// a link there must not lead the server to another socket of the host.
func TestDialAgentFollowsNoLink(t *testing.T) {
	dir := t.TempDir()
	other := filepath.Join(dir, "other.sock")
	ln, err := net.Listen("unix", other)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	sock := filepath.Join(dir, "agent.sock")
	if err := os.Symlink(other, sock); err != nil {
		t.Fatal(err)
	}
	self := &machine{rt: runtime{PID: os.Getpid(), AgentSocket: sock, Config: os.Args[0]}}
	if c, err := self.DialAgent(ctxFor(t, 5*time.Second)); err == nil {
		c.Close()
		t.Fatal("DialAgent followed a link to another socket")
	} else if !strings.Contains(err.Error(), "not a socket") {
		t.Errorf("DialAgent through a link: %v, want it refused as not a socket", err)
	}
	// The socket itself is reached.
	if c, err := (&machine{rt: runtime{PID: os.Getpid(), AgentSocket: other, Config: os.Args[0]}}).DialAgent(ctxFor(t, 5*time.Second)); err != nil {
		t.Errorf("DialAgent to the socket: %v", err)
	} else {
		c.Close()
	}
}

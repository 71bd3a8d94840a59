package sandbox_test

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/smolvm/smolvm/internal/agent"
	"github.com/smolvm/smolvm/internal/agent/agentpb"
	"github.com/smolvm/smolvm/internal/agent/wire"
	"github.com/smolvm/smolvm/internal/datadir"
	"github.com/smolvm/smolvm/internal/network"
	"github.com/smolvm/smolvm/internal/sandbox"
	"github.com/smolvm/smolvm/internal/testenv"
	"github.com/smolvm/smolvm/internal/vmm"
)

// The tests in this file run the Manager on a fake driver: no VM boots.
// Each fake machine's DialAgent is one end of a net.Pipe whose other end is
// served by the real agent (package agent) in this process, so commands
// run on the test's host; killing the machine ends its agent and commands.

type fakeDriver struct {
	mu       sync.Mutex
	machines map[string]*fakeMachine // by directory
	startErr error                   // Start fails with this
	silent   bool                    // agents never answer
}

func newFakeDriver() *fakeDriver { return &fakeDriver{machines: map[string]*fakeMachine{}} }

func (d *fakeDriver) Name() string                             { return "fake" }
func (d *fakeDriver) Available() error                         { return nil }
func (d *fakeDriver) Identity(context.Context) (string, error) { return "fake 1", nil }

func (d *fakeDriver) Start(ctx context.Context, spec vmm.Spec) (vmm.Machine, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.startErr != nil {
		return nil, d.startErr
	}
	disk := filepath.Join(spec.Dir, "fake.disk")
	if err := os.WriteFile(disk, nil, 0o644); err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(spec.Dir, "fake.console"), nil, 0o644); err != nil {
		return nil, err
	}
	fm := &fakeMachine{dir: spec.Dir, alive: true, silent: d.silent, gone: make(chan struct{})}
	fm.srv = agent.NewServer(agent.Options{System: fm, Hostname: "fake"})
	d.machines[spec.Dir] = fm
	return fm, nil
}

func (d *fakeDriver) Attach(raw json.RawMessage) (vmm.Machine, error) {
	var rt struct{ Dir string }
	if err := json.Unmarshal(raw, &rt); err != nil {
		return nil, err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	fm, ok := d.machines[rt.Dir]
	if !ok {
		return nil, errors.New("no such fake machine")
	}
	return fm, nil
}

func (d *fakeDriver) Clear(dir string) error {
	os.Remove(filepath.Join(dir, "fake.disk"))
	os.Remove(filepath.Join(dir, "fake.console"))
	return nil
}

func (d *fakeDriver) Reap(ctx context.Context, dir string) error { return nil }

// machine returns the only machine started so far.
func (d *fakeDriver) machine(t *testing.T) *fakeMachine {
	t.Helper()
	d.mu.Lock()
	defer d.mu.Unlock()
	if len(d.machines) != 1 {
		t.Fatalf("%d machines started, want 1", len(d.machines))
	}
	for _, fm := range d.machines {
		return fm
	}
	return nil
}

type fakeMachine struct {
	dir    string
	silent bool
	srv    *agent.Server
	// readyLine, when set, replaces the agent's ready line (a nonce goes
	// where %s is).
	readyLine string

	mu    sync.Mutex
	alive bool
	conns []net.Conn
	gone  chan struct{}
	kills int
}

func (fm *fakeMachine) Runtime() json.RawMessage {
	b, _ := json.Marshal(struct{ Dir string }{fm.dir})
	return b
}
func (fm *fakeMachine) PID() int           { return 4242 }
func (fm *fakeMachine) ConsoleLog() string { return filepath.Join(fm.dir, "fake.console") }

func (fm *fakeMachine) Alive() bool {
	fm.mu.Lock()
	defer fm.mu.Unlock()
	return fm.alive
}

// die ends the machine as a VM process exiting does: its agent connections
// break.
func (fm *fakeMachine) die() {
	fm.mu.Lock()
	defer fm.mu.Unlock()
	if !fm.alive {
		return
	}
	fm.alive = false
	close(fm.gone)
	for _, c := range fm.conns {
		c.Close()
	}
	fm.srv.Close() // its commands die with the machine
}

func (fm *fakeMachine) Kill(context.Context) error {
	fm.mu.Lock()
	fm.kills++
	fm.mu.Unlock()
	fm.die()
	return nil
}

func (fm *fakeMachine) Wait(ctx context.Context) error {
	select {
	case <-fm.gone:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (fm *fakeMachine) DialAgent(ctx context.Context) (net.Conn, error) {
	fm.mu.Lock()
	defer fm.mu.Unlock()
	if !fm.alive {
		return nil, errors.New("connection refused")
	}
	host, guest := net.Pipe()
	fm.conns = append(fm.conns, host, guest)
	if !fm.silent {
		go fm.serve(guest)
	}
	return host, nil
}

// serve is the guest side of one connection: the real agent API, served
// in this process, unless the machine is set to answer the handshake with
// another line.
func (fm *fakeMachine) serve(conn net.Conn) {
	fm.mu.Lock()
	readyLine := fm.readyLine
	fm.mu.Unlock()
	if readyLine == "" {
		fm.srv.ServeConn(context.Background(), conn)
		return
	}
	defer conn.Close()
	nonce, err := wire.AwaitHello(bufio.NewReader(conn))
	if err != nil {
		return
	}
	conn.Write([]byte(fmt.Sprintf(readyLine, nonce)))
	io.Copy(io.Discard, conn)
}

// ApplyIdentity and Poweroff make the fake machine the agent's System.
func (fm *fakeMachine) ApplyIdentity(*agentpb.SetIdentityRequest) error { return nil }
func (fm *fakeMachine) Poweroff()                                       { go fm.die() }

// fakeManager opens a Manager whose only driver is d.
func fakeManager(t *testing.T, d *fakeDriver, bootTimeout time.Duration) *sandbox.Manager {
	t.Helper()
	return fakeManagerAt(t, testenv.DataDir(t), d, bootTimeout)
}

func fakeManagerAt(t *testing.T, dir datadir.Dir, d *fakeDriver, bootTimeout time.Duration) *sandbox.Manager {
	t.Helper()
	return testenv.ManagerWith(t, sandbox.Options{DataDir: dir, Drivers: vmm.NewRegistry(d), BootTimeout: bootTimeout, Progress: io.Discard})
}

var offline = sandbox.CreateRequest{MemoryMiB: 256, Network: network.Policy{Mode: network.ModeOff}}

// assertGone checks that nothing of a sandbox is left: no record, no
// directory, and its machine killed.
func assertGone(t *testing.T, m *sandbox.Manager, fm *fakeMachine) {
	t.Helper()
	if list, err := m.List(context.Background()); err != nil || len(list) != 0 {
		t.Errorf("sandboxes left: %+v %v", list, err)
	}
	if fm != nil {
		if fm.Alive() {
			t.Error("the machine still runs")
		}
		if _, err := os.Stat(fm.dir); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("the sandbox directory is left: %v", err)
		}
	}
}

func TestFakeCreateExecDelete(t *testing.T) {
	t.Parallel()
	d := newFakeDriver()
	m := fakeManager(t, d, 10*time.Second)
	ctx := context.Background()
	info, err := m.Create(ctx, offline)
	if err != nil {
		t.Fatal(err)
	}
	if info.Status != sandbox.StatusRunning || info.Backend != "fake" || info.Boot != sandbox.BootCold {
		t.Errorf("created %+v; want running, backend fake, booted cold (the fake makes no templates)", info)
	}
	res, err := m.Exec(ctx, info.ID, sandbox.ExecRequest{Command: "echo hello there"})
	if err != nil || string(res.Stdout) != "hello there\n" || res.ExitCode != 0 {
		t.Errorf("exec: %q exit %d: %v", res.Stdout, res.ExitCode, err)
	}
	res, err = m.Exec(ctx, info.ID, sandbox.ExecRequest{Argv: []string{"nosuch"}})
	if err != nil || res.ExitCode != 127 || string(res.Stderr) != "smolvm: nosuch: command not found\n" {
		t.Errorf("a failing command: exit %d stderr %q: %v", res.ExitCode, res.Stderr, err)
	}
	fm := d.machine(t)
	if err := m.Delete(ctx, info.ID); err != nil {
		t.Fatal(err)
	}
	assertGone(t, m, fm)
}

func TestFakeExecTimeout(t *testing.T) {
	t.Parallel()
	m := fakeManager(t, newFakeDriver(), 10*time.Second)
	ctx := context.Background()
	info, err := m.Create(ctx, offline)
	if err != nil {
		t.Fatal(err)
	}
	// Raw (no login profile to read) and seconds of room, so a loaded host
	// still prints before the timeout.
	res, err := m.Exec(ctx, info.ID, sandbox.ExecRequest{Command: "echo started; exec sleep 60", Shell: sandbox.ShellRaw, Timeout: 3 * time.Second})
	if err != nil || !res.TimedOut || string(res.Stdout) != "started\n" {
		t.Errorf("timed out %v, stdout %q, err %v; want the partial output and timed out", res.TimedOut, res.Stdout, err)
	}
	if got, err := m.Get(ctx, info.ID); err != nil || got.Status != sandbox.StatusRunning {
		t.Errorf("after a timeout the sandbox is %v (%v), want running", got.Status, err)
	}
}

// A VM that dies under a command: the command fails with a clear error and
// the sandbox says it stopped.
func TestFakeCrashDuringExec(t *testing.T) {
	t.Parallel()
	d := newFakeDriver()
	m := fakeManager(t, d, 10*time.Second)
	ctx := context.Background()
	info, err := m.Create(ctx, offline)
	if err != nil {
		t.Fatal(err)
	}
	// The machine dies once the command has started.
	marker := filepath.Join(t.TempDir(), "started")
	go func() {
		for {
			if _, err := os.Stat(marker); err == nil {
				d.machine(t).die()
				return
			}
			time.Sleep(10 * time.Millisecond)
		}
	}()
	_, err = m.Exec(ctx, info.ID, sandbox.ExecRequest{Command: "touch " + marker + "; sleep 30"})
	if e, ok := sandbox.AsError(err); !ok || e.Code != "sandbox_not_running" {
		t.Fatalf("exec in a crashing VM: %v, want sandbox_not_running", err)
	}
	got, err := m.Get(ctx, info.ID)
	if err != nil || got.Status != sandbox.StatusStopped || !strings.Contains(got.Error, "exited unexpectedly") {
		t.Errorf("after the crash: %+v %v", got, err)
	}
	if err := m.Delete(ctx, info.ID); err != nil {
		t.Errorf("delete after the crash: %v", err)
	}
}

// A driver that cannot make the disk: the create fails with its error and
// leaves nothing behind.
func TestFakeFailedDisk(t *testing.T) {
	t.Parallel()
	d := newFakeDriver()
	d.startErr = errors.New("create disk overlay: No space left on device")
	m := fakeManager(t, d, 10*time.Second)
	_, err := m.Create(context.Background(), offline)
	if err == nil || !strings.Contains(err.Error(), "No space left") {
		t.Fatalf("create with a failing disk: %v", err)
	}
	assertGone(t, m, nil)
}

// An agent that never answers: the create gives up at the boot timeout,
// kills the machine and leaves nothing behind.
func TestFakeAgentNeverAnswers(t *testing.T) {
	t.Parallel()
	d := newFakeDriver()
	d.silent = true
	m := fakeManager(t, d, 500*time.Millisecond)
	_, err := m.Create(context.Background(), offline)
	if err == nil || !strings.Contains(err.Error(), "did not answer") {
		t.Fatalf("create with a silent agent: %v", err)
	}
	fm := d.machine(t)
	if fm.kills == 0 {
		t.Error("the silent machine was never killed")
	}
	assertGone(t, m, fm)
}

// A machine that dies before its agent answers is noticed at once, and the
// console's crash line is in the error.
func TestFakeMachineDiesDuringBoot(t *testing.T) {
	t.Parallel()
	d := newFakeDriver()
	d.silent = true
	m := fakeManager(t, d, time.Minute)
	go func() {
		for {
			d.mu.Lock()
			n := len(d.machines)
			d.mu.Unlock()
			if n > 0 {
				break
			}
			time.Sleep(5 * time.Millisecond)
		}
		fm := d.machine(t)
		os.WriteFile(fm.ConsoleLog(), []byte("[ 1.0] Kernel panic - not syncing: Attempted to kill init!\n"), 0o644)
		fm.die()
	}()
	start := time.Now()
	_, err := m.Create(context.Background(), offline)
	if err == nil || !strings.Contains(err.Error(), "the guest crashed") || !strings.Contains(err.Error(), "Attempted to kill init") {
		t.Fatalf("create with a dying machine: %v", err)
	}
	if took := time.Since(start); took > 30*time.Second {
		t.Errorf("noticed after %s, not by the machine ending", took)
	}
	assertGone(t, m, d.machine(t))
}

// A stopped sandbox whose machine fails to start again is marked error
// with the reason, its machine and network ended, and stays deletable.
func TestFakeFailedStart(t *testing.T) {
	t.Parallel()
	d := newFakeDriver()
	m := fakeManager(t, d, 10*time.Second)
	ctx := context.Background()
	info, err := m.Create(ctx, offline)
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Stop(ctx, info.ID, 0); err != nil {
		t.Fatal(err)
	}
	if got, _ := m.Get(ctx, info.ID); got.Status != sandbox.StatusStopped {
		t.Fatalf("after stop: %s", got.Status)
	}
	d.mu.Lock()
	d.startErr = errors.New("qemu exited during start-up")
	d.mu.Unlock()
	if _, err := m.Start(ctx, info.ID); err == nil {
		t.Fatal("start succeeded with a failing driver")
	}
	got, err := m.Get(ctx, info.ID)
	if err != nil || got.Status != sandbox.StatusError || !strings.Contains(got.Error, "start-up") {
		t.Errorf("after a failed start: %+v %v", got, err)
	}
	if err := m.Delete(ctx, info.ID); err != nil {
		t.Fatal(err)
	}
	assertGone(t, m, nil)
}

// A sandbox whose agent speaks a protocol this smolvm does not serve (one
// started by another smolvm) is answered with a clear 409, at once, not
// after the reconnect timeout.
func TestFakeAgentOfAnotherVersion(t *testing.T) {
	t.Parallel()
	d := newFakeDriver()
	dir := testenv.DataDir(t)
	first := fakeManagerAt(t, dir, d, 10*time.Second)
	ctx := context.Background()
	info, err := first.Create(ctx, offline)
	if err != nil {
		t.Fatal(err)
	}
	first.Close() // the session goes; the VM stays
	fm := d.machine(t)
	fm.mu.Lock()
	fm.readyLine = "SMOLVM1 READY %s v=99 caps=exec,files\n"
	fm.mu.Unlock()

	second := fakeManagerAt(t, dir, d, 10*time.Second)
	start := time.Now()
	_, err = second.Exec(ctx, info.ID, sandbox.ExecRequest{Command: "echo hi"})
	e, ok := sandbox.AsError(err)
	if !ok || e.Code != "agent_incompatible" || !strings.Contains(e.Message, "version 99") {
		t.Fatalf("exec with an agent of version 99: %v", err)
	}
	if took := time.Since(start); took > 10*time.Second {
		t.Errorf("refused after %s: the handshake was retried", took)
	}
	if err := second.Delete(ctx, info.ID); err != nil {
		t.Errorf("delete: %v", err)
	}
}

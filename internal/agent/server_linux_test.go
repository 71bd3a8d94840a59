package agent_test

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/smolvm/smolvm/internal/agent"
	"github.com/smolvm/smolvm/internal/agent/agentpb"
	"github.com/smolvm/smolvm/internal/agent/wire"
	"github.com/smolvm/smolvm/internal/guest"
)

// These tests serve the real agent API in this process, over a Unix socket
// or a net.Pipe, and drive it with the real host client. Commands run on
// the test's host; only the identity and power-off, which would change the
// host itself, go to a recording stand-in.

type recordingSystem struct {
	mu         sync.Mutex
	identities []*agentpb.SetIdentityRequest
	poweroffs  int
}

func (s *recordingSystem) ApplyIdentity(req *agentpb.SetIdentityRequest) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.identities = append(s.identities, req)
	return nil
}

func (s *recordingSystem) Poweroff() {
	s.mu.Lock()
	s.poweroffs++
	s.mu.Unlock()
}

// serve starts a server on a Unix socket and returns a dialer for it.
func serve(t *testing.T) (guest.Dialer, *recordingSystem) {
	t.Helper()
	_, dial, sys := serveServer(t)
	return dial, sys
}

// serveServer is serve, also returning the server itself.
func serveServer(t *testing.T) (*agent.Server, guest.Dialer, *recordingSystem) {
	t.Helper()
	sys := &recordingSystem{}
	sock := filepath.Join(t.TempDir(), "agent.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := serveOn(t, l, sys, "agent-test")
	return srv, func(ctx context.Context) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", sock)
	}, sys
}

// serveOn serves a real agent on l until the test ends.
func serveOn(t *testing.T, l net.Listener, sys *recordingSystem, hostname string) *agent.Server {
	t.Helper()
	srv := agent.NewServer(agent.Options{System: sys, Hostname: hostname})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		srv.Serve(ctx, l)
	}()
	t.Cleanup(func() {
		cancel()
		l.Close()
		srv.Close()
		<-done
	})
	return srv
}

func connect(t *testing.T) (*guest.Client, *recordingSystem) {
	t.Helper()
	dial, sys := serve(t)
	return dialClient(t, dial), sys
}

// dial2 connects a client through dial, closed when the test ends.
func dialClient(t *testing.T, dial guest.Dialer) *guest.Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := guest.Dial(ctx, dial)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func script(s string) *agentpb.StartRequest {
	return &agentpb.StartRequest{Process: &agentpb.ProcessConfig{Script: s, Shell: agentpb.Shell_SHELL_RAW}}
}

func TestHandshakeAndPing(t *testing.T) {
	t.Parallel()
	c, _ := connect(t)
	if p := c.Peer(); p.Version != wire.Version || !p.Has(wire.CapProcess) || !p.Has(wire.CapFiles) || !p.Has(wire.CapPTY) {
		t.Errorf("peer = %+v", p)
	}
	info, err := c.Ping(testCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	if info.Hostname != "agent-test" || info.Version != wire.Version || info.Kernel == "" {
		t.Errorf("ping = %+v", info)
	}
}

func TestIdentityAndShutdown(t *testing.T) {
	t.Parallel()
	c, sys := connect(t)
	ctx := testCtx(t)
	if _, err := c.Identity(ctx, &agentpb.SetIdentityRequest{Hostname: "clone-1"}); !guest.IsCode(err, guest.CodeInvalid) {
		t.Errorf("identity without a seed: %v, want invalid", err)
	}
	info, err := c.Identity(ctx, &agentpb.SetIdentityRequest{Hostname: "clone-1", MachineId: strings.Repeat("ab", 16), Seed: []byte{1, 2, 3}})
	if err != nil {
		t.Fatal(err)
	}
	if info.Hostname != "clone-1" {
		t.Errorf("hostname after identity = %q", info.Hostname)
	}
	// Commands see the new name.
	var out bytes.Buffer
	if _, err := c.Exec(ctx, script(`echo $HOSTNAME`), &out, nil); err != nil || out.String() != "clone-1\n" {
		t.Errorf("HOSTNAME = %q, %v", out.String(), err)
	}
	if err := c.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		sys.mu.Lock()
		n, ids := sys.poweroffs, len(sys.identities)
		sys.mu.Unlock()
		if n == 1 && ids == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("poweroffs = %d, identities = %d", n, ids)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestExec(t *testing.T) {
	t.Parallel()
	c, _ := connect(t)
	ctx := testCtx(t)
	for _, tt := range []struct {
		name           string
		req            *agentpb.StartRequest
		stdout, stderr string
		code           int
	}{
		{"output and code", script(`echo out; echo err >&2; exit 3`), "out\n", "err\n", 3},
		{"argv runs exactly", &agentpb.StartRequest{Process: &agentpb.ProcessConfig{Argv: []string{"printf", "%s|", "a b", "$HOME"}}}, "a b|$HOME|", "", 0},
		{"env and cwd", &agentpb.StartRequest{Process: &agentpb.ProcessConfig{Script: `echo "$FOO $BAR"; pwd`, Shell: agentpb.Shell_SHELL_RAW,
			Env: []string{"FOO=1", "BAR=2", "FOO=3"}, Cwd: "/tmp"}}, "3 2\n/tmp\n", "", 0},
		{"stdin data", &agentpb.StartRequest{Process: &agentpb.ProcessConfig{Argv: []string{"cat"}}, StdinData: []byte("piped in")}, "piped in", "", 0},
		{"not found", &agentpb.StartRequest{Process: &agentpb.ProcessConfig{Argv: []string{"no-such-command-here"}}}, "", "smolvm: no-such-command-here: command not found\n", 127},
		{"unknown user", &agentpb.StartRequest{Process: &agentpb.ProcessConfig{Argv: []string{"true"}, User: "no-such-user"}}, "", "smolvm: user \"no-such-user\" not found in /etc/passwd\n", 126},
		{"killed by a signal", script(`kill -TERM $$`), "", "", 128 + 15},
	} {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			var out, errb bytes.Buffer
			exit, err := c.Exec(ctx, tt.req, &out, &errb)
			if err != nil {
				t.Fatal(err)
			}
			if out.String() != tt.stdout || errb.String() != tt.stderr || exit.ExitCode != tt.code {
				t.Errorf("got %q, %q, exit %d; want %q, %q, exit %d", out.String(), errb.String(), exit.ExitCode, tt.stdout, tt.stderr, tt.code)
			}
		})
	}
	t.Run("invalid", func(t *testing.T) {
		t.Parallel()
		for _, req := range []*agentpb.StartRequest{
			{},
			{Process: &agentpb.ProcessConfig{}},
			{Process: &agentpb.ProcessConfig{Argv: []string{"true"}, Script: "true"}},
		} {
			if _, err := c.Exec(ctx, req, nil, nil); !guest.IsCode(err, guest.CodeInvalid) {
				t.Errorf("%v: %v, want invalid", req, err)
			}
		}
	})
}

// TestExecLargeOutput: output far beyond one message arrives whole and in
// order.
func TestExecLargeOutput(t *testing.T) {
	t.Parallel()
	c, _ := connect(t)
	var out bytes.Buffer
	exit, err := c.Exec(testCtx(t), script(`head -c 20000000 /dev/zero | tr '\0' x; echo end`), &out, nil)
	if err != nil || exit.ExitCode != 0 {
		t.Fatal(exit, err)
	}
	if out.Len() != 20000004 || !strings.HasSuffix(out.String(), "xend\n") {
		t.Errorf("got %d bytes", out.Len())
	}
}

func TestExecTimeout(t *testing.T) {
	t.Parallel()
	c, _ := connect(t)
	req := script(`echo started; sleep 30`)
	req.TimeoutMs = 2000 // room for the shell to start on a loaded host
	var out bytes.Buffer
	exit, err := c.Exec(testCtx(t), req, &out, nil)
	if err != nil {
		t.Fatal(err)
	}
	if !exit.TimedOut || exit.Signal != 9 || exit.ExitCode != 137 || out.String() != "started\n" {
		t.Errorf("exit = %+v, output %q", exit, out.String())
	}
}

// TestCancelKills: a host that stops waiting takes the command with it.
func TestCancelKills(t *testing.T) {
	t.Parallel()
	c, _ := connect(t)
	ctx, cancel := context.WithCancel(testCtx(t))
	p, err := c.Start(ctx, script(`sleep 30`))
	if err != nil {
		t.Fatal(err)
	}
	pid := p.PID
	if pid == 0 || !alive(pid) {
		t.Fatalf("pid %d not running", pid)
	}
	cancel()
	waitGone(t, pid)
}

// TestClosedSessionKills: a host connection that breaks takes its
// commands with it, but not detached ones.
func TestClosedSessionKills(t *testing.T) {
	t.Parallel()
	dial, _ := serve(t)
	ctx := testCtx(t)
	c, err := guest.Dial(ctx, dial)
	if err != nil {
		t.Fatal(err)
	}
	p, err := c.Start(ctx, script(`sleep 30`))
	if err != nil {
		t.Fatal(err)
	}
	d := script(`sleep 30`)
	d.Detach, d.Tag = true, "keeper"
	kept, err := c.Start(ctx, d)
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	waitGone(t, p.PID)
	if !alive(kept.PID) {
		t.Fatal("detached process died with the session")
	}
	// A new session finds it by tag and ends it.
	c2, err := guest.Dial(ctx, dial)
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	if !c.Closed() || c2.Closed() {
		t.Errorf("Closed() = %v, %v", c.Closed(), c2.Closed())
	}
	if err := c2.Signal(ctx, guest.ByTag("keeper"), int(unix.SIGKILL)); err != nil {
		t.Fatal(err)
	}
	waitGone(t, kept.PID)
}

func TestStdinSignalAndFollow(t *testing.T) {
	t.Parallel()
	c, _ := connect(t)
	ctx := testCtx(t)
	req := &agentpb.StartRequest{Process: &agentpb.ProcessConfig{Argv: []string{"cat"}}, Stdin: true, Detach: true, Tag: "cat"}
	p, err := c.Start(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	if err := c.SendInput(ctx, guest.ByTag("cat"), []byte("one\n")); err != nil {
		t.Fatal(err)
	}
	if ev, err := p.Next(); err != nil || string(ev.Stdout) != "one\n" {
		t.Fatalf("first output %q, %v", ev.Stdout, err)
	}
	// A second follower, with what was written so far.
	f, err := c.Connect(ctx, guest.ByPID(p.PID), true)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if ev, err := f.Next(); err != nil || string(ev.Stdout) != "one\n" {
		t.Fatalf("replayed %q, %v", ev.Stdout, err)
	}
	procs, err := c.Processes(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(procs) != 1 || procs[0].Tag != "cat" || !procs[0].Running || int(procs[0].Pid) != p.PID {
		t.Errorf("processes = %v", procs)
	}
	if err := c.SendInput(ctx, guest.ByPID(p.PID), []byte("two\n")); err != nil {
		t.Fatal(err)
	}
	for _, r := range []*guest.Process{p, f} {
		if ev, err := r.Next(); err != nil || string(ev.Stdout) != "two\n" {
			t.Fatalf("second output %q, %v", ev.Stdout, err)
		}
	}
	if err := c.CloseStdin(ctx, guest.ByTag("cat")); err != nil {
		t.Fatal(err)
	}
	for _, r := range []*guest.Process{p, f} {
		ev, err := r.Next()
		if err != nil || ev.End == nil || ev.End.ExitCode != 0 {
			t.Fatalf("end = %+v, %v", ev.End, err)
		}
		if _, err := r.Next(); err != io.EOF {
			t.Errorf("after the end: %v", err)
		}
	}
	if err := c.SendInput(ctx, guest.ByTag("cat"), []byte("late")); !guest.IsCode(err, guest.CodeWrongState) {
		t.Errorf("input after the end: %v", err)
	}
	if err := c.Signal(ctx, guest.ByPID(1<<30), 15); !guest.IsCode(err, guest.CodeNotFound) {
		t.Errorf("signal to no process: %v", err)
	}
	if err := c.Signal(ctx, guest.ByTag("cat"), 99); !guest.IsCode(err, guest.CodeInvalid) {
		t.Errorf("signal 99: %v", err)
	}

	// A signal reaches the whole group and is reported.
	req = script(`trap 'echo got TERM; exit 7' TERM; echo ready; while :; do sleep 0.05; done`)
	p2, err := c.Start(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	defer p2.Close()
	if ev, err := p2.Next(); err != nil || string(ev.Stdout) != "ready\n" {
		t.Fatalf("%q, %v", ev.Stdout, err)
	}
	if err := c.Signal(ctx, guest.ByPID(p2.PID), int(unix.SIGTERM)); err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	for {
		ev, err := p2.Next()
		if err != nil {
			t.Fatal(err)
		}
		out.Write(ev.Stdout)
		if ev.End != nil {
			if ev.End.ExitCode != 7 || out.String() != "got TERM\n" {
				t.Errorf("end %+v after %q", ev.End, out.String())
			}
			break
		}
	}
}

func TestTerminal(t *testing.T) {
	t.Parallel()
	c, _ := connect(t)
	ctx := testCtx(t)
	req := &agentpb.StartRequest{
		Process: &agentpb.ProcessConfig{Argv: []string{"sh"}},
		Pty:     &agentpb.TerminalSize{Cols: 80, Rows: 24},
	}
	p, err := c.Start(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	if err := c.Resize(ctx, guest.ByPID(p.PID), 132, 43); err != nil {
		t.Fatal(err)
	}
	if err := c.SendInput(ctx, guest.ByPID(p.PID), []byte("stty size; [ -t 0 ] && echo TTY$((6*7)); exit 5\n")); err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	for {
		ev, err := p.Next()
		if err != nil {
			t.Fatalf("%v after %q", err, out.String())
		}
		if ev.Stdout != nil || ev.Stderr != nil {
			t.Errorf("terminal output came as stdout or stderr")
		}
		out.Write(ev.PTY)
		if ev.End != nil {
			if ev.End.ExitCode != 5 {
				t.Errorf("exit %+v", ev.End)
			}
			break
		}
	}
	if !strings.Contains(out.String(), "43 132") || !strings.Contains(out.String(), "TTY42") {
		t.Errorf("terminal output %q", out.String())
	}
	if err := c.Resize(ctx, guest.ByPID(p.PID), 0, 10); err == nil {
		t.Error("resized to 0 columns")
	}
	q, err := c.Start(ctx, script(`sleep 5`))
	if err != nil {
		t.Fatal(err)
	}
	defer q.Close()
	if err := c.Resize(ctx, guest.ByPID(q.PID), 80, 24); !guest.IsCode(err, guest.CodeWrongState) {
		t.Errorf("resize without a terminal: %v", err)
	}
}

func TestFiles(t *testing.T) {
	t.Parallel()
	c, _ := connect(t)
	ctx := testCtx(t)
	dir := t.TempDir()
	data := make([]byte, 3<<20+17)
	rand.Read(data)
	path := filepath.Join(dir, "a", "b", "data.bin")

	if _, err := c.WriteFile(ctx, &agentpb.WriteHeader{Path: path}, bytes.NewReader(data)); !guest.IsCode(err, guest.CodeNotFound) {
		t.Errorf("write without parents: %v", err)
	}
	e, err := c.WriteFile(ctx, &agentpb.WriteHeader{Path: path, Parents: true, Mode: 0o640, Size: int64(len(data))}, bytes.NewReader(data))
	if err != nil {
		t.Fatal(err)
	}
	if e.Size != int64(len(data)) || e.Mode != 0o640 || e.Type != agentpb.FileType_FILE_TYPE_FILE || e.Name != "data.bin" {
		t.Errorf("entry = %v", e)
	}
	if got, _ := os.ReadFile(path); !bytes.Equal(got, data) {
		t.Fatal("file on disk differs")
	}
	r, err := c.OpenFile(ctx, path, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(r)
	r.Close()
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read back %d bytes, %v", len(got), err)
	}
	r, err = c.OpenFile(ctx, path, 1000, 5000)
	if err != nil {
		t.Fatal(err)
	}
	got, _ = io.ReadAll(r)
	r.Close()
	if !bytes.Equal(got, data[1000:6000]) {
		t.Errorf("range read %d bytes", len(got))
	}

	if _, err := c.MakeDir(ctx, filepath.Join(dir, "a", "c"), false, 0o700); err != nil {
		t.Fatal(err)
	}
	if _, err := c.MakeDir(ctx, filepath.Join(dir, "a", "c"), false, 0); !guest.IsCode(err, guest.CodeExists) {
		t.Errorf("mkdir twice: %v", err)
	}
	if _, err := c.MakeDir(ctx, filepath.Join(dir, "a", "c"), true, 0); err != nil {
		t.Errorf("mkdir -p of an existing directory: %v", err)
	}
	if err := os.Symlink("b/data.bin", filepath.Join(dir, "a", "link")); err != nil {
		t.Fatal(err)
	}
	list, err := c.ListDir(ctx, filepath.Join(dir, "a"))
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range list {
		names = append(names, e.Name+":"+e.Type.String()+":"+e.SymlinkTarget)
	}
	if strings.Join(names, " ") != "b:FILE_TYPE_DIRECTORY: c:FILE_TYPE_DIRECTORY: link:FILE_TYPE_SYMLINK:b/data.bin" {
		t.Errorf("list = %v", names)
	}
	moved := filepath.Join(dir, "a", "c", "moved.bin")
	if _, err := c.Move(ctx, path, moved); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Stat(ctx, path); !guest.IsCode(err, guest.CodeNotFound) {
		t.Errorf("stat of the old name: %v", err)
	}
	if st, err := c.Stat(ctx, moved); err != nil || st.Size != int64(len(data)) {
		t.Errorf("stat = %v, %v", st, err)
	}

	for _, tt := range []struct {
		name string
		err  error
		want guest.Code
	}{
		{"relative path", statErr(ctx, c, "a/b"), guest.CodeInvalid},
		{"read a directory", readErr(ctx, c, dir), guest.CodeWrongState},
		{"read a missing file", readErr(ctx, c, filepath.Join(dir, "none")), guest.CodeNotFound},
		{"write over a directory", writeErr(ctx, c, filepath.Join(dir, "a")), guest.CodeWrongState},
		{"list a file", listErr(ctx, c, moved), guest.CodeWrongState},
		{"remove a full directory", c.Remove(ctx, filepath.Join(dir, "a"), false), guest.CodeWrongState},
		{"remove /", c.Remove(ctx, "/", true), guest.CodeInvalid},
	} {
		if !guest.IsCode(tt.err, tt.want) {
			t.Errorf("%s: %v, want %s", tt.name, tt.err, tt.want)
		}
	}
	if err := c.Remove(ctx, filepath.Join(dir, "a"), true); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, "a")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("after remove: %v", err)
	}
}

func statErr(ctx context.Context, c *guest.Client, p string) error {
	_, err := c.Stat(ctx, p)
	return err
}
func listErr(ctx context.Context, c *guest.Client, p string) error {
	_, err := c.ListDir(ctx, p)
	return err
}
func readErr(ctx context.Context, c *guest.Client, p string) error {
	r, err := c.OpenFile(ctx, p, 0, 0)
	if err == nil {
		r.Close()
	}
	return err
}
func writeErr(ctx context.Context, c *guest.Client, p string) error {
	_, err := c.WriteFile(ctx, &agentpb.WriteHeader{Path: p}, strings.NewReader("x"))
	return err
}

// TestCutWriteLeavesNothing: an upload that fails part way, or carries
// other than the bytes it announced, leaves the old file as it was and no
// temporary file behind.
func TestCutWriteLeavesNothing(t *testing.T) {
	t.Parallel()
	c, _ := connect(t)
	ctx := testCtx(t)
	dir := t.TempDir()
	path := filepath.Join(dir, "f")
	if err := os.WriteFile(path, []byte("old"), 0o644); err != nil {
		t.Fatal(err)
	}
	_, err := c.WriteFile(ctx, &agentpb.WriteHeader{Path: path}, io.MultiReader(bytes.NewReader(make([]byte, 1<<20)), iotestErr{}))
	if err == nil {
		t.Fatal("a failing source wrote a file")
	}
	_, err = c.WriteFile(ctx, &agentpb.WriteHeader{Path: path, Size: 10}, strings.NewReader("short"))
	if !guest.IsCode(err, guest.CodeInvalid) {
		t.Errorf("short write: %v", err)
	}
	wctx, cancel := context.WithCancel(ctx)
	pr, pw := io.Pipe()
	go func() {
		pw.Write(make([]byte, 1<<20))
		cancel()
		pw.CloseWithError(context.Canceled)
	}()
	if _, err := c.WriteFile(wctx, &agentpb.WriteHeader{Path: path}, pr); err == nil {
		t.Error("a cancelled write succeeded")
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		ents, _ := os.ReadDir(dir)
		got, _ := os.ReadFile(path)
		if len(ents) == 1 && string(got) == "old" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("directory holds %d entries, file %q", len(ents), got)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

type iotestErr struct{}

func (iotestErr) Read([]byte) (int, error) { return 0, errors.New("source failed") }

// TestPipeTransport serves one session over net.Pipe, as a fake machine's
// DialAgent does, and a second after the first host left.
func TestPipeTransport(t *testing.T) {
	t.Parallel()
	srv := agent.NewServer(agent.Options{System: &recordingSystem{}})
	defer srv.Close()
	ctx := testCtx(t)
	for range 2 {
		host, g := net.Pipe()
		go srv.ServeConn(ctx, g)
		c, err := guest.Dial(ctx, func(context.Context) (net.Conn, error) { return host, nil })
		if err != nil {
			t.Fatal(err)
		}
		var out bytes.Buffer
		if _, err := c.Exec(ctx, script("echo over a pipe"), &out, nil); err != nil || out.String() != "over a pipe\n" {
			t.Errorf("%q, %v", out.String(), err)
		}
		c.Close()
	}
}

func alive(pid int) bool { return unix.Kill(pid, 0) == nil }

func waitGone(t *testing.T, pid int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for alive(pid) {
		if time.Now().After(deadline) {
			t.Fatalf("process %d still runs", pid)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestReplayIsBounded: a follower that connects late gets the last MiB of
// output and is told how much came before it.
func TestReplayIsBounded(t *testing.T) {
	t.Parallel()
	c, _ := connect(t)
	ctx := testCtx(t)
	req := script(`head -c 1572864 /dev/zero; echo; echo done; read line`)
	req.Detach, req.Stdin, req.Tag = true, true, "big"
	p, err := c.Start(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	var total int
	for total < 1572864+6 {
		ev, err := p.Next()
		if err != nil {
			t.Fatal(err)
		}
		total += len(ev.Stdout)
	}
	p.Close()
	f, err := c.Connect(ctx, guest.ByTag("big"), true)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := c.SendInput(ctx, guest.ByTag("big"), []byte("\n")); err != nil {
		t.Fatal(err)
	}
	var replayed int
	var out bytes.Buffer
	for {
		ev, err := f.Next()
		if err != nil {
			t.Fatal(err)
		}
		replayed += len(ev.Stdout)
		out.Write(ev.Stdout)
		if ev.End != nil {
			break
		}
	}
	if f.Dropped == 0 || replayed > 1<<20+64<<10 || int64(replayed)+f.Dropped != int64(total) || !strings.HasSuffix(out.String(), "done\n") {
		t.Errorf("replayed %d bytes, dropped %d, of %d written", replayed, f.Dropped, total)
	}
}

// TestTarRoundTrip: a tree with a symlink, an empty directory and modes
// goes out as a tar and back in as the same tree.
func TestTarRoundTrip(t *testing.T) {
	t.Parallel()
	c, _ := connect(t)
	ctx := testCtx(t)
	src, dst := t.TempDir(), filepath.Join(t.TempDir(), "new", "dir")
	os.MkdirAll(filepath.Join(src, "a", "b"), 0o755)
	os.Mkdir(filepath.Join(src, "empty"), 0o700)
	os.WriteFile(filepath.Join(src, "a", "b", "f"), []byte("deep"), 0o600)
	os.WriteFile(filepath.Join(src, "x.sh"), []byte("#!/bin/sh\n"), 0o755)
	os.Symlink("a/b/f", filepath.Join(src, "link"))

	r, err := c.OpenTar(ctx, src)
	if err != nil {
		t.Fatal(err)
	}
	n, err := c.WriteTar(ctx, dst, r)
	r.Close()
	if err != nil || n != 6 {
		t.Fatalf("wrote %d entries: %v", n, err)
	}
	for name, want := range map[string]string{"a/b/f": "deep", "x.sh": "#!/bin/sh\n", "link": "deep"} {
		if b, err := os.ReadFile(filepath.Join(dst, name)); err != nil || string(b) != want {
			t.Errorf("%s = %q, %v", name, b, err)
		}
	}
	if l, _ := os.Readlink(filepath.Join(dst, "link")); l != "a/b/f" {
		t.Errorf("link -> %q", l)
	}
	for name, mode := range map[string]os.FileMode{"empty": os.ModeDir | 0o700, "x.sh": 0o755, "a/b/f": 0o600} {
		if fi, err := os.Lstat(filepath.Join(dst, name)); err != nil || fi.Mode() != mode {
			t.Errorf("%s: %v, %v; want %v", name, fi.Mode(), err, mode)
		}
	}
	if _, err := c.OpenTar(ctx, filepath.Join(src, "x.sh")); !guest.IsCode(err, guest.CodeWrongState) {
		t.Errorf("tar of a file: %v", err)
	}
	if _, err := c.OpenTar(ctx, filepath.Join(src, "none")); !guest.IsCode(err, guest.CodeNotFound) {
		t.Errorf("tar of nothing: %v", err)
	}
}

// TestTarRefusesEscapes: entries that would land outside the directory are
// refused and write nothing outside it.
func TestTarRefusesEscapes(t *testing.T) {
	t.Parallel()
	c, _ := connect(t)
	ctx := testCtx(t)
	outside := t.TempDir()
	for _, entries := range [][]tarEntry{
		{{name: "../escape", body: "x"}},
		{{name: "/abs", body: "x"}},
		{{name: "l", link: outside}, {name: "l/escape", body: "x"}},
	} {
		dst := t.TempDir()
		_, err := c.WriteTar(ctx, dst, tarOf(t, entries))
		if !guest.IsCode(err, guest.CodeInvalid) {
			t.Errorf("%v: %v, want invalid", entries, err)
		}
		if _, err := os.Stat(filepath.Join(outside, "escape")); err == nil {
			t.Fatalf("%v wrote outside the directory", entries)
		}
	}
}

type tarEntry struct{ name, body, link string }

func tarOf(t *testing.T, entries []tarEntry) io.Reader {
	var b bytes.Buffer
	tw := tar.NewWriter(&b)
	for _, e := range entries {
		h := &tar.Header{Name: e.name, Mode: 0o644, Size: int64(len(e.body)), Typeflag: tar.TypeReg}
		if e.link != "" {
			h.Typeflag, h.Linkname, h.Size = tar.TypeSymlink, e.link, 0
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		io.WriteString(tw, e.body)
	}
	tw.Close()
	return &b
}

func TestWriteIfChangedRewritesInPlace(t *testing.T) {
	p := filepath.Join(t.TempDir(), "hostname")
	for _, content := range []string{"vm-longer-name\n", "vm-a\n", "vm-a\n", "vm-much-longer-name\n", ""} {
		agent.WriteIfChanged(p, content)
		if b, err := os.ReadFile(p); err != nil || string(b) != content {
			t.Fatalf("after writing %q the file holds %q (%v)", content, b, err)
		}
	}
}

package qemu

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/smolvm/smolvm/internal/vmm"
)

// The tests below run the QMP client and the snapshot code against a fake
// QMP server on a real unix socket; no QEMU is needed.

const (
	qmpGreeting = `{"QMP":{"version":{"qemu":{"micro":0,"minor":2,"major":8},"package":""},"capabilities":["oob"]}}`
	qmpOK       = `{"return":{}}`
	// hangUp, as a line of a reply, makes the fake close the connection
	// there, as QEMU does when it exits.
	hangUp = "<hang up>"
	// silence, as a whole reply, makes the fake never answer.
	silence = ""
)

// qmpEvent is an asynchronous event line as QEMU sends them.
func qmpEvent(name string) string {
	return `{"event":"` + name + `","timestamp":{"seconds":1700000000,"microseconds":1}}`
}

// reply answers one command; n is how many times the same command came
// before on this server. It returns the lines to send, joined by "\n".
type reply func(n int) string

// seq answers successive calls with rs in turn, repeating the last.
func seq(rs ...string) reply {
	return func(n int) string {
		if n >= len(rs) {
			n = len(rs) - 1
		}
		return rs[n]
	}
}

// script maps a command to its replies; commands not in it get qmpOK.
type script map[string]reply

type qmpCmd struct {
	Name string
	Args map[string]any
}

type fakeQMP struct {
	path   string
	script script
	// received gets every command as it is recorded.
	received chan qmpCmd

	mu       sync.Mutex
	cmds     []qmpCmd
	passed   map[string]*os.File // by getfd name
	counts   map[string]int
	conns    []net.Conn
	accepted int
	closed   bool
}

func newFakeQMP(t *testing.T, s script) *fakeQMP {
	t.Helper()
	dir := t.TempDir()
	path := filepath.Join(dir, "q.sock")
	if len(path) > maxSocketPath {
		d, err := os.MkdirTemp("", "qmp")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.RemoveAll(d) })
		path = filepath.Join(d, "q.sock")
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	f := &fakeQMP{path: path, script: s, received: make(chan qmpCmd, 256), counts: map[string]int{}, passed: map[string]*os.File{}}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			f.mu.Lock()
			if f.closed {
				f.mu.Unlock()
				conn.Close()
				return
			}
			f.accepted++
			f.conns = append(f.conns, conn)
			wg.Add(1)
			f.mu.Unlock()
			go func() {
				defer wg.Done()
				defer conn.Close()
				f.serve(conn)
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		f.mu.Lock()
		f.closed = true
		for _, c := range f.conns {
			c.Close()
		}
		f.mu.Unlock()
		wg.Wait()
		for _, fd := range f.passed {
			fd.Close()
		}
	})
	return f
}

func (f *fakeQMP) serve(conn net.Conn) {
	if _, err := conn.Write([]byte(qmpGreeting + "\n")); err != nil {
		return
	}
	// Read as QEMU does: descriptors passed with SCM_RIGHTS arrive with
	// the bytes of the getfd command they belong to.
	lines := make(chan []byte)
	var fds []*os.File
	var fdsMu sync.Mutex
	go func() {
		defer close(lines)
		uc := conn.(*net.UnixConn)
		var pending []byte
		buf, oob := make([]byte, 64<<10), make([]byte, 256)
		for {
			n, oobn, _, _, err := uc.ReadMsgUnix(buf, oob)
			n, oobn = max(n, 0), max(oobn, 0)
			if oobn > 0 {
				msgs, _ := unix.ParseSocketControlMessage(oob[:oobn])
				for _, m := range msgs {
					rights, _ := unix.ParseUnixRights(&m)
					fdsMu.Lock()
					for _, fd := range rights {
						fds = append(fds, os.NewFile(uintptr(fd), "passed"))
					}
					fdsMu.Unlock()
				}
			}
			pending = append(pending, buf[:n]...)
			for {
				i := bytes.IndexByte(pending, '\n')
				if i < 0 {
					break
				}
				lines <- append([]byte(nil), pending[:i]...)
				pending = pending[i+1:]
			}
			if err != nil {
				return
			}
		}
	}()
	for line := range lines {
		var msg struct {
			Execute   string          `json:"execute"`
			Arguments map[string]any  `json:"arguments"`
			ID        json.RawMessage `json:"id"`
		}
		if err := json.Unmarshal(line, &msg); err != nil {
			conn.Write([]byte(`{"error":{"class":"GenericError","desc":"JSON parse error"}}` + "\n"))
			continue
		}
		c := qmpCmd{Name: msg.Execute, Args: msg.Arguments}
		if c.Name == "getfd" {
			fdsMu.Lock()
			if len(fds) > 0 {
				name, _ := c.Args["fdname"].(string)
				f.mu.Lock()
				if old := f.passed[name]; old != nil {
					old.Close()
				}
				f.passed[name] = fds[0]
				f.mu.Unlock()
				fds = fds[1:]
			}
			fdsMu.Unlock()
		}
		f.mu.Lock()
		n := f.counts[c.Name]
		f.counts[c.Name]++
		f.cmds = append(f.cmds, c)
		f.mu.Unlock()
		select {
		case f.received <- c:
		default:
		}
		answer := qmpOK
		if r, ok := f.script[c.Name]; ok {
			answer = r(n)
		}
		if answer == silence {
			continue
		}
		for _, line := range strings.Split(answer, "\n") {
			if line == hangUp {
				conn.Close()
				return
			}
			if _, err := conn.Write([]byte(withID(line, msg.ID) + "\n")); err != nil {
				return
			}
		}
	}
}

// withID adds id to a reply line, as QEMU echoes a command's id in its
// answer; events, and lines that already carry an id, stay as they are.
func withID(line string, id json.RawMessage) string {
	var m map[string]json.RawMessage
	if len(id) == 0 || json.Unmarshal([]byte(line), &m) != nil || m["event"] != nil || m["id"] != nil {
		return line
	}
	if m["return"] == nil && m["error"] == nil {
		return line
	}
	m["id"] = id
	b, _ := json.Marshal(m)
	return string(b)
}

// passedFile is the descriptor passed under name, nil if none was.
func (f *fakeQMP) passedFile(name string) *os.File {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.passed[name]
}

// wantPassed checks that the descriptor passed as the state is the file
// at path, opened for writing (a save) or reading (a restore).
func wantPassed(t *testing.T, f *fakeQMP, path string, write bool) {
	t.Helper()
	fd := f.passedFile(stateFD)
	if fd == nil {
		t.Fatalf("no descriptor was passed as %q", stateFD)
	}
	got, err := fd.Stat()
	if err != nil {
		t.Fatal(err)
	}
	want, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if !os.SameFile(got, want) {
		t.Errorf("the descriptor passed is not %s", path)
	}
	fl, err := unix.FcntlInt(fd.Fd(), unix.F_GETFL, 0)
	if err != nil {
		t.Fatal(err)
	}
	if mode := fl & unix.O_ACCMODE; (mode == unix.O_WRONLY) != write {
		t.Errorf("the descriptor's access mode is %#o, want it writable %v", mode, write)
	}
}

// commands returns every command received so far, in order.
func (f *fakeQMP) commands() []qmpCmd {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]qmpCmd(nil), f.cmds...)
}

func (f *fakeQMP) names() []string {
	var names []string
	for _, c := range f.commands() {
		names = append(names, c.Name)
	}
	return names
}

func (f *fakeQMP) connections() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.accepted
}

// args returns the arguments of the i-th received command named name.
func (f *fakeQMP) args(t *testing.T, name string, i int) map[string]any {
	t.Helper()
	for _, c := range f.commands() {
		if c.Name == name {
			if i == 0 {
				return c.Args
			}
			i--
		}
	}
	t.Fatalf("command %s not received; got %v", name, f.names())
	return nil
}

// testCtx bounds a test so that a bug fails it rather than hanging it.
func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func dialFake(t *testing.T, ctx context.Context, f *fakeQMP) *monitor {
	t.Helper()
	m, err := dialQMP(ctx, f.path)
	if err != nil {
		t.Fatalf("dialQMP: %v", err)
	}
	t.Cleanup(func() { m.Close() })
	return m
}

func wantNames(t *testing.T, f *fakeQMP, want ...string) {
	t.Helper()
	if got := f.names(); !reflect.DeepEqual(got, want) {
		t.Errorf("commands sent:\n got %q\nwant %q", got, want)
	}
}

// fakeInstance is a VM whose process is already gone (PID 0), so Wait
// returns at once.
func fakeInstance(f *fakeQMP) *machine {
	return &machine{rt: runtime{QMPSocket: f.path, PID: 0, AgentSocket: "x"}}
}

func TestQMPHandshakeAndEventsSkipped(t *testing.T) {
	t.Parallel()
	f := newFakeQMP(t, script{
		"qmp_capabilities": seq(qmpEvent("RESUME") + "\n" + qmpOK),
		"query-status": seq(qmpEvent("STOP") + "\n" + qmpEvent("MIGRATION") + "\n" +
			`{"return":{"status":"paused","running":false}}`),
	})
	ctx := testCtx(t)
	m := dialFake(t, ctx, f)
	wantNames(t, f, "qmp_capabilities")
	if a := f.args(t, "qmp_capabilities", 0); a != nil {
		t.Errorf("qmp_capabilities sent arguments %v, want none", a)
	}

	var st struct {
		Status  string `json:"status"`
		Running bool   `json:"running"`
	}
	if err := m.run(ctx, "query-status", nil, &st); err != nil {
		t.Fatalf("query-status: %v", err)
	}
	if st.Status != "paused" || st.Running {
		t.Errorf("query-status decoded %+v, want status paused, not running", st)
	}
	// Arguments go through; a nil out discards the return.
	if err := m.run(ctx, "block_resize", map[string]any{"device": "root", "size": 42}, nil); err != nil {
		t.Fatalf("block_resize: %v", err)
	}
	wantNames(t, f, "qmp_capabilities", "query-status", "block_resize")
	if a := f.args(t, "block_resize", 0); a["device"] != "root" || a["size"] != float64(42) {
		t.Errorf("block_resize arguments %v", a)
	}
	if a := f.args(t, "query-status", 0); a != nil {
		t.Errorf("query-status sent arguments %v, want none", a)
	}
}

func TestQMPDialErrors(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	missing := filepath.Join(t.TempDir(), "none.sock")
	if _, err := dialQMP(ctx, missing); err == nil || !strings.Contains(err.Error(), missing) {
		t.Errorf("dial of a missing socket: got %v, want an error naming %s", err, missing)
	}

	f := newFakeQMP(t, script{
		"qmp_capabilities": seq(`{"error":{"class":"CommandNotFound","desc":"nope"}}`),
	})
	_, err := dialQMP(ctx, f.path)
	if err == nil || !strings.Contains(err.Error(), "handshake") || !strings.Contains(err.Error(), "nope") {
		t.Errorf("refused capabilities: got %v, want a handshake error carrying the desc", err)
	}
}

func TestQMPErrorReply(t *testing.T) {
	t.Parallel()
	f := newFakeQMP(t, script{
		"migrate": seq(qmpEvent("STOP") + "\n" +
			`{"error":{"class":"GenericError","desc":"There's a migration process in progress"}}`),
	})
	ctx := testCtx(t)
	m := dialFake(t, ctx, f)
	err := m.run(ctx, "migrate", map[string]any{"uri": "exec:cat > /x"}, nil)
	if err == nil {
		t.Fatal("an error reply gave no error")
	}
	for _, want := range []string{"migrate", "GenericError", "There's a migration process in progress"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not contain %q", err, want)
		}
	}
	// The session is still usable after an error reply.
	if err := m.run(ctx, "stop", nil, nil); err != nil {
		t.Errorf("command after an error reply: %v", err)
	}
	wantNames(t, f, "qmp_capabilities", "migrate", "stop")
}

// runAsync runs one command in the background; the test fails rather than
// hangs if it never returns.
func runAsync(m *monitor, ctx context.Context, command string) <-chan error {
	done := make(chan error, 1)
	go func() { done <- m.run(ctx, command, nil, nil) }()
	return done
}

func waitErr(t *testing.T, done <-chan error) error {
	t.Helper()
	select {
	case err := <-done:
		return err
	case <-time.After(5 * time.Second):
		t.Fatal("run did not return after its context ended")
		return nil
	}
}

func TestQMPNoAnswerDeadline(t *testing.T) {
	t.Parallel()
	f := newFakeQMP(t, script{"query-status": seq(silence)})
	m := dialFake(t, testCtx(t), f)
	ctx, cancel := context.WithTimeout(t.Context(), 200*time.Millisecond)
	defer cancel()
	err := waitErr(t, runAsync(m, ctx, "query-status"))
	if err == nil {
		t.Fatal("run returned no error though the server never answered")
	}
	if !strings.Contains(err.Error(), "query-status") {
		t.Errorf("error %q does not name the command", err)
	}
	// The context's deadline, whichever of its timer and the socket's
	// (set to the same time) fired first.
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("error %v is not a deadline error", err)
	}
	wantNames(t, f, "qmp_capabilities", "query-status")
}

func TestQMPNoAnswerCancel(t *testing.T) {
	t.Parallel()
	f := newFakeQMP(t, script{"query-migrate": seq(silence)})
	m := dialFake(t, testCtx(t), f)
	<-f.received // qmp_capabilities

	ctx, cancel := context.WithCancel(t.Context())
	done := runAsync(m, ctx, "query-migrate")
	select {
	case c := <-f.received:
		if c.Name != "query-migrate" {
			t.Fatalf("server got %s, want query-migrate", c.Name)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("query-migrate never reached the server")
	}
	cancel()
	if err := waitErr(t, done); !errors.Is(err, context.Canceled) {
		t.Errorf("run after cancel: got %v, want context.Canceled", err)
	}

	// An already cancelled context fails at once, for dial and for run.
	if _, err := dialQMP(ctx, f.path); err == nil {
		t.Error("dialQMP with a cancelled context succeeded")
	}
	if err := waitErr(t, runAsync(m, ctx, "stop")); !errors.Is(err, context.Canceled) {
		t.Errorf("run with a cancelled context: got %v, want context.Canceled", err)
	}
}

func TestSaveSequence(t *testing.T) {
	t.Parallel()
	f := newFakeQMP(t, script{
		"stop": seq(qmpEvent("STOP") + "\n" + qmpOK),
		"query-migrate": seq(
			`{"return":{"status":"active","ram":{"transferred":1}}}`,
			qmpEvent("MIGRATION")+"\n"+`{"return":{"status":"active"}}`,
			`{"return":{"status":"completed"}}`,
		),
	})
	dir := snapshotDir(t)
	state := filepath.Join(dir, fileState)
	if err := New(Options{}).Save(testCtx(t), fakeInstance(f), dir); err != nil {
		t.Fatalf("Save: %v", err)
	}
	// What stays is the snapshot, its disk read-only.
	if st, err := os.Stat(filepath.Join(dir, fileDisk)); err != nil || st.Mode().Perm() != 0o444 {
		t.Errorf("the saved disk: %v %v, want mode 0444", st, err)
	}
	for _, f := range []string{fileAgent, fileQMP, filePID} {
		if _, err := os.Stat(filepath.Join(dir, f)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s left after Save: %v", f, err)
		}
	}
	wantNames(t, f, "qmp_capabilities", "stop", "migrate-set-parameters", "getfd", "migrate",
		"query-migrate", "query-migrate", "query-migrate", "query-status", "quit")
	if got := f.args(t, "migrate", 0)["uri"]; got != "fd:"+stateFD {
		t.Errorf("migrate uri %q, want %q", got, "fd:"+stateFD)
	}
	wantPassed(t, f, state, true)
	if got := f.args(t, "migrate-set-parameters", 0)["max-bandwidth"]; got != float64(int64(1)<<40) {
		t.Errorf("max-bandwidth %v, want %d", got, int64(1)<<40)
	}
}

func TestSaveQuitHangsUp(t *testing.T) {
	t.Parallel()
	// QEMU may exit before it answers quit; the process being gone is
	// what counts.
	f := newFakeQMP(t, script{
		"query-migrate": seq(`{"return":{"status":"completed"}}`),
		"quit":          seq(hangUp),
	})
	if err := New(Options{}).Save(testCtx(t), fakeInstance(f), snapshotDir(t)); err != nil {
		t.Fatalf("Save with quit unanswered: %v", err)
	}
	wantNames(t, f, "qmp_capabilities", "stop", "migrate-set-parameters", "getfd", "migrate", "query-migrate", "query-status", "quit")
}

func TestSaveFailedMigration(t *testing.T) {
	t.Parallel()
	for _, status := range []string{"failed", "cancelled"} {
		t.Run(status, func(t *testing.T) {
			t.Parallel()
			f := newFakeQMP(t, script{
				"query-migrate": seq(
					`{"return":{"status":"active"}}`,
					`{"return":{"status":"`+status+`","error-desc":"write to pipe: No space left on device"}}`,
				),
			})
			err := New(Options{}).Save(testCtx(t), fakeInstance(f), snapshotDir(t))
			if err == nil {
				t.Fatal("Save succeeded though the migration " + status)
			}
			for _, want := range []string{"migration " + status, "No space left on device"} {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("error %q does not contain %q", err, want)
				}
			}
			// Nothing after the failed poll: the VM is not quit.
			wantNames(t, f, "qmp_capabilities", "stop", "migrate-set-parameters", "getfd", "migrate",
				"query-migrate", "query-migrate")
		})
	}
}

func TestSaveCommandError(t *testing.T) {
	t.Parallel()
	f := newFakeQMP(t, script{
		"stop": seq(`{"error":{"class":"GenericError","desc":"cannot stop"}}`),
	})
	err := New(Options{}).Save(testCtx(t), fakeInstance(f), snapshotDir(t))
	if err == nil || !strings.Contains(err.Error(), "cannot stop") {
		t.Fatalf("Save with stop refused: got %v", err)
	}
	wantNames(t, f, "qmp_capabilities", "stop")
}

func TestSaveProcessStaysAlive(t *testing.T) {
	t.Parallel()
	// A process that does not go away after quit: Save waits for it until
	// its context ends and reports that. This test's own process stands
	// in for QEMU (its command line contains the empty marker).
	f := newFakeQMP(t, script{"query-migrate": seq(`{"return":{"status":"completed"}}`)})
	ctx, cancel := context.WithTimeout(t.Context(), 200*time.Millisecond)
	defer cancel()
	inst := &machine{rt: runtime{QMPSocket: f.path, PID: os.Getpid()}}
	err := New(Options{}).Save(ctx, inst, snapshotDir(t))
	if err == nil || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Save with a process that stays: got %v, want a deadline error", err)
	}
	wantNames(t, f, "qmp_capabilities", "stop", "migrate-set-parameters", "getfd", "migrate", "query-migrate", "query-status", "quit")
}

// stateFile is a saved state for resume to read.
func stateFile(t *testing.T) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), fileState)
	if err := os.WriteFile(p, []byte("QEVM"), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// QEMU sets the saved run state when the load ends and only then reports
// the migration completed: resume looks at the run state only after
// that, and sees cont take.
func TestResumeSequence(t *testing.T) {
	t.Parallel()
	f := newFakeQMP(t, script{
		"query-migrate": seq(
			`{"return":{"status":"active"}}`,
			qmpEvent("MIGRATION")+"\n"+`{"return":{"status":"completed"}}`,
		),
		"query-status": seq(
			qmpEvent("STOP")+"\n"+`{"return":{"status":"paused","running":false}}`,
			`{"return":{"status":"paused","running":false}}`,
			`{"return":{"status":"running","running":true}}`,
		),
		"cont": seq(qmpEvent("RESUME") + "\n" + qmpOK),
	})
	state := stateFile(t)
	if err := New(Options{}).resume(testCtx(t), fakeInstance(f), state); err != nil {
		t.Fatalf("resume: %v", err)
	}
	wantNames(t, f, "qmp_capabilities", "migrate-set-parameters", "getfd", "migrate-incoming",
		"query-migrate", "query-migrate", "query-status", "query-status", "cont", "query-status")
	if got := f.args(t, "migrate-incoming", 0)["uri"]; got != "fd:"+stateFD {
		t.Errorf("migrate-incoming uri %q, want %q", got, "fd:"+stateFD)
	}
	// No announcement of the network card after the load.
	if got, ok := f.args(t, "migrate-set-parameters", 0)["announce-rounds"].(float64); !ok || got != 0 {
		t.Errorf("migrate-set-parameters %v, want announce-rounds 0", f.args(t, "migrate-set-parameters", 0))
	}
	wantPassed(t, f, state, false)
}

func TestResumeAlreadyRunning(t *testing.T) {
	t.Parallel()
	f := newFakeQMP(t, script{
		"query-migrate": seq(`{"return":{"status":"completed"}}`),
		"query-status":  seq(`{"return":{"status":"running","running":true}}`),
	})
	if err := New(Options{}).resume(testCtx(t), fakeInstance(f), stateFile(t)); err != nil {
		t.Fatalf("resume: %v", err)
	}
	wantNames(t, f, "qmp_capabilities", "migrate-set-parameters", "getfd", "migrate-incoming", "query-migrate", "query-status", "query-status")
}

func TestResumeErrors(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name   string
		script script
		want   string
		sent   []string
	}{
		{
			name:   "migrate-incoming refused",
			script: script{"migrate-incoming": seq(`{"error":{"class":"GenericError","desc":"not in -incoming mode"}}`)},
			want:   "not in -incoming mode",
			sent:   []string{"qmp_capabilities", "migrate-set-parameters", "getfd", "migrate-incoming"},
		},
		{
			// A state that fails to load ends QEMU, and so the session.
			name: "QEMU exits while loading",
			script: script{"query-migrate": seq(
				`{"return":{"status":"active"}}`,
				hangUp,
			)},
			want: "load VM state",
			sent: []string{"qmp_capabilities", "migrate-set-parameters", "getfd", "migrate-incoming", "query-migrate", "query-migrate"},
		},
		{
			name:   "load failed",
			script: script{"query-migrate": seq(`{"return":{"status":"failed","error-desc":"bad section"}}`)},
			want:   "bad section",
			sent:   []string{"qmp_capabilities", "migrate-set-parameters", "getfd", "migrate-incoming", "query-migrate"},
		},
		{
			name: "cont refused",
			script: script{
				"query-migrate": seq(`{"return":{"status":"completed"}}`),
				"query-status":  seq(`{"return":{"status":"paused"}}`),
				"cont":          seq(`{"error":{"class":"GenericError","desc":"cannot continue"}}`),
			},
			want: "cannot continue",
			sent: []string{"qmp_capabilities", "migrate-set-parameters", "getfd", "migrate-incoming", "query-migrate", "query-status", "query-status", "cont"},
		},
		{
			name: "still paused after cont",
			script: script{
				"query-migrate": seq(`{"return":{"status":"completed"}}`),
				"query-status":  seq(`{"return":{"status":"paused"}}`),
			},
			want: `it is "paused" after cont`,
			sent: []string{"qmp_capabilities", "migrate-set-parameters", "getfd", "migrate-incoming", "query-migrate", "query-status", "query-status", "cont", "query-status"},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			f := newFakeQMP(t, tc.script)
			err := New(Options{}).resume(testCtx(t), fakeInstance(f), stateFile(t))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("resume: got %v, want an error containing %q", err, tc.want)
			}
			wantNames(t, f, tc.sent...)
		})
	}
}

// A session reads no answer one behind: an event can come before the
// greeting, and QEMU answers a command on whatever connection its monitor
// has when the command ends, so a session given up before its answer came
// hands it to the next one. Such answers carry another session's id.
func TestStaleAnswersSkipped(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "q.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		br := bufio.NewReader(c)
		// Seen from QEMU 7.2: an event queued before the connection came
		// is sent ahead of the greeting.
		c.Write([]byte(qmpEvent("NETDEV_STREAM_CONNECTED") + "\n" + `{"return": {}, "id": "earlier-1"}` + "\n" + qmpGreeting + "\n"))
		for {
			line, err := br.ReadBytes('\n')
			if err != nil {
				return
			}
			var cmd struct {
				Execute string          `json:"execute"`
				ID      json.RawMessage `json:"id"`
			}
			json.Unmarshal(line, &cmd)
			answer := `{"return": {}, "id": ` + string(cmd.ID) + "}\n"
			if cmd.Execute == "query-status" {
				answer = `{"return": {"status": "paused"}, "id": "earlier-2"}` + "\n" + qmpEvent("RESUME") + "\n" +
					`{"return": {"status": "running", "running": true}, "id": ` + string(cmd.ID) + "}\n"
			}
			c.Write([]byte(answer))
		}
	}()
	ctx := testCtx(t)
	m, err := dialQMP(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	for range 2 {
		st, err := queryStatus(ctx, m)
		if err != nil || st.Status != "running" {
			t.Fatalf("query-status: %+v, %v; want the answer with this command's id", st, err)
		}
	}
}

func TestStatusAndResize(t *testing.T) {
	t.Parallel()
	f := newFakeQMP(t, script{
		"query-status": seq(qmpEvent("RESUME") + "\n" + `{"return":{"status":"running","running":true}}`),
	})
	ctx := testCtx(t)
	d := New(Options{})
	inst := fakeInstance(f)
	st, err := d.Status(ctx, inst)
	if err != nil || st != "running" {
		t.Errorf("Status: got %q, %v; want running", st, err)
	}
	if err := d.Resize(ctx, inst, 8<<30); err != nil {
		t.Errorf("Resize: %v", err)
	}
	// Each call is its own session, with its own handshake.
	wantNames(t, f, "qmp_capabilities", "query-status", "qmp_capabilities", "block_resize")
	a := f.args(t, "block_resize", 0)
	if a["device"] != "root" || a["size"] != float64(8<<30) {
		t.Errorf("block_resize arguments %v", a)
	}
}

// snapshotDir is a machine directory with a disk, for Save to finish in.
func snapshotDir(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	for _, f := range []string{fileDisk, fileAgent, fileQMP, filePID} {
		if err := os.WriteFile(filepath.Join(dir, f), nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// A machine whose RAM is mapped from a file is saved and loaded with
// x-ignore-shared set first, so only its devices go through the stream.
func TestMemoryFileSaveAndResume(t *testing.T) {
	t.Parallel()
	f := newFakeQMP(t, script{"query-migrate": seq(`{"return":{"status":"completed"}}`)})
	vm := fakeInstance(f)
	vm.rt.MemoryFile = "/s/memory"
	if err := New(Options{}).Save(testCtx(t), vm, snapshotDir(t)); err != nil {
		t.Fatalf("Save: %v", err)
	}
	wantNames(t, f, "qmp_capabilities", "stop", "migrate-set-capabilities", "migrate-set-parameters", "getfd", "migrate", "query-migrate", "query-status", "quit")
	caps, _ := f.args(t, "migrate-set-capabilities", 0)["capabilities"].([]any)
	if len(caps) != 1 || caps[0].(map[string]any)["capability"] != "x-ignore-shared" || caps[0].(map[string]any)["state"] != true {
		t.Errorf("capabilities %v, want x-ignore-shared on", caps)
	}

	g := newFakeQMP(t, script{
		"query-migrate": seq(`{"return":{"status":"completed"}}`),
		"query-status": seq(`{"return":{"status":"paused","running":false}}`, `{"return":{"status":"paused","running":false}}`,
			`{"return":{"status":"running","running":true}}`),
	})
	clone := fakeInstance(g)
	clone.rt.MemoryFile = "/s/memory"
	if err := New(Options{}).resume(testCtx(t), clone, stateFile(t)); err != nil {
		t.Fatalf("resume: %v", err)
	}
	wantNames(t, g, "qmp_capabilities", "migrate-set-capabilities", "migrate-set-parameters", "getfd", "migrate-incoming", "query-migrate", "query-status", "query-status", "cont", "query-status")
}

// QEMU's filter refuses set*id calls unless QEMU must drop root itself
// (-runas), which QEMU 7.2 does after installing the filter.
func TestFilterRefusesSetIDs(t *testing.T) {
	t.Parallel()
	spec := vmm.Spec{ID: "vm-1", Dir: "/d", Kernel: "/k", Initrd: "/i", Cmdline: "c", MemoryMiB: 256, VCPUs: 1}
	filter := func(launched, dropsRoot bool) string {
		args := New(Options{}).args(spec, memory{}, launched, dropsRoot)
		i := slices.Index(args, "-sandbox")
		if i < 0 || i+1 >= len(args) {
			t.Fatalf("no -sandbox in %q", args)
		}
		return args[i+1]
	}
	for _, c := range []struct {
		launched, dropsRoot, deny bool
	}{{true, false, true}, {false, false, true}, {false, true, false}} {
		got := filter(c.launched, c.dropsRoot)
		if strings.Contains(got, "elevateprivileges=deny") != c.deny || !strings.Contains(got, "spawn=deny") {
			t.Errorf("launched %v, drops root %v: -sandbox %s", c.launched, c.dropsRoot, got)
		}
	}
}

// A template's RAM is a file it maps shared; a clone maps the same file
// private, and boots with the same devices (and the kernel option ROM).
func TestMemoryBackendArgs(t *testing.T) {
	t.Parallel()
	spec := vmm.Spec{ID: "vm-1", Dir: "/d", Kernel: "/k", Initrd: "/i", Cmdline: "c", MemoryMiB: 256, VCPUs: 1}
	joined := func(m memory) string { return strings.Join(New(Options{}).args(spec, m, false, false), " ") }
	tpl := joined(memory{file: "/t/memory", shared: true})
	if !strings.Contains(tpl, "memory-backend-file,id=ram0,size=256M,mem-path=/t/memory,share=on") || !strings.Contains(tpl, "-machine q35,memory-backend=ram0") {
		t.Errorf("template args: %s", tpl)
	}
	clone := joined(memory{file: "/t/memory"})
	if !strings.Contains(clone, "mem-path=/t/memory,share=off") || !strings.Contains(clone, "-kernel /k") {
		t.Errorf("clone args: %s", clone)
	}
	// Anonymous RAM is the same object, so any machine's state loads
	// into any other's.
	if plain := joined(memory{}); !strings.Contains(plain, "-object memory-backend-ram,id=ram0,size=256M ") || !strings.Contains(plain, "-machine q35,memory-backend=ram0 ") || strings.Contains(plain, "mem-path") {
		t.Errorf("a machine of its own: %s", plain)
	}
}

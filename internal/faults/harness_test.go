//go:build faults

package faults

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/smolvm/smolvm/internal/datadir"
	"github.com/smolvm/smolvm/internal/testenv"
)

// The smolvm binary, built once for every case.
var built struct {
	once sync.Once
	bin  string
	err  error
}

func smolvmBin(t *testing.T) string {
	t.Helper()
	built.once.Do(func() {
		dir, err := os.MkdirTemp("", "smolvm-faults-bin-")
		if err != nil {
			built.err = err
			return
		}
		built.bin = filepath.Join(dir, "smolvm")
		cmd := exec.Command("go", "build", "-o", built.bin, "./cmd/smolvm")
		cmd.Dir = testenv.RepoRoot()
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			built.err = fmt.Errorf("build smolvm: %v\n%s", err, out)
		}
	})
	if built.err != nil {
		t.Fatal(built.err)
	}
	return built.bin
}

// host is one data directory and the smolvm servers run on it, one after
// another, as a user would run them.
type host struct {
	t    *testing.T // the case now running, which failures go to
	root *testing.T // the test that owns the host, which cleanups go to
	d    datadir.Dir
	env  []string
	srv  *server
}

// newHost makes a data directory of the case's own at dir ("" for a new
// temporary one): the machine's kernel and initramfs are linked in, and
// so is each prepared image, inside an image directory of its own so that
// what a case pulls or leaves behind is its alone.
func newHost(t *testing.T, dir string, env ...string) *host {
	t.Helper()
	shared := testenv.Require(t)
	if dir == "" {
		var err error
		// Short: sockets under it must fit in 107 bytes.
		dir, err = os.MkdirTemp("", "smolvm-f")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.RemoveAll(dir) })
	}
	d := datadir.Dir(dir)
	for _, link := range [][2]string{{shared.Kernels(), d.Kernels()}, {shared.Initramfs(), d.Initramfs()}} {
		if err := os.Symlink(link[0], link[1]); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.MkdirAll(d.Images(), 0o755); err != nil {
		t.Fatal(err)
	}
	entries, err := os.ReadDir(shared.Images())
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if err := os.Symlink(filepath.Join(shared.Images(), e.Name()), filepath.Join(d.Images(), e.Name())); err != nil {
			t.Fatal(err)
		}
	}
	h := &host{t: t, root: t, d: d}
	h.env = append(append(os.Environ(), testenv.Env(t)...), "SMOLVM_DATA_DIR="+dir, "SMOLVM_URL=", "SMOLVM_TOKEN=")
	h.env = append(h.env, env...)
	// Registered before any server's own cleanup, so it runs after them:
	// a failed case must not leave VMs running.
	t.Cleanup(func() { killUnder(dir) })
	return h
}

// server is one `smolvm server start` process.
type server struct {
	t    *testing.T
	cmd  *exec.Cmd
	url  string
	log  *syncBuffer
	done chan struct{}
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// start runs a server on the host's data directory and waits until it
// listens. Its log is shown if the case fails.
func (h *host) start(args ...string) *server {
	h.t.Helper()
	cmd := exec.Command(smolvmBin(h.t), append([]string{"server", "start", "--host", "127.0.0.1", "--port", "0", "--quiet"}, args...)...)
	cmd.Env = h.env
	out, err := cmd.StdoutPipe()
	if err != nil {
		h.t.Fatal(err)
	}
	s := &server{t: h.t, cmd: cmd, log: &syncBuffer{}, done: make(chan struct{})}
	cmd.Stderr = s.log
	if err := cmd.Start(); err != nil {
		h.t.Fatal(err)
	}
	go func() { cmd.Wait(); close(s.done) }()
	root := h.root
	root.Cleanup(func() {
		s.kill()
		if root.Failed() {
			root.Logf("server %d log:\n%s", cmd.Process.Pid, s.log.String())
		}
	})
	urls := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			if u, ok := strings.CutPrefix(sc.Text(), "SmolVM HTTP API listening on "); ok {
				urls <- u
			}
		}
		io.Copy(io.Discard, out)
	}()
	select {
	case s.url = <-urls:
	case <-s.done:
		h.t.Fatalf("server exited at start:\n%s", s.log.String())
	case <-time.After(60 * time.Second):
		h.t.Fatalf("server did not listen within 60 s:\n%s", s.log.String())
	}
	h.srv = s
	return s
}

// in makes t the case that the host's checks report to, until the
// returned function is called.
func (h *host) in(t *testing.T) func() {
	prev := h.t
	h.t = t
	if h.srv != nil {
		h.srv.t = t
	}
	return func() {
		h.t = prev
		if h.srv != nil {
			h.srv.t = prev
		}
	}
}

// kill ends the server with SIGKILL, as a crash or the OOM killer would,
// and waits until it is gone.
func (s *server) kill() {
	select {
	case <-s.done:
		return
	default:
	}
	s.cmd.Process.Signal(syscall.SIGKILL)
	<-s.done
}

// restart kills the running server and starts a new one.
func (h *host) restart(args ...string) *server {
	h.t.Helper()
	h.srv.kill()
	return h.start(args...)
}

// call sends a JSON request and decodes a JSON answer into out (when not
// nil), returning the status code.
func (s *server) call(method, path string, body, out any) int {
	s.t.Helper()
	code, err := s.try(context.Background(), method, path, body, out)
	var se *statusError
	if err != nil && !errors.As(err, &se) {
		s.t.Fatalf("%s %s: %v", method, path, err)
	}
	return code
}

func (s *server) try(ctx context.Context, method, path string, body, out any, header ...string) (int, error) {
	var r io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return 0, err
		}
		r = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, s.url+path, r)
	if err != nil {
		return 0, err
	}
	req.Header.Set("Content-Type", "application/json")
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Set(header[i], header[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return resp.StatusCode, err
	}
	if out != nil && len(b) > 0 && (resp.StatusCode < 400 || isProblem(out)) {
		if err := json.Unmarshal(b, out); err != nil {
			return resp.StatusCode, fmt.Errorf("decode %s: %w", b, err)
		}
	}
	if p, ok := out.(*problem); ok {
		p.raw = string(b)
	}
	if resp.StatusCode >= 400 && !isProblem(out) {
		// The problem is the only thing the caller can learn from.
		return resp.StatusCode, &statusError{body: string(b)}
	}
	return resp.StatusCode, nil
}

func isProblem(v any) bool { _, ok := v.(*problem); return ok }

// statusError carries the body of an answer that is not a success.
type statusError struct{ body string }

func (e *statusError) Error() string { return e.body }

// sandbox is the part of the API's sandbox that the cases look at.
type sandbox struct {
	ID     string `json:"id"`
	Status string `json:"status"`
	PID    int    `json:"pid"`
	Error  string `json:"error"`
	Boot   string `json:"boot"`
	// Warnings say why a create booted cold.
	Warnings []string `json:"warnings"`
}

type problem struct {
	Code   string `json:"code"`
	Detail string `json:"detail"`
	raw    string
}

type execResult struct {
	ExitCode int    `json:"exit_code"`
	Stdout   string `json:"stdout"`
	Stderr   string `json:"stderr"`
	TimedOut bool   `json:"timed_out"`
}

// shape is what every case creates: small, so several boot at once on a
// small machine, and one template serves them all.
var shape = map[string]any{"memory": 256}

func (s *server) create() sandbox {
	s.t.Helper()
	var sb sandbox
	if code := s.call("POST", "/sandboxes", shape, &sb); code != http.StatusOK && code != http.StatusCreated {
		s.t.Fatalf("create: %d %+v", code, sb)
	}
	if sb.Status != "running" {
		s.t.Fatalf("create: sandbox %s is %s: %s", sb.ID, sb.Status, sb.Error)
	}
	return sb
}

// exec runs a command and fails the case unless it succeeds.
func (s *server) exec(id, command string) string {
	s.t.Helper()
	var res execResult
	var p problem
	code, err := s.try(context.Background(), "POST", "/sandboxes/"+id+"/exec", map[string]any{"command": command, "timeout": 60}, &res)
	if err != nil || code != http.StatusOK || res.ExitCode != 0 {
		s.try(context.Background(), "GET", "/sandboxes/"+id, nil, &p)
		s.t.Fatalf("exec %q in %s: %d %v %+v (sandbox: %s)", command, id, code, err, res, p.raw)
	}
	return res.Stdout
}

// answers checks that each sandbox still runs commands.
func (s *server) answers(ids ...string) {
	s.t.Helper()
	for _, id := range ids {
		if got := s.exec(id, "echo alive"); got != "alive\n" {
			s.t.Fatalf("sandbox %s answered %q", id, got)
		}
	}
}

func (s *server) list() []sandbox {
	s.t.Helper()
	var out struct {
		Sandboxes []sandbox `json:"sandboxes"`
	}
	if code := s.call("GET", "/sandboxes", nil, &out); code != http.StatusOK {
		s.t.Fatalf("list: %d", code)
	}
	return out.Sandboxes
}

func (s *server) get(id string) (sandbox, int) {
	s.t.Helper()
	var sb sandbox
	code, err := s.try(context.Background(), "GET", "/sandboxes/"+id, nil, &sb)
	if code == 0 || code == http.StatusOK && err != nil {
		s.t.Fatalf("get %s: %d %v", id, code, err)
	}
	return sb, code
}

func (s *server) delete(id string) {
	s.t.Helper()
	var p problem
	if code := s.call("DELETE", "/sandboxes/"+id, nil, &p); code != http.StatusNoContent && code != http.StatusOK {
		s.t.Fatalf("delete %s: %d %s", id, code, p.raw)
	}
}

// proc is a host process that works for this host's data directory.
type proc struct {
	pid     int
	cmdline string
}

func (p proc) vmm() bool {
	return strings.Contains(strings.SplitN(p.cmdline, " ", 2)[0], "qemu-system")
}
func (p proc) net() bool { return strings.Contains(p.cmdline, "--dir=") }

// sandboxID is the sandbox whose directory the process names, if any.
func (p proc) sandboxID(d datadir.Dir) string {
	_, rest, ok := strings.Cut(p.cmdline, d.Sandboxes()+"/")
	if !ok {
		return ""
	}
	id, _, _ := strings.Cut(rest, "/")
	id, _, _ = strings.Cut(id, " ")
	id, _, _ = strings.Cut(id, ",")
	return id
}

func (p proc) String() string {
	c := p.cmdline
	if len(c) > 240 {
		c = c[:240] + "..."
	}
	return fmt.Sprintf("%d: %s", p.pid, c)
}

// procs are the processes whose command line names the data directory:
// VMMs and network processes (the server is told its directory through
// the environment, so it is not among them).
func (h *host) procs() []proc {
	var out []proc
	paths, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range paths {
		b, err := os.ReadFile(p)
		if err != nil || !bytes.Contains(b, []byte(h.d.Path()+"/")) {
			continue
		}
		pid, _ := strconv.Atoi(filepath.Base(filepath.Dir(p)))
		if st, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid)); err == nil {
			if i := bytes.LastIndexByte(st, ')'); i > 0 && i+2 < len(st) && st[i+2] == 'Z' {
				continue // exited, its parent has not reaped it yet
			}
		}
		out = append(out, proc{pid: pid, cmdline: strings.TrimSpace(string(bytes.ReplaceAll(b, []byte{0}, []byte{' '})))})
	}
	return out
}

// waitProc waits for a process of this host that match accepts, polling
// often so that a case can act on it while it starts.
func (h *host) waitProc(what string, match func(proc) bool) proc {
	h.t.Helper()
	deadline := time.Now().Add(3 * time.Minute)
	for time.Now().Before(deadline) {
		for _, p := range h.procs() {
			if match(p) {
				return p
			}
		}
		time.Sleep(2 * time.Millisecond)
	}
	h.t.Fatalf("no %s appeared within 3 minutes", what)
	return proc{}
}

// consistent checks what the server reports against the host: each
// process of the data directory belongs to a sandbox listed as running or
// paused, each listed running sandbox has its VMM, each sandbox directory
// belongs to a listed sandbox, and no template build or temporary file
// is left. It returns the list.
func (h *host) consistent() []sandbox {
	h.t.Helper()
	list := h.srv.list()
	byID := map[string]sandbox{}
	for _, sb := range list {
		byID[sb.ID] = sb
	}
	// A process ends a moment after the server stops it: look again
	// before calling it left behind.
	var stray []proc
	for try := 0; try < 100; try++ {
		stray = stray[:0]
		for _, p := range h.procs() {
			sb, ok := byID[p.sandboxID(h.d)]
			if !ok || (sb.Status != "running" && sb.Status != "paused") {
				stray = append(stray, p)
			}
		}
		if len(stray) == 0 {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if len(stray) > 0 {
		h.t.Errorf("processes left behind (list: %+v):\n%s", list, procList(stray))
	}
	for _, sb := range list {
		if sb.Status == "running" && !alive(sb.PID) {
			h.t.Errorf("sandbox %s is listed running, but its VMM (pid %d) is gone", sb.ID, sb.PID)
		}
	}
	dirs, _ := os.ReadDir(h.d.Sandboxes())
	for _, e := range dirs {
		if _, ok := byID[e.Name()]; !ok {
			h.t.Errorf("sandbox directory %s belongs to no listed sandbox", e.Name())
		}
	}
	builds, _ := filepath.Glob(filepath.Join(h.d.Templates(), ".b*"))
	if len(builds) > 0 {
		h.t.Errorf("template builds left behind: %v", builds)
	}
	if tmp, _ := os.ReadDir(h.d.Tmp()); len(tmp) > 0 {
		h.t.Errorf("temporary files left behind: %v", names(tmp))
	}
	return list
}

// clean deletes every sandbox and checks that nothing of them is left:
// no process, no directory, no control group.
func (h *host) clean() {
	h.t.Helper()
	list := h.srv.list()
	for _, sb := range list {
		h.srv.delete(sb.ID)
	}
	if left := h.srv.list(); len(left) > 0 {
		h.t.Errorf("sandboxes still listed after deleting each: %+v", left)
	}
	if p := h.procs(); len(p) > 0 {
		h.t.Errorf("processes left after deleting every sandbox:\n%s", procList(p))
	}
	if dirs, _ := os.ReadDir(h.d.Sandboxes()); len(dirs) > 0 {
		h.t.Errorf("sandbox directories left after deleting every sandbox: %v", names(dirs))
	}
	for _, sb := range list {
		groups, _ := filepath.Glob("/sys/fs/cgroup/*/smolvm/" + sb.ID + ".*")
		groups2, _ := filepath.Glob("/sys/fs/cgroup/smolvm/" + sb.ID + ".*")
		if g := append(groups, groups2...); len(g) > 0 {
			h.t.Errorf("control groups left after deleting %s: %v", sb.ID, g)
		}
	}
}

func procList(ps []proc) string {
	var b strings.Builder
	for _, p := range ps {
		fmt.Fprintln(&b, " ", p)
	}
	return b.String()
}

func names(es []os.DirEntry) []string {
	var out []string
	for _, e := range es {
		out = append(out, e.Name())
	}
	slices.Sort(out)
	return out
}

func alive(pid int) bool {
	if pid <= 0 {
		return false
	}
	st, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	i := bytes.LastIndexByte(st, ')')
	return i > 0 && i+2 < len(st) && st[i+2] != 'Z'
}

// killUnder kills whatever still runs for dir when a case ends: a failed
// case must not leave VMs behind for the next.
func killUnder(dir string) {
	h := &host{d: datadir.Dir(dir)}
	for _, p := range h.procs() {
		syscall.Kill(p.pid, syscall.SIGKILL)
	}
}

// stopProc freezes a process with SIGSTOP: a VMM frozen while it starts
// holds the server in the middle of a create, for as long as a case needs.
func stopProc(t *testing.T, p proc) {
	t.Helper()
	if err := syscall.Kill(p.pid, syscall.SIGSTOP); err != nil {
		t.Fatalf("stop %s: %v", p, err)
	}
}

// allocatedBytes is what a file takes on disk (sparse files take less
// than their size).
func allocatedBytes(info os.FileInfo) int64 {
	if st, ok := info.Sys().(*syscall.Stat_t); ok {
		return st.Blocks * 512
	}
	return info.Size()
}

package api

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"regexp"
	"slices"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/smolvm/smolvm/internal/datadir"
	"github.com/smolvm/smolvm/internal/sandbox"
	"github.com/smolvm/smolvm/internal/testenv"
)

// childServerEnv makes the test binary serve the API on a data directory
// instead of running tests, so a test can kill a real server process.
const childServerEnv = "SMOLVM_API_TEST_SERVE_DATA_DIR"

func TestMain(m *testing.M) {
	if d := os.Getenv(childServerEnv); d != "" {
		if err := serveChild(datadir.Dir(d)); err != nil {
			fmt.Fprintln(os.Stderr, "child server:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(testenv.Main(m))
}

// serveChild serves a Manager on d on a free loopback port, announcing the
// address on stdout, until it is killed.
func serveChild(d datadir.Dir) error {
	ctx := context.Background()
	mgr, err := sandbox.Open(ctx, sandbox.Options{DataDir: d})
	if err != nil {
		return err
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	fmt.Printf("ADDR %s\n", ln.Addr())
	return http.Serve(ln, New(mgr, Options{Addr: ln.Addr().String()}))
}

var sandboxIDShape = regexp.MustCompile(`^vm-[0-9a-f]{8}$`)

// createSandbox sends the specification's create request (falling back to
// the default OS when this build cannot run ubuntu), or with noBody a bare
// POST that takes every default, and checks the shape of the answer.
func createSandbox(t *testing.T, base string, noBody bool) Sandbox {
	t.Helper()
	var r response
	if noBody {
		r = do(t, http.MethodPost, base+"/sandboxes", nil, nil)
	} else {
		r = do(t, http.MethodPost, base+"/sandboxes", `{"os":"ubuntu","memory":512,"disk_size":1024}`, nil)
	}
	if r.Status == http.StatusUnprocessableEntity || r.Status == http.StatusBadGateway {
		// Ubuntu comes from a registry; without a network (or a mirror)
		// the answer must say so, about the os field.
		if p := r.problem(t); (p.Code != CodeUnsupportedOS && p.Code != "registry_unreachable") || p.Field != "os" {
			t.Fatalf("create with os ubuntu: %s", r.Body)
		}
		t.Logf("ubuntu is not available here (%s); using the default OS", r.Body)
		r = do(t, http.MethodPost, base+"/sandboxes", `{"memory":512,"disk_size":1024}`, nil)
	}
	if r.Status != http.StatusCreated || r.ContentType != "application/json" {
		t.Fatalf("create: %d %s: %s", r.Status, r.ContentType, r.Body)
	}
	// The specification shows {"id": ..., "status": "running"}: those two
	// come first, then the other fields.
	if !regexp.MustCompile(`^\{"id":"vm-[0-9a-f]{8}","status":"running",`).Match(r.Body) {
		t.Errorf("create body does not start like the specification's: %s", r.Body)
	}
	var sb Sandbox
	if err := json.Unmarshal(r.Body, &sb); err != nil {
		t.Fatal(err)
	}
	if !sandboxIDShape.MatchString(sb.ID) || sb.Status != "running" || sb.Memory != 512 || sb.DiskSize != 1024 ||
		sb.VCPUs != sandbox.DefaultVCPUs || sb.Backend != "qemu" || sb.CreatedAt.IsZero() {
		t.Errorf("create returned %+v", sb)
	}
	return sb
}

func execHTTP(t *testing.T, base, id string, body any) (ExecResult, response) {
	t.Helper()
	r := do(t, http.MethodPost, base+"/sandboxes/"+id+"/exec", body, nil)
	var res ExecResult
	if r.Status == http.StatusOK {
		if err := json.Unmarshal(r.Body, &res); err != nil {
			t.Fatalf("decode exec result %s: %v", r.Body, err)
		}
	}
	return res, r
}

// TestEndToEnd runs the specification's flow over real HTTP against real
// VMs: create, exec, list, get, delete, 404 after; then concurrency,
// timeouts and state errors on the same two sandboxes.
func TestEndToEnd(t *testing.T) {
	m := testenv.Manager(t)
	srv := testServer(t, m, Options{})
	base := srv.URL

	// Two creates at once, while lists keep answering: creating one sandbox
	// must not block requests about others.
	var wg sync.WaitGroup
	sbs := make([]Sandbox, 2)
	for i := range sbs {
		// The second has no body at all: a boot that outlasts huma's body
		// read deadline must not be cancelled by it.
		wg.Go(func() { sbs[i] = createSandbox(t, base, i == 1) })
	}
	var listDuringCreate []time.Duration
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	for waiting := true; waiting; {
		select {
		case <-done:
			waiting = false
		case <-time.After(200 * time.Millisecond):
			start := time.Now()
			if r := do(t, http.MethodGet, base+"/sandboxes", nil, nil); r.Status != http.StatusOK {
				t.Errorf("list during create: %d %s", r.Status, r.Body)
			}
			listDuringCreate = append(listDuringCreate, time.Since(start))
		}
	}
	if sbs[0].ID == "" || sbs[1].ID == "" {
		t.FailNow()
	}
	if len(listDuringCreate) > 0 {
		slices.Sort(listDuringCreate)
		worst := listDuringCreate[len(listDuringCreate)-1]
		t.Logf("%d lists during two creates: slowest %v", len(listDuringCreate), worst)
		if worst > 2*time.Second {
			t.Errorf("GET /sandboxes took %v while sandboxes were being created", worst)
		}
	}
	a, b := sbs[0], sbs[1]

	t.Run("spec exec", func(t *testing.T) {
		res, r := execHTTP(t, base, a.ID, `{"command":"python3 --version","timeout":30,"shell":"login"}`)
		if r.Status != http.StatusOK {
			t.Fatalf("exec: %d %s", r.Status, r.Body)
		}
		if !regexp.MustCompile(`^\{"exit_code":0,"stdout":"Python 3\.\d+\.\d+\\n","stderr":"",`).Match(r.Body) {
			t.Errorf("exec body does not have the specification's shape: %s", r.Body)
		}
		if res.ExitCode != 0 || !regexp.MustCompile(`^Python 3\.11\.\d+\n$`).MatchString(res.Stdout) || res.Stderr != "" {
			t.Errorf("python3 --version = %+v", res)
		}
	})

	t.Run("list and get", func(t *testing.T) {
		r := do(t, http.MethodGet, base+"/sandboxes", nil, nil)
		var list SandboxList
		if r.Status != http.StatusOK || json.Unmarshal(r.Body, &list) != nil {
			t.Fatalf("list: %d %s", r.Status, r.Body)
		}
		var ids []string
		for _, s := range list.Sandboxes {
			ids = append(ids, s.ID)
			if s.Status != "running" {
				t.Errorf("%s is %s", s.ID, s.Status)
			}
		}
		want := []string{a.ID, b.ID}
		sort.Strings(ids)
		sort.Strings(want)
		if !slices.Equal(ids, want) {
			t.Errorf("list ids %v, want %v", ids, want)
		}
		r = do(t, http.MethodGet, base+"/sandboxes/"+a.ID, nil, nil)
		var got Sandbox
		if r.Status != http.StatusOK || json.Unmarshal(r.Body, &got) != nil {
			t.Fatalf("get: %d %s", r.Status, r.Body)
		}
		if got.ID != a.ID || got.Status != "running" || !got.CreatedAt.Equal(a.CreatedAt) || got.PID == 0 {
			t.Errorf("get = %+v, created %+v", got, a)
		}
	})

	t.Run("exit code and shells", func(t *testing.T) {
		res, r := execHTTP(t, base, a.ID, map[string]any{"command": "echo out; echo err >&2; exit 3"})
		if r.Status != http.StatusOK || res.ExitCode != 3 || res.Stdout != "out\n" || res.Stderr != "err\n" {
			t.Errorf("non-zero exit: %d %s", r.Status, r.Body)
		}
		res, r = execHTTP(t, base, a.ID, map[string]any{"command": `printf '%s|' 'a b' "c"`, "shell": "raw"})
		if r.Status != http.StatusOK || res.Stdout != "a b|c|" {
			t.Errorf("raw shell: %d %s", r.Status, r.Body)
		}
		res, r = execHTTP(t, base, a.ID, map[string]any{"command": "no-such-command-here", "shell": "raw"})
		if r.Status == http.StatusInternalServerError || (r.Status == http.StatusOK && res.ExitCode == 0) {
			t.Errorf("missing program: %d %s", r.Status, r.Body)
		}
	})

	t.Run("concurrent exec", func(t *testing.T) {
		var wg sync.WaitGroup
		for i := range 10 {
			id := []string{a.ID, b.ID}[i%2]
			wg.Go(func() {
				cmd := fmt.Sprintf("sleep 0.5; echo %d-$(hostname); echo e%d >&2; exit %d", i, i, i%4)
				res, r := execHTTP(t, base, id, map[string]any{"command": cmd})
				if r.Status != http.StatusOK {
					t.Errorf("exec %d: %d %s", i, r.Status, r.Body)
					return
				}
				if !strings.HasPrefix(res.Stdout, fmt.Sprintf("%d-", i)) || res.Stderr != fmt.Sprintf("e%d\n", i) || res.ExitCode != i%4 {
					t.Errorf("exec %d on %s: %+v", i, id, res)
				}
			})
		}
		wg.Wait()
	})

	t.Run("timeout", func(t *testing.T) {
		start := time.Now()
		_, r := execHTTP(t, base, b.ID, `{"command":"echo started; echo warn >&2; sleep 60","timeout":2}`)
		if r.Status != http.StatusRequestTimeout {
			t.Fatalf("status %d, want 408: %s", r.Status, r.Body)
		}
		if elapsed := time.Since(start); elapsed > 20*time.Second {
			t.Errorf("timed-out exec took %v", elapsed)
		}
		var p CommandTimeoutProblem
		if err := json.Unmarshal(r.Body, &p); err != nil {
			t.Fatal(err)
		}
		if r.ContentType != "application/problem+json" || p.Code != CodeCommandTimeout || p.Status != 408 ||
			p.Timeout != 2 || p.Stdout != "started\n" || p.Stderr != "warn\n" || p.DurationMS < 1900 {
			t.Errorf("timeout problem: %s", r.Body)
		}
		// The sandbox keeps running.
		res, r := execHTTP(t, base, b.ID, map[string]any{"command": "echo alive"})
		if r.Status != http.StatusOK || res.Stdout != "alive\n" {
			t.Errorf("exec after timeout: %d %s", r.Status, r.Body)
		}
	})

	t.Run("latency", func(t *testing.T) {
		ctx := context.Background()
		measure := func(n int, f func()) time.Duration {
			d := make([]time.Duration, n)
			for i := range d {
				start := time.Now()
				f()
				d[i] = time.Since(start)
			}
			slices.Sort(d)
			return d[n/2]
		}
		listHTTP := measure(50, func() { do(t, http.MethodGet, base+"/sandboxes", nil, nil) })
		listLib := measure(50, func() { m.List(ctx) })
		execHTTPd := measure(15, func() { execHTTP(t, base, a.ID, `{"command":"true"}`) })
		execLib := measure(15, func() { m.Exec(ctx, a.ID, sandbox.ExecRequest{Command: "true"}) })
		t.Logf("medians: GET /sandboxes %v vs Manager.List %v (50 each); exec true over HTTP %v vs Manager.Exec %v (15 each)",
			listHTTP, listLib, execHTTPd, execLib)
	})

	t.Run("not running", func(t *testing.T) {
		if err := m.Stop(context.Background(), b.ID, 0); err != nil {
			t.Fatal(err)
		}
		_, r := execHTTP(t, base, b.ID, map[string]any{"command": "true"})
		if r.Status != http.StatusConflict || r.problem(t).Code != CodeSandboxNotRunning {
			t.Errorf("exec on stopped sandbox: %d %s", r.Status, r.Body)
		}
	})

	t.Run("delete", func(t *testing.T) {
		for _, sb := range []Sandbox{a, b} {
			r := do(t, http.MethodDelete, base+"/sandboxes/"+sb.ID, nil, nil)
			if r.Status != http.StatusNoContent || len(r.Body) != 0 {
				t.Errorf("delete %s: %d %s", sb.ID, r.Status, r.Body)
			}
			for _, req := range []struct {
				method, path string
				body         any
			}{
				{http.MethodGet, "/sandboxes/" + sb.ID, nil},
				{http.MethodDelete, "/sandboxes/" + sb.ID, nil},
				{http.MethodPost, "/sandboxes/" + sb.ID + "/exec", `{"command":"true"}`},
			} {
				r := do(t, req.method, base+req.path, req.body, nil)
				if r.Status != http.StatusNotFound || r.problem(t).Code != CodeSandboxNotFound {
					t.Errorf("%s %s after delete: %d %s", req.method, req.path, r.Status, r.Body)
				}
			}
		}
		r := do(t, http.MethodGet, base+"/sandboxes", nil, nil)
		if r.Status != http.StatusOK || string(r.Body) != `{"sandboxes":[]}`+"\n" {
			t.Errorf("list after delete: %d %s", r.Status, r.Body)
		}
	})
}

// TestManagerRefusals needs a Manager but no VM: what the Manager refuses
// comes back as the right 4xx.
func TestManagerRefusals(t *testing.T) {
	t.Parallel()
	m, err := sandbox.Open(context.Background(), sandbox.Options{DataDir: datadir.Dir(t.TempDir())})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	srv := testServer(t, m, Options{})

	tests := []struct {
		body  string
		code  string
		field string
	}{
		{`{"os":"windows"}`, CodeUnsupportedOS, "os"},
		{`{"backend":"firecracker"}`, CodeBackendUnavailable, "backend"},
		{`{"backend":"libkrun"}`, CodeBackendUnavailable, "backend"},
	}
	for _, tt := range tests {
		r := do(t, http.MethodPost, srv.URL+"/sandboxes", tt.body, nil)
		if r.Status != http.StatusUnprocessableEntity {
			t.Errorf("%s: status %d, want 422: %s", tt.body, r.Status, r.Body)
			continue
		}
		p := r.problem(t)
		if p.Code != tt.code || p.Field != tt.field {
			t.Errorf("%s: code %q field %q, want %q %q", tt.body, p.Code, p.Field, tt.code, tt.field)
		}
		if tt.field == "backend" && !strings.Contains(p.Detail, "qemu") {
			t.Errorf("%s: detail %q does not say what is available", tt.body, p.Detail)
		}
	}

	for _, req := range []struct {
		method, path string
		body         any
	}{
		{http.MethodGet, "/sandboxes/vm-00000000", nil},
		{http.MethodDelete, "/sandboxes/vm-00000000", nil},
		{http.MethodPost, "/sandboxes/vm-00000000/exec", `{"command":"true"}`},
	} {
		r := do(t, req.method, srv.URL+req.path, req.body, nil)
		if r.Status != http.StatusNotFound || r.problem(t).Code != CodeSandboxNotFound {
			t.Errorf("%s %s: %d %s", req.method, req.path, r.Status, r.Body)
		}
	}
	if r := do(t, http.MethodGet, srv.URL+"/sandboxes", nil, nil); r.Status != http.StatusOK || string(r.Body) != `{"sandboxes":[]}`+"\n" {
		t.Errorf("empty list: %d %s", r.Status, r.Body)
	}
}

// TestRestart kills a real server process with SIGKILL and serves the same
// data directory again: the sandbox is still listed, runs commands and can
// be deleted.
// startChild runs a real server process on d and returns it and its URL.
func startChild(t *testing.T, d datadir.Dir) (*exec.Cmd, string) {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	child := exec.Command(exe, "-test.run=^$")
	child.Env = append(append(os.Environ(), testenv.Env(t)...), childServerEnv+"="+d.Path())
	child.Stderr = os.Stderr
	stdout, err := child.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := child.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		child.Process.Kill()
		child.Wait()
	})
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil {
		t.Fatalf("child server did not start: %v", err)
	}
	return child, "http://" + strings.TrimSpace(strings.TrimPrefix(line, "ADDR "))
}

func TestRestart(t *testing.T) {
	d := testenv.DataDir(t)
	var m *sandbox.Manager
	t.Cleanup(func() {
		if m == nil {
			// The test stopped before its second Manager (which deletes
			// what is left) existed: VMs outlive their server, so remove
			// them here.
			testenv.ManagerAt(t, d)
		}
	})
	child, first := startChild(t, d)

	sb := createSandbox(t, first, false)
	if res, r := execHTTP(t, first, sb.ID, `{"command":"echo before > /tmp/mark; cat /tmp/mark"}`); r.Status != http.StatusOK || res.Stdout != "before\n" {
		t.Fatalf("exec before restart: %d %s", r.Status, r.Body)
	}

	// A forward to a server in the guest, which must outlive the server
	// process: the network is a process of its own, like the VM.
	r0 := do(t, http.MethodPost, first+"/sandboxes/"+sb.ID+"/ports", `{"guest":8000}`, nil)
	var fwd Port
	if r0.Status != http.StatusOK || json.Unmarshal(r0.Body, &fwd) != nil {
		t.Fatalf("expose before restart: %d %s", r0.Status, r0.Body)
	}
	serve := `{"command":"setsid -f python3 -c 'import socket\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\ns.bind((\"0.0.0.0\",8000))\ns.listen()\nwhile True:\n c,_=s.accept(); c.recv(1024); c.sendall(b\"HTTP/1.0 200 OK\\r\\n\\r\\nguest\\n\"); c.close()' </dev/null >/dev/null 2>&1"}`
	if res, r := execHTTP(t, first, sb.ID, serve); r.Status != http.StatusOK || res.ExitCode != 0 {
		t.Fatalf("start the guest server: %d %s", r.Status, r.Body)
	}

	if err := child.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	child.Wait()

	url := fmt.Sprintf("http://127.0.0.1:%d/", fwd.Host)
	var body string
	for deadline := time.Now().Add(30 * time.Second); ; {
		resp, err := http.Get(url)
		if err == nil {
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			body = string(b)
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the forward did not survive the server: %v", err)
		}
		time.Sleep(200 * time.Millisecond) // the guest server may still be starting
	}
	if body != "guest\n" {
		t.Fatalf("GET %s after the server was killed = %q", url, body)
	}

	m = testenv.ManagerAt(t, d)
	second := testServer(t, m, Options{}).URL

	r := do(t, http.MethodGet, second+"/sandboxes", nil, nil)
	var list SandboxList
	if r.Status != http.StatusOK || json.Unmarshal(r.Body, &list) != nil || len(list.Sandboxes) != 1 {
		t.Fatalf("list after restart: %d %s", r.Status, r.Body)
	}
	if got := list.Sandboxes[0]; got.ID != sb.ID || got.Status != "running" || len(got.Ports) != 1 || got.Ports[0] != fwd {
		t.Fatalf("after restart: %+v, want it running with port %+v", got, fwd)
	}
	res, r := execHTTP(t, second, sb.ID, `{"command":"cat /tmp/mark"}`)
	if r.Status != http.StatusOK || res.Stdout != "before\n" {
		t.Fatalf("exec after restart: %d %s", r.Status, r.Body)
	}
	if r := do(t, http.MethodDelete, second+"/sandboxes/"+sb.ID, nil, nil); r.Status != http.StatusNoContent {
		t.Fatalf("delete after restart: %d %s", r.Status, r.Body)
	}
	if r := do(t, http.MethodGet, second+"/sandboxes/"+sb.ID, nil, nil); r.Status != http.StatusNotFound {
		t.Fatalf("get after delete: %d %s", r.Status, r.Body)
	}
}

// A sandbox whose creating process is killed does not stay "creating"
// forever: the next process sees the creation was abandoned, reports it
// as an error with the reason, and Delete removes it.
func TestInterruptedCreate(t *testing.T) {
	// A registry that never answers keeps the create in its pull.
	stall := make(chan struct{})
	reg := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-stall:
		case <-r.Context().Done():
		}
	}))
	defer reg.Close()
	defer close(stall)
	d := testenv.DataDir(t)
	child, base := startChild(t, d)
	image := strings.TrimPrefix(reg.URL, "http://") + "/stalled/image:1"
	r := do(t, http.MethodPost, base+"/sandboxes", fmt.Sprintf(`{"image":%q}`, image), map[string]string{"Prefer": "respond-async"})
	var sb Sandbox
	if r.Status != http.StatusAccepted || json.Unmarshal(r.Body, &sb) != nil || sb.Status != "creating" {
		t.Fatalf("async create: %d %s", r.Status, r.Body)
	}
	if err := child.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	child.Wait()

	m := testenv.ManagerAt(t, d)
	second := testServer(t, m, Options{}).URL
	r = do(t, http.MethodGet, second+"/sandboxes/"+sb.ID, nil, nil)
	var got Sandbox
	if r.Status != http.StatusOK || json.Unmarshal(r.Body, &got) != nil {
		t.Fatalf("get after the creator died: %d %s", r.Status, r.Body)
	}
	if got.Status != "error" || !strings.Contains(got.Error, "interrupted") {
		t.Fatalf("after the creator died: status %q error %q, want error: interrupted", got.Status, got.Error)
	}
	if r := do(t, http.MethodDelete, second+"/sandboxes/"+sb.ID, nil, nil); r.Status != http.StatusNoContent {
		t.Fatalf("delete: %d %s", r.Status, r.Body)
	}
	if _, err := os.Stat(d.Sandbox(sb.ID)); !os.IsNotExist(err) {
		t.Fatalf("the sandbox's directory is still there: %v", err)
	}
}

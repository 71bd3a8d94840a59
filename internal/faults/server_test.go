//go:build faults

package faults

import (
	"archive/tar"
	"bytes"
	"context"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// createAsync asks for a sandbox and returns at once, while the server
// prepares and boots it.
func (s *server) createAsync(body map[string]any) sandbox {
	s.t.Helper()
	var sb sandbox
	code, err := s.try(context.Background(), "POST", "/sandboxes", body, &sb, "Prefer", "respond-async")
	if err != nil || code != http.StatusAccepted {
		s.t.Fatalf("create: %d %v %+v", code, err, sb)
	}
	return sb
}

// killDuringStart asks for a sandbox, freezes its VMM the moment it
// appears, kills the server and checks what the next one makes of it.
func (h *host) killDuringStart(body map[string]any) {
	h.t.Helper()
	sb := h.srv.createAsync(body)
	stopProc(h.t, h.waitProc("the new sandbox's VMM", func(p proc) bool { return p.vmm() && p.sandboxID(h.d) == sb.ID }))
	h.restart()
	h.interrupted(sb.ID)
}

// interrupted checks that a sandbox whose creation the server's death cut
// short is listed as failed with the reason, and deletes it.
func (h *host) interrupted(id string) {
	h.t.Helper()
	sb, code := h.srv.get(id)
	if code != http.StatusOK || sb.Status != "error" || !strings.Contains(sb.Error, "interrupted") {
		h.t.Errorf("sandbox %s after its creation was cut short: %d %+v", id, code, sb)
	}
	h.consistent()
	h.srv.delete(id)
}

// The server is killed (SIGKILL) in the middle of each kind of work; the
// next server finds every sandbox as it really is, ends what the dead
// one left half done, and serves the others as before.
func TestServerKilled(t *testing.T) {
	t.Parallel()
	reg := newGatedRegistry(t)
	h := newHost(t, "")
	h.start()

	// The first create of a shape builds its template with a cold boot.
	t.Run("during a template build", func(t *testing.T) {
		defer h.in(t)()
		sb := h.srv.createAsync(shape)
		stopProc(t, h.waitProc("template VMM", func(p proc) bool {
			return p.vmm() && strings.Contains(p.cmdline, h.d.Templates()+"/.b")
		}))
		h.restart()
		h.interrupted(sb.ID)
	})
	bystander := h.srv.create()
	h.srv.answers(bystander.ID)

	t.Run("during a restore", func(t *testing.T) {
		defer h.in(t)()
		h.killDuringStart(shape)
		h.srv.answers(bystander.ID)
	})

	t.Run("during an exec", func(t *testing.T) {
		defer h.in(t)()
		sb := h.srv.create()
		done := make(chan struct{})
		go func() {
			defer close(done)
			h.srv.try(context.Background(), "POST", "/sandboxes/"+sb.ID+"/exec", map[string]any{"command": "touch /tmp/started; sleep 20", "timeout": 60}, nil)
		}()
		for h.srv.exec(sb.ID, "test -e /tmp/started && echo yes || echo no") != "yes\n" {
			time.Sleep(20 * time.Millisecond)
		}
		h.restart()
		<-done
		h.consistent()
		h.srv.answers(sb.ID, bystander.ID)
		// The command whose caller is gone is ended with it, as a
		// command whose request is cancelled is.
		if out := h.srv.exec(sb.ID, "grep -lx sleep /proc/[0-9]*/comm || echo none"); out != "none\n" {
			t.Errorf("the command of the dead server's exec still runs: %q", out)
		}
		h.srv.delete(sb.ID)
	})

	t.Run("during a delete", func(t *testing.T) {
		defer h.in(t)()
		// Killed once the VM is gone and the files and record are being
		// removed: the delete was accepted, so it is finished.
		sb := h.srv.create()
		go h.srv.try(context.Background(), "DELETE", "/sandboxes/"+sb.ID, nil, nil)
		for alive(sb.PID) {
			time.Sleep(time.Millisecond)
		}
		h.restart()
		if got, code := h.srv.get(sb.ID); code != http.StatusNotFound {
			t.Errorf("a sandbox whose delete was under way is %d %+v after a restart, want 404", code, got)
		}
		h.consistent()
		// Killed as the request arrives: either outcome is fine, as long
		// as it is whole.
		sb = h.srv.create()
		go h.srv.try(context.Background(), "DELETE", "/sandboxes/"+sb.ID, nil, nil)
		time.Sleep(3 * time.Millisecond)
		h.restart()
		if _, code := h.srv.get(sb.ID); code == http.StatusOK {
			h.consistent()
			h.srv.delete(sb.ID)
		}
		h.consistent()
		h.srv.answers(bystander.ID)
	})

	t.Run("during an image pull", func(t *testing.T) {
		defer h.in(t)()
		ref := reg.push(t, "faults/busybox:1")
		sb := h.srv.createAsync(map[string]any{"image": ref, "memory": 256})
		reg.waitBlocked(t)
		h.restart()
		reg.open()
		h.interrupted(sb.ID)
		sb = h.srv.create2(map[string]any{"image": ref, "memory": 256})
		h.srv.answers(sb.ID)
		h.srv.delete(sb.ID)
	})

	t.Run("during a cold create", func(t *testing.T) {
		defer h.in(t)()
		// Mounting a host directory is the one create that boots cold.
		share := t.TempDir()
		h.restart("--allow-mount", share)
		h.killDuringStart(map[string]any{"memory": 256, "mounts": []map[string]any{{"host": share, "guest": "/mnt/share"}}})
		h.srv.answers(bystander.ID)
	})

	t.Run("VMM killed while commands run", func(t *testing.T) {
		defer h.in(t)()
		sb := h.srv.create()
		stop := runCommands(h.srv, sb.ID)
		time.Sleep(300 * time.Millisecond)
		syscall.Kill(sb.PID, syscall.SIGKILL)
		// Long enough for several commands to meet the dead VM.
		time.Sleep(time.Second)
		if n, errs := stop(); n == 0 || errs == 0 {
			t.Errorf("%d commands ran and %d failed around the kill", n, errs)
		}
		got, _ := h.srv.get(sb.ID)
		if got.Status != "stopped" || !strings.Contains(got.Error, "exited unexpectedly") {
			t.Errorf("sandbox whose VMM was killed: %+v", got)
		}
		h.consistent()
		h.srv.answers(bystander.ID)
		var started sandbox
		if code := h.srv.call("POST", "/sandboxes/"+sb.ID+"/start", nil, &started); code != http.StatusOK || started.Status != "running" {
			t.Fatalf("start after the VMM was killed: %d %+v", code, started)
		}
		h.srv.answers(sb.ID)
		h.srv.delete(sb.ID)
	})

	t.Run("network process killed while commands run", func(t *testing.T) {
		defer h.in(t)()
		sb := h.srv.create()
		var net proc
		for _, p := range h.procs() {
			if p.net() && p.sandboxID(h.d) == sb.ID {
				net = p
			}
		}
		if net.pid == 0 {
			t.Fatalf("sandbox %s has no network process:\n%s", sb.ID, procList(h.procs()))
		}
		stop := runCommands(h.srv, sb.ID)
		time.Sleep(300 * time.Millisecond)
		syscall.Kill(net.pid, syscall.SIGKILL)
		time.Sleep(300 * time.Millisecond)
		if n, errs := stop(); errs > 0 {
			t.Errorf("%d of %d commands failed when only the network process was killed", errs, n)
		}
		h.consistent()
		h.srv.answers(sb.ID, bystander.ID)
		var p problem
		if code := h.srv.call("POST", "/sandboxes/"+sb.ID+"/ports", map[string]any{"guest": 8080}, &p); code != http.StatusConflict || p.Code != "network_down" {
			t.Errorf("exposing a port without a network process: %d %s", code, p.raw)
		}
		// A stop and start brings the network back.
		if code := h.srv.call("POST", "/sandboxes/"+sb.ID+"/stop", nil, nil); code != http.StatusOK {
			t.Fatalf("stop: %d", code)
		}
		if code := h.srv.call("POST", "/sandboxes/"+sb.ID+"/start", nil, nil); code != http.StatusOK {
			t.Fatalf("start: %d", code)
		}
		if code := h.srv.call("POST", "/sandboxes/"+sb.ID+"/ports", map[string]any{"guest": 8080}, &p); code != http.StatusOK {
			t.Errorf("exposing a port after a restart: %d %s", code, p.raw)
		}
		h.srv.delete(sb.ID)
	})

	h.consistent()
	h.clean()
}

// runCommands runs commands in a sandbox one after another until the
// returned function is called, which reports how many ran and failed.
func runCommands(s *server, id string) func() (n, errs int) {
	var mu sync.Mutex
	var ran, failed int
	quit := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			select {
			case <-quit:
				return
			default:
			}
			var res execResult
			code, err := s.try(context.Background(), "POST", "/sandboxes/"+id+"/exec", map[string]any{"command": "echo x", "timeout": 30}, &res)
			mu.Lock()
			ran++
			if err != nil || code != http.StatusOK || res.Stdout != "x\n" {
				failed++
			}
			mu.Unlock()
		}
	}()
	return func() (int, int) {
		close(quit)
		<-done
		return ran, failed
	}
}

// create2 creates a sandbox from body and waits for it.
func (s *server) create2(body map[string]any) sandbox {
	s.t.Helper()
	var sb sandbox
	if code := s.call("POST", "/sandboxes", body, &sb); code != http.StatusOK && code != http.StatusCreated || sb.Status != "running" {
		s.t.Fatalf("create %v: %d %+v", body, code, sb)
	}
	return sb
}

// gatedRegistry is a registry served in this process whose blobs stop
// half way while it is closed, so a pull can be caught in the middle.
type gatedRegistry struct {
	host    string
	mu      sync.Mutex
	closed  bool
	blocked chan struct{} // a blob download is held
	gate    chan struct{} // closed when the registry opens
}

func newGatedRegistry(t *testing.T) *gatedRegistry {
	r := &gatedRegistry{closed: true, blocked: make(chan struct{}, 16), gate: make(chan struct{})}
	inner := registry.New(registry.Logger(log.New(io.Discard, "", 0)))
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		r.mu.Lock()
		closed := r.closed
		r.mu.Unlock()
		if !closed || req.Method != http.MethodGet || !strings.Contains(req.URL.Path, "/blobs/") {
			inner.ServeHTTP(w, req)
			return
		}
		rec := httptest.NewRecorder()
		inner.ServeHTTP(rec, req)
		body := rec.Body.Bytes()
		if rec.Code != http.StatusOK || len(body) < 4096 {
			for k, v := range rec.Header() {
				w.Header()[k] = v
			}
			w.WriteHeader(rec.Code)
			w.Write(body)
			return
		}
		for k, v := range rec.Header() {
			w.Header()[k] = v
		}
		w.WriteHeader(http.StatusOK)
		w.Write(body[:len(body)/2])
		w.(http.Flusher).Flush()
		select {
		case r.blocked <- struct{}{}:
		default:
		}
		select {
		case <-r.gate:
		case <-req.Context().Done():
		}
	}))
	t.Cleanup(srv.Close)
	r.host = strings.TrimPrefix(srv.URL, "http://")
	return r
}

// push stores a small busybox image and returns its reference.
func (r *gatedRegistry) push(t *testing.T, repo string) string {
	t.Helper()
	bb, err := os.ReadFile("/bin/busybox")
	if err != nil {
		t.Fatalf("Debian's busybox-static is needed for the test image (scripts/test.sh installs it): %v", err)
	}
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	add := func(h *tar.Header, body []byte) {
		h.Size = int64(len(body))
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		tw.Write(body)
	}
	add(&tar.Header{Name: "bin/", Mode: 0o755, Typeflag: tar.TypeDir}, nil)
	add(&tar.Header{Name: "bin/busybox", Mode: 0o755, Typeflag: tar.TypeReg}, bb)
	for _, applet := range []string{"sh", "echo", "sleep", "test", "touch", "pgrep", "cat", "true"} {
		add(&tar.Header{Name: "bin/" + applet, Mode: 0o777, Typeflag: tar.TypeSymlink, Linkname: "busybox"}, nil)
	}
	add(&tar.Header{Name: "etc/", Mode: 0o755, Typeflag: tar.TypeDir}, nil)
	add(&tar.Header{Name: "etc/passwd", Mode: 0o644, Typeflag: tar.TypeReg}, []byte("root:x:0:0:root:/root:/bin/sh\n"))
	add(&tar.Header{Name: "etc/group", Mode: 0o644, Typeflag: tar.TypeReg}, []byte("root:x:0:\n"))
	add(&tar.Header{Name: "root/", Mode: 0o700, Typeflag: tar.TypeDir}, nil)
	add(&tar.Header{Name: "tmp/", Mode: 0o1777, Typeflag: tar.TypeDir}, nil)
	tw.Close()
	b := buf.Bytes()
	l, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(b)), nil })
	if err != nil {
		t.Fatal(err)
	}
	img, err := mutate.AppendLayers(empty.Image, l)
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	cfg = cfg.DeepCopy()
	cfg.OS, cfg.Architecture = "linux", "amd64"
	cfg.Config.Env = []string{"PATH=/bin"}
	if img, err = mutate.ConfigFile(img, cfg); err != nil {
		t.Fatal(err)
	}
	ref, err := name.ParseReference(r.host+"/"+repo, name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	r.mu.Lock()
	r.closed = false
	r.mu.Unlock()
	err = remote.Write(ref, img)
	r.mu.Lock()
	r.closed = true
	r.mu.Unlock()
	if err != nil {
		t.Fatal(err)
	}
	return r.host + "/" + repo
}

// waitBlocked waits until a pull is held half way through a blob.
func (r *gatedRegistry) waitBlocked(t *testing.T) {
	t.Helper()
	select {
	case <-r.blocked:
	case <-time.After(2 * time.Minute):
		t.Fatal("no pull reached the registry within 2 minutes")
	}
}

// open lets every blob through from now on.
func (r *gatedRegistry) open() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		r.closed = false
		close(r.gate)
	}
}

package kubenode

import (
	"bufio"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http/httptest"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/virtual-kubelet/virtual-kubelet/node/api"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	utilexec "k8s.io/utils/exec"

	sapi "github.com/smolvm/smolvm/internal/api"
	"github.com/smolvm/smolvm/internal/sandbox"
	"github.com/smolvm/smolvm/internal/testenv"
)

func TestMain(m *testing.M) { os.Exit(testenv.Main(m)) }

// attach is kubectl exec's side of a command's streams.
type attach struct {
	stdin          io.Reader
	stdout, stderr strings.Builder
	mu             sync.Mutex
}

type lockedWriter struct {
	mu *sync.Mutex
	b  *strings.Builder
}

func (w lockedWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.Write(p)
}
func (w lockedWriter) Close() error { return nil }

func (a *attach) Stdin() io.Reader            { return a.stdin }
func (a *attach) Stdout() io.WriteCloser      { return lockedWriter{&a.mu, &a.stdout} }
func (a *attach) Stderr() io.WriteCloser      { return lockedWriter{&a.mu, &a.stderr} }
func (a *attach) TTY() bool                   { return false }
func (a *attach) Resize() <-chan api.TermSize { return nil }

// A pod becomes a running VM, answers exec, logs and port-forward, is
// adopted by a node started again, and its deletion removes the VM.
func TestPodLifecycle(t *testing.T) {
	t.Parallel()
	log := testLogger(t)
	m := testenv.Manager(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	p, err := NewProvider(ctx, m, "node-a", "127.0.0.1", log)
	if err != nil {
		t.Fatal(err)
	}
	updates := make(chan *corev1.Pod, 64)
	p.NotifyPods(ctx, func(pod *corev1.Pod) { updates <- pod })

	pod := testPod(func(p *corev1.Pod) {
		p.Annotations = map[string]string{AnnotationOS: "debian"}
		c := &p.Spec.Containers[0]
		c.Resources.Limits = corev1.ResourceList{corev1.ResourceMemory: resource.MustParse("384Mi")}
		c.Ports = []corev1.ContainerPort{{ContainerPort: 8080}}
		c.Env = []corev1.EnvVar{{Name: "GREETING", Value: "hello from the pod"}}
		c.Command = []string{"sh", "-c"}
		c.Args = []string{`mkdir -p /srv && echo "$GREETING" > /srv/index.html && echo main started && exec python3 -m http.server 8080 --directory /srv`}
	})
	if err := p.CreatePod(ctx, pod); err != nil {
		t.Fatal(err)
	}
	running := waitPhase(t, updates, corev1.PodRunning)
	if running.Status.PodIP != "127.0.0.1" || len(running.Status.ContainerStatuses) != 1 || !running.Status.ContainerStatuses[0].Ready {
		t.Errorf("running pod's status: %+v", running.Status)
	}
	id := strings.TrimPrefix(running.Status.ContainerStatuses[0].ContainerID, "smolvm://")
	info, err := m.Get(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	if info.MemoryMiB != 384 || info.Labels[LabelUID] != "uid-1" || len(info.Ports) != 1 || info.Ports[0].Guest != 8080 {
		t.Errorf("the pod's sandbox: %d MiB, labels %v, ports %+v", info.MemoryMiB, info.Labels, info.Ports)
	}

	// exec: input in, output out, exit status back.
	a := &attach{stdin: strings.NewReader("through stdin\n")}
	if err := p.RunInContainer(ctx, "team", "web", "main", []string{"sh", "-c", "cat; echo to stderr >&2; echo $GREETING"}, a); err != nil {
		t.Fatalf("exec: %v", err)
	}
	if a.stdout.String() != "through stdin\nhello from the pod\n" || a.stderr.String() != "to stderr\n" {
		t.Errorf("exec wrote %q and %q", a.stdout.String(), a.stderr.String())
	}
	err = p.RunInContainer(ctx, "team", "web", "main", []string{"sh", "-c", "exit 3"}, &attach{})
	var exit utilexec.CodeExitError
	if !errors.As(err, &exit) || exit.Code != 3 {
		t.Errorf("exec of exit 3: %v, want exit code 3", err)
	}
	// A command that ends while the caller's stdin is still open ends
	// the exec (kubectl exec -i on a terminal).
	stdin, keepOpen := io.Pipe()
	defer keepOpen.Close()
	open := &attach{stdin: stdin}
	done := make(chan error, 1)
	go func() { done <- p.RunInContainer(ctx, "team", "web", "main", []string{"echo", "bye"}, open) }()
	select {
	case err := <-done:
		if err != nil || open.stdout.String() != "bye\n" {
			t.Errorf("exec with stdin left open: %q, %v", open.stdout.String(), err)
		}
	case <-time.After(2 * time.Minute):
		t.Fatalf("exec did not return once its command ended, its stdin still open")
	}
	if err := p.RunInContainer(ctx, "team", "nope", "main", []string{"true"}, &attach{}); err == nil {
		t.Errorf("exec in a pod the node does not run succeeded")
	}

	// The sandbox's own API, as the gateway reaches it: by pod.
	sandboxAPI := p.sandboxAPI(sapi.New(m, sapi.Options{}))
	call := func(method, path, body string) (int, string) {
		req := httptest.NewRequest(method, path, strings.NewReader(body))
		req.Host = "127.0.0.1:10250"
		req.Header.Set("Content-Type", "application/json")
		rec := httptest.NewRecorder()
		sandboxAPI.ServeHTTP(rec, req)
		return rec.Code, rec.Body.String()
	}
	if code, body := call("POST", SandboxAPIPrefix+"team/web/exec", `{"command":"echo $GREETING"}`); code != 200 || !strings.Contains(body, `"stdout":"hello from the pod\n"`) {
		t.Errorf("exec through the sandbox API: %d %s", code, body)
	}
	if code, body := call("GET", SandboxAPIPrefix+"team/web", ""); code != 200 || !strings.Contains(body, `"id":"`+id+`"`) {
		t.Errorf("the sandbox through the sandbox API: %d %s", code, body)
	}
	if code, body := call("POST", SandboxAPIPrefix+"team/web/stop", ""); code != 501 || !strings.Contains(body, "not_supported_in_cluster") {
		t.Errorf("stop through the sandbox API: %d %s", code, body)
	}
	if code, body := call("DELETE", SandboxAPIPrefix+"team/web", ""); code != 405 || !strings.Contains(body, "method_not_allowed") {
		t.Errorf("delete through the sandbox API: %d %s", code, body)
	}
	if code, body := call("POST", SandboxAPIPrefix+"team/nope/exec", `{"command":"true"}`); code != 404 || !strings.Contains(body, "sandbox_not_found") {
		t.Errorf("exec in a pod the node does not run: %d %s", code, body)
	}

	// port-forward reaches the container's server; logs are its output.
	var page string
	for deadline := time.Now().Add(60 * time.Second); time.Now().Before(deadline); time.Sleep(500 * time.Millisecond) {
		if page, err = forwardGET(ctx, p, 8080); err == nil && strings.Contains(page, "hello from the pod") {
			break
		}
	}
	if !strings.Contains(page, "hello from the pod") {
		t.Errorf("port-forward to 8080: %q, %v", page, err)
	}
	logs, err := p.GetContainerLogs(ctx, "team", "web", "main", api.ContainerLogOpts{})
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(logs)
	if !strings.Contains(string(b), "main started") {
		t.Errorf("logs: %q, want the command's output", b)
	}

	// A node started again holds the pod with its sandbox.
	p2, err := NewProvider(ctx, m, "node-a", "127.0.0.1", log)
	if err != nil {
		t.Fatal(err)
	}
	pods, err := p2.GetPods(ctx)
	if err != nil || len(pods) != 1 || pods[0].UID != "uid-1" || pods[0].Namespace != "team" || pods[0].Name != "web" {
		t.Fatalf("pods adopted: %v, %v", pods, err)
	}
	if st, err := p2.GetPodStatus(ctx, "team", "web"); err != nil || st.Phase != corev1.PodRunning {
		t.Errorf("adopted pod's status: %+v, %v", st, err)
	}
	other, err := NewProvider(ctx, m, "node-b", "127.0.0.1", log)
	if err != nil {
		t.Fatal(err)
	}
	if pods, _ := other.GetPods(ctx); len(pods) != 0 {
		t.Errorf("another node adopted %d pods", len(pods))
	}

	// A pod no VM can run fails at once, with no sandbox made.
	bad := testPod(func(p *corev1.Pod) {
		p.Name = "two"
		p.Spec.Containers = append(p.Spec.Containers, p.Spec.Containers[0])
	})
	if err := p.CreatePod(ctx, bad); err != nil {
		t.Fatal(err)
	}
	if failed := waitPhase(t, updates, corev1.PodFailed); failed.Name != "two" || failed.Status.Reason != "InvalidSmolvmPod" {
		t.Errorf("invalid pod: %s %s %s", failed.Name, failed.Status.Reason, failed.Status.Message)
	}
	if infos, _ := m.List(ctx); len(infos) != 1 {
		t.Errorf("%d sandboxes after an invalid pod, want 1", len(infos))
	}

	if err := p.DeletePod(ctx, pod); err != nil {
		t.Fatal(err)
	}
	gone := waitPhase(t, updates, corev1.PodSucceeded)
	if cs := gone.Status.ContainerStatuses; len(cs) != 1 || cs[0].State.Terminated == nil {
		t.Errorf("deleted pod's status: %+v", gone.Status)
	}
	if _, err := m.Get(ctx, id); err == nil {
		t.Errorf("sandbox %s still exists after its pod was deleted", id)
	}
	if _, err := p.GetPod(ctx, "team", "web"); err == nil {
		t.Errorf("the node still holds the deleted pod")
	}

	// A pod of the same name with another uid, made while the node was
	// down, is another pod: it gets a sandbox of its own.
	again := pod.DeepCopy()
	again.UID = "uid-2"
	if err := p2.UpdatePod(ctx, again); err != nil {
		t.Fatal(err)
	}
	renewed, err := p2.GetPod(ctx, "team", "web")
	if err != nil {
		t.Fatal(err)
	}
	id2 := strings.TrimPrefix(renewed.Status.ContainerStatuses[0].ContainerID, "smolvm://")
	if renewed.UID != "uid-2" || id2 == id {
		t.Fatalf("the pod made again: uid %s, sandbox %s (the old one was %s)", renewed.UID, id2, id)
	}
	var info2 sandbox.Info
	for deadline := time.Now().Add(3 * time.Minute); time.Now().Before(deadline); time.Sleep(time.Second) {
		if info2, err = m.Get(ctx, id2); err != nil || info2.Status != sandbox.StatusCreating {
			break
		}
	}
	if err != nil || info2.Status != sandbox.StatusRunning || info2.Labels[LabelUID] != "uid-2" {
		t.Errorf("the new pod's sandbox: %+v, %v", info2, err)
	}
	if err := p2.DeletePod(ctx, again); err != nil {
		t.Fatal(err)
	}
	if _, err := m.Get(ctx, id2); err == nil {
		t.Errorf("sandbox %s still exists after its pod was deleted", id2)
	}
}

// forwardGET asks the pod's port for / through PortForward.
func forwardGET(ctx context.Context, p *Provider, port int32) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	here, there := net.Pipe()
	errc := make(chan error, 1)
	go func() { errc <- p.PortForward(ctx, "team", "web", port, there) }()
	defer here.Close()
	here.SetDeadline(time.Now().Add(15 * time.Second))
	if _, err := io.WriteString(here, "GET / HTTP/1.0\r\n\r\n"); err != nil {
		return "", err
	}
	body, err := io.ReadAll(bufio.NewReader(here))
	if len(body) == 0 && err == nil {
		err = <-errc
	}
	return string(body), err
}

func waitPhase(t *testing.T, updates <-chan *corev1.Pod, phase corev1.PodPhase) *corev1.Pod {
	t.Helper()
	timeout := time.After(3 * time.Minute)
	for {
		select {
		case pod := <-updates:
			if pod.Status.Phase == phase {
				return pod
			}
			if pod.Status.Phase == corev1.PodFailed && phase != corev1.PodFailed {
				t.Fatalf("pod %s failed: %s %s", pod.Name, pod.Status.Reason, pod.Status.Message)
			}
		case <-timeout:
			t.Fatalf("no pod reached %s within 3 minutes", phase)
		}
	}
}

// testLogger logs to t until the test's cleanups have run: the
// provider's goroutines may still log a moment after.
func testLogger(t *testing.T) *slog.Logger {
	w := &testWriter{t: t}
	t.Cleanup(func() { w.done.Store(true) })
	return slog.New(slog.NewTextHandler(w, nil))
}

type testWriter struct {
	t    *testing.T
	done atomic.Bool
}

func (w *testWriter) Write(b []byte) (int, error) {
	if !w.done.Load() {
		w.t.Log(strings.TrimSuffix(string(b), "\n"))
	}
	return len(b), nil
}

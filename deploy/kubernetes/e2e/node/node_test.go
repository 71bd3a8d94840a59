//go:build linux

// Package node_test drives `smolvm node` through a real control plane:
// the smolvm binaries are built from the repository, and checked from
// outside through the Kubernetes API and the smolvm CLI.
package node_test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"crypto/tls"
	"encoding/json"

	corev1 "k8s.io/api/core/v1"
	nodev1 "k8s.io/api/node/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/tools/remotecommand"

	"github.com/smolvm/smolvm/deploy/kubernetes/e2e/cluster"
)

// node is one `smolvm node` process.
type node struct {
	name, addr string
	port       int
	data       string // its data directory
	kubeconfig string
	cmd        *exec.Cmd
	log        *os.File
	starts     int // how many times it became ready
}

// repoRoot is the smolvm repository this module lives in.
func repoRoot(t *testing.T) string {
	t.Helper()
	root, err := filepath.Abs(filepath.Join("..", "..", "..", ".."))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(root, "cmd", "smolvm")); err != nil {
		t.Fatalf("no smolvm repository at %s: %v", root, err)
	}
	return root
}

// binaries builds smolvm, its agent and network helper from the
// repository, as scripts/setup.sh does.
func binaries(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	cmd := exec.Command("go", "build", "-ldflags=-s -w", "-o", dir+"/", "./cmd/smolvm", "./cmd/smolvm-agent", "./cmd/smolvm-net", "./cmd/smolvm-jail")
	cmd.Dir = repoRoot(t)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("building smolvm: %v\n%s", err, b)
	}
	return dir
}

// dataDir is a data directory of the test's own that shares the machine's
// prepared kernel and images (scripts/setup.sh makes them).
func dataDir(t *testing.T) string {
	t.Helper()
	shared := os.Getenv("SMOLVM_DATA_DIR")
	if shared == "" {
		home, err := os.UserHomeDir()
		if err != nil {
			t.Fatal(err)
		}
		shared = filepath.Join(home, ".local", "share", "smolvm")
	}
	if _, err := os.Stat(filepath.Join(shared, "images")); err != nil {
		t.Fatalf("no prepared images in %s: run scripts/setup.sh first (%v)", shared, err)
	}
	// Sockets live under it and their paths are limited to 107 bytes:
	// keep it short rather than under t.TempDir().
	dir, err := os.MkdirTemp("", "smolvm-k8s")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	for _, sub := range []string{"kernels", "images", "initramfs"} {
		if err := os.Symlink(filepath.Join(shared, sub), filepath.Join(dir, sub)); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// smolvm runs the smolvm CLI on the node's data directory and decodes
// its --json answer's data into out.
func (n *node) smolvm(t *testing.T, bins string, out any, args ...string) error {
	t.Helper()
	// --json before any "--" that starts a command's own arguments.
	args = append(append(append([]string(nil), args[:2]...), "--json"), args[2:]...)
	cmd := exec.Command(filepath.Join(bins, "smolvm"), args...)
	cmd.Env = append(os.Environ(), "SMOLVM_DATA_DIR="+n.data)
	b, err := cmd.Output()
	var answer struct {
		OK    bool            `json:"ok"`
		Data  json.RawMessage `json:"data"`
		Error json.RawMessage `json:"error"`
	}
	if jerr := json.Unmarshal(b, &answer); jerr != nil {
		return fmt.Errorf("smolvm %v: %v %v: %s", args, err, jerr, b)
	}
	if !answer.OK {
		return fmt.Errorf("smolvm %v: %s", args, answer.Error)
	}
	if out != nil {
		return json.Unmarshal(answer.Data, out)
	}
	return nil
}

// vm is what the CLI says of a sandbox.
type vm struct {
	ID     string            `json:"id"`
	Memory int               `json:"memory"`
	Labels map[string]string `json:"labels"`
}

func (n *node) sandboxes(t *testing.T, bins string) []vm {
	t.Helper()
	var list struct{ Sandboxes []vm }
	if err := n.smolvm(t, bins, &list, "sandbox", "list"); err != nil {
		t.Fatal(err)
	}
	return list.Sandboxes
}

// clean deletes every sandbox the node left, once its process is gone.
func (n *node) clean(t *testing.T, bins string) {
	var list struct{ Sandboxes []vm }
	if err := n.smolvm(t, bins, &list, "sandbox", "list"); err != nil {
		t.Errorf("listing what the node left: %v", err)
		return
	}
	for _, v := range list.Sandboxes {
		if err := n.smolvm(t, bins, nil, "sandbox", "delete", v.ID); err != nil {
			t.Errorf("deleting %s: %v", v.ID, err)
		}
	}
}

func (n *node) start(t *testing.T, bins string, c *cluster.Cluster) {
	t.Helper()
	log, err := os.OpenFile(filepath.Join(c.LogDir, n.name+".log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	n.log = log
	n.cmd = exec.Command(filepath.Join(bins, "smolvm"), "node", "--kubeconfig", n.kubeconfig, "--name", n.name,
		"--address", n.addr, "--port", fmt.Sprint(n.port), "--client-ca", c.CACertPath,
		"--memory-mib", "8192", "--cpus", "2")
	n.cmd.Env = append(os.Environ(), "SMOLVM_DATA_DIR="+n.data)
	n.cmd.Stdout, n.cmd.Stderr = log, log
	n.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := n.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.stop(syscall.SIGTERM) })
	// Ready once it says so: its Node object may still read Ready from
	// the process before it.
	ready := fmt.Sprintf("smolvm node %s ready", n.name)
	waitFor(t, 2*time.Minute, ready, func() bool {
		b, _ := os.ReadFile(log.Name())
		return strings.Count(string(b), ready) > n.starts
	})
	n.starts++
}

// stop ends the node process (not its VMs).
func (n *node) stop(sig syscall.Signal) {
	if n.cmd == nil || n.cmd.Process == nil || n.cmd.ProcessState != nil {
		return
	}
	n.cmd.Process.Signal(sig)
	done := make(chan struct{})
	go func() { n.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		n.cmd.Process.Kill()
		<-done
	}
	n.log.Close()
}

// A pod of the smolvm RuntimeClass lands on the smolvm node, runs as a VM,
// answers exec and logs through the API server, outlives its node process,
// and is gone from the host when deleted, even while the node was down.
func TestNodeRunsPods(t *testing.T) {
	ctx := context.Background()
	c := cluster.Start(ctx, t, cluster.BinDir())
	cs := c.Clientset
	bins := binaries(t)

	applyNodeRBAC(ctx, t, cs)
	kubeconfig, err := c.NodeKubeconfig("smolvm-a")
	if err != nil {
		t.Fatal(err)
	}
	n := &node{name: "smolvm-a", addr: "127.0.0.2", port: freePort(t, "127.0.0.2"), data: dataDir(t), kubeconfig: kubeconfig}
	// Registered first, so it runs after the node process is stopped.
	t.Cleanup(func() { n.clean(t, bins) })
	n.start(t, bins, c)
	waitNodeReady(ctx, t, cs, n.name)

	got, err := cs.CoreV1().Nodes().Get(ctx, n.name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	// The node lifecycle controller's own taints (not-ready, until it
	// has seen the node ready) come and go on their own schedule.
	var ours []corev1.Taint
	for _, taint := range got.Spec.Taints {
		if !strings.HasPrefix(taint.Key, "node.kubernetes.io/") {
			ours = append(ours, taint)
		}
	}
	if got.Labels["smolvm.dev/node"] != "true" || len(ours) != 1 || ours[0].Key != "smolvm.dev/vm-only" || ours[0].Effect != corev1.TaintEffectNoSchedule {
		t.Errorf("node labels %v, taints %v", got.Labels, got.Spec.Taints)
	}
	if mem := got.Status.Allocatable[corev1.ResourceMemory]; mem.Value() != 8192<<20 {
		t.Errorf("allocatable memory %s, want 8Gi", mem.String())
	}

	runtimeClass(ctx, t, cs)
	ns := "vms"
	if _, err := cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	pod := vmPod("web")
	if _, err := cs.CoreV1().Pods(ns).Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	running := waitPod(ctx, t, cs, ns, "web", func(p *corev1.Pod) bool { return p.Status.Phase == corev1.PodRunning && podReady(p) })
	if running.Spec.NodeName != n.name || running.Status.PodIP != n.addr {
		t.Errorf("pod on %q with IP %q, want %s at %s", running.Spec.NodeName, running.Status.PodIP, n.name, n.addr)
	}

	// kubectl exec: through the API server to the node's kubelet API.
	stdout, stderr, err := execIn(ctx, c, ns, "web", []string{"sh", "-c", "cat; hostname >&2; echo $GREETING"}, "sent in\n")
	if err != nil || stdout != "sent in\nhello\n" || stderr == "" {
		t.Errorf("exec: %q %q %v", stdout, stderr, err)
	}
	if _, _, err := execIn(ctx, c, ns, "web", []string{"sh", "-c", "exit 7"}, ""); err == nil || !strings.Contains(err.Error(), "7") {
		t.Errorf("exec of exit 7: %v", err)
	}
	// kubectl logs: the container command's output.
	waitFor(t, time.Minute, "the command's output in the pod's logs", func() bool {
		b, err := cs.CoreV1().Pods(ns).GetLogs("web", &corev1.PodLogOptions{}).DoRaw(ctx)
		return err == nil && strings.Contains(string(b), "main started")
	})
	// An exec by someone the API server does not let in is refused by the
	// node itself.
	if code := kubeletStatus(t, n, "/containerLogs/vms/web/vm"); code != http.StatusUnauthorized {
		t.Errorf("an anonymous kubelet API request: %d, want 401", code)
	}

	sandboxes := n.sandboxes(t, bins)
	if len(sandboxes) != 1 {
		t.Fatalf("sandboxes on the node: %+v", sandboxes)
	}
	web := sandboxes[0]
	if web.Memory != 384 || web.Labels["smolvm.dev/pod-name"] != "web" {
		t.Errorf("the pod's sandbox: %d MiB, labels %v", web.Memory, web.Labels)
	}

	// The node process dies; the VM does not. A new one adopts it.
	n.stop(syscall.SIGKILL)
	if err := n.smolvm(t, bins, nil, "sandbox", "exec", web.ID, "--", "true"); err != nil {
		t.Errorf("the VM after its node process was killed: %v", err)
	}
	n.start(t, bins, c)
	waitNodeReady(ctx, t, cs, n.name)
	if stdout, _, err := execIn(ctx, c, ns, "web", []string{"echo", "adopted"}, ""); err != nil || stdout != "adopted\n" {
		t.Errorf("exec after the node restarted: %q %v", stdout, err)
	}
	if list := n.sandboxes(t, bins); len(list) != 1 || list[0].ID != web.ID {
		t.Errorf("sandboxes after the node restarted: %+v", list)
	}

	// Deleted while the node is down: the node deletes the VM when it
	// is back.
	n.stop(syscall.SIGKILL)
	zero := int64(0)
	if err := cs.CoreV1().Pods(ns).Delete(ctx, "web", metav1.DeleteOptions{GracePeriodSeconds: &zero}); err != nil {
		t.Fatal(err)
	}
	n.start(t, bins, c)
	waitFor(t, 2*time.Minute, "the deleted pod's VM to be deleted", func() bool {
		return len(n.sandboxes(t, bins)) == 0
	})

	// Deleted through the API while the node runs.
	if _, err := cs.CoreV1().Pods(ns).Create(ctx, vmPod("second"), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitPod(ctx, t, cs, ns, "second", func(p *corev1.Pod) bool { return p.Status.Phase == corev1.PodRunning })
	if err := cs.CoreV1().Pods(ns).Delete(ctx, "second", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 2*time.Minute, "the pod to be gone from the API", func() bool {
		_, err := cs.CoreV1().Pods(ns).Get(ctx, "second", metav1.GetOptions{})
		return apierrors.IsNotFound(err)
	})
	if list := n.sandboxes(t, bins); len(list) != 0 {
		t.Errorf("sandboxes after the pod was deleted: %+v", list)
	}
}

func vmPod(name string) *corev1.Pod {
	rc := "smolvm"
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Annotations: map[string]string{"smolvm.dev/os": "debian"}},
		Spec: corev1.PodSpec{
			RuntimeClassName: &rc,
			Containers: []corev1.Container{{
				Name:    "vm",
				Image:   "debian",
				Command: []string{"sh", "-c", "echo main started; exec sleep infinity"},
				Env:     []corev1.EnvVar{{Name: "GREETING", Value: "hello"}},
				Resources: corev1.ResourceRequirements{
					Limits: corev1.ResourceList{corev1.ResourceMemory: resource.MustParse("384Mi"), corev1.ResourceCPU: resource.MustParse("1")},
				},
			}},
		},
	}
}

// applyNodeRBAC grants smolvm nodes what docs/kubernetes.md says.
func applyNodeRBAC(ctx context.Context, t *testing.T, cs kubernetes.Interface) {
	t.Helper()
	role := &rbacv1.ClusterRole{
		ObjectMeta: metav1.ObjectMeta{Name: "smolvm-node"},
		Rules: []rbacv1.PolicyRule{
			{APIGroups: []string{""}, Resources: []string{"secrets", "configmaps", "services"}, Verbs: []string{"get", "list", "watch"}},
			{APIGroups: []string{"authentication.k8s.io"}, Resources: []string{"tokenreviews"}, Verbs: []string{"create"}},
			{APIGroups: []string{"authorization.k8s.io"}, Resources: []string{"subjectaccessreviews"}, Verbs: []string{"create"}},
		},
	}
	if _, err := cs.RbacV1().ClusterRoles().Create(ctx, role, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	binding := &rbacv1.ClusterRoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: "smolvm-node"},
		RoleRef:    rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "ClusterRole", Name: "smolvm-node"},
		Subjects:   []rbacv1.Subject{{APIGroup: "rbac.authorization.k8s.io", Kind: "Group", Name: "system:nodes"}},
	}
	if _, err := cs.RbacV1().ClusterRoleBindings().Create(ctx, binding, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
}

// runtimeClass is the smolvm RuntimeClass of docs/kubernetes.md.
func runtimeClass(ctx context.Context, t *testing.T, cs kubernetes.Interface) {
	t.Helper()
	rc := &nodev1.RuntimeClass{
		ObjectMeta: metav1.ObjectMeta{Name: "smolvm"},
		Handler:    "smolvm",
		Overhead: &nodev1.Overhead{PodFixed: corev1.ResourceList{
			corev1.ResourceMemory: resource.MustParse("96Mi"), corev1.ResourceCPU: resource.MustParse("100m"),
		}},
		Scheduling: &nodev1.Scheduling{
			NodeSelector: map[string]string{"smolvm.dev/node": "true"},
			Tolerations:  []corev1.Toleration{{Key: "smolvm.dev/vm-only", Operator: corev1.TolerationOpExists, Effect: corev1.TaintEffectNoSchedule}},
		},
	}
	if _, err := cs.NodeV1().RuntimeClasses().Create(ctx, rc, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
}

// execIn runs argv in a pod as kubectl exec does.
func execIn(ctx context.Context, c *cluster.Cluster, ns, pod string, argv []string, stdin string) (string, string, error) {
	req := c.Clientset.CoreV1().RESTClient().Post().Resource("pods").Namespace(ns).Name(pod).SubResource("exec").
		VersionedParams(&corev1.PodExecOptions{Container: "vm", Command: argv, Stdin: stdin != "", Stdout: true, Stderr: true}, scheme.ParameterCodec)
	ex, err := remotecommand.NewSPDYExecutor(c.RESTConfig, "POST", req.URL())
	if err != nil {
		return "", "", err
	}
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	var stdout, stderr bytes.Buffer
	opts := remotecommand.StreamOptions{Stdout: &stdout, Stderr: &stderr}
	if stdin != "" {
		opts.Stdin = strings.NewReader(stdin)
	}
	err = ex.StreamWithContext(ctx, opts)
	return stdout.String(), stderr.String(), err
}

// kubeletStatus is the status the node's kubelet API answers a request
// without credentials with.
func kubeletStatus(t *testing.T, n *node, path string) int {
	t.Helper()
	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: insecureTLS()}}
	resp, err := client.Get(fmt.Sprintf("https://%s:%d%s", n.addr, n.port, path))
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp.StatusCode
}

func waitNodeReady(ctx context.Context, t *testing.T, cs kubernetes.Interface, name string) {
	t.Helper()
	waitFor(t, 2*time.Minute, "node "+name+" to be ready", func() bool {
		n, err := cs.CoreV1().Nodes().Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return false
		}
		for _, c := range n.Status.Conditions {
			if c.Type == corev1.NodeReady {
				return c.Status == corev1.ConditionTrue
			}
		}
		return false
	})
}

func waitPod(ctx context.Context, t *testing.T, cs kubernetes.Interface, ns, name string, ok func(*corev1.Pod) bool) *corev1.Pod {
	t.Helper()
	var last *corev1.Pod
	waitFor(t, 4*time.Minute, "pod "+name, func() bool {
		p, err := cs.CoreV1().Pods(ns).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return false
		}
		last = p
		return ok(p)
	})
	return last
}

func podReady(p *corev1.Pod) bool {
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

func waitFor(t *testing.T, d time.Duration, what string, ok func() bool) {
	t.Helper()
	for deadline := time.Now().Add(d); time.Now().Before(deadline); time.Sleep(500 * time.Millisecond) {
		if ok() {
			return
		}
	}
	t.Fatalf("timed out after %s waiting for %s", d, what)
}

func freePort(t *testing.T, addr string) int {
	t.Helper()
	l, err := net.Listen("tcp", addr+":0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// insecureTLS is for asking the node's kubelet API, whose certificate is
// self-signed, what it answers a caller without credentials.
func insecureTLS() *tls.Config { return &tls.Config{InsecureSkipVerify: true} }

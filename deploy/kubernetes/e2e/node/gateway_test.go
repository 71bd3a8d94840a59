//go:build linux

package node_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
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

	"github.com/gorilla/websocket"
	authnv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"

	"github.com/smolvm/smolvm/deploy/kubernetes/e2e/cluster"
)

var (
	claimsGVR    = schema.GroupVersionResource{Group: "extensions.agents.x-k8s.io", Version: "v1beta1", Resource: "sandboxclaims"}
	poolsGVR     = schema.GroupVersionResource{Group: "extensions.agents.x-k8s.io", Version: "v1beta1", Resource: "sandboxwarmpools"}
	templatesGVR = schema.GroupVersionResource{Group: "extensions.agents.x-k8s.io", Version: "v1beta1", Resource: "sandboxtemplates"}
	sandboxesGVR = schema.GroupVersionResource{Group: "agents.x-k8s.io", Version: "v1beta1", Resource: "sandboxes"}
)

// gateway is a `smolvm server start --kubeconfig` process.
type gateway struct {
	url string
	cmd *exec.Cmd
}

func startGateway(t *testing.T, bins string, c *cluster.Cluster, kubeconfig, ns string) *gateway {
	t.Helper()
	port := freePort(t, "127.0.0.1")
	log, err := os.OpenFile(filepath.Join(c.LogDir, "gateway.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { log.Close() })
	cmd := exec.Command(filepath.Join(bins, "smolvm"), "server", "start", "--kubeconfig", kubeconfig,
		"--namespace", ns, "--host", "127.0.0.1", "--port", fmt.Sprint(port))
	cmd.Stdout, cmd.Stderr = log, log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		done := make(chan struct{})
		go func() { cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(40 * time.Second):
			cmd.Process.Kill()
			<-done
		}
	})
	g := &gateway{url: fmt.Sprintf("http://127.0.0.1:%d", port), cmd: cmd}
	waitFor(t, time.Minute, "the gateway to listen", func() bool {
		res, err := http.Get(g.url + "/openapi.json")
		if err != nil {
			return false
		}
		res.Body.Close()
		return res.StatusCode == http.StatusOK
	})
	return g
}

// do sends a request to the gateway and decodes a JSON answer into out.
func (g *gateway) do(t *testing.T, method, path, body string, header map[string]string, out any) int {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, method, g.url+path, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	for k, v := range header {
		req.Header.Set(k, v)
	}
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer res.Body.Close()
	b, err := io.ReadAll(res.Body)
	if err != nil {
		t.Fatal(err)
	}
	if out != nil && len(bytes.TrimSpace(b)) > 0 {
		if err := json.Unmarshal(b, out); err != nil {
			t.Fatalf("%s %s: %d %s: %v", method, path, res.StatusCode, b, err)
		}
	}
	if res.StatusCode >= 400 {
		t.Logf("%s %s: %d %s", method, path, res.StatusCode, bytes.TrimSpace(b))
	}
	return res.StatusCode
}

// apiSandbox is what the API says of a sandbox.
type apiSandbox struct {
	ID     string            `json:"id"`
	Status string            `json:"status"`
	Name   string            `json:"name"`
	Memory int               `json:"memory"`
	Labels map[string]string `json:"labels"`
	Error  string            `json:"error"`
	Ports  []struct {
		Guest       int    `json:"guest"`
		Host        int    `json:"host"`
		HostAddress string `json:"host_address"`
	} `json:"ports"`
}

type execResult struct {
	ExitCode int    `json:"exit_code"`
	Stdout   string `json:"stdout"`
	Stderr   string `json:"stderr"`
	Code     string `json:"code"`
	Instance string `json:"instance"`
}

// The HTTP API served by `smolvm server start --kubeconfig` over two smolvm
// nodes: a create lands on a node and boots a VM; exec, files and an
// exposed port reach it; a warm pool's VM is claimed; when the node
// holding a sandbox dies and is fenced, its Sandbox runs again on the
// other node under the same id; delete leaves no VM anywhere.
func TestGatewayOverTwoNodes(t *testing.T) {
	ctx := context.Background()
	c := cluster.Start(ctx, t, cluster.BinDir())
	cs := c.Clientset
	bins := binaries(t)
	dyn, err := dynamic.NewForConfig(c.RESTConfig)
	if err != nil {
		t.Fatal(err)
	}
	applyNodeRBAC(ctx, t, cs)
	runtimeClass(ctx, t, cs)
	ns := "agents"
	if _, err := cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}

	nodes := map[string]*node{}
	for _, n := range []struct{ name, addr string }{{"smolvm-a", "127.0.0.2"}, {"smolvm-b", "127.0.0.3"}} {
		kubeconfig, err := c.NodeKubeconfig(n.name)
		if err != nil {
			t.Fatal(err)
		}
		nd := &node{name: n.name, addr: n.addr, port: freePort(t, n.addr), data: dataDir(t), kubeconfig: kubeconfig}
		t.Cleanup(func() { nd.clean(t, bins) })
		nd.start(t, bins, c)
		nodes[n.name] = nd
	}
	for name := range nodes {
		waitNodeReady(ctx, t, cs, name)
	}
	gw := startGateway(t, bins, c, c.KubeconfigPath, ns)

	// Bad input is refused before anything is made.
	var problem struct{ Code, Field, Detail string }
	if code := gw.do(t, "POST", "/sandboxes", `{"memory":64}`, nil, &problem); code != 422 || problem.Code != "validation_failed" || problem.Field != "memory" {
		t.Errorf("memory 64: %d %+v", code, problem)
	}
	if code := gw.do(t, "POST", "/sandboxes", `{"snapshot":"snap-1"}`, nil, &problem); code != 422 || problem.Code != "not_supported_in_cluster" {
		t.Errorf("a snapshot in a cluster: %d %+v", code, problem)
	}
	if code := gw.do(t, "GET", "/sandboxes/vm-00000000/exec", "", nil, &problem); code != 404 || problem.Code != "sandbox_not_found" {
		t.Errorf("an unknown sandbox: %d %+v", code, problem)
	}

	// Create: a Sandbox, a pod on one of the nodes, a VM there.
	start := time.Now()
	var sb apiSandbox
	code := gw.do(t, "POST", "/sandboxes", `{"name":"box","memory":384,"labels":{"team":"ml"},"env":{"GREETING":"hello"},"ports":[{"guest":8080}]}`, nil, &sb)
	if code != http.StatusCreated || sb.Status != "running" || !strings.HasPrefix(sb.ID, "vm-") || sb.Name != "box" || sb.Memory != 384 || sb.Labels["team"] != "ml" {
		t.Fatalf("create: %d %+v", code, sb)
	}
	t.Logf("create to running: %s", time.Since(start).Round(time.Millisecond))
	pod, err := cs.CoreV1().Pods(ns).Get(ctx, sb.ID, metav1.GetOptions{})
	if err != nil {
		t.Fatalf("the Sandbox's pod: %v", err)
	}
	first := nodes[pod.Spec.NodeName]
	if first == nil {
		t.Fatalf("the pod is on %q, not a smolvm node", pod.Spec.NodeName)
	}
	if vms := first.sandboxes(t, bins); len(vms) != 1 || vms[0].Labels["smolvm.dev/pod-name"] != sb.ID {
		t.Fatalf("VMs on %s: %+v", first.name, vms)
	}
	if len(sb.Ports) != 1 || sb.Ports[0].Guest != 8080 || sb.Ports[0].HostAddress != first.addr || sb.Ports[0].Host == 0 {
		t.Errorf("ports %+v, want guest 8080 on %s", sb.Ports, first.addr)
	}

	if code := gw.do(t, "POST", "/sandboxes", `{"name":"box"}`, nil, &problem); code != http.StatusConflict || problem.Code != "conflict" {
		t.Errorf("a second sandbox named box: %d %+v", code, problem)
	}

	// Exec, by id and by name, through the node.
	var res execResult
	if code := gw.do(t, "POST", "/sandboxes/box/exec", `{"command":"echo $GREETING; cat","stdin":"sent in"}`, nil, &res); code != 200 || res.Stdout != "hello\nsent in" || res.ExitCode != 0 {
		t.Errorf("exec: %d %+v", code, res)
	}
	if code := gw.do(t, "POST", "/sandboxes/"+sb.ID+"/exec", `{"command":"exit 3"}`, nil, &res); code != 200 || res.ExitCode != 3 {
		t.Errorf("exec of exit 3: %d %+v", code, res)
	}
	if code := gw.do(t, "POST", "/sandboxes/"+sb.ID+"/exec", `{"command":"sleep 5","timeout":1}`, nil, &res); code != http.StatusRequestTimeout || res.Code != "command_timeout" || res.Instance != "/sandboxes/"+sb.ID+"/exec" {
		t.Errorf("exec past its timeout: %d %+v", code, res)
	}
	// A file, up and down.
	if code := gw.do(t, "PUT", "/sandboxes/"+sb.ID+"/files?path=/root/note.txt", "written through the gateway\n", map[string]string{"Content-Type": "application/octet-stream"}, nil); code/100 != 2 {
		t.Errorf("upload: %d", code)
	}
	if got := gw.raw(t, "/sandboxes/"+sb.ID+"/files?path=/root/note.txt"); got != "written through the gateway\n" {
		t.Errorf("download: %q", got)
	}
	// The exposed port, on the node's address.
	serve := `{"command":"nohup python3 -m http.server 8080 --directory /root >/dev/null 2>&1 &"}`
	if code := gw.do(t, "POST", "/sandboxes/"+sb.ID+"/exec", serve, nil, &res); code != 200 || res.ExitCode != 0 {
		t.Errorf("starting a server in the guest: %d %+v", code, res)
	}
	page := fmt.Sprintf("http://%s/note.txt", net.JoinHostPort(sb.Ports[0].HostAddress, fmt.Sprint(sb.Ports[0].Host)))
	waitFor(t, time.Minute, "the guest's server at "+page, func() bool {
		client := &http.Client{Timeout: 5 * time.Second}
		res, err := client.Get(page)
		if err != nil {
			return false
		}
		defer res.Body.Close()
		b, _ := io.ReadAll(res.Body)
		return string(b) == "written through the gateway\n"
	})
	// Streams pass as they come: the command waits for a file that only
	// a second exec makes once its first line has arrived.
	stream := streamExec(t, gw, sb.ID, `{"command":"echo first; while [ ! -e /tmp/go ]; do sleep 0.1; done; echo second"}`)
	if line := stream.next(t); line != `{"type":"stdout","text":"first\n"}` {
		t.Errorf("first streamed event: %s", line)
	}
	if code := gw.do(t, "POST", "/sandboxes/"+sb.ID+"/exec", `{"argv":["touch","/tmp/go"]}`, nil, &res); code != 200 {
		t.Errorf("touch: %d %+v", code, res)
	}
	if line := stream.next(t); line != `{"type":"stdout","text":"second\n"}` {
		t.Errorf("second streamed event: %s", line)
	}
	if line := stream.next(t); !strings.Contains(line, `"type":"exit","exit_code":0`) {
		t.Errorf("last streamed event: %s", line)
	}
	stream.close()
	// A terminal: a WebSocket upgrade through the gateway.
	terminal(t, gw, sb.ID)

	// List and get say the same.
	var list struct{ Sandboxes []apiSandbox }
	if code := gw.do(t, "GET", "/sandboxes?label=team=ml", "", nil, &list); code != 200 || len(list.Sandboxes) != 1 || list.Sandboxes[0].ID != sb.ID || list.Sandboxes[0].Status != "running" {
		t.Errorf("list: %d %+v", code, list)
	}
	if code := gw.do(t, "GET", "/sandboxes?label=team=other", "", nil, &list); code != 200 || len(list.Sandboxes) != 0 {
		t.Errorf("list of another label: %d %+v", code, list)
	}

	// kubectl exec reaches the same VM: the sandbox is a pod.
	if stdout, _, err := execIn(ctx, c, ns, sb.ID, []string{"cat", "/root/note.txt"}, ""); err != nil || stdout != "written through the gateway\n" {
		t.Errorf("kubectl exec: %q %v", stdout, err)
	}

	// A second gateway serves the same sandboxes: nothing is kept in
	// either. An asynchronous create answers at once and is followed
	// there.
	// It runs as a service account with the RBAC of docs/kubernetes.md and
	// a token, which the nodes check with TokenReview.
	gw2 := startGateway(t, bins, c, gatewayAccount(ctx, t, c, ns), ns)
	var async apiSandbox
	if code := gw.do(t, "POST", "/sandboxes", `{"memory":384}`, map[string]string{"Prefer": "respond-async"}, &async); code != http.StatusAccepted || async.Status != "creating" {
		t.Errorf("an asynchronous create: %d %+v", code, async)
	}
	waitFor(t, 3*time.Minute, "the asynchronous create to run, seen through the other gateway", func() bool {
		return gw2.do(t, "GET", "/sandboxes/"+async.ID, "", nil, &async) == 200 && async.Status == "running"
	})
	if code := gw2.do(t, "POST", "/sandboxes/box/exec", `{"argv":["cat","/root/note.txt"]}`, nil, &res); code != 200 || res.Stdout != "written through the gateway\n" {
		t.Errorf("exec through the other gateway: %d %+v", code, res)
	}
	if code := gw2.do(t, "DELETE", "/sandboxes/"+async.ID, "", nil, nil); code != http.StatusNoContent {
		t.Errorf("delete through the other gateway: %d", code)
	}

	// The node holding it dies; fenced, its pod is deleted and the Sandbox
	// runs again on the other node, under the same id.
	var second *node
	for _, n := range nodes {
		if n != first {
			second = n
		}
	}
	killed := time.Now()
	first.stop(syscall.SIGKILL)
	waitFor(t, 3*time.Minute, first.name+" to be not ready", func() bool {
		n, err := cs.CoreV1().Nodes().Get(ctx, first.name, metav1.GetOptions{})
		if err != nil {
			return false
		}
		for _, c := range n.Status.Conditions {
			if c.Type == corev1.NodeReady {
				return c.Status != corev1.ConditionTrue
			}
		}
		return false
	})
	notReady := time.Since(killed)
	fence(ctx, t, cs, first.name)
	var again apiSandbox
	waitFor(t, 5*time.Minute, "the sandbox to run on "+second.name, func() bool {
		p, err := cs.CoreV1().Pods(ns).Get(ctx, sb.ID, metav1.GetOptions{})
		if err != nil || p.Spec.NodeName != second.name {
			return false
		}
		return gw.do(t, "GET", "/sandboxes/"+sb.ID, "", nil, &again) == 200 && again.Status == "running"
	})
	t.Logf("node loss: not ready %s after the kill, running again on %s %s after it", notReady.Round(time.Second), second.name, time.Since(killed).Round(time.Second))
	if code := gw.do(t, "POST", "/sandboxes/box/exec", `{"command":"hostname; echo $GREETING"}`, nil, &res); code != 200 || !strings.HasSuffix(res.Stdout, "hello\n") {
		t.Errorf("exec after the move: %d %+v", code, res)
	}
	if vms := second.sandboxes(t, bins); len(vms) != 1 {
		t.Errorf("VMs on %s after the move: %+v", second.name, vms)
	}

	// Delete: the Sandbox, its pod and the VM go.
	start = time.Now()
	if code := gw.do(t, "DELETE", "/sandboxes/"+sb.ID, "", nil, nil); code != http.StatusNoContent {
		t.Errorf("delete: %d", code)
	}
	t.Logf("delete: %s", time.Since(start).Round(time.Millisecond))
	if code := gw.do(t, "GET", "/sandboxes/"+sb.ID, "", nil, &problem); code != 404 {
		t.Errorf("get after delete: %d", code)
	}
	if vms := second.sandboxes(t, bins); len(vms) != 0 {
		t.Errorf("VMs on %s after delete: %+v", second.name, vms)
	}
	// The dead node, back: the VM it left has no pod any more and goes.
	unfence(ctx, t, cs, first.name)
	first.start(t, bins, c)
	waitFor(t, 2*time.Minute, "the VM "+first.name+" left to be deleted", func() bool {
		return len(first.sandboxes(t, bins)) == 0
	})
	waitNodeReady(ctx, t, cs, first.name)

	// A warm pool of the default shape: a create of that shape claims its
	// VM, which is running already.
	template := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "extensions.agents.x-k8s.io/v1beta1", "kind": "SandboxTemplate",
		"metadata": map[string]any{"name": "debian-512", "namespace": ns},
		"spec": map[string]any{
			// The VM enforces its own network policy.
			"networkPolicyManagement": "Unmanaged",
			"podTemplate": map[string]any{
				"metadata": map[string]any{"annotations": map[string]any{"smolvm.dev/os": "debian"}},
				"spec": map[string]any{
					"runtimeClassName": "smolvm",
					"containers": []any{map[string]any{
						"name": "vm", "image": "debian",
						"resources": map[string]any{"limits": map[string]any{"memory": "512Mi", "cpu": "1"}},
					}},
				},
			},
		},
	}}
	if _, err := dyn.Resource(templatesGVR).Namespace(ns).Create(ctx, template, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	pool := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "extensions.agents.x-k8s.io/v1beta1", "kind": "SandboxWarmPool",
		"metadata": map[string]any{"name": "debian", "namespace": ns},
		"spec":     map[string]any{"replicas": int64(1), "sandboxTemplateRef": map[string]any{"name": "debian-512"}},
	}}
	if _, err := dyn.Resource(poolsGVR).Namespace(ns).Create(ctx, pool, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Minute, "the warm pool to have a VM ready", func() bool {
		p, err := dyn.Resource(poolsGVR).Namespace(ns).Get(ctx, "debian", metav1.GetOptions{})
		if err != nil {
			return false
		}
		ready, _, _ := unstructured.NestedInt64(p.Object, "status", "readyReplicas")
		return ready == 1
	})
	start = time.Now()
	var claimed apiSandbox
	if code := gw.do(t, "POST", "/sandboxes", `{"os":"debian","memory":512}`, nil, &claimed); code != http.StatusCreated || claimed.Status != "running" {
		t.Fatalf("create of the pool's shape: %d %+v", code, claimed)
	}
	t.Logf("create from the warm pool to running: %s", time.Since(start).Round(time.Millisecond))
	claim, err := dyn.Resource(claimsGVR).Namespace(ns).Get(ctx, claimed.ID, metav1.GetOptions{})
	if err != nil {
		t.Fatalf("no SandboxClaim %s: %v", claimed.ID, err)
	}
	got, _, _ := unstructured.NestedString(claim.Object, "status", "sandbox", "name")
	if !strings.HasPrefix(got, "debian-") {
		t.Errorf("the claim got Sandbox %q, want one of pool debian", got)
	}
	if code := gw.do(t, "POST", "/sandboxes/"+claimed.ID+"/exec", `{"argv":["cat","/proc/meminfo"]}`, nil, &res); code != 200 || !strings.Contains(res.Stdout, "MemTotal") {
		t.Errorf("exec in the claimed VM: %d %+v", code, res)
	}
	if code := gw.do(t, "DELETE", "/sandboxes/"+claimed.ID, "", nil, nil); code != http.StatusNoContent {
		t.Errorf("delete of the claimed sandbox: %d", code)
	}
	if _, err := dyn.Resource(sandboxesGVR).Namespace(ns).Get(ctx, got, metav1.GetOptions{}); !apierrors.IsNotFound(err) {
		t.Errorf("the claimed Sandbox %s after delete: %v", got, err)
	}
	// The pool's own VMs go with the pool; then no VM is left anywhere.
	if err := dyn.Resource(poolsGVR).Namespace(ns).Delete(ctx, "debian", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 3*time.Minute, "no VM on any node", func() bool {
		for _, n := range nodes {
			if len(n.sandboxes(t, bins)) != 0 {
				return false
			}
		}
		return true
	})
}

// raw is the body of a GET to the gateway.
func (g *gateway) raw(t *testing.T, path string) string {
	t.Helper()
	res, err := http.Get(g.url + path)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	b, _ := io.ReadAll(res.Body)
	if res.StatusCode != 200 {
		t.Errorf("GET %s: %d %s", path, res.StatusCode, b)
	}
	return string(b)
}

// fence marks a dead node out of service, as an operator does once it is
// known to be down: its pods are then deleted without waiting for it.
func fence(ctx context.Context, t *testing.T, cs kubernetes.Interface, name string) {
	t.Helper()
	n, err := cs.CoreV1().Nodes().Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	n.Spec.Taints = append(n.Spec.Taints, corev1.Taint{Key: "node.kubernetes.io/out-of-service", Value: "nodeshutdown", Effect: corev1.TaintEffectNoExecute})
	if _, err := cs.CoreV1().Nodes().Update(ctx, n, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
}

func unfence(ctx context.Context, t *testing.T, cs kubernetes.Interface, name string) {
	t.Helper()
	waitFor(t, time.Minute, "the out-of-service taint to be lifted", func() bool {
		n, err := cs.CoreV1().Nodes().Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return false
		}
		var keep []corev1.Taint
		for _, taint := range n.Spec.Taints {
			if taint.Key != "node.kubernetes.io/out-of-service" {
				keep = append(keep, taint)
			}
		}
		n.Spec.Taints = keep
		_, err = cs.CoreV1().Nodes().Update(ctx, n, metav1.UpdateOptions{})
		return err == nil
	})
}

// gatewayAccount makes the gateway's service account with the roles
// docs/kubernetes.md gives it, and returns a kubeconfig with its token.
func gatewayAccount(ctx context.Context, t *testing.T, c *cluster.Cluster, ns string) string {
	t.Helper()
	cs := c.Clientset
	const sys = "smolvm-system"
	if _, err := cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: sys}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := cs.CoreV1().ServiceAccounts(sys).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "smolvm-gateway"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	subject := []rbacv1.Subject{{Kind: "ServiceAccount", Name: "smolvm-gateway", Namespace: sys}}
	role := &rbacv1.Role{
		ObjectMeta: metav1.ObjectMeta{Name: "smolvm-gateway", Namespace: ns},
		Rules: []rbacv1.PolicyRule{
			{APIGroups: []string{"agents.x-k8s.io"}, Resources: []string{"sandboxes"}, Verbs: []string{"get", "list", "watch", "create", "delete"}},
			{APIGroups: []string{"extensions.agents.x-k8s.io"}, Resources: []string{"sandboxclaims"}, Verbs: []string{"get", "list", "watch", "create", "delete"}},
			{APIGroups: []string{"extensions.agents.x-k8s.io"}, Resources: []string{"sandboxwarmpools", "sandboxtemplates"}, Verbs: []string{"get", "list"}},
			{APIGroups: []string{""}, Resources: []string{"pods"}, Verbs: []string{"get", "list"}},
		},
	}
	if _, err := cs.RbacV1().Roles(ns).Create(ctx, role, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	rb := &rbacv1.RoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: "smolvm-gateway", Namespace: ns},
		RoleRef:    rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "Role", Name: "smolvm-gateway"},
		Subjects:   subject,
	}
	if _, err := cs.RbacV1().RoleBindings(ns).Create(ctx, rb, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	cr := &rbacv1.ClusterRole{
		ObjectMeta: metav1.ObjectMeta{Name: "smolvm-gateway"},
		Rules: []rbacv1.PolicyRule{
			{APIGroups: []string{""}, Resources: []string{"nodes"}, Verbs: []string{"get"}},
			{APIGroups: []string{""}, Resources: []string{"nodes/proxy"}, Verbs: []string{"get", "create", "update", "patch", "delete"}},
		},
	}
	if _, err := cs.RbacV1().ClusterRoles().Create(ctx, cr, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	crb := &rbacv1.ClusterRoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: "smolvm-gateway"},
		RoleRef:    rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "ClusterRole", Name: "smolvm-gateway"},
		Subjects:   subject,
	}
	if _, err := cs.RbacV1().ClusterRoleBindings().Create(ctx, crb, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	expiry := int64(3600)
	tok, err := cs.CoreV1().ServiceAccounts(sys).CreateToken(ctx, "smolvm-gateway",
		&authnv1.TokenRequest{Spec: authnv1.TokenRequestSpec{ExpirationSeconds: &expiry}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	tokenFile := filepath.Join(dir, "token")
	if err := os.WriteFile(tokenFile, []byte(tok.Status.Token), 0o600); err != nil {
		t.Fatal(err)
	}
	kubeconfig := filepath.Join(dir, "gateway.kubeconfig")
	doc := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: test
  cluster: {server: %q, certificate-authority: %q}
users:
- name: smolvm-gateway
  user: {tokenFile: %q}
contexts:
- name: gateway
  context: {cluster: test, user: smolvm-gateway}
current-context: gateway
`, c.Server, c.CACertPath, tokenFile)
	if err := os.WriteFile(kubeconfig, []byte(doc), 0o600); err != nil {
		t.Fatal(err)
	}
	return kubeconfig
}

// events reads a streamed exec's NDJSON events.
type events struct {
	body   io.ReadCloser
	r      *bufio.Reader
	cancel context.CancelFunc
}

func streamExec(t *testing.T, g *gateway, id, body string) *events {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	req, err := http.NewRequestWithContext(ctx, "POST", g.url+"/sandboxes/"+id+"/exec", strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept", "application/x-ndjson")
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	if res.StatusCode != 200 {
		b, _ := io.ReadAll(res.Body)
		t.Fatalf("streamed exec: %d %s", res.StatusCode, b)
	}
	return &events{body: res.Body, r: bufio.NewReader(res.Body), cancel: cancel}
}

// next is the next event; the stream's deadline fails a stream held back.
func (e *events) next(t *testing.T) string {
	t.Helper()
	line, err := e.r.ReadString('\n')
	if err != nil {
		t.Fatalf("reading the stream: %q %v", line, err)
	}
	return strings.TrimSpace(line)
}

func (e *events) close() { e.body.Close(); e.cancel() }

// terminal runs a command on a terminal through the gateway's WebSocket.
func terminal(t *testing.T, g *gateway, id string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	url := strings.Replace(g.url, "http://", "ws://", 1) + "/sandboxes/" + id + "/pty"
	ws, res, err := websocket.DefaultDialer.DialContext(ctx, url, nil)
	if err != nil {
		t.Fatalf("terminal: %v (%v)", err, res)
	}
	defer ws.Close()
	ws.SetReadDeadline(time.Now().Add(2 * time.Minute))
	if err := ws.WriteMessage(websocket.BinaryMessage, []byte("echo pty-$((6*7)); exit 5\n")); err != nil {
		t.Fatal(err)
	}
	var out strings.Builder
	for {
		kind, msg, err := ws.ReadMessage()
		if err != nil {
			t.Fatalf("terminal after %q: %v", out.String(), err)
		}
		if kind == websocket.BinaryMessage {
			out.Write(msg)
			continue
		}
		var exit struct {
			ExitCode *int `json:"exit_code"`
		}
		if json.Unmarshal(msg, &exit) == nil && exit.ExitCode != nil {
			if *exit.ExitCode != 5 || !strings.Contains(out.String(), "pty-42") {
				t.Errorf("terminal: exit %d after %q", *exit.ExitCode, out.String())
			}
			return
		}
	}
}

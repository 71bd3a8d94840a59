package gateway

// The gateway's work against a real control plane and real nodes is
// tested in deploy/kubernetes/e2e/node (TestGatewayOverTwoNodes); these
// are the mappings it rests on, which need neither.

import (
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/client-go/rest"

	"github.com/smolvm/smolvm/internal/api"
	"github.com/smolvm/smolvm/internal/kubenode"
	"github.com/smolvm/smolvm/internal/sandbox"
)

func decode(t *testing.T, body string) (api.CreateSandboxRequest, error) {
	t.Helper()
	r := httptest.NewRequest(http.MethodPost, "/sandboxes", strings.NewReader(body))
	return api.NewCreateDecoder().Decode(r)
}

// A create's body is checked as a single server checks it.
func TestCreateBodyChecked(t *testing.T) {
	for _, c := range []struct {
		body, code, field string
	}{
		{`{"memory":64}`, "validation_failed", "memory"},
		{`{"os":"plan9"}`, "validation_failed", "os"},
		{`{"memory":512,"colour":"red"}`, "validation_failed", "colour"},
		{`{"ports":[{"guest":0}]}`, "validation_failed", "ports[0].guest"},
		{`{"memory":`, "malformed_json", ""},
	} {
		_, err := decode(t, c.body)
		var p *api.Problem
		if !errors.As(err, &p) || p.Code != c.code || p.Field != c.field || p.Status/100 != 4 {
			t.Errorf("%s: %+v, want %s on %q", c.body, p, c.code, c.field)
		}
	}
	b, err := decode(t, `{"os":"ubuntu","memory":1024,"vcpus":2,"disk_size":4096,"env":{"A":"1"}}`)
	if err != nil || b.OS != "ubuntu" || b.Memory != 1024 || b.VCPUs != 2 || b.DiskSize != 4096 || b.Env["A"] != "1" {
		t.Errorf("a valid body: %+v, %v", b, err)
	}
	if b, err := decode(t, ""); err != nil || b.OS != "" {
		t.Errorf("an empty body: %+v, %v", b, err)
	}
}

// A request becomes the pod a smolvm node turns back into the same
// sandbox: the node's own reading of the pod is the check.
func TestPodTemplateAsTheNodeReadsIt(t *testing.T) {
	b, err := decode(t, `{"os":"ubuntu","memory":1024,"vcpus":2,"disk_size":4096,"env":{"MODE":"prod"},
		"ports":[{"guest":8080},{"guest":22,"host":2222}],"network":{"mode":"restricted","allow":["1.1.1.1","10.0.0.0/8"]}}`)
	if err != nil {
		t.Fatal(err)
	}
	tmpl, err := podTemplate(b, "smolvm")
	if err != nil {
		t.Fatal(err)
	}
	pod := &corev1.Pod{ObjectMeta: tmpl.ObjectMeta, Spec: tmpl.Spec}
	pod.Namespace, pod.Name = "agents", "vm-12345678"
	req, err := kubenode.CreateRequestOf("node-a", "10.0.0.5", pod)
	if err != nil {
		t.Fatal(err)
	}
	if req.OS != "ubuntu" || req.Image != "" || req.MemoryMiB != 1024 || req.VCPUs != 2 || req.DiskSizeMiB != 4096 || req.Env["MODE"] != "prod" {
		t.Errorf("the node reads %+v", req)
	}
	if string(req.Network.Mode) != "restricted" || len(req.Network.Allow) != 2 || req.Network.Allow[0].String() != "1.1.1.1/32" {
		t.Errorf("network %+v", req.Network)
	}
	if len(req.Ports) != 2 || req.Ports[0].Guest != 8080 || req.Ports[0].HostAddress != "10.0.0.5" || req.Ports[1].Host != 2222 {
		t.Errorf("ports %+v", req.Ports)
	}
	if *pod.Spec.RuntimeClassName != "smolvm" || pod.Labels[LabelManagedBy] != managedBy {
		t.Errorf("runtime class %q, labels %v", *pod.Spec.RuntimeClassName, pod.Labels)
	}
	// The scheduler counts what the VM is given.
	if q := pod.Spec.Containers[0].Resources.Requests[corev1.ResourceMemory]; q.Cmp(resource.MustParse("1Gi")) != 0 {
		t.Errorf("memory request %s", q.String())
	}

	// Nothing asked: the default sandbox, as a single server makes it.
	tmpl, err = podTemplate(api.CreateSandboxRequest{}, "smolvm")
	if err != nil {
		t.Fatal(err)
	}
	pod = &corev1.Pod{ObjectMeta: tmpl.ObjectMeta, Spec: tmpl.Spec}
	if req, err := kubenode.CreateRequestOf("node-a", "10.0.0.5", pod); err != nil || req.OS != "debian" || req.MemoryMiB != 512 || req.VCPUs != 1 {
		t.Errorf("the default sandbox: %+v, %v", req, err)
	}
	// An image, not an OS.
	tmpl, _ = podTemplate(api.CreateSandboxRequest{Image: "docker.io/library/python:3.12-slim"}, "smolvm")
	pod = &corev1.Pod{ObjectMeta: tmpl.ObjectMeta, Spec: tmpl.Spec}
	if req, err := kubenode.CreateRequestOf("node-a", "10.0.0.5", pod); err != nil || req.Image != "docker.io/library/python:3.12-slim" || req.OS != "" {
		t.Errorf("an image: %+v, %v", req, err)
	}
}

// What a cluster cannot do is refused with a reason, before any object
// is made; so are names, labels and environments a single server refuses.
func TestRefusedRequests(t *testing.T) {
	f := false
	for _, c := range []struct {
		b    api.CreateSandboxRequest
		want string
	}{
		{api.CreateSandboxRequest{Backend: "firecracker"}, "backend"},
		{api.CreateSandboxRequest{Snapshot: "snap-1"}, "snapshot"},
		{api.CreateSandboxRequest{Mounts: []api.MountSpec{{Host: "/tmp", Guest: "/mnt", ReadOnly: &f}}}, "mounts"},
		{api.CreateSandboxRequest{OS: "windows"}, "windows"},
		{api.CreateSandboxRequest{Timeout: 60, OnTimeout: "pause"}, "on_timeout"},
		{api.CreateSandboxRequest{Network: &api.NetworkSpec{AllowHostLoopback: true}}, "allow_host_loopback"},
	} {
		if err := unsupported(c.b); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%+v: %v, want a refusal naming %s", c.b, err, c.want)
		}
	}
	if err := unsupported(api.CreateSandboxRequest{Backend: "auto", Timeout: 60}); err != nil {
		t.Errorf("backend auto with a timeout: %v", err)
	}
	for _, b := range []api.CreateSandboxRequest{
		{Name: "vm-1"},
		{Name: "Not A Name"},
		{Labels: map[string]string{"-bad": "x"}},
		{Env: map[string]string{"1X": "y"}},
		{Network: &api.NetworkSpec{Mode: "restricted", Allow: []string{"not-an-address"}}},
	} {
		_, err := podTemplate(b, "smolvm")
		var se *sandbox.Error
		var p *problem
		if !errors.As(err, &se) && !errors.As(err, &p) {
			t.Errorf("%+v: %v, want it refused", b, err)
		}
	}
}

// A warm pool's template serves a create only if it makes the same VM.
func TestSameVM(t *testing.T) {
	want, err := podTemplate(api.CreateSandboxRequest{OS: "debian", Memory: 512}, "smolvm")
	if err != nil {
		t.Fatal(err)
	}
	class := "smolvm"
	pool := func(mutate func(*corev1.PodTemplateSpec)) *corev1.PodTemplateSpec {
		p := &corev1.PodTemplateSpec{
			ObjectMeta: metav1.ObjectMeta{Annotations: map[string]string{kubenode.AnnotationOS: "debian"}},
			Spec: corev1.PodSpec{RuntimeClassName: &class, Containers: []corev1.Container{{
				Name: "vm", Image: "whatever",
				Resources: corev1.ResourceRequirements{Limits: corev1.ResourceList{
					corev1.ResourceMemory: resource.MustParse("512Mi"), corev1.ResourceCPU: resource.MustParse("1000m"),
				}},
			}}},
		}
		if mutate != nil {
			mutate(p)
		}
		return p
	}
	if !sameVM(pool(nil), want) {
		t.Errorf("a pool of the same OS, memory and CPUs does not serve the request")
	}
	for name, m := range map[string]func(*corev1.PodTemplateSpec){
		"other memory": func(p *corev1.PodTemplateSpec) {
			p.Spec.Containers[0].Resources.Limits[corev1.ResourceMemory] = resource.MustParse("1Gi")
		},
		"other OS":      func(p *corev1.PodTemplateSpec) { p.Annotations[kubenode.AnnotationOS] = "alpine" },
		"other network": func(p *corev1.PodTemplateSpec) { p.Annotations[kubenode.AnnotationNetwork] = "off" },
		"a command":     func(p *corev1.PodTemplateSpec) { p.Spec.Containers[0].Command = []string{"sleep", "1"} },
		"no class":      func(p *corev1.PodTemplateSpec) { p.Spec.RuntimeClassName = nil },
	} {
		if sameVM(pool(m), want) {
			t.Errorf("a pool with %s serves the request", name)
		}
	}
}

// A sandbox's status is its pod's.
func TestStatusFromPod(t *testing.T) {
	obj := &unstructured.Unstructured{Object: map[string]any{"metadata": map[string]any{"name": "vm-1"}}}
	ready := corev1.PodCondition{Type: corev1.PodReady, Status: corev1.ConditionTrue}
	for _, c := range []struct {
		pod  *corev1.Pod
		want string
	}{
		{nil, "creating"},
		{&corev1.Pod{Status: corev1.PodStatus{Phase: corev1.PodPending}}, "creating"},
		{&corev1.Pod{Status: corev1.PodStatus{Phase: corev1.PodRunning, Conditions: []corev1.PodCondition{ready}}}, "running"},
		{&corev1.Pod{Status: corev1.PodStatus{Phase: corev1.PodRunning}}, "paused"},
		{&corev1.Pod{Status: corev1.PodStatus{Phase: corev1.PodSucceeded}}, "stopped"},
		{&corev1.Pod{Status: corev1.PodStatus{Phase: corev1.PodFailed, Message: "no such image"}}, "error"},
	} {
		f := &found{id: "vm-1", obj: obj, pod: c.pod}
		v := f.view()
		if v.Status != c.want {
			t.Errorf("pod %+v: status %s, want %s", c.pod, v.Status, c.want)
		}
		if c.want == "error" && v.Error != "no such image" {
			t.Errorf("a failed pod's error: %q", v.Error)
		}
	}
	unschedulable := &corev1.Pod{Status: corev1.PodStatus{Phase: corev1.PodPending, Conditions: []corev1.PodCondition{
		{Type: corev1.PodScheduled, Status: corev1.ConditionFalse, Message: "0/2 nodes are available: 2 Insufficient memory."},
	}}}
	if v := (&found{id: "vm-1", obj: obj, pod: unschedulable}).view(); !strings.Contains(v.Error, "Insufficient memory") {
		t.Errorf("an unschedulable pod says %q", v.Error)
	}
}

// A node's problem names the caller's path, not the node's own, which
// holds the node's id of the sandbox; its other fields pass unchanged.
func TestProblemNamesTheCallersPath(t *testing.T) {
	body := `{"code":"command_timeout","instance":"/sandboxes/vm-0000aaaa/exec","stdout":"partial\n","status":408}` + "\n"
	res := &http.Response{Header: http.Header{"Content-Type": {"application/problem+json"}}, Body: io.NopCloser(strings.NewReader(body))}
	if err := renameInstance(res, "/sandboxes/box/exec"); err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(res.Body)
	var got map[string]any
	if err := json.Unmarshal(b, &got); err != nil {
		t.Fatalf("%s: %v", b, err)
	}
	if got["instance"] != "/sandboxes/box/exec" || got["stdout"] != "partial\n" || got["code"] != "command_timeout" || res.ContentLength != int64(len(b)) {
		t.Errorf("rewritten problem %s (length %d)", b, res.ContentLength)
	}
	// Anything else passes as it came.
	res = &http.Response{Header: http.Header{"Content-Type": {"application/json"}}, Body: io.NopCloser(strings.NewReader(`{"instance":"x"}`))}
	if err := renameInstance(res, "/y"); err != nil {
		t.Fatal(err)
	}
	if b, _ := io.ReadAll(res.Body); string(b) != `{"instance":"x"}` {
		t.Errorf("a JSON answer changed: %s", b)
	}
}

// The routes answer as a single server's do, before any cluster is
// reached: bad input, routes a cluster does not serve, the document.
// With the API server down, a route that needs it is a 502, not a hang.
func TestRoutesWithoutACluster(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	down := ln.Addr().String()
	ln.Close() // nothing listens there now
	g, err := New(Config{REST: &rest.Config{Host: "https://" + down, Timeout: 5 * time.Second}, Namespace: "agents"})
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(api.Wrap(g.Handler(), api.Options{}))
	defer srv.Close()
	call := func(method, path, body string) (int, map[string]any) {
		req, _ := http.NewRequest(method, srv.URL+path, strings.NewReader(body))
		req.Header.Set("Content-Type", "application/json")
		res, err := srv.Client().Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer res.Body.Close()
		var out map[string]any
		json.NewDecoder(res.Body).Decode(&out)
		return res.StatusCode, out
	}
	for _, c := range []struct {
		method, path, body string
		status             int
		code, field        string
	}{
		{"POST", "/sandboxes", `{"memory":64}`, 422, "validation_failed", "memory"},
		{"POST", "/sandboxes", `{"memory":`, 400, "malformed_json", ""},
		{"POST", "/sandboxes", `{"backend":"firecracker"}`, 422, "not_supported_in_cluster", ""},
		{"POST", "/sandboxes", `{"name":"vm-1"}`, 422, "invalid_name", "name"},
		{"POST", "/sandboxes", `{"env":{"1X":"y"}}`, 422, "invalid_env", "env"},
		{"GET", "/snapshots", "", 501, "not_supported_in_cluster", ""},
		{"GET", "/snapshots/snap-1", "", 501, "not_supported_in_cluster", ""},
		{"GET", "/nowhere", "", 404, "not_found", ""},
		{"PUT", "/sandboxes", "", 405, "method_not_allowed", ""},
		{"POST", "/sandboxes/vm-1234abcd", "", 405, "method_not_allowed", ""},
		{"PATCH", "/sandboxes/vm-1234abcd", `{"timeout":60}`, 501, "not_supported_in_cluster", ""},
		{"GET", "/sandboxes/vm-1234abcd", "", 502, "kubernetes_error", ""},
		{"POST", "/sandboxes/vm-1234abcd/exec", `{"command":"true"}`, 502, "kubernetes_error", ""},
	} {
		status, p := call(c.method, c.path, c.body)
		if status != c.status || p["code"] != c.code || (c.field != "" && p["field"] != c.field) {
			t.Errorf("%s %s %s: %d %v, want %d %s on %q", c.method, c.path, c.body, status, p, c.status, c.code, c.field)
		}
	}
	res, err := srv.Client().Get(srv.URL + "/openapi.json")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(res.Body)
	res.Body.Close()
	want, _ := api.OpenAPIDocument()
	if res.StatusCode != 200 || string(b) != string(want) {
		t.Errorf("/openapi.json: %d, %d bytes, want the single server's document", res.StatusCode, len(b))
	}
}

// A browser's token, sent as a WebSocket subprotocol, stays with the
// gateway; the terminal's own subprotocol goes on to the node.
func TestTokenSubprotocolDropped(t *testing.T) {
	h := http.Header{}
	h.Add("Sec-WebSocket-Protocol", "terminal.smolvm.dev, bearer.token.smolvm.dev.c2VrcmV0")
	withoutToken(h)
	if got := h.Values("Sec-WebSocket-Protocol"); len(got) != 1 || got[0] != "terminal.smolvm.dev" {
		t.Errorf("subprotocols passed on: %q", got)
	}
	h = http.Header{}
	h.Add("Sec-WebSocket-Protocol", "bearer.token.smolvm.dev.c2VrcmV0")
	withoutToken(h)
	if got := h.Values("Sec-WebSocket-Protocol"); len(got) != 0 {
		t.Errorf("subprotocols passed on: %q", got)
	}
}

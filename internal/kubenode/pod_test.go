package kubenode

import (
	"net/netip"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/smolvm/smolvm/internal/network"
)

func testPod(mutate func(*corev1.Pod)) *corev1.Pod {
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: "team", Name: "web", UID: "uid-1"},
		Spec: corev1.PodSpec{Containers: []corev1.Container{{
			Name:  "main",
			Image: "registry.example/app:1",
		}}},
	}
	if mutate != nil {
		mutate(pod)
	}
	return pod
}

func TestCreateRequestFromPod(t *testing.T) {
	pod := testPod(func(p *corev1.Pod) {
		p.Annotations = map[string]string{AnnotationDiskMiB: "2048", AnnotationNetwork: "restricted", AnnotationAllow: "1.1.1.1, 8.8.8.0/24"}
		c := &p.Spec.Containers[0]
		c.Resources.Limits = corev1.ResourceList{corev1.ResourceMemory: resource.MustParse("768Mi"), corev1.ResourceCPU: resource.MustParse("1500m")}
		c.Ports = []corev1.ContainerPort{{ContainerPort: 8080}, {ContainerPort: 22, HostPort: 2222, HostIP: "127.0.0.2", Protocol: corev1.ProtocolTCP}}
		c.Env = []corev1.EnvVar{{Name: "MODE", Value: "prod"}}
	})
	req, err := CreateRequestOf("node-a", "10.0.0.5", pod)
	if err != nil {
		t.Fatal(err)
	}
	if req.Image != "registry.example/app:1" || req.OS != "" {
		t.Errorf("image %q os %q, want the container's image", req.Image, req.OS)
	}
	if req.MemoryMiB != 768 || req.VCPUs != 2 || req.DiskSizeMiB != 2048 {
		t.Errorf("memory %d MiB, %d vCPUs, disk %d MiB; want 768, 2 (1.5 rounded up), 2048", req.MemoryMiB, req.VCPUs, req.DiskSizeMiB)
	}
	want := []netip.Prefix{netip.MustParsePrefix("1.1.1.1/32"), netip.MustParsePrefix("8.8.8.0/24")}
	if req.Network.Mode != network.ModeRestricted || len(req.Network.Allow) != 2 || req.Network.Allow[0] != want[0] || req.Network.Allow[1] != want[1] {
		t.Errorf("network %+v, want restricted to %v", req.Network, want)
	}
	// A port without a hostIP is on the node's address, not loopback.
	if len(req.Ports) != 2 || req.Ports[0] != (network.Forward{Guest: 8080, HostAddress: "10.0.0.5"}) ||
		req.Ports[1] != (network.Forward{Guest: 22, Host: 2222, HostAddress: "127.0.0.2"}) {
		t.Errorf("ports %+v", req.Ports)
	}
	if req.Env["MODE"] != "prod" {
		t.Errorf("env %v", req.Env)
	}
	if req.Labels[LabelNode] != "node-a" || req.Labels[LabelNamespace] != "team" || req.Labels[LabelPod] != "web" || req.Labels[LabelUID] != "uid-1" {
		t.Errorf("labels %v", req.Labels)
	}

	// Requests size the VM when there are no limits; an OS preset
	// replaces the image.
	pod = testPod(func(p *corev1.Pod) {
		p.Annotations = map[string]string{AnnotationOS: "alpine"}
		p.Spec.Containers[0].Resources.Requests = corev1.ResourceList{corev1.ResourceMemory: resource.MustParse("1Gi"), corev1.ResourceCPU: resource.MustParse("2")}
	})
	if req, err = CreateRequestOf("node-a", "10.0.0.5", pod); err != nil || req.OS != "alpine" || req.Image != "" || req.MemoryMiB != 1024 || req.VCPUs != 2 {
		t.Errorf("from requests: %+v, %v", req, err)
	}
}

// A pod no sandbox can run is refused with a reason the user can act on.
func TestCreateRequestRefusesPods(t *testing.T) {
	for _, c := range []struct {
		name   string
		mutate func(*corev1.Pod)
		want   string
	}{
		{"two containers", func(p *corev1.Pod) { p.Spec.Containers = append(p.Spec.Containers, p.Spec.Containers[0]) }, "exactly one container"},
		{"init containers", func(p *corev1.Pod) { p.Spec.InitContainers = p.Spec.Containers }, "init containers"},
		{"disk size", func(p *corev1.Pod) { p.Annotations = map[string]string{AnnotationDiskMiB: "lots"} }, AnnotationDiskMiB},
		{"network mode", func(p *corev1.Pod) { p.Annotations = map[string]string{AnnotationNetwork: "sideways"} }, AnnotationNetwork},
		{"allow list", func(p *corev1.Pod) { p.Annotations = map[string]string{AnnotationAllow: "example.com"} }, AnnotationAllow},
		{"udp port", func(p *corev1.Pod) {
			p.Spec.Containers[0].Ports = []corev1.ContainerPort{{ContainerPort: 53, Protocol: corev1.ProtocolUDP}}
		}, "only TCP"},
	} {
		_, err := CreateRequestOf("node-a", "10.0.0.5", testPod(c.mutate))
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want an error naming %q", c.name, err, c.want)
		}
	}
}

func TestAuthSubresource(t *testing.T) {
	for path, want := range map[string]string{
		"/exec/ns/pod/c":          "proxy",
		"/containerLogs/ns/pod/c": "proxy",
		"/portForward/ns/pod":     "proxy",
		"/stats/summary":          "stats",
		"/metrics/resource":       "metrics",
		"/logs/":                  "log",
		"/statsx":                 "proxy",
	} {
		if got := subresource(path); got != want {
			t.Errorf("subresource(%s) = %s, want %s", path, got, want)
		}
	}
}

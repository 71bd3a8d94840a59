package gateway

import (
	"context"
	"fmt"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"

	"github.com/smolvm/smolvm/internal/api"
	"github.com/smolvm/smolvm/internal/kubenode"
)

// warmPool is a SandboxWarmPool whose template makes the same VM as
// want, one with a sandbox ready if there is such, or "" when there is
// none. A claim on a pool with none ready is made from its template as a
// Sandbox would be, and the pool's controller fills the pool again. A
// request with its own environment or ports cannot take a pooled VM:
// those are set when the VM is made.
func (g *Gateway) warmPool(ctx context.Context, b api.CreateSandboxRequest, want *corev1.PodTemplateSpec) (string, error) {
	if len(b.Env) > 0 || len(b.Ports) > 0 {
		return "", nil
	}
	pools, err := g.dyn.Resource(poolsGVR).Namespace(g.ns).List(ctx, metav1.ListOptions{})
	if apierrors.IsNotFound(err) {
		return "", nil // agent-sandbox's extensions are not installed
	}
	if err != nil {
		return "", fmt.Errorf("listing warm pools: %w", err)
	}
	found := ""
	for _, pool := range pools.Items {
		ready, _, _ := unstructured.NestedInt64(pool.Object, "status", "readyReplicas")
		name, _, _ := unstructured.NestedString(pool.Object, "spec", "sandboxTemplateRef", "name")
		if name == "" || (found != "" && ready == 0) {
			continue
		}
		tpl, err := g.dyn.Resource(templatesGVR).Namespace(g.ns).Get(ctx, name, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			continue
		}
		if err != nil {
			return "", fmt.Errorf("reading sandbox template %s: %w", name, err)
		}
		raw, _, _ := unstructured.NestedMap(tpl.Object, "spec", "podTemplate")
		var have corev1.PodTemplateSpec
		if err := runtime.DefaultUnstructuredConverter.FromUnstructured(raw, &have); err != nil {
			g.log.Warn("a sandbox template's pod template does not read as one", "template", name, "err", err)
			continue
		}
		if sameVM(&have, want) {
			if ready > 0 {
				return pool.GetName(), nil
			}
			found = pool.GetName()
		}
	}
	return found, nil
}

// sameVM reports whether two pod templates make the same VM on a smolvm
// node: runtime class, image or OS, memory, CPUs, disk and network.
func sameVM(a, b *corev1.PodTemplateSpec) bool {
	if len(a.Spec.Containers) != 1 || len(b.Spec.Containers) != 1 {
		return false
	}
	if a.Spec.RuntimeClassName == nil || b.Spec.RuntimeClassName == nil || *a.Spec.RuntimeClassName != *b.Spec.RuntimeClassName {
		return false
	}
	for _, k := range []string{kubenode.AnnotationOS, kubenode.AnnotationDiskMiB, kubenode.AnnotationNetwork, kubenode.AnnotationAllow} {
		if a.Annotations[k] != b.Annotations[k] {
			return false
		}
	}
	ca, cb := a.Spec.Containers[0], b.Spec.Containers[0]
	if a.Annotations[kubenode.AnnotationOS] == "" && ca.Image != cb.Image {
		return false
	}
	if len(ca.Ports) > 0 || len(ca.Env) > 0 || len(ca.Command) > 0 || len(ca.Args) > 0 {
		return false
	}
	for _, r := range []corev1.ResourceName{corev1.ResourceMemory, corev1.ResourceCPU} {
		qa, qb := ca.Resources.Limits[r], cb.Resources.Limits[r]
		if qa.Cmp(qb) != 0 {
			return false
		}
	}
	return true
}

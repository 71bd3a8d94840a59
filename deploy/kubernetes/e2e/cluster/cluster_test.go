//go:build linux

package cluster_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	certificatesv1 "k8s.io/api/certificates/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/utils/ptr"

	"github.com/smolvm/smolvm/deploy/kubernetes/e2e/cluster"
)

var sandboxGVR = schema.GroupVersionResource{Group: "agents.x-k8s.io", Version: "v1beta1", Resource: "sandboxes"}

func TestControlPlane(t *testing.T) {
	bin := cluster.BinDir()
	if err := cluster.CheckBinDir(bin); err != nil {
		t.Fatalf("control plane binaries missing: %v\n"+
			"(this test looks in $SMOLVM_K8S_BIN, else in the e2e module's bin directory)", err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Minute)
	defer cancel()
	c := cluster.Start(ctx, t, bin)
	cs := c.Clientset

	t.Run("APIServerAnswers", func(t *testing.T) {
		v, err := cs.Discovery().ServerVersion()
		if err != nil {
			t.Fatalf("server version: %v", err)
		}
		t.Logf("kube-apiserver %s at %s, kubeconfig %s", v.GitVersion, c.Server, c.KubeconfigPath)
		if !strings.HasPrefix(v.GitVersion, "v1.") {
			t.Errorf("server version %q, want v1.x as stamped by build.sh", v.GitVersion)
		}
	})

	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "smolvm-e2e"}}
	t.Run("CreateNamespace", func(t *testing.T) {
		if _, err := cs.CoreV1().Namespaces().Create(ctx, ns, metav1.CreateOptions{}); err != nil {
			t.Fatalf("creating namespace: %v", err)
		}
		got, err := cs.CoreV1().Namespaces().Get(ctx, ns.Name, metav1.GetOptions{})
		if err != nil {
			t.Fatalf("reading namespace back: %v", err)
		}
		if got.Status.Phase != corev1.NamespaceActive {
			t.Errorf("namespace phase %q, want %q", got.Status.Phase, corev1.NamespaceActive)
		}
	})
	if t.Failed() {
		t.FailNow()
	}

	t.Run("SandboxCRDsServed", func(t *testing.T) {
		for gv, want := range map[string][]string{
			"agents.x-k8s.io/v1beta1":            {"Sandbox"},
			"extensions.agents.x-k8s.io/v1beta1": {"SandboxClaim", "SandboxTemplate", "SandboxWarmPool"},
		} {
			list, err := cs.Discovery().ServerResourcesForGroupVersion(gv)
			if err != nil {
				t.Errorf("discovering %s: %v", gv, err)
				continue
			}
			var kinds []string
			for _, r := range list.APIResources {
				kinds = append(kinds, r.Kind)
			}
			for _, k := range want {
				if !slices.Contains(kinds, k) {
					t.Errorf("%s serves %v, want %s among them", gv, kinds, k)
				}
			}
		}
	})

	t.Run("Sandbox", func(t *testing.T) {
		testSandbox(ctx, t, c, ns.Name)
	})
	t.Run("DeploymentReconciledAndScheduled", func(t *testing.T) {
		testDeployment(ctx, t, cs, ns.Name)
	})
	t.Run("CSRSigned", func(t *testing.T) {
		testCSR(ctx, t, c)
	})
}

// testSandbox creates a Sandbox, reads it back, and checks that the
// agent-sandbox controller reconciles it into a Pod and reports status.
func testSandbox(ctx context.Context, t *testing.T, c *cluster.Cluster, ns string) {
	dyn, err := dynamic.NewForConfig(c.RESTConfig)
	if err != nil {
		t.Fatalf("creating dynamic client: %v", err)
	}
	const name, image = "hello", "example.invalid/sandbox:test" // never pulled: there are no nodes
	sandbox := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "agents.x-k8s.io/v1beta1",
		"kind":       "Sandbox",
		"metadata":   map[string]any{"name": name, "namespace": ns},
		"spec": map[string]any{
			"service": true,
			"podTemplate": map[string]any{
				"metadata": map[string]any{"labels": map[string]any{"app": name}},
				"spec": map[string]any{
					"containers": []any{map[string]any{"name": "main", "image": image}},
				},
			},
		},
	}}
	sandboxes := dyn.Resource(sandboxGVR).Namespace(ns)
	if _, err := sandboxes.Create(ctx, sandbox, metav1.CreateOptions{}); err != nil {
		t.Fatalf("creating Sandbox: %v", err)
	}
	got, err := sandboxes.Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		t.Fatalf("reading Sandbox back: %v", err)
	}
	containers, _, _ := unstructured.NestedSlice(got.Object, "spec", "podTemplate", "spec", "containers")
	if len(containers) != 1 || containers[0].(map[string]any)["image"] != image {
		t.Fatalf("Sandbox read back with containers %v, want one with image %s", containers, image)
	}

	// The controller creates a Pod named after the Sandbox and owned by it.
	var pod *corev1.Pod
	err = wait.PollUntilContextTimeout(ctx, 250*time.Millisecond, time.Minute, true, func(ctx context.Context) (bool, error) {
		p, err := c.Clientset.CoreV1().Pods(ns).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return false, nil
		}
		pod = p
		return true, nil
	})
	if err != nil {
		t.Fatalf("agent-sandbox-controller created no Pod for Sandbox %s/%s: %v", ns, name, err)
	}
	if !ownedBy(pod.OwnerReferences, "Sandbox", name) {
		t.Errorf("Pod %s owners %v, want Sandbox %s", pod.Name, pod.OwnerReferences, name)
	}

	// Its status settles on Ready=False with DependenciesNotReady while the
	// Pod cannot run, and names the headless Service asked for by
	// spec.service. (Earlier reconciles may report transient errors, such
	// as the namespace's default ServiceAccount not existing yet.)
	var status map[string]any
	err = wait.PollUntilContextTimeout(ctx, 250*time.Millisecond, time.Minute, true, func(ctx context.Context) (bool, error) {
		s, err := sandboxes.Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return false, nil
		}
		status, _, _ = unstructured.NestedMap(s.Object, "status")
		conds, _, _ := unstructured.NestedSlice(s.Object, "status", "conditions")
		for _, cond := range conds {
			if m, ok := cond.(map[string]any); ok && m["type"] == "Ready" {
				return m["status"] == string(metav1.ConditionFalse) && m["reason"] == "DependenciesNotReady" &&
					status["service"] == name, nil
			}
		}
		return false, nil
	})
	if err != nil {
		t.Fatalf("Sandbox %s/%s status did not settle (last status %v): %v", ns, name, status, err)
	}
	t.Logf("Sandbox status: %v", status)
	svc, err := c.Clientset.CoreV1().Services(ns).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		t.Fatalf("getting the Sandbox's Service: %v", err)
	}
	if svc.Spec.ClusterIP != corev1.ClusterIPNone || !ownedBy(svc.OwnerReferences, "Sandbox", name) {
		t.Errorf("Service %s has clusterIP %q and owners %v, want a headless Service owned by Sandbox %s",
			svc.Name, svc.Spec.ClusterIP, svc.OwnerReferences, name)
	}
	waitUnschedulable(ctx, t, c.Clientset, ns, name)
}

// testDeployment checks the controller manager (Deployment -> ReplicaSet ->
// Pod) and the scheduler (which finds the Pod unschedulable: no nodes).
func testDeployment(ctx context.Context, t *testing.T, cs kubernetes.Interface, ns string) {
	labels := map[string]string{"app": "web"}
	dep := &appsv1.Deployment{
		ObjectMeta: metav1.ObjectMeta{Name: "web", Namespace: ns},
		Spec: appsv1.DeploymentSpec{
			Replicas: ptr.To[int32](1),
			Selector: &metav1.LabelSelector{MatchLabels: labels},
			Template: corev1.PodTemplateSpec{
				ObjectMeta: metav1.ObjectMeta{Labels: labels},
				Spec: corev1.PodSpec{Containers: []corev1.Container{{
					Name:  "web",
					Image: "example.invalid/web:test",
				}}},
			},
		},
	}
	if _, err := cs.AppsV1().Deployments(ns).Create(ctx, dep, metav1.CreateOptions{}); err != nil {
		t.Fatalf("creating Deployment: %v", err)
	}
	var podName string
	err := wait.PollUntilContextTimeout(ctx, 250*time.Millisecond, time.Minute, true, func(ctx context.Context) (bool, error) {
		rss, err := cs.AppsV1().ReplicaSets(ns).List(ctx, metav1.ListOptions{})
		if err != nil {
			return false, nil
		}
		pods, err := cs.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: "app=web"})
		if err != nil {
			return false, nil
		}
		for _, rs := range rss.Items {
			if !ownedBy(rs.OwnerReferences, "Deployment", dep.Name) {
				continue
			}
			for _, p := range pods.Items {
				if ownedBy(p.OwnerReferences, "ReplicaSet", rs.Name) {
					podName = p.Name
					return true, nil
				}
			}
		}
		return false, nil
	})
	if err != nil {
		t.Fatalf("kube-controller-manager made no ReplicaSet with a Pod for Deployment %s/%s: %v", ns, dep.Name, err)
	}
	waitUnschedulable(ctx, t, cs, ns, podName)
}

// waitUnschedulable waits for the scheduler to mark the pod unschedulable,
// the visible sign that it looked at the pod in a cluster without nodes.
func waitUnschedulable(ctx context.Context, t *testing.T, cs kubernetes.Interface, ns, name string) {
	t.Helper()
	var last *corev1.PodCondition
	err := wait.PollUntilContextTimeout(ctx, 250*time.Millisecond, time.Minute, true, func(ctx context.Context) (bool, error) {
		p, err := cs.CoreV1().Pods(ns).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return false, nil
		}
		for i, cond := range p.Status.Conditions {
			if cond.Type == corev1.PodScheduled {
				last = &p.Status.Conditions[i]
				return cond.Status == corev1.ConditionFalse && cond.Reason == corev1.PodReasonUnschedulable, nil
			}
		}
		return false, nil
	})
	if err != nil {
		t.Fatalf("kube-scheduler did not mark Pod %s/%s unschedulable (last PodScheduled condition %+v): %v", ns, name, last, err)
	}
}

// testCSR checks that the controller manager signs approved client CSRs
// with the cluster CA.
func testCSR(ctx context.Context, t *testing.T, c *cluster.Cluster) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatalf("generating key: %v", err)
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
		Subject: pkix.Name{CommonName: "smolvm-e2e-user"},
	}, key)
	if err != nil {
		t.Fatalf("creating CSR: %v", err)
	}
	csr := &certificatesv1.CertificateSigningRequest{
		ObjectMeta: metav1.ObjectMeta{Name: "smolvm-e2e-user"},
		Spec: certificatesv1.CertificateSigningRequestSpec{
			Request:           pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}),
			SignerName:        certificatesv1.KubeAPIServerClientSignerName,
			ExpirationSeconds: ptr.To[int32](3600),
			Usages:            []certificatesv1.KeyUsage{certificatesv1.UsageClientAuth},
		},
	}
	csrs := c.Clientset.CertificatesV1().CertificateSigningRequests()
	if csr, err = csrs.Create(ctx, csr, metav1.CreateOptions{}); err != nil {
		t.Fatalf("submitting CSR: %v", err)
	}
	csr.Status.Conditions = append(csr.Status.Conditions, certificatesv1.CertificateSigningRequestCondition{
		Type:    certificatesv1.CertificateApproved,
		Status:  corev1.ConditionTrue,
		Reason:  "E2E",
		Message: "approved by the control plane test",
	})
	if _, err := csrs.UpdateApproval(ctx, csr.Name, csr, metav1.UpdateOptions{}); err != nil {
		t.Fatalf("approving CSR: %v", err)
	}
	var cert []byte
	err = wait.PollUntilContextTimeout(ctx, 250*time.Millisecond, time.Minute, true, func(ctx context.Context) (bool, error) {
		got, err := csrs.Get(ctx, csr.Name, metav1.GetOptions{})
		if err != nil {
			return false, nil
		}
		cert = got.Status.Certificate
		return len(cert) > 0, nil
	})
	if err != nil {
		t.Fatalf("kube-controller-manager did not sign the approved CSR: %v", err)
	}
	if err := verifyIssuedBy(cert, c.CACertPath); err != nil {
		t.Error(err)
	}
}

// verifyIssuedBy checks that certPEM chains to the CA in caPath for client
// authentication.
func verifyIssuedBy(certPEM []byte, caPath string) error {
	block, _ := pem.Decode(certPEM)
	if block == nil {
		return fmt.Errorf("signed certificate is not PEM: %q", certPEM)
	}
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		return fmt.Errorf("parsing signed certificate: %w", err)
	}
	caPEM, err := os.ReadFile(caPath)
	if err != nil {
		return fmt.Errorf("reading cluster CA: %w", err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(caPEM) {
		return fmt.Errorf("no certificate in %s", caPath)
	}
	_, err = cert.Verify(x509.VerifyOptions{
		Roots:     roots,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	})
	if err != nil {
		return fmt.Errorf("signed certificate does not verify against the cluster CA: %w", err)
	}
	return nil
}

// ownedBy reports whether refs name an owner of the given kind and name.
func ownedBy(refs []metav1.OwnerReference, kind, name string) bool {
	return slices.ContainsFunc(refs, func(r metav1.OwnerReference) bool {
		return r.Kind == kind && r.Name == name
	})
}

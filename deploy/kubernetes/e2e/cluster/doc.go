// Package cluster runs a real, single-machine Kubernetes control plane for
// integration tests: Debian's etcd, kube-apiserver, kube-scheduler and
// kube-controller-manager built from the k8s.io/kubernetes module, and the
// agent-sandbox controller with its CRDs. Everything listens on 127.0.0.1
// and lives in a temporary directory. There are no nodes.
//
// Build the binaries first with deploy/kubernetes/e2e/build.sh. The package
// is Linux-only.
package cluster

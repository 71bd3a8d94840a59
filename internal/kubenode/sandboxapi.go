package kubenode

import (
	"net/http"

	"github.com/smolvm/smolvm/internal/api"
)

// SandboxAPIPrefix is where a node serves the smolvm HTTP API of its pods'
// sandboxes, beside the kubelet API and behind the same authentication:
// /smolvm/pods/{namespace}/{name}/exec is POST /sandboxes/{id}/exec of the
// pod's sandbox. The gateway knows pods, not the ids sandboxes have on
// their node, and a pod made again elsewhere keeps its name.
const SandboxAPIPrefix = "/smolvm/pods/"

// sandboxAPI serves SandboxAPIPrefix from inner, the node's own API.
func (p *Provider) sandboxAPI(inner http.Handler) http.Handler {
	mux := http.NewServeMux()
	serve := func(w http.ResponseWriter, r *http.Request, rest string) {
		ns, name := r.PathValue("namespace"), r.PathValue("name")
		id, err := p.sandboxOf(ns, name)
		if err != nil {
			api.WriteProblem(w, r, http.StatusNotFound, api.CodeSandboxNotFound, "pod "+ns+"/"+name+" has no sandbox on node "+p.node)
			return
		}
		r2 := r.Clone(r.Context())
		r2.URL.Path, r2.URL.RawPath = "/sandboxes/"+id+rest, ""
		inner.ServeHTTP(w, r2)
	}
	mux.HandleFunc(SandboxAPIPrefix+"{namespace}/{name}", func(w http.ResponseWriter, r *http.Request) {
		// The sandbox goes with its pod: deleting it here would leave
		// the pod to be made again.
		if r.Method == http.MethodDelete {
			api.WriteProblem(w, r, http.StatusMethodNotAllowed, api.CodeMethodNotAllowed, "a pod's sandbox is deleted with its pod")
			return
		}
		serve(w, r, "")
	})
	mux.HandleFunc(SandboxAPIPrefix+"{namespace}/{name}/{rest...}", func(w http.ResponseWriter, r *http.Request) {
		serve(w, r, "/"+r.PathValue("rest"))
	})
	// A stopped VM is a finished pod, which Kubernetes does not let run
	// again; and a snapshot would stay on this node, where no create
	// through the cluster could use it.
	for _, route := range []string{"stop", "start", "snapshots"} {
		mux.HandleFunc("POST "+SandboxAPIPrefix+"{namespace}/{name}/"+route, func(w http.ResponseWriter, r *http.Request) {
			api.WriteProblem(w, r, http.StatusNotImplemented, "not_supported_in_cluster", "a pod's sandbox cannot be stopped, started or snapshotted: delete the pod (or its Sandbox) to end it")
		})
	}
	return mux
}

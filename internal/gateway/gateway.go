// Package gateway serves the smolvm HTTP API over a Kubernetes cluster
// whose smolvm nodes run the VMs (`smolvm server start --kubeconfig`).
//
// It keeps no state of its own, so any number of replicas may serve the
// same namespace. A create becomes an agent-sandbox Sandbox (or a
// SandboxClaim on a warm pool of the same shape), which the agent-sandbox
// controller turns into a pod and the scheduler places on a smolvm node;
// list, get and delete read and delete those objects; everything else a
// sandbox answers (exec, files, processes, ports, terminals) is proxied
// to the node that runs its pod, which serves the same API for it.
package gateway

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"time"

	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/smolvm/smolvm/internal/api"
)

// The agent-sandbox resources the gateway works with (v1beta1, the
// version its CRDs store).
var (
	sandboxesGVR = schema.GroupVersionResource{Group: "agents.x-k8s.io", Version: "v1beta1", Resource: "sandboxes"}
	claimsGVR    = schema.GroupVersionResource{Group: "extensions.agents.x-k8s.io", Version: "v1beta1", Resource: "sandboxclaims"}
	poolsGVR     = schema.GroupVersionResource{Group: "extensions.agents.x-k8s.io", Version: "v1beta1", Resource: "sandboxwarmpools"}
	templatesGVR = schema.GroupVersionResource{Group: "extensions.agents.x-k8s.io", Version: "v1beta1", Resource: "sandboxtemplates"}
)

// Labels and annotations the gateway puts on what it creates.
const (
	// LabelManagedBy marks the Sandboxes and claims the gateway made:
	// list shows only those.
	LabelManagedBy = "app.kubernetes.io/managed-by"
	managedBy      = "smolvm"
	// LabelName holds a sandbox's name, when it was given one.
	LabelName = "smolvm.dev/name"
	// annotationRequest keeps the create request, for what the objects
	// cannot say (the user's labels, which Kubernetes label syntax would
	// not always take, and the shape asked for).
	annotationRequest = "smolvm.dev/request"
	// annotationPodName is where the agent-sandbox controller records
	// the pod of a Sandbox, when it is not the Sandbox's own name.
	annotationPodName = "agents.x-k8s.io/pod-name"
)

// Config configures a gateway.
type Config struct {
	// REST reaches the API server.
	REST *rest.Config
	// Namespace holds the gateway's Sandboxes; "default" when empty.
	Namespace string
	// RuntimeClass is the pods' runtime class; "smolvm" when empty.
	RuntimeClass string
	// NodeCAFile verifies the nodes' serving certificates. Without it
	// they are not verified, as the API server does not verify kubelets'
	// unless told to (--kubelet-certificate-authority).
	NodeCAFile string
	// CreateTimeout bounds how long a create waits for its VM to run;
	// 10 minutes when 0.
	CreateTimeout time.Duration
	Logger        *slog.Logger
}

// Gateway serves the API over one namespace.
type Gateway struct {
	dyn      dynamic.Interface
	core     kubernetes.Interface
	ns       string
	class    string
	timeout  time.Duration
	nodes    http.RoundTripper // to the nodes' API, with the gateway's credentials
	decoder  *api.CreateDecoder
	log      *slog.Logger
	document []byte
}

// New returns a gateway; it does not reach the API server yet.
func New(c Config) (*Gateway, error) {
	if c.REST == nil {
		return nil, errors.New("a gateway needs a Kubernetes API server to talk to")
	}
	g := &Gateway{ns: c.Namespace, class: c.RuntimeClass, timeout: c.CreateTimeout, log: c.Logger, decoder: api.NewCreateDecoder()}
	if g.ns == "" {
		g.ns = "default"
	}
	if g.class == "" {
		g.class = "smolvm"
	}
	if g.timeout == 0 {
		g.timeout = 10 * time.Minute
	}
	if g.log == nil {
		g.log = slog.New(slog.DiscardHandler)
	}
	var err error
	if g.dyn, err = dynamic.NewForConfig(c.REST); err != nil {
		return nil, fmt.Errorf("a Kubernetes client: %w", err)
	}
	if g.core, err = kubernetes.NewForConfig(c.REST); err != nil {
		return nil, fmt.Errorf("a Kubernetes client: %w", err)
	}
	if g.nodes, err = nodeTransport(c.REST, c.NodeCAFile); err != nil {
		return nil, err
	}
	if g.document, err = api.OpenAPIDocument(); err != nil {
		return nil, err
	}
	return g, nil
}

// Handler is the API's routes; wrap it with api.Wrap for the token and
// Host checks and request logging.
func (g *Gateway) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /openapi.json", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/openapi+json")
		w.Write(g.document)
	})
	mux.HandleFunc("POST /sandboxes", g.create)
	mux.HandleFunc("GET /sandboxes", g.list)
	mux.HandleFunc("GET /sandboxes/{id}", g.get)
	mux.HandleFunc("DELETE /sandboxes/{id}", g.delete)
	mux.HandleFunc("/sandboxes/{id}/{rest...}", g.proxy)
	// A time limit is the Sandbox's shutdownTime, set when it is made.
	mux.HandleFunc("PATCH /sandboxes/{id}", func(w http.ResponseWriter, r *http.Request) {
		api.WriteProblem(w, r, http.StatusNotImplemented, CodeNotInCluster, "a sandbox's time limit is set when it is created, in a cluster")
	})
	notAllowed := func(w http.ResponseWriter, r *http.Request) {
		api.WriteProblem(w, r, http.StatusMethodNotAllowed, api.CodeMethodNotAllowed, r.Method+" is not served on "+r.URL.Path)
	}
	mux.HandleFunc("/sandboxes", notAllowed)
	mux.HandleFunc("/sandboxes/{id}", notAllowed)
	hostRoute := func(w http.ResponseWriter, r *http.Request) {
		api.WriteProblem(w, r, http.StatusNotImplemented, CodeNotInCluster,
			"the gateway serves /sandboxes and each sandbox's routes; "+r.URL.Path+" is served by a plain `smolvm server` only")
	}
	// The single server's other routes: about its host, which a cluster
	// is not.
	for _, p := range []string{"/capabilities", "/diagnostics", "/events", "/snapshots", "/snapshots/", "/mcp", "/docs", "/openapi.yaml", "/ui", "/ui/"} {
		mux.HandleFunc(p, hostRoute)
	}
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		api.WriteProblem(w, r, http.StatusNotFound, api.CodeNotFound, "no route "+r.Method+" "+r.URL.Path)
	})
	return mux
}

// Problem codes of the gateway's own.
const (
	// CodeNotInCluster: a route or request field a cluster does not
	// serve (snapshots, mounts, a named backend...).
	CodeNotInCluster = "not_supported_in_cluster"
	// CodeNodeUnreachable: the node running the sandbox did not answer.
	CodeNodeUnreachable = "node_unreachable"
	// CodeCreateTimeout: the VM was not running within the create's
	// time; the Sandbox is deleted.
	CodeCreateTimeout = "create_timeout"
	// CodeKubernetes: the API server refused or failed a call.
	CodeKubernetes = "kubernetes_error"
)

// newID is a sandbox id, the name of its Sandbox or claim: the same form
// as a single server's ids.
func newID() string {
	b := make([]byte, 4)
	rand.Read(b)
	return "vm-" + hex.EncodeToString(b)
}

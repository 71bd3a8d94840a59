package gateway

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"strconv"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/rest"

	"github.com/smolvm/smolvm/internal/api"
	"github.com/smolvm/smolvm/internal/kubenode"
)

// nodeTransport reaches the nodes' API as the gateway: with the client
// certificate or token of its kubeconfig, which each node checks with the
// API server (nodes/proxy). HTTP/1.1 only, so terminals (WebSocket
// upgrades) pass through.
func nodeTransport(c *rest.Config, caFile string) (http.RoundTripper, error) {
	nc := rest.CopyConfig(c)
	nc.TLSClientConfig.CAFile, nc.TLSClientConfig.CAData, nc.TLSClientConfig.ServerName = "", nil, ""
	tlsConfig, err := rest.TLSConfigFor(nc)
	if err != nil {
		return nil, fmt.Errorf("TLS for the nodes: %w", err)
	}
	if tlsConfig == nil {
		tlsConfig = &tls.Config{MinVersion: tls.VersionTLS12}
	}
	tlsConfig.NextProtos = []string{"http/1.1"}
	if caFile != "" {
		pem, err := os.ReadFile(caFile)
		if err != nil {
			return nil, fmt.Errorf("reading the nodes' CA: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("the nodes' CA %s holds no PEM certificate", caFile)
		}
		tlsConfig.RootCAs, tlsConfig.InsecureSkipVerify = pool, false
	} else {
		tlsConfig.InsecureSkipVerify = true
	}
	t := &http.Transport{
		DialContext:         (&net.Dialer{Timeout: 10 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		TLSClientConfig:     tlsConfig,
		TLSHandshakeTimeout: 10 * time.Second,
		MaxIdleConnsPerHost: 16,
		IdleConnTimeout:     90 * time.Second,
	}
	rt, err := rest.HTTPWrappersForConfig(nc, t)
	if err != nil {
		return nil, fmt.Errorf("credentials for the nodes: %w", err)
	}
	return rt, nil
}

// target is where a sandbox's routes are served: its pod's path on the
// node that runs it.
type target struct {
	base *url.URL // https://node:port
	path string   // /smolvm/pods/{namespace}/{pod}
	node string
}

// errNotPlaced: the sandbox has no running pod on a node (yet).
var errNotPlaced = errors.New("not placed")

// targetOf finds where pod runs.
func (g *Gateway) targetOf(ctx context.Context, pod *corev1.Pod) (target, error) {
	if pod == nil || pod.Spec.NodeName == "" || pod.Status.Phase != corev1.PodRunning {
		return target{}, errNotPlaced
	}
	node, err := g.core.CoreV1().Nodes().Get(ctx, pod.Spec.NodeName, metav1.GetOptions{})
	if err != nil {
		return target{}, fmt.Errorf("reading node %s: %w", pod.Spec.NodeName, err)
	}
	var addr string
	for _, a := range node.Status.Addresses {
		if a.Type == corev1.NodeInternalIP {
			addr = a.Address
			break
		}
	}
	port := node.Status.DaemonEndpoints.KubeletEndpoint.Port
	if addr == "" || port == 0 {
		return target{}, fmt.Errorf("node %s reports no internal address and port", node.Name)
	}
	return target{
		base: &url.URL{Scheme: "https", Host: net.JoinHostPort(addr, strconv.Itoa(int(port)))},
		path: kubenode.SandboxAPIPrefix + url.PathEscape(pod.Namespace) + "/" + url.PathEscape(pod.Name),
		node: node.Name,
	}, nil
}

// proxy passes a sandbox's route to its node. Responses stream as they
// come (exec output, terminals, followed process output); the node's
// statuses and problems, 408 command_timeout included, pass unchanged.
func (g *Gateway) proxy(w http.ResponseWriter, r *http.Request) {
	ctx := r.Context()
	s, ok := g.find(w, r, r.PathValue("id"))
	if !ok {
		return
	}
	t, err := g.targetOf(ctx, s.pod)
	if errors.Is(err, errNotPlaced) {
		api.WriteProblem(w, r, http.StatusConflict, api.CodeSandboxNotRunning, fmt.Sprintf("sandbox %s is %s: it has no running VM on a node yet", s.id, s.status()))
		return
	}
	if err != nil {
		api.WriteProblem(w, r, http.StatusBadGateway, CodeNodeUnreachable, err.Error())
		return
	}
	rp := &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.Out.URL.Scheme, pr.Out.URL.Host = t.base.Scheme, t.base.Host
			pr.Out.URL.Path, pr.Out.URL.RawPath = t.path+"/"+pr.In.PathValue("rest"), ""
			pr.Out.Host = t.base.Host
			// The caller's token is for the gateway; the node is
			// shown the gateway's own credentials. The gateway has
			// checked the Origin against its own name, which is
			// not the node's.
			pr.Out.Header.Del("Authorization")
			pr.Out.Header.Del("Origin")
			withoutToken(pr.Out.Header)
		},
		Transport:      g.nodes,
		FlushInterval:  -1,
		ModifyResponse: func(res *http.Response) error { return renameInstance(res, r.URL.Path) },
		ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
			if r.Context().Err() != nil {
				return // the caller left
			}
			g.log.Warn("a node did not answer", "node", t.node, "sandbox", s.id, "err", err)
			api.WriteProblem(w, r, http.StatusBadGateway, CodeNodeUnreachable, fmt.Sprintf("node %s, which runs sandbox %s, did not answer: %v", t.node, s.id, err))
		},
	}
	rp.ServeHTTP(w, r)
}

// wsTokenPrefix starts the WebSocket subprotocol a browser sends its
// token in (it cannot set Authorization on a WebSocket).
const wsTokenPrefix = "bearer.token.smolvm.dev."

// withoutToken drops that subprotocol: the token is the gateway's.
func withoutToken(h http.Header) {
	var keep []string
	for _, v := range h.Values("Sec-WebSocket-Protocol") {
		for _, p := range strings.Split(v, ",") {
			if p = strings.TrimSpace(p); p != "" && !strings.HasPrefix(p, wsTokenPrefix) {
				keep = append(keep, p)
			}
		}
	}
	h.Del("Sec-WebSocket-Protocol")
	if len(keep) > 0 {
		h.Set("Sec-WebSocket-Protocol", strings.Join(keep, ", "))
	}
}

// renameInstance makes a node's problem name the path the caller asked
// for, not the node's own (which holds the node's id of the sandbox).
func renameInstance(res *http.Response, path string) error {
	if mt, _, _ := mime.ParseMediaType(res.Header.Get("Content-Type")); mt != "application/problem+json" {
		return nil
	}
	b, err := io.ReadAll(res.Body)
	res.Body.Close()
	if err != nil {
		return fmt.Errorf("reading a node's problem: %w", err)
	}
	var fields map[string]json.RawMessage
	if json.Unmarshal(b, &fields) == nil && fields["instance"] != nil {
		if inst, err := json.Marshal(path); err == nil {
			fields["instance"] = inst
			if nb, err := json.Marshal(fields); err == nil {
				b = append(nb, '\n')
			}
		}
	}
	res.Body = io.NopCloser(bytes.NewReader(b))
	res.ContentLength = int64(len(b))
	res.Header.Set("Content-Length", strconv.Itoa(len(b)))
	return nil
}

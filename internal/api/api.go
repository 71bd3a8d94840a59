// Package api serves the sandbox Manager over HTTP+JSON, as described by the
// OpenAPI 3.1 document it generates from its own Go types. Handlers decode,
// validate and map errors; every decision about VMs is the Manager's.
package api

import (
	"bytes"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"time"

	"github.com/danielgtaylor/huma/v2"
	"github.com/danielgtaylor/huma/v2/adapters/humago"
	sdk "github.com/modelcontextprotocol/go-sdk/mcp"

	"github.com/smolvm/smolvm/internal/mcp"
	"github.com/smolvm/smolvm/internal/sandbox"
	"github.com/smolvm/smolvm/internal/ui"
)

// APIVersion is the version of the HTTP interface (info.version in the
// OpenAPI document). It changes when the interface does, not with every
// build, so the committed document stays stable.
const APIVersion = "1.0.0"

// Options configure the HTTP server.
type Options struct {
	// Token, when set, is required as "Authorization: Bearer <Token>" on
	// every route except the OpenAPI document and the docs page.
	Token string
	// Addr is the host:port the server listens on. When its host is a
	// loopback address, only Host headers naming that port on a loopback
	// name are accepted (a defence against DNS rebinding). When empty, any
	// port on a loopback name is accepted. When its host is not loopback,
	// Host is not checked (a token is required there instead) unless
	// AllowedHosts is set.
	Addr string
	// AllowedHosts are further Host header values (host or host:port) to
	// accept, e.g. a name the server is reached by through a proxy.
	AllowedHosts []string
	// Version is the program's version, sent in the Server header.
	Version string
	// Logger receives one line per request; nil logs nothing.
	Logger *slog.Logger
	// Stop, when closed, ends the long-lived responses (GET /events), which
	// a graceful shutdown would otherwise wait for.
	Stop <-chan struct{}
	// Keepalive is how often an idle event stream gets a comment; 0 means
	// every 15 s.
	Keepalive time.Duration
}

func init() {
	// huma builds every error it produces itself through these package
	// variables (there is no per-API hook), and learns the error schema of
	// the OpenAPI document from them; they must be replaced before any API
	// is built.
	huma.NewError = newHumaError
	huma.NewErrorWithContext = func(_ huma.Context, status int, msg string, errs ...error) huma.StatusError {
		return newHumaError(status, msg, errs...)
	}
}

// setInstance fills in the request path of every problem huma writes, so
// handlers need not know it.
func setInstance(hctx huma.Context, _ string, v any) (any, error) {
	var p *Problem
	switch e := v.(type) {
	case *Problem:
		p = e
	case *CommandTimeoutProblem:
		p = &e.Problem
	}
	if p != nil && p.Instance == "" {
		p.Instance = hctx.URL().Path
	}
	return v, nil
}

// New returns the HTTP handler serving m. m may be nil only to render the
// OpenAPI document.
func New(m *sandbox.Manager, opts Options) http.Handler {
	inner, _ := build(m, opts)
	return Wrap(inner, opts)
}

// Wrap puts around routes of another backend (the Kubernetes gateway) what
// New puts around the Manager's: the Host and token guard, large-body
// release, panic recovery, request logging and the Server header.
func Wrap(inner http.Handler, opts Options) http.Handler {
	g := newGuard(opts)
	var h http.Handler = g.wrap(releaseLarge(inner))
	h = recoverer(h, opts.Logger)
	if opts.Logger != nil {
		h = logRequests(h, opts.Logger)
	}
	if opts.Version != "" {
		h = withServerHeader(h, "smolvm/"+opts.Version)
	}
	return h
}

// MCPServer returns the MCP tools over m, served in this process without
// HTTP (`smolvm mcp`); the server's /mcp offers the same tools.
func MCPServer(m *sandbox.Manager, version string) (*sdk.Server, error) {
	inner, spec := build(m, Options{Version: version})
	return mcp.New(spec, mcp.HandlerCaller(recoverer(inner, slog.Default())), version)
}

// build returns the routes without the guard and logging around them, and
// the OpenAPI document as JSON.
func build(m *sandbox.Manager, opts Options) (http.Handler, []byte) {
	mux := http.NewServeMux()
	hapi, hs := newAPI(mux, m)
	hs.stop, hs.keepalive = opts.Stop, opts.Keepalive
	if hs.keepalive <= 0 {
		hs.keepalive = eventsKeepalive
	}
	mux.HandleFunc("GET /events", hs.events)
	mux.HandleFunc("GET /sandboxes/{id}/pty", hs.terminal)
	mux.HandleFunc("GET /sandboxes/{id}/files", hs.downloadFile)
	mux.HandleFunc("PUT /sandboxes/{id}/files", hs.uploadFile)

	doc := hapi.OpenAPI()
	specJSON, err := json.Marshal(doc)
	if err != nil {
		// The document is built from our own static types: failing to
		// marshal it is a programming error caught by every test.
		panic(fmt.Sprintf("marshal OpenAPI document: %v", err))
	}
	specYAML, err := doc.YAML()
	if err != nil {
		panic(fmt.Sprintf("marshal OpenAPI document as YAML: %v", err))
	}
	serveStatic(mux, "GET /openapi.json", "application/openapi+json", specJSON)
	serveStatic(mux, "GET /openapi.yaml", "application/openapi+yaml", specYAML)
	mux.HandleFunc("GET /docs", serveDocs)
	mux.Handle("GET "+ui.Prefix, ui.Handler())
	mux.Handle("GET /ui", http.RedirectHandler(ui.Prefix, http.StatusMovedPermanently))
	mux.HandleFunc("/", fallback(mux))

	inner := streamExec(hs, mux)
	if m != nil {
		// The SDK runs each tool call on a goroutine of its own and does
		// not recover: a handler's panic must end as a 500 there too.
		tools, err := mcp.New(specJSON, mcp.HandlerCaller(recoverer(inner, opts.Logger)), opts.Version)
		if err != nil {
			// The tools are built from our own document; failing is a
			// programming error caught by every test.
			panic(fmt.Sprintf("build the MCP tools: %v", err))
		}
		// Stateless with plain JSON answers: every tool call is one
		// request and one answer, so there is no session to keep and no
		// stream a proxy could cut.
		mux.Handle("/mcp", sdk.NewStreamableHTTPHandler(func(*http.Request) *sdk.Server { return tools },
			// The guard has checked Host already, against this server's
			// own names (a proxy's too, when configured); the SDK's
			// check knows only loopback names.
			&sdk.StreamableHTTPOptions{Stateless: true, JSONResponse: true, MaxRequestBodyBytes: maxMCPBodyBytes, DisableLocalhostProtection: true}))
	}
	return inner, specJSON
}

// OpenAPIDocument returns the OpenAPI document, indented, exactly as it is
// committed in api/openapi.json.
func OpenAPIDocument() ([]byte, error) {
	hapi, _ := newAPI(http.NewServeMux(), nil)
	b, err := json.Marshal(hapi.OpenAPI())
	if err != nil {
		return nil, fmt.Errorf("marshal OpenAPI document: %w", err)
	}
	return indent(b)
}

func indent(b []byte) ([]byte, error) {
	var out bytes.Buffer
	if err := json.Indent(&out, b, "", "  "); err != nil {
		return nil, fmt.Errorf("indent OpenAPI document: %w", err)
	}
	out.WriteByte('\n')
	return out.Bytes(), nil
}

func newAPI(mux *http.ServeMux, m *sandbox.Manager) (huma.API, *handlers) {
	config := huma.DefaultConfig("SmolVM HTTP API", APIVersion)
	// No $schema links in bodies: responses keep exactly the shape the
	// specification shows.
	config.CreateHooks = nil
	// The document and docs page are served by this package, from bytes
	// rendered once, rather than lazily by huma.
	config.OpenAPIPath = ""
	config.DocsPath = ""
	config.SchemasPath = ""
	config.Info.Description = description
	config.Components.SecuritySchemes = map[string]*huma.SecurityScheme{
		"bearerAuth": {
			Type:        "http",
			Scheme:      "bearer",
			Description: "Required only when the server was started with a token (--token or $SMOLVM_TOKEN), and always when it listens on a non-loopback address.",
		},
	}
	// Either the bearer token or nothing: the token is optional.
	config.Security = []map[string][]string{{"bearerAuth": {}}, {}}
	config.Transformers = []huma.Transformer{setInstance}
	config.Formats = map[string]huma.Format{"application/json": jsonFormat, "json": jsonFormat}
	config.Tags = []*huma.Tag{
		{Name: "sandboxes", Description: "Create, inspect, run commands in and delete sandboxes."},
		{Name: "host", Description: "What this server and host support, and the host's checks."},
		{Name: "files", Description: "Files in a sandbox: upload and download (streamed, or as tar), describe, list, create directories, move, delete."},
		{Name: "processes", Description: "Background processes in a sandbox: start, list, read and follow output, write input, signal."},
	}

	hapi := humago.New(mux, config)
	h := &handlers{m: m}
	registerSandboxes(hapi, h)
	documentExecStream(hapi)
	documentTerminal(hapi)
	documentEvents(hapi)
	h.routes = operations(hapi.OpenAPI())
	return hapi, h
}

func serveStatic(mux *http.ServeMux, pattern, contentType string, body []byte) {
	mux.HandleFunc(pattern, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", contentType)
		w.Write(body)
	})
}

const description = `Create Linux sandboxes (real virtual machines) on this host and run commands in them.

A command that runs and exits with a non-zero status is still a successful (200) exec response: check exit_code, stdout and stderr. A command that runs past its timeout is killed and answered with 408 and code command_timeout, carrying the output it wrote before that; the sandbox keeps running.

Errors are RFC 9457 problem details (application/problem+json) with a stable snake_case code and, when one is at fault, the request field:

| Status | Code | When |
|---|---|---|
| 400 | malformed_json | the body is not valid JSON |
| 400 | body_required | an operation that needs a body got none |
| 401 | unauthorized | the server has a token and the request did not carry it |
| 403 | forbidden_origin | a browser request from another origin (Origin or Sec-Fetch-Site) |
| 403 | forbidden_host | the Host header is not this server's (DNS rebinding) |
| 404 | sandbox_not_found | no sandbox has this id |
| 404 | not_found | no such route |
| 405 | method_not_allowed | the route exists, but not with this method |
| 408 | command_timeout | the command ran past its timeout (exec only) |
| 409 | sandbox_not_running | the sandbox is not in a state to run commands |
| 413 | body_too_large | the body is over 1 MiB |
| 415 | unsupported_media_type | a body was sent without Content-Type: application/json |
| 422 | validation_failed | a field is of the wrong type, out of range, not one of its values, unknown, or missing |
| 422 | unsupported_os | the OS is valid but cannot run on this host |
| 422 | backend_unavailable | the backend is valid but not available on this host; the detail names what is missing |
| 500 | internal_error | a failure on the server's side; the detail says what failed |
| 503 | shutting_down | the server stopped before the request finished |

The sandbox manager adds more specific codes with the same statuses, for example invalid_disk_size (422: smaller than the image), unsupported_image (422), kernel_missing (422: run smolvm setup), agent_unreachable (409: the VM does not answer) and agent_incompatible (409: the guest agent speaks a protocol version this server does not serve; stop and start the sandbox).

The server accepts only requests addressed to it by its own host name (Host header) and refuses requests made by web pages from other origins. Request bodies must be sent as application/json.`

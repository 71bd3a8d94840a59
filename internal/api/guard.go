package api

import (
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"fmt"
	"log/slog"
	"mime"
	"net"
	"net/http"
	"net/url"
	"runtime/debug"
	"strings"
	"time"

	"github.com/smolvm/smolvm/internal/ui"
)

// maxBodyBytes bounds every request body; it is huma's default per
// operation, which enforces it for bodies of unknown length.
const maxBodyBytes = 1 << 20

// maxMCPBodyBytes bounds a request to /mcp, whose write_file tool carries a
// whole file in one JSON message.
const maxMCPBodyBytes = 4 << 20

// guard refuses requests that a web page or a DNS-rebinding attacker could
// make, and requests without the token when one is configured. The server
// can run commands on the user's machine, so these run before any route.
type guard struct {
	tokenSum [sha256.Size]byte
	hasToken bool
	// hosts are the accepted Host values, lower case; nil accepts any.
	hosts map[string]bool
	// anyLoopbackPort accepts a loopback name on any port (Addr unknown).
	anyLoopbackPort bool
}

// isPublic reports the routes that stay open without a token: they describe
// the API or are the dashboard's own files, and reveal nothing about
// sandboxes (the dashboard asks for the token before it shows any).
func isPublic(path string) bool {
	switch path {
	case "/openapi.json", "/openapi.yaml", "/docs", "/ui":
		return true
	}
	return strings.HasPrefix(path, ui.Prefix)
}

// loopbackNames are the Host names by which a loopback server is reached.
func loopbackNames() []string { return []string{"localhost", "127.0.0.1", "[::1]"} }

func newGuard(opts Options) *guard {
	g := &guard{}
	if opts.Token != "" {
		g.hasToken = true
		g.tokenSum = sha256.Sum256([]byte(opts.Token))
	}
	extra := func() {
		for _, h := range opts.AllowedHosts {
			g.hosts[strings.ToLower(h)] = true
		}
	}
	host, port, err := net.SplitHostPort(opts.Addr)
	switch {
	case opts.Addr == "" || err != nil:
		g.hosts = map[string]bool{}
		g.anyLoopbackPort = true
		extra()
	case IsLoopback(host):
		g.hosts = map[string]bool{}
		names := append([]string{hostForURL(host)}, loopbackNames()...)
		for _, n := range names {
			g.hosts[strings.ToLower(n)+":"+port] = true
			if port == "80" {
				g.hosts[strings.ToLower(n)] = true
			}
		}
		extra()
	case len(opts.AllowedHosts) > 0:
		g.hosts = map[string]bool{}
		for _, n := range loopbackNames() {
			g.hosts[n+":"+port] = true
		}
		extra()
	}
	return g
}

// IsLoopback reports whether host (a name or an IP, IPv6 with or without
// brackets) can only be reached from this machine.
func IsLoopback(host string) bool {
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip := net.ParseIP(strings.Trim(host, "[]"))
	return ip != nil && ip.IsLoopback()
}

// hostForURL brackets IPv6 literals as they appear in a Host header.
func hostForURL(host string) string {
	if strings.Contains(host, ":") && !strings.HasPrefix(host, "[") {
		return "[" + host + "]"
	}
	return host
}

func (g *guard) hostAllowed(hostHeader string) bool {
	h := strings.ToLower(hostHeader)
	if g.hosts == nil || g.hosts[h] {
		return true
	}
	if g.anyLoopbackPort {
		name := h
		if n, _, err := net.SplitHostPort(h); err == nil {
			name = hostForURL(n)
		}
		for _, l := range loopbackNames() {
			if name == l {
				return true
			}
		}
		// A bare IPv6 literal such as [::1] without a port.
		if strings.Trim(name, "[]") == "::1" {
			return true
		}
	}
	return false
}

func (g *guard) wrap(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !g.hostAllowed(r.Host) {
			writeProblem(w, r, newProblem(http.StatusForbidden, CodeForbiddenHost,
				fmt.Sprintf("Host %q is not this server; use the address it listens on (e.g. http://127.0.0.1:PORT)", r.Host)))
			return
		}
		if reason := crossOrigin(r); reason != "" {
			writeProblem(w, r, newProblem(http.StatusForbidden, CodeForbiddenOrigin,
				reason+"; the API refuses requests made by web pages from other origins"))
			return
		}
		if g.hasToken && !isPublic(r.URL.Path) && !g.tokenOK(r) {
			w.Header().Set("WWW-Authenticate", `Bearer realm="smolvm"`)
			writeProblem(w, r, newProblem(http.StatusUnauthorized, CodeUnauthorized,
				"this server requires a token: send the header \"Authorization: Bearer <token>\" with the token the server was started with"))
			return
		}
		// A file upload's body is the file, of any size; its handler
		// checks the media type.
		rawBody := r.Method == http.MethodPut && isFilesPath(r.URL.Path)
		if hasBody(r) && !rawBody && !isJSON(r.Header.Get("Content-Type")) {
			p := newProblem(http.StatusUnsupportedMediaType, CodeUnsupportedMediaType,
				fmt.Sprintf("request bodies must be sent with Content-Type: application/json (got %q)", r.Header.Get("Content-Type")))
			p.Field = "Content-Type"
			w.Header().Set("Accept-Post", "application/json")
			writeProblem(w, r, p)
			return
		}
		limit := int64(maxBodyBytes)
		if r.URL.Path == "/mcp" {
			limit = maxMCPBodyBytes
		}
		if r.ContentLength > limit && !rawBody {
			// Answer from the header, before the body: net/http sends no
			// "100 Continue" to a client that asked for one, so the body
			// is never sent, and the connection is closed rather than
			// drained.
			w.Header().Set("Connection", "close")
			writeProblem(w, r, newProblem(http.StatusRequestEntityTooLarge, CodeBodyTooLarge,
				fmt.Sprintf("the request body is %d bytes; the limit is %d bytes", r.ContentLength, limit)))
			return
		}
		if !hasBody(r) {
			w = keepReadDeadline{w}
		}
		next.ServeHTTP(w, r)
	})
}

// keepReadDeadline ignores read deadlines for requests without a body. huma
// sets one on every operation that accepts a body (POST /sandboxes takes an
// optional one) so a slow body cannot hold a connection; net/http clears it
// once a body is read. With no body, net/http is already blocked reading the
// connection to notice the client leaving, and a deadline there would cancel
// the request's context seconds into a sandbox boot.
type keepReadDeadline struct{ http.ResponseWriter }

func (keepReadDeadline) SetReadDeadline(time.Time) error { return nil }

func (w keepReadDeadline) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// crossOrigin returns why r comes from a web page of another origin, or "".
// Browsers send Origin on cross-origin and on all non-GET requests, and
// Sec-Fetch-Site on every request; other clients (curl, SDKs) send neither.
func crossOrigin(r *http.Request) string {
	if site := r.Header.Get("Sec-Fetch-Site"); site != "" && site != "same-origin" && site != "none" {
		return fmt.Sprintf("Sec-Fetch-Site is %q", site)
	}
	origin := r.Header.Get("Origin")
	if origin == "" {
		return ""
	}
	u, err := url.Parse(origin)
	if err != nil || u.Host == "" {
		return fmt.Sprintf("Origin %q is not this server", origin)
	}
	scheme := "http"
	if r.TLS != nil {
		scheme = "https"
	}
	if !strings.EqualFold(u.Scheme, scheme) || !sameHost(u.Host, r.Host, scheme) {
		return fmt.Sprintf("Origin %q is not this server", origin)
	}
	return ""
}

// sameHost compares two host[:port] values, filling in the scheme's default
// port.
func sameHost(a, b, scheme string) bool {
	def := "80"
	if scheme == "https" {
		def = "443"
	}
	norm := func(h string) string {
		h = strings.ToLower(h)
		if _, _, err := net.SplitHostPort(h); err != nil {
			return hostForURL(h) + ":" + def
		}
		return h
	}
	return norm(a) == norm(b)
}

// wsTokenPrefix marks a WebSocket subprotocol that carries the token,
// base64url-encoded: browsers cannot set headers on a WebSocket.
const wsTokenPrefix = "bearer.token.smolvm.dev."

func (g *guard) tokenOK(r *http.Request) bool {
	scheme, token, ok := strings.Cut(r.Header.Get("Authorization"), " ")
	if !ok && strings.EqualFold(r.Header.Get("Upgrade"), "websocket") {
		for _, p := range strings.Split(strings.Join(r.Header.Values("Sec-WebSocket-Protocol"), ","), ",") {
			if enc, found := strings.CutPrefix(strings.TrimSpace(p), wsTokenPrefix); found {
				if b, err := base64.RawURLEncoding.DecodeString(enc); err == nil {
					scheme, token, ok = "Bearer", string(b), true
				}
			}
		}
	}
	if !ok || !strings.EqualFold(scheme, "Bearer") {
		return false
	}
	// Comparing digests keeps the comparison constant-time whatever the
	// lengths.
	sum := sha256.Sum256([]byte(strings.TrimSpace(token)))
	return subtle.ConstantTimeCompare(sum[:], g.tokenSum[:]) == 1
}

func hasBody(r *http.Request) bool {
	return r.ContentLength > 0 || (r.ContentLength < 0 && r.Body != nil && r.Body != http.NoBody)
}

func isJSON(contentType string) bool {
	mt, _, err := mime.ParseMediaType(contentType)
	return err == nil && mt == "application/json"
}

// fallback answers requests no route matched with a problem rather than
// net/http's plain text: 405 when the path exists under another method, else
// 404.
func fallback(mux *http.ServeMux) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		var allow []string
		for _, m := range []string{http.MethodGet, http.MethodPost, http.MethodPut, http.MethodPatch, http.MethodDelete} {
			probe := r.Clone(r.Context())
			probe.Method = m
			if _, pattern := mux.Handler(probe); pattern != "" && pattern != "/" {
				allow = append(allow, m)
			}
		}
		if len(allow) > 0 {
			w.Header().Set("Allow", strings.Join(allow, ", "))
			writeProblem(w, r, newProblem(http.StatusMethodNotAllowed, CodeMethodNotAllowed,
				fmt.Sprintf("%s is not supported on %s; allowed: %s", r.Method, r.URL.Path, strings.Join(allow, ", "))))
			return
		}
		writeProblem(w, r, newProblem(http.StatusNotFound, CodeNotFound,
			fmt.Sprintf("no route %s %s; see /openapi.json for the API", r.Method, r.URL.Path)))
	}
}

// statusWriter remembers the status a handler wrote, for logging and to know
// whether a problem can still be sent after a panic.
type statusWriter struct {
	http.ResponseWriter
	status int
}

func (w *statusWriter) WriteHeader(code int) {
	if w.status == 0 {
		w.status = code
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusWriter) Write(b []byte) (int, error) {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	return w.ResponseWriter.Write(b)
}

// Unwrap lets http.ResponseController reach the connection (huma uses it
// to set read deadlines).
func (w *statusWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// Flush keeps streamed answers (a followed log) flowing through the
// wrapper for handlers that assert http.Flusher.
func (w *statusWriter) Flush() { http.NewResponseController(w.ResponseWriter).Flush() }

// largeAnswer is the size of an answer (a command's collected output, up
// to 256 MiB) after which the memory that built it goes back to the
// system at once: the runtime would otherwise keep it for minutes, and a
// server with a few such answers behind it would look, and be counted, as
// holding gigabytes.
const largeAnswer = 32 << 20

// releaseLarge hands memory back to the system after a large answer.
func releaseLarge(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		cw := &countingWriter{ResponseWriter: w}
		next.ServeHTTP(cw, r)
		if cw.n >= largeAnswer {
			debug.FreeOSMemory()
		}
	})
}

type countingWriter struct {
	http.ResponseWriter
	n int64
}

func (w *countingWriter) Write(b []byte) (int, error) {
	n, err := w.ResponseWriter.Write(b)
	w.n += int64(n)
	return n, err
}

func (w *countingWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }
func (w *countingWriter) Flush()                      { http.NewResponseController(w.ResponseWriter).Flush() }

// recoverer turns a panic in a handler into a 500 problem instead of a
// dropped connection.
func recoverer(next http.Handler, log *slog.Logger) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		sw, ok := w.(*statusWriter)
		if !ok {
			sw = &statusWriter{ResponseWriter: w}
		}
		defer func() {
			v := recover()
			if v == nil {
				return
			}
			if v == http.ErrAbortHandler {
				panic(v)
			}
			if log != nil {
				log.Error("handler panic", "method", r.Method, "path", r.URL.Path, "panic", fmt.Sprint(v))
			}
			if sw.status == 0 {
				writeProblem(sw, r, newProblem(http.StatusInternalServerError, CodeInternal, fmt.Sprintf("internal error: %v", v)))
			}
		}()
		next.ServeHTTP(sw, r)
	})
}

func logRequests(next http.Handler, log *slog.Logger) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		sw := &statusWriter{ResponseWriter: w}
		next.ServeHTTP(sw, r)
		log.Info("request", "method", r.Method, "path", r.URL.Path, "status", sw.status,
			"duration", time.Since(start).Round(time.Microsecond).String())
	})
}

func withServerHeader(next http.Handler, value string) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Server", value)
		next.ServeHTTP(w, r)
	})
}

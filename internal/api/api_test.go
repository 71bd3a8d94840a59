package api

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/danielgtaylor/huma/v2"

	"github.com/smolvm/smolvm/internal/sandbox"
)

// testServer serves m (nil is fine for anything that must be refused before
// the Manager is reached) on a real loopback listener, with opts.Addr set to
// the listener's address as the server command does.
func testServer(t *testing.T, m *sandbox.Manager, opts Options) *httptest.Server {
	t.Helper()
	srv := httptest.NewUnstartedServer(nil)
	opts.Addr = srv.Listener.Addr().String()
	srv.Config.Handler = New(m, opts)
	srv.Start()
	t.Cleanup(srv.Close)
	return srv
}

type response struct {
	Status      int
	ContentType string
	Header      http.Header
	Body        []byte
}

func (r response) problem(t *testing.T) Problem {
	t.Helper()
	if r.ContentType != "application/problem+json" {
		t.Fatalf("Content-Type = %q, want application/problem+json (status %d, body %s)", r.ContentType, r.Status, r.Body)
	}
	var p Problem
	if err := json.Unmarshal(r.Body, &p); err != nil {
		t.Fatalf("decode problem %s: %v", r.Body, err)
	}
	if p.Status != r.Status || p.Code == "" || p.Title == "" || p.Detail == "" || !strings.HasPrefix(p.Type, problemTypePrefix) {
		t.Fatalf("incomplete problem for status %d: %s", r.Status, r.Body)
	}
	return p
}

// do sends one request. A body of type string is sent verbatim with the
// given headers; nil sends none.
func do(t *testing.T, method, url string, body any, header map[string]string) response {
	t.Helper()
	var rd io.Reader
	switch b := body.(type) {
	case nil:
	case string:
		rd = strings.NewReader(b)
	default:
		j, err := json.Marshal(b)
		if err != nil {
			t.Fatal(err)
		}
		rd = bytes.NewReader(j)
	}
	req, err := http.NewRequest(method, url, rd)
	if err != nil {
		t.Fatal(err)
	}
	if rd != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	for k, v := range header {
		if k == "Host" {
			req.Host = v
			continue
		}
		if v == "" {
			req.Header.Del(k)
			continue
		}
		req.Header.Set(k, v)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	ct := resp.Header.Get("Content-Type")
	if i := strings.IndexByte(ct, ';'); i >= 0 {
		ct = ct[:i]
	}
	return response{Status: resp.StatusCode, ContentType: ct, Header: resp.Header, Body: b}
}

// Every class of bad input is refused with a 4xx and a stable code before the
// Manager is called (the server here has none: reaching it would be a 503).
func TestBadInput(t *testing.T) {
	t.Parallel()
	srv := testServer(t, nil, Options{})
	create := srv.URL + "/sandboxes"
	exec := srv.URL + "/sandboxes/vm-a1b2c3d4/exec"

	tests := []struct {
		name   string
		url    string
		body   any
		header map[string]string
		status int
		code   string
		field  string
	}{
		{"unknown field", create, `{"os":"ubuntu","colour":"blue"}`, nil, 422, "validation_failed", "colour"},
		{"unknown field exec", exec, `{"command":"true","workdir":"/"}`, nil, 422, "validation_failed", "workdir"},
		{"memory wrong type", create, `{"memory":"512"}`, nil, 422, "validation_failed", "memory"},
		{"memory fractional", create, `{"memory":512.5}`, nil, 422, "validation_failed", "memory"},
		{"memory zero", create, `{"memory":0}`, nil, 422, "validation_failed", "memory"},
		{"memory too large", create, `{"memory":99999}`, nil, 422, "validation_failed", "memory"},
		{"memory huge", create, `{"memory":1e300}`, nil, 422, "validation_failed", "memory"},
		{"memory negative", create, `{"memory":-1}`, nil, 422, "validation_failed", "memory"},
		{"vcpus zero", create, `{"vcpus":0}`, nil, 422, "validation_failed", "vcpus"},
		{"vcpus too many", create, `{"vcpus":33}`, nil, 422, "validation_failed", "vcpus"},
		{"disk too small", create, `{"disk_size":10}`, nil, 422, "validation_failed", "disk_size"},
		{"disk too large", create, `{"disk_size":2000000}`, nil, 422, "validation_failed", "disk_size"},
		{"unknown os", create, `{"os":"plan9"}`, nil, 422, "validation_failed", "os"},
		{"empty os", create, `{"os":""}`, nil, 422, "validation_failed", "os"},
		{"os wrong type", create, `{"os":7}`, nil, 422, "validation_failed", "os"},
		{"unknown backend", create, `{"backend":"docker"}`, nil, 422, "validation_failed", "backend"},
		{"image wrong type", create, `{"image":["a"]}`, nil, 422, "validation_failed", "image"},
		{"body not an object", create, `[1,2]`, nil, 422, "validation_failed", ""},
		{"malformed json", create, `{"os":`, nil, 400, "malformed_json", ""},
		{"malformed json exec", exec, `{command: true}`, nil, 400, "malformed_json", ""},
		{"timeout zero", exec, `{"command":"true","timeout":0}`, nil, 422, "validation_failed", "timeout"},
		{"timeout too long", exec, `{"command":"true","timeout":5000}`, nil, 422, "validation_failed", "timeout"},
		{"timeout wrong type", exec, `{"command":"true","timeout":"30"}`, nil, 422, "validation_failed", "timeout"},
		{"empty command", exec, `{"command":""}`, nil, 422, "validation_failed", "command"},
		{"blank command", exec, `{"command":"  \t "}`, nil, 422, "validation_failed", "command"},
		{"missing command", exec, `{"timeout":5}`, nil, 422, "validation_failed", "command"},
		{"null command", exec, `{"command":null}`, nil, 422, "validation_failed", "command"},
		{"command and argv", exec, `{"command":"true","argv":["true"]}`, nil, 422, "validation_failed", "argv"},
		{"command wrong type", exec, `{"command":["ls","-l"]}`, nil, 422, "validation_failed", "command"},
		{"unknown shell", exec, `{"command":"true","shell":"zsh"}`, nil, 422, "validation_failed", "shell"},
		{"exec without body", exec, nil, nil, 400, "body_required", ""},
		{"text/plain body", create, `{"os":"ubuntu"}`, map[string]string{"Content-Type": "text/plain"}, 415, "unsupported_media_type", "Content-Type"},
		{"form body", exec, `command=true`, map[string]string{"Content-Type": "application/x-www-form-urlencoded"}, 415, "unsupported_media_type", "Content-Type"},
		{"no content type", create, `{"os":"ubuntu"}`, map[string]string{"Content-Type": ""}, 415, "unsupported_media_type", "Content-Type"},
		{"too large", exec, `{"command":"` + strings.Repeat("x", 2<<20) + `"}`, nil, 413, "body_too_large", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			r := do(t, http.MethodPost, tt.url, tt.body, tt.header)
			if r.Status != tt.status {
				t.Fatalf("status %d, want %d: %s", r.Status, tt.status, r.Body)
			}
			p := r.problem(t)
			if p.Code != tt.code {
				t.Errorf("code %q, want %q: %s", p.Code, tt.code, r.Body)
			}
			if p.Field != tt.field {
				t.Errorf("field %q, want %q: %s", p.Field, tt.field, r.Body)
			}
			if tt.field != "" && !strings.Contains(p.Detail, tt.field) {
				t.Errorf("detail %q does not name the field %q", p.Detail, tt.field)
			}
		})
	}
}

// A body declared over the limit is refused from its Content-Length: a
// client that waits for "100 Continue" (as curl does for large uploads) gets
// the 413 problem instead, without sending the body.
func TestBodyTooLargeBeforeItIsSent(t *testing.T) {
	t.Parallel()
	srv := testServer(t, nil, Options{})
	for _, path := range []string{"/sandboxes", "/sandboxes/vm-00000000/exec"} {
		conn, err := net.DialTimeout("tcp", srv.Listener.Addr().String(), 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		conn.SetDeadline(time.Now().Add(10 * time.Second))
		fmt.Fprintf(conn, "POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"+
			"Content-Length: %d\r\nExpect: 100-continue\r\n\r\n", path, srv.Listener.Addr(), 5<<20)
		resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
		if err != nil {
			t.Fatalf("%s: no response before the body was sent: %v", path, err)
		}
		body, _ := io.ReadAll(resp.Body)
		conn.Close()
		if resp.StatusCode != http.StatusRequestEntityTooLarge {
			t.Fatalf("%s: status %d, want 413: %s", path, resp.StatusCode, body)
		}
		r := response{Status: resp.StatusCode, ContentType: resp.Header.Get("Content-Type"), Header: resp.Header, Body: body}
		if p := r.problem(t); p.Code != CodeBodyTooLarge || !strings.Contains(p.Detail, "1048576") {
			t.Errorf("%s: problem %+v", path, p)
		}
	}
}

func TestValidationDetail(t *testing.T) {
	t.Parallel()
	srv := testServer(t, nil, Options{})
	r := do(t, http.MethodPost, srv.URL+"/sandboxes", `{"memory":99999,"vcpus":0}`, nil)
	p := r.problem(t)
	if len(p.Errors) != 2 {
		t.Errorf("errors lists %d failures, want 2: %s", len(p.Errors), r.Body)
	}
	if !strings.Contains(p.Detail, "16384") || !strings.Contains(p.Detail, "99999") {
		t.Errorf("detail %q should give the bound and the value sent", p.Detail)
	}
	if p.Instance != "/sandboxes" {
		t.Errorf("instance %q, want /sandboxes", p.Instance)
	}
}

// Ids that no sandbox can have are 404 without reaching the Manager.
func TestImplausibleIDNotFound(t *testing.T) {
	t.Parallel()
	srv := testServer(t, nil, Options{})
	for _, id := range []string{"..", "%2e%2e", "-rf", strings.Repeat("a", 200), "a%00b"} {
		for _, method := range []string{http.MethodGet, http.MethodDelete} {
			r := do(t, method, srv.URL+"/sandboxes/"+id, nil, nil)
			if r.Status == http.StatusNotFound {
				if p := r.problem(t); p.Code != CodeSandboxNotFound && p.Code != CodeNotFound {
					t.Errorf("%s %s: code %q", method, id, p.Code)
				}
				continue
			}
			t.Errorf("%s /sandboxes/%s: status %d, want 404: %s", method, id, r.Status, r.Body)
		}
		r := do(t, http.MethodPost, srv.URL+"/sandboxes/"+id+"/exec", map[string]any{"command": "true"}, nil)
		if r.Status != http.StatusNotFound {
			t.Errorf("exec %s: status %d, want 404: %s", id, r.Status, r.Body)
		}
	}
}

func TestUnknownRoutes(t *testing.T) {
	t.Parallel()
	srv := testServer(t, nil, Options{})
	r := do(t, http.MethodGet, srv.URL+"/nope", nil, nil)
	if r.Status != http.StatusNotFound || r.problem(t).Code != CodeNotFound {
		t.Errorf("GET /nope: %d %s", r.Status, r.Body)
	}
	r = do(t, http.MethodPut, srv.URL+"/sandboxes", `{}`, nil)
	if r.Status != http.StatusMethodNotAllowed || r.problem(t).Code != CodeMethodNotAllowed {
		t.Errorf("PUT /sandboxes: %d %s", r.Status, r.Body)
	}
	if allow := r.Header.Get("Allow"); allow != "GET, POST" {
		t.Errorf("Allow = %q, want GET, POST", allow)
	}
	r = do(t, http.MethodGet, srv.URL+"/sandboxes/vm-a1b2c3d4/exec", nil, nil)
	if r.Status != http.StatusMethodNotAllowed {
		t.Errorf("GET exec: %d %s", r.Status, r.Body)
	}
}

func TestCrossOriginRefused(t *testing.T) {
	t.Parallel()
	srv := testServer(t, nil, Options{})
	_, port, _ := net.SplitHostPort(srv.Listener.Addr().String())
	refused := []map[string]string{
		{"Origin": "http://evil.example"},
		{"Origin": "https://127.0.0.1:" + port}, // other scheme
		{"Origin": "http://127.0.0.1:1"},        // other port
		{"Origin": "http://localhost:" + port},  // other host name, same machine
		{"Origin": "null"},                      // sandboxed iframe, file://
		{"Sec-Fetch-Site": "cross-site"},
		{"Sec-Fetch-Site": "same-site"},
	}
	for _, h := range refused {
		for _, req := range []struct {
			method, path string
			body         any
		}{
			{http.MethodGet, "/sandboxes", nil},
			{http.MethodPost, "/sandboxes", `{"os":"ubuntu"}`},
			{http.MethodPost, "/sandboxes/vm-a1b2c3d4/exec", `{"command":"id"}`},
			{http.MethodDelete, "/sandboxes/vm-a1b2c3d4", nil},
		} {
			r := do(t, req.method, srv.URL+req.path, req.body, h)
			if r.Status != http.StatusForbidden {
				t.Errorf("%s %s with %v: status %d, want 403: %s", req.method, req.path, h, r.Status, r.Body)
				continue
			}
			if p := r.problem(t); p.Code != CodeForbiddenOrigin {
				t.Errorf("%v: code %q", h, p.Code)
			}
		}
	}
	// The same origin (a page served by this server, such as /docs) and
	// non-browser clients are allowed.
	for _, h := range []map[string]string{
		{"Origin": srv.URL},
		{"Sec-Fetch-Site": "same-origin", "Origin": srv.URL},
		{"Sec-Fetch-Site": "none"},
		nil,
	} {
		r := do(t, http.MethodPost, srv.URL+"/sandboxes", `{"memory":1}`, h)
		if r.Status != http.StatusUnprocessableEntity {
			t.Errorf("%v: status %d, want the request to reach validation (422): %s", h, r.Status, r.Body)
		}
	}
}

func TestHostChecked(t *testing.T) {
	t.Parallel()
	srv := testServer(t, nil, Options{})
	_, port, _ := net.SplitHostPort(srv.Listener.Addr().String())
	for _, host := range []string{"evil.example:" + port, "evil.example", "127.0.0.1:1", "localhost", "192.168.1.10:" + port, "127.0.0.1.nip.io:" + port} {
		r := do(t, http.MethodGet, srv.URL+"/openapi.json", nil, map[string]string{"Host": host})
		if r.Status != http.StatusForbidden {
			t.Errorf("Host %q: status %d, want 403", host, r.Status)
			continue
		}
		if p := r.problem(t); p.Code != CodeForbiddenHost {
			t.Errorf("Host %q: code %q", host, p.Code)
		}
	}
	for _, host := range []string{"127.0.0.1:" + port, "localhost:" + port, "LOCALHOST:" + port, "[::1]:" + port} {
		r := do(t, http.MethodGet, srv.URL+"/openapi.json", nil, map[string]string{"Host": host})
		if r.Status != http.StatusOK {
			t.Errorf("Host %q: status %d, want 200: %s", host, r.Status, r.Body)
		}
	}
}

func TestHostRules(t *testing.T) {
	t.Parallel()
	tests := []struct {
		opts  Options
		host  string
		allow bool
	}{
		{Options{Addr: "127.0.0.1:8000"}, "127.0.0.1:8000", true},
		{Options{Addr: "127.0.0.1:8000"}, "localhost:8000", true},
		{Options{Addr: "127.0.0.1:8000"}, "[::1]:8000", true},
		{Options{Addr: "127.0.0.1:8000"}, "localhost:8001", false},
		{Options{Addr: "127.0.0.1:8000"}, "attacker.example:8000", false},
		{Options{Addr: "[::1]:8000"}, "[::1]:8000", true},
		{Options{Addr: "localhost:80"}, "localhost", true},
		{Options{Addr: "127.0.0.1:8000", AllowedHosts: []string{"box.internal:8000"}}, "box.internal:8000", true},
		{Options{}, "localhost:1234", true},
		{Options{}, "127.0.0.1", true},
		{Options{}, "[::1]", true},
		{Options{}, "example.com:1234", false},
		// Off loopback a token is required instead; any name may reach it.
		{Options{Addr: "0.0.0.0:8000"}, "192.168.1.10:8000", true},
		{Options{Addr: "0.0.0.0:8000", AllowedHosts: []string{"box.lan:8000"}}, "box.lan:8000", true},
		{Options{Addr: "0.0.0.0:8000", AllowedHosts: []string{"box.lan:8000"}}, "evil.example:8000", false},
	}
	for _, tt := range tests {
		if got := newGuard(tt.opts).hostAllowed(tt.host); got != tt.allow {
			t.Errorf("Addr %q AllowedHosts %v: Host %q allowed = %v, want %v", tt.opts.Addr, tt.opts.AllowedHosts, tt.host, got, tt.allow)
		}
	}
}

func TestToken(t *testing.T) {
	t.Parallel()
	srv := testServer(t, nil, Options{Token: "s3cret"})
	for _, auth := range []string{"", "Bearer wrong", "Bearer s3cre", "Basic czNjcmV0", "s3cret", "Bearer"} {
		for _, req := range []struct {
			method, path string
			body         any
		}{
			{http.MethodGet, "/sandboxes", nil},
			{http.MethodGet, "/sandboxes/vm-a1b2c3d4", nil},
			{http.MethodPost, "/sandboxes", `{"memory":1}`},
			{http.MethodPost, "/sandboxes/vm-a1b2c3d4/exec", `{"command":"id"}`},
			{http.MethodDelete, "/sandboxes/vm-a1b2c3d4", nil},
		} {
			r := do(t, req.method, srv.URL+req.path, req.body, map[string]string{"Authorization": auth})
			if r.Status != http.StatusUnauthorized {
				t.Errorf("%s %s with Authorization %q: status %d, want 401", req.method, req.path, auth, r.Status)
				continue
			}
			if p := r.problem(t); p.Code != CodeUnauthorized {
				t.Errorf("code %q", p.Code)
			}
			if !strings.HasPrefix(r.Header.Get("WWW-Authenticate"), "Bearer") {
				t.Errorf("no WWW-Authenticate challenge")
			}
		}
	}
	// The right token reaches validation; the document stays readable.
	for _, auth := range []string{"Bearer s3cret", "bearer s3cret"} {
		r := do(t, http.MethodPost, srv.URL+"/sandboxes", `{"memory":1}`, map[string]string{"Authorization": auth})
		if r.Status != http.StatusUnprocessableEntity {
			t.Errorf("Authorization %q: status %d, want 422: %s", auth, r.Status, r.Body)
		}
	}
	for _, path := range []string{"/openapi.json", "/openapi.yaml", "/docs"} {
		if r := do(t, http.MethodGet, srv.URL+path, nil, nil); r.Status != http.StatusOK {
			t.Errorf("GET %s without token: %d", path, r.Status)
		}
	}
	// A WebSocket upgrade may carry the token as a subprotocol, which a
	// browser can send; only on an upgrade, and only the right one.
	for _, tt := range []struct {
		upgrade, protocols string
		want               int
	}{
		{"websocket", "terminal.smolvm.dev, bearer.token.smolvm.dev.czNjcmV0", http.StatusServiceUnavailable}, // past the guard: no manager
		{"websocket", "terminal.smolvm.dev, bearer.token.smolvm.dev.d3Jvbmc", http.StatusUnauthorized},
		{"websocket", "bearer.token.smolvm.dev.not*base64", http.StatusUnauthorized},
		{"", "bearer.token.smolvm.dev.czNjcmV0", http.StatusUnauthorized},
	} {
		h := map[string]string{"Sec-WebSocket-Protocol": tt.protocols}
		if tt.upgrade != "" {
			h["Upgrade"], h["Connection"] = tt.upgrade, "Upgrade"
		}
		if r := do(t, http.MethodGet, srv.URL+"/sandboxes/vm-a1b2c3d4/pty", nil, h); r.Status != tt.want {
			t.Errorf("upgrade %q with protocols %q: %d, want %d: %s", tt.upgrade, tt.protocols, r.Status, tt.want, r.Body)
		}
	}
}

func TestDocsPage(t *testing.T) {
	t.Parallel()
	srv := testServer(t, nil, Options{})
	r := do(t, http.MethodGet, srv.URL+"/docs", nil, nil)
	if r.Status != http.StatusOK || r.ContentType != "text/html" || !bytes.Contains(r.Body, []byte("/openapi.yaml")) {
		t.Fatalf("GET /docs: %d %q", r.Status, r.ContentType)
	}
	if r.Header.Get("Content-Security-Policy") == "" {
		t.Error("docs page has no Content-Security-Policy")
	}
	y := do(t, http.MethodGet, srv.URL+"/openapi.yaml", nil, nil)
	if y.Status != http.StatusOK || !bytes.Contains(y.Body, []byte("openapi: 3.1.0")) {
		t.Errorf("GET /openapi.yaml: %d %.100s", y.Status, y.Body)
	}
}

func TestProblemMapping(t *testing.T) {
	t.Parallel()
	tests := []struct {
		err    *sandbox.Error
		status int
		code   string
	}{
		{&sandbox.Error{Kind: sandbox.KindInvalid, Code: "invalid_image", Field: "image", Message: "no such image"}, 422, "invalid_image"},
		{&sandbox.Error{Kind: sandbox.KindInvalid, Message: "bad"}, 422, "validation_failed"},
		{&sandbox.Error{Kind: sandbox.KindNotFound, Message: "no sandbox vm-1"}, 404, "sandbox_not_found"},
		{&sandbox.Error{Kind: sandbox.KindConflict, Code: "sandbox_not_running", Message: "stopped"}, 409, "sandbox_not_running"},
		{&sandbox.Error{Kind: sandbox.KindUnavailable, Code: "unsupported_os", Field: "os", Message: "windows needs"}, 422, "unsupported_os"},
		{&sandbox.Error{Kind: sandbox.KindUnavailable, Field: "backend", Message: "firecracker not installed"}, 422, "backend_unavailable"},
		{&sandbox.Error{Kind: sandbox.KindInternal, Message: "qemu failed", Err: io.ErrUnexpectedEOF}, 500, "internal_error"},
	}
	for _, tt := range tests {
		p := fromSandboxError(tt.err)
		if p.Status != tt.status || p.Code != tt.code || p.Field != tt.err.Field || p.Detail == "" {
			t.Errorf("%+v -> %+v, want %d %s", tt.err, p, tt.status, tt.code)
		}
	}
	if p := fromSandboxError(tests[6].err); !strings.Contains(p.Detail, "unexpected EOF") {
		t.Errorf("internal error detail %q lacks its cause", p.Detail)
	}
}

func TestSnake(t *testing.T) {
	for in, want := range map[string]string{"Not Found": "not_found", "I'm a teapot": "i_m_a_teapot", "Request-URI Too Long": "request_uri_too_long"} {
		if got := snake(in); got != want {
			t.Errorf("snake(%q) = %q, want %q", in, got, want)
		}
	}
}

// A request without a body must keep its context however long the handler
// runs, even though huma sets a read deadline for operations that accept an
// optional body (POST /sandboxes without one).
func TestNoBodyRequestNotCancelledByReadDeadline(t *testing.T) {
	t.Parallel()
	for _, body := range []any{nil, `{}`} {
		errs := make(chan error, 1)
		h := newGuard(Options{}).wrap(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			huma.SetReadDeadline(w, time.Now().Add(20*time.Millisecond))
			io.Copy(io.Discard, r.Body)
			time.Sleep(300 * time.Millisecond)
			errs <- r.Context().Err()
		}))
		srv := httptest.NewServer(h)
		r := do(t, http.MethodPost, srv.URL+"/sandboxes", body, nil)
		if err := <-errs; err != nil {
			t.Errorf("body %v: request context ended while the handler ran: %v (status %d)", body, err, r.Status)
		}
		srv.Close()
	}
}

package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/getkin/kin-openapi/openapi3"
	"github.com/getkin/kin-openapi/openapi3filter"
	"github.com/getkin/kin-openapi/routers/legacy"

	"github.com/smolvm/smolvm/internal/api"
	"github.com/smolvm/smolvm/internal/testenv"
)

// The CLI's HTTP client is written by hand over the api package's types;
// this test holds it to the committed api/openapi.json, as the TypeScript
// client is held by generation: every request it makes, and every answer
// the real server gives it, is validated against the document (by
// kin-openapi) on the way.
func TestHTTPClientFollowsTheDocument(t *testing.T) {
	t.Parallel()
	doc, err := openapi3.NewLoader().LoadFromFile(filepath.Join("..", "..", "api", "openapi.json"))
	if err != nil {
		t.Fatal(err)
	}
	router, err := legacy.NewRouter(doc)
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewUnstartedServer(nil)
	inner := api.New(testenv.Manager(t), api.Options{Addr: srv.Listener.Addr().String()})
	var mu sync.Mutex
	var faults []string
	fault := func(format string, args ...any) {
		mu.Lock()
		defer mu.Unlock()
		faults = append(faults, fmt.Sprintf(format, args...))
	}
	calls := map[string]int{}
	srv.Config.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(io.LimitReader(r.Body, 1<<20))
		r.Body = io.NopCloser(bytes.NewReader(body))
		route, params, err := router.FindRoute(r)
		if err != nil {
			fault("%s %s: not in the document: %v", r.Method, r.URL.Path, err)
			http.Error(w, err.Error(), http.StatusNotFound)
			return
		}
		mu.Lock()
		calls[r.Method+" "+route.Path]++
		mu.Unlock()
		in := &openapi3filter.RequestValidationInput{Request: r, PathParams: params, Route: route,
			Options: &openapi3filter.Options{AuthenticationFunc: openapi3filter.NoopAuthenticationFunc}}
		if err := openapi3filter.ValidateRequest(r.Context(), in); err != nil {
			fault("request %s %s: %v", r.Method, r.URL.Path, err)
		}
		r.Body = io.NopCloser(bytes.NewReader(body))
		rec := httptest.NewRecorder()
		inner.ServeHTTP(rec, r)
		out := &openapi3filter.ResponseValidationInput{RequestValidationInput: in, Status: rec.Code,
			Header: rec.Header(), Body: io.NopCloser(bytes.NewReader(rec.Body.Bytes()))}
		if ct := rec.Header().Get("Content-Type"); ct == "text/event-stream" {
			// A stream is many values: each event's data is held to the
			// media type's schema.
			mt := route.Operation.Responses.Status(rec.Code).Value.Content.Get(ct)
			if mt == nil {
				fault("response %d to %s %s: %s is not documented", rec.Code, r.Method, r.URL.Path, ct)
			}
			for _, line := range strings.Split(rec.Body.String(), "\n") {
				data, ok := strings.CutPrefix(line, "data: ")
				if !ok || mt == nil {
					continue
				}
				var v any
				if err := json.Unmarshal([]byte(data), &v); err != nil {
					fault("event of %s %s: %v", r.Method, r.URL.Path, err)
				} else if err := mt.Schema.Value.VisitJSON(v); err != nil {
					fault("event %s of %s %s: %v", data, r.Method, r.URL.Path, err)
				}
			}
		} else if err := openapi3filter.ValidateResponse(r.Context(), out); err != nil {
			fault("response %d to %s %s: %v", rec.Code, r.Method, r.URL.Path, err)
		}
		for k, v := range rec.Header() {
			w.Header()[k] = v
		}
		w.WriteHeader(rec.Code)
		w.Write(rec.Body.Bytes())
	})
	srv.Start()
	defer srv.Close()

	// The checker itself sees a request outside the document.
	resp, err := http.Post(srv.URL+"/sandboxes/vm-00000000/exec", "application/json", bytes.NewReader([]byte(`{"command":5}`)))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	mu.Lock()
	if len(faults) != 1 {
		t.Fatalf("a request with a number for command gave faults %q, want one", faults)
	}
	faults, calls = nil, map[string]int{}
	mu.Unlock()

	c, err := newHTTPSandboxClient(srv.URL, "")
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	sb, err := c.Create(ctx, api.CreateSandboxRequest{Memory: 256, Network: &api.NetworkSpec{Mode: "open"}, Ports: []api.PortSpec{{Guest: 8080}}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.List(ctx); err != nil {
		t.Error(err)
	}
	if _, err := c.Get(ctx, sb.ID); err != nil {
		t.Error(err)
	}
	if res, err := c.Exec(ctx, sb.ID, api.ExecRequest{Command: "echo hi; exit 3", Shell: "login"}); err != nil || res.ExitCode != 3 || res.Stdout != "hi\n" {
		t.Errorf("exec: %+v %v", res, err)
	}
	var te *timeoutError
	if _, err := c.Exec(ctx, sb.ID, api.ExecRequest{Command: "echo before; sleep 30", Timeout: 3}); !errors.As(err, &te) {
		t.Errorf("exec past its timeout: %v, want a timeout error", err)
	}
	var out, errOut bytes.Buffer
	env := map[string]string{"WHO": "stream"}
	if res, err := c.Stream(ctx, sb.ID, api.ExecRequest{Command: "echo $WHO; echo e >&2; exit 2", Env: env, Cwd: "/tmp"}, &out, &errOut); err != nil ||
		res.ExitCode != 2 || out.String() != "stream\n" || errOut.String() != "e\n" {
		t.Errorf("stream: %+v %q %q %v", res, out.String(), errOut.String(), err)
	}
	if _, err := c.Stream(ctx, sb.ID, api.ExecRequest{Command: "true", Cwd: "/none"}, &out, &errOut); err == nil || !strings.Contains(err.Error(), "invalid_cwd") {
		t.Errorf("stream with a missing cwd: %v", err)
	}
	if err := c.Upload(ctx, sb.ID, "/tmp/f", strings.NewReader("12345"), 5, 0o600); err != nil {
		t.Errorf("upload: %v", err)
	}
	if e, err := c.StatPath(ctx, sb.ID, "/tmp/f"); err != nil || e.Size != 5 || e.Mode != "0600" {
		t.Errorf("stat: %+v %v", e, err)
	}
	var got bytes.Buffer
	if err := c.Download(ctx, sb.ID, "/tmp/f", &got); err != nil || got.String() != "12345" {
		t.Errorf("download: %q %v", got.String(), err)
	}
	if _, err := c.StatPath(ctx, sb.ID, "/tmp/none"); !fileNotFound(err) {
		t.Errorf("stat of nothing: %v", err)
	}
	if p, err := c.ExposePort(ctx, sb.ID, api.PortSpec{Guest: 9000}); err != nil || p.Host == 0 {
		t.Errorf("expose: %+v %v", p, err)
	}
	if _, err := c.ExposePort(ctx, sb.ID, api.PortSpec{Guest: 9000}); err == nil {
		t.Error("exposing a port twice succeeded")
	}
	if list, err := c.Ports(ctx, sb.ID); err != nil || len(list.Ports) != 2 {
		t.Errorf("ports: %+v %v", list, err)
	}
	if _, err := c.ClosePort(ctx, sb.ID, 9000); err != nil {
		t.Error(err)
	}
	if _, err := c.Get(ctx, "vm-00000000"); err == nil {
		t.Error("get of an unknown sandbox succeeded")
	}
	if err := c.Delete(ctx, sb.ID); err != nil {
		t.Error(err)
	}

	mu.Lock()
	defer mu.Unlock()
	for _, f := range faults {
		t.Error(f)
	}
	for _, op := range []string{"POST /sandboxes", "GET /sandboxes", "GET /sandboxes/{id}", "POST /sandboxes/{id}/exec",
		"DELETE /sandboxes/{id}", "POST /sandboxes/{id}/ports", "GET /sandboxes/{id}/ports", "DELETE /sandboxes/{id}/ports/{guest}"} {
		if calls[op] == 0 {
			t.Errorf("the client never called %s", op)
		}
	}
}

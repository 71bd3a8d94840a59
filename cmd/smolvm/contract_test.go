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
	sb, err := c.Create(ctx, api.CreateSandboxRequest{Memory: 256, Network: &api.NetworkSpec{Mode: "open"}, Ports: []api.PortSpec{{Guest: 8080}},
		Name: "contract-box", Labels: map[string]string{"suite": "contract"}, Env: map[string]string{"BOXENV": "yes"},
		Timeout: 3600, OnTimeout: "pause"})
	if err != nil {
		t.Fatal(err)
	}
	if sb.Name != "contract-box" || sb.Labels["suite"] != "contract" || sb.ExpiresAt == nil {
		t.Errorf("create: %+v", sb)
	}
	if _, err := c.List(ctx, nil); err != nil {
		t.Error(err)
	}
	if list, err := c.List(ctx, map[string]string{"suite": "contract"}); err != nil || len(list.Sandboxes) != 1 {
		t.Errorf("list by label: %+v %v", list, err)
	}
	if list, err := c.List(ctx, map[string]string{"suite": "other"}); err != nil || len(list.Sandboxes) != 0 {
		t.Errorf("list by another label: %+v %v", list, err)
	}
	if got, err := c.Get(ctx, "contract-box"); err != nil || got.ID != sb.ID {
		t.Errorf("get by name: %+v %v", got, err)
	}
	if res, err := c.Exec(ctx, sb.ID, api.ExecRequest{Command: "echo $BOXENV"}); err != nil || res.Stdout != "yes\n" {
		t.Errorf("exec with the sandbox's env: %+v %v", res, err)
	}
	zero := 0
	if got, err := c.Update(ctx, sb.ID, api.UpdateSandboxRequest{Timeout: &zero}); err != nil || got.ExpiresAt != nil {
		t.Errorf("update to no limit: %+v %v", got, err)
	}
	var logs bytes.Buffer
	if err := c.Logs(ctx, sb.ID, false, &logs); err != nil {
		t.Errorf("logs: %v", err)
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

	// The lifecycle: pause and resume, a snapshot, stop and start.
	if got, err := c.Pause(ctx, sb.ID); err != nil || got.Status != "paused" {
		t.Errorf("pause: %+v %v", got, err)
	}
	if _, err := c.Pause(ctx, sb.ID); !hasCode(err, "invalid_state") {
		t.Errorf("pause of a paused sandbox: %v, want invalid_state", err)
	}
	if got, err := c.Resume(ctx, sb.ID); err != nil || got.Status != "running" {
		t.Errorf("resume: %+v %v", got, err)
	}
	snap, err := c.CreateSnapshot(ctx, sb.ID, api.SnapshotRequest{Name: "contract-snap"})
	if err != nil {
		t.Errorf("snapshot: %v", err)
	} else if snap.Sandbox != sb.ID || snap.Name != "contract-snap" {
		t.Errorf("snapshot: %+v", snap)
	}
	if list, err := c.Snapshots(ctx); err != nil || len(list.Snapshots) != 1 {
		t.Errorf("snapshots: %+v %v", list, err)
	}
	if got, err := c.GetSnapshot(ctx, "contract-snap"); err != nil || got.ID != snap.ID {
		t.Errorf("get snapshot by name: %+v %v", got, err)
	}
	if got, err := c.Stop(ctx, sb.ID, 30); err != nil || got.Status != "stopped" {
		t.Errorf("stop: %+v %v", got, err)
	}
	if _, err := c.Stop(ctx, sb.ID, 0); !hasCode(err, "invalid_state") {
		t.Errorf("stop of a stopped sandbox: %v, want invalid_state", err)
	}
	if got, err := c.Start(ctx, sb.ID); err != nil || got.Status != "running" {
		t.Errorf("start: %+v %v", got, err)
	} else if res, err := c.Exec(ctx, sb.ID, api.ExecRequest{Command: "true"}); err != nil || res.ExitCode != 0 {
		t.Errorf("exec after start: %+v %v", res, err)
	}
	if err := c.DeleteSnapshot(ctx, "contract-snap", false); err != nil {
		t.Errorf("delete snapshot: %v", err)
	}
	if _, err := c.GetSnapshot(ctx, snap.ID); !hasCode(err, "snapshot_not_found") {
		t.Errorf("get of a deleted snapshot: %v", err)
	}
	if list, err := c.PruneSnapshots(ctx); err != nil || len(list.Snapshots) != 0 {
		t.Errorf("prune: %+v %v", list, err)
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
		"DELETE /sandboxes/{id}", "POST /sandboxes/{id}/ports", "GET /sandboxes/{id}/ports", "DELETE /sandboxes/{id}/ports/{guest}",
		"PATCH /sandboxes/{id}", "GET /sandboxes/{id}/logs", "POST /sandboxes/{id}/stop", "POST /sandboxes/{id}/start",
		"POST /sandboxes/{id}/pause", "POST /sandboxes/{id}/resume", "POST /sandboxes/{id}/snapshots", "GET /snapshots",
		"GET /snapshots/{id}", "DELETE /snapshots/{id}", "POST /snapshots/prune"} {
		if calls[op] == 0 {
			t.Errorf("the client never called %s", op)
		}
	}
}

// hasCode reports whether err is a problem from the server with code.
func hasCode(err error, code string) bool {
	var pe *problemError
	return errors.As(err, &pe) && pe.p.Code == code
}

package api

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"net/url"
	"regexp"
	"strings"
	"testing"

	"github.com/smolvm/smolvm/internal/datadir"
	"github.com/smolvm/smolvm/internal/sandbox"
	"github.com/smolvm/smolvm/internal/vmm"
)

// errNoVMs is what the fuzzed server's only backend says: it never starts a
// VM, so no request can boot one whatever passes validation.
var errNoVMs = errors.New("this backend starts no VMs")

type noVMs struct{}

func (noVMs) Name() string                                         { return "qemu" }
func (noVMs) Available() error                                     { return errNoVMs }
func (noVMs) Identity(context.Context) (string, error)             { return "", errNoVMs }
func (noVMs) Start(context.Context, vmm.Spec) (vmm.Machine, error) { return nil, errNoVMs }
func (noVMs) Attach(json.RawMessage) (vmm.Machine, error)          { return nil, errNoVMs }
func (noVMs) Clear(string) error                                   { return nil }
func (noVMs) Reap(context.Context, string) error                   { return nil }

// fuzzRoutes are the routes whose input is fuzzed; %s is the sandbox (or
// snapshot, or process) id. Every sandbox id is unknown: none is ever made.
var fuzzRoutes = []struct {
	method, path, accept string
}{
	{http.MethodPost, "/sandboxes", ""},
	{http.MethodGet, "/sandboxes", ""},
	{http.MethodGet, "/sandboxes/%s", ""},
	{http.MethodPatch, "/sandboxes/%s", ""},
	{http.MethodDelete, "/sandboxes/%s", ""},
	{http.MethodPost, "/sandboxes/%s/exec", ""},
	{http.MethodPost, "/sandboxes/%s/exec", mediaNDJSON},
	{http.MethodPost, "/sandboxes/%s/exec", mediaSSE},
	{http.MethodPost, "/sandboxes/%s/stop", ""},
	{http.MethodPost, "/sandboxes/%s/start", ""},
	{http.MethodPost, "/sandboxes/%s/ports", ""},
	{http.MethodDelete, "/sandboxes/vm-a1b2c3d4/ports/%s", ""},
	{http.MethodPost, "/sandboxes/%s/snapshots", ""},
	{http.MethodGet, "/snapshots/%s", ""},
	{http.MethodDelete, "/snapshots/%s", ""},
	{http.MethodPost, "/sandboxes/%s/processes", ""},
	{http.MethodPost, "/sandboxes/vm-a1b2c3d4/processes/%s/stdin", ""},
	{http.MethodPost, "/sandboxes/vm-a1b2c3d4/processes/%s/signal", ""},
	{http.MethodGet, "/sandboxes/vm-a1b2c3d4/processes/%s/output", mediaSSE},
	{http.MethodPost, "/sandboxes/%s/fs/mkdir", ""},
	{http.MethodPost, "/sandboxes/%s/fs/move", ""},
	{http.MethodGet, "/sandboxes/%s/fs/list", ""},
	{http.MethodDelete, "/sandboxes/%s/files", ""},
	{http.MethodGet, "/sandboxes/%s/files", ""},
	{http.MethodPut, "/sandboxes/%s/files", ""},
	{http.MethodGet, "/sandboxes/%s/logs", ""},
}

// fuzzContentTypes are the Content-Types a fuzzed body is sent with.
var fuzzContentTypes = []string{
	"application/json", "application/json; charset=utf-8", "application/octet-stream",
	"application/x-tar", "text/plain", "", "application/json;;",
}

var problemCode = regexp.MustCompile(`^[a-z][a-z0-9_]*$`)

// FuzzRequest: whatever the body, query and ids of a request, the server
// answers below 500 (it neither fails nor reaches a VM), every 4xx is a
// complete problem details object, every JSON success is valid JSON, and no
// request leaves a sandbox behind.
func FuzzRequest(f *testing.F) {
	// A real Manager on an empty data directory, so ids are looked up as
	// in production, whose one backend cannot run and whose helpers do
	// not exist: nothing a request asks for can start a process.
	m, err := sandbox.Open(context.Background(), sandbox.Options{
		DataDir: datadir.Dir(f.TempDir()), Drivers: vmm.NewRegistry(noVMs{}), NoTemplates: true,
		AgentPath: "/nonexistent/smolvm-agent", NetPath: "/nonexistent/smolvm-net",
	})
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { m.Close() })
	h := New(m, Options{})

	route := func(method, path, accept string) uint8 {
		for i, r := range fuzzRoutes {
			if r.method == method && r.path == path && r.accept == accept {
				return uint8(i)
			}
		}
		f.Fatalf("no route %s %s", method, path)
		return 0
	}
	// Few seeds, each a different way in: with this many dependencies
	// instrumented, every corpus entry costs tens of milliseconds to load.
	add := func(method, path, accept string, ct uint8, id, query, body string) {
		f.Add(route(method, path, accept), ct, id, query, []byte(body))
	}
	// Creates that are refused, and valid ones the backend cannot run.
	for _, body := range []string{
		`{"os":"ubuntu","colour":"blue"}`, `{"memory":1e300,"vcpus":0}`, `[1,2]`, `{"os":`,
		`{"os":"alpine","env":{"1BAD":"x","A=B":"y","":"z"},"labels":{"":"x"}}`,
		`{"network":{"mode":"restricted","allow":["10.0.0.0/33","::1/128","not an address"]}}`,
		`{"ports":[{"guest":0},{"guest":70000}]}`, `{"snapshot":"../../etc"}`,
		`{"mounts":[{"host":"/etc","guest":"/x"},{"host":"relative","guest":"/"}]}`,
		`{"image":"file:///../../etc/shadow","os":"windows"}`, `{"os":"ubuntu"}{"os":"alpine"}`, "\xff\xfe",
	} {
		add(http.MethodPost, "/sandboxes", "", 0, "", "", body)
	}
	add(http.MethodPost, "/sandboxes", "", 4, "", "", `{"os":"ubuntu"}`)
	add(http.MethodPost, "/sandboxes", "", 6, "", "", `{"os":"ubuntu"}`)
	// Exec and processes on sandboxes that do not exist, some with ids
	// no sandbox can have.
	for _, body := range []string{
		`{"command":"true","workdir":"/"}`, `{"command":"  \t "}`, `{"command":"true","argv":["true"]}`,
		`{"command":["ls","-l"],"timeout":5000}`, `{"command":"true"} trailing`,
		`{"command":"id","cwd":"relative","env":{"BAD-NAME":"x"},"stdin":"` + strings.Repeat("x", 1000) + `"}`,
	} {
		add(http.MethodPost, "/sandboxes/%s/exec", "", 0, "vm-a1b2c3d4", "", body)
		add(http.MethodPost, "/sandboxes/%s/exec", mediaNDJSON, 0, "vm-a1b2c3d4", "", body)
	}
	add(http.MethodPost, "/sandboxes/%s/processes", "", 0, "vm-a1b2c3d4", "", `{"command":"top","pty":{"cols":0,"rows":100000},"tag":"`+strings.Repeat("t", 200)+`"}`)
	for _, id := range []string{"..", "", "vm-a1b2c3d4/../../etc", strings.Repeat("a", 200), "a\x00b"} {
		add(http.MethodPost, "/sandboxes/%s/exec", mediaSSE, 0, id, "", `{"command":"true"}`)
		add(http.MethodDelete, "/snapshots/%s", "", 0, id, "force=maybe", ``)
	}
	// Lifecycle, ports, snapshots, processes, files.
	for _, s := range []struct {
		method, path, id, query, body string
	}{
		{http.MethodPatch, "/sandboxes/%s", "vm-a1b2c3d4", "", `{"timeout":-1}`},
		{http.MethodPatch, "/sandboxes/%s", "vm-a1b2c3d4", "", `{"timeout":600}`},
		{http.MethodPost, "/sandboxes/%s/stop", "vm-a1b2c3d4", "", `{"timeout":601}`},
		{http.MethodPost, "/sandboxes/%s/ports", "vm-a1b2c3d4", "", `{"guest":8080,"host":-1,"host_address":"256.0.0.1"}`},
		{http.MethodDelete, "/sandboxes/vm-a1b2c3d4/ports/%s", "99999", "", ``},
		{http.MethodPost, "/sandboxes/%s/snapshots", "vm-a1b2c3d4", "", `{"name":"Bad Name","stop":"yes"}`},
		{http.MethodPost, "/sandboxes/vm-a1b2c3d4/processes/%s/signal", "99999999999999999999", "", `{"signal":"KILL"}`},
		{http.MethodPost, "/sandboxes/vm-a1b2c3d4/processes/%s/stdin", "1", "", `{"data":1,"eof":"no"}`},
		{http.MethodPost, "/sandboxes/%s/fs/move", "vm-a1b2c3d4", "", `{"source":"/a","destination":"/../b"}`},
		{http.MethodGet, "/sandboxes", "", "label==&label=%ff%fe", ``},
		{http.MethodGet, "/sandboxes/%s/fs/list", "vm-a1b2c3d4", "path=/root&path=/etc", ``},
		{http.MethodDelete, "/sandboxes/%s/files", "vm-a1b2c3d4", "path=/&recursive=notabool", ``},
		{http.MethodGet, "/sandboxes/%s/files", "vm-a1b2c3d4", "path=../../etc/passwd", ``},
		{http.MethodGet, "/sandboxes/%s/logs", "vm-a1b2c3d4", "follow=true", ``},
	} {
		add(s.method, s.path, "", 0, s.id, s.query, s.body)
	}
	add(http.MethodGet, "/sandboxes/vm-a1b2c3d4/processes/%s/output", mediaSSE, 0, "0", "", ``)
	add(http.MethodPut, "/sandboxes/%s/files", "", 2, "vm-a1b2c3d4", "path=/x&mode=99999&uid=1&user=root", `data`)
	add(http.MethodPut, "/sandboxes/%s/files", "", 3, "vm-a1b2c3d4", "path=/", `not a tar`)

	f.Fuzz(func(t *testing.T, ri, ci uint8, id, query string, body []byte) {
		r := fuzzRoutes[int(ri)%len(fuzzRoutes)]
		target := r.path
		if strings.Contains(target, "%s") {
			target = strings.Replace(target, "%s", url.PathEscape(id), 1)
		}
		if query != "" {
			target += "?" + query
		}
		u, err := url.ParseRequestURI(target)
		if err != nil {
			return // no client can send it
		}
		req := httptest.NewRequestWithContext(context.Background(), r.method, "http://127.0.0.1/", bytes.NewReader(body))
		req.URL, req.RequestURI = u, target
		req.Host = "127.0.0.1"
		if len(body) == 0 {
			req.Body, req.ContentLength = http.NoBody, 0
		}
		if ct := fuzzContentTypes[int(ci)%len(fuzzContentTypes)]; ct != "" {
			req.Header.Set("Content-Type", ct)
		}
		if r.accept != "" {
			req.Header.Set("Accept", r.accept)
		}
		if strings.Contains(r.path, "/files") && r.method == http.MethodPut && ci == 0 {
			req.Header.Set("Content-Type", "application/octet-stream")
		}
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)

		res := rec.Result()
		got := rec.Body.Bytes()
		ct := res.Header.Get("Content-Type")
		switch {
		case res.StatusCode >= 500:
			t.Fatalf("%s %s (%q): %d %s", r.method, target, body, res.StatusCode, got)
		case res.StatusCode >= 400:
			var p Problem
			if ct != "application/problem+json" || !json.Valid(got) || json.Unmarshal(got, &p) != nil {
				t.Fatalf("%s %s (%q): %d with %q, not a problem: %s", r.method, target, body, res.StatusCode, ct, got)
			}
			if p.Status != res.StatusCode || !problemCode.MatchString(p.Code) || p.Type != problemTypePrefix+p.Code ||
				p.Title == "" || p.Detail == "" || p.Instance == "" {
				t.Fatalf("%s %s (%q): %d, incomplete problem: %s", r.method, target, body, res.StatusCode, got)
			}
		case res.StatusCode >= 200 && strings.HasPrefix(ct, "application/json") && !json.Valid(got):
			t.Fatalf("%s %s (%q): %d with invalid JSON: %s", r.method, target, body, res.StatusCode, got)
		}

		if list, err := m.List(context.Background()); err != nil || len(list) > 0 {
			t.Fatalf("%s %s (%q) left sandboxes: %+v, %v", r.method, target, body, list, err)
		}
	})
}

package api

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"testing"

	"github.com/getkin/kin-openapi/openapi3"

	"github.com/smolvm/smolvm/internal/sandbox"
)

var update = flag.Bool("update", false, "rewrite api/openapi.json from the code")

var committedSpec = filepath.Join("..", "..", "api", "openapi.json")

func fetchSpec(t *testing.T) []byte {
	t.Helper()
	srv := httptest.NewServer(New(nil, Options{}))
	defer srv.Close()
	resp, err := http.Get(srv.URL + "/openapi.json")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /openapi.json: %s", resp.Status)
	}
	if ct := resp.Header.Get("Content-Type"); ct != "application/openapi+json" {
		t.Errorf("Content-Type = %q", ct)
	}
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestOpenAPIUpToDate fails when the document the server serves differs from
// the committed api/openapi.json, so a change to the API cannot go unnoticed
// by the clients generated from that file.
func TestOpenAPIUpToDate(t *testing.T) {
	served, err := indent(fetchSpec(t))
	if err != nil {
		t.Fatal(err)
	}
	if generated, err := OpenAPIDocument(); err != nil {
		t.Fatal(err)
	} else if !bytes.Equal(generated, served) {
		t.Fatal("OpenAPIDocument() differs from the served /openapi.json")
	}
	if *update {
		if err := os.WriteFile(committedSpec, served, 0o644); err != nil {
			t.Fatal(err)
		}
		t.Logf("wrote %s", committedSpec)
		return
	}
	committed, err := os.ReadFile(committedSpec)
	if err != nil {
		t.Fatalf("read committed document: %v\nregenerate it with: go test ./internal/api -run TestOpenAPIUpToDate -update", err)
	}
	if !bytes.Equal(committed, served) {
		t.Fatalf("api/openapi.json is out of date with the code (first difference at byte %d).\n"+
			"Regenerate it with: go test ./internal/api -run TestOpenAPIUpToDate -update", firstDiff(committed, served))
	}
}

func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

// TestOpenAPIValid loads the served document with a third-party
// implementation (kin-openapi) and validates it.
func TestOpenAPIValid(t *testing.T) {
	loader := openapi3.NewLoader()
	doc, err := loader.LoadFromData(fetchSpec(t))
	if err != nil {
		t.Fatalf("load: %v", err)
	}
	if err := doc.Validate(context.Background()); err != nil {
		t.Fatalf("validate: %v", err)
	}
	for _, path := range []string{"/sandboxes", "/sandboxes/{id}", "/sandboxes/{id}/exec"} {
		if doc.Paths.Find(path) == nil {
			t.Errorf("document has no path %s", path)
		}
	}
	exec := doc.Paths.Find("/sandboxes/{id}/exec").Post
	timeout := exec.Responses.Status(http.StatusRequestTimeout)
	if timeout == nil || timeout.Value.Content.Get("application/problem+json") == nil {
		t.Fatal("exec does not document its 408 command_timeout response")
	}
	props := timeout.Value.Content.Get("application/problem+json").Schema.Value.Properties
	for _, p := range []string{"code", "stdout", "stderr", "timeout"} {
		if props[p] == nil {
			t.Errorf("408 response schema lacks %q", p)
		}
	}
}

// TestOpenAPIFieldsDocumented checks that every request and response field
// carries a description and an example, and that request fields have the
// bounds, enums and defaults the Manager enforces.
func TestOpenAPIFieldsDocumented(t *testing.T) {
	var doc struct {
		Components struct {
			Schemas map[string]struct {
				Properties map[string]map[string]any `json:"properties"`
				Additional *bool                     `json:"additionalProperties"`
			} `json:"schemas"`
		} `json:"components"`
	}
	if err := json.Unmarshal(fetchSpec(t), &doc); err != nil {
		t.Fatal(err)
	}
	schemas := doc.Components.Schemas
	for _, name := range []string{"CreateSandboxRequest", "Sandbox", "SandboxList", "ExecRequest", "ExecResult", "Snapshot", "SnapshotList", "SnapshotRequest", "StopRequest", "UpdateSandboxRequest", "MountSpec", "Mount", "Problem", "CommandTimeoutProblem", "Capabilities", "BackendCapability", "OSCapability", "Diagnostics", "DiagnosticCheck"} {
		s, ok := schemas[name]
		if !ok {
			t.Errorf("no schema %s", name)
			continue
		}
		for field, p := range s.Properties {
			if p["description"] == nil {
				t.Errorf("%s.%s has no description", name, field)
			}
			_, isArray := p["items"]
			if p["examples"] == nil && !isArray {
				t.Errorf("%s.%s has no example", name, field)
			}
		}
	}
	for _, name := range []string{"CreateSandboxRequest", "ExecRequest"} {
		if a := schemas[name].Additional; a == nil || *a {
			t.Errorf("%s accepts unknown fields", name)
		}
	}

	num := func(v any) int {
		f, _ := v.(float64)
		return int(f)
	}
	create := schemas["CreateSandboxRequest"].Properties
	bounds := []struct {
		schema         map[string]map[string]any
		field          string
		min, max, def  int
		constantSource string
	}{
		{create, "memory", sandbox.MinMemoryMiB, sandbox.MaxMemoryMiB, sandbox.DefaultMemoryMiB, "MemoryMiB"},
		{create, "disk_size", sandbox.MinDiskMiB, sandbox.MaxDiskMiB, sandbox.DefaultDiskMiB, "DiskMiB"},
		{create, "vcpus", sandbox.MinVCPUs, sandbox.MaxVCPUs, sandbox.DefaultVCPUs, "VCPUs"},
		{schemas["ExecRequest"].Properties, "timeout", sandbox.MinTimeoutSec, sandbox.MaxTimeoutSec, int(sandbox.DefaultTimeout.Seconds()), "Timeout"},
	}
	for _, b := range bounds {
		p := b.schema[b.field]
		if num(p["minimum"]) != b.min || num(p["maximum"]) != b.max || num(p["default"]) != b.def {
			t.Errorf("%s: minimum %v maximum %v default %v; the sandbox package says %d..%d default %d (sandbox.*%s)",
				b.field, p["minimum"], p["maximum"], p["default"], b.min, b.max, b.def, b.constantSource)
		}
	}
	if d := create["backend"]["default"]; d != sandbox.DefaultBackend {
		t.Errorf("backend default %v, want %q", d, sandbox.DefaultBackend)
	}
	if d := schemas["ExecRequest"].Properties["shell"]["default"]; d != string(sandbox.ShellLogin) {
		t.Errorf("shell default %v, want %q", d, sandbox.ShellLogin)
	}
}

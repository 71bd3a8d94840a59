package api

import (
	"encoding/json"
	"net/http"
	"slices"
	"testing"

	"github.com/smolvm/smolvm/internal/testenv"
)

func TestCapabilities(t *testing.T) {
	t.Parallel()
	srv := testServer(t, testenv.Manager(t), Options{})
	r := do(t, http.MethodGet, srv.URL+"/capabilities", nil, nil)
	if r.Status != http.StatusOK {
		t.Fatalf("status %d: %s", r.Status, r.Body)
	}
	var c Capabilities
	if err := json.Unmarshal(r.Body, &c); err != nil {
		t.Fatal(err)
	}
	backends := map[string]BackendCapability{}
	for _, b := range c.Backends {
		backends[b.Name] = b
	}
	if q := backends["qemu"]; !q.Available || !q.Default || q.Reason != "" {
		t.Errorf("qemu: %+v, want available and the default", q)
	}
	for _, name := range []string{"firecracker", "libkrun"} {
		if b := backends[name]; b.Available || b.Reason == "" {
			t.Errorf("%s: %+v, want unavailable with a reason", name, b)
		}
	}
	oses := map[string]OSCapability{}
	for _, o := range c.OS {
		oses[o.Name] = o
	}
	if a := oses["alpine"]; !a.Available || a.Image != "alpine:3.20" {
		t.Errorf("alpine: %+v", a)
	}
	if w := oses["windows"]; w.Available || w.Reason == "" {
		t.Errorf("windows: %+v, want unavailable with a reason", w)
	}
	if !slices.Equal(c.NetworkModes, []string{"open", "off", "restricted"}) {
		t.Errorf("network modes %v", c.NetworkModes)
	}
	for _, op := range []string{"POST /sandboxes", "POST /sandboxes/{id}/exec", "DELETE /sandboxes/{id}/ports/{guest}", "GET /capabilities", "GET /diagnostics"} {
		if !slices.Contains(c.Routes, op) {
			t.Errorf("routes %v lack %s", c.Routes, op)
		}
	}
	if c.APIVersion != APIVersion {
		t.Errorf("api_version %q", c.APIVersion)
	}
}

func TestDiagnostics(t *testing.T) {
	t.Parallel()
	srv := testServer(t, testenv.Manager(t), Options{Token: "s3cret"})
	if r := do(t, http.MethodGet, srv.URL+"/diagnostics", nil, nil); r.Status != http.StatusUnauthorized {
		t.Errorf("without the token: status %d, want 401", r.Status)
	}
	r := do(t, http.MethodGet, srv.URL+"/diagnostics", nil, map[string]string{"Authorization": "Bearer s3cret"})
	if r.Status != http.StatusOK {
		t.Fatalf("status %d: %s", r.Status, r.Body)
	}
	var d Diagnostics
	if err := json.Unmarshal(r.Body, &d); err != nil {
		t.Fatal(err)
	}
	// The test data directory shares the machine's prepared kernel and
	// image, so everything smolvm needs is there.
	if !d.Ready || (d.Accelerator != "tcg" && d.Accelerator != "kvm") {
		t.Errorf("ready %v, accelerator %q: %s", d.Ready, d.Accelerator, r.Body)
	}
	found := map[string]string{}
	for _, c := range d.Checks {
		found[c.Name] = c.Status
		if c.Status != "ok" && c.Fix == "" && c.Status != "warn" {
			t.Errorf("check %s is %s with no fix", c.Name, c.Status)
		}
	}
	for _, name := range []string{"qemu-system-x86_64", "kernel", "image"} {
		if found[name] != "ok" {
			t.Errorf("check %s: %q, want ok (%v)", name, found[name], found)
		}
	}
}

package api

import (
	"encoding/json"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/smolvm/smolvm/internal/testenv"
)

// With Prefer: respond-async, create answers 202 at once and the sandbox
// is seen creating, then running; a create that fails in the background
// is seen in the error state with its reason.
func TestCreateAsync(t *testing.T) {
	t.Parallel()
	m := testenv.Manager(t)
	base := testServer(t, m, Options{}).URL
	async := map[string]string{"Prefer": "respond-async"}

	r := do(t, http.MethodPost, base+"/sandboxes", `{"memory":256}`, async)
	if r.Status != http.StatusAccepted {
		t.Fatalf("async create: %d %s", r.Status, r.Body)
	}
	var sb Sandbox
	if err := json.Unmarshal(r.Body, &sb); err != nil || sb.Status != "creating" || !strings.HasPrefix(sb.ID, "vm-") {
		t.Fatalf("async create body %s (%v)", r.Body, err)
	}
	waitStatus := func(id string) Sandbox {
		t.Helper()
		deadline := time.Now().Add(3 * time.Minute)
		for {
			r := do(t, http.MethodGet, base+"/sandboxes/"+id, nil, nil)
			var got Sandbox
			if r.Status != http.StatusOK || json.Unmarshal(r.Body, &got) != nil {
				t.Fatalf("get %s: %d %s", id, r.Status, r.Body)
			}
			if got.Status != "creating" {
				return got
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s still creating after 3 minutes", id)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	if got := waitStatus(sb.ID); got.Status != "running" {
		t.Fatalf("async create ended %+v", got)
	}
	res, rr := execHTTP(t, base, sb.ID, map[string]any{"command": "echo ready"})
	if rr.Status != http.StatusOK || res.Stdout != "ready\n" {
		t.Errorf("exec after async create: %d %s", rr.Status, rr.Body)
	}

	// Deleting a sandbox while it is being created stops the work and
	// leaves nothing behind.
	r = do(t, http.MethodPost, base+"/sandboxes", `{"memory":384}`, async)
	if r.Status != http.StatusAccepted {
		t.Fatalf("async create: %d %s", r.Status, r.Body)
	}
	var doomed Sandbox
	json.Unmarshal(r.Body, &doomed)
	if r := do(t, http.MethodDelete, base+"/sandboxes/"+doomed.ID, nil, nil); r.Status != http.StatusNoContent {
		t.Errorf("delete while creating: %d %s", r.Status, r.Body)
	}
	if r := do(t, http.MethodGet, base+"/sandboxes/"+doomed.ID, nil, nil); r.Status != http.StatusNotFound {
		t.Errorf("get after delete while creating: %d %s", r.Status, r.Body)
	}
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		if b, err := os.ReadFile(p); err == nil && strings.Contains(string(b), doomed.ID) {
			t.Errorf("a process still names %s: %s", doomed.ID, strings.ReplaceAll(string(b), "\x00", " "))
		}
	}

	// Bad input is still refused at once.
	if r := do(t, http.MethodPost, base+"/sandboxes", `{"memory":1}`, async); r.Status != http.StatusUnprocessableEntity {
		t.Errorf("async create with memory 1: %d", r.Status)
	}

	// A registry nobody answers on: accepted, then error with the reason.
	r = do(t, http.MethodPost, base+"/sandboxes", `{"image":"127.0.0.1:1/nothing:1"}`, async)
	if r.Status != http.StatusAccepted {
		t.Fatalf("async create from a dead registry: %d %s", r.Status, r.Body)
	}
	json.Unmarshal(r.Body, &sb)
	got := waitStatus(sb.ID)
	if got.Status != "error" || !strings.Contains(got.Error, "127.0.0.1:1") {
		t.Errorf("failed async create: %+v", got)
	}
	if r := do(t, http.MethodDelete, base+"/sandboxes/"+sb.ID, nil, nil); r.Status != http.StatusNoContent {
		t.Errorf("delete of a failed sandbox: %d %s", r.Status, r.Body)
	}
}

package api

import (
	"encoding/json"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/smolvm/smolvm/internal/sandbox"
	"github.com/smolvm/smolvm/internal/testenv"
)

// The lifecycle over HTTP: create answers 201 with a Location, names work
// as ids, labels filter, pause/resume/stop/start answer the sandbox (and
// 409 with its status in the wrong state), the time limit is shown and
// extended, the console log reads, snapshots fork, and delete answers 204.
func TestLifecycleHTTP(t *testing.T) {
	t.Parallel()
	root := t.TempDir()
	m := testenv.ManagerWith(t, sandbox.Options{AllowMounts: []string{root}})
	base := testServer(t, m, Options{}).URL

	r := do(t, http.MethodPost, base+"/sandboxes", `{"name":"api-box","labels":{"team":"ml"},"env":{"GREETING":"hi"},"timeout":600,"network":{"allowed_cidrs":["203.0.113.0/24"]}}`, nil)
	var sb Sandbox
	if r.Status != http.StatusCreated || json.Unmarshal(r.Body, &sb) != nil {
		t.Fatalf("create: %d %s", r.Status, r.Body)
	}
	if loc := r.Header.Get("Location"); loc != "/sandboxes/"+sb.ID {
		t.Errorf("Location = %q", loc)
	}
	if sb.Name != "api-box" || sb.Labels["team"] != "ml" || sb.Timeout != 600 || sb.OnTimeout != "delete" || sb.ExpiresAt == nil ||
		sb.Network.Mode != "restricted" || len(sb.Network.Allow) != 1 {
		t.Errorf("created = %+v", sb)
	}
	if res, r := execHTTP(t, base, "api-box", `{"command":"echo $GREETING"}`); r.Status != http.StatusOK || res.Stdout != "hi\n" {
		t.Fatalf("exec by name: %d %s", r.Status, r.Body)
	}
	var list SandboxList
	if r := do(t, http.MethodGet, base+"/sandboxes?label=team=ml", nil, nil); r.Status != http.StatusOK || json.Unmarshal(r.Body, &list) != nil || len(list.Sandboxes) != 1 {
		t.Fatalf("label filter: %d %s", r.Status, r.Body)
	}
	if r := do(t, http.MethodGet, base+"/sandboxes?label=team=web", nil, nil); r.Status != http.StatusOK || string(r.Body) != `{"sandboxes":[]}`+"\n" {
		t.Fatalf("label filter, no match: %d %s", r.Status, r.Body)
	}
	if r := do(t, http.MethodGet, base+"/sandboxes?label=team=ml&label=tier=prod", nil, nil); r.Status != http.StatusOK || string(r.Body) != `{"sandboxes":[]}`+"\n" {
		t.Fatalf("two label filters, one unmet: %d %s", r.Status, r.Body)
	}
	if r := do(t, http.MethodGet, base+"/sandboxes?label=nonsense", nil, nil); r.Status != http.StatusUnprocessableEntity {
		t.Fatalf("malformed label filter: %d %s", r.Status, r.Body)
	}

	post := func(verb string, want int) Sandbox {
		t.Helper()
		r := do(t, http.MethodPost, base+"/sandboxes/api-box/"+verb, nil, nil)
		var got Sandbox
		if r.Status != want {
			t.Fatalf("%s: %d %s", verb, r.Status, r.Body)
		}
		if want == http.StatusOK {
			json.Unmarshal(r.Body, &got)
		}
		return got
	}
	if got := post("pause", http.StatusOK); got.Status != "paused" {
		t.Fatalf("pause answered %+v", got)
	}
	r = do(t, http.MethodPost, base+"/sandboxes/api-box/pause", nil, nil)
	if p := r.problem(t); r.Status != http.StatusConflict || p.Code != "invalid_state" || p.SandboxStatus != "paused" {
		t.Fatalf("pause of a paused sandbox: %d %s", r.Status, r.Body)
	}
	if r := do(t, http.MethodPost, base+"/sandboxes/api-box/exec", `{"command":"true"}`, nil); r.Status != http.StatusConflict {
		t.Fatalf("exec while paused: %d %s", r.Status, r.Body)
	}
	if got := post("resume", http.StatusOK); got.Status != "running" {
		t.Fatalf("resume answered %+v", got)
	}

	// A snapshot, then a fork of it by name.
	r = do(t, http.MethodPost, base+"/sandboxes/api-box/snapshots", `{"name":"api-snap"}`, nil)
	var snap Snapshot
	if r.Status != http.StatusCreated || json.Unmarshal(r.Body, &snap) != nil || r.Header.Get("Location") != "/snapshots/"+snap.ID || snap.Sandbox != sb.ID {
		t.Fatalf("snapshot: %d %s", r.Status, r.Body)
	}
	var snaps SnapshotList
	if r := do(t, http.MethodGet, base+"/snapshots", nil, nil); r.Status != http.StatusOK || json.Unmarshal(r.Body, &snaps) != nil || len(snaps.Snapshots) != 1 || snaps.Snapshots[0].SizeBytes <= 0 {
		t.Fatalf("list snapshots: %d %s", r.Status, r.Body)
	}
	if r := do(t, http.MethodGet, base+"/snapshots/api-snap", nil, nil); r.Status != http.StatusOK {
		t.Fatalf("get snapshot by name: %d %s", r.Status, r.Body)
	}
	r = do(t, http.MethodPost, base+"/sandboxes", `{"snapshot":"api-snap"}`, nil)
	var fork Sandbox
	if r.Status != http.StatusCreated || json.Unmarshal(r.Body, &fork) != nil || fork.Snapshot != snap.ID {
		t.Fatalf("fork: %d %s", r.Status, r.Body)
	}
	if r := do(t, http.MethodPost, base+"/sandboxes", `{"snapshot":"api-snap","memory":1024}`, nil); r.Status != http.StatusUnprocessableEntity || r.problem(t).Code != "snapshot_mismatch" {
		t.Fatalf("fork with other memory: %d %s", r.Status, r.Body)
	}
	if r := do(t, http.MethodPost, base+"/sandboxes", `{"snapshot":"no-such-snap"}`, nil); r.Status != http.StatusUnprocessableEntity {
		t.Fatalf("fork of a missing snapshot: %d %s", r.Status, r.Body)
	}
	if r := do(t, http.MethodDelete, base+"/snapshots/api-snap", nil, nil); r.Status != http.StatusConflict || r.problem(t).Code != "snapshot_in_use" {
		t.Fatalf("delete of a snapshot in use: %d %s", r.Status, r.Body)
	}
	if r := do(t, http.MethodDelete, base+"/sandboxes/"+fork.ID, nil, nil); r.Status != http.StatusNoContent {
		t.Fatalf("delete fork: %d %s", r.Status, r.Body)
	}
	if r := do(t, http.MethodDelete, base+"/snapshots/api-snap", nil, nil); r.Status != http.StatusNoContent {
		t.Fatalf("delete snapshot: %d %s", r.Status, r.Body)
	}

	// The time limit: extended, then shown.
	r = do(t, http.MethodPatch, base+"/sandboxes/api-box", `{"timeout":3600}`, nil)
	var patched Sandbox
	if r.Status != http.StatusOK || json.Unmarshal(r.Body, &patched) != nil || patched.Timeout != 3600 || patched.ExpiresAt == nil || !patched.ExpiresAt.After(sb.ExpiresAt.Add(30*time.Minute)) {
		t.Fatalf("patch timeout: %d %s", r.Status, r.Body)
	}
	if r := do(t, http.MethodPatch, base+"/sandboxes/api-box", `{"timeout":999999}`, nil); r.Status != http.StatusUnprocessableEntity {
		t.Fatalf("patch with a timeout over 24 h: %d %s", r.Status, r.Body)
	}

	// The console log.
	execHTTP(t, base, "api-box", `{"command":"echo '<2>api-log-marker' > /dev/kmsg"}`)
	deadline := time.Now().Add(10 * time.Second)
	for {
		r := do(t, http.MethodGet, base+"/sandboxes/api-box/logs", nil, nil)
		if r.Status == http.StatusOK && strings.HasPrefix(r.ContentType, "text/plain") && strings.Contains(string(r.Body), "api-log-marker") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("logs: %d %s %q", r.Status, r.ContentType, r.Body)
		}
		time.Sleep(200 * time.Millisecond)
	}

	if got := post("stop", http.StatusOK); got.Status != "stopped" {
		t.Fatalf("stop answered %+v", got)
	}
	r = do(t, http.MethodPost, base+"/sandboxes/api-box/stop", `{"timeout":5}`, nil)
	if p := r.problem(t); r.Status != http.StatusConflict || p.SandboxStatus != "stopped" {
		t.Fatalf("stop of a stopped sandbox: %d %s", r.Status, r.Body)
	}
	if got := post("start", http.StatusOK); got.Status != "running" {
		t.Fatalf("start answered %+v", got)
	}

	// Mounts: outside the allowed roots is 403, nothing is created.
	outside := t.TempDir()
	r = do(t, http.MethodPost, base+"/sandboxes", map[string]any{"mounts": []map[string]any{{"host": outside, "guest": "/w"}}}, nil)
	if r.Status != http.StatusForbidden || r.problem(t).Code != "mount_not_allowed" {
		t.Fatalf("mount outside the roots: %d %s", r.Status, r.Body)
	}
	os.MkdirAll(filepath.Join(root, "rel"), 0o755)
	r = do(t, http.MethodPost, base+"/sandboxes", map[string]any{"mounts": []map[string]any{{"host": "rel", "guest": "/w"}}}, nil)
	if r.Status != http.StatusUnprocessableEntity {
		t.Fatalf("relative mount: %d %s", r.Status, r.Body)
	}
	if r := do(t, http.MethodGet, base+"/sandboxes", nil, nil); json.Unmarshal(r.Body, &list) != nil || len(list.Sandboxes) != 1 {
		t.Fatalf("refused creates left sandboxes: %s", r.Body)
	}

	if r := do(t, http.MethodDelete, base+"/sandboxes/api-box", nil, nil); r.Status != http.StatusNoContent || len(r.Body) != 0 {
		t.Fatalf("delete: %d %s", r.Status, r.Body)
	}
}

// A request in flight when its sandbox is deleted answers 404
// sandbox_not_found, not a 500 about a lost connection.
func TestDeleteDuringRequest(t *testing.T) {
	t.Parallel()
	m := testenv.Manager(t)
	base := testServer(t, m, Options{}).URL
	r := do(t, http.MethodPost, base+"/sandboxes", `{"memory":256}`, nil)
	var sb Sandbox
	if r.Status != http.StatusCreated || json.Unmarshal(r.Body, &sb) != nil {
		t.Fatalf("create: %d %s", r.Status, r.Body)
	}
	answered := make(chan response, 1)
	go func() {
		answered <- do(t, http.MethodPost, base+"/sandboxes/"+sb.ID+"/exec", `{"command":"echo started; sleep 60","timeout":120}`, nil)
	}()
	// Delete once the command runs in the guest.
	for deadline := time.Now().Add(30 * time.Second); ; {
		r := do(t, http.MethodGet, base+"/sandboxes/"+sb.ID+"/stats", nil, nil)
		var st SandboxStats
		if r.Status == http.StatusOK && json.Unmarshal(r.Body, &st) == nil && st.Guest != nil && slices.ContainsFunc(st.Guest.Processes, func(p GuestProcess) bool { return p.Command == "sleep 60" }) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the command did not start: %d %s", r.Status, r.Body)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if r := do(t, http.MethodDelete, base+"/sandboxes/"+sb.ID, nil, nil); r.Status != http.StatusNoContent {
		t.Fatalf("delete: %d %s", r.Status, r.Body)
	}
	select {
	case r := <-answered:
		if p := r.problem(t); r.Status != http.StatusNotFound || p.Code != "sandbox_not_found" {
			t.Errorf("exec cut short by a delete: %d %s, want 404 sandbox_not_found", r.Status, r.Body)
		}
	case <-time.After(60 * time.Second):
		t.Fatal("exec cut short by a delete did not answer")
	}
}

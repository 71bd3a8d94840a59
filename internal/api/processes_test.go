package api

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/smolvm/smolvm/internal/testenv"
)

// TestProcesses runs background processes in a real VM through HTTP: a
// web server started through the API serves through an exposed port, is
// listed, outlives the server that started it, replays its output, and
// ends by a signal with the status that signal gives.
func TestProcesses(t *testing.T) {
	t.Parallel()
	d := testenv.DataDir(t)
	m1 := testenv.ManagerAt(t, d)
	first := testServer(t, m1, Options{})
	r := do(t, http.MethodPost, first.URL+"/sandboxes", `{"memory":512,"ports":[{"guest":8080}]}`, nil)
	var sb Sandbox
	if r.Status != http.StatusCreated || json.Unmarshal(r.Body, &sb) != nil || len(sb.Ports) != 1 {
		t.Fatalf("create: %d %s", r.Status, r.Body)
	}
	id, hostPort := sb.ID, sb.Ports[0].Host

	r = do(t, http.MethodPost, first.URL+"/sandboxes/"+id+"/processes",
		map[string]any{"command": "echo serving; exec python3 -m http.server 8080", "tag": "web", "cwd": "/etc", "shell": "raw"}, nil)
	var web Process
	if r.Status != http.StatusCreated || json.Unmarshal(r.Body, &web) != nil || web.PID == 0 || !web.Running || web.Tag != "web" {
		t.Fatalf("start: %d %s", r.Status, r.Body)
	}
	if loc := r.Header.Get("Location"); loc != fmt.Sprintf("/sandboxes/%s/processes/%d", id, web.PID) {
		t.Errorf("Location %q", loc)
	}
	if r := do(t, http.MethodPost, first.URL+"/sandboxes/"+id+"/processes", map[string]any{"command": "sleep 1", "tag": "web"}, nil); r.Status != http.StatusConflict || r.problem(t).Code != "tag_in_use" {
		t.Errorf("a second process tagged web: %d %s", r.Status, r.Body)
	}

	// It serves through the exposed port (from /etc, its cwd).
	var body string
	deadline := time.Now().Add(60 * time.Second)
	for {
		resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/hostname", hostPort))
		if err == nil {
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				body = string(b)
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("the web server never answered: %v", err)
		}
		time.Sleep(200 * time.Millisecond)
	}
	if strings.TrimSpace(body) != id {
		t.Errorf("served /etc/hostname = %q, want %s", body, id)
	}
	// The first server goes, with its Manager and agent sessions.
	first.Close()
	m1.Close()

	// A second server on the same data directory finds it running.
	second := testServer(t, testenv.ManagerAt(t, d), Options{})
	base := second.URL + "/sandboxes/" + id + "/processes"
	r = do(t, http.MethodGet, base, nil, nil)
	var list ProcessList
	if r.Status != http.StatusOK || json.Unmarshal(r.Body, &list) != nil {
		t.Fatalf("list: %d %s", r.Status, r.Body)
	}
	found := false
	for _, p := range list.Processes {
		if p.PID == web.PID && p.Running && p.Command == "echo serving; exec python3 -m http.server 8080" {
			found = true
		}
	}
	if !found {
		t.Errorf("the web server is not listed as running: %s", r.Body)
	}
	r = do(t, http.MethodGet, fmt.Sprintf("%s/%d/output", base, web.PID), nil, nil)
	var out ProcessOutputResult
	if r.Status != http.StatusOK || json.Unmarshal(r.Body, &out) != nil {
		t.Fatalf("output: %d %s", r.Status, r.Body)
	}
	if out.Stdout != "serving\n" || !strings.Contains(out.Stderr, "GET /hostname HTTP/1.1") || out.DroppedBytes != 0 {
		t.Errorf("output %+v", out)
	}

	// Follow it, then kill it: the stream replays, then ends with the exit.
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, fmt.Sprintf("%s/%d/output", base, web.PID), nil)
	req.Header.Set("Accept", "text/event-stream")
	resp, err := http.DefaultClient.Do(req)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("follow: %v %v", resp, err)
	}
	events := make(chan []execEvent, 1)
	go func() { events <- readSSE(t, resp) }()
	if r := do(t, http.MethodPost, fmt.Sprintf("%s/%d/signal", base, web.PID), `{"signal":"KILL"}`, nil); r.Status != http.StatusNoContent {
		t.Fatalf("signal: %d %s", r.Status, r.Body)
	}
	evs := <-events
	if len(evs) < 3 || evs[0].Data != `{"text":"serving\n"}` || evs[len(evs)-1].Type != "exit" {
		t.Fatalf("followed events %v", evs)
	}
	var ended Process
	json.Unmarshal([]byte(evs[len(evs)-1].Data), &ended)
	if ended.Running || ended.ExitCode == nil || *ended.ExitCode != 137 || ended.Signal != 9 {
		t.Errorf("after KILL: %s", evs[len(evs)-1].Data)
	}
	r = do(t, http.MethodGet, fmt.Sprintf("%s/%d", base, web.PID), nil, nil)
	if r.Status != http.StatusOK || !strings.Contains(string(r.Body), `"exit_code":137`) {
		t.Errorf("get after KILL: %d %s", r.Status, r.Body)
	}

	t.Run("stdin", func(t *testing.T) {
		r := do(t, http.MethodPost, base, `{"argv":["sh","-c","while read l; do echo got $l; done; echo eof"],"stdin":"one\n"}`, nil)
		var p Process
		if r.Status != http.StatusCreated || json.Unmarshal(r.Body, &p) != nil {
			t.Fatalf("start: %d %s", r.Status, r.Body)
		}
		if r := do(t, http.MethodPost, fmt.Sprintf("%s/%d/stdin", base, p.PID), `{"data":"two\n","eof":true}`, nil); r.Status != http.StatusNoContent {
			t.Fatalf("stdin: %d %s", r.Status, r.Body)
		}
		deadline := time.Now().Add(30 * time.Second)
		for {
			r := do(t, http.MethodGet, fmt.Sprintf("%s/%d/output", base, p.PID), nil, nil)
			var out ProcessOutputResult
			json.Unmarshal(r.Body, &out)
			if !out.Process.Running {
				if out.Stdout != "got one\ngot two\neof\n" || *out.Process.ExitCode != 0 {
					t.Errorf("output %+v", out)
				}
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("still running: %s", r.Body)
			}
			time.Sleep(100 * time.Millisecond)
		}
		if r := do(t, http.MethodPost, fmt.Sprintf("%s/%d/stdin", base, p.PID), `{"data":"late"}`, nil); r.Status != http.StatusConflict || r.problem(t).Code != "process_not_running" {
			t.Errorf("stdin after the end: %d %s", r.Status, r.Body)
		}
	})

	t.Run("refusals", func(t *testing.T) {
		for _, tt := range []struct {
			method, path, body string
			status             int
			code               string
		}{
			{http.MethodGet, "/999999", "", 404, "process_not_found"},
			{http.MethodGet, "/999999/output", "", 404, "process_not_found"},
			{http.MethodPost, "/999999/signal", `{"signal":"TERM"}`, 404, "process_not_found"},
			{http.MethodPost, fmt.Sprintf("/%d/signal", web.PID), `{"signal":"BOGUS"}`, 422, "invalid_signal"},
			{http.MethodPost, fmt.Sprintf("/%d/signal", web.PID), `{"signal":"TERM"}`, 409, "process_not_running"},
			{http.MethodPost, "", `{"command":"true","cwd":"/nope"}`, 422, "invalid_cwd"},
			{http.MethodPost, "", `{"command":"true","pty":{"cols":0,"rows":5}}`, 422, CodeValidationFailed},
			{http.MethodPost, "", `{}`, 422, CodeValidationFailed},
		} {
			var body any
			if tt.body != "" {
				body = tt.body
			}
			r := do(t, tt.method, base+tt.path, body, nil)
			if r.Status != tt.status || r.problem(t).Code != tt.code {
				t.Errorf("%s %s %s: %d %s, want %d %s", tt.method, tt.path, tt.body, r.Status, r.Body, tt.status, tt.code)
			}
		}
		if r := do(t, http.MethodGet, second.URL+"/sandboxes/vm-00000000/processes", nil, nil); r.Status != http.StatusNotFound {
			t.Errorf("processes of an unknown sandbox: %d", r.Status)
		}
	})
}

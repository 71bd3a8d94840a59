package api

import (
	"bufio"
	"encoding/json"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/smolvm/smolvm/internal/testenv"
)

// sseEvent is one event read off a stream.
type sseEvent struct {
	ID   uint64
	Type string
	Data EventData
}

// stream reads GET /events until it ends, sending events and comments.
type stream struct {
	events   chan sseEvent
	comments chan string
	done     chan struct{}
	resp     *http.Response
}

func openEvents(t *testing.T, url string, header map[string]string) *stream {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, url+"/events", nil)
	for k, v := range header {
		req.Header.Set(k, v)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusOK || resp.Header.Get("Content-Type") != "text/event-stream" {
		resp.Body.Close()
		t.Fatalf("GET /events: %s %s", resp.Status, resp.Header.Get("Content-Type"))
	}
	s := &stream{events: make(chan sseEvent, 256), comments: make(chan string, 256), done: make(chan struct{}), resp: resp}
	t.Cleanup(func() { resp.Body.Close() })
	go func() {
		defer close(s.done)
		sc := bufio.NewScanner(resp.Body)
		var ev sseEvent
		for sc.Scan() {
			line := sc.Text()
			switch {
			case line == "":
				if ev.Type != "" {
					s.events <- ev
				}
				ev = sseEvent{}
			case strings.HasPrefix(line, ":"):
				select {
				case s.comments <- line:
				default:
				}
			case strings.HasPrefix(line, "id: "):
				ev.ID, _ = strconv.ParseUint(strings.TrimPrefix(line, "id: "), 10, 64)
			case strings.HasPrefix(line, "event: "):
				ev.Type = strings.TrimPrefix(line, "event: ")
			case strings.HasPrefix(line, "data: "):
				json.Unmarshal([]byte(strings.TrimPrefix(line, "data: ")), &ev.Data)
			}
		}
	}()
	return s
}

// next waits for the next event of one of the types, skipping others.
func (s *stream) next(t *testing.T, types ...string) sseEvent {
	t.Helper()
	deadline := time.After(2 * time.Minute)
	for {
		select {
		case ev := <-s.events:
			for _, typ := range types {
				if ev.Type == typ {
					return ev
				}
			}
		case <-s.done:
			t.Fatalf("the stream ended waiting for %v", types)
		case <-deadline:
			t.Fatalf("no %v event", types)
		}
	}
}

func TestEvents(t *testing.T) {
	t.Parallel()
	stop := make(chan struct{})
	srv := testServer(t, testenv.Manager(t), Options{Stop: stop, Keepalive: 50 * time.Millisecond})
	s := openEvents(t, srv.URL, nil)
	select {
	case <-s.comments:
	case <-time.After(time.Minute):
		t.Fatal("no keepalive comment on an idle stream")
	}

	r := do(t, http.MethodPost, srv.URL+"/sandboxes", `{"memory":256,"network":{"mode":"off"}}`, nil)
	if r.Status != http.StatusCreated {
		t.Fatalf("create: %d %s", r.Status, r.Body)
	}
	var sb Sandbox
	json.Unmarshal(r.Body, &sb)
	created := s.next(t, "sandbox.created")
	if created.Data.SandboxID != sb.ID || created.Data.Sandbox == nil || created.Data.Sandbox.Status != "creating" || created.ID == 0 {
		t.Errorf("sandbox.created: %+v", created)
	}
	running := s.next(t, "sandbox.updated")
	if running.Data.Sandbox == nil || running.Data.Sandbox.Status != "running" || running.ID <= created.ID {
		t.Errorf("sandbox.updated: %+v", running)
	}
	if r := do(t, http.MethodPost, srv.URL+"/sandboxes/"+sb.ID+"/exec", `{"command":"exit 3"}`, nil); r.Status != http.StatusOK {
		t.Fatalf("exec: %d %s", r.Status, r.Body)
	}
	exited := s.next(t, "process.exited")
	if exited.Data.SandboxID != sb.ID || exited.Data.ExitCode == nil || *exited.Data.ExitCode != 3 {
		t.Errorf("process.exited: %+v", exited)
	}
	if r := do(t, http.MethodDelete, srv.URL+"/sandboxes/"+sb.ID, nil, nil); r.Status != http.StatusNoContent {
		t.Fatalf("delete: %d %s", r.Status, r.Body)
	}
	deleted := s.next(t, "sandbox.deleted")
	if deleted.Data.SandboxID != sb.ID || deleted.ID <= exited.ID {
		t.Errorf("sandbox.deleted: %+v", deleted)
	}

	// Resuming after the created event replays what followed, in order.
	again := openEvents(t, srv.URL, map[string]string{"Last-Event-ID": strconv.FormatUint(created.ID, 10)})
	if ev := again.next(t, "sandbox.updated", "sandbox.created"); ev.ID != running.ID {
		t.Errorf("resumed with %+v, want event %d first", ev, running.ID)
	}
	if ev := again.next(t, "sandbox.deleted"); ev.ID != deleted.ID {
		t.Errorf("resumed stream: %+v, want the delete", ev)
	}

	if r := do(t, http.MethodGet, srv.URL+"/events", nil, map[string]string{"Last-Event-ID": "yesterday"}); r.Status != http.StatusBadRequest {
		t.Errorf("a bad Last-Event-ID: status %d, want 400", r.Status)
	}

	// A shutting-down server ends its streams.
	close(stop)
	for _, st := range []*stream{s, again} {
		select {
		case <-st.done:
		case <-time.After(time.Minute):
			t.Fatal("a stream outlived the server's stop")
		}
	}
}

package api

import (
	"encoding/json"
	"fmt"
	"net/http"
	"reflect"
	"strconv"
	"time"

	"github.com/danielgtaylor/huma/v2"

	"github.com/smolvm/smolvm/internal/sandbox"
)

// EventData is the data of one event of GET /events.
type EventData struct {
	SandboxID  string           `json:"sandbox_id" example:"vm-a1b2c3d4" doc:"The sandbox the event is about."`
	Time       time.Time        `json:"time" example:"2026-06-24T10:00:00Z" doc:"When it happened (RFC 3339)."`
	Sandbox    *Sandbox         `json:"sandbox,omitempty" doc:"sandbox.created and sandbox.updated: the sandbox as it is now."`
	Progress   *SandboxProgress `json:"progress,omitempty" doc:"image.pull: how far preparing the sandbox's image has come."`
	ExitCode   *int             `json:"exit_code,omitempty" example:"0" doc:"process.exited: the command's exit status."`
	TimedOut   bool             `json:"timed_out,omitempty" example:"false" doc:"process.exited: whether the command ran past its timeout."`
	DurationMS int64            `json:"duration_ms,omitempty" minimum:"0" example:"12" doc:"process.exited: how long the command ran."`
}

// GapData is the data of a stream.gap event.
type GapData struct {
	Reason string `json:"reason" example:"events after 17 are no longer kept" doc:"Why events were missed; list the sandboxes again to catch up."`
}

// eventsKeepalive is how often an idle stream gets a comment, which keeps
// proxies from closing it.
const eventsKeepalive = 15 * time.Second

func documentEvents(hapi huma.API) {
	reg := hapi.OpenAPI().Components.Schemas
	data := reg.Schema(reflect.TypeOf(EventData{}), true, "")
	gap := reg.Schema(reflect.TypeOf(GapData{}), true, "")
	hapi.OpenAPI().AddOperation(&huma.Operation{
		OperationID: "streamEvents",
		Method:      http.MethodGet,
		Path:        "/events",
		Summary:     "Stream events",
		Tags:        []string{"host"},
		Description: "Server-Sent Events of what happens to this server's sandboxes: `sandbox.created`, `sandbox.updated` (status or ports changed), `sandbox.deleted`, `image.pull` (at most one a second per sandbox, the last always sent), and `process.exited`. " +
			"Each event has an increasing `id`; reconnecting with `Last-Event-ID` resumes after it from a backlog of the last " + strconv.Itoa(sandbox.EventBacklog) + " events, and a `stream.gap` event says when some were no longer kept, or when the id is past the newest this server gave out (ids start again at 1 when the server restarts: a client that reconnects to a restarted server should list the sandboxes again). " +
			"A comment line every 15 s keeps proxies from closing an idle stream. The data of every event is a JSON object.",
		Parameters: []*huma.Param{{
			Name: "Last-Event-ID", In: "header", Description: "The id of the last event received: the stream resumes after it. 0 replays every event still kept.",
			Schema: &huma.Schema{Type: "string"},
		}},
		Responses: map[string]*huma.Response{
			"200": {
				Description: "An event stream that lasts until the client or the server ends it.",
				Content: map[string]*huma.MediaType{"text/event-stream": {Schema: &huma.Schema{
					Description: "Events, each with an id, an event type and JSON data.",
					OneOf:       []*huma.Schema{data, gap},
				}}},
			},
			"401": {Description: "The server has a token and the request did not carry it.", Content: map[string]*huma.MediaType{"application/problem+json": {Schema: reg.Schema(reflect.TypeOf(Problem{}), true, "")}}},
		},
	})
}

// events serves GET /events.
func (h *handlers) events(w http.ResponseWriter, r *http.Request) {
	if h.m == nil {
		writeProblem(w, r, newProblem(http.StatusServiceUnavailable, CodeInternal, "no sandbox manager is configured"))
		return
	}
	m := h.m
	var after uint64
	v := r.Header.Get("Last-Event-ID")
	if v != "" {
		n, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			p := newProblem(http.StatusBadRequest, CodeValidationFailed, fmt.Sprintf("Last-Event-ID %q is not an event id (a whole number)", v))
			p.Field = "Last-Event-ID"
			writeProblem(w, r, p)
			return
		}
		after = n
	}
	past, complete, next, cancel := m.Subscribe(after, v != "")
	defer cancel()
	rc := http.NewResponseController(w)
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-cache")
	w.Header().Set("X-Accel-Buffering", "no")
	w.WriteHeader(http.StatusOK)
	if !complete {
		writeEvent(w, 0, "stream.gap", GapData{Reason: fmt.Sprintf("events after %d are no longer kept, or came from an earlier run of the server", after)})
	}
	for _, ev := range past {
		writeSandboxEvent(w, ev)
	}
	if rc.Flush() != nil {
		return
	}
	tick := time.NewTicker(h.keepalive)
	defer tick.Stop()
	for {
		select {
		case <-r.Context().Done():
			return
		case <-h.stop:
			return
		case <-tick.C:
			fmt.Fprint(w, ": keepalive\n\n")
		case ev, ok := <-next:
			if !ok {
				return // too far behind; the client resumes with Last-Event-ID
			}
			writeSandboxEvent(w, ev)
		}
		if rc.Flush() != nil {
			return
		}
	}
}

func writeSandboxEvent(w http.ResponseWriter, ev sandbox.Event) {
	d := EventData{SandboxID: ev.SandboxID, Time: ev.Time}
	if ev.Sandbox != nil {
		s := SandboxFromInfo(*ev.Sandbox)
		d.Sandbox = &s
	}
	if p := ev.Progress; p != nil {
		d.Progress = &SandboxProgress{Phase: p.Phase, DoneBytes: p.Done, TotalBytes: p.Total}
	}
	if e := ev.Exit; e != nil {
		code := e.ExitCode
		d.ExitCode, d.TimedOut, d.DurationMS = &code, e.TimedOut, e.Duration.Milliseconds()
	}
	writeEvent(w, ev.ID, ev.Type, d)
}

func writeEvent(w http.ResponseWriter, id uint64, typ string, data any) {
	b, _ := json.Marshal(data)
	if id > 0 {
		fmt.Fprintf(w, "id: %d\n", id)
	}
	fmt.Fprintf(w, "event: %s\ndata: %s\n\n", typ, b)
}

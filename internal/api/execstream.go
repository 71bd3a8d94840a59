package api

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"mime"
	"net/http"
	"reflect"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/danielgtaylor/huma/v2"

	"github.com/smolvm/smolvm/internal/sandbox"
)

// Media types exec streams in.
const (
	mediaSSE    = "text/event-stream"
	mediaNDJSON = "application/x-ndjson"
)

// ExecOutputEvent is the data of a stdout or stderr event of a streamed
// exec: exactly one of text and base64 is set.
type ExecOutputEvent struct {
	Type   string `json:"type,omitempty" enum:"stdout,stderr" doc:"NDJSON only: the event type (SSE carries it as the event name)."`
	Text   string `json:"text,omitempty" example:"hello\n" doc:"The bytes written, when they are valid UTF-8."`
	Base64 string `json:"base64,omitempty" example:"/w==" doc:"The bytes written, base64-encoded, when they are not valid UTF-8."`
}

// ExecExitEvent is the data of the final exit event of a streamed exec.
type ExecExitEvent struct {
	Type       string `json:"type,omitempty" enum:"exit" doc:"NDJSON only: the event type."`
	ExitCode   int    `json:"exit_code" example:"0" doc:"The command's exit status, 128 plus the signal that killed it, or 137 after a timeout."`
	DurationMS int64  `json:"duration_ms" minimum:"0" example:"12" doc:"How long the command ran."`
	TimedOut   bool   `json:"timed_out" example:"false" doc:"Whether the command ran past its timeout and was killed."`
}

// streamExec serves POST /sandboxes/{id}/exec to clients that ask for a
// stream (Accept: text/event-stream or application/x-ndjson), and a
// process's output to those that ask to follow it; every other request goes
// on to next.
func streamExec(h *handlers, next http.Handler) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /sandboxes/{id}/exec", func(w http.ResponseWriter, r *http.Request) {
		if format := streamFormat(r.Header.Get("Accept")); format != "" {
			h.execStream(w, r, format)
			return
		}
		next.ServeHTTP(w, r)
	})
	mux.HandleFunc("GET /sandboxes/{id}/processes/{pid}/output", func(w http.ResponseWriter, r *http.Request) {
		if streamFormat(r.Header.Get("Accept")) == mediaSSE {
			h.followProcess(w, r)
			return
		}
		next.ServeHTTP(w, r)
	})
	mux.Handle("/", next)
	return mux
}

// streamFormat is the stream media type Accept asks for first, or "" for
// a plain JSON answer.
func streamFormat(accept string) string {
	for _, part := range strings.Split(accept, ",") {
		mt, _, err := mime.ParseMediaType(strings.TrimSpace(part))
		if err != nil {
			continue
		}
		switch mt {
		case mediaSSE, mediaNDJSON:
			return mt
		case "application/json", "application/problem+json", "*/*", "application/*":
			return ""
		}
	}
	return ""
}

func (h *handlers) execStream(w http.ResponseWriter, r *http.Request, format string) {
	id := r.PathValue("id")
	var body ExecRequest
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, maxBodyBytes))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&body); err != nil {
		p := newProblem(http.StatusBadRequest, CodeMalformedJSON, "the body is not an exec request: "+err.Error())
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			p = newProblem(http.StatusRequestEntityTooLarge, CodeBodyTooLarge, fmt.Sprintf("the body is over %d bytes", maxBodyBytes))
		} else if strings.Contains(err.Error(), "unknown field") {
			p = newProblem(http.StatusUnprocessableEntity, CodeValidationFailed, err.Error())
		}
		writeProblem(w, r, p)
		return
	}
	if dec.More() {
		writeProblem(w, r, newProblem(http.StatusBadRequest, CodeMalformedJSON, "the body holds more than one JSON value"))
		return
	}
	if body.Shell != "" && body.Shell != string(sandbox.ShellLogin) && body.Shell != string(sandbox.ShellRaw) {
		p := newProblem(http.StatusUnprocessableEntity, CodeValidationFailed, fmt.Sprintf("shell must be login or raw, got %q", body.Shell))
		p.Field = "shell"
		writeProblem(w, r, p)
		return
	}
	if p := body.validate(); p != nil {
		writeProblem(w, r, p)
		return
	}
	req := body.Request()
	// What can be refused is refused with a status before the stream
	// starts; afterwards only an error event can say it.
	m, ok := h.runningFor(w, r, id, req)
	if !ok {
		return
	}

	s := &eventStream{w: w, rc: http.NewResponseController(w), format: format}
	// The header goes out with the first event, or after a moment if the
	// command is quiet, so a command that cannot start (a missing cwd)
	// still gets its status code.
	headerTimer := time.AfterFunc(500*time.Millisecond, func() { s.send("", nil) })
	if format == mediaSSE {
		defer s.keepAlive(h)()
	}
	stdout := &utf8Events{s: s, typ: "stdout"}
	stderr := &utf8Events{s: s, typ: "stderr"}
	res, err := m.Stream(r.Context(), id, req, stdout, stderr)
	headerTimer.Stop()
	stdout.flush()
	stderr.flush()
	if err != nil {
		p := ProblemFrom(r.Context(), err)
		if !s.started() {
			writeProblem(w, r, p)
			return
		}
		p.Instance = r.URL.Path
		s.send("error", p)
		return
	}
	s.send("exit", ExecExitEvent{ExitCode: res.ExitCode, DurationMS: res.Duration.Milliseconds(), TimedOut: res.TimedOut})
}

// runningFor answers a refusal of req, an unknown sandbox or one that is
// not running, before a stream or an upgrade begins; ok is false when it
// did.
func (h *handlers) runningFor(w http.ResponseWriter, r *http.Request, id string, req sandbox.ExecRequest) (*sandbox.Manager, bool) {
	m, err := h.manager(id)
	if err == nil {
		err = sandbox.ValidateExec(req)
	}
	if err != nil {
		writeProblem(w, r, ProblemFrom(r.Context(), err))
		return nil, false
	}
	info, err := m.Get(r.Context(), id)
	if err != nil {
		writeProblem(w, r, ProblemFrom(r.Context(), err))
		return nil, false
	}
	if info.Status != sandbox.StatusRunning {
		writeProblem(w, r, newProblem(http.StatusConflict, CodeSandboxNotRunning, fmt.Sprintf("sandbox %s is %s, not running", id, info.Status)))
		return nil, false
	}
	return m, true
}

// eventStream writes events as SSE or NDJSON, each flushed at once.
type eventStream struct {
	mu     sync.Mutex
	w      http.ResponseWriter
	rc     *http.ResponseController
	format string
	began  bool
	failed bool
}

func (s *eventStream) started() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.began
}

func (s *eventStream) begin() {
	if s.began {
		return
	}
	s.began = true
	h := s.w.Header()
	h.Set("Content-Type", s.format)
	h.Set("Cache-Control", "no-cache")
	h.Set("X-Accel-Buffering", "no")
	s.w.WriteHeader(http.StatusOK)
}

// send writes one event; an empty typ only starts the stream.
func (s *eventStream) send(typ string, data any) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.failed {
		return errClientGone
	}
	s.begin()
	if typ != "" {
		b, err := json.Marshal(data)
		if err != nil {
			return err
		}
		if s.format == mediaSSE {
			fmt.Fprintf(s.w, "event: %s\ndata: %s\n\n", typ, b)
		} else {
			// The type goes first in the line, then the event's fields.
			if len(b) > 2 {
				b = append([]byte(fmt.Sprintf(`{"type":%q,`, typ)), b[1:]...)
			} else {
				b = []byte(fmt.Sprintf(`{"type":%q}`, typ))
			}
			s.w.Write(append(b, '\n'))
		}
	}
	if err := s.rc.Flush(); err != nil {
		s.failed = true
		return errClientGone
	}
	return nil
}

// keepAlive sends a comment every keepalive interval until the returned
// function is called or the server shuts down.
func (s *eventStream) keepAlive(h *handlers) (stop func()) {
	done := make(chan struct{})
	go func() {
		t := time.NewTicker(h.keepalive)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-h.stop:
				return
			case <-t.C:
				s.comment("keepalive")
			}
		}
	}()
	return func() { close(done) }
}

func (s *eventStream) comment(text string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.began || s.failed {
		return
	}
	fmt.Fprintf(s.w, ": %s\n\n", text)
	if s.rc.Flush() != nil {
		s.failed = true
	}
}

var errClientGone = errors.New("the client went away")

// utf8Events turns one output stream into events, holding back the start
// of a character cut by a chunk boundary so text stays text.
type utf8Events struct {
	s    *eventStream
	typ  string
	hold []byte
}

func (u *utf8Events) Write(p []byte) (int, error) {
	b := append(u.hold, p...)
	cut := len(b)
	// At most the last 3 bytes can be an unfinished character.
	for i := len(b) - 1; i >= 0 && i >= len(b)-3; i-- {
		if utf8.RuneStart(b[i]) {
			if !utf8.FullRune(b[i:]) {
				cut = i
			}
			break
		}
	}
	u.hold = bytes.Clone(b[cut:])
	if cut > 0 {
		if err := u.emit(b[:cut]); err != nil {
			return 0, err
		}
	}
	return len(p), nil
}

func (u *utf8Events) flush() {
	if len(u.hold) > 0 {
		u.emit(u.hold)
		u.hold = nil
	}
}

func (u *utf8Events) emit(b []byte) error {
	ev := ExecOutputEvent{}
	if utf8.Valid(b) {
		ev.Text = string(b)
	} else {
		ev.Base64 = base64.StdEncoding.EncodeToString(b)
	}
	return u.s.send(u.typ, ev)
}

// documentExecStream adds the streamed answers to exec's 200 response.
func documentExecStream(hapi huma.API) {
	reg := hapi.OpenAPI().Components.Schemas
	out := reg.Schema(reflect.TypeOf(ExecOutputEvent{}), true, "")
	exit := reg.Schema(reflect.TypeOf(ExecExitEvent{}), true, "")
	prob := reg.Schema(reflect.TypeOf(Problem{}), true, "")
	op := hapi.OpenAPI().Paths["/sandboxes/{id}/exec"].Post
	resp := op.Responses["200"]
	resp.Content[mediaSSE] = &huma.MediaType{Schema: &huma.Schema{
		Description: "With Accept: text/event-stream, Server-Sent Events as the command runs: `stdout` and `stderr` events (data: {text} or {base64}) as the guest writes, then one `exit` event, or an `error` event (a problem) if the sandbox failed mid-command. A comment every 15 s keeps an idle stream open. Closing the stream kills the command.",
		OneOf:       []*huma.Schema{out, exit, prob},
	}}
	resp.Content[mediaNDJSON] = &huma.MediaType{Schema: &huma.Schema{
		Description: "With Accept: application/x-ndjson, the same events as JSON lines, each with its type in a type field.",
		OneOf:       []*huma.Schema{out, exit, prob},
	}}
	op.Description += " With Accept: text/event-stream or application/x-ndjson the output is streamed as it is written instead (see the 200 response); a timeout then ends the stream with an exit event whose timed_out is true."
}

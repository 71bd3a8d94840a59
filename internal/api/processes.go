package api

import (
	"context"
	"fmt"
	"net/http"
	"reflect"
	"strconv"
	"strings"
	"time"

	"github.com/danielgtaylor/huma/v2"

	"github.com/smolvm/smolvm/internal/sandbox"
)

// ProcessRequest is the body of POST /sandboxes/{id}/processes.
type ProcessRequest struct {
	_       struct{}          `json:"-" additionalProperties:"false"`
	Command string            `json:"command,omitempty" maxLength:"131072" example:"python3 -m http.server 8080" doc:"Command line to run, through the shell named by shell. Exclusive with argv; one of them is required."`
	Argv    []string          `json:"argv,omitempty" minItems:"1" maxItems:"4096" doc:"Program and arguments, run exactly as given with no shell."`
	Shell   string            `json:"shell,omitempty" enum:"login,raw" default:"login" doc:"login: the guest's login shell; raw: /bin/sh -c with no profile."`
	Cwd     string            `json:"cwd,omitempty" maxLength:"4096" example:"/root" doc:"Absolute working directory in the guest; it must exist."`
	Env     map[string]string `json:"env,omitempty" doc:"Environment variables added for this process."`
	Stdin   *string           `json:"stdin,omitempty" maxLength:"1048576" doc:"Text written to the process's standard input first; the input stays open for POST .../stdin."`
	Tag     string            `json:"tag,omitempty" maxLength:"128" example:"web" doc:"A name for the process, unique among the sandbox's running ones."`
	Timeout int               `json:"timeout,omitempty" minimum:"0" maximum:"3600" default:"0" doc:"Kill the process after this many seconds; 0 (the default) lets it run until it ends, is signalled, or the sandbox stops."`
	PTY     *TerminalSize     `json:"pty,omitempty" doc:"Run the process on a terminal of this size: its output is then one stream (reported as stdout)."`
}

// TerminalSize is a terminal's size in characters.
type TerminalSize struct {
	Cols int `json:"cols" minimum:"1" maximum:"1000" example:"80" doc:"Columns."`
	Rows int `json:"rows" minimum:"1" maximum:"1000" example:"24" doc:"Rows."`
}

// Process is a process started through POST /sandboxes/{id}/processes.
type Process struct {
	PID       int       `json:"pid" example:"412" doc:"The process id in the guest."`
	Tag       string    `json:"tag,omitempty" example:"web" doc:"The tag it was started with."`
	Command   string    `json:"command" example:"python3 -m http.server 8080" doc:"Its command line (an argv joined with spaces)."`
	Argv      []string  `json:"argv,omitempty" doc:"Its argv, when started with one."`
	Running   bool      `json:"running" example:"true" doc:"Whether it still runs."`
	ExitCode  *int      `json:"exit_code,omitempty" example:"0" doc:"Once it ended: its exit status, or 128 plus the signal that killed it."`
	Signal    int       `json:"signal,omitempty" example:"9" doc:"The signal that killed it, if one did."`
	TimedOut  bool      `json:"timed_out,omitempty" doc:"Whether its timeout killed it."`
	StartedAt time.Time `json:"started_at" example:"2026-06-24T10:00:00Z" doc:"When it started (RFC 3339)."`
}

// ProcessList is the body of GET /sandboxes/{id}/processes.
type ProcessList struct {
	Processes []Process `json:"processes" nullable:"false" doc:"The processes the guest still knows, oldest first: running ones, and the last ones that ended."`
}

// ProcessOutputResult is the JSON body of GET .../processes/{pid}/output.
type ProcessOutputResult struct {
	Process      Process `json:"process" doc:"The process's state."`
	Stdout       string  `json:"stdout" doc:"What it wrote to standard output (or its terminal) so far, as far as kept (invalid UTF-8 is replaced with U+FFFD)."`
	Stderr       string  `json:"stderr" doc:"What it wrote to standard error so far, as far as kept."`
	DroppedBytes int64   `json:"dropped_bytes" minimum:"0" doc:"Bytes written before the oldest still kept: the guest keeps the last MiB of each process's output."`
}

// StdinRequest is the body of POST .../processes/{pid}/stdin.
type StdinRequest struct {
	_    struct{} `json:"-" additionalProperties:"false"`
	Data string   `json:"data,omitempty" maxLength:"1048576" example:"print(1)\n" doc:"Text to write to the process's standard input (or terminal)."`
	EOF  bool     `json:"eof,omitempty" doc:"Close the input after data, so the process reads end of file."`
}

// SignalRequest is the body of POST .../processes/{pid}/signal.
type SignalRequest struct {
	_      struct{} `json:"-" additionalProperties:"false"`
	Signal string   `json:"signal" minLength:"1" maxLength:"16" example:"TERM" doc:"A signal name (TERM, KILL, INT, HUP, QUIT, USR1, USR2, STOP, CONT, ...; SIG prefix optional) or number, sent to the process and everything it started."`
}

type processInput struct {
	ID   string `path:"id" example:"vm-a1b2c3d4" doc:"Sandbox id."`
	Body ProcessRequest
}

type pidInput struct {
	ID  string `path:"id" example:"vm-a1b2c3d4" doc:"Sandbox id."`
	PID int    `path:"pid" minimum:"1" example:"412" doc:"Process id in the guest."`
}

type stdinInput struct {
	ID   string `path:"id" example:"vm-a1b2c3d4" doc:"Sandbox id."`
	PID  int    `path:"pid" minimum:"1" example:"412" doc:"Process id in the guest."`
	Body StdinRequest
}

type signalInput struct {
	ID   string `path:"id" example:"vm-a1b2c3d4" doc:"Sandbox id."`
	PID  int    `path:"pid" minimum:"1" example:"412" doc:"Process id in the guest."`
	Body SignalRequest
}

type processOutput struct {
	Status   int
	Location string `header:"Location" doc:"The new process's URL."`
	Body     Process
}
type processGetOutput struct{ Body Process }
type processListOutput struct{ Body ProcessList }
type processOutputOutput struct{ Body ProcessOutputResult }

func processFrom(p sandbox.ProcessInfo) Process {
	return Process{PID: p.PID, Tag: p.Tag, Command: p.Command, Argv: p.Argv, Running: p.Running,
		ExitCode: p.ExitCode, Signal: p.Signal, TimedOut: p.TimedOut, StartedAt: p.Started}
}

func registerProcesses(hapi huma.API, h *handlers, common, withBody []int) {
	huma.Register(hapi, huma.Operation{
		OperationID:   "startProcess",
		Method:        http.MethodPost,
		Path:          "/sandboxes/{id}/processes",
		Summary:       "Start a background process",
		Description:   "Starts a command that runs on after the answer (a dev server, a watcher) and answers 201 with its pid at once. It outlives the request and a server restart, and ends on its own, by a signal or with the sandbox. Its output is kept (the last MiB) for GET .../output.",
		Tags:          []string{"processes"},
		DefaultStatus: http.StatusCreated,
		Errors:        append(append([]int{http.StatusNotFound, http.StatusConflict}, withBody...), common...),
	}, h.startProcess)
	huma.Register(hapi, huma.Operation{
		OperationID: "listProcesses",
		Method:      http.MethodGet,
		Path:        "/sandboxes/{id}/processes",
		Summary:     "List processes",
		Description: "Lists the processes started through the API that the guest still knows: those running (commands of exec included) and the last 64 that ended.",
		Tags:        []string{"processes"},
		Errors:      append([]int{http.StatusNotFound, http.StatusConflict}, common...),
	}, h.listProcesses)
	huma.Register(hapi, huma.Operation{
		OperationID: "getProcess",
		Method:      http.MethodGet,
		Path:        "/sandboxes/{id}/processes/{pid}",
		Summary:     "Get a process",
		Tags:        []string{"processes"},
		Errors:      append([]int{http.StatusNotFound, http.StatusConflict, http.StatusUnprocessableEntity}, common...),
	}, h.getProcess)
	huma.Register(hapi, huma.Operation{
		OperationID: "getProcessOutput",
		Method:      http.MethodGet,
		Path:        "/sandboxes/{id}/processes/{pid}/output",
		Summary:     "Read or follow a process's output",
		Description: "Answers what the process wrote so far (the last MiB; dropped_bytes counts what came before). With Accept: text/event-stream it replays that and then follows the output as it comes: a `dropped` event ({bytes}) first when output was no longer kept, `stdout` and `stderr` events ({text} or {base64}), and an `exit` event (the process) when it ends. Reconnecting replays again.",
		Tags:        []string{"processes"},
		Errors:      append([]int{http.StatusNotFound, http.StatusConflict, http.StatusUnprocessableEntity}, common...),
	}, h.processOutput)
	huma.Register(hapi, huma.Operation{
		OperationID:   "writeProcessStdin",
		Method:        http.MethodPost,
		Path:          "/sandboxes/{id}/processes/{pid}/stdin",
		Summary:       "Write to a process's input",
		Description:   "Writes data to the process's standard input (or terminal), and closes the input when eof is set. A process that ended or whose input is closed is 409 process_not_running.",
		Tags:          []string{"processes"},
		DefaultStatus: http.StatusNoContent,
		Errors:        append(append([]int{http.StatusNotFound, http.StatusConflict}, withBody...), common...),
	}, h.processStdin)
	huma.Register(hapi, huma.Operation{
		OperationID:   "signalProcess",
		Method:        http.MethodPost,
		Path:          "/sandboxes/{id}/processes/{pid}/signal",
		Summary:       "Signal a process",
		Description:   "Sends a signal to the process and everything it started (its process group). A process that ended is 409 process_not_running.",
		Tags:          []string{"processes"},
		DefaultStatus: http.StatusNoContent,
		Errors:        append(append([]int{http.StatusNotFound, http.StatusConflict}, withBody...), common...),
	}, h.signalProcess)
	documentProcessOutputStream(hapi)
}

func (h *handlers) startProcess(ctx context.Context, in *processInput) (*processOutput, error) {
	b := in.Body
	ex := ExecRequest{Command: b.Command, Argv: b.Argv, Shell: b.Shell, Cwd: b.Cwd, Env: b.Env, Stdin: b.Stdin}
	if p := ex.validate(); p != nil {
		return nil, p
	}
	m, err := h.manager(in.ID)
	if err != nil {
		return nil, err
	}
	req := sandbox.ProcessRequest{ExecRequest: ex.Request(), Tag: b.Tag}
	req.Timeout = time.Duration(b.Timeout) * time.Second
	if b.PTY != nil {
		req.PTY = &sandbox.TerminalSize{Cols: b.PTY.Cols, Rows: b.PTY.Rows}
	}
	p, err := m.StartProcess(ctx, in.ID, req)
	if err != nil {
		return nil, ProblemFrom(ctx, err)
	}
	return &processOutput{Status: http.StatusCreated, Location: fmt.Sprintf("/sandboxes/%s/processes/%d", in.ID, p.PID), Body: processFrom(p)}, nil
}

func (h *handlers) listProcesses(ctx context.Context, in *sandboxID) (*processListOutput, error) {
	m, err := h.manager(in.ID)
	if err != nil {
		return nil, err
	}
	ps, err := m.Processes(ctx, in.ID)
	if err != nil {
		return nil, ProblemFrom(ctx, err)
	}
	out := ProcessList{Processes: make([]Process, 0, len(ps))}
	for _, p := range ps {
		out.Processes = append(out.Processes, processFrom(p))
	}
	return &processListOutput{Body: out}, nil
}

func (h *handlers) getProcess(ctx context.Context, in *pidInput) (*processGetOutput, error) {
	m, err := h.manager(in.ID)
	if err != nil {
		return nil, err
	}
	p, err := m.Process(ctx, in.ID, in.PID)
	if err != nil {
		return nil, ProblemFrom(ctx, err)
	}
	return &processGetOutput{Body: processFrom(p)}, nil
}

func (h *handlers) processOutput(ctx context.Context, in *pidInput) (*processOutputOutput, error) {
	m, err := h.manager(in.ID)
	if err != nil {
		return nil, err
	}
	out, err := m.ProcessOutput(ctx, in.ID, in.PID)
	if err != nil {
		return nil, ProblemFrom(ctx, err)
	}
	var stdout, stderr strings.Builder
	for _, c := range out.Chunks {
		if c.Stream == "stderr" {
			stderr.Write(c.Data)
		} else {
			stdout.Write(c.Data)
		}
	}
	return &processOutputOutput{Body: ProcessOutputResult{Process: processFrom(out.Info),
		Stdout: strings.ToValidUTF8(stdout.String(), "\uFFFD"), Stderr: strings.ToValidUTF8(stderr.String(), "\uFFFD"),
		DroppedBytes: out.Dropped}}, nil
}

func (h *handlers) processStdin(ctx context.Context, in *stdinInput) (*struct{}, error) {
	m, err := h.manager(in.ID)
	if err != nil {
		return nil, err
	}
	if err := m.SendInput(ctx, in.ID, in.PID, []byte(in.Body.Data), in.Body.EOF); err != nil {
		return nil, ProblemFrom(ctx, err)
	}
	return nil, nil
}

func (h *handlers) signalProcess(ctx context.Context, in *signalInput) (*struct{}, error) {
	m, err := h.manager(in.ID)
	if err != nil {
		return nil, err
	}
	sig, err := sandbox.ParseSignal(in.Body.Signal)
	if err != nil {
		return nil, ProblemFrom(ctx, err)
	}
	if err := m.Signal(ctx, in.ID, in.PID, sig); err != nil {
		return nil, ProblemFrom(ctx, err)
	}
	return nil, nil
}

// DroppedEvent is the data of a process output stream's dropped event.
type DroppedEvent struct {
	Bytes int64 `json:"bytes" minimum:"1" doc:"Bytes written before the oldest the guest still kept, so not replayed."`
}

// followProcess serves GET .../processes/{pid}/output as an event stream.
func (h *handlers) followProcess(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	pid, err := strconv.Atoi(r.PathValue("pid"))
	if err != nil || pid < 1 {
		p := newProblem(http.StatusUnprocessableEntity, CodeValidationFailed, fmt.Sprintf("pid %q is not a process id", r.PathValue("pid")))
		p.Field = "pid"
		writeProblem(w, r, p)
		return
	}
	m, err := h.manager(id)
	if err != nil {
		writeProblem(w, r, ProblemFrom(r.Context(), err))
		return
	}
	// Refusals (no such sandbox or process) get their status first.
	if _, err := m.Process(r.Context(), id, pid); err != nil {
		writeProblem(w, r, ProblemFrom(r.Context(), err))
		return
	}
	s := &eventStream{w: w, rc: http.NewResponseController(w), format: mediaSSE}
	s.send("", nil)
	defer s.keepAlive(h)()
	outs := map[string]*utf8Events{"stdout": {s: s, typ: "stdout"}, "stderr": {s: s, typ: "stderr"}}
	outs["pty"] = outs["stdout"]
	info, err := m.FollowProcess(r.Context(), id, pid, true,
		func(n int64) { s.send("dropped", DroppedEvent{Bytes: n}) },
		func(c sandbox.OutputChunk) error {
			_, err := outs[c.Stream].Write(c.Data)
			return err
		})
	outs["stdout"].flush()
	outs["stderr"].flush()
	if err != nil {
		if r.Context().Err() == nil {
			p := ProblemFrom(r.Context(), err)
			p.Instance = r.URL.Path
			s.send("error", p)
		}
		return
	}
	s.send("exit", processFrom(info))
}

func documentProcessOutputStream(hapi huma.API) {
	reg := hapi.OpenAPI().Components.Schemas
	out := reg.Schema(reflect.TypeOf(ExecOutputEvent{}), true, "")
	proc := reg.Schema(reflect.TypeOf(Process{}), true, "")
	dropped := reg.Schema(reflect.TypeOf(DroppedEvent{}), true, "")
	prob := reg.Schema(reflect.TypeOf(Problem{}), true, "")
	op := hapi.OpenAPI().Paths["/sandboxes/{id}/processes/{pid}/output"].Get
	op.Responses["200"].Content[mediaSSE] = &huma.MediaType{Schema: &huma.Schema{
		Description: "With Accept: text/event-stream: `dropped` ({bytes}) when output was no longer kept, `stdout` and `stderr` ({text} or {base64}) replaying and then following the output, `exit` (the process) when it ends, or `error` (a problem). A comment every 15 s keeps an idle stream open.",
		OneOf:       []*huma.Schema{dropped, out, proc, prob},
	}}
}

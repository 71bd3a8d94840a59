package sandbox

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/smolvm/smolvm/internal/agent/agentpb"
	"github.com/smolvm/smolvm/internal/guest"
	"github.com/smolvm/smolvm/internal/store"
)

// ProcessRequest starts a process that runs on after the call returns.
type ProcessRequest struct {
	// Command, Argv, Shell, Cwd, Env and Stdin are as for ExecRequest.
	// Timeout 0 means the process runs until it ends or is signalled.
	ExecRequest
	// Tag names the process, unique among the sandbox's running ones.
	Tag string
	// PTY runs it on a terminal of this size; its output is then one
	// stream.
	PTY *TerminalSize
}

// LoginShell is the raw command a terminal runs when given none: the
// user's own shell, as a login shell.
const LoginShell = `exec "${SHELL:-/bin/sh}" -l`

// TerminalSize is a terminal's width and height in characters.
type TerminalSize struct{ Cols, Rows int }

// ProcessInfo describes a process started through StartProcess.
type ProcessInfo struct {
	PID     int
	Tag     string
	Command string   // the command line, or the argv joined with spaces
	Argv    []string // when started with argv
	Running bool
	// ExitCode is set once it ended: its status, or 128 plus the signal
	// that killed it.
	ExitCode *int
	Signal   int
	TimedOut bool
	Started  time.Time
}

// ProcessOutput is what a process wrote so far.
type ProcessOutput struct {
	Info ProcessInfo
	// Chunks in the order written; Stream says which.
	Chunks []OutputChunk
	// Dropped counts the bytes written before the oldest still kept (the
	// agent keeps the last MiB of each process).
	Dropped int64
}

// OutputChunk is one piece of a process's output.
type OutputChunk struct {
	Stream string // "stdout", "stderr" or "pty"
	Data   []byte
}

// Signals by name, as kill(1) takes them.
var signals = map[string]int{
	"HUP": 1, "INT": 2, "QUIT": 3, "KILL": 9, "USR1": 10, "USR2": 12,
	"PIPE": 13, "ALRM": 14, "TERM": 15, "CONT": 18, "STOP": 19, "TSTP": 20, "WINCH": 28,
}

// ParseSignal accepts a name with or without SIG ("TERM", "SIGKILL") or a
// number from 1 to 64.
func ParseSignal(s string) (int, error) {
	name := strings.TrimPrefix(strings.ToUpper(strings.TrimSpace(s)), "SIG")
	if n, ok := signals[name]; ok {
		return n, nil
	}
	if n, err := strconv.Atoi(s); err == nil && n >= 1 && n <= 64 {
		return n, nil
	}
	return 0, invalid("invalid_signal", "signal", "signal %q is not a signal name (TERM, KILL, INT, HUP, ...) or a number from 1 to 64", s)
}

// runningClient is the agent session of a running sandbox.
func (m *Manager) runningClient(ctx context.Context, id string) (store.Record, *guest.Client, error) {
	rec, err := m.get(ctx, id)
	if err != nil {
		return rec, nil, err
	}
	if rec.Status != StatusRunning {
		return rec, nil, &Error{Kind: KindConflict, Code: "sandbox_not_running",
			Message: fmt.Sprintf("sandbox %s is %s, not running", id, rec.Status)}
	}
	c, err := m.l.client(ctx, rec)
	return rec, c, err
}

// StartProcess starts a command in the background and returns once it
// runs. It outlives the call (and this process): it ends on its own, by a
// signal, or with the sandbox.
func (m *Manager) StartProcess(ctx context.Context, id string, req ProcessRequest) (ProcessInfo, error) {
	timeout := req.Timeout
	req.Timeout = time.Second // validated separately: 0 is allowed here
	sreq, err := execRequest(req.ExecRequest)
	if err != nil {
		return ProcessInfo{}, err
	}
	if timeout < 0 || timeout > MaxTimeoutSec*time.Second {
		return ProcessInfo{}, invalid("invalid_timeout", "timeout", "timeout must be between 0 (none) and %d seconds", MaxTimeoutSec)
	}
	sreq.TimeoutMs = timeout.Milliseconds()
	if len(req.Tag) > 128 {
		return ProcessInfo{}, invalid("invalid_tag", "tag", "tag must be at most 128 bytes")
	}
	if req.PTY != nil {
		if req.PTY.Cols < 1 || req.PTY.Cols > 1000 || req.PTY.Rows < 1 || req.PTY.Rows > 1000 {
			return ProcessInfo{}, invalid("invalid_pty", "pty", "terminal size %dx%d is outside 1 to 1000 columns and rows", req.PTY.Cols, req.PTY.Rows)
		}
		sreq.Pty = &agentpb.TerminalSize{Cols: uint32(req.PTY.Cols), Rows: uint32(req.PTY.Rows)}
	}
	sreq.Tag, sreq.Detach, sreq.Stdin = req.Tag, true, true
	rec, c, err := m.runningClient(ctx, id)
	if err != nil {
		return ProcessInfo{}, err
	}
	applyImageConfig(sreq.Process, m.imageConfig(rec))
	p, err := c.Start(ctx, sreq)
	if err != nil {
		return ProcessInfo{}, m.processErr(ctx, rec, sreq.Process, err)
	}
	defer p.Close() // detached: it runs on
	if p.PID == 0 {
		// It could not start: the first event says why.
		ev, _ := p.Next()
		msg := strings.TrimSpace(strings.TrimPrefix(string(ev.Stderr), "smolvm: "))
		return ProcessInfo{}, &Error{Kind: KindInvalid, Code: "invalid_command", Field: "command",
			Message: fmt.Sprintf("the command could not start: %s", msg)}
	}
	return m.Process(ctx, id, p.PID)
}

// processErr maps an agent's refusal of a process call.
func (m *Manager) processErr(ctx context.Context, rec store.Record, cfg *agentpb.ProcessConfig, err error) error {
	switch {
	case errors.Is(err, guest.ErrSessionClosed):
		if lost := m.sessionLost(ctx, rec, err, "the request"); lost != nil {
			return lost
		}
	case cfg != nil && cfg.Cwd != "" && (guest.IsCode(err, guest.CodeNotFound) || guest.IsCode(err, guest.CodeWrongState)):
		return &Error{Kind: KindInvalid, Code: "invalid_cwd", Field: "cwd", Message: fmt.Sprintf("cwd %s is not a directory in the sandbox", cfg.Cwd), Err: err}
	case guest.IsCode(err, guest.CodeExists):
		return &Error{Kind: KindConflict, Code: "tag_in_use", Field: "tag", Message: err.Error(), Err: err}
	case guest.IsCode(err, guest.CodeInvalid):
		return &Error{Kind: KindInvalid, Code: "invalid_command", Field: "command", Message: err.Error(), Err: err}
	}
	return fmt.Errorf("sandbox %s: %w", rec.ID, err)
}

func processInfo(p *agentpb.ProcessInfo) ProcessInfo {
	info := ProcessInfo{
		PID: int(p.Pid), Tag: p.Tag, Running: p.Running,
		Started: time.UnixMilli(p.StartedUnixMs).UTC(),
	}
	if cfg := p.Config; cfg != nil {
		if len(cfg.Argv) > 0 {
			info.Argv = cfg.Argv
			info.Command = strings.Join(cfg.Argv, " ")
		} else {
			info.Command = cfg.Script
		}
	}
	if e := p.End; e != nil && !p.Running {
		code := int(e.ExitCode)
		info.ExitCode, info.Signal, info.TimedOut = &code, int(e.Signal), e.TimedOut
	}
	return info
}

// Processes lists the processes started through StartProcess (and
// commands still running through Exec) that the guest still knows.
func (m *Manager) Processes(ctx context.Context, id string) ([]ProcessInfo, error) {
	rec, c, err := m.runningClient(ctx, id)
	if err != nil {
		return nil, err
	}
	ps, err := c.Processes(ctx)
	if err != nil {
		return nil, m.processErr(ctx, rec, nil, err)
	}
	out := make([]ProcessInfo, 0, len(ps))
	for _, p := range ps {
		out = append(out, processInfo(p))
	}
	return out, nil
}

func processNotFound(id string, pid int) error {
	return &Error{Kind: KindNotFound, Code: "process_not_found", Field: "pid",
		Message: fmt.Sprintf("sandbox %s has no process %d started through smolvm", id, pid)}
}

// Process describes one process.
func (m *Manager) Process(ctx context.Context, id string, pid int) (ProcessInfo, error) {
	out, err := m.ProcessOutput(ctx, id, pid)
	if err != nil {
		return ProcessInfo{}, err
	}
	return out.Info, nil
}

// ProcessOutput answers what a process wrote so far and its state.
func (m *Manager) ProcessOutput(ctx context.Context, id string, pid int) (ProcessOutput, error) {
	rec, c, err := m.runningClient(ctx, id)
	if err != nil {
		return ProcessOutput{}, err
	}
	resp, err := c.Output(ctx, guest.ByPID(pid))
	if guest.IsCode(err, guest.CodeNotFound) {
		return ProcessOutput{}, processNotFound(id, pid)
	}
	if err != nil {
		return ProcessOutput{}, m.processErr(ctx, rec, nil, err)
	}
	out := ProcessOutput{Info: processInfo(resp.Info), Dropped: resp.DroppedBytes}
	for _, d := range resp.Data {
		out.Chunks = append(out.Chunks, chunkOf(d))
	}
	return out, nil
}

func chunkOf(d *agentpb.DataEvent) OutputChunk {
	switch o := d.GetOutput().(type) {
	case *agentpb.DataEvent_Stdout:
		return OutputChunk{Stream: "stdout", Data: o.Stdout}
	case *agentpb.DataEvent_Stderr:
		return OutputChunk{Stream: "stderr", Data: o.Stderr}
	case *agentpb.DataEvent_Pty:
		return OutputChunk{Stream: "pty", Data: o.Pty}
	}
	return OutputChunk{}
}

// FollowProcess calls onChunk with what the process wrote so far (when
// replay is set) and then with its output as it comes, until it ends
// (returning how) or ctx ends. dropped is called first with how many bytes
// were no longer kept for the replay.
func (m *Manager) FollowProcess(ctx context.Context, id string, pid int, replay bool, dropped func(int64), onChunk func(OutputChunk) error) (ProcessInfo, error) {
	rec, c, err := m.runningClient(ctx, id)
	if err != nil {
		return ProcessInfo{}, err
	}
	p, err := c.Connect(ctx, guest.ByPID(pid), replay)
	if guest.IsCode(err, guest.CodeNotFound) {
		return ProcessInfo{}, processNotFound(id, pid)
	}
	if err != nil {
		return ProcessInfo{}, m.processErr(ctx, rec, nil, err)
	}
	defer p.Close()
	if dropped != nil && p.Dropped > 0 {
		dropped(p.Dropped)
	}
	for {
		ev, err := p.Next()
		if err != nil {
			if ctx.Err() != nil {
				return ProcessInfo{}, ctx.Err()
			}
			return ProcessInfo{}, m.processErr(ctx, rec, nil, err)
		}
		var chunk OutputChunk
		switch {
		case ev.Stdout != nil:
			chunk = OutputChunk{Stream: "stdout", Data: ev.Stdout}
		case ev.Stderr != nil:
			chunk = OutputChunk{Stream: "stderr", Data: ev.Stderr}
		case ev.PTY != nil:
			chunk = OutputChunk{Stream: "pty", Data: ev.PTY}
		case ev.End != nil:
			return m.Process(ctx, id, pid)
		}
		if err := onChunk(chunk); err != nil {
			return ProcessInfo{}, err
		}
	}
}

// SendInput writes data to a process's stdin (or terminal), then closes
// its stdin when eof is set.
func (m *Manager) SendInput(ctx context.Context, id string, pid int, data []byte, eof bool) error {
	rec, c, err := m.runningClient(ctx, id)
	if err != nil {
		return err
	}
	if len(data) > 0 {
		err = c.SendInput(ctx, guest.ByPID(pid), data)
	}
	if err == nil && eof {
		err = c.CloseStdin(ctx, guest.ByPID(pid))
	}
	switch {
	case guest.IsCode(err, guest.CodeNotFound):
		return processNotFound(id, pid)
	case guest.IsCode(err, guest.CodeWrongState):
		return &Error{Kind: KindConflict, Code: "process_not_running", Field: "pid",
			Message: fmt.Sprintf("process %d has ended or closed its input", pid), Err: err}
	case err != nil:
		return m.processErr(ctx, rec, nil, err)
	}
	return nil
}

// Signal sends a signal to a process and everything it started.
func (m *Manager) Signal(ctx context.Context, id string, pid, sig int) error {
	if sig < 1 || sig > 64 {
		return invalid("invalid_signal", "signal", "signal %d is not a number from 1 to 64", sig)
	}
	rec, c, err := m.runningClient(ctx, id)
	if err != nil {
		return err
	}
	err = c.Signal(ctx, guest.ByPID(pid), sig)
	switch {
	case guest.IsCode(err, guest.CodeNotFound):
		return processNotFound(id, pid)
	case guest.IsCode(err, guest.CodeWrongState):
		return &Error{Kind: KindConflict, Code: "process_not_running", Field: "pid", Message: fmt.Sprintf("process %d has ended", pid), Err: err}
	case err != nil:
		return m.processErr(ctx, rec, nil, err)
	}
	return nil
}

// ResizeTerminal changes the size of a process's terminal.
func (m *Manager) ResizeTerminal(ctx context.Context, id string, pid int, size TerminalSize) error {
	if size.Cols < 1 || size.Cols > 1000 || size.Rows < 1 || size.Rows > 1000 {
		return invalid("invalid_pty", "pty", "terminal size %dx%d is outside 1 to 1000 columns and rows", size.Cols, size.Rows)
	}
	rec, c, err := m.runningClient(ctx, id)
	if err != nil {
		return err
	}
	err = c.Resize(ctx, guest.ByPID(pid), size.Cols, size.Rows)
	switch {
	case guest.IsCode(err, guest.CodeNotFound):
		return processNotFound(id, pid)
	case guest.IsCode(err, guest.CodeWrongState):
		return &Error{Kind: KindConflict, Code: "no_terminal", Field: "pid", Message: err.Error(), Err: err}
	case err != nil:
		return m.processErr(ctx, rec, nil, err)
	}
	return nil
}

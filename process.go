package smolvm

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"syscall"
	"time"

	"github.com/smolvm/smolvm/internal/sandbox"
)

// ProcessOptions tune a process started with StartProcess.
type ProcessOptions struct {
	Shell Shell    // "" means ShellLogin
	Argv  []string // run exactly with no shell; the command must be empty
	Cwd   string   // absolute path in the guest
	Env   map[string]string
	// Tag names the process among the sandbox's running ones.
	Tag string
	// Timeout kills it after this long; 0 lets it run until it ends.
	Timeout time.Duration
	// Stdout and Stderr receive its output as it is written; nil drops it
	// (the guest still keeps the last MiB for ProcessOutput).
	Stdout, Stderr io.Writer
}

// Process is a command running in a sandbox. It runs on in the guest
// whether or not this handle is kept: it ends on its own, by a signal, or
// with the sandbox.
type Process struct {
	s   *Sandbox
	PID int
	// Stdin writes to the process's standard input; closing it sends end
	// of file.
	Stdin io.WriteCloser

	done chan struct{}
	res  *Result
	err  error
}

// StartProcess starts a command and returns once it runs; its output goes
// to o.Stdout and o.Stderr as it comes until Wait returns.
func (s *Sandbox) StartProcess(ctx context.Context, command string, o ProcessOptions) (*Process, error) {
	req := sandbox.ProcessRequest{
		ExecRequest: sandbox.ExecRequest{Command: command, Argv: o.Argv, Shell: o.Shell, Cwd: o.Cwd, Env: o.Env, Timeout: o.Timeout},
		Tag:         o.Tag,
	}
	info, err := s.m.StartProcess(ctx, s.id, req)
	if err != nil {
		return nil, err
	}
	p := &Process{s: s, PID: info.PID, done: make(chan struct{})}
	p.Stdin = &processStdin{p: p}
	stdout, stderr := orDiscard(o.Stdout), orDiscard(o.Stderr)
	go func() {
		defer close(p.done)
		// The process outlives ctx (it was only for starting it); its
		// output is followed until it ends.
		fctx := context.WithoutCancel(ctx)
		info, err := s.m.FollowProcess(fctx, s.id, p.PID, true, nil, func(c sandbox.OutputChunk) error {
			w := stdout
			if c.Stream == "stderr" {
				w = stderr
			}
			_, err := w.Write(c.Data)
			return err
		})
		if err != nil {
			p.err = err
			return
		}
		p.res = &Result{TimedOut: info.TimedOut, Duration: time.Since(info.Started)}
		if info.ExitCode != nil {
			p.res.ExitCode = *info.ExitCode
		}
	}()
	return p, nil
}

// Wait waits for the process to end and returns how it did (its output
// went to the writers given at start, so the Result's are empty). A
// process killed by a signal reports 128+signal.
func (p *Process) Wait(ctx context.Context) (*Result, error) {
	select {
	case <-p.done:
		return p.res, p.err
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// Signal sends sig to the process and everything it started.
func (p *Process) Signal(ctx context.Context, sig syscall.Signal) error {
	return p.s.m.Signal(ctx, p.s.id, p.PID, int(sig))
}

type processStdin struct {
	p      *Process
	mu     sync.Mutex
	closed bool
}

func (w *processStdin) Write(b []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.closed {
		return 0, errors.New("stdin is closed")
	}
	if err := w.p.s.m.SendInput(context.Background(), w.p.s.id, w.p.PID, b, false); err != nil {
		return 0, fmt.Errorf("write to process %d: %w", w.p.PID, err)
	}
	return len(b), nil
}

func (w *processStdin) Close() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.closed {
		return nil
	}
	w.closed = true
	return w.p.s.m.SendInput(context.Background(), w.p.s.id, w.p.PID, nil, true)
}

package guest

import (
	"context"
	"errors"
	"fmt"
	"io"

	"connectrpc.com/connect"

	"github.com/smolvm/smolvm/internal/agent/agentpb"
)

// Ping asks the agent for facts about the guest; it is also the cheapest
// round trip.
func (c *Client) Ping(ctx context.Context) (*agentpb.GuestInfo, error) {
	resp, err := c.system.Ping(ctx, connect.NewRequest(&agentpb.PingRequest{}))
	if err != nil {
		return nil, c.callErr(ctx, err)
	}
	return resp.Msg.Info, nil
}

// Stats asks the guest for its resource use and process list.
func (c *Client) Stats(ctx context.Context) (*agentpb.StatsResponse, error) {
	resp, err := c.system.Stats(ctx, connect.NewRequest(&agentpb.StatsRequest{}))
	if err != nil {
		return nil, c.callErr(ctx, err)
	}
	return resp.Msg, nil
}

// Shutdown asks the guest to sync its disks and power off.
func (c *Client) Shutdown(ctx context.Context) error {
	_, err := c.system.Shutdown(ctx, connect.NewRequest(&agentpb.ShutdownRequest{}))
	return c.callErr(ctx, err)
}

// Identity gives the guest its own name, machine id, clock, random state
// and disk size.
func (c *Client) Identity(ctx context.Context, id *agentpb.SetIdentityRequest) (*agentpb.GuestInfo, error) {
	resp, err := c.system.SetIdentity(ctx, connect.NewRequest(id))
	if err != nil {
		return nil, c.callErr(ctx, err)
	}
	return resp.Msg.Info, nil
}

// Exit is how a command ended.
type Exit struct {
	ExitCode int
	// Signal is the signal that killed it, if one did.
	Signal   int
	TimedOut bool
	// Error says why the command could not start, when it could not.
	Error string
}

// Exec runs a command to its end, copying its output to stdout and stderr
// (either may be nil) as it comes. Cancelling ctx kills the command.
func (c *Client) Exec(ctx context.Context, req *agentpb.StartRequest, stdout, stderr io.Writer) (Exit, error) {
	req.Detach = false
	p, err := c.Start(ctx, req)
	if err != nil {
		return Exit{}, err
	}
	defer p.Close()
	for {
		ev, err := p.Next()
		if err != nil {
			return Exit{}, err
		}
		switch {
		case ev.Stdout != nil || ev.Stderr != nil || ev.PTY != nil:
			w, b := stdout, ev.Stdout
			switch {
			case ev.Stderr != nil:
				w, b = stderr, ev.Stderr
			case ev.PTY != nil:
				b = ev.PTY
			}
			if w != nil {
				if _, err := w.Write(b); err != nil {
					return Exit{}, fmt.Errorf("write command output: %w", err)
				}
			}
		case ev.End != nil:
			return *ev.End, nil
		}
	}
}

// Process is a started command's event stream.
type Process struct {
	c      *Client
	ctx    context.Context
	cancel context.CancelFunc
	stream *connect.ServerStreamForClient[agentpb.ProcessEvent]
	// PID is the command's pid in the guest; 0 when it could not start.
	PID int
	// Dropped is, for Connect with replay, how many bytes of output came
	// before what the agent still kept.
	Dropped int64
	first   *Event
	ended   bool
}

// Event is one thing that happened to a process: output, or its end.
type Event struct {
	Stdout, Stderr, PTY []byte
	End                 *Exit
}

// Start runs a command and returns once the agent has started it (or
// found it cannot). Its output and end come from Next. Unless req.Detach
// is set, closing the Process or cancelling ctx kills the command.
func (c *Client) Start(ctx context.Context, req *agentpb.StartRequest) (*Process, error) {
	sctx, cancel := context.WithCancel(ctx)
	stream, err := c.process.Start(sctx, connect.NewRequest(req))
	if err != nil {
		cancel()
		return nil, c.callErr(ctx, err)
	}
	return c.follow(ctx, sctx, cancel, stream)
}

// Connect follows a running process (by pid or tag) from now on, after
// what it wrote so far (as much as the agent kept) when replay is set.
func (c *Client) Connect(ctx context.Context, sel *agentpb.ProcessSelector, replay bool) (*Process, error) {
	sctx, cancel := context.WithCancel(ctx)
	stream, err := c.process.Connect(sctx, connect.NewRequest(&agentpb.ConnectRequest{Process: sel, Replay: replay}))
	if err != nil {
		cancel()
		return nil, c.callErr(ctx, err)
	}
	return c.follow(ctx, sctx, cancel, stream)
}

func (c *Client) follow(ctx, sctx context.Context, cancel context.CancelFunc, stream *connect.ServerStreamForClient[agentpb.ProcessEvent]) (*Process, error) {
	p := &Process{c: c, ctx: ctx, cancel: cancel, stream: stream}
	ev, err := p.recv()
	if err != nil {
		p.Close()
		return nil, err
	}
	if ev == nil {
		st := p.stream.Msg().GetStart()
		p.PID, p.Dropped = int(st.GetPid()), st.GetDroppedBytes()
	} else {
		p.first = ev // could not start: the reason, then the end
	}
	return p, nil
}

// recv reads the next message: nil for a start event, else the event.
func (p *Process) recv() (*Event, error) {
	for {
		if !p.stream.Receive() {
			err := p.stream.Err()
			if err == nil {
				err = errors.New("the agent ended a process stream without its end")
			}
			return nil, p.c.callErr(p.ctx, err)
		}
		switch ev := p.stream.Msg().GetEvent().(type) {
		case *agentpb.ProcessEvent_Start:
			return nil, nil
		case *agentpb.ProcessEvent_Data:
			switch out := ev.Data.GetOutput().(type) {
			case *agentpb.DataEvent_Stdout:
				return &Event{Stdout: out.Stdout}, nil
			case *agentpb.DataEvent_Stderr:
				return &Event{Stderr: out.Stderr}, nil
			case *agentpb.DataEvent_Pty:
				return &Event{PTY: out.Pty}, nil
			}
		case *agentpb.ProcessEvent_End:
			e := ev.End
			return &Event{End: &Exit{ExitCode: int(e.ExitCode), Signal: int(e.Signal), TimedOut: e.TimedOut, Error: e.Error}}, nil
		}
		// Keepalives and kinds this host does not know are skipped.
	}
}

// Next returns the process's next event; after its end, io.EOF.
func (p *Process) Next() (Event, error) {
	if p.ended {
		return Event{}, io.EOF
	}
	var ev *Event
	if p.first != nil {
		ev, p.first = p.first, nil
	} else {
		var err error
		for ev == nil && err == nil {
			ev, err = p.recv()
		}
		if err != nil {
			return Event{}, err
		}
	}
	if ev.End != nil {
		p.ended = true
	}
	return *ev, nil
}

// Close stops following the process (killing it unless it was started
// detached and still running).
func (p *Process) Close() error {
	p.cancel()
	return p.stream.Close()
}

func selector(pid int) *agentpb.ProcessSelector {
	return &agentpb.ProcessSelector{Selector: &agentpb.ProcessSelector_Pid{Pid: uint32(pid)}}
}

// SendInput writes data to a process's stdin or terminal.
func (c *Client) SendInput(ctx context.Context, sel *agentpb.ProcessSelector, data []byte) error {
	_, err := c.process.SendInput(ctx, connect.NewRequest(&agentpb.SendInputRequest{Process: sel, Data: data}))
	return c.callErr(ctx, err)
}

// CloseStdin ends a process's input.
func (c *Client) CloseStdin(ctx context.Context, sel *agentpb.ProcessSelector) error {
	_, err := c.process.CloseStdin(ctx, connect.NewRequest(&agentpb.CloseStdinRequest{Process: sel}))
	return c.callErr(ctx, err)
}

// Signal sends a signal to a process's group.
func (c *Client) Signal(ctx context.Context, sel *agentpb.ProcessSelector, sig int) error {
	_, err := c.process.SendSignal(ctx, connect.NewRequest(&agentpb.SendSignalRequest{Process: sel, Signal: int32(sig)}))
	return c.callErr(ctx, err)
}

// Resize changes a process's terminal size.
func (c *Client) Resize(ctx context.Context, sel *agentpb.ProcessSelector, cols, rows int) error {
	_, err := c.process.Resize(ctx, connect.NewRequest(&agentpb.ResizeRequest{Process: sel, Size: &agentpb.TerminalSize{Cols: uint32(cols), Rows: uint32(rows)}}))
	return c.callErr(ctx, err)
}

// Processes lists the processes the agent started that it still knows.
func (c *Client) Processes(ctx context.Context) ([]*agentpb.ProcessInfo, error) {
	resp, err := c.process.List(ctx, connect.NewRequest(&agentpb.ListRequest{}))
	if err != nil {
		return nil, c.callErr(ctx, err)
	}
	return resp.Msg.Processes, nil
}

// ByPID names a process by its pid; ByTag by its tag.
func ByPID(pid int) *agentpb.ProcessSelector { return selector(pid) }
func ByTag(tag string) *agentpb.ProcessSelector {
	return &agentpb.ProcessSelector{Selector: &agentpb.ProcessSelector_Tag{Tag: tag}}
}

// Output answers what a process wrote so far (as much as the agent kept),
// how many bytes came before that, and its state.
func (c *Client) Output(ctx context.Context, sel *agentpb.ProcessSelector) (*agentpb.OutputResponse, error) {
	resp, err := c.process.Output(ctx, connect.NewRequest(&agentpb.OutputRequest{Process: sel}))
	if err != nil {
		return nil, c.callErr(ctx, err)
	}
	return resp.Msg, nil
}

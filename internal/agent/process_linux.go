package agent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"connectrpc.com/connect"
	"github.com/creack/pty"
	"golang.org/x/sys/unix"

	"github.com/smolvm/smolvm/internal/agent/agentpb"
)

const defaultPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// drainGrace is how long output is still collected after the command exits:
// a background child that inherited stdout would otherwise hold the command
// open until its timeout.
const drainGrace = 200 * time.Millisecond

// outputKeep bounds the output each process keeps for Connect's replay.
const outputKeep = 1 << 20

// keepEnded is how many ended detached processes List still shows.
const keepEnded = 64

// chunkSize is the most one data event carries.
const chunkSize = 64 << 10

// processTable is every process started through the Process API that is
// still running, and the last detached ones that ended.
type processTable struct {
	s     *Server
	mu    sync.Mutex
	byPID map[int]*proc
	ended []*proc
}

func newProcessTable(s *Server) *processTable {
	return &processTable{s: s, byPID: make(map[int]*proc)}
}

// proc is one started process and whoever follows its output.
type proc struct {
	pid     int
	tag     string
	cfg     *agentpb.ProcessConfig
	started time.Time
	detach  bool
	tty     *os.File // the terminal's controlling side; nil without one

	stdinMu sync.Mutex
	stdin   *os.File // nil once closed (or never open)

	server *Server
	outR   *os.File // stdout, or the terminal
	errR   *os.File // nil with a terminal
	waitc  <-chan unix.WaitStatus
	timer  *time.Timer

	timedOut atomic.Bool
	// spare says how to start a login shell ahead for the next command
	// like this one; nil when this is not a login-shell script.
	spare *spareRecipe

	mu      sync.Mutex
	subs    map[*subscriber]struct{}
	log     []*agentpb.DataEvent
	logSize int
	dropped int64 // output no longer in log
	end     *agentpb.EndEvent
	done    chan struct{}
	// released is closed when the Start call that owns the process
	// returns: its end has been sent, or its caller has gone.
	released chan struct{}
}

type subscriber struct {
	ch   chan *agentpb.DataEvent
	gone chan struct{}
}

func (t *processTable) find(sel *agentpb.ProcessSelector) (*proc, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	switch v := sel.GetSelector().(type) {
	case *agentpb.ProcessSelector_Pid:
		if p := t.byPID[int(v.Pid)]; p != nil {
			return p, nil
		}
		for _, p := range t.ended {
			if p.pid == int(v.Pid) {
				return p, nil
			}
		}
		return nil, connect.NewError(connect.CodeNotFound, fmt.Errorf("no process %d", v.Pid))
	case *agentpb.ProcessSelector_Tag:
		for _, p := range t.byPID {
			if p.tag == v.Tag {
				return p, nil
			}
		}
		for i := len(t.ended) - 1; i >= 0; i-- {
			if t.ended[i].tag == v.Tag {
				return t.ended[i], nil
			}
		}
		return nil, connect.NewError(connect.CodeNotFound, fmt.Errorf("no process tagged %q", v.Tag))
	}
	return nil, connect.NewError(connect.CodeInvalidArgument, errors.New("name a process by pid or tag"))
}

// tagFree reports whether no running process has tag.
func (t *processTable) tagFree(tag string) bool {
	if tag == "" {
		return true
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, p := range t.byPID {
		if p.tag == tag {
			return false
		}
	}
	return true
}

// add registers a started process.
func (t *processTable) add(p *proc) {
	t.mu.Lock()
	t.byPID[p.pid] = p
	t.mu.Unlock()
}

// retire forgets an ended process, keeping detached ones for List.
func (t *processTable) retire(p *proc) {
	t.mu.Lock()
	defer t.mu.Unlock()
	delete(t.byPID, p.pid)
	if p.detach {
		t.ended = append(t.ended, p)
		if len(t.ended) > keepEnded {
			t.ended = t.ended[len(t.ended)-keepEnded:]
		}
	}
}

func (t *processTable) list() []*proc {
	t.mu.Lock()
	defer t.mu.Unlock()
	ps := append([]*proc(nil), t.ended...)
	for _, p := range t.byPID {
		ps = append(ps, p)
	}
	sort.Slice(ps, func(i, j int) bool { return ps[i].started.Before(ps[j].started) })
	return ps
}

// running counts the processes that are running and were not detached.
func (t *processTable) running() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	n := 0
	for _, p := range t.byPID {
		if !p.detach {
			n++
		}
	}
	return n
}

func (t *processTable) killAll() {
	t.mu.Lock()
	defer t.mu.Unlock()
	for pid := range t.byPID {
		unix.Kill(-pid, unix.SIGKILL)
	}
}

// publish hands a chunk of output to every follower, waiting for each
// (so a slow reader slows the process instead of losing output), and keeps
// it for replay.
func (p *proc) publish(ev *agentpb.DataEvent) {
	p.mu.Lock()
	p.log = append(p.log, ev)
	p.logSize += dataLen(ev)
	for p.logSize > outputKeep && len(p.log) > 1 {
		n := dataLen(p.log[0])
		p.logSize -= n
		p.dropped += int64(n)
		p.log = p.log[1:]
	}
	subs := make([]*subscriber, 0, len(p.subs))
	for s := range p.subs {
		subs = append(subs, s)
	}
	p.mu.Unlock()
	for _, s := range subs {
		select {
		case s.ch <- ev:
		case <-s.gone:
		}
	}
}

func dataLen(ev *agentpb.DataEvent) int {
	return len(ev.GetStdout()) + len(ev.GetStderr()) + len(ev.GetPty())
}

// subscribe follows the process from now on, after what it wrote so far
// when replay is set.
func (p *proc) subscribe(replay bool) (*subscriber, []*agentpb.DataEvent, int64) {
	s := &subscriber{ch: make(chan *agentpb.DataEvent, 64), gone: make(chan struct{})}
	p.mu.Lock()
	defer p.mu.Unlock()
	var past []*agentpb.DataEvent
	var dropped int64
	if replay {
		past = append(past, p.log...)
		dropped = p.dropped
	}
	if p.subs == nil {
		p.subs = make(map[*subscriber]struct{})
	}
	p.subs[s] = struct{}{}
	return s, past, dropped
}

func (p *proc) unsubscribe(s *subscriber) {
	p.mu.Lock()
	delete(p.subs, s)
	p.mu.Unlock()
	close(s.gone)
}

func (p *proc) finish(end *agentpb.EndEvent) {
	p.mu.Lock()
	p.end = end
	p.mu.Unlock()
	close(p.done)
}

func (p *proc) ended() *agentpb.EndEvent {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.end
}

// follow sends s's events on send until the process ends, then its end.
func (p *proc) follow(ctx context.Context, s *subscriber, past []*agentpb.DataEvent, send func(*agentpb.ProcessEvent) error) error {
	for _, ev := range past {
		if err := send(dataEvent(ev)); err != nil {
			return err
		}
	}
	for {
		select {
		case ev := <-s.ch:
			if err := send(dataEvent(ev)); err != nil {
				return err
			}
		case <-p.done:
			// Every chunk was delivered to s.ch before the end was set.
			for {
				select {
				case ev := <-s.ch:
					if err := send(dataEvent(ev)); err != nil {
						return err
					}
					continue
				default:
				}
				break
			}
			return send(&agentpb.ProcessEvent{Event: &agentpb.ProcessEvent_End{End: p.ended()}})
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

func dataEvent(ev *agentpb.DataEvent) *agentpb.ProcessEvent {
	return &agentpb.ProcessEvent{Event: &agentpb.ProcessEvent_Data{Data: ev}}
}

// processService is the Process API.
type processService struct{ s *Server }

func (v *processService) Start(ctx context.Context, req *connect.Request[agentpb.StartRequest], stream *connect.ServerStream[agentpb.ProcessEvent]) error {
	m := req.Msg
	argv, err := commandArgv(m.GetProcess())
	if err != nil {
		return connect.NewError(connect.CodeInvalidArgument, err)
	}
	if cwd := m.GetProcess().GetCwd(); cwd != "" {
		if !filepath.IsAbs(cwd) {
			return connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("working directory %q is not absolute", cwd))
		}
		st, err := os.Stat(cwd)
		if err != nil {
			return fsError(err)
		}
		if !st.IsDir() {
			return connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("working directory %s is not a directory", cwd))
		}
	}
	if !v.s.procs.tagFree(m.Tag) {
		return connect.NewError(connect.CodeAlreadyExists, fmt.Errorf("a running process is already tagged %q", m.Tag))
	}
	p, fail := v.s.start(m, argv)
	if fail != nil {
		// Failing to start is the command's outcome, as in a shell: the
		// message on stderr and exit code 126 or 127.
		stream.Send(dataEvent(&agentpb.DataEvent{Output: &agentpb.DataEvent_Stderr{Stderr: []byte("smolvm: " + fail.Error + "\n")}}))
		return stream.Send(&agentpb.ProcessEvent{Event: &agentpb.ProcessEvent_End{End: fail}})
	}
	// Subscribed before the process can write: its output pumps start
	// only once the owner follows it.
	sub, _, _ := p.subscribe(false)
	defer p.unsubscribe(sub)
	defer close(p.released)
	go p.pump()
	err = stream.Send(&agentpb.ProcessEvent{Event: &agentpb.ProcessEvent_Start{Start: &agentpb.StartEvent{Pid: uint32(p.pid)}}})
	if err == nil {
		err = p.follow(ctx, sub, nil, stream.Send)
	}
	if err != nil && !m.Detach && p.ended() == nil {
		// The host went away or cancelled: the command goes too.
		unix.Kill(-p.pid, unix.SIGKILL)
	}
	return err
}

func (v *processService) Connect(ctx context.Context, req *connect.Request[agentpb.ConnectRequest], stream *connect.ServerStream[agentpb.ProcessEvent]) error {
	p, err := v.s.procs.find(req.Msg.GetProcess())
	if err != nil {
		return err
	}
	sub, past, dropped := p.subscribe(req.Msg.Replay)
	defer p.unsubscribe(sub)
	if err := stream.Send(&agentpb.ProcessEvent{Event: &agentpb.ProcessEvent_Start{Start: &agentpb.StartEvent{Pid: uint32(p.pid), DroppedBytes: dropped}}}); err != nil {
		return err
	}
	return p.follow(ctx, sub, past, stream.Send)
}

func (p *proc) info() *agentpb.ProcessInfo {
	end := p.ended()
	return &agentpb.ProcessInfo{
		Pid: uint32(p.pid), Tag: p.tag, Config: p.cfg,
		Running: end == nil, End: end, StartedUnixMs: p.started.UnixMilli(),
	}
}

func (v *processService) List(context.Context, *connect.Request[agentpb.ListRequest]) (*connect.Response[agentpb.ListResponse], error) {
	var out []*agentpb.ProcessInfo
	for _, p := range v.s.procs.list() {
		out = append(out, p.info())
	}
	return connect.NewResponse(&agentpb.ListResponse{Processes: out}), nil
}

func (v *processService) Output(_ context.Context, req *connect.Request[agentpb.OutputRequest]) (*connect.Response[agentpb.OutputResponse], error) {
	p, err := v.s.procs.find(req.Msg.GetProcess())
	if err != nil {
		return nil, err
	}
	p.mu.Lock()
	resp := &agentpb.OutputResponse{Data: append([]*agentpb.DataEvent(nil), p.log...), DroppedBytes: p.dropped}
	p.mu.Unlock()
	resp.Info = p.info()
	return connect.NewResponse(resp), nil
}

func (p *proc) write(data []byte) error {
	p.stdinMu.Lock()
	defer p.stdinMu.Unlock()
	if p.stdin == nil {
		return connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("process %d has no open stdin", p.pid))
	}
	if _, err := p.stdin.Write(data); err != nil {
		return connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("write to process %d: %w", p.pid, err))
	}
	return nil
}

func (v *processService) SendInput(_ context.Context, req *connect.Request[agentpb.SendInputRequest]) (*connect.Response[agentpb.SendInputResponse], error) {
	p, err := v.s.procs.find(req.Msg.GetProcess())
	if err != nil {
		return nil, err
	}
	if err := p.write(req.Msg.Data); err != nil {
		return nil, err
	}
	return connect.NewResponse(&agentpb.SendInputResponse{}), nil
}

func (v *processService) StreamInput(_ context.Context, stream *connect.ClientStream[agentpb.StreamInputRequest]) (*connect.Response[agentpb.StreamInputResponse], error) {
	var p *proc
	for stream.Receive() {
		switch ev := stream.Msg().GetEvent().(type) {
		case *agentpb.StreamInputRequest_Start:
			found, err := v.s.procs.find(ev.Start)
			if err != nil {
				return nil, err
			}
			p = found
		case *agentpb.StreamInputRequest_Data:
			if p == nil {
				return nil, connect.NewError(connect.CodeInvalidArgument, errors.New("the first message must name the process"))
			}
			if err := p.write(ev.Data); err != nil {
				return nil, err
			}
		}
	}
	if err := stream.Err(); err != nil {
		return nil, err
	}
	return connect.NewResponse(&agentpb.StreamInputResponse{}), nil
}

func (v *processService) CloseStdin(_ context.Context, req *connect.Request[agentpb.CloseStdinRequest]) (*connect.Response[agentpb.CloseStdinResponse], error) {
	p, err := v.s.procs.find(req.Msg.GetProcess())
	if err != nil {
		return nil, err
	}
	if p.tty != nil {
		// A terminal has no end of file to close; ^D is what a user
		// types for one.
		if err := p.write([]byte{4}); err != nil {
			return nil, err
		}
	} else {
		p.closeStdin()
	}
	return connect.NewResponse(&agentpb.CloseStdinResponse{}), nil
}

func (p *proc) closeStdin() {
	p.stdinMu.Lock()
	defer p.stdinMu.Unlock()
	if p.stdin != nil && p.stdin != p.tty {
		p.stdin.Close()
	}
	p.stdin = nil
}

func (v *processService) SendSignal(_ context.Context, req *connect.Request[agentpb.SendSignalRequest]) (*connect.Response[agentpb.SendSignalResponse], error) {
	sig := req.Msg.Signal
	if sig < 1 || sig > 64 {
		return nil, connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("signal %d is not a Linux signal number (1 to 64)", sig))
	}
	p, err := v.s.procs.find(req.Msg.GetProcess())
	if err != nil {
		return nil, err
	}
	if p.ended() != nil {
		return nil, connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("process %d has ended", p.pid))
	}
	if err := unix.Kill(-p.pid, unix.Signal(sig)); err != nil && err != unix.ESRCH {
		return nil, connect.NewError(connect.CodeInternal, fmt.Errorf("signal process %d: %w", p.pid, err))
	}
	return connect.NewResponse(&agentpb.SendSignalResponse{}), nil
}

func (v *processService) Resize(_ context.Context, req *connect.Request[agentpb.ResizeRequest]) (*connect.Response[agentpb.ResizeResponse], error) {
	p, err := v.s.procs.find(req.Msg.GetProcess())
	if err != nil {
		return nil, err
	}
	if p.tty == nil {
		return nil, connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("process %d has no terminal", p.pid))
	}
	size := req.Msg.GetSize()
	if err := checkSize(size); err != nil {
		return nil, err
	}
	if err := pty.Setsize(p.tty, &pty.Winsize{Cols: uint16(size.Cols), Rows: uint16(size.Rows)}); err != nil {
		return nil, connect.NewError(connect.CodeInternal, fmt.Errorf("resize terminal: %w", err))
	}
	return connect.NewResponse(&agentpb.ResizeResponse{}), nil
}

func checkSize(s *agentpb.TerminalSize) error {
	if s.GetCols() < 1 || s.GetCols() > 1000 || s.GetRows() < 1 || s.GetRows() > 1000 {
		return connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("terminal size %dx%d is outside 1 to 1000 columns and rows", s.GetCols(), s.GetRows()))
	}
	return nil
}

// commandArgv is the argv a process config runs.
func commandArgv(c *agentpb.ProcessConfig) ([]string, error) {
	switch {
	case c == nil:
		return nil, errors.New("no process to start")
	case len(c.Argv) > 0 && c.Script != "":
		return nil, errors.New("argv and script are exclusive")
	case c.Script != "":
		switch c.Shell {
		case agentpb.Shell_SHELL_RAW:
			return []string{"/bin/sh", "-c", c.Script}, nil
		case agentpb.Shell_SHELL_LOGIN, agentpb.Shell_SHELL_UNSPECIFIED:
			sh := "/bin/sh"
			if _, err := os.Stat("/bin/bash"); err == nil {
				sh = "/bin/bash"
			}
			return []string{sh, "-lc", c.Script}, nil
		}
		return nil, fmt.Errorf("unknown shell %v", c.Shell)
	case len(c.Argv) == 0 || c.Argv[0] == "":
		return nil, errors.New("empty command")
	}
	return c.Argv, nil
}

// start forks the process m describes. A command that cannot start gets
// the end a shell would give it.
func (s *Server) start(m *agentpb.StartRequest, argv []string) (*proc, *agentpb.EndEvent) {
	cfg := m.GetProcess()
	if m.Pty != nil {
		if err := checkSize(m.Pty); err != nil {
			return nil, &agentpb.EndEvent{ExitCode: 126, Error: err.Error()}
		}
	}
	acc, err := lookupUser(cfg.User)
	if err != nil {
		return nil, &agentpb.EndEvent{ExitCode: 126, Error: err.Error()}
	}
	env := s.env(acc, cfg.Env, m.Pty != nil)
	path, code, msg := lookPath(argv[0], env)
	if code != 0 {
		return nil, &agentpb.EndEvent{ExitCode: int32(code), Error: msg}
	}
	dir := cfg.Cwd // checked by the caller
	if dir == "" {
		dir = "/"
		for _, d := range []string{cfg.DefaultCwd, acc.home} {
			if st, err := os.Stat(d); d != "" && err == nil && st.IsDir() {
				dir = d
				break
			}
		}
	}

	var cred *syscall.Credential
	if acc.uid != 0 || acc.gid != 0 {
		cred = &syscall.Credential{Uid: acc.uid, Gid: acc.gid, NoSetGroups: true}
	}
	p := &proc{tag: m.Tag, cfg: cfg, detach: m.Detach, done: make(chan struct{}), released: make(chan struct{})}
	p.spare = spareRecipeFor(s.spares.currentEpoch(), m, argv, path, env, dir, cred)
	if p.spare != nil {
		if sh := s.spares.take(p.spare.key, envValue(env, "HOME")); sh != nil {
			if err := sh.hand(cfg.Script); err == nil {
				s.spares.changed()
				p.pid, p.outR, p.errR, p.waitc = sh.pid, sh.outR, sh.errR, sh.waitc
				s.launched(p, m)
				return p, nil
			}
			sh.discard()
		}
	}
	s.spares.changed()
	var (
		childFiles []*os.File // the child's ends, closed here once it has them
		outR, errR *os.File
	)
	closeAll := func(fs ...*os.File) {
		for _, f := range fs {
			if f != nil {
				f.Close()
			}
		}
	}
	attr := &syscall.ProcAttr{
		Dir: dir,
		Env: env,
		// Its own session makes the pid a process group id, so a timeout
		// or signal reaches everything the command started.
		Sys: &syscall.SysProcAttr{Setsid: true},
	}
	if m.Pty != nil {
		master, tty, err := pty.Open()
		if err != nil {
			return nil, &agentpb.EndEvent{ExitCode: 126, Error: fmt.Sprintf("open a terminal: %v", err)}
		}
		if err := pty.Setsize(master, &pty.Winsize{Cols: uint16(m.Pty.Cols), Rows: uint16(m.Pty.Rows)}); err != nil {
			closeAll(master, tty)
			return nil, &agentpb.EndEvent{ExitCode: 126, Error: fmt.Sprintf("size the terminal: %v", err)}
		}
		p.tty, p.stdin, outR = master, master, master
		childFiles = []*os.File{tty}
		attr.Files = []uintptr{tty.Fd(), tty.Fd(), tty.Fd()}
		attr.Sys.Setctty = true
		attr.Sys.Ctty = 0
	} else {
		var stdinR *os.File
		if len(m.StdinData) > 0 || m.Stdin {
			r, w, err := os.Pipe()
			if err != nil {
				return nil, &agentpb.EndEvent{ExitCode: 126, Error: fmt.Sprintf("pipe: %v", err)}
			}
			stdinR, p.stdin = r, w
		} else if stdinR, err = os.Open(os.DevNull); err != nil {
			return nil, &agentpb.EndEvent{ExitCode: 126, Error: fmt.Sprintf("open %s: %v", os.DevNull, err)}
		}
		var outW, errW *os.File
		outR, outW, err = os.Pipe()
		if err == nil {
			errR, errW, err = os.Pipe()
		}
		if err != nil {
			closeAll(stdinR, p.stdin, outR, outW)
			return nil, &agentpb.EndEvent{ExitCode: 126, Error: fmt.Sprintf("pipe: %v", err)}
		}
		childFiles = []*os.File{stdinR, outW, errW}
		attr.Files = []uintptr{stdinR.Fd(), outW.Fd(), errW.Fd()}
	}
	attr.Sys.Credential = cred
	pid, waitc, err := s.reaper.start(path, argv, attr)
	closeAll(childFiles...)
	if err != nil {
		closeAll(outR, errR)
		if p.stdin != outR {
			closeAll(p.stdin)
		}
		code := int32(126)
		if errors.Is(err, syscall.ENOENT) {
			code = 127
		}
		return nil, &agentpb.EndEvent{ExitCode: code, Error: fmt.Sprintf("%s: %v", argv[0], err)}
	}
	p.pid, p.outR, p.errR, p.waitc = pid, outR, errR, waitc
	s.launched(p, m)
	return p, nil
}

// launched registers a process that has started and arms its timeout and
// its stdin.
func (s *Server) launched(p *proc, m *agentpb.StartRequest) {
	pid := p.pid
	p.started = time.Now()
	s.procs.add(p)
	if m.TimeoutMs > 0 {
		p.timer = time.AfterFunc(time.Duration(m.TimeoutMs)*time.Millisecond, func() {
			p.timedOut.Store(true)
			unix.Kill(-pid, unix.SIGKILL)
		})
	}
	if len(m.StdinData) > 0 {
		go func() {
			p.write(m.StdinData)
			if !m.Stdin {
				p.closeStdin()
			}
		}()
	}
	p.server = s
}

// pump reads the process's output until it exits (and briefly after, for
// what is still in the pipes), then records how it ended.
func (p *proc) pump() {
	var pumps sync.WaitGroup
	var exited atomic.Bool
	read := func(r *os.File, wrap func([]byte) *agentpb.DataEvent) {
		defer pumps.Done()
		defer r.Close()
		buf := make([]byte, chunkSize)
		for {
			n, err := r.Read(buf)
			// Take what else is already waiting, without waiting for
			// more: a fast writer's many small writes then travel as one
			// event, and a slow one's bytes are not held back.
			for n > 0 && err == nil && n < len(buf) {
				r.SetReadDeadline(time.Now())
				m, merr := r.Read(buf[n:])
				n += m
				if m == 0 || merr != nil {
					break
				}
			}
			// Clear the probe's deadline, then look again: an exit
			// noticed meanwhile set the drain deadline, which must stand.
			r.SetReadDeadline(time.Time{})
			if exited.Load() {
				r.SetReadDeadline(time.Now().Add(drainGrace))
			}
			if n > 0 {
				p.publish(wrap(append([]byte(nil), buf[:n]...)))
				if exited.Load() {
					// Delivery may have been slow; the grace
					// counts from the last delivered chunk.
					r.SetReadDeadline(time.Now().Add(drainGrace))
				}
			}
			if err != nil {
				// A terminal reads EIO once its last user closed it.
				return
			}
		}
	}
	if p.tty != nil {
		pumps.Add(1)
		go read(p.outR, func(b []byte) *agentpb.DataEvent { return &agentpb.DataEvent{Output: &agentpb.DataEvent_Pty{Pty: b}} })
	} else {
		pumps.Add(2)
		go read(p.outR, func(b []byte) *agentpb.DataEvent {
			return &agentpb.DataEvent{Output: &agentpb.DataEvent_Stdout{Stdout: b}}
		})
		go read(p.errR, func(b []byte) *agentpb.DataEvent {
			return &agentpb.DataEvent{Output: &agentpb.DataEvent_Stderr{Stderr: b}}
		})
	}
	ws := <-p.waitc
	if p.timer != nil {
		p.timer.Stop()
	}
	// Output already written is in the pipes; give it a moment to arrive,
	// then stop waiting on descendants that still hold the pipes open.
	exited.Store(true)
	deadline := time.Now().Add(drainGrace)
	p.outR.SetReadDeadline(deadline)
	if p.errR != nil {
		p.errR.SetReadDeadline(deadline)
	}
	pumps.Wait()
	p.closeStdin()
	end := &agentpb.EndEvent{TimedOut: p.timedOut.Load()}
	switch {
	case ws.Exited():
		end.ExitCode = int32(ws.ExitStatus())
	case ws.Signaled():
		end.Signal = int32(ws.Signal())
		end.ExitCode = 128 + int32(ws.Signal())
	}
	p.finish(end)
	p.server.procs.retire(p)
	// The next spare shell waits until the caller has the end. Starting
	// it holds the agent's thread until the shell has exec'd, and the
	// shell then competes for the CPU: on a guest of one vCPU that
	// delayed the end's delivery by 5 to 10 ms.
	select {
	case <-p.released:
	case <-time.After(releaseWait):
	}
	p.server.refillSpare(p.spare)
}

// releaseWait bounds how long the next spare shell waits for a command's
// caller to take its end.
const releaseWait = time.Second

// env is the command's environment: defaults for the account, then extra
// (the image's and the request's, in that order), a later KEY replacing an
// earlier one, since C's getenv would return the first.
func (s *Server) env(acc account, extra []string, tty bool) []string {
	term := "TERM=xterm"
	if tty {
		term = "TERM=xterm-256color"
	}
	env := []string{
		"PATH=" + defaultPath,
		"HOME=" + acc.home,
		"USER=" + acc.name,
		"LOGNAME=" + acc.name,
		"SHELL=" + acc.shell,
		term,
		"LANG=C.UTF-8",
		"HOSTNAME=" + s.hostname(),
	}
	index := make(map[string]int, len(env)+len(extra))
	for i, kv := range env {
		k, _, _ := strings.Cut(kv, "=")
		index[k] = i
	}
	for _, kv := range extra {
		k, _, ok := strings.Cut(kv, "=")
		if !ok || k == "" {
			continue
		}
		if i, seen := index[k]; seen {
			env[i] = kv
			continue
		}
		index[k] = len(env)
		env = append(env, kv)
	}
	return env
}

// lookPath resolves a command name as a shell would, and returns the
// shell's exit code and message when it cannot (127 not found, 126 not
// executable).
func lookPath(name string, env []string) (string, int, string) {
	if strings.Contains(name, "/") {
		if err := unix.Access(name, unix.X_OK); err != nil {
			if errors.Is(err, unix.ENOENT) {
				return "", 127, fmt.Sprintf("%s: No such file or directory", name)
			}
			return "", 126, fmt.Sprintf("%s: Permission denied", name)
		}
		return name, 0, ""
	}
	path := defaultPath
	for _, e := range env {
		if v, ok := strings.CutPrefix(e, "PATH="); ok {
			path = v
		}
	}
	for _, dir := range filepath.SplitList(path) {
		p := filepath.Join(dir, name)
		if st, err := os.Stat(p); err == nil && !st.IsDir() && unix.Access(p, unix.X_OK) == nil {
			return p, 0, ""
		}
	}
	return "", 127, fmt.Sprintf("%s: command not found", name)
}

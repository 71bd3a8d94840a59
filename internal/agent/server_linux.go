package agent

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"sync"
	"time"

	"connectrpc.com/connect"
	"golang.org/x/net/http2"
	"golang.org/x/sys/unix"

	"github.com/smolvm/smolvm/internal/agent/agentpb"
	"github.com/smolvm/smolvm/internal/agent/agentpb/agentpbconnect"
	"github.com/smolvm/smolvm/internal/agent/wire"
)

// System is what the agent changes about the machine it runs on. The
// agent that is PID 1 in a guest uses the real one; a test that serves the
// agent's API on its host passes one that changes nothing.
type System interface {
	// ApplyIdentity sets the clock, random state, host name, machine id
	// and root filesystem size a request carries.
	ApplyIdentity(req *agentpb.SetIdentityRequest) error
	// Poweroff syncs the disks and stops the machine; it does not return.
	Poweroff()
}

// Options configure a Server.
type Options struct {
	// System applies identities and powers off.
	System System
	// Hostname is what commands see as HOSTNAME until an identity
	// changes it.
	Hostname string
	// ReapAll makes the server reap every exited child of this process,
	// as PID 1 must (it inherits every orphan). Elsewhere it waits only
	// for the processes it started, leaving the rest to their owners.
	ReapAll bool
	// Logf reports what an operator reading the console needs to see.
	Logf func(format string, args ...any)
	// CommandGroup is the cgroup v2 directory every process the server
	// starts runs in; "" starts them in the server's own group.
	CommandGroup string
}

// Server serves the agent API over connections that each open with the
// line handshake of package wire and then carry HTTP/2.
type Server struct {
	opts    Options
	reaper  *reaper
	booted  time.Time
	procs   *processTable
	spares  spares
	handler http.Handler
	h2      *http2.Server

	nameMu sync.Mutex
	name   string
}

// NewServer returns a server; Close stops what it started.
func NewServer(opts Options) *Server {
	if opts.Logf == nil {
		opts.Logf = func(string, ...any) {}
	}
	if opts.Hostname == "" {
		opts.Hostname, _ = os.Hostname()
	}
	s := &Server{
		opts:   opts,
		reaper: newReaper(opts.ReapAll, opts.CommandGroup, opts.Logf),
		booted: time.Now(),
		name:   opts.Hostname,
		h2: &http2.Server{
			MaxConcurrentStreams: 4096,
			// Emulated guests and loaded hosts stall for seconds; a
			// peer is given up only after a minute of silence.
			ReadIdleTimeout:  15 * time.Second,
			PingTimeout:      60 * time.Second,
			WriteByteTimeout: 60 * time.Second,
			// Few large frames: every frame costs a pass through the
			// emulated guest's code.
			MaxReadFrameSize:             1 << 20,
			MaxUploadBufferPerStream:     4 << 20,
			MaxUploadBufferPerConnection: 16 << 20,
		},
	}
	s.procs = newProcessTable(s)
	handlerOpts := []connect.HandlerOption{
		// Compressing costs more than it saves on a local link, and far
		// more under emulation.
		connect.WithCompression("gzip", nil, nil),
		connect.WithReadMaxBytes(wire.MaxMessage),
	}
	mux := http.NewServeMux()
	mux.Handle(agentpbconnect.NewSystemHandler(&systemService{s: s}, handlerOpts...))
	mux.Handle(agentpbconnect.NewProcessHandler(&processService{s: s}, handlerOpts...))
	mux.Handle(agentpbconnect.NewFilesystemHandler(&filesystemService{s: s}, handlerOpts...))
	s.handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		// A Date header present but empty keeps the HTTP/2 server from
		// formatting the time into every response. Nobody reads it, and
		// in a clone just restored the formatting code alone was about
		// 150 blocks for the emulator to translate.
		w.Header()["Date"] = nil
		mux.ServeHTTP(w, r)
	})
	return s
}

// Close kills the processes the server started and stops its reaper.
func (s *Server) Close() error {
	s.procs.killAll()
	s.spares.drop()
	s.reaper.stop()
	return nil
}

func (s *Server) hostname() string {
	s.nameMu.Lock()
	defer s.nameMu.Unlock()
	return s.name
}

func (s *Server) setHostname(name string) {
	s.nameMu.Lock()
	s.name = name
	s.nameMu.Unlock()
}

// Serve accepts connections from l and serves each until it ends. It
// returns when l fails (or is closed).
func (s *Server) Serve(ctx context.Context, l net.Listener) error {
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		c, err := l.Accept()
		if err != nil {
			return err
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := s.ServeConn(ctx, c); err != nil && !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) {
				s.opts.Logf("session ended: %v", err)
			}
		}()
	}
}

// recorder is a connection that keeps what it reads once told to, so a
// handshake meant for the next session can be handed on (see serialConn).
type recorder interface{ startRecording() }

// ServeConn runs the handshake on c and then serves HTTP/2 on it until the
// host goes away; c is closed on return.
func (s *Server) ServeConn(ctx context.Context, c net.Conn) error {
	defer c.Close()
	br := bufio.NewReaderSize(c, 64<<10)
	nonce, err := wire.AwaitHello(br)
	if err != nil {
		return err
	}
	if r, ok := c.(recorder); ok {
		r.startRecording()
	}
	if _, err := c.Write(wire.ReadyLine(nonce)); err != nil {
		return fmt.Errorf("handshake: %w", err)
	}
	guarded := &frameGuard{Conn: &readerConn{Conn: c, r: br}, max: int(s.h2.MaxReadFrameSize)}
	s.h2.ServeConn(guarded, &http2.ServeConnOpts{
		Context: ctx,
		Handler: s.handler,
	})
	return nil
}

// readerConn reads through the handshake's buffer so no byte after the
// hello line is lost.
type readerConn struct {
	net.Conn
	r *bufio.Reader
}

func (c *readerConn) Read(p []byte) (int, error) { return c.r.Read(p) }

// systemService is the System API.
type systemService struct{ s *Server }

func (v *systemService) info() *agentpb.GuestInfo {
	var u unix.Utsname
	unix.Uname(&u)
	return &agentpb.GuestInfo{
		Kernel:   unix.ByteSliceToString(u.Release[:]),
		Hostname: v.s.hostname(),
		Version:  wire.Version,
		UptimeMs: time.Since(v.s.booted).Milliseconds(),
	}
}

func (v *systemService) Ping(context.Context, *connect.Request[agentpb.PingRequest]) (*connect.Response[agentpb.PingResponse], error) {
	return connect.NewResponse(&agentpb.PingResponse{Info: v.info()}), nil
}

func (v *systemService) SetIdentity(_ context.Context, req *connect.Request[agentpb.SetIdentityRequest]) (*connect.Response[agentpb.SetIdentityResponse], error) {
	if v.s.opts.System == nil {
		return nil, connect.NewError(connect.CodeUnimplemented, errors.New("this agent cannot change its machine's identity"))
	}
	if len(req.Msg.Seed) == 0 {
		return nil, connect.NewError(connect.CodeInvalidArgument, errors.New("identity without a random seed"))
	}
	// A spare shell started before knows the old name (and the old
	// clock, for a clone restored from a template).
	v.s.spares.drop()
	if err := v.s.opts.System.ApplyIdentity(req.Msg); err != nil {
		return nil, connect.NewError(connect.CodeInternal, err)
	}
	if req.Msg.Hostname != "" {
		v.s.setHostname(req.Msg.Hostname)
	}
	return connect.NewResponse(&agentpb.SetIdentityResponse{Info: v.info()}), nil
}

func (v *systemService) Shutdown(context.Context, *connect.Request[agentpb.ShutdownRequest]) (*connect.Response[agentpb.ShutdownResponse], error) {
	if v.s.opts.System == nil {
		return nil, connect.NewError(connect.CodeUnimplemented, errors.New("this agent cannot power its machine off"))
	}
	// Answer first: the host waits for the reply, then for the VM to end.
	time.AfterFunc(50*time.Millisecond, v.s.opts.System.Poweroff)
	return connect.NewResponse(&agentpb.ShutdownResponse{}), nil
}

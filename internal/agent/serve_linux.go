package agent

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/hashicorp/yamux"
	"golang.org/x/sys/unix"

	"github.com/smolvm/smolvm/internal/agent/wire"
)

type agent struct {
	params bootParams
	reaper *reaper
	booted time.Time

	// name is the hostname commands see; an identity request changes it
	// while commands may be starting.
	nameMu sync.Mutex
	name   string
}

func (a *agent) hostname() string {
	a.nameMu.Lock()
	defer a.nameMu.Unlock()
	if a.name == "" {
		return a.params.hostname
	}
	return a.name
}

func (a *agent) setHostname(name string) {
	a.nameMu.Lock()
	a.name = name
	a.nameMu.Unlock()
}

// Main runs the agent as PID 1. It never returns: on a fatal error it powers
// the VM off so the host sees the failure instead of a hung guest.
func Main() {
	a := &agent{booted: time.Now()}
	if err := mountEarly(); err != nil {
		logf("boot failed: %v", err)
		poweroff()
	}
	a.params = readBootParams()
	if a.params.probe == "poweroff" {
		// Benchmarks time a boot to this point as their baseline.
		poweroff()
	}
	if err := a.boot(); err != nil {
		logf("boot failed: %v", err)
		poweroff()
	}
	a.reaper = newReaper()
	for {
		if err := a.servePort(); err != nil {
			logf("%v", err)
			time.Sleep(time.Second)
		}
	}
}

func (a *agent) boot() error {
	if err := loadModules(); err != nil {
		return err
	}
	if err := switchRoot(a.params.rootFS); err != nil {
		return err
	}
	prepareRoot(a.params)
	return nil
}

func poweroff() {
	unix.Sync()
	unix.Reboot(unix.LINUX_REBOOT_CMD_POWER_OFF)
	select {}
}

// findPort locates the virtio-serial port the host named for the agent.
func findPort() (string, error) {
	deadline := time.Now().Add(10 * time.Second)
	for {
		names, _ := filepath.Glob("/sys/class/virtio-ports/*/name")
		for _, n := range names {
			b, err := os.ReadFile(n)
			if err == nil && strings.TrimSpace(string(b)) == wire.PortName {
				return "/dev/" + filepath.Base(filepath.Dir(n)), nil
			}
		}
		if time.Now().After(deadline) {
			return "", fmt.Errorf("virtio-serial port %q not found", wire.PortName)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// servePort opens the port and serves one host session after another.
func (a *agent) servePort() error {
	path, err := findPort()
	if err != nil {
		return err
	}
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("open %s: %w", path, err)
	}
	defer f.Close()
	var replay []byte
	for {
		if err := waitHost(f); err != nil {
			return err
		}
		pc := &portConn{f: f}
		err := a.session(pc, replay)
		pc.Close()
		// A host that connects right after another left can have its hello
		// read by the old session before that session saw the disconnect;
		// hand those bytes to the next session instead of losing them.
		replay = wire.LastHello(pc.recorded())
		if err != nil && err != io.EOF {
			logf("session ended: %v", err)
		}
	}
}

// waitHost blocks until a host is connected to the port. While none is,
// the port reads end-of-file at once, so the agent cannot simply read;
// virtio_console raises SIGIO on a host's connect for a file in O_ASYNC
// mode, which wakes this without polling (the timer is only a backstop).
// O_ASYNC is cleared again once a host is there: during a session it
// would raise a signal for every read.
func waitHost(f *os.File) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	sigio := make(chan os.Signal, 1)
	signal.Notify(sigio, syscall.SIGIO)
	defer signal.Stop(sigio)
	setAsync := func(on bool) {
		rc.Control(func(fd uintptr) {
			flags, err := unix.FcntlInt(fd, unix.F_GETFL, 0)
			if err != nil {
				return
			}
			if on {
				unix.FcntlInt(fd, unix.F_SETOWN, os.Getpid())
				flags |= unix.O_ASYNC
			} else {
				flags &^= unix.O_ASYNC
			}
			unix.FcntlInt(fd, unix.F_SETFL, flags)
		})
	}
	defer setAsync(false)
	armed := false
	for {
		var hup bool
		var perr error
		rc.Control(func(fd uintptr) {
			fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
			_, perr = unix.Poll(fds, 0)
			hup = fds[0].Revents&unix.POLLHUP != 0
		})
		if perr != nil && perr != unix.EINTR {
			return fmt.Errorf("poll agent port: %w", perr)
		}
		if !hup {
			return nil
		}
		if !armed {
			// Arm, then look again: a connect between the first look
			// and arming would raise no signal.
			setAsync(true)
			armed = true
			continue
		}
		select {
		case <-sigio:
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// portConn is one session's view of the port. Closing it aborts that
// session's reads and writes, so nothing it still had in flight can reach
// the next session.
type portConn struct {
	f      *os.File
	mu     sync.Mutex
	closed bool
	busy   sync.WaitGroup

	// rec holds the last bytes read once recording starts (after the
	// handshake), so a hello swallowed by this session can be replayed.
	recMu     sync.Mutex
	recording bool
	rec       []byte
}

const recordTail = 4096

func (c *portConn) startRecording() {
	c.recMu.Lock()
	c.recording, c.rec = true, nil
	c.recMu.Unlock()
}

func (c *portConn) recorded() []byte {
	c.recMu.Lock()
	defer c.recMu.Unlock()
	return c.rec
}

func (c *portConn) enter() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return false
	}
	c.busy.Add(1)
	return true
}

func (c *portConn) Read(p []byte) (int, error) {
	if !c.enter() {
		return 0, net.ErrClosed
	}
	defer c.busy.Done()
	n, err := c.f.Read(p)
	if n == 0 && err == nil {
		err = io.EOF
	}
	if n > 0 {
		c.recMu.Lock()
		if c.recording {
			c.rec = append(c.rec, p[:n]...)
			if len(c.rec) > recordTail {
				c.rec = append([]byte(nil), c.rec[len(c.rec)-recordTail:]...)
			}
		}
		c.recMu.Unlock()
	}
	return n, err
}

func (c *portConn) Write(p []byte) (int, error) {
	if !c.enter() {
		return 0, net.ErrClosed
	}
	defer c.busy.Done()
	return c.f.Write(p)
}

func (c *portConn) Close() error {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil
	}
	c.closed = true
	c.mu.Unlock()
	c.f.SetDeadline(time.Now())
	c.busy.Wait()
	c.f.SetDeadline(time.Time{})
	return nil
}

// session runs the handshake and then serves yamux streams until the host
// goes away.
func (a *agent) session(pc *portConn, replay []byte) error {
	var r io.Reader = pc
	if len(replay) > 0 {
		r = io.MultiReader(bytes.NewReader(replay), pc)
	}
	br := bufio.NewReaderSize(r, 64<<10)
	nonce, err := wire.AwaitHello(br)
	if err != nil {
		return err
	}
	pc.startRecording()
	if _, err := pc.Write(wire.ReadyLine(nonce)); err != nil {
		return fmt.Errorf("handshake: %w", err)
	}
	sess, err := yamux.Server(&bufConn{r: br, pc: pc}, wire.YamuxConfig())
	if err != nil {
		return err
	}
	defer sess.Close()
	for {
		st, err := sess.Accept()
		if err != nil {
			return err
		}
		go a.handle(st)
	}
}

type bufConn struct {
	r  *bufio.Reader
	pc *portConn
}

func (b *bufConn) Read(p []byte) (int, error)  { return b.r.Read(p) }
func (b *bufConn) Write(p []byte) (int, error) { return b.pc.Write(p) }
func (b *bufConn) Close() error                { return b.pc.Close() }

func (a *agent) handle(st net.Conn) {
	defer st.Close()
	br := bufio.NewReader(st)
	line, err := br.ReadBytes('\n')
	if err != nil {
		return
	}
	var req wire.Request
	if err := json.Unmarshal(line, &req); err != nil {
		a.reply(st, wire.Exit{Error: fmt.Sprintf("bad request: %v", err)})
		return
	}
	rw := struct {
		io.Reader
		io.Writer
		io.Closer
	}{br, st, st}
	switch req.Op {
	case wire.OpExec:
		a.exec(rw, &req)
	case wire.OpPing:
		a.reply(st, wire.Exit{Info: a.info()})
	case wire.OpIdentity:
		if err := a.applyIdentity(req.Identity); err != nil {
			a.reply(st, wire.Exit{Error: err.Error()})
			return
		}
		a.reply(st, wire.Exit{Info: a.info()})
	case wire.OpShutdown:
		a.reply(st, wire.Exit{})
		time.Sleep(50 * time.Millisecond)
		poweroff()
	default:
		a.reply(st, wire.Exit{Error: fmt.Sprintf("unknown op %q", req.Op)})
	}
}

func (a *agent) reply(w io.Writer, e wire.Exit) {
	b, _ := json.Marshal(e)
	wire.WriteFrame(w, wire.FrameExit, b)
}

func (a *agent) info() *wire.Info {
	var u unix.Utsname
	unix.Uname(&u)
	host, _ := os.Hostname()
	return &wire.Info{
		Kernel:   unix.ByteSliceToString(u.Release[:]),
		Hostname: host,
		Version:  wire.Version,
		UptimeMS: time.Since(a.booted).Milliseconds(),
	}
}

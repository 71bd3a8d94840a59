package agent

import (
	"bytes"
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

	"github.com/mdlayher/vsock"
	"golang.org/x/sys/unix"

	"github.com/smolvm/smolvm/internal/agent/wire"
)

// listen returns the listener for the host's transport: the virtio-serial
// port the host named (QEMU), else a vsock port (Firecracker, libkrun).
// Modules are loaded by now, so a missing port is only waited for briefly.
func listen(timeout time.Duration) (net.Listener, error) {
	return listenAt(timeout, findPort, wire.VsockPort)
}

// listenAt is listen with the port lookup and the vsock port given, so a
// test can take the vsock path on a host that has vsock.
func listenAt(timeout time.Duration, findPort func() (string, bool), vsockPort uint32) (net.Listener, error) {
	deadline := time.Now().Add(timeout)
	for {
		if path, ok := findPort(); ok {
			return listenSerial(path)
		}
		if _, err := os.Stat("/dev/vsock"); err == nil {
			l, err := vsock.Listen(vsockPort, nil)
			if err == nil {
				return l, nil
			}
			if time.Now().After(deadline) {
				return nil, fmt.Errorf("listen on vsock port %d: %w", vsockPort, err)
			}
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("neither virtio-serial port %q nor vsock found", wire.PortName)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// findPort locates the virtio-serial port the host named for the agent.
func findPort() (string, bool) {
	names, _ := filepath.Glob("/sys/class/virtio-ports/*/name")
	for _, n := range names {
		b, err := os.ReadFile(n)
		if err == nil && strings.TrimSpace(string(b)) == wire.PortName {
			return "/dev/" + filepath.Base(filepath.Dir(n)), true
		}
	}
	return "", false
}

// serialListener turns a virtio-serial port into a listener: each host
// connecting to the port's socket is one accepted connection. A port
// carries one session at a time, so Accept waits for the last one to end.
type serialListener struct {
	f      *os.File
	mu     sync.Mutex
	cur    *serialConn
	closed bool
}

func listenSerial(path string) (*serialListener, error) {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	return &serialListener{f: f}, nil
}

func (l *serialListener) Accept() (net.Conn, error) {
	l.mu.Lock()
	prev := l.cur
	l.mu.Unlock()
	var replay []byte
	if prev != nil {
		<-prev.done
		// A host that connects right after another left can have its
		// hello read by the old session before that session saw the
		// disconnect; hand those bytes to the next session instead of
		// losing them.
		replay = wire.LastHello(prev.recorded())
	}
	if err := waitHost(l.f); err != nil {
		return nil, err
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return nil, net.ErrClosed
	}
	c := &serialConn{f: l.f, replay: replay, done: make(chan struct{})}
	l.cur = c
	return c, nil
}

func (l *serialListener) Close() error {
	l.mu.Lock()
	l.closed = true
	cur := l.cur
	l.mu.Unlock()
	if cur != nil {
		cur.Close()
	}
	return l.f.Close()
}

func (l *serialListener) Addr() net.Addr { return portAddr(l.f.Name()) }

type portAddr string

func (a portAddr) Network() string { return "virtio-serial" }
func (a portAddr) String() string  { return string(a) }

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
		if err := rc.Control(func(fd uintptr) {
			fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
			_, perr = unix.Poll(fds, 0)
			hup = fds[0].Revents&unix.POLLHUP != 0
		}); err != nil {
			return fmt.Errorf("poll agent port: %w", err)
		}
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

// serialConn is one session's view of the port. Closing it aborts that
// session's reads and writes, so nothing it still had in flight can reach
// the next session.
type serialConn struct {
	f      *os.File
	replay []byte // read before the port
	mu     sync.Mutex
	closed bool
	busy   sync.WaitGroup
	done   chan struct{}

	// rec holds the last bytes read once recording starts (after the
	// handshake), so a hello swallowed by this session can be replayed.
	recMu     sync.Mutex
	recording bool
	rec       []byte
}

const recordTail = 4096

func (c *serialConn) startRecording() {
	c.recMu.Lock()
	c.recording, c.rec = true, nil
	c.recMu.Unlock()
}

func (c *serialConn) recorded() []byte {
	c.recMu.Lock()
	defer c.recMu.Unlock()
	return c.rec
}

func (c *serialConn) enter() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return false
	}
	c.busy.Add(1)
	return true
}

func (c *serialConn) Read(p []byte) (int, error) {
	if !c.enter() {
		return 0, net.ErrClosed
	}
	defer c.busy.Done()
	if len(c.replay) > 0 {
		n := copy(p, c.replay)
		c.replay = c.replay[n:]
		return n, nil
	}
	n, err := c.f.Read(p)
	if n == 0 && err == nil {
		err = io.EOF // the host went away
	}
	if n > 0 {
		c.recMu.Lock()
		if c.recording {
			c.rec = append(c.rec, p[:n]...)
			if len(c.rec) > recordTail {
				c.rec = bytes.Clone(c.rec[len(c.rec)-recordTail:])
			}
		}
		c.recMu.Unlock()
	}
	return n, err
}

func (c *serialConn) Write(p []byte) (int, error) {
	if !c.enter() {
		return 0, net.ErrClosed
	}
	defer c.busy.Done()
	return c.f.Write(p)
}

func (c *serialConn) Close() error {
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
	close(c.done)
	return nil
}

func (c *serialConn) LocalAddr() net.Addr  { return portAddr(c.f.Name()) }
func (c *serialConn) RemoteAddr() net.Addr { return portAddr("host") }

// Deadlines apply to the port while the session holds it; Close clears
// them for the next session.
func (c *serialConn) SetDeadline(t time.Time) error {
	if !c.enter() {
		return net.ErrClosed
	}
	defer c.busy.Done()
	return c.f.SetDeadline(t)
}

func (c *serialConn) SetReadDeadline(t time.Time) error {
	if !c.enter() {
		return net.ErrClosed
	}
	defer c.busy.Done()
	return c.f.SetReadDeadline(t)
}

func (c *serialConn) SetWriteDeadline(t time.Time) error {
	if !c.enter() {
		return net.ErrClosed
	}
	defer c.busy.Done()
	return c.f.SetWriteDeadline(t)
}

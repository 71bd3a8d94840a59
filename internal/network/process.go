package network

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	"github.com/smolvm/smolvm/internal/cgroup"
	"github.com/smolvm/smolvm/internal/vmm"
)

// Files are what a network process keeps in its sandbox's directory.
type Files struct{ Dir string }

// Link is the socket QEMU's stream netdev connects to.
func (f Files) Link() string { return filepath.Join(f.Dir, "net.sock") }

// Control is the socket of the control API.
func (f Files) Control() string { return filepath.Join(f.Dir, "net.ctl") }

func (f Files) pidFile() string { return filepath.Join(f.Dir, "net.pid") }
func (f Files) logFile() string { return filepath.Join(f.Dir, "net.log") }

// marker identifies the process on its command line, beside its pid.
func (f Files) marker() string { return "--dir=" + f.Dir }

// All are the files a network process keeps in its directory.
func (f Files) All() []string {
	return []string{f.Link(), f.Control(), f.pidFile(), f.logFile()}
}

// ErrPathTooLong means the sandbox directory is too deep for its sockets.
var ErrPathTooLong = errors.New("socket path too long")

// attachTimeout is how long a network process waits for its VM to connect
// before giving up; a VM that never starts must not leave it behind.
const attachTimeout = 3 * time.Minute

// startTimeout bounds how long Start waits for the process to answer.
const startTimeout = 15 * time.Second

// Jail confines a network process beyond the system call filter it always
// installs itself.
type Jail struct {
	// UID, when not 0, is the user the process runs as: it then has no
	// capability but binding ports below 1024 (for forwards a user asks
	// for there), and no right to write in its directory. It needs none:
	// Start makes its two sockets and hands them down listening.
	UID int
	// Cgroups, when set, puts the process in a control group of its own
	// (see groupName) that bounds its memory and tasks.
	Cgroups *cgroup.Hierarchy
}

// netLimits bound a network process: its user-space TCP/IP stack holds
// a window's worth of buffers per connection.
var netLimits = cgroup.Limits{MemoryBytes: 256 << 20, Tasks: 256, CPUWeight: 100}

// groupName is the control group of the network process in dir, unique
// to the directory (sandbox ids repeat across data directories).
func groupName(dir string) string {
	sum := sha256.Sum256([]byte(dir))
	return "net-" + filepath.Base(dir) + "." + hex.EncodeToString(sum[:4])
}

// Start runs bin (cmd/smolvm-net) as the network process for the sandbox
// in dir and returns once it answers on its control socket. Like the VM,
// it outlives the caller: it ends when the VM disconnects, or after
// attachTimeout if none ever connects.
func Start(ctx context.Context, bin, dir string, p Policy, j Jail) (int, error) {
	s, err := Launch(ctx, bin, dir, p, j)
	if err != nil {
		return 0, err
	}
	if err := s.Ready(ctx); err != nil {
		return 0, err
	}
	return s.PID, nil
}

// Started is a network process launched and perhaps not answering yet.
// Its link socket listens from the moment Launch returns (it is made
// there), so a VM may connect to it at once: the connection waits in the
// socket's queue while the process starts.
type Started struct {
	PID    int
	dir    string
	cmd    *exec.Cmd
	exited chan error
	group  *cgroup.Group
}

// Launch starts the network process for the sandbox in dir, with policy p,
// and returns once it runs; Ready waits until it answers.
func Launch(ctx context.Context, bin, dir string, p Policy, j Jail) (*Started, error) {
	uid := j.UID
	f := Files{Dir: dir}
	// sun_path holds 107 bytes and a NUL.
	if len(f.Link()) > 107 || len(f.Control()) > 107 {
		return nil, fmt.Errorf("socket path %s is longer than 107 bytes: use a shorter data directory (SMOLVM_DATA_DIR): %w", f.Link(), ErrPathTooLong)
	}
	Stop(ctx, dir)
	for _, s := range []string{f.Link(), f.Control(), f.pidFile()} {
		os.Remove(s)
	}
	pj, err := json.Marshal(p)
	if err != nil {
		return nil, err
	}
	logf, err := os.OpenFile(f.logFile(), os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o644)
	if err != nil {
		return nil, fmt.Errorf("network log: %w", err)
	}
	defer logf.Close()
	link, err := listenUnix(f.Link())
	if err != nil {
		return nil, err
	}
	defer link.Close()
	ctl, err := listenUnix(f.Control())
	if err != nil {
		return nil, err
	}
	defer ctl.Close()
	var files []*os.File
	for _, l := range []*net.UnixListener{link, ctl} {
		// The process listens on them now; closing this copy must leave
		// the socket file.
		l.SetUnlinkOnClose(false)
		lf, err := l.File()
		if err != nil {
			return nil, fmt.Errorf("network sockets: %w", err)
		}
		defer lf.Close()
		files = append(files, lf)
	}
	args := []string{f.marker(), "--policy=" + string(pj), "--inherited"}
	if uid != 0 {
		args = append(args, "--jail")
	}
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.ExtraFiles = files // fds 3 (the link) and 4 (control)
	if uid != 0 {
		// The binary may sit where that user cannot reach (under a home
		// of mode 0700): it is opened here and run through the magic link
		// of its descriptor, as fexecve does.
		bf, err := os.Open(bin)
		if err != nil {
			return nil, fmt.Errorf("network process %s: %w", bin, err)
		}
		defer bf.Close()
		cmd.ExtraFiles = append(cmd.ExtraFiles, bf)
		cmd.Path = "/proc/self/fd/" + strconv.Itoa(2+len(cmd.ExtraFiles))
	}
	// A session of its own: a Ctrl-C meant for the caller must not take
	// the network away from a VM that outlives it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if uid != 0 {
		cmd.SysProcAttr.Credential = &syscall.Credential{Uid: uint32(uid), Gid: uint32(uid), NoSetGroups: true}
		// A mount namespace of its own, and CAP_SYS_ADMIN only until it
		// has made its root there (enterJail).
		cmd.SysProcAttr.Unshareflags = syscall.CLONE_NEWNS
		cmd.SysProcAttr.AmbientCaps = []uintptr{unix.CAP_NET_BIND_SERVICE, unix.CAP_SYS_ADMIN}
	}
	var group *cgroup.Group
	if j.Cgroups != nil {
		g, err := cgroup.New(*j.Cgroups, groupName(dir), netLimits)
		if err != nil {
			return nil, fmt.Errorf("start network process: %w", err)
		}
		group = &g
	}
	if err := cmd.Start(); err != nil {
		if group != nil {
			err = errors.Join(err, group.Remove())
		}
		return nil, fmt.Errorf("start network process %s: %w", bin, err)
	}
	pid := cmd.Process.Pid
	if group != nil {
		if err := group.Add(pid); err != nil {
			cmd.Process.Kill()
			cmd.Wait()
			return nil, errors.Join(fmt.Errorf("start network process: %w", err), group.Remove())
		}
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }() // reaps it while the caller lives
	if err := os.WriteFile(f.pidFile(), []byte(strconv.Itoa(pid)+"\n"), 0o644); err != nil {
		cmd.Process.Kill()
		<-exited
		return nil, errors.Join(err, dropStarted(ctx, dir, group))
	}
	return &Started{PID: pid, dir: dir, cmd: cmd, exited: exited, group: group}, nil
}

// Ready waits until the process answers on its control socket. A process
// that exits first, or does not answer within startTimeout, is ended and
// its control group removed.
func (s *Started) Ready(ctx context.Context) error {
	f := Files{Dir: s.dir}
	c := Dial(f.Control())
	sctx, cancel := context.WithTimeout(ctx, startTimeout)
	defer cancel()
	for {
		// The socket listens from the start (it is made here), so a
		// process that died leaves a request unanswered: each try is
		// short, and a death is noticed between tries.
		actx, cancel := context.WithTimeout(sctx, time.Second)
		_, err := c.Status(actx)
		cancel()
		if err == nil {
			return nil
		}
		select {
		case err := <-s.exited:
			return errors.Join(fmt.Errorf("network process exited at start (%v): %s", err, tail(f.logFile())), dropStarted(ctx, s.dir, s.group))
		case <-sctx.Done():
			s.cmd.Process.Kill()
			<-s.exited
			return errors.Join(fmt.Errorf("network process did not answer within %s: %s", startTimeout, tail(f.logFile())), dropStarted(ctx, s.dir, s.group))
		case <-time.After(5 * time.Millisecond):
		}
	}
}

// Stop ends the network process of the sandbox in dir, if one runs, and
// removes its control group.
func Stop(ctx context.Context, dir string) error {
	f := Files{Dir: dir}
	b, err := os.ReadFile(f.pidFile())
	if err != nil {
		return nil
	}
	pid, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	if err := vmm.KillProcess(ctx, pid, f.marker()); err != nil {
		return err
	}
	return dropGroup(ctx, dir)
}

// dropStarted removes the group Start made for a process that has ended.
func dropStarted(ctx context.Context, dir string, group *cgroup.Group) error {
	if group == nil {
		return nil
	}
	return dropGroup(context.WithoutCancel(ctx), dir)
}

// dropGroup removes the control group of dir's network process, once the
// kernel has let go of it (a moment after its last task is reaped); one
// still busy after a few seconds is left to the sweep of empty groups.
func dropGroup(ctx context.Context, dir string) error {
	h, err := cgroup.Detect(cgroup.Root)
	if err != nil {
		return nil
	}
	g := cgroup.Open(h, groupName(dir))
	deadline := time.Now().Add(5 * time.Second)
	for {
		err := g.Remove()
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			slog.Warn("the control group of an ended network process is still busy; the next VM start sweeps it", "dir", dir, "err", err)
			return nil
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// Running reports whether the sandbox in dir has a live network process.
func Running(dir string) bool {
	f := Files{Dir: dir}
	b, err := os.ReadFile(f.pidFile())
	if err != nil {
		return false
	}
	pid, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	return vmm.ProcessAlive(pid, f.marker())
}

func tail(path string) string {
	b, _ := os.ReadFile(path)
	s := strings.TrimSpace(string(b))
	if len(s) > 2000 {
		s = s[len(s)-2000:]
	}
	if s == "" {
		return "(no output)"
	}
	return s
}

// Main is the network process: it serves the sandbox in dir until its VM
// disconnects. args are the process's arguments after its name.
func Main(args []string) error {
	var dir, policy string
	var jailed bool
	for _, a := range args {
		switch {
		// Start hands the sockets down; the flag says so on the command
		// line, which ps shows.
		case a == "--inherited":
		case a == "--jail":
			jailed = true
		case strings.HasPrefix(a, "--dir="):
			dir = strings.TrimPrefix(a, "--dir=")
		case strings.HasPrefix(a, "--policy="):
			policy = strings.TrimPrefix(a, "--policy=")
		default:
			return fmt.Errorf("unknown argument %q (usage: smolvm-net --dir=DIR --policy=JSON)", a)
		}
	}
	if dir == "" {
		return errors.New("usage: smolvm-net --dir=DIR --policy=JSON")
	}
	var p Policy
	if policy != "" {
		if err := json.Unmarshal([]byte(policy), &p); err != nil {
			return fmt.Errorf("--policy: %w", err)
		}
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	// The guest can provoke log lines (failing UDP flows, say); a capped
	// log keeps it from filling the host's disk through them.
	w := &cappedWriter{w: os.Stderr, left: maxLog}
	logrus.SetOutput(w)
	logger := log.New(w, "smolvm-net: ", log.LstdFlags)
	link, err := net.FileListener(os.NewFile(3, "link"))
	if err != nil {
		return fmt.Errorf("the link socket handed down on fd 3 (smolvm-net is started by smolvm, which makes its sockets): %w", err)
	}
	ctl, err := net.FileListener(os.NewFile(4, "control"))
	if err != nil {
		return fmt.Errorf("the control socket handed down on fd 4: %w", err)
	}
	ul, ok := link.(*net.UnixListener)
	if !ok {
		return fmt.Errorf("the link socket handed down is a %T, not a unix socket", link)
	}
	// Everything it needs from the host is open: from here on it sees
	// only the host's /etc, and may make none of the system calls an
	// escape would want.
	if jailed {
		if err := enterJail(); err != nil {
			return err
		}
	}
	if err := restrict(); err != nil {
		return err
	}
	return serve(ctx, p, logger, ul, ctl)
}

// maxLog is how much one network process writes to its log.
const maxLog = 1 << 20

type cappedWriter struct {
	mu   sync.Mutex
	w    io.Writer
	left int64
}

func (c *cappedWriter) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	switch {
	case c.left <= 0:
	case int64(len(p)) > c.left:
		c.w.Write([]byte("smolvm-net: log limit reached; further lines are dropped\n"))
		c.left = 0
	default:
		c.left -= int64(len(p))
		c.w.Write(p)
	}
	return len(p), nil
}

// serve runs the network on listeners already made: the control API on
// ctl, then the VM's link, until the VM disconnects or ctx ends.
func serve(ctx context.Context, p Policy, logger *log.Logger, link *net.UnixListener, ctl net.Listener) error {
	defer link.Close()
	defer ctl.Close()
	n, err := New(p, Options{Logger: logger})
	if err != nil {
		return err
	}
	defer n.Close()
	srv := &http.Server{Handler: n.Handler(), ReadHeaderTimeout: 10 * time.Second}
	go srv.Serve(ctl)
	defer srv.Close()

	link.SetDeadline(time.Now().Add(attachTimeout))
	conns := make(chan net.Conn, 1)
	go func() {
		c, err := link.Accept()
		if err != nil {
			close(conns)
			return
		}
		conns <- c
	}()
	var conn net.Conn
	select {
	case <-ctx.Done():
		return nil
	case c, ok := <-conns:
		if !ok {
			return fmt.Errorf("no VM connected within %s", attachTimeout)
		}
		conn = c
	}
	// One VM per network: later connections are refused by closing.
	link.Close()
	go func() {
		<-ctx.Done()
		conn.Close()
	}()
	err = n.ServeQEMU(ctx, conn)
	if ctx.Err() != nil {
		return nil
	}
	logger.Printf("VM disconnected (%v); exiting", err)
	return nil
}

func listenUnix(path string) (*net.UnixListener, error) {
	os.Remove(path)
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	// Whoever can connect can change the policy or expose ports: the
	// owner only, whatever the umask.
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return nil, err
	}
	return ln, nil
}

//go:build linux

package cluster

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// stopGrace is how long a component gets to exit after SIGTERM before its
// process group is killed.
const stopGrace = 10 * time.Second

// process is one running control plane component whose output goes to a
// log file.
type process struct {
	name    string
	cmd     *exec.Cmd
	logPath string
	logFile *os.File

	done    chan struct{} // closed when the process has exited
	waitErr error         // valid once done is closed
}

// startProcess runs bin with args in its own process group, with stdout and
// stderr appended to logDir/name.log.
func startProcess(name, logDir, bin string, args []string) (*process, error) {
	logPath := filepath.Join(logDir, name+".log")
	logFile, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, fmt.Errorf("opening %s log: %w", name, err)
	}
	fmt.Fprintf(logFile, "+ %s %s\n", bin, strings.Join(args, " "))

	cmd := exec.Command(bin, args...)
	// An *os.File is handed to the child as is, so no copying goroutine has
	// to outlive the process.
	cmd.Stdout = logFile
	cmd.Stderr = logFile
	cmd.Env = componentEnv()
	cmd.SysProcAttr = &syscall.SysProcAttr{
		// Own process group, so stop can signal the component and anything
		// it spawned at once.
		Setpgid: true,
		// If the test binary dies without running cleanups (a panic, a
		// go test -timeout), take the component down with it rather than
		// leaving it bound to ports and the temp dir.
		Pdeathsig: syscall.SIGKILL,
	}
	if err := cmd.Start(); err != nil {
		logFile.Close()
		return nil, fmt.Errorf("starting %s: %w", name, err)
	}
	p := &process{
		name:    name,
		cmd:     cmd,
		logPath: logPath,
		logFile: logFile,
		done:    make(chan struct{}),
	}
	go func() {
		p.waitErr = cmd.Wait()
		close(p.done)
	}()
	return p, nil
}

// componentEnv is the environment for components: the caller's, minus
// variables that would point them at another cluster.
func componentEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if strings.HasPrefix(kv, "KUBECONFIG=") {
			continue
		}
		env = append(env, kv)
	}
	return env
}

// exited reports whether the process has exited, and how.
func (p *process) exited() (bool, error) {
	select {
	case <-p.done:
		return true, p.waitErr
	default:
		return false, nil
	}
}

// stop ends the process group, politely first, and closes the log.
func (p *process) stop() error {
	defer p.logFile.Close()
	if done, _ := p.exited(); done {
		return nil
	}
	pgid := p.cmd.Process.Pid
	if err := syscall.Kill(-pgid, syscall.SIGTERM); err != nil && !errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("terminating %s: %w", p.name, err)
	}
	select {
	case <-p.done:
		return nil
	case <-time.After(stopGrace):
	}
	if err := syscall.Kill(-pgid, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("killing %s: %w", p.name, err)
	}
	select {
	case <-p.done:
		return nil
	case <-time.After(stopGrace):
		return fmt.Errorf("%s (pid %d) did not exit after SIGKILL", p.name, pgid)
	}
}

// tail returns the last n lines of the process's log.
func (p *process) tail(n int) string {
	return tailFile(p.logPath, n)
}

// tailFile returns the last n lines of the file at path, reading at most the
// last 256 KiB so that huge logs stay cheap.
func tailFile(path string, n int) string {
	const maxRead = 256 << 10
	f, err := os.Open(path)
	if err != nil {
		return fmt.Sprintf("(cannot read %s: %v)", path, err)
	}
	defer f.Close()
	if st, err := f.Stat(); err == nil && st.Size() > maxRead {
		if _, err := f.Seek(st.Size()-maxRead, io.SeekStart); err != nil {
			return fmt.Sprintf("(cannot read %s: %v)", path, err)
		}
	}
	data, err := io.ReadAll(f)
	if err != nil {
		return fmt.Sprintf("(cannot read %s: %v)", path, err)
	}
	lines := bytes.Split(bytes.TrimRight(data, "\n"), []byte("\n"))
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return string(bytes.Join(lines, []byte("\n")))
}

// waitFor polls check until it succeeds, the timeout passes, ctx ends, or
// one of procs exits. The error then says which, with the tail of the
// relevant log, so that a failed start is diagnosable from the error alone.
func waitFor(ctx context.Context, what string, timeout time.Duration, procs []*process, check func(context.Context) error) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	tick := time.NewTicker(200 * time.Millisecond)
	defer tick.Stop()
	var last error
	for {
		for _, p := range procs {
			if done, err := p.exited(); done {
				return fmt.Errorf("%s exited (%v) while waiting for %s; last lines of %s:\n%s",
					p.name, err, what, p.logPath, p.tail(40))
			}
		}
		checkCtx, checkCancel := context.WithTimeout(ctx, 5*time.Second)
		last = check(checkCtx)
		checkCancel()
		if last == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			var logs strings.Builder
			for _, p := range procs {
				fmt.Fprintf(&logs, "\nlast lines of %s:\n%s", p.logPath, p.tail(40))
			}
			return fmt.Errorf("waiting for %s (timeout %s): %w; last check: %v%s",
				what, timeout, ctx.Err(), last, logs.String())
		case <-tick.C:
		}
	}
}

// freePorts reserves n distinct free TCP ports on 127.0.0.1. The listeners
// are held until all ports are chosen so the same port is never returned
// twice; another program can still take one before it is used, which is an
// accepted, rare flake.
func freePorts(n int) ([]int, error) {
	ports := make([]int, 0, n)
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, fmt.Errorf("reserving a port on 127.0.0.1: %w", err)
		}
		defer l.Close()
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

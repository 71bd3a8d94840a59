package agent

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/smolvm/smolvm/internal/agent/wire"
)

const defaultPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// drainGrace is how long output is still collected after the command exits:
// a background child that inherited stdout would otherwise hold the command
// open until its timeout.
const drainGrace = 200 * time.Millisecond

// frameWriter serialises frames from the stdout and stderr pumps onto one
// stream.
type frameWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (f *frameWriter) frame(typ byte, p []byte) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	return wire.WriteFrame(f.w, typ, p)
}

func (a *agent) exec(stream io.ReadWriteCloser, req *wire.Request) {
	fw := &frameWriter{w: stream}
	exit := a.run(stream, fw, req)
	b, _ := json.Marshal(exit)
	fw.frame(wire.FrameExit, b)
}

func (a *agent) run(stream io.Reader, fw *frameWriter, req *wire.Request) wire.Exit {
	argv, err := a.argv(req)
	if err != nil {
		return wire.Exit{Error: err.Error()}
	}
	acc, err := lookupUser(req.User)
	if err != nil {
		fw.frame(wire.FrameStderr, []byte("smolvm: "+err.Error()+"\n"))
		return wire.Exit{ExitCode: 126}
	}
	env := a.env(acc, req.Env)
	path, code, msg := lookPath(argv[0], env)
	if code != 0 {
		fw.frame(wire.FrameStderr, []byte(msg))
		return wire.Exit{ExitCode: code}
	}
	dir := req.Dir
	if dir == "" {
		dir = acc.home
	}
	if st, err := os.Stat(dir); err != nil || !st.IsDir() {
		dir = "/"
	}
	outR, outW, err := os.Pipe()
	if err != nil {
		return wire.Exit{Error: fmt.Sprintf("pipe: %v", err)}
	}
	errR, errW, err := os.Pipe()
	if err != nil {
		outR.Close()
		outW.Close()
		return wire.Exit{Error: fmt.Sprintf("pipe: %v", err)}
	}
	devNull, err := os.Open(os.DevNull)
	if err != nil {
		outR.Close()
		outW.Close()
		errR.Close()
		errW.Close()
		return wire.Exit{Error: fmt.Sprintf("open %s: %v", os.DevNull, err)}
	}
	attr := &syscall.ProcAttr{
		Dir:   dir,
		Env:   env,
		Files: []uintptr{devNull.Fd(), outW.Fd(), errW.Fd()},
		// Its own session makes the pid a process group id, so a timeout
		// can kill everything the command started.
		Sys: &syscall.SysProcAttr{Setsid: true},
	}
	if acc.uid != 0 || acc.gid != 0 {
		attr.Sys.Credential = &syscall.Credential{Uid: acc.uid, Gid: acc.gid, NoSetGroups: true}
	}
	pid, done, err := a.reaper.start(path, argv, attr)
	devNull.Close()
	outW.Close()
	errW.Close()
	if err != nil {
		outR.Close()
		errR.Close()
		code := 126
		if errors.Is(err, syscall.ENOENT) {
			code = 127
		}
		fw.frame(wire.FrameStderr, []byte(fmt.Sprintf("smolvm: %s: %v\n", argv[0], err)))
		return wire.Exit{ExitCode: code}
	}

	var pumps sync.WaitGroup
	var exited atomic.Bool
	pump := func(r *os.File, typ byte) {
		defer pumps.Done()
		defer r.Close()
		buf := make([]byte, 64<<10)
		for {
			n, err := r.Read(buf)
			if n > 0 {
				if fw.frame(typ, buf[:n]) != nil {
					return
				}
				if exited.Load() {
					// Sending may have been slow; the grace
					// counts from the last delivered chunk.
					r.SetReadDeadline(time.Now().Add(drainGrace))
				}
			}
			if err != nil {
				return
			}
		}
	}
	pumps.Add(2)
	go pump(outR, wire.FrameStdout)
	go pump(errR, wire.FrameStderr)

	// The host closes its side of the stream to cancel.
	cancelled := make(chan struct{})
	go func() {
		io.Copy(io.Discard, stream)
		close(cancelled)
	}()
	var timeout <-chan time.Time
	if req.TimeoutMS > 0 {
		t := time.NewTimer(time.Duration(req.TimeoutMS) * time.Millisecond)
		defer t.Stop()
		timeout = t.C
	}

	var ws unix.WaitStatus
	timedOut := false
	select {
	case ws = <-done:
	case <-timeout:
		timedOut = true
		unix.Kill(-pid, unix.SIGKILL)
		ws = <-done
	case <-cancelled:
		unix.Kill(-pid, unix.SIGKILL)
		ws = <-done
	}
	// Output already written is in the pipes; give it a moment to arrive,
	// then stop waiting on descendants that still hold the pipes open.
	exited.Store(true)
	deadline := time.Now().Add(drainGrace)
	outR.SetReadDeadline(deadline)
	errR.SetReadDeadline(deadline)
	pumps.Wait()

	exit := wire.Exit{TimedOut: timedOut}
	switch {
	case ws.Exited():
		exit.ExitCode = ws.ExitStatus()
	case ws.Signaled():
		exit.Signal = int(ws.Signal())
		exit.ExitCode = 128 + int(ws.Signal())
	}
	return exit
}

func (a *agent) argv(req *wire.Request) ([]string, error) {
	if req.Login != "" {
		sh := "/bin/sh"
		if _, err := os.Stat("/bin/bash"); err == nil {
			sh = "/bin/bash"
		}
		return []string{sh, "-lc", req.Login}, nil
	}
	if len(req.Argv) == 0 || req.Argv[0] == "" {
		return nil, errors.New("empty command")
	}
	return req.Argv, nil
}

// env is the command's environment: defaults for the account, then extra
// (the image's and the request's, in that order), a later KEY replacing an
// earlier one, since C's getenv would return the first.
func (a *agent) env(acc account, extra []string) []string {
	env := []string{
		"PATH=" + defaultPath,
		"HOME=" + acc.home,
		"USER=" + acc.name,
		"LOGNAME=" + acc.name,
		"SHELL=" + acc.shell,
		"TERM=xterm",
		"LANG=C.UTF-8",
		"HOSTNAME=" + a.hostname(),
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
				return "", 127, fmt.Sprintf("smolvm: %s: No such file or directory\n", name)
			}
			return "", 126, fmt.Sprintf("smolvm: %s: Permission denied\n", name)
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
	return "", 127, fmt.Sprintf("smolvm: %s: command not found\n", name)
}

package agent

import (
	"errors"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// reaper is the only caller of wait4 in the agent. As PID 1 the agent
// inherits every orphan; a second waiter (such as exec.Cmd.Wait) would race
// it for exit statuses, so commands are started through start, which
// registers the child before the reaper can see it exit.
//
// Outside a guest (a test serving the agent API in-process) the reaper
// waits for its own children only, one wait4 each, and leaves every other
// child of the process to whoever started it.
type reaper struct {
	all bool
	// group is the control group children start in, -1 for none.
	group   int
	logf    func(format string, args ...any)
	mu      sync.Mutex
	waiters map[int]chan unix.WaitStatus
	done    chan struct{}
	once    sync.Once
}

func newReaper(all bool, group string, logf func(string, ...any)) *reaper {
	r := &reaper{all: all, group: -1, logf: logf, waiters: make(map[int]chan unix.WaitStatus), done: make(chan struct{})}
	if fd, err := openGroup(group); err != nil {
		logf("commands run without limits: %v", err)
	} else {
		r.group = fd
	}
	if !all {
		return r
	}
	sigs := make(chan os.Signal, 64)
	signal.Notify(sigs, syscall.SIGCHLD)
	go func() {
		defer signal.Stop(sigs)
		// SIGCHLD coalesces; the ticker catches any exit a lost signal hid.
		t := time.NewTicker(time.Second)
		defer t.Stop()
		for {
			select {
			case <-sigs:
			case <-t.C:
			case <-r.done:
				return
			}
			r.reapAll()
		}
	}()
	return r
}

func (r *reaper) stop() { r.once.Do(func() { close(r.done) }) }

func (r *reaper) reapAll() {
	for {
		var ws unix.WaitStatus
		pid, err := unix.Wait4(-1, &ws, unix.WNOHANG, nil)
		if err == unix.EINTR {
			continue
		}
		if pid <= 0 || err != nil {
			return
		}
		r.mu.Lock()
		ch := r.waiters[pid]
		delete(r.waiters, pid)
		r.mu.Unlock()
		if ch != nil {
			ch <- ws
		}
	}
}

// start forks argv and returns a channel that receives its exit status.
func (r *reaper) start(argv0 string, argv []string, attr *syscall.ProcAttr) (int, <-chan unix.WaitStatus, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.group >= 0 {
		sys := *attr.Sys
		sys.UseCgroupFD, sys.CgroupFD = true, r.group
		a := *attr
		a.Sys = &sys
		attr = &a
	}
	pid, err := syscall.ForkExec(argv0, argv, attr)
	if err != nil && r.group >= 0 && (errors.Is(err, unix.ENOSYS) || errors.Is(err, unix.EINVAL) || errors.Is(err, unix.EOPNOTSUPP)) {
		// Perhaps a kernel without clone3 into a group: if the command
		// starts outside it, commands run without limits from now on.
		attr.Sys.UseCgroupFD = false
		if p, rerr := syscall.ForkExec(argv0, argv, attr); rerr == nil {
			r.logf("commands run without limits: starting in the command group failed: %v", err)
			unix.Close(r.group)
			r.group = -1
			pid, err = p, nil
		}
	}
	if err != nil {
		return 0, nil, err
	}
	ch := make(chan unix.WaitStatus, 1)
	if !r.all {
		go func() {
			var ws unix.WaitStatus
			for {
				_, err := unix.Wait4(pid, &ws, 0, nil)
				if err != unix.EINTR {
					break
				}
			}
			ch <- ws
		}()
		return pid, ch, nil
	}
	r.waiters[pid] = ch
	return pid, ch, nil
}

package agent

import (
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
	all     bool
	mu      sync.Mutex
	waiters map[int]chan unix.WaitStatus
	done    chan struct{}
	once    sync.Once
}

func newReaper(all bool) *reaper {
	r := &reaper{all: all, waiters: make(map[int]chan unix.WaitStatus), done: make(chan struct{})}
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
	pid, err := syscall.ForkExec(argv0, argv, attr)
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

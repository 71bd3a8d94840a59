package vmm

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// ProcessAlive reports whether pid runs and its command line contains
// marker, which guards against a recycled pid. A zombie counts as gone.
func ProcessAlive(pid int, marker string) bool {
	if pid <= 0 {
		return false
	}
	cmdline, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
	if err != nil || !bytes.Contains(cmdline, []byte(marker)) {
		return false
	}
	stat, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	// The state follows the parenthesised command name.
	if i := strings.LastIndexByte(string(stat), ')'); i >= 0 && i+2 < len(stat) {
		if s := stat[i+2]; s == 'Z' || s == 'X' {
			return false
		}
	}
	return true
}

// WaitGone polls until the process is gone or ctx ends.
func WaitGone(ctx context.Context, pid int, marker string) error {
	t := time.NewTicker(10 * time.Millisecond)
	defer t.Stop()
	for ProcessAlive(pid, marker) {
		select {
		case <-ctx.Done():
			return fmt.Errorf("process %d still running: %w", pid, ctx.Err())
		case <-t.C:
		}
	}
	return nil
}

// KillProcess sends SIGKILL to a process we may not be the parent of and
// waits until it is gone.
func KillProcess(ctx context.Context, pid int, marker string) error {
	if !ProcessAlive(pid, marker) {
		return nil
	}
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil && err != syscall.ESRCH {
		return fmt.Errorf("kill process %d: %w", pid, err)
	}
	return WaitGone(ctx, pid, marker)
}

// ProcessesWith returns the live processes whose command line contains
// marker: how a VMM is found when nothing recorded its pid.
func ProcessesWith(marker string) []int {
	var pids []int
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if ProcessAlive(pid, marker) {
			pids = append(pids, pid)
		}
	}
	return pids
}

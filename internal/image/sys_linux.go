package image

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// lockExclusive takes an exclusive flock on path, waiting while another
// process (or another open of the file in this one) holds it. waiting is
// called once if the lock is busy. flock cannot be interrupted by a context,
// so the wait polls.
func lockExclusive(ctx context.Context, path string, waiting func()) (unlock func(), err error) {
	// Read-only is enough for flock and works on a lock file another user made.
	f, err := os.OpenFile(path, os.O_RDONLY|os.O_CREATE, 0o644)
	if err != nil {
		return nil, err
	}
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	announced := false
	for {
		err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			return func() {
				_ = unix.Flock(int(f.Fd()), unix.LOCK_UN)
				f.Close()
			}, nil
		}
		if !errors.Is(err, unix.EWOULDBLOCK) && !errors.Is(err, unix.EINTR) {
			f.Close()
			return nil, fmt.Errorf("flock %s: %w", path, err)
		}
		if !announced {
			announced = true
			waiting()
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, ctx.Err()
		case <-tick.C:
		}
	}
}

// runIsolated runs the command newCmd makes in its own process group and
// mount namespace, so a cancelled build kills every process debootstrap
// started (dpkg in the chroot, its maintainer scripts) and the /proc, /sys and
// /dev mounts it makes in the target vanish with it instead of pinning the
// temp directory.
func runIsolated(newCmd func() *exec.Cmd) error {
	start := func(unshare bool) (*exec.Cmd, error) {
		cmd := newCmd()
		cmd.SysProcAttr = &syscall.SysProcAttr{
			Setpgid: true,
			// If smolvm itself dies, do not leave debootstrap running.
			Pdeathsig: syscall.SIGKILL,
		}
		if unshare {
			// Go makes the new namespace's mounts private before exec.
			cmd.SysProcAttr.Unshareflags = syscall.CLONE_NEWNS
		}
		cmd.Cancel = func() error {
			return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		}
		cmd.WaitDelay = 10 * time.Second
		return cmd, cmd.Start()
	}
	cmd, err := start(true)
	if err != nil && (errors.Is(err, syscall.EPERM) || errors.Is(err, syscall.EINVAL)) {
		// No permission for a mount namespace (some containers): run in the
		// host's, relying on removeTree to unmount what is left.
		cmd, err = start(false)
	}
	if err != nil {
		return err
	}
	return cmd.Wait()
}

// removeTree deletes dir after unmounting anything mounted below it. Deleting
// through a bind mount of the host's /dev would delete the host's device
// nodes, so a mount that will not go away stops the removal.
func removeTree(dir string) error {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return err
	}
	mounts, err := mountsBelow(abs)
	if err != nil {
		return err
	}
	// Deepest first.
	slices.SortFunc(mounts, func(a, b string) int { return len(b) - len(a) })
	for _, m := range mounts {
		if err := unix.Unmount(m, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
			return fmt.Errorf("unmount %s: %w", m, err)
		}
	}
	if left, err := mountsBelow(abs); err != nil {
		return err
	} else if len(left) > 0 {
		return fmt.Errorf("%s still has mounts (%s); not removing it", abs, strings.Join(left, ", "))
	}
	return os.RemoveAll(abs)
}

// mountsBelow lists the mount points at or under dir in this mount namespace.
func mountsBelow(dir string) ([]string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil, fmt.Errorf("read mounts: %w", err)
	}
	defer f.Close()
	var out []string
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 5 {
			continue
		}
		mp := unescapeMountPath(fields[4])
		if mp == dir || strings.HasPrefix(mp, dir+"/") {
			out = append(out, mp)
		}
	}
	return out, sc.Err()
}

// unescapeMountPath undoes mountinfo's octal escapes (\040 for a space).
func unescapeMountPath(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// fileIdentity is what tells, without reading it, that a file is unchanged.
func fileIdentity(fi fs.FileInfo) (identity, bool) {
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return identity{}, false
	}
	return identity{
		size:  fi.Size(),
		mtime: st.Mtim.Nano(),
		ctime: st.Ctim.Nano(),
		ino:   st.Ino,
		dev:   st.Dev,
	}, true
}

package sandbox

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/smolvm/smolvm/internal/store"
	"github.com/smolvm/smolvm/internal/vmm"
)

// lowSpace is how little free space on the data directory's filesystem
// makes a failure count as the host's disk being full even when the
// error itself does not say so: QEMU and other tools report it in words,
// and a build that failed has often removed what filled the disk.
const lowSpace = 32 << 20

// HostFull reports whether err comes from a filesystem out of space or
// quota: an errno in its chain, or SQLite's own report of it (which its
// driver gives only as text).
func HostFull(err error) bool {
	if err == nil {
		return false
	}
	return errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT) ||
		strings.Contains(err.Error(), "database or disk is full")
}

// storageError turns a failure that the data directory running out of
// space explains into a KindInsufficientStorage error that says so; any
// other error is returned as it is.
func (m *Manager) storageError(err error) error {
	if err == nil {
		return nil
	}
	if se, ok := AsError(err); ok && se.Kind != KindInternal && se.Kind != KindUpstream {
		return err // already says what went wrong
	}
	dir := m.opts.DataDir.Path()
	full, free := explainsFull(dir, err)
	if !full {
		return err
	}
	return &Error{Kind: KindInsufficientStorage, Code: "host_disk_full", Err: err,
		Message: fmt.Sprintf("the filesystem of smolvm's data directory %s is full (%d MiB free): free some space and try again", dir, max(free, 0)>>20)}
}

// roomToStart refuses a new sandbox while the data directory's filesystem
// has less than lowSpace free. Whether such a create failed used to depend
// on whether something it wrote found the last free block: a clone may
// well start, and then stop at its guest's first writes to its disk.
func (m *Manager) roomToStart() error {
	dir := m.opts.DataDir.Path()
	if free := freeSpace(dir); free >= 0 && free < lowSpace {
		return &Error{Kind: KindInsufficientStorage, Code: "host_disk_full",
			Message: fmt.Sprintf("the filesystem of smolvm's data directory %s is full (%d MiB free, less than the %d MiB a new sandbox needs): free some space and try again", dir, free>>20, lowSpace>>20)}
	}
	return nil
}

// explainsFull reports whether err is, or may well be, dir's filesystem
// running out of space, and what is free there (-1 if unknown).
func explainsFull(dir string, err error) (bool, int64) {
	free := freeSpace(dir)
	return HostFull(err) || (free >= 0 && free < lowSpace), free
}

// freeSpace is what is free on dir's filesystem for this process, or -1.
func freeSpace(dir string) int64 {
	var st unix.Statfs_t
	if unix.Statfs(dir, &st) != nil {
		return -1
	}
	return int64(st.Bavail) * st.Bsize
}

// unstall lets rec's VM go on if the host's full disk stopped it and
// there is space again. It reports whether the VM was stopped so, and
// returns a 507 while it must stay stopped.
func (l *launcher) unstall(ctx context.Context, rec store.Record) (bool, error) {
	drv, mach, err := l.machine(rec)
	if err != nil {
		return false, nil
	}
	st, ok := drv.(vmm.Staller)
	if !ok {
		return false, nil
	}
	qctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	stalled, err := st.Stalled(qctx, mach)
	if err != nil || !stalled {
		return false, nil
	}
	dir := l.opts.DataDir.Path()
	if free := freeSpace(dir); free >= 0 && free < lowSpace {
		return true, &Error{Kind: KindInsufficientStorage, Code: "host_disk_full",
			Message: fmt.Sprintf("sandbox %s stopped on a write to its disk because the filesystem of %s is full (%d MiB free); free some space and it goes on where it stopped", rec.ID, dir, max(free, 0)>>20)}
	}
	if err := st.Unstall(qctx, mach); err != nil {
		return true, fmt.Errorf("continue sandbox %s after its disk had no space: %w", rec.ID, err)
	}
	l.opts.Logger.Info("a sandbox stopped by the full host disk goes on", "sandbox", rec.ID)
	return true, nil
}

// unstallAll lets go on every running sandbox that the host's full disk
// stopped, once there is space: an idle sandbox gets no request that
// would do it.
func (m *Manager) unstallAll(ctx context.Context) {
	if free := freeSpace(m.opts.DataDir.Path()); free >= 0 && free < lowSpace {
		m.mu.Lock()
		m.sawFull = true
		m.mu.Unlock()
		return
	}
	m.mu.Lock()
	saw := m.sawFull
	m.sawFull = false
	m.mu.Unlock()
	if !saw {
		return
	}
	recs, err := m.store.List(ctx)
	if err != nil {
		return
	}
	for _, rec := range recs {
		if rec.Status == StatusRunning {
			if _, err := m.l.unstall(ctx, rec); err != nil {
				m.opts.Logger.Warn("a sandbox stopped by the full host disk", "sandbox", rec.ID, "err", err)
			}
		}
	}
}

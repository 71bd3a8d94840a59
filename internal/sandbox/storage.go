package sandbox

import (
	"errors"
	"fmt"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
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
	var st unix.Statfs_t
	free := int64(-1)
	if unix.Statfs(dir, &st) == nil {
		free = int64(st.Bavail) * st.Bsize
	}
	if !HostFull(err) && (free < 0 || free >= lowSpace) {
		return err
	}
	return &Error{Kind: KindInsufficientStorage, Code: "host_disk_full", Err: err,
		Message: fmt.Sprintf("the filesystem of smolvm's data directory %s is full (%d MiB free): free some space and try again", dir, max(free, 0)>>20)}
}

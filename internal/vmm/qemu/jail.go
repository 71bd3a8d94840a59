package qemu

import (
	"fmt"
	"os"
	"strconv"

	"golang.org/x/sys/unix"

	"github.com/smolvm/smolvm/internal/vmm"
)

// The jail without its launcher (launch.go), when smolvm-jail is not to be
// found or QEMU is not under /usr: QEMU drops root for a user of its own
// before the guest runs (-runas), with its sandbox directory as its root
// (-chroot), so a guest that escapes into QEMU is an unprivileged user,
// without capabilities and under QEMU's seccomp filter, that sees only
// that directory and can write nothing in it (the directory stays root's:
// QEMU opened every file it needs before it dropped root). No two running
// VMMs share a user, so one cannot signal or trace another; the exception
// is a VM sharing a user's directories, which runs as that user.

// jailArgs run QEMU as uid and gid with dir as its root, from just
// before the guest starts.
func jailArgs(uid, gid int, dir string) []string {
	return []string{"-runas", strconv.Itoa(uid) + ":" + strconv.Itoa(gid), "-chroot", dir}
}

// enterable lets the jail's group into dir, its root, and no one else but
// root (mode 0710: it may open what it has a name for, and list nothing),
// and gives the jail's user the disk, the one file a jailed QEMU opens
// again itself (a migration gives it up read-only, cont takes it back).
func enterable(dir, disk string, uid, gid int) error {
	if err := os.Chown(dir, 0, gid); err != nil {
		return fmt.Errorf("jail: %w", err)
	}
	if err := os.Chmod(dir, 0o710); err != nil {
		return fmt.Errorf("jail: %w", err)
	}
	if err := os.Chown(disk, uid, gid); err != nil {
		return fmt.Errorf("jail: give the disk to the jail's user: %w", err)
	}
	return nil
}

// sharesOwner is the one user (and that user's group, as the shares have
// it) who owns every shared directory, if it is not root.
func sharesOwner(mounts []vmm.Mount) (uid, gid int, ok bool) {
	for i, m := range mounts {
		var st unix.Stat_t
		if err := unix.Stat(m.HostPath, &st); err != nil {
			return 0, 0, false
		}
		if i == 0 {
			uid, gid = int(st.Uid), int(st.Gid)
		} else if int(st.Uid) != uid {
			return 0, 0, false
		}
	}
	return uid, gid, len(mounts) > 0 && uid != 0
}

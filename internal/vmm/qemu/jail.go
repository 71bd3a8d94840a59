package qemu

import (
	"fmt"
	"os"
	"strconv"
)

// The jail: each QEMU drops root for a user of its own before the guest
// runs (-runas), with its sandbox directory as its root (-chroot), so a
// guest that escapes into QEMU is an unprivileged user, without
// capabilities and under QEMU's seccomp filter, that sees only that
// directory and can write nothing in it (the directory stays root's:
// QEMU opened every file it needs before it dropped root). No two running
// VMMs share a user, so one cannot signal or trace another.

// jailArgs run QEMU as uid (and the group of the same number) with dir as
// its root, from just before the guest starts.
func jailArgs(uid int, dir string) []string {
	id := strconv.Itoa(uid)
	return []string{"-runas", id + ":" + id, "-chroot", dir}
}

// enterable lets the jail's user into dir, its root, and no one else but
// root (group uid, mode 0710: it may open what it has a name for, and list
// nothing), and gives it the disk, the one file a jailed QEMU opens again
// itself (a migration gives it up read-only, cont takes it back).
func enterable(dir, disk string, uid int) error {
	if err := os.Chown(dir, 0, uid); err != nil {
		return fmt.Errorf("jail: %w", err)
	}
	if err := os.Chmod(dir, 0o710); err != nil {
		return fmt.Errorf("jail: %w", err)
	}
	if err := os.Chown(disk, uid, uid); err != nil {
		return fmt.Errorf("jail: give the disk to the jail's user: %w", err)
	}
	return nil
}

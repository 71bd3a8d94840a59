package jail

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"syscall"

	"golang.org/x/sys/unix"
)

// What the VMM launchers (QEMU's qemu-launch, Firecracker's fc-launch)
// share: each is started as root in namespaces of its own, waits until
// the driver has put it in its control group, and drops root before it
// executes the VMM.

// WaitGate reads the byte the driver writes on the pipe fd once the
// process is in its control group; fd 0 is no gate.
func WaitGate(fd int) error {
	if fd <= 0 {
		return nil
	}
	gate := os.NewFile(uintptr(fd), "gate")
	n, err := gate.Read(make([]byte, 1))
	gate.Close()
	if n != 1 {
		return fmt.Errorf("the driver did not let it start: %v", err)
	}
	return nil
}

// OwnNamespace checks that this process has a namespace of kind ("mnt",
// "net") other than its parent's, the host's; command names the launcher
// in the error.
func OwnNamespace(command, kind string) error {
	var self, parent unix.Stat_t
	if err := unix.Stat("/proc/self/ns/"+kind, &self); err != nil {
		return err
	}
	if err := unix.Stat("/proc/"+strconv.Itoa(os.Getppid())+"/ns/"+kind, &parent); err != nil {
		return err
	}
	if self.Ino == parent.Ino && self.Dev == parent.Dev {
		return fmt.Errorf("%s must start in a %s namespace of its own", command, kind)
	}
	return nil
}

// DropTo makes the whole process, every thread, uid (user and group) with
// no supplementary groups, which leaves it no capabilities.
func DropTo(uid int) error { return DropToGroup(uid, uid) }

// DropToGroup makes the whole process, every thread, user uid and group
// gid with no supplementary groups, which leaves it no capabilities.
func DropToGroup(uid, gid int) error {
	if err := syscall.Setgroups(nil); err != nil {
		return fmt.Errorf("drop groups: %w", err)
	}
	if err := syscall.Setgid(gid); err != nil {
		return fmt.Errorf("setgid %d: %w", gid, err)
	}
	if err := syscall.Setuid(uid); err != nil {
		return fmt.Errorf("setuid %d: %w", uid, err)
	}
	return nil
}

// GiveBack makes root the owner again of paths, which a jail's user was
// given to run a VM; those missing are skipped. The user must not have
// been able to create these names (their directories stayed root's), so
// none is its link.
func GiveBack(paths ...string) error {
	var errs []error
	for _, p := range paths {
		if err := os.Lchown(p, 0, 0); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("give %s back to root: %w", p, err))
		}
	}
	return errors.Join(errs...)
}

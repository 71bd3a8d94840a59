package network

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The network process's filesystem jail. Started by root as a user of its
// own, in a mount namespace of its own (Start asks for both), it keeps
// CAP_SYS_ADMIN just long enough to make its root a small read-only tmpfs
// that holds the host's /etc, read-only, and nothing else: the resolver
// reads resolv.conf, hosts and nsswitch.conf as they change. It then gives
// up every capability but CAP_NET_BIND_SERVICE, on every thread, before it
// reads a byte from the guest. What the process needs beyond that (its
// sockets, its log) it was handed as descriptors.

// jailRoot is where the new root is put together: any directory the host
// has will do, as the tmpfs covers it in this namespace only.
const jailRoot = "/tmp"

// enterJail builds the jail's root, moves into it and drops CAP_SYS_ADMIN.
func enterJail() error {
	if err := unix.Mount("tmpfs", jailRoot, "tmpfs", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, "mode=0755,size=64k"); err != nil {
		return fmt.Errorf("jail: mount its root: %w", err)
	}
	binds := []string{"/etc"}
	// resolv.conf is often a link into /run (systemd-resolved,
	// resolvconf): the directory it leads to comes too.
	if target, err := filepath.EvalSymlinks("/etc/resolv.conf"); err == nil {
		if dir := filepath.Dir(target); dir != "/etc" && !strings.HasPrefix(dir, "/etc/") && dir != "/" {
			binds = append(binds, dir)
		}
	}
	for _, src := range binds {
		if err := bindReadOnly(src, filepath.Join(jailRoot, src)); err != nil {
			return err
		}
	}
	old := filepath.Join(jailRoot, ".old")
	if err := os.Mkdir(old, 0o700); err != nil {
		return fmt.Errorf("jail: %w", err)
	}
	if err := unix.PivotRoot(jailRoot, old); err != nil {
		return fmt.Errorf("jail: pivot_root: %w", err)
	}
	if err := unix.Chdir("/"); err != nil {
		return fmt.Errorf("jail: %w", err)
	}
	if err := unix.Unmount("/.old", unix.MNT_DETACH); err != nil {
		return fmt.Errorf("jail: let go of the host's root: %w", err)
	}
	if err := os.Remove("/.old"); err != nil {
		return fmt.Errorf("jail: %w", err)
	}
	if err := unix.Mount("", "/", "", unix.MS_REMOUNT|unix.MS_RDONLY|unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, ""); err != nil {
		return fmt.Errorf("jail: make its root read-only: %w", err)
	}
	return keepOnly(unix.CAP_NET_BIND_SERVICE)
}

// bindReadOnly binds src at dst (made first), read-only.
func bindReadOnly(src, dst string) error {
	if err := os.MkdirAll(dst, 0o755); err != nil {
		return fmt.Errorf("jail: %w", err)
	}
	if err := unix.Mount(src, dst, "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
		return fmt.Errorf("jail: bind %s: %w", src, err)
	}
	// A bind takes its flags only from a remount.
	if err := unix.Mount("", dst, "", unix.MS_BIND|unix.MS_REMOUNT|unix.MS_RDONLY|unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, ""); err != nil {
		return fmt.Errorf("jail: make %s read-only: %w", dst, err)
	}
	return nil
}

// keepOnly sets the permitted, effective and inheritable capabilities of
// every thread of the process to the one capability c (the ambient set
// follows, as it may hold only what is both permitted and inheritable).
// Capabilities belong to threads, and the Go runtime has several by now:
// a capset on one thread would leave the others as they were.
func keepOnly(c int) error {
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	bit := uint32(1) << (uint(c) % 32)
	data[c/32] = unix.CapUserData{Effective: bit, Permitted: bit, Inheritable: bit}
	_, _, errno := syscall.AllThreadsSyscall(unix.SYS_CAPSET, uintptr(unsafe.Pointer(&hdr)), uintptr(unsafe.Pointer(&data[0])), 0)
	if errno != 0 {
		err := error(errno)
		if errors.Is(errno, syscall.ENOTSUP) {
			err = fmt.Errorf("%w (a binary built with cgo cannot; build it with CGO_ENABLED=0)", errno)
		}
		return fmt.Errorf("jail: drop capabilities: %w", err)
	}
	return nil
}

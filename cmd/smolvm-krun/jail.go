package main

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/smolvm/smolvm/internal/jail"
	"github.com/smolvm/smolvm/internal/vmm/libkrun/krunconf"
)

// no_new_privs belongs to a thread, and libkrun's threads are started
// from the one that calls krun_start_enter: main's, kept on one thread.
func init() { runtime.LockOSThread() }

// enterJail moves the helper into a root of its own (jail.Root) and drops
// root for cfg.Jail.UID, before libkrun is loaded, so that nothing libkrun
// or a guest that escapes into it does runs as root or sees the host's
// files. The root holds the host's libraries read-only (the helper is
// linked dynamically, and libkrun and libkrunfw are found by the loader),
// libPath when it is elsewhere, the kernel and initramfs read-only, the
// sandbox's directory read-write, and a /dev/kvm of the user's own.
func enterJail(cfg krunconf.Config, libPath string) error {
	j := cfg.Jail
	if os.Geteuid() != 0 {
		return errors.New("a jailed helper must start as root")
	}
	var root jail.Root
	defer root.Close()
	if err := root.HostLibraries(); err != nil {
		return err
	}
	ro := []string{cfg.Kernel}
	if cfg.Initrd != "" {
		ro = append(ro, cfg.Initrd)
	}
	if filepath.IsAbs(libPath) && !strings.HasPrefix(libPath, "/usr/") {
		ro = append(ro, libPath)
	}
	for _, p := range ro {
		if err := root.Bind(p, p, false); err != nil {
			return err
		}
	}
	if cfg.Net != nil && !within(cfg.Net.Socket, j.Dir) {
		// Connecting needs no write access to the mount.
		if err := root.Bind(cfg.Net.Socket, cfg.Net.Socket, false); err != nil {
			return err
		}
	}
	if err := root.Bind(j.Dir, j.Dir, true); err != nil {
		return err
	}
	devs := append(jail.StandardDevices(), jail.Device{Name: "kvm", Owner: j.UID, Optional: true})
	if err := root.Enter("smolvm-krun", devs); err != nil {
		return fmt.Errorf("jail: %w", err)
	}
	if err := os.Chdir(j.Dir); err != nil {
		return fmt.Errorf("jail: %w", err)
	}
	if err := jail.DropTo(j.UID); err != nil {
		return fmt.Errorf("jail: %w", err)
	}
	if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
		return fmt.Errorf("jail: no_new_privs: %w", err)
	}
	return nil
}

// within reports whether path is dir or under it.
func within(path, dir string) bool {
	rel, err := filepath.Rel(dir, path)
	return err == nil && rel != ".." && !strings.HasPrefix(rel, "../")
}

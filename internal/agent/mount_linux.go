package agent

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/smolvm/smolvm/internal/agent/wire"
)

// shareOptions mount a host directory shared over virtio-9p. 512000 is
// the largest msize the virtio transport takes (125 pages of ring
// descriptors); fewer, larger messages make big reads cheaper.
const shareOptions = "trans=virtio,version=9p2000.L,msize=512000"

// shareWait bounds the wait for a share's device to show up. Its driver
// was loaded with the others and probes at once, so this is a margin.
const shareWait = 2 * time.Second

// mountShares mounts the host directories the command line names. A
// share that cannot be mounted must not keep the agent from serving: it
// is logged on the console, and the host sees it missing.
func mountShares(p bootParams) {
	for _, err := range p.mountErr {
		logf("mount: %v", err)
	}
	if len(p.mounts) == 0 {
		return
	}
	if !has9p() {
		logf("mount: this kernel has no 9p filesystem; %d shares not mounted", len(p.mounts))
		return
	}
	for _, m := range p.mounts {
		if err := mountShare(m); err != nil {
			logf("mount share %s at %s: %v", m.Tag, m.Path, err)
		}
	}
}

func mountShare(m wire.Mount) error {
	if err := waitForTag(m.Tag, shareWait); err != nil {
		return err
	}
	if err := os.MkdirAll(m.Path, 0o755); err != nil {
		return err
	}
	var flags uintptr
	if m.ReadOnly {
		flags |= unix.MS_RDONLY
	}
	if err := unix.Mount(m.Tag, m.Path, "9p", flags, shareOptions); err != nil {
		return fmt.Errorf("mount: %w", err)
	}
	return nil
}

// has9p reports whether the kernel knows the 9p filesystem (its modules
// were loaded from the initramfs, or it is built in).
func has9p() bool {
	b, err := os.ReadFile("/proc/filesystems")
	if err != nil {
		return true // let the mount say what is wrong
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) > 0 && f[len(f)-1] == "9p" {
			return true
		}
	}
	return false
}

// waitForTag waits until a virtio 9p device with the mount tag exists.
func waitForTag(tag string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		files, _ := filepath.Glob("/sys/bus/virtio/drivers/9pnet_virtio/*/mount_tag")
		for _, f := range files {
			// The attribute is the tag and a NUL.
			if b, err := os.ReadFile(f); err == nil && string(bytes.TrimRight(b, "\x00\n")) == tag {
				return nil
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("no 9p device with tag %q appeared within %s", tag, timeout)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

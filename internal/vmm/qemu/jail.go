package qemu

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
)

// The jail: each QEMU drops root for a user of its own before the guest
// runs (-runas), with its sandbox directory as its root (-chroot), so a
// guest that escapes into QEMU is an unprivileged user, without
// capabilities and under QEMU's seccomp filter, that sees only that
// directory and can write nothing in it (the directory stays root's:
// QEMU opened every file it needs before it dropped root). No two running
// VMMs share a user, so one cannot signal or trace another.

// jailUIDBase and jailUIDs are the users jailed VMMs run as, far above
// the users and subordinate id ranges a host hands out.
const (
	jailUIDBase = 2_100_000_000
	jailUIDs    = 1 << 20
)

// jailer hands out jail users.
type jailer struct {
	mu      sync.Mutex
	pending map[int]bool // allocated, QEMU not yet running as it
	next    int
}

func newJailer() *jailer { return &jailer{pending: map[int]bool{}} }

// allocate picks a jail user no running process has, nor another start
// under way in this process. release is called once QEMU runs as it (or
// failed to start).
func (j *jailer) allocate() (uid int, release func(), err error) {
	used, err := jailUsersInUse()
	if err != nil {
		return 0, nil, err
	}
	j.mu.Lock()
	defer j.mu.Unlock()
	for range jailUIDs {
		uid := jailUIDBase + j.next
		j.next = (j.next + 1) % jailUIDs
		if used[uid] || j.pending[uid] {
			continue
		}
		j.pending[uid] = true
		return uid, func() {
			j.mu.Lock()
			delete(j.pending, uid)
			j.mu.Unlock()
		}, nil
	}
	return 0, nil, fmt.Errorf("all %d jail users are in use", jailUIDs)
}

// jailUsersInUse are the jail users of the processes running now: the
// VMMs of this and every other smolvm on the host.
func jailUsersInUse() (map[int]bool, error) {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil, fmt.Errorf("list processes for the jail: %w", err)
	}
	used := map[int]bool{}
	for _, e := range ents {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "status"))
		if err != nil {
			continue // gone meanwhile
		}
		for _, line := range strings.Split(string(b), "\n") {
			if rest, ok := strings.CutPrefix(line, "Uid:"); ok {
				if f := strings.Fields(rest); len(f) > 0 {
					if uid, err := strconv.Atoi(f[0]); err == nil && uid >= jailUIDBase && uid < jailUIDBase+jailUIDs {
						used[uid] = true
					}
				}
				break
			}
		}
	}
	return used, nil
}

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

// Package jail hands out the unprivileged users that smolvm's helper
// processes (each VMM, each network process) drop to, one per process, so
// that no two of them can signal or trace each other.
package jail

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
)

// The ranges handed out, far above the users and subordinate id ranges a
// host gives out (those stay below 2^31 too, but in the low millions).
const (
	VMMBase     = 2_100_000_000
	NetworkBase = VMMBase + PerRange
	PerRange    = 1 << 20
)

// Users hands out users from one range.
type Users struct {
	base, count int

	mu      sync.Mutex
	pending map[int]bool // handed out, the process not yet running as it
	next    int
}

// NewUsers hands out users from [base, base+count).
func NewUsers(base, count int) *Users {
	return &Users{base: base, count: count, pending: map[int]bool{}}
}

// Allocate picks a user of the range that no running process has, nor
// another start under way through u. release is called once the process
// runs as it (or failed to start).
func (u *Users) Allocate() (uid int, release func(), err error) {
	used, err := inUse(u.base, u.count)
	if err != nil {
		return 0, nil, err
	}
	u.mu.Lock()
	defer u.mu.Unlock()
	for range u.count {
		uid := u.base + u.next
		u.next = (u.next + 1) % u.count
		if used[uid] || u.pending[uid] {
			continue
		}
		u.pending[uid] = true
		return uid, func() {
			u.mu.Lock()
			delete(u.pending, uid)
			u.mu.Unlock()
		}, nil
	}
	return 0, nil, fmt.Errorf("all %d jail users from %d are in use", u.count, u.base)
}

// inUse are the users in [base, base+count) of the processes running now,
// this smolvm's and every other's on the host.
func inUse(base, count int) (map[int]bool, error) {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil, fmt.Errorf("list processes for the jail: %w", err)
	}
	used := map[int]bool{}
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if uid, ok := ProcessUID(pid); ok && uid >= base && uid < base+count {
			used[uid] = true
		}
	}
	return used, nil
}

// ProcessUID is the real user pid runs as; ok is false when that cannot
// be read (the process is gone).
func ProcessUID(pid int) (uid int, ok bool) {
	b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "status"))
	if err != nil {
		return 0, false
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, found := strings.CutPrefix(line, "Uid:"); found {
			if f := strings.Fields(rest); len(f) > 0 {
				uid, err := strconv.Atoi(f[0])
				return uid, err == nil
			}
			break
		}
	}
	return 0, false
}

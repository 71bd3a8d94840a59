// Package jail hands out the unprivileged users that smolvm's helper
// processes (each VMM, each network process) drop to, one per process, so
// that no two of them can signal or trace each other.
package jail

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
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

// NewUsers hands out users from [base, base+count), starting at a random
// one: every smolvm process on the host hands out from the same ranges.
func NewUsers(base, count int) *Users {
	return &Users{base: base, count: count, pending: map[int]bool{}, next: rand.IntN(count)}
}

// Allocate picks a user of the range that no running process has, nor
// another start under way, through u or any other smolvm process on the
// host. release is called once the process runs as it (or failed to
// start).
func (u *Users) Allocate() (uid int, release func(), err error) {
	u.mu.Lock()
	defer u.mu.Unlock()
	var used map[int]bool // the last scan, taken after a claim
	for range u.count {
		uid := u.base + u.next
		u.next = (u.next + 1) % u.count
		if used[uid] || u.pending[uid] {
			continue
		}
		unreserve, err := reserve(uid)
		if errors.Is(err, unix.EADDRINUSE) {
			continue // another smolvm process is starting one as uid
		}
		if err != nil {
			return 0, nil, err
		}
		// Scanned after the claim, so a process another smolvm process
		// started as uid before letting its claim go shows too.
		if used, err = inUse(u.base, u.count); err != nil {
			unreserve()
			return 0, nil, err
		}
		if used[uid] {
			unreserve()
			continue
		}
		u.pending[uid] = true
		return uid, func() {
			u.mu.Lock()
			delete(u.pending, uid)
			u.mu.Unlock()
			unreserve()
		}, nil
	}
	return 0, nil, fmt.Errorf("all %d jail users from %d are in use", u.count, u.base)
}

// reserve claims uid for a process about to start as it, among every
// process on the host, until unreserve: a scan of the running processes
// cannot see a start still under way in another smolvm process (a server
// and a CLI, or two tests, starting VMs at once got the same user, and
// each VMM could then signal and trace the other's). The claim is an
// abstract unix socket named after uid, which one socket at a time can
// be bound to and which goes with the process that holds it.
func reserve(uid int) (unreserve func(), err error) {
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("reserve jail user %d: %w", uid, err)
	}
	if err := unix.Bind(fd, &unix.SockaddrUnix{Name: "@smolvm-jail-user-" + strconv.Itoa(uid)}); err != nil {
		unix.Close(fd)
		if errors.Is(err, unix.EADDRINUSE) {
			return nil, err
		}
		return nil, fmt.Errorf("reserve jail user %d: %w", uid, err)
	}
	return func() { unix.Close(fd) }, nil
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

// Package jailtest checks, for the tests of each VMM's launcher, the
// walls of a jail around a running process, from outside, as the kernel
// reports them.
package jailtest

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"

	"github.com/smolvm/smolvm/internal/jail"
)

// Status is the fields of /proc/PID/status, each value with its runs of
// blanks made one space.
func Status(t testing.TB, pid int) map[string]string {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	fields := map[string]string{}
	for _, line := range strings.Split(string(b), "\n") {
		if name, v, ok := strings.Cut(line, ":"); ok {
			fields[name] = strings.Join(strings.Fields(v), " ")
		}
	}
	return fields
}

// CheckWalls checks that pid (what names it in errors) runs as one user
// of the VMMs' jail range, not root, with no supplementary group, no
// capabilities and no_new_privs, in a root of its own (CheckRoot). It
// returns the user.
func CheckWalls(t testing.TB, pid int, what string) int {
	t.Helper()
	st := Status(t, pid)
	ids := strings.Fields(st["Uid"])
	uid := -1
	if len(ids) == 4 && ids[0] == ids[1] && ids[0] == ids[2] && ids[0] == ids[3] && st["Gid"] == st["Uid"] {
		uid, _ = strconv.Atoi(ids[0])
	}
	if uid < jail.VMMBase || uid >= jail.VMMBase+jail.PerRange {
		t.Errorf("%s runs as Uid %q Gid %q, want one user of the jail's range", what, st["Uid"], st["Gid"])
	}
	for name, want := range map[string]string{"CapEff": "0000000000000000", "CapPrm": "0000000000000000", "NoNewPrivs": "1", "Groups": ""} {
		if got := st[name]; got != want {
			t.Errorf("%s's %s is %q, want %q", what, name, got, want)
		}
	}
	CheckRoot(t, pid, what)
	return uid
}

// CheckRoot checks that pid (what names it in errors) runs in a mount
// namespace other than this process's, whose /proc shows a user's own
// processes alone.
func CheckRoot(t testing.TB, pid int, what string) {
	t.Helper()
	proc := fmt.Sprintf("/proc/%d", pid)
	ours, _ := os.Readlink("/proc/self/ns/mnt")
	if theirs, err := os.Readlink(proc + "/ns/mnt"); err != nil || theirs == ours {
		t.Errorf("%s's mount namespace is %q (%v), the host's", what, theirs, err)
	}
	// Its /proc shows its own processes alone, as the mount says (root,
	// reading it from here, would see them all).
	mounts, _ := os.ReadFile(proc + "/mountinfo")
	var procOpts string
	for _, line := range strings.Split(string(mounts), "\n") {
		if f := strings.Fields(line); len(f) > 4 && f[4] == "/proc" {
			procOpts = line
		}
	}
	if !strings.Contains(procOpts, "hidepid=invisible") || !strings.Contains(procOpts, "subset=pid") {
		t.Errorf("%s's /proc is mounted %q, want hidepid=invisible and subset=pid", what, procOpts)
	}
}

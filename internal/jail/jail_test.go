package jail

import (
	"os"
	"os/exec"
	"syscall"
	"testing"
)

func TestAllocateSkipsUsersHeldAndInUse(t *testing.T) {
	base := NetworkBase + PerRange - 8 // a corner of the range no test or VM uses
	u := NewUsers(base, 4)
	a, relA, err := u.Allocate()
	if err != nil {
		t.Fatal(err)
	}
	b, relB, err := u.Allocate()
	if err != nil {
		t.Fatal(err)
	}
	if a == b || a < base || a >= base+4 || b < base || b >= base+4 {
		t.Fatalf("allocated %d and %d from [%d, %d)", a, b, base, base+4)
	}
	relA()
	relB()

	if os.Geteuid() != 0 {
		t.Skip("running a process as another user needs root")
	}
	// A process already running as a user of the range keeps it.
	v := NewUsers(base, 2)
	cmd := exec.Command("sleep", "60")
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(base), Gid: uint32(base), NoSetGroups: true}}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		cmd.Process.Kill()
		cmd.Wait()
	}()
	for range 3 {
		got, rel, err := v.Allocate()
		if err != nil {
			t.Fatal(err)
		}
		if got != base+1 {
			t.Errorf("allocated %d while a process runs as %d; want %d", got, base, base+1)
		}
		rel()
	}
	// With both users taken, the range is exhausted.
	_, rel, err := v.Allocate()
	if err != nil {
		t.Fatal(err)
	}
	defer rel()
	if _, _, err := v.Allocate(); err == nil {
		t.Error("allocated a user from an exhausted range")
	}
}

// Two smolvm processes hand out from the same ranges; a user one has
// handed out for a start still under way is not handed out by the other.
// Two Users stand for the two processes: the claim is host-wide.
func TestAllocateSkipsUsersAnotherProcessIsStarting(t *testing.T) {
	base := NetworkBase + PerRange - 16 // a corner of the range no test or VM uses
	a, relA, err := NewUsers(base, 2).Allocate()
	if err != nil {
		t.Fatal(err)
	}
	other := NewUsers(base, 2)
	b, relB, err := other.Allocate()
	if err != nil {
		t.Fatal(err)
	}
	if b == a {
		t.Fatalf("both handed out %d", a)
	}
	if c, _, err := NewUsers(base, 2).Allocate(); err == nil {
		t.Fatalf("handed out %d while %d and %d, the whole range, were being started as", c, a, b)
	}
	// Once released (the process runs as it, or failed to start), a user
	// is free again for anyone.
	relA()
	c, relC, err := other.Allocate()
	if err != nil {
		t.Fatal(err)
	}
	defer relC()
	if c != a {
		t.Errorf("handed out %d, want %d, the only user free", c, a)
	}
	relB()
}

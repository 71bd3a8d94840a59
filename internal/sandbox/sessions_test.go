package sandbox

import (
	"testing"
	"time"
)

// The lock of a sandbox serialises its callers and is forgotten when no
// one holds or waits for it.
func TestSessionLocks(t *testing.T) {
	s := newSessions()
	unlock := s.lock("vm-1")
	got := make(chan struct{})
	go func() {
		u := s.lock("vm-1")
		close(got)
		u()
	}()
	select {
	case <-got:
		t.Fatal("a second caller took a held lock")
	case <-time.After(50 * time.Millisecond):
	}
	unlock()
	<-got
	other := s.lock("vm-2") // another sandbox's lock is independent
	other()
	s.mu.Lock()
	n := len(s.locks)
	s.mu.Unlock()
	if n != 0 {
		t.Errorf("%d locks remembered after every caller let go", n)
	}
}

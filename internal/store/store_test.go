package store

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

func openTemp(t *testing.T) (*Store, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "smolvm.db")
	s, err := Open(context.Background(), path)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { s.Close() })
	return s, path
}

func sample(id string) Record {
	return Record{
		ID:          id,
		Status:      "running",
		OS:          "ubuntu",
		Image:       "docker.io/library/ubuntu:24.04",
		Backend:     "qemu",
		MemoryMiB:   512,
		DiskSizeMiB: 1024,
		VCPUs:       2,
		PID:         4242,
		Dir:         "/data/sandboxes/" + id,
		Runtime:     `{"serial":"/data/sandboxes/` + id + `/agent.sock"}`,
		CreatedAt:   time.Date(2026, 6, 24, 10, 0, 0, 123456789, time.UTC),
	}
}

func TestRoundTrip(t *testing.T) {
	ctx := context.Background()
	s, _ := openTemp(t)

	want := sample("vm-a1b2c3d4")
	if err := s.Insert(ctx, want); err != nil {
		t.Fatalf("Insert: %v", err)
	}
	got, err := s.Get(ctx, want.ID)
	if err != nil {
		t.Fatalf("Get: %v", err)
	}
	want.UpdatedAt = want.CreatedAt
	if !equal(got, want) {
		t.Fatalf("Get = %+v\nwant %+v", got, want)
	}

	from := got.Status
	got.Status = "error"
	got.Error = "qemu exited: status 1"
	got.PID = 0
	before := time.Now()
	if ok, err := s.Transition(ctx, got, from); err != nil || !ok {
		t.Fatalf("Transition: %v %v", ok, err)
	}
	again, err := s.Get(ctx, want.ID)
	if err != nil {
		t.Fatalf("Get after Update: %v", err)
	}
	if again.Status != "error" || again.Error != got.Error || again.PID != 0 {
		t.Errorf("after Update: %+v", again)
	}
	if !again.CreatedAt.Equal(want.CreatedAt) {
		t.Errorf("Update changed CreatedAt: %v, want %v", again.CreatedAt, want.CreatedAt)
	}
	if again.UpdatedAt.Before(before.Add(-time.Second)) {
		t.Errorf("Update did not set UpdatedAt: %v (before %v)", again.UpdatedAt, before)
	}

	if err := s.Delete(ctx, want.ID); err != nil {
		t.Fatalf("Delete: %v", err)
	}
	if _, err := s.Get(ctx, want.ID); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Get after Delete: %v, want ErrNotFound", err)
	}
}

func TestNotFound(t *testing.T) {
	ctx := context.Background()
	s, _ := openTemp(t)
	if _, err := s.Get(ctx, "vm-00000000"); !errors.Is(err, ErrNotFound) {
		t.Errorf("Get: %v, want ErrNotFound", err)
	}
	if _, err := s.Transition(ctx, sample("vm-00000000"), StatusRunning); !errors.Is(err, ErrNotFound) {
		t.Errorf("Transition: %v, want ErrNotFound", err)
	}
	if err := s.Delete(ctx, "vm-00000000"); !errors.Is(err, ErrNotFound) {
		t.Errorf("Delete: %v, want ErrNotFound", err)
	}
	list, err := s.List(ctx)
	if err != nil || len(list) != 0 || list == nil {
		t.Errorf("List on empty store = %#v, %v; want empty non-nil", list, err)
	}
}

func TestDuplicateInsert(t *testing.T) {
	ctx := context.Background()
	s, _ := openTemp(t)
	r := sample("vm-deadbeef")
	if err := s.Insert(ctx, r); err != nil {
		t.Fatalf("Insert: %v", err)
	}
	r.Status = "stopped"
	if err := s.Insert(ctx, r); !errors.Is(err, ErrExists) {
		t.Fatalf("second Insert: %v, want ErrExists", err)
	}
	got, err := s.Get(ctx, r.ID)
	if err != nil {
		t.Fatal(err)
	}
	if got.Status != "running" {
		t.Errorf("duplicate Insert overwrote the record: status %q", got.Status)
	}
	if err := s.Insert(ctx, Record{}); err == nil {
		t.Error("Insert with empty id succeeded")
	}
}

func TestListOldestFirst(t *testing.T) {
	ctx := context.Background()
	s, _ := openTemp(t)
	base := time.Now().Add(-time.Hour)
	// Inserted out of order on purpose: List orders by creation time.
	for _, i := range []int{3, 1, 2, 0} {
		r := sample(fmt.Sprintf("vm-0000000%d", i))
		r.CreatedAt = base.Add(time.Duration(i) * time.Minute)
		if err := s.Insert(ctx, r); err != nil {
			t.Fatal(err)
		}
	}
	list, err := s.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(list) != 4 {
		t.Fatalf("List returned %d records, want 4", len(list))
	}
	for i, r := range list {
		if want := fmt.Sprintf("vm-0000000%d", i); r.ID != want {
			t.Errorf("List[%d] = %s, want %s", i, r.ID, want)
		}
	}
}

// Two Stores on one file stand for the server and the CLI: concurrent writes
// from both must all land.
func TestConcurrentStoresOnOneFile(t *testing.T) {
	ctx := context.Background()
	a, path := openTemp(t)
	b, err := Open(ctx, path)
	if err != nil {
		t.Fatalf("second Open: %v", err)
	}
	defer b.Close()

	const perWriter = 50
	stores := []*Store{a, b, a, b}
	var wg sync.WaitGroup
	errs := make(chan error, len(stores)*perWriter*2)
	for w, s := range stores {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range perWriter {
				r := sample(fmt.Sprintf("vm-%02x%06x", w, i))
				if err := s.Insert(ctx, r); err != nil {
					errs <- err
					continue
				}
				from := r.Status
				r.Status = "stopped"
				if ok, err := s.Transition(ctx, r, from); err != nil || !ok {
					errs <- fmt.Errorf("transition %s: %v %v", r.ID, ok, err)
				}
				if _, err := s.List(ctx); err != nil {
					errs <- err
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}

	for _, s := range []*Store{a, b} {
		list, err := s.List(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if len(list) != len(stores)*perWriter {
			t.Fatalf("List has %d records, want %d", len(list), len(stores)*perWriter)
		}
		for _, r := range list {
			if r.Status != "stopped" {
				t.Fatalf("%s lost its update: status %q", r.ID, r.Status)
			}
		}
	}
}

func TestReopenKeepsData(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "nested", "smolvm.db")
	s, err := Open(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	want := sample("vm-0badc0de")
	if err := s.Insert(ctx, want); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	s, err = Open(ctx, path)
	if err != nil {
		t.Fatalf("reopen: %v", err)
	}
	defer s.Close()
	got, err := s.Get(ctx, want.ID)
	if err != nil {
		t.Fatalf("Get after reopen: %v", err)
	}
	want.UpdatedAt = want.CreatedAt
	if !equal(got, want) {
		t.Fatalf("after reopen = %+v\nwant %+v", got, want)
	}
	var version int
	if err := s.db.QueryRowContext(ctx, `PRAGMA user_version`).Scan(&version); err != nil {
		t.Fatal(err)
	}
	if version != len(migrations) {
		t.Errorf("user_version = %d, want %d", version, len(migrations))
	}
	var mode string
	if err := s.db.QueryRowContext(ctx, `PRAGMA journal_mode`).Scan(&mode); err != nil {
		t.Fatal(err)
	}
	if mode != "wal" {
		t.Errorf("journal_mode = %q, want wal", mode)
	}
}

func TestRefusesNewerSchema(t *testing.T) {
	ctx := context.Background()
	s, path := openTemp(t)
	if _, err := s.db.ExecContext(ctx, fmt.Sprintf(`PRAGMA user_version = %d`, len(migrations)+1)); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(ctx, path); err == nil {
		t.Fatal("Open accepted a schema newer than it knows")
	}
}

func TestPathWithSpecialCharacters(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "a dir?with#odd%chars", "smolvm.db")
	s, err := Open(ctx, path)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	defer s.Close()
	if err := s.Insert(ctx, sample("vm-11111111")); err != nil {
		t.Fatal(err)
	}
	// The database must be at the path as given, not at an unescaped
	// prefix of it.
	if _, err := os.Stat(path); err != nil {
		t.Fatalf("database not at %s: %v", path, err)
	}
}

func equal(a, b Record) bool {
	ta, tb := a.CreatedAt, b.CreatedAt
	ua, ub := a.UpdatedAt, b.UpdatedAt
	a.CreatedAt, b.CreatedAt, a.UpdatedAt, b.UpdatedAt = time.Time{}, time.Time{}, time.Time{}, time.Time{}
	return a == b && ta.Equal(tb) && ua.Equal(ub)
}

func TestClaimHasOneWinner(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "smolvm.db")
	a, err := Open(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	b, err := Open(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if err := a.Insert(ctx, Record{ID: "vm-0000000a", Status: "pooled"}); err != nil {
		t.Fatal(err)
	}
	wins := make(chan bool, 2)
	for _, s := range []*Store{a, b} {
		go func() {
			ok, err := s.Claim(ctx, "vm-0000000a", "pooled", "running", time.Now())
			if err != nil {
				t.Error(err)
			}
			wins <- ok
		}()
	}
	if w1, w2 := <-wins, <-wins; w1 == w2 {
		t.Errorf("claims returned %v and %v; want exactly one winner", w1, w2)
	}
	r, err := a.Get(ctx, "vm-0000000a")
	if err != nil || r.Status != "running" {
		t.Errorf("after claim: %+v %v", r, err)
	}
}

// A transition happens only from the statuses it names: of two processes
// moving one sandbox at once, the second sees that the first did.
func TestTransitionComparesAndSets(t *testing.T) {
	ctx := context.Background()
	s, _ := openTemp(t)
	r := sample("vm-0000000b")
	r.Status = StatusRunning
	if err := s.Insert(ctx, r); err != nil {
		t.Fatal(err)
	}
	stopped := r
	stopped.Status, stopped.PID = StatusStopped, 0
	if ok, err := s.Transition(ctx, stopped, StatusRunning); err != nil || !ok {
		t.Fatalf("running -> stopped: %v %v", ok, err)
	}
	// A second stop, from a caller that still believes it runs, changes
	// nothing and says so.
	failed := r
	failed.Status, failed.Error = StatusError, "late"
	if ok, err := s.Transition(ctx, failed, StatusRunning, StatusCreating); err != nil || ok {
		t.Fatalf("transition from a status the record no longer has: %v %v", ok, err)
	}
	got, err := s.Get(ctx, r.ID)
	if err != nil || got.Status != StatusStopped || got.Error != "" {
		t.Errorf("after the refused transition: %+v %v", got, err)
	}
	if _, err := s.Transition(ctx, failed); err == nil {
		t.Error("a transition from no status was accepted")
	}
}

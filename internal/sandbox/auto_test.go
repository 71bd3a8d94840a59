package sandbox_test

import (
	"context"
	"errors"
	"io"
	"strings"
	"testing"

	"github.com/smolvm/smolvm/internal/sandbox"
	"github.com/smolvm/smolvm/internal/testenv"
	"github.com/smolvm/smolvm/internal/vmm"
)

// absentDriver is a backend this host cannot run.
type absentDriver struct{ *fakeDriver }

func (absentDriver) Name() string     { return "absent" }
func (absentDriver) Available() error { return errors.New("its VMM is not installed") }

// sharingDriver can share host directories.
type sharingDriver struct{ *fakeDriver }

func (sharingDriver) Name() string { return "sharer" }
func (sharingDriver) ShareDirs()   {}

// A sandbox that names no backend gets the most preferred one the host
// runs that can run it: one that shares directories when it mounts any.
func TestAutoBackend(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	d := newFakeDriver()
	root := t.TempDir()
	m := testenv.ManagerWith(t, sandbox.Options{DataDir: testenv.DataDir(t), Progress: io.Discard, AllowMounts: []string{root},
		Drivers: vmm.NewRegistry(absentDriver{d}, d, sharingDriver{d})})

	plain, err := m.Create(ctx, offline)
	if err != nil || plain.Backend != "fake" {
		t.Fatalf("create without mounts: %+v %v; want backend fake", plain, err)
	}
	req := offline
	req.Backend = sandbox.AutoBackend
	req.Mounts = []sandbox.Mount{{Host: root, Guest: "/work"}}
	shared, err := m.Create(ctx, req)
	if err != nil || shared.Backend != "sharer" {
		t.Fatalf("create with a mount: %+v %v; want backend sharer", shared, err)
	}

	// With none able to, the error says why for each.
	none := testenv.ManagerWith(t, sandbox.Options{DataDir: testenv.DataDir(t), Progress: io.Discard, AllowMounts: []string{root},
		Drivers: vmm.NewRegistry(absentDriver{d}, d)})
	_, err = none.Create(ctx, req)
	var se *sandbox.Error
	if !errors.As(err, &se) || se.Code != "backend_unavailable" ||
		!strings.Contains(se.Message, "absent: its VMM is not installed") || !strings.Contains(se.Message, "fake: cannot share host directories") {
		t.Fatalf("create with a mount and no backend that shares: %v", err)
	}
}

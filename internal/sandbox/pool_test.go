package sandbox_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/smolvm/smolvm/internal/sandbox"
	"github.com/smolvm/smolvm/internal/testenv"
)

func waitPool(t *testing.T, m *sandbox.Manager, n int) {
	t.Helper()
	deadline := time.Now().Add(3 * time.Minute)
	for {
		ready, err := m.PoolReady(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		if ready >= n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("pool has %d of %d sandboxes after 3 minutes", ready, n)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// Pooled sandboxes are real, working, distinct sandboxes, hidden until a
// create takes one, and refilled behind it.
func TestPool(t *testing.T) {
	t.Parallel()
	d := testenv.DataDir(t)
	ctx := context.Background()
	m, err := sandbox.Open(ctx, sandbox.Options{DataDir: d, AgentPath: testenv.AgentPath(t), NetPath: testenv.NetPath(t), Pool: 2, PoolCleanup: true})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	waitPool(t, m, 2)
	if list, _ := m.List(ctx); len(list) != 0 {
		t.Errorf("pooled sandboxes are listed: %+v", list)
	}

	var ids []string
	machineIDs := map[string]bool{}
	for range 2 {
		info, err := m.Create(ctx, sandbox.CreateRequest{})
		if err != nil {
			t.Fatal(err)
		}
		defer m.Delete(ctx, info.ID)
		if info.Boot != sandbox.BootPool || info.Status != sandbox.StatusRunning {
			t.Errorf("create: boot %q status %q, want a running sandbox from the pool", info.Boot, info.Status)
		}
		if host := strings.TrimSpace(exec(t, m, info.ID, "hostname")); host != info.ID {
			t.Errorf("pooled sandbox %s calls itself %q", info.ID, host)
		}
		machineIDs[exec(t, m, info.ID, "cat /etc/machine-id")] = true
		ids = append(ids, info.ID)
	}
	if len(machineIDs) != 2 {
		t.Errorf("two pooled sandboxes share a machine id")
	}
	list, _ := m.List(ctx)
	if len(list) != 2 {
		t.Errorf("list shows %d sandboxes, want the 2 handed out", len(list))
	}
	// A shape the pool does not hold is created as usual.
	other, err := m.Create(ctx, sandbox.CreateRequest{MemoryMiB: 256})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Delete(ctx, other.ID)
	if other.Boot == sandbox.BootPool {
		t.Errorf("a 256 MiB sandbox came from the 512 MiB pool")
	}
	waitPool(t, m, 2)
}

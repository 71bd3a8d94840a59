package sandbox_test

import (
	"context"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/smolvm/smolvm/internal/sandbox"
	"github.com/smolvm/smolvm/internal/testenv"
)

// A sandbox must keep answering as processes come and go: each new Manager
// opens a fresh session with the agent after the last one disconnected.
func TestReconnect(t *testing.T) {
	t.Parallel()
	d := testenv.DataDir(t)
	ctx := context.Background()
	m := testenv.ManagerAt(t, d)
	info, err := m.Create(ctx, sandbox.CreateRequest{MemoryMiB: 256})
	if err != nil {
		t.Fatal(err)
	}
	m.Close()
	for i := range 8 {
		m2, err := sandbox.Open(ctx, sandbox.Options{DataDir: d, AgentPath: testenv.AgentPath(t), NetPath: testenv.NetPath(t)})
		if err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		res, err := m2.Exec(ctx, info.ID, sandbox.ExecRequest{Command: "echo round"})
		t.Logf("round %d: %v", i, time.Since(start))
		if err != nil || string(res.Stdout) != "round\n" {
			b, _ := os.ReadFile(d.Sandbox(info.ID) + "/console.log")
			t.Fatalf("round %d: %v %q\nconsole:\n%s", i, err, res.Stdout, b)
		}
		m2.Close()
	}
	m3 := testenv.ManagerAt(t, d)
	if err := m3.Delete(ctx, info.ID); err != nil {
		t.Fatal(err)
	}
}

// Stop and Start from a process that has never talked to the sandbox (no
// agent session cached) must work, not wait on themselves.
func TestStopStartFromAnotherManager(t *testing.T) {
	t.Parallel()
	d := testenv.DataDir(t)
	ctx := context.Background()
	m := testenv.ManagerAt(t, d)
	info, err := m.Create(ctx, sandbox.CreateRequest{MemoryMiB: 256})
	if err != nil {
		t.Fatal(err)
	}
	m.Close()

	m2 := testenv.ManagerAt(t, d)
	done := make(chan error, 1)
	go func() { done <- m2.Stop(ctx, info.ID, 0) }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(2 * time.Minute):
		t.Fatal("Stop from a fresh Manager did not return")
	}
	if got, _ := m2.Get(ctx, info.ID); got.Status != sandbox.StatusStopped {
		t.Errorf("status after stop: %q", got.Status)
	}
	if _, err := m2.Start(ctx, info.ID); err != nil {
		t.Fatal(err)
	}
	if out := exec(t, m2, info.ID, "echo back"); out != "back\n" {
		t.Errorf("after restart: %q", out)
	}
}

// A sandbox whose VM died is reported as stopped, not running, refuses
// commands with a conflict, and can still be deleted.
func TestDeadVMIsReportedAndDeletable(t *testing.T) {
	t.Parallel()
	m := testenv.Manager(t)
	ctx := context.Background()
	info, err := m.Create(ctx, sandbox.CreateRequest{MemoryMiB: 256})
	if err != nil {
		t.Fatal(err)
	}
	if err := syscall.Kill(info.PID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(30 * time.Second)
	var got sandbox.Info
	for {
		got, err = m.Get(ctx, info.ID)
		if err != nil {
			t.Fatal(err)
		}
		if got.Status != sandbox.StatusRunning || time.Now().After(deadline) {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if got.Status != sandbox.StatusStopped || !strings.Contains(got.Error, "exited") {
		t.Errorf("after the VM was killed: status %q error %q", got.Status, got.Error)
	}
	_, err = m.Exec(ctx, info.ID, sandbox.ExecRequest{Command: "true"})
	if e, ok := sandbox.AsError(err); !ok || e.Kind != sandbox.KindConflict {
		t.Errorf("exec on a dead sandbox: %v", err)
	}
	if err := m.Delete(ctx, info.ID); err != nil {
		t.Fatalf("delete a dead sandbox: %v", err)
	}
	if _, err := m.Get(ctx, info.ID); err == nil {
		t.Error("the dead sandbox is still there after delete")
	}
}

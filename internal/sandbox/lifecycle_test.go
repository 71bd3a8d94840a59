package sandbox_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/smolvm/smolvm/internal/network"
	"github.com/smolvm/smolvm/internal/sandbox"
	"github.com/smolvm/smolvm/internal/testenv"
)

func wantState(t *testing.T, err error, status sandbox.Status) {
	t.Helper()
	e, ok := sandbox.AsError(err)
	if !ok || e.Code != "invalid_state" || e.Status != status {
		t.Fatalf("got %v, want invalid_state with status %s", err, status)
	}
}

// counter reads the number a background loop in the guest last wrote.
func counter(t *testing.T, m *sandbox.Manager, id string) int {
	t.Helper()
	res := run(t, m, id, "cat /tmp/count")
	n, err := strconv.Atoi(strings.TrimSpace(string(res.Stdout)))
	if err != nil {
		t.Fatalf("counter %q: %v", res.Stdout, err)
	}
	return n
}

// Pause stops a running process where it is and resume lets it go on; a
// call in the wrong state says which state the sandbox is in. Stop keeps
// the disk's files for start.
func TestLifecyclePauseResumeStopStart(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	m := testenv.Manager(t)
	info := create(t, m, sandbox.CreateRequest{Network: network.Policy{Mode: network.ModeOff}})
	if _, err := m.StartProcess(ctx, info.ID, sandbox.ProcessRequest{ExecRequest: sandbox.ExecRequest{Command: `i=0; while true; do i=$((i+1)); echo $i > /tmp/count.new; mv /tmp/count.new /tmp/count; sleep 0.1; done`, Shell: sandbox.ShellRaw}}); err != nil {
		t.Fatal(err)
	}
	run(t, m, info.ID, "echo kept > /root/file; sync")
	deadline := time.Now().Add(time.Minute)
	for counter(t, m, info.ID) < 3 && time.Now().Before(deadline) {
		time.Sleep(200 * time.Millisecond)
	}

	if _, err := m.Resume(ctx, info.ID); err == nil {
		t.Fatal("resume of a running sandbox succeeded")
	} else {
		wantState(t, err, sandbox.StatusRunning)
	}
	before := counter(t, m, info.ID)
	paused, err := m.Pause(ctx, info.ID)
	if err != nil {
		t.Fatal(err)
	}
	if paused.Status != sandbox.StatusPaused {
		t.Fatalf("status after pause = %s", paused.Status)
	}
	if _, err := m.Exec(ctx, info.ID, sandbox.ExecRequest{Command: "true"}); err == nil {
		t.Fatal("exec in a paused sandbox succeeded")
	}
	// While paused, the counter does not move: read it from the host's
	// side after resume, and check it went on from where it stood.
	time.Sleep(2 * time.Second)
	if got, _ := m.Get(ctx, info.ID); got.Status != sandbox.StatusPaused {
		t.Fatalf("status = %s, want paused", got.Status)
	}
	// A snapshot of a paused sandbox leaves it paused.
	if _, err := m.CreateSnapshot(ctx, info.ID, sandbox.SnapshotRequest{Name: "while-paused"}); err != nil {
		t.Fatal(err)
	}
	if got, _ := m.Get(ctx, info.ID); got.Status != sandbox.StatusPaused {
		t.Fatalf("status after a snapshot while paused = %s", got.Status)
	}
	if _, err := m.Pause(ctx, info.ID); err == nil {
		t.Fatal("pausing a paused sandbox succeeded")
	} else {
		wantState(t, err, sandbox.StatusPaused)
	}
	if _, err := m.Resume(ctx, info.ID); err != nil {
		t.Fatal(err)
	}
	// The same process goes on counting from where it was, not anew.
	first := counter(t, m, info.ID)
	time.Sleep(time.Second)
	second := counter(t, m, info.ID)
	if first < before || second <= first {
		t.Fatalf("counter across pause: %d before, %d and %d after resume", before, first, second)
	}

	if err := m.Stop(ctx, info.ID, 0); err != nil {
		t.Fatal(err)
	}
	if err := m.Stop(ctx, info.ID, 0); err == nil {
		t.Fatal("stopping a stopped sandbox succeeded")
	} else {
		wantState(t, err, sandbox.StatusStopped)
	}
	if _, err := m.Pause(ctx, info.ID); err == nil {
		t.Fatal("pausing a stopped sandbox succeeded")
	} else {
		wantState(t, err, sandbox.StatusStopped)
	}
	if _, err := m.Start(ctx, info.ID); err != nil {
		t.Fatal(err)
	}
	if res := run(t, m, info.ID, "cat /root/file"); strings.TrimSpace(string(res.Stdout)) != "kept" {
		t.Fatalf("file after stop/start = %q", res.Stdout)
	}
	if _, err := m.Start(ctx, info.ID); err == nil {
		t.Fatal("starting a running sandbox succeeded")
	} else {
		wantState(t, err, sandbox.StatusRunning)
	}
	// A snapshot asked to stop the sandbox does.
	if _, err := m.CreateSnapshot(ctx, info.ID, sandbox.SnapshotRequest{Stop: true}); err != nil {
		t.Fatal(err)
	}
	if got, _ := m.Get(ctx, info.ID); got.Status != sandbox.StatusStopped {
		t.Fatalf("status after a snapshot with stop = %s", got.Status)
	}
	if snaps, err := m.Snapshots(); err != nil || len(snaps) != 2 {
		t.Fatalf("snapshots = %d, %v", len(snaps), err)
	}
}

// A fork of a snapshot has the memory of the process that ran when it was
// taken; forks have their own hostname, random state and files, and the
// snapshotted sandbox goes on running.
func TestSnapshotForks(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	m := testenv.Manager(t)
	src := create(t, m, sandbox.CreateRequest{Network: network.Policy{Mode: network.ModeOff}, Name: "fork-source"})
	// A python process holds a value only in memory and answers on a
	// FIFO pair with it.
	if _, err := m.StartProcess(ctx, src.ID, sandbox.ProcessRequest{ExecRequest: sandbox.ExecRequest{Shell: sandbox.ShellRaw, Command: `mkfifo /tmp/q /tmp/a; exec python3 -c '
import os
secret = os.urandom(8).hex()
open("/tmp/secret.disk", "w").write("")
while True:
    open("/tmp/q").read()
    with open("/tmp/a", "w") as a:
        a.write(secret)
'`}}); err != nil {
		t.Fatal(err)
	}
	ask := func(id string) string {
		t.Helper()
		res := run(t, m, id, "for i in $(seq 100); do [ -p /tmp/q ] && [ -e /tmp/secret.disk ] && break; sleep 0.1; done; echo > /tmp/q; cat /tmp/a")
		if res.ExitCode != 0 || len(strings.TrimSpace(string(res.Stdout))) != 16 {
			t.Fatalf("ask %s: exit %d, %q, %q", id, res.ExitCode, res.Stdout, res.Stderr)
		}
		return strings.TrimSpace(string(res.Stdout))
	}
	secret := ask(src.ID)

	snap, err := m.CreateSnapshot(ctx, src.ID, sandbox.SnapshotRequest{Name: "with-secret"})
	if err != nil {
		t.Fatal(err)
	}
	if snap.SizeBytes <= 0 || snap.Sandbox != src.ID {
		t.Fatalf("snapshot = %+v", snap)
	}
	if _, err := m.CreateSnapshot(ctx, src.ID, sandbox.SnapshotRequest{Name: "with-secret"}); err == nil {
		t.Fatal("a second snapshot took a name in use")
	}
	// The source goes on.
	if got := ask(src.ID); got != secret {
		t.Fatalf("source after snapshot answers %q, want %q", got, secret)
	}

	// Three forks at once, by name.
	type forked struct {
		info sandbox.Info
		err  error
	}
	done := make(chan forked, 3)
	for range 3 {
		go func() {
			info, err := m.Create(ctx, sandbox.CreateRequest{Snapshot: "with-secret"})
			done <- forked{info, err}
		}()
	}
	var forks []sandbox.Info
	for range 3 {
		f := <-done
		if f.err != nil {
			t.Fatalf("fork: %v", f.err)
		}
		forks = append(forks, f.info)
	}
	hostnames, randoms := map[string]bool{}, map[string]bool{}
	for i, f := range forks {
		if f.Snapshot != snap.ID || f.MemoryMiB != src.MemoryMiB {
			t.Fatalf("fork info = %+v", f)
		}
		if got := ask(f.ID); got != secret {
			t.Fatalf("fork %s answers %q, want the snapshot's %q", f.ID, got, secret)
		}
		res := run(t, m, f.ID, "hostname; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; echo fork"+strconv.Itoa(i)+" > /root/mine; ls /root")
		lines := strings.Split(strings.TrimSpace(string(res.Stdout)), "\n")
		if len(lines) < 3 || lines[0] != f.ID {
			t.Fatalf("fork %s: %q", f.ID, res.Stdout)
		}
		hostnames[lines[0]], randoms[lines[1]] = true, true
		if strings.Join(lines[2:], " ") != "mine" {
			t.Fatalf("fork %s sees files %q: another fork's file leaked in", f.ID, lines[2:])
		}
	}
	if len(hostnames) != 3 || len(randoms) != 3 {
		t.Fatalf("forks share identity: hostnames %v, random bytes %v", hostnames, randoms)
	}

	// A snapshot survives the Manager, and deleting it is refused while
	// forks use it.
	m2 := testenv.ManagerAt(t, m.DataDir())
	all, err := m2.Snapshots()
	if err != nil || len(all) != 1 || all[0].Name != "with-secret" {
		t.Fatalf("snapshots after reopen = %+v, %v", all, err)
	}
	err = m2.DeleteSnapshot(ctx, snap.ID, false)
	if e, ok := sandbox.AsError(err); !ok || e.Code != "snapshot_in_use" {
		t.Fatalf("delete of a snapshot in use: %v", err)
	}
	if err := m2.DeleteSnapshot(ctx, "with-secret", true); err != nil {
		t.Fatal(err)
	}
	for _, f := range forks {
		if _, err := m2.Get(ctx, f.ID); err == nil {
			t.Fatalf("fork %s outlived a forced delete of its snapshot", f.ID)
		}
	}
	if _, err := m2.Get(ctx, "fork-source"); err != nil {
		t.Fatalf("the source went with its snapshot: %v", err)
	}
	// A fork of a snapshot that is gone is refused.
	if _, err := m2.Create(ctx, sandbox.CreateRequest{Snapshot: snap.ID}); err == nil {
		t.Fatal("fork of a deleted snapshot succeeded")
	}
}

// A sandbox with a time limit is deleted (or paused) by the server a
// moment after its deadline, also when the deadline passed while no
// Manager ran.
func TestTimeLimit(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	d := testenv.DataDir(t)
	m := testenv.ManagerAt(t, d)
	del := create(t, m, sandbox.CreateRequest{Network: network.Policy{Mode: network.ModeOff}, Timeout: 3 * time.Second, Labels: map[string]string{"t": "del"}})
	if del.Deadline.IsZero() || del.OnTimeout != sandbox.OnTimeoutDelete {
		t.Fatalf("info = %+v", del)
	}
	pause := create(t, m, sandbox.CreateRequest{Network: network.Policy{Mode: network.ModeOff}, Timeout: 3 * time.Second, OnTimeout: sandbox.OnTimeoutPause})
	// Extended before it runs out, it stays running past the first limit.
	extended := create(t, m, sandbox.CreateRequest{Network: network.Policy{Mode: network.ModeOff}, Timeout: 3 * time.Second})
	ext := 10 * time.Minute
	if _, err := m.Update(ctx, extended.ID, sandbox.UpdateRequest{Timeout: &ext}); err != nil {
		t.Fatal(err)
	}
	// The Manager closes before the deadlines pass; a new one enforces
	// them.
	m.Close()
	time.Sleep(4 * time.Second)
	m2 := testenv.ManagerAt(t, d)
	deadline := time.Now().Add(30 * time.Second)
	for {
		_, derr := m2.Get(ctx, del.ID)
		p, perr := m2.Get(ctx, pause.ID)
		if derr != nil && perr == nil && p.Status == sandbox.StatusPaused {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("30 s after the deadlines: deleted one: %v; paused one: %+v, %v", derr, p.Status, perr)
		}
		time.Sleep(200 * time.Millisecond)
	}
	if e, err := m2.Get(ctx, extended.ID); err != nil || e.Status != sandbox.StatusRunning {
		t.Fatalf("extended sandbox: %+v, %v", e.Status, err)
	}
	if got, err := m2.Find(ctx, map[string]string{"t": "del"}); err != nil || len(got) != 0 {
		t.Fatalf("label filter after delete = %v, %v", got, err)
	}
}

// Names work wherever ids do and are unique; labels filter; the sandbox's
// environment reaches every command, under the command's own.
func TestNamesLabelsEnv(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	m := testenv.Manager(t)
	info := create(t, m, sandbox.CreateRequest{Network: network.Policy{Mode: network.ModeOff}, Name: "named-one",
		Labels: map[string]string{"team": "ml", "tier": "dev"}, Env: map[string]string{"GREETING": "hello", "WHO": "sandbox"}})
	res, err := m.Exec(ctx, "named-one", sandbox.ExecRequest{Command: `echo "$GREETING $WHO"`, Env: map[string]string{"WHO": "command"}})
	if err != nil || strings.TrimSpace(string(res.Stdout)) != "hello command" {
		t.Fatalf("exec by name: %q, %v", res.Stdout, err)
	}
	if _, err := m.Create(ctx, sandbox.CreateRequest{Name: "named-one"}); err == nil {
		t.Fatal("a second sandbox took a name in use")
	} else if e, ok := sandbox.AsError(err); !ok || e.Code != "name_taken" {
		t.Fatalf("duplicate name: %v", err)
	}
	for _, bad := range []string{"Upper", "-lead", strings.Repeat("a", 64), "vm-12345678"} {
		if _, err := m.Create(ctx, sandbox.CreateRequest{Name: bad}); err == nil {
			t.Fatalf("name %q accepted", bad)
		}
	}
	got, err := m.Find(ctx, map[string]string{"team": "ml"})
	if err != nil || len(got) != 1 || got[0].ID != info.ID {
		t.Fatalf("find team=ml = %v, %v", got, err)
	}
	if got, _ := m.Find(ctx, map[string]string{"team": "ml", "tier": "prod"}); len(got) != 0 {
		t.Fatalf("find team=ml,tier=prod = %v", got)
	}
	// What the guest kernel prints at a level the console shows ends up
	// in the log.
	run(t, m, info.ID, "echo '<2>marker-for-the-log' > /dev/kmsg")
	path, err := m.ConsoleLog(ctx, "named-one")
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		b, err := os.ReadFile(path)
		if err == nil && strings.Contains(string(b), "marker-for-the-log") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("console log %s: %q, %v", path, b, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err := m.Delete(ctx, "named-one"); err != nil {
		t.Fatal(err)
	}
}

// A host directory under an allowed root is shared read-only by default;
// one outside every root, also through a symlink, is refused.
func TestMounts(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	root := t.TempDir()
	shared := filepath.Join(root, "shared")
	outside := t.TempDir()
	if err := os.MkdirAll(shared, 0o755); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(shared, "hello.txt"), []byte("from the host\n"), 0o644)
	os.Symlink(outside, filepath.Join(root, "escape"))
	m := testenv.ManagerWith(t, sandbox.Options{AllowMounts: []string{root}})

	for _, host := range []string{outside, filepath.Join(root, "escape")} {
		_, err := m.Create(ctx, sandbox.CreateRequest{Mounts: []sandbox.Mount{{Host: host, Guest: "/workspace", ReadOnly: true}}})
		if e, ok := sandbox.AsError(err); !ok || e.Kind != sandbox.KindForbidden || e.Code != "mount_not_allowed" {
			t.Fatalf("mount of %s: %v", host, err)
		}
	}
	info := create(t, m, sandbox.CreateRequest{Network: network.Policy{Mode: network.ModeOff},
		Mounts: []sandbox.Mount{{Host: shared, Guest: "/workspace", ReadOnly: true}}})
	res := run(t, m, info.ID, "cat /workspace/hello.txt")
	if res.ExitCode != 0 || string(res.Stdout) != "from the host\n" {
		t.Fatalf("read the mount: exit %d, %q, %q", res.ExitCode, res.Stdout, res.Stderr)
	}
	res = run(t, m, info.ID, "echo x > /workspace/new.txt")
	if res.ExitCode == 0 {
		t.Fatal("wrote to a read-only mount")
	}
	if _, err := os.Stat(filepath.Join(shared, "new.txt")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the host directory changed: %v", err)
	}
}

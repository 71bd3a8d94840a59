package sandbox_test

import (
	"context"
	"encoding/json"
	"log/slog"
	"os"
	osexec "os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/smolvm/smolvm/internal/network"
	"github.com/smolvm/smolvm/internal/sandbox"
	"github.com/smolvm/smolvm/internal/testenv"
)

func exec(t *testing.T, m *sandbox.Manager, id, cmd string) string {
	t.Helper()
	res, err := m.Exec(context.Background(), id, sandbox.ExecRequest{Command: cmd})
	if err != nil || res.ExitCode != 0 {
		t.Fatalf("%s: %q: %v exit %d stderr %q", id, cmd, err, res.ExitCode, res.Stderr)
	}
	return string(res.Stdout)
}

// Clones restored from one template must each be their own machine.
func TestTemplateClonesHaveTheirOwnIdentity(t *testing.T) {
	t.Parallel()
	m := testenv.Manager(t)
	ctx := context.Background()

	var wg sync.WaitGroup
	infos := make([]sandbox.Info, 3)
	errs := make([]error, 3)
	for i := range infos {
		wg.Add(1)
		go func() {
			defer wg.Done()
			infos[i], errs[i] = m.Create(ctx, sandbox.CreateRequest{MemoryMiB: 256, DiskSizeMiB: 1024 + 512*i})
		}()
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("create %d: %v", i, err)
		}
		if infos[i].Boot != sandbox.BootTemplate {
			t.Errorf("sandbox %d booted %q, want from the template", i, infos[i].Boot)
		}
	}
	ts, err := m.Templates()
	if err != nil || len(ts) != 1 {
		t.Fatalf("templates: %v %+v; want exactly one built for three concurrent creates", err, ts)
	}

	seen := map[string]string{}
	unique := func(what, v, id string) {
		if other, ok := seen[what+v]; ok {
			t.Errorf("%s of %s and %s are both %q", what, id, other, v)
		}
		seen[what+v] = id
	}
	for i, info := range infos {
		id := info.ID
		host := strings.TrimSpace(exec(t, m, id, "hostname"))
		if host != id {
			t.Errorf("hostname of %s is %q", id, host)
		}
		unique("hostname", host, id)
		unique("machine-id", strings.TrimSpace(exec(t, m, id, "cat /etc/machine-id")), id)
		unique("random bytes", exec(t, m, id, "head -c 32 /dev/urandom | od -An -tx1"), id)
		unique("boot id", exec(t, m, id, "cat /proc/sys/kernel/random/uuid"), id)

		guestNow, _ := strconv.ParseInt(strings.TrimSpace(exec(t, m, id, "date +%s")), 10, 64)
		if d := time.Now().Unix() - guestNow; d < -5 || d > 5 {
			t.Errorf("clock of %s is %d s off the host's", id, d)
		}
		var mib int
		mibStr := strings.TrimSpace(exec(t, m, id, "df -m / | tail -1 | awk '{print $2}'"))
		mib, _ = strconv.Atoi(mibStr)
		if want := 1024 + 512*i; mib < want*85/100 || mib > want {
			t.Errorf("root filesystem of %s is %d MiB, want about %d", id, mib, want)
		}
		// Writes stay in the clone's own disk.
		exec(t, m, id, "echo "+id+" > /root/mine")
	}
	for _, info := range infos {
		if got := strings.TrimSpace(exec(t, m, info.ID, "cat /root/mine")); got != info.ID {
			t.Errorf("%s reads %q from its own file", info.ID, got)
		}
	}
}

// A template whose saved state is damaged must not produce a broken
// sandbox: the create boots cold, and the bad template is rebuilt later.
func TestCorruptTemplateFallsBackToColdBoot(t *testing.T) {
	t.Parallel()
	m := testenv.Manager(t)
	ctx := context.Background()
	first, err := m.Create(ctx, sandbox.CreateRequest{MemoryMiB: 256})
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Delete(ctx, first.ID); err != nil {
		t.Fatal(err)
	}
	ts, err := m.Templates()
	if err != nil || len(ts) != 1 {
		t.Fatalf("templates: %v %+v", err, ts)
	}
	state := filepath.Join(ts[0].Dir, "state")
	os.Chmod(state, 0o644)
	if err := os.Truncate(state, 4096); err != nil {
		t.Fatal(err)
	}

	info, err := m.Create(ctx, sandbox.CreateRequest{MemoryMiB: 256})
	if err != nil {
		t.Fatalf("create with a corrupt template: %v", err)
	}
	if info.Boot != sandbox.BootCold {
		t.Errorf("booted %q, want cold after the template failed", info.Boot)
	}
	if len(info.Warnings) != 1 || !strings.Contains(info.Warnings[0], "retired") {
		t.Errorf("warnings %q, want one saying the template is retired", info.Warnings)
	}
	if out := exec(t, m, info.ID, "echo ok"); out != "ok\n" {
		t.Errorf("sandbox after fallback: %q", out)
	}
	if _, err := os.Stat(state); !os.IsNotExist(err) {
		t.Errorf("the corrupt template's state was kept")
	}
	again, err := m.Create(ctx, sandbox.CreateRequest{MemoryMiB: 256})
	if err != nil {
		t.Fatal(err)
	}
	if again.Boot != sandbox.BootTemplate {
		t.Errorf("next create booted %q, want from a rebuilt template", again.Boot)
	}
}

// A template made with another agent (or kernel, image, QEMU) must never be
// restored: the key changes, and a new template is built.
func TestTemplateNotReusedAcrossAgents(t *testing.T) {
	t.Parallel()
	d := testenv.DataDir(t)
	ctx := context.Background()
	m := testenv.ManagerAt(t, d)
	a, err := m.Create(ctx, sandbox.CreateRequest{MemoryMiB: 256})
	if err != nil {
		t.Fatal(err)
	}
	exec(t, m, a.ID, "true")

	// Another agent build: the same program with different bytes.
	other := filepath.Join(t.TempDir(), "smolvm-agent")
	b, err := os.ReadFile(testenv.AgentPath(t))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(other, append(b, []byte("another build")...), 0o755); err != nil {
		t.Fatal(err)
	}
	m2, err := sandbox.Open(ctx, sandbox.Options{DataDir: d, AgentPath: other, NetPath: testenv.NetPath(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer m2.Close()
	bInfo, err := m2.Create(ctx, sandbox.CreateRequest{MemoryMiB: 256})
	if err != nil {
		t.Fatal(err)
	}
	defer m2.Delete(ctx, bInfo.ID)
	ts, _ := m2.Templates()
	if len(ts) != 2 || ts[0].Initrd == ts[1].Initrd {
		t.Errorf("want two templates keyed by different initramfs builds, got %+v", ts)
	}
	if out := exec(t, m2, bInfo.ID, "echo ok"); out != "ok\n" {
		t.Errorf("sandbox from the new template: %q", out)
	}
	for _, tpl := range ts {
		if err := m.RemoveTemplate(ctx, tpl.Key); err == nil {
			t.Errorf("removed template %s while a sandbox overlays it", tpl.Key)
		}
	}
}

// A template build whose process died leaves a VM, maybe a network process,
// and a directory; the next Manager ends and removes them, and leaves alone
// a build that another process is still doing.
func TestAbandonedTemplateBuildIsSwept(t *testing.T) {
	t.Parallel()
	d := testenv.DataDir(t)
	root := d.Templates()
	stale := filepath.Join(root, ".bstale")
	live := filepath.Join(root, ".blive")
	for _, dir := range []string{stale, live} {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, "create.lock"), nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	// The "VM": a process whose command line names the build's agent
	// socket, as QEMU's does.
	marker := filepath.Join(stale, "agent.sock")
	vm := osexec.Command("bash", "-c", "sleep 600; :", marker)
	if err := vm.Start(); err != nil {
		t.Fatal(err)
	}
	defer vm.Process.Kill()
	exited := make(chan struct{})
	go func() { vm.Wait(); close(exited) }()
	b, _ := json.Marshal(map[string]any{"backend": "qemu", "instance": map[string]any{"pid": vm.Process.Pid, "agent_socket": marker}})
	if err := os.WriteFile(filepath.Join(stale, "vm.json"), b, 0o644); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(filepath.Join(live, "create.lock"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
		t.Fatal(err)
	}

	testenv.ManagerAt(t, d)
	select {
	case <-exited:
	case <-time.After(10 * time.Second):
		t.Fatal("the abandoned build's VM was not ended")
	}
	if _, err := os.Stat(stale); !os.IsNotExist(err) {
		t.Errorf("the abandoned build's directory is still there: %v", err)
	}
	if _, err := os.Stat(live); err != nil {
		t.Errorf("a build in progress was swept: %v", err)
	}
}

// logRecorder keeps the records a Manager logs, with the time of each.
type logRecorder struct {
	mu      sync.Mutex
	records []slog.Record
}

func (l *logRecorder) Enabled(context.Context, slog.Level) bool { return true }
func (l *logRecorder) Handle(_ context.Context, r slog.Record) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.records = append(l.records, r.Clone())
	return nil
}
func (l *logRecorder) WithAttrs([]slog.Attr) slog.Handler { return l }
func (l *logRecorder) WithGroup(string) slog.Handler      { return l }

func (l *logRecorder) find(msg string) (slog.Record, map[string]string, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, r := range l.records {
		if r.Message == msg {
			attrs := map[string]string{}
			r.Attrs(func(a slog.Attr) bool { attrs[a.Key] = a.Value.String(); return true })
			return r, attrs, true
		}
	}
	return slog.Record{}, nil, false
}

// A clone whose kernel panics while it is being restored is noticed at
// once, not after a timeout: its template is retired, the sandbox boots
// cold and says so, the failure is logged with the console, and the next
// create builds a fresh template.
func TestCrashedCloneRetiresItsTemplate(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	logs := &logRecorder{}
	m := testenv.ManagerWith(t, sandbox.Options{Logger: slog.New(logs)})
	req := sandbox.CreateRequest{MemoryMiB: 256, Network: network.Policy{Mode: network.ModeOff}}
	first, err := m.Create(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	if first.Boot != sandbox.BootTemplate || len(first.Warnings) != 0 {
		t.Fatalf("first create: boot %q, warnings %q", first.Boot, first.Warnings)
	}
	if err := m.Delete(ctx, first.ID); err != nil {
		t.Fatal(err)
	}

	var crashed atomic.Int64 // when the panic was triggered, in Unix nanoseconds
	sandbox.SetAfterRestore(m, func(ctx context.Context, run func(string) error) {
		if crashed.Load() != 0 {
			return // only the first clone
		}
		crashed.Store(time.Now().UnixNano())
		// The command never answers: the kernel panics under it.
		if err := run("echo c > /proc/sysrq-trigger"); err == nil {
			t.Error("the crash command returned normally")
		}
	})
	info, err := m.Create(ctx, req)
	if err != nil {
		t.Fatalf("create with a crashing clone: %v", err)
	}
	if crashed.Load() == 0 {
		t.Fatal("the clone was never restored")
	}
	if info.Boot != sandbox.BootCold {
		t.Errorf("booted %q, want cold after the clone crashed", info.Boot)
	}
	if len(info.Warnings) != 1 || !strings.Contains(info.Warnings[0], "retired") || !strings.Contains(info.Warnings[0], "crashed") {
		t.Errorf("warnings %q, want one saying the crashed clone's template is retired", info.Warnings)
	}
	if out := exec(t, m, info.ID, "echo ok"); out != "ok\n" {
		t.Errorf("sandbox after the cold boot: %q", out)
	}
	rec, attrs, ok := logs.find("template clone failed; template retired, booting cold")
	if !ok {
		t.Fatal("the failed clone was not logged")
	}
	took := rec.Time.Sub(time.Unix(0, crashed.Load()))
	t.Logf("kernel panic triggered to template retired: %s", took.Round(time.Millisecond))
	// Noticed by the VM ending, not by any timeout (the shortest is 30 s).
	if took > 15*time.Second {
		t.Errorf("the crash took %s to notice", took)
	}
	if !strings.Contains(attrs["console"], "Kernel panic") || !strings.Contains(attrs["console"], "sysrq") {
		t.Errorf("the log does not carry the console's panic: %q", attrs["console"])
	}
	ts, err := m.Templates()
	if err != nil || len(ts) != 1 || !ts[0].Retired {
		t.Fatalf("templates after the crash: %v %+v; want the one build, retired", err, ts)
	}

	again, err := m.Create(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	if again.Boot != sandbox.BootTemplate || len(again.Warnings) != 0 {
		t.Errorf("next create: boot %q, warnings %q; want a fresh template", again.Boot, again.Warnings)
	}
}

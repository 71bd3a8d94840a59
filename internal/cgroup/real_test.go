package cgroup_test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/smolvm/smolvm/internal/cgroup"
	"github.com/smolvm/smolvm/internal/sandbox"
	"github.com/smolvm/smolvm/internal/testenv"
)

// helperEnv makes the test binary, started again, a process that takes
// memory (for TestRealMemoryLimit) instead of running tests.
const helperEnv = "SMOLVM_CGROUP_HELPER"

func TestMain(m *testing.M) {
	if os.Getenv(helperEnv) == "allocate" {
		allocate()
		return
	}
	os.Exit(testenv.Main(m))
}

// allocate waits for a line on stdin (its parent has put it in a group by
// then), then touches 256 MiB, a page at a time.
func allocate() {
	bufio.NewReader(os.Stdin).ReadString('\n')
	var keep [][]byte
	for range 256 {
		b := make([]byte, 1<<20)
		for i := 0; i < len(b); i += 4096 {
			b[i] = 1
		}
		keep = append(keep, b)
	}
	fmt.Println("allocated", len(keep), "MiB")
}

// On this host, as root: a process that takes more memory than its
// group's limit is killed by the kernel, and the group counts the kill.
func TestRealMemoryLimit(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to make control groups")
	}
	h, err := cgroup.Detect(cgroup.Root)
	if err != nil || h.Mounts["memory"] == "" {
		t.Skipf("no memory controller on this host: %v", err)
	}
	g, err := cgroup.New(h, "test-oom-"+strconv.Itoa(os.Getpid()), cgroup.Limits{MemoryBytes: 32 << 20, Tasks: 16})
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(os.Args[0])
	cmd.Env = append(os.Environ(), helperEnv+"=allocate")
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	var out strings.Builder
	cmd.Stdout = &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	if err := g.Add(cmd.Process.Pid); err != nil {
		cmd.Process.Kill()
		cmd.Wait()
		t.Fatal(err)
	}
	stdin.Write([]byte("go\n"))
	err = cmd.Wait()
	var exit *exec.ExitError
	if !errors.As(err, &exit) || exit.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
		t.Errorf("a process over its group's 32 MiB: %v, %q; want it killed", err, out.String())
	}
	if kills, err := g.OOMKills(); err != nil || kills < 1 {
		t.Errorf("the group's OOM kills: %d, %v", kills, err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for g.Remove() != nil {
		if time.Now().After(deadline) {
			t.Fatalf("the group outlived its process: %v", g.Remove())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// This host has only cgroup v1, so the package's v2 side runs where a
// kernel has v2: in a guest. The package's tests that make real groups
// run there as root, on the guest's unified hierarchy; so do the
// Firecracker driver's, whose whole launch (fc-launch, its namespaces and
// root, the jail's user, the VMM's control group and its removal) runs
// with the fake Firecracker, since the guest has no VMM of its own (nor
// a TUN device, so the tests that give a VM a network stay on the host).
func TestV2InAGuest(t *testing.T) {
	t.Parallel()
	bins := map[string]string{"cgroup.test": "internal/cgroup", "firecracker.test": "internal/vmm/firecracker"}
	dir := t.TempDir()
	for name, pkg := range bins {
		build := exec.Command("go", "test", "-c", "-o", filepath.Join(dir, name), ".")
		build.Dir = filepath.Join(testenv.RepoRoot(), pkg)
		build.Env = append(os.Environ(), "CGO_ENABLED=0")
		if b, err := build.CombinedOutput(); err != nil {
			t.Fatalf("building the tests of %s: %v\n%s", pkg, err, b)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	m := testenv.Manager(t)
	info, err := m.Create(ctx, sandbox.CreateRequest{})
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := m.Delete(context.Background(), info.ID); err != nil {
			t.Errorf("delete: %v", err)
		}
	}()
	for name := range bins {
		f, err := os.Open(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		_, err = m.WriteFile(ctx, info.ID, "/root/"+name, f, sandbox.WriteOptions{Mode: 0o755})
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
	}
	run := func(bin, tests string) string {
		t.Helper()
		res, err := m.Exec(ctx, info.ID, sandbox.ExecRequest{
			Argv:    []string{"/root/" + bin, "-test.run", "^(" + tests + ")$", "-test.v"},
			Timeout: 5 * time.Minute,
		})
		if err != nil {
			t.Fatal(err)
		}
		out := string(res.Stdout) + string(res.Stderr)
		t.Logf("%s in the guest:\n%s", bin, out)
		if res.ExitCode != 0 || strings.Contains(out, "SKIP") {
			t.Errorf("%s in a v2 guest: exit %d", bin, res.ExitCode)
		}
		for _, name := range strings.Split(tests, "|") {
			if !strings.Contains(out, "--- PASS: "+name+" ") {
				t.Errorf("%s in a v2 guest: %s did not pass", bin, name)
			}
		}
		return out
	}
	out := run("cgroup.test", "TestRealGroup|TestRealMemoryLimit")
	if !strings.Contains(out, "cgroup v2: true") || strings.Contains(out, "no I/O caps tried") {
		t.Errorf("the package's real-group tests did not run on v2 with I/O caps")
	}
	out = run("firecracker.test", "TestStartConfiguresJailsAndKills|TestStartFailureLeavesNothing|TestPauseResizeCheckpoint|TestReapFindsAVMNoRecordNames")
	// The unified hierarchy's line: the VMM was in its group there.
	if !strings.Contains(out, `"0::/smolvm/`) {
		t.Errorf("the fake Firecracker in the guest was not in a v2 control group of its own")
	}
}

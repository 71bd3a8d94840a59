// Package testenv gives tests a private data directory that reuses the
// machine's prepared guest kernel and base image, and a freshly built guest
// agent, so every test boots real VMs without rebuilding what setup made.
package testenv

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/smolvm/smolvm/internal/datadir"
	"github.com/smolvm/smolvm/internal/image"
	"github.com/smolvm/smolvm/internal/kernel"
	"github.com/smolvm/smolvm/internal/sandbox"
)

// builds holds the host and guest binaries a test process builds once.
var builds struct {
	once  sync.Once
	agent string
	net   string
	err   error
}

// RepoRoot is the module's root directory.
func RepoRoot() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "..", "..")
}

func build(t testing.TB) {
	t.Helper()
	builds.once.Do(func() {
		dir, err := os.MkdirTemp("", "smolvm-bin-")
		if err != nil {
			builds.err = err
			return
		}
		builds.agent = filepath.Join(dir, "smolvm-agent")
		builds.net = filepath.Join(dir, "smolvm-net")
		// smolvm-jail beside smolvm-net, where the drivers find it.
		jail := filepath.Join(dir, "smolvm-jail")
		for out, pkg := range map[string]string{builds.agent: "./cmd/smolvm-agent", builds.net: "./cmd/smolvm-net", jail: "./cmd/smolvm-jail"} {
			// Stripped as scripts/setup.sh builds them.
			cmd := exec.Command("go", "build", "-ldflags=-s -w", "-o", out, pkg)
			cmd.Dir = RepoRoot()
			cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH=amd64")
			if b, err := cmd.CombinedOutput(); err != nil {
				builds.err = &buildError{out: string(b), err: err}
				return
			}
		}
	})
	if builds.err != nil {
		t.Fatalf("build smolvm binaries: %v", builds.err)
	}
}

// Main runs a package's tests and then removes the binaries they built;
// a package that uses AgentPath or NetPath calls it from its TestMain.
func Main(m *testing.M) int {
	code := m.Run()
	if builds.agent != "" {
		if err := os.RemoveAll(filepath.Dir(builds.agent)); err != nil {
			fmt.Fprintln(os.Stderr, "testenv: remove the built binaries:", err)
		}
	}
	return code
}

// AgentPath builds cmd/smolvm-agent once per test process.
func AgentPath(t testing.TB) string {
	t.Helper()
	build(t)
	return builds.agent
}

// NetPath builds cmd/smolvm-net once per test process.
func NetPath(t testing.TB) string {
	t.Helper()
	build(t)
	return builds.net
}

// Env is the environment that points a child smolvm process at the test
// binaries.
func Env(t testing.TB) []string {
	t.Helper()
	return []string{"SMOLVM_AGENT=" + AgentPath(t), "SMOLVM_NET=" + NetPath(t)}
}

type buildError struct {
	out string
	err error
}

func (e *buildError) Error() string { return e.err.Error() + ": " + e.out }

// Shared is the prepared data directory whose kernel and image tests reuse:
// $SMOLVM_DATA_DIR or the user's default.
func Shared(t testing.TB) datadir.Dir {
	t.Helper()
	d, err := datadir.Default()
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// Require skips the test when the machine is not set up to boot guests,
// naming the command that fixes it. Under CI ($CI set) it fails instead,
// since CI must have run setup.
func Require(t testing.TB) datadir.Dir {
	t.Helper()
	shared := Shared(t)
	missing := ""
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		missing = "qemu-system-x86_64 is not installed"
	} else if _, err := kernel.Default(shared); err != nil {
		missing = "no guest kernel in " + shared.Path()
	} else if _, err := image.Cached(shared); err != nil {
		missing = "the default image is not built in " + shared.Path()
	}
	if missing != "" {
		msg := missing + ": run `scripts/setup.sh` (or `smolvm setup`) first"
		if os.Getenv("CI") != "" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	return shared
}

// DataDir returns a private data directory for one test whose kernels,
// images and initramfs caches are the shared, read-mostly ones.
func DataDir(t testing.TB) datadir.Dir {
	t.Helper()
	shared := Require(t)
	// Sockets live under the data directory and their paths are limited
	// to 107 bytes, so keep this short rather than under t.TempDir().
	dir, err := os.MkdirTemp("", "smolvm-t")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		killUnder(dir)
		os.RemoveAll(dir)
	})
	d := datadir.Dir(dir)
	for _, sub := range []struct{ from, to string }{
		{shared.Kernels(), d.Kernels()},
		{shared.Images(), d.Images()},
		{shared.Initramfs(), d.Initramfs()},
	} {
		if err := os.MkdirAll(sub.from, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink(sub.from, sub.to); err != nil {
			t.Fatal(err)
		}
	}
	return d
}

// Manager opens a Manager on a fresh DataDir and, when the test ends,
// deletes every sandbox it still has and closes it.
func Manager(t testing.TB) *sandbox.Manager {
	t.Helper()
	return ManagerAt(t, DataDir(t))
}

// ManagerAt opens a Manager on d with the test agent; cleanup as Manager.
func ManagerAt(t testing.TB, d datadir.Dir) *sandbox.Manager {
	t.Helper()
	return ManagerWith(t, sandbox.Options{DataDir: d})
}

// ManagerWith opens a Manager with o, whose empty data directory, agent,
// network helper and progress writer are the test's; cleanup as Manager.
func ManagerWith(t testing.TB, o sandbox.Options) *sandbox.Manager {
	t.Helper()
	ctx := context.Background()
	if o.DataDir == "" {
		o.DataDir = DataDir(t)
	}
	if o.AgentPath == "" {
		o.AgentPath = AgentPath(t)
	}
	if o.NetPath == "" {
		o.NetPath = NetPath(t)
	}
	if o.Progress == nil {
		o.Progress = logWriter{t}
	}
	m, err := sandbox.Open(ctx, o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if list, err := m.List(ctx); err == nil {
			for _, s := range list {
				m.Delete(ctx, s.ID)
			}
		}
		m.Close()
	})
	return m
}

// killUnder kills any process whose command line names dir: a VM that a
// failed test could not delete must not outlive the test run.
func killUnder(dir string) {
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		b, err := os.ReadFile(p)
		if err != nil || !strings.Contains(string(b), dir+"/") {
			continue
		}
		if pid, err := strconv.Atoi(filepath.Base(filepath.Dir(p))); err == nil && pid != os.Getpid() {
			syscall.Kill(pid, syscall.SIGKILL)
		}
	}
}

// logWriter sends progress lines to the test log.
type logWriter struct{ t testing.TB }

func (w logWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

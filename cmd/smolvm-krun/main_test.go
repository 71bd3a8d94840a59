package main

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"github.com/smolvm/smolvm/internal/vmm/libkrun/krunconf"
	"github.com/smolvm/smolvm/internal/vmm/libkrun/libkruntest"
)

// The helper as smolvm ships it (CGO_ENABLED=0), run against a stub
// libkrun.so that records its calls; the driver's tests run it through
// Start, these on its own.

func TestMain(m *testing.M) {
	code := m.Run()
	libkruntest.Cleanup()
	os.Exit(code)
}

type run struct {
	status string // the status line
	stderr string
	err    error // the exit
}

// runHelper runs smolvm-krun with args and a status pipe, and kills it
// once it reports ready (it would then wait in krun_start_enter forever).
func runHelper(t *testing.T, env []string, args ...string) run {
	t.Helper()
	helper, err := libkruntest.Helper()
	if err != nil {
		t.Fatal(err)
	}
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	var stderr bytes.Buffer
	cmd := exec.Command(helper, append(args, "-"+krunconf.FlagStatusFD, "3")...)
	cmd.Env = append(os.Environ(), env...)
	cmd.Stderr = &stderr
	cmd.ExtraFiles = []*os.File{w}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	w.Close()
	line := make(chan string, 1)
	go func() {
		b := make([]byte, 4096)
		n, _ := r.Read(b)
		line <- strings.TrimSpace(string(b[:n]))
	}()
	var res run
	select {
	case res.status = <-line:
	case <-time.After(30 * time.Second):
		t.Error("no status within 30s")
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	wait := 30 * time.Second
	if res.status == krunconf.Ready && !slices.Contains(env, libkruntest.EnvFail+"=krun_start_enter") {
		// Then in krun_start_enter, which the stub leaves only to fail:
		// a helper still there after a while runs its "VM".
		wait = 2 * time.Second
	}
	select {
	case res.err = <-done:
		return finish(res, &stderr)
	case <-time.After(wait):
	}
	cmd.Process.Kill()
	res.err = <-done
	if res.status != krunconf.Ready {
		t.Errorf("helper still running %s after status %q", wait, res.status)
	}
	return finish(res, &stderr)
}

func finish(res run, stderr *bytes.Buffer) run {
	res.stderr = stderr.String()
	return res
}

func exitCode(err error) int {
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			return -int(ws.Signal())
		}
		return ee.ExitCode()
	}
	if err != nil {
		return -1
	}
	return 0
}

type env struct {
	dir    string
	lib    string
	config string
	calls  string
	cfg    krunconf.Config
}

func setup(t *testing.T, omit ...string) env {
	t.Helper()
	dir := t.TempDir()
	lib, err := libkruntest.BuildStub(dir, omit...)
	if err != nil {
		t.Fatal(err)
	}
	e := env{dir: dir, lib: lib, config: filepath.Join(dir, "krun.json"), calls: filepath.Join(dir, "calls.jsonl")}
	e.cfg = krunconf.Config{
		Kernel:      filepath.Join(dir, "vmlinux"),
		Initrd:      filepath.Join(dir, "initrd"),
		Cmdline:     "console=hvc0 quiet",
		Disk:        filepath.Join(dir, "disk.raw"),
		VCPUs:       1,
		MemoryMiB:   256,
		AgentSocket: filepath.Join(dir, "agent.sock"),
		AgentPort:   1024,
		Console:     filepath.Join(dir, "console.log"),
	}
	e.write(t)
	return e
}

func (e env) write(t *testing.T) {
	t.Helper()
	if err := e.cfg.Write(e.config); err != nil {
		t.Fatal(err)
	}
}

func (e env) env(fail string) []string {
	return []string{libkruntest.EnvLog + "=" + e.calls, libkruntest.EnvFail + "=" + fail}
}

func (e env) names(t *testing.T) []string {
	t.Helper()
	calls, err := libkruntest.Calls(e.calls)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, c := range calls {
		names = append(names, c.Name)
	}
	return names
}

func TestRunsTheVMUntilKilled(t *testing.T) {
	e := setup(t)
	res := runHelper(t, e.env(""), "-config", e.config, "-lib", e.lib)
	if res.status != krunconf.Ready {
		t.Fatalf("status %q, stderr %s", res.status, res.stderr)
	}
	if code := exitCode(res.err); code != -int(syscall.SIGKILL) {
		t.Errorf("helper ended with %v before it was killed; stderr %s", res.err, res.stderr)
	}
	names := e.names(t)
	if len(names) == 0 || names[len(names)-1] != "krun_start_enter" {
		t.Errorf("calls %v do not end in krun_start_enter", names)
	}
}

// Without -lib, libkrun is found as the dynamic loader finds it.
func TestFindsLibkrunWhereTheLoaderLooks(t *testing.T) {
	e := setup(t)
	if err := os.Symlink(e.lib, filepath.Join(e.dir, "libkrun.so.1")); err != nil {
		t.Fatal(err)
	}
	res := runHelper(t, append(e.env(""), "LD_LIBRARY_PATH="+e.dir), "-config", e.config)
	if res.status != krunconf.Ready {
		t.Fatalf("status %q, stderr %s", res.status, res.stderr)
	}
}

func TestReportsTheFailedCall(t *testing.T) {
	e := setup(t)
	res := runHelper(t, e.env("krun_set_kernel"), "-config", e.config, "-lib", e.lib)
	want := krunconf.ErrorPrefix + "krun_set_kernel: invalid argument (EINVAL, -22)"
	if res.status != want {
		t.Errorf("status %q, want %q", res.status, want)
	}
	if exitCode(res.err) != 1 || !strings.Contains(res.stderr, "krun_set_kernel") {
		t.Errorf("exit %v, stderr %q", res.err, res.stderr)
	}
	if names := e.names(t); names[len(names)-1] != "krun_set_kernel" {
		t.Errorf("calls went on after the failure: %v", names)
	}
}

// A krun_start_enter that returns is told where a caller that has moved
// on looks: the console.
func TestStartEnterFailureGoesToTheConsole(t *testing.T) {
	e := setup(t)
	res := runHelper(t, e.env("krun_start_enter"), "-config", e.config, "-lib", e.lib)
	if res.status != krunconf.Ready || exitCode(res.err) != 1 {
		t.Fatalf("status %q exit %v", res.status, res.err)
	}
	b, _ := os.ReadFile(e.cfg.Console)
	if !strings.Contains(string(b), "krun_start_enter: invalid argument (EINVAL, -22)") {
		t.Errorf("console %q does not say krun_start_enter failed", b)
	}
}

func TestRefusesWhatItCannotRun(t *testing.T) {
	e := setup(t)
	for name, c := range map[string]struct {
		args []string
		cfg  func(*krunconf.Config)
		want string
	}{
		"no library": {args: []string{"-config", e.config, "-lib", "/nonexistent/libkrun.so.1"}, want: "load libkrun: /nonexistent/libkrun.so.1"},
		"no config":  {args: []string{"-config", "/nonexistent.json", "-lib", e.lib}, want: "read config"},
		"vcpus":      {cfg: func(c *krunconf.Config) { c.VCPUs = 256 }, want: "256 vCPUs"},
		"relative":   {cfg: func(c *krunconf.Config) { c.Disk = "disk.raw" }, want: "disk path \"disk.raw\" is not absolute"},
		"mac":        {cfg: func(c *krunconf.Config) { c.Net = &krunconf.Net{Socket: "/n.sock", MAC: "x"} }, want: "MAC address"},
		"no cmdline": {cfg: func(c *krunconf.Config) { c.Cmdline = "" }, want: "no kernel command line"},
	} {
		t.Run(name, func(t *testing.T) {
			os.Remove(e.calls)
			cfg := e.cfg
			if c.cfg != nil {
				c.cfg(&cfg)
			}
			if err := cfg.Write(e.config); err != nil {
				t.Fatal(err)
			}
			args := c.args
			if args == nil {
				args = []string{"-config", e.config, "-lib", e.lib}
			}
			res := runHelper(t, e.env(""), args...)
			if !strings.HasPrefix(res.status, krunconf.ErrorPrefix) || !strings.Contains(res.status, c.want) || exitCode(res.err) != 1 {
				t.Errorf("status %q exit %v; want an error with %q", res.status, res.err, c.want)
			}
			if names := e.names(t); len(names) > 0 {
				t.Errorf("libkrun called: %v", names)
			}
		})
	}
}

func TestRefusesALibkrunWithoutAFunction(t *testing.T) {
	e := setup(t, "krun_disable_implicit_vsock")
	res := runHelper(t, e.env(""), "-config", e.config, "-lib", e.lib)
	if !strings.Contains(res.status, "has no krun_disable_implicit_vsock") {
		t.Errorf("status %q", res.status)
	}
	if names := e.names(t); len(names) > 0 {
		t.Errorf("libkrun called before all its functions were found: %v", names)
	}
}

func TestUsage(t *testing.T) {
	helper, err := libkruntest.Helper()
	if err != nil {
		t.Fatal(err)
	}
	err = exec.Command(helper).Run()
	if exitCode(err) != 2 {
		t.Errorf("no arguments: %v, want exit status 2", err)
	}
}

func TestCallError(t *testing.T) {
	if err := callError("krun_x", 0); err != nil {
		t.Errorf("0: %v", err)
	}
	if err := callError("krun_create_ctx", 3); err != nil {
		t.Errorf("a context id: %v", err)
	}
	if got, want := callError("krun_x", -2).Error(), "krun_x: no such file or directory (ENOENT, -2)"; got != want {
		t.Errorf("-2: %q, want %q", got, want)
	}
	if got := callError("krun_x", -4000).Error(); !strings.Contains(got, "errno 4000") {
		t.Errorf("-4000: %q", got)
	}
}

func TestCstr(t *testing.T) {
	if cstr("") != nil {
		t.Error("cstr(\"\") is not NULL")
	}
	p := cstr("ab")
	b := unsafe.Slice(p, 3)
	if string(b) != "ab\x00" {
		t.Errorf("cstr(\"ab\") = %q", b)
	}
}

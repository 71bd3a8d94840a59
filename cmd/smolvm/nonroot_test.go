package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/prometheus/procfs"

	"github.com/smolvm/smolvm/internal/testenv"
)

// nobody is the user the test runs smolvm as.
const nobody = 65534

// TestNonRoot runs the CLI as an ordinary user on a data directory that
// user owns, as the README describes: sandboxes boot and run commands, and
// QEMU runs as that user, never as root.
func TestNonRoot(t *testing.T) {
	t.Parallel()
	if os.Geteuid() != 0 {
		t.Fatal("this test switches to an ordinary user, which needs root")
	}
	shared := testenv.Require(t)
	dir, err := os.MkdirTemp("", "smolvm-u")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		for _, pid := range processesOf(nobody, dir) {
			syscall.Kill(pid, syscall.SIGKILL)
		}
		os.RemoveAll(dir)
	})
	// The shared kernel, image and initramfs are linked in, not copied:
	// the user cannot reach root's data directory, but may read these
	// files through links in its own. Sandboxes, templates and the
	// database are the user's.
	for _, sub := range []string{"kernels", "images", "initramfs"} {
		if err := linkTree(filepath.Join(shared.Path(), sub), filepath.Join(dir, sub)); err != nil {
			t.Fatal(err)
		}
	}
	bins := filepath.Join(dir, "bin")
	for name, src := range map[string]string{"smolvm": "", "smolvm-agent": testenv.AgentPath(t), "smolvm-net": testenv.NetPath(t)} {
		if src == "" {
			src = newCLI(t).bin
		}
		b, err := os.ReadFile(src)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.MkdirAll(bins, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(bins, name), b, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() || filepath.Dir(p) == bins {
			return os.Lchown(p, nobody, nobody)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}

	run := func(args ...string) (string, int) {
		t.Helper()
		cmd := exec.Command(filepath.Join(bins, "smolvm"), args...)
		cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "HOME=" + dir, "SMOLVM_DATA_DIR=" + dir,
			"SMOLVM_AGENT=" + filepath.Join(bins, "smolvm-agent"), "SMOLVM_NET=" + filepath.Join(bins, "smolvm-net")}
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: nobody, Gid: nobody}}
		out, err := cmd.CombinedOutput()
		code := 0
		if ee, ok := err.(*exec.ExitError); ok {
			code = ee.ExitCode()
		} else if err != nil {
			t.Fatalf("run smolvm %v: %v", args, err)
		}
		return string(out), code
	}

	out, code := run("sandbox", "create", "--memory", "256", "--json")
	var created struct {
		Data struct {
			ID string `json:"id"`
		} `json:"data"`
	}
	if code != 0 || json.Unmarshal([]byte(out[strings.Index(out, "{"):]), &created) != nil || created.Data.ID == "" {
		t.Fatalf("create as an ordinary user: exit %d\n%s", code, out)
	}
	vms := processesOf(nobody, dir)
	if len(vms) == 0 {
		t.Fatalf("no process of uid %d runs the sandbox", nobody)
	}
	for _, pid := range processesOf(0, dir) {
		cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		t.Errorf("process %d runs as root for the user's sandbox: %q", pid, cmdline)
	}
	// The user's QEMU, with nothing to drop, may not change its ids at
	// all: its filter refuses set*id calls.
	qemus := 0
	for _, pid := range vms {
		cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		if !bytes.Contains(cmdline, []byte("qemu-system")) {
			continue
		}
		qemus++
		status, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
		if !bytes.Contains(cmdline, []byte("elevateprivileges=deny")) || !bytes.Contains(status, []byte("Seccomp:\t2\n")) {
			t.Errorf("the user's QEMU %d: command line %q, want elevateprivileges=deny and a filter", pid, cmdline)
		}
	}
	if qemus == 0 {
		t.Errorf("no QEMU among the user's processes %v", vms)
	}
	if out, code := run("sandbox", "exec", created.Data.ID, "--", "echo hello from $(id -un) in the guest"); code != 0 || out != "hello from root in the guest\n" {
		t.Fatalf("exec as an ordinary user: exit %d %q", code, out)
	}
	if out, code := run("sandbox", "delete", created.Data.ID); code != 0 {
		t.Fatalf("delete as an ordinary user: exit %d %s", code, out)
	}
	if left := processesOf(nobody, dir); len(left) != 0 {
		t.Errorf("processes left after delete: %v", left)
	}
}

// linkTree recreates the directories of src under dst and hard-links its
// files, which need no copy and keep their read-only modes.
func linkTree(src, dst string) error {
	return filepath.WalkDir(src, func(p string, d fs.DirEntry, err error) error {
		if errors.Is(err, fs.ErrNotExist) {
			// Another test's build finished (renamed or removed its
			// temporary file) while this one walked.
			return nil
		}
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(src, p)
		if err != nil {
			return err
		}
		target := filepath.Join(dst, rel)
		switch {
		case d.IsDir():
			return os.MkdirAll(target, 0o755)
		case d.Type()&fs.ModeSymlink != 0:
			l, err := os.Readlink(p)
			if err != nil {
				return err
			}
			return os.Symlink(l, target)
		case strings.HasSuffix(p, ".lock"):
			// Locks are taken for writing; the user gets its own.
			return nil
		}
		if err := os.Link(p, target); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return err
		}
		return nil
	})
}

// processesOf lists the processes of uid whose command line names dir.
func processesOf(uid int, dir string) []int {
	procs, err := procfs.AllProcs()
	if err != nil {
		return nil
	}
	var out []int
	for _, p := range procs {
		st, err := p.NewStatus()
		if err != nil || st.UIDs[1] != uint64(uid) {
			continue
		}
		if args, err := p.CmdLine(); err == nil && strings.Contains(strings.Join(args, " "), dir) {
			out = append(out, p.PID)
		}
	}
	return out
}

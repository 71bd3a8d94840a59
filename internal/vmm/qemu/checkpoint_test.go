package qemu

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/smolvm/smolvm/internal/vmm"
)

const (
	statusRunning     = `{"return":{"status":"running","singlestep":false,"running":true}}`
	statusPaused      = `{"return":{"status":"paused","singlestep":false,"running":false}}`
	statusPostmigrate = `{"return":{"status":"postmigrate","singlestep":false,"running":false}}`
	// QEMU says the migration completed while the VM is still here.
	statusFinishMigrate = `{"return":{"status":"finish-migrate","singlestep":false,"running":false}}`
	ramBackend          = `{"return":"/objects/ram0"}`
	migrateCompleted    = `{"return":{"status":"completed"}}`
)

func TestPauseResume(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name   string
		status string
		op     func(*Driver, context.Context, vmm.Machine) error
		sent   []string
	}{
		{"pause running", statusRunning, (*Driver).Pause, []string{"qmp_capabilities", "query-status", "stop"}},
		{"pause paused", statusPaused, (*Driver).Pause, []string{"qmp_capabilities", "query-status"}},
		{"resume paused", statusPaused, (*Driver).Resume, []string{"qmp_capabilities", "query-status", "cont"}},
		// After a migration QEMU is "postmigrate"; cont takes the disks back.
		{"resume postmigrate", statusPostmigrate, (*Driver).Resume, []string{"qmp_capabilities", "query-status", "cont"}},
		{"resume running", statusRunning, (*Driver).Resume, []string{"qmp_capabilities", "query-status"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			f := newFakeQMP(t, script{
				"query-status": seq(qmpEvent("RESUME") + "\n" + tc.status),
				"stop":         seq(qmpEvent("STOP") + "\n" + qmpOK),
			})
			if err := tc.op(New(Options{}), testCtx(t), fakeInstance(f)); err != nil {
				t.Fatalf("%s: %v", tc.name, err)
			}
			wantNames(t, f, tc.sent...)
		})
	}
}

func TestResumeRefused(t *testing.T) {
	t.Parallel()
	f := newFakeQMP(t, script{
		"query-status": seq(`{"return":{"status":"guest-panicked","running":false}}`),
		"cont":         seq(`{"error":{"class":"GenericError","desc":"Resetting the Virtual Machine is required"}}`),
	})
	err := New(Options{}).Resume(testCtx(t), fakeInstance(f))
	if err == nil || !strings.Contains(err.Error(), "guest-panicked") || !strings.Contains(err.Error(), "Resetting") {
		t.Errorf("Resume of a panicked guest: %v", err)
	}
}

// checkpointVM is a fake VM with a disk of some data and a hole.
func checkpointVM(t *testing.T, f *fakeQMP) (*machine, []byte) {
	t.Helper()
	vm := fakeInstance(f)
	vm.rt.Disk = filepath.Join(t.TempDir(), fileDisk)
	content := append(bytes.Repeat([]byte("qcow"), 1024), make([]byte, 1<<20)...)
	content = append(content, "end"...)
	if err := os.WriteFile(vm.rt.Disk, content, 0o644); err != nil {
		t.Fatal(err)
	}
	return vm, content
}

// writesState makes the fake's migrate write part of a state file, as
// QEMU's cat does, so a test sees what is cleaned up.
func writesState(t *testing.T, path string) reply {
	return func(int) string {
		if err := os.WriteFile(path, []byte("QEVM partial"), 0o644); err != nil {
			t.Error(err)
		}
		return qmpOK
	}
}

func wantNoFiles(t *testing.T, dir string) {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		t.Errorf("%s left in the checkpoint directory", e.Name())
	}
}

func TestCheckpointSequence(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	f := newFakeQMP(t, script{
		"qom-get":      seq(ramBackend),
		"query-status": seq(statusRunning, statusFinishMigrate, statusFinishMigrate, statusPostmigrate),
		"stop":         seq(qmpEvent("STOP") + "\n" + qmpOK),
		"migrate":      writesState(t, filepath.Join(dir, fileState)),
		"query-migrate": seq(
			`{"return":{"status":"setup"}}`,
			qmpEvent("MIGRATION")+"\n"+`{"return":{"status":"active"}}`,
			migrateCompleted,
		),
		"cont": seq(qmpEvent("RESUME") + "\n" + qmpOK),
	})
	vm, content := checkpointVM(t, f)
	if err := New(Options{}).Checkpoint(testCtx(t), vm, dir); err != nil {
		t.Fatalf("Checkpoint: %v", err)
	}
	// cont only once the VM has left finish-migrate: QEMU refuses it
	// before ("Migration is not finalized yet").
	wantNames(t, f, "qmp_capabilities", "qom-get", "query-status", "stop",
		"migrate-set-capabilities", "migrate-set-parameters", "getfd", "migrate",
		"query-migrate", "query-migrate", "query-migrate",
		"query-status", "query-status", "query-status", "cont")
	if a := f.args(t, "qom-get", 0); a["path"] != "/machine" || a["property"] != "memory-backend" {
		t.Errorf("qom-get arguments %v", a)
	}
	// The whole RAM goes into the stream, also for a template's clone
	// that was loaded with x-ignore-shared on.
	caps, _ := f.args(t, "migrate-set-capabilities", 0)["capabilities"].([]any)
	if len(caps) != 1 || caps[0].(map[string]any)["capability"] != "x-ignore-shared" || caps[0].(map[string]any)["state"] != false {
		t.Errorf("capabilities %v, want x-ignore-shared off", caps)
	}
	if got := f.args(t, "migrate-set-parameters", 0)["max-bandwidth"]; got != float64(int64(1)<<40) {
		t.Errorf("max-bandwidth %v", got)
	}
	if got, want := f.args(t, "migrate", 0)["uri"], "fd:"+stateFD; got != want {
		t.Errorf("migrate uri %q, want %q", got, want)
	}
	wantPassed(t, f, filepath.Join(dir, fileState), true)
	disk := filepath.Join(dir, fileDisk)
	got, err := os.ReadFile(disk)
	if err != nil || !bytes.Equal(got, content) {
		t.Errorf("disk copy: %d bytes, %v; want the %d bytes of the VM's disk", len(got), err, len(content))
	}
	if st, err := os.Stat(disk); err != nil || st.Mode().Perm() != 0o444 {
		t.Errorf("disk copy: %v %v, want mode 0444", st, err)
	}
	// No RAM file: a restore loads the RAM from the state.
	if _, err := os.Stat(filepath.Join(dir, fileMemory)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("checkpoint has a memory file: %v", err)
	}
}

func TestCheckpointPausedStaysPaused(t *testing.T) {
	t.Parallel()
	f := newFakeQMP(t, script{
		"qom-get":       seq(ramBackend),
		"query-status":  seq(statusPaused),
		"query-migrate": seq(migrateCompleted),
	})
	vm, _ := checkpointVM(t, f)
	if err := New(Options{}).Checkpoint(testCtx(t), vm, t.TempDir()); err != nil {
		t.Fatalf("Checkpoint: %v", err)
	}
	// No stop before; cont and stop after, for the disks' sake.
	wantNames(t, f, "qmp_capabilities", "qom-get", "query-status",
		"migrate-set-capabilities", "migrate-set-parameters", "getfd", "migrate",
		"query-migrate", "query-status", "cont", "stop")
}

func TestCheckpointFailedMigration(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	f := newFakeQMP(t, script{
		"qom-get":      seq(ramBackend),
		"query-status": seq(statusRunning, statusPostmigrate),
		"migrate":      writesState(t, filepath.Join(dir, fileState)),
		"query-migrate": seq(
			`{"return":{"status":"active"}}`,
			`{"return":{"status":"failed","error-desc":"write to pipe: No space left on device"}}`,
		),
	})
	vm, _ := checkpointVM(t, f)
	err := New(Options{}).Checkpoint(testCtx(t), vm, dir)
	if err == nil || !strings.Contains(err.Error(), "No space left on device") {
		t.Fatalf("Checkpoint with a failed migration: %v", err)
	}
	// A session of its own finds the migration over, and lets the VM run.
	wantNames(t, f, "qmp_capabilities", "qom-get", "query-status", "stop",
		"migrate-set-capabilities", "migrate-set-parameters", "getfd", "migrate",
		"query-migrate", "query-migrate",
		"qmp_capabilities", "query-migrate", "query-status", "cont")
	wantNoFiles(t, dir)
}

func TestCheckpointCopyFails(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name   string
		status string
		undo   []string
	}{
		{"running", statusRunning, []string{"cont"}},
		{"paused", statusPaused, []string{"cont", "stop"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			f := newFakeQMP(t, script{
				"qom-get":       seq(ramBackend),
				"query-status":  seq(tc.status, statusPostmigrate),
				"migrate":       writesState(t, filepath.Join(dir, fileState)),
				"query-migrate": seq(migrateCompleted),
			})
			vm := fakeInstance(f)
			vm.rt.Disk = filepath.Join(t.TempDir(), "gone.qcow2")
			err := New(Options{}).Checkpoint(testCtx(t), vm, dir)
			if err == nil || !strings.Contains(err.Error(), "copy the disk") {
				t.Fatalf("Checkpoint with no disk to copy: %v", err)
			}
			names := f.names()
			if i := indexOf(names, "query-migrate"); i < 0 || !equal(names[i+1:], append([]string{"query-status", "qmp_capabilities", "query-migrate", "query-status"}, tc.undo...)) {
				t.Errorf("commands sent: %q; want the undo to end with %q", names, tc.undo)
			}
			wantNoFiles(t, dir)
		})
	}
}

// A checkpoint whose context ends mid-migration cancels the migration
// over a new session, then lets the VM run again.
func TestCheckpointCancelled(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	f := newFakeQMP(t, script{
		"qom-get":      seq(ramBackend),
		"query-status": seq(statusRunning, statusPaused),
		"migrate":      writesState(t, filepath.Join(dir, fileState)),
		"query-migrate": seq(
			silence,
			`{"return":{"status":"active"}}`,
			`{"return":{"status":"cancelling"}}`,
			`{"return":{"status":"cancelled"}}`,
		),
	})
	vm, _ := checkpointVM(t, f)
	ctx, cancel := context.WithTimeout(t.Context(), 300*time.Millisecond)
	defer cancel()
	err := New(Options{}).Checkpoint(ctx, vm, dir)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Checkpoint past its deadline: %v", err)
	}
	wantNames(t, f, "qmp_capabilities", "qom-get", "query-status", "stop",
		"migrate-set-capabilities", "migrate-set-parameters", "getfd", "migrate", "query-migrate",
		"qmp_capabilities", "query-migrate", "migrate_cancel", "query-migrate", "query-migrate",
		"query-status", "cont")
	wantNoFiles(t, dir)
}

// Refused before the VM is touched: nothing is stopped or written.
func TestCheckpointRefusals(t *testing.T) {
	t.Parallel()
	f := newFakeQMP(t, script{"qom-get": seq(`{"return":"/objects/pc.ram"}`)})
	vm, _ := checkpointVM(t, f)
	d := New(Options{})
	ctx := testCtx(t)

	// An earlier smolvm's VM has QEMU's default RAM object.
	dir := t.TempDir()
	if err := d.Checkpoint(ctx, vm, dir); err == nil || !strings.Contains(err.Error(), "pc.ram") {
		t.Errorf("Checkpoint of a VM with pc.ram: %v", err)
	}
	wantNames(t, f, "qmp_capabilities", "qom-get")
	wantNoFiles(t, dir)

	// A directory with a disk (the machine's own, say) is not written.
	own := t.TempDir()
	if err := os.WriteFile(filepath.Join(own, fileDisk), []byte("in use"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := d.Checkpoint(ctx, vm, own); err == nil || !strings.Contains(err.Error(), "there already") {
		t.Errorf("Checkpoint over a disk: %v", err)
	}
	if b, _ := os.ReadFile(filepath.Join(own, fileDisk)); string(b) != "in use" {
		t.Errorf("the disk there became %q", b)
	}
	for _, bad := range []string{"/s/my dir", "/s/$(id)", filepath.Join(t.TempDir(), "missing")} {
		if err := d.Checkpoint(ctx, vm, bad); err == nil {
			t.Errorf("Checkpoint into %q succeeded", bad)
		}
	}
	wantNames(t, f, "qmp_capabilities", "qom-get")
}

func indexOf(s []string, v string) int {
	for i, x := range s {
		if x == v {
			return i
		}
	}
	return -1
}

func equal(a, b []string) bool { return strings.Join(a, "\x00") == strings.Join(b, "\x00") }

// copyData keeps holes: a file of two small extents far apart takes the
// blocks of its data, not of its size.
func TestCopyDataSparse(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	f, err := os.Create(src)
	if err != nil {
		t.Fatal(err)
	}
	const size = 64 << 20
	f.WriteAt(bytes.Repeat([]byte{1}, 8192), 0)
	f.WriteAt(bytes.Repeat([]byte{2}, 8192), 32<<20)
	f.Truncate(size)
	f.Close()
	in, err := os.Open(src)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	dst := filepath.Join(dir, "dst")
	out, err := os.Create(dst)
	if err != nil {
		t.Fatal(err)
	}
	if err := copyData(in, out); err != nil {
		t.Fatalf("copyData: %v", err)
	}
	out.Close()
	a, _ := os.ReadFile(src)
	b, _ := os.ReadFile(dst)
	if !bytes.Equal(a, b) {
		t.Fatal("the copy differs from its source")
	}
	srcBlocks := blocks(t, src)
	if got := blocks(t, dst); got > srcBlocks+64 || got*512 > size/4 {
		t.Errorf("the copy takes %d blocks, its source %d: holes were filled", got, srcBlocks)
	}

	// copySparse: the same bytes, read-only, and never over a file.
	cp := filepath.Join(dir, "cp")
	if err := copySparse(src, cp, 0o444); err != nil {
		t.Fatalf("copySparse: %v", err)
	}
	if c, _ := os.ReadFile(cp); !bytes.Equal(a, c) {
		t.Error("copySparse's copy differs from its source")
	}
	if st, _ := os.Stat(cp); st.Mode().Perm() != 0o444 {
		t.Errorf("copySparse made mode %v", st.Mode())
	}
	if err := copySparse(src, cp, 0o444); !errors.Is(err, os.ErrExist) {
		t.Errorf("copySparse over a file: %v", err)
	}
	if c, _ := os.ReadFile(cp); !bytes.Equal(a, c) {
		t.Error("a refused copySparse changed the file there")
	}
}

func blocks(t *testing.T, p string) int64 {
	t.Helper()
	st, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	return st.Sys().(*syscall.Stat_t).Blocks
}

func TestMountArgs(t *testing.T) {
	t.Parallel()
	spec := vmm.Spec{ID: "vm-1", Dir: "/d", Kernel: "/k", Initrd: "/i", Cmdline: "c", MemoryMiB: 256, VCPUs: 1,
		Mounts: []vmm.Mount{
			{Tag: "m0", HostPath: "/home/u/src", GuestPath: "/src", ReadOnly: true},
			{Tag: "m1", HostPath: "/home/u/a,b,,c", GuestPath: "/out"},
		}}
	args := New(Options{}).args(spec, memory{}, false, false)
	joined := strings.Join(args, "\n")
	for _, want := range []string{
		"-fsdev\nlocal,id=fs0,path=/home/u/src,security_model=none,readonly=on\n-device\nvirtio-9p-pci,fsdev=fs0,mount_tag=m0",
		// Commas doubled, or QEMU would read the rest as options.
		"-fsdev\nlocal,id=fs1,path=/home/u/a,,b,,,,c,security_model=none\n-device\nvirtio-9p-pci,fsdev=fs1,mount_tag=m1",
	} {
		if !strings.Contains(joined, want) {
			t.Errorf("args lack %q:\n%s", want, joined)
		}
	}
	if strings.Count(joined, "-fsdev") != 2 {
		t.Errorf("want two -fsdev: %s", joined)
	}
	spec.Mounts = nil
	if plain := strings.Join(New(Options{}).args(spec, memory{}, false, false), " "); strings.Contains(plain, "9p") || strings.Contains(plain, "fsdev") {
		t.Errorf("a machine without mounts: %s", plain)
	}

	for _, tc := range []struct {
		name   string
		mounts []vmm.Mount
	}{
		{"no tag", []vmm.Mount{{HostPath: "/x"}}},
		{"tag with a comma", []vmm.Mount{{Tag: "m,0", HostPath: "/x"}}},
		{"tag with a colon", []vmm.Mount{{Tag: "m:0", HostPath: "/x"}}},
		{"tag with a space", []vmm.Mount{{Tag: "m 0", HostPath: "/x"}}},
		{"long tag", []vmm.Mount{{Tag: strings.Repeat("m", 32), HostPath: "/x"}}},
		{"tag twice", []vmm.Mount{{Tag: "m0", HostPath: "/x"}, {Tag: "m0", HostPath: "/y"}}},
		{"relative path", []vmm.Mount{{Tag: "m0", HostPath: "x"}}},
	} {
		if err := checkSpec(vmm.Spec{Mounts: tc.mounts}); err == nil {
			t.Errorf("%s: accepted", tc.name)
		}
	}
	if err := checkSpec(vmm.Spec{Mounts: []vmm.Mount{{Tag: strings.Repeat("m", 31), HostPath: "/x"}}}); err != nil {
		t.Errorf("31-byte tag: %v", err)
	}
	if err := checkSpec(vmm.Spec{Cmdline: strings.Repeat("x", 2048)}); err == nil {
		t.Error("a command line the kernel would cut: accepted")
	}
	// Start refuses before it makes a disk.
	dir := t.TempDir()
	if _, err := New(Options{}).Start(testCtx(t), vmm.Spec{Dir: dir, Mounts: []vmm.Mount{{Tag: "bad tag", HostPath: "/x"}}}); err == nil {
		t.Error("Start with a bad tag succeeded")
	}
	wantNoFiles(t, dir)
	// No snapshot has shares: QEMU saves no VM with one mounted.
	snap := t.TempDir()
	if err := os.WriteFile(filepath.Join(snap, fileState), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	_, err := New(Options{}).Restore(testCtx(t), vmm.Spec{Dir: dir, Mounts: []vmm.Mount{{Tag: "m0", HostPath: "/x"}}}, snap)
	if err == nil || !strings.Contains(err.Error(), "shared directories") {
		t.Errorf("Restore with shares: %v", err)
	}
	wantNoFiles(t, dir)
}

func TestMountCmdline(t *testing.T) {
	t.Parallel()
	got := vmm.MountCmdline(vmm.Mount{Tag: "m0", HostPath: "/h", GuestPath: "/mnt/my files", ReadOnly: true})
	if got != "smolvm.mount=m0:/mnt/my%20files:ro" {
		t.Errorf("MountCmdline = %q", got)
	}
	if got := vmm.MountCmdline(vmm.Mount{Tag: "m1", GuestPath: "/a:b"}); got != "smolvm.mount=m1:/a%3Ab:rw" {
		t.Errorf("MountCmdline = %q", got)
	}
}

// Uses follows a disk's backing chain: a machine restored from a
// checkpoint of a template's clone uses the checkpoint and the template.
func TestUsesChain(t *testing.T) {
	t.Parallel()
	if _, err := exec.LookPath(imgBinary); err != nil {
		t.Skip("qemu-img is not installed")
	}
	ctx := testCtx(t)
	root := t.TempDir()
	base := filepath.Join(root, "rootfs.ext4")
	if err := os.WriteFile(base, make([]byte, 1<<20), 0o444); err != nil {
		t.Fatal(err)
	}
	dirs := map[string]string{}
	for _, n := range []string{"template", "clone", "checkpoint", "fork", "other"} {
		dirs[n] = filepath.Join(root, n)
		if err := os.Mkdir(dirs[n], 0o755); err != nil {
			t.Fatal(err)
		}
	}
	disk := func(n string) string { return filepath.Join(dirs[n], fileDisk) }
	for _, step := range [][2]string{{base, disk("template")}, {disk("template"), disk("clone")}, {base, disk("other")}} {
		if err := createDisk(ctx, step[0], step[1], 0); err != nil {
			t.Fatal(err)
		}
	}
	if err := copySparse(disk("clone"), disk("checkpoint"), 0o444); err != nil {
		t.Fatal(err)
	}
	if err := createDisk(ctx, disk("checkpoint"), disk("fork"), 0); err != nil {
		t.Fatal(err)
	}
	d := New(Options{})
	for _, tc := range []struct {
		dir, snap string
		want      bool
	}{
		{"clone", "template", true},
		{"checkpoint", "template", true},
		{"fork", "checkpoint", true},
		{"fork", "template", true},
		{"fork", "clone", false},
		{"fork", "other", false},
		{"other", "template", false},
		{"template", "template", false},
	} {
		if got := d.Uses(dirs[tc.dir], dirs[tc.snap]); got != tc.want {
			t.Errorf("Uses(%s, %s) = %v, want %v", tc.dir, tc.snap, got, tc.want)
		}
	}
}

package cgroup

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// fakeRoot lays out files as cgroupfs would show them, for the parts of
// the package that only read and write files.
func fakeRoot(t *testing.T, v2 bool) string {
	t.Helper()
	root := t.TempDir()
	if v2 {
		os.WriteFile(filepath.Join(root, "cgroup.controllers"), []byte("cpuset cpu io memory pids\n"), 0o644)
		return root
	}
	for _, c := range []string{"memory", "pids", "cpu", "blkio"} {
		os.MkdirAll(filepath.Join(root, c), 0o755)
		os.WriteFile(filepath.Join(root, c, "cgroup.procs"), nil, 0o644)
	}
	return root
}

func read(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestLimitsWrittenForEachVersion(t *testing.T) {
	l := Limits{MemoryBytes: 768 << 20, Tasks: 256, CPUWeight: 200, IO: []DeviceIO{
		{Major: 254, Minor: 0, ReadBPS: 256 << 20, WriteBPS: 128 << 20, ReadIOPS: 8192},
		{Major: 8, Minor: 16, WriteIOPS: 100},
	}}
	for _, v2 := range []bool{false, true} {
		root := fakeRoot(t, v2)
		h, err := Detect(root)
		if err != nil || h.V2 != v2 {
			t.Fatalf("Detect(v2=%v): %+v, %v", v2, h, err)
		}
		g, err := New(h, "vm-1.abcd", l)
		if err != nil {
			t.Fatalf("New(v2=%v): %v", v2, err)
		}
		want := map[string]string{}
		if v2 {
			dir := filepath.Join(root, "smolvm", "vm-1.abcd")
			want[filepath.Join(dir, "memory.max")] = strconv.Itoa(768 << 20)
			want[filepath.Join(dir, "pids.max")] = "256"
			want[filepath.Join(dir, "cpu.weight")] = "200"
			// One line a write: the fake keeps the last.
			want[filepath.Join(dir, "io.max")] = "8:16 wiops=100"
			for _, d := range []string{root, filepath.Join(root, "smolvm")} {
				got := strings.Fields(read(t, filepath.Join(d, "cgroup.subtree_control")))
				if len(got) != 4 || !strings.Contains(strings.Join(got, " "), "+memory") || !strings.Contains(strings.Join(got, " "), "+io") {
					t.Errorf("v2: %s/cgroup.subtree_control = %q, want the four controllers enabled", d, got)
				}
			}
		} else {
			want[filepath.Join(root, "memory", "smolvm", "vm-1.abcd", "memory.limit_in_bytes")] = strconv.Itoa(768 << 20)
			want[filepath.Join(root, "pids", "smolvm", "vm-1.abcd", "pids.max")] = "256"
			want[filepath.Join(root, "cpu", "smolvm", "vm-1.abcd", "cpu.shares")] = "2048"
			blkio := filepath.Join(root, "blkio", "smolvm", "vm-1.abcd")
			want[filepath.Join(blkio, "blkio.throttle.read_bps_device")] = "254:0 268435456"
			want[filepath.Join(blkio, "blkio.throttle.read_iops_device")] = "254:0 8192"
			// v1 caps reads only.
			for _, f := range []string{"blkio.throttle.write_bps_device", "blkio.throttle.write_iops_device"} {
				if _, err := os.Stat(filepath.Join(blkio, f)); err == nil {
					t.Errorf("v1: %s written", f)
				}
			}
		}
		for path, v := range want {
			if got := read(t, path); got != v {
				t.Errorf("v2=%v: %s = %q, want %q", v2, path, got, v)
			}
		}
		if err := g.Add(4242); err != nil {
			t.Fatal(err)
		}
		if got := read(t, filepath.Join(g.Dir("memory"), "cgroup.procs")); got != "4242" {
			t.Errorf("v2=%v: cgroup.procs = %q", v2, got)
		}
	}
}

func TestDetectAndNamesRefused(t *testing.T) {
	if _, err := Detect(t.TempDir()); err == nil {
		t.Error("Detect found a hierarchy in an empty directory")
	}
	h, err := Detect(fakeRoot(t, false))
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"", "..", "a/b", "x\x00"} {
		if _, err := New(h, name, Limits{}); err == nil {
			t.Errorf("New accepted the name %q", name)
		}
	}
}

// On this host, as root: a process put in a group is in it, a group with
// a process cannot be removed, and one without can; a young empty group
// survives a sweep.
func TestRealGroup(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to make control groups")
	}
	h, err := Detect(Root)
	if err != nil {
		t.Skipf("no usable cgroups on this host: %v", err)
	}
	t.Logf("cgroup v2: %v, controllers at %v", h.V2, h.Mounts)
	name := "test-" + strconv.Itoa(os.Getpid())
	l := Limits{MemoryBytes: 64 << 20, Tasks: 16, CPUWeight: 100}
	// The temporary directory, else the root (a guest's /tmp is tmpfs).
	var major, minor uint32
	var disk bool
	for _, dir := range []string{os.TempDir(), "/"} {
		if major, minor, disk = DiskOf(dir); disk {
			break
		}
	}
	if disk {
		l.IO = []DeviceIO{{Major: major, Minor: minor, ReadBPS: 100 << 20, WriteIOPS: 500}}
	}
	g, err := New(h, name, l)
	if err != nil {
		t.Fatal(err)
	}
	if dir := g.Dir("io"); dir != "" && disk {
		// The kernel took the caps (it prints them back as it keeps them).
		dev := strconv.Itoa(int(major)) + ":" + strconv.Itoa(int(minor))
		files := map[string]string{"blkio.throttle.read_bps_device": dev + " 104857600", "blkio.throttle.write_iops_device": ""}
		if h.V2 {
			files = map[string]string{"io.max": dev + " rbps=104857600 wbps=max riops=max wiops=500"}
		}
		for f, want := range files {
			if got := strings.TrimSpace(read(t, filepath.Join(dir, f))); got != want {
				t.Errorf("%s = %q, want %q", f, got, want)
			}
		}
	} else {
		t.Logf("no I/O caps tried: io controller %q, disk %v", dir, disk)
	}
	cmd := exec.Command("sleep", "60")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	if err := g.Add(cmd.Process.Pid); err != nil {
		cmd.Process.Kill()
		t.Fatal(err)
	}
	in := read(t, "/proc/"+strconv.Itoa(cmd.Process.Pid)+"/cgroup")
	if !strings.Contains(in, "/smolvm/"+name) {
		t.Errorf("/proc/PID/cgroup = %q, want the group", in)
	}
	if err := g.Remove(); err == nil {
		t.Error("a group with a process in it was removed")
	}
	if err := Sweep(h, 0, name); err != nil {
		t.Errorf("Sweep: %v", err)
	}
	if _, err := os.Stat(g.Dir("memory")); err != nil {
		t.Errorf("Sweep removed a group with a process in it: %v", err)
	}
	cmd.Process.Kill()
	cmd.Wait()
	// Once its process is reaped the group is empty, and a sweep without
	// grace takes it.
	deadline := time.Now().Add(10 * time.Second)
	for {
		if err := Sweep(h, 0, name); err != nil {
			t.Logf("sweep: %v", err)
		}
		if _, err := os.Stat(g.Dir("memory")); os.IsNotExist(err) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the emptied group survived the sweep")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err := g.Remove(); err != nil {
		t.Errorf("Remove of a group already gone: %v", err)
	}
}

// Under v2 a device's caps are one io.max line, the directions left out
// uncapped.
func TestIOMaxLine(t *testing.T) {
	root := fakeRoot(t, true)
	h, err := Detect(root)
	if err != nil {
		t.Fatal(err)
	}
	g, err := New(h, "vm-2.abcd", Limits{IO: []DeviceIO{{Major: 254, Minor: 0, ReadBPS: 256 << 20, WriteBPS: 128 << 20, ReadIOPS: 8192}}})
	if err != nil {
		t.Fatal(err)
	}
	if got, want := read(t, filepath.Join(g.Dir("io"), "io.max")), "254:0 rbps=268435456 wbps=134217728 riops=8192"; got != want {
		t.Errorf("io.max = %q, want %q", got, want)
	}
}

// DiskOf names the whole disk under a directory on this host, the device
// the kernel throttles, and nothing for a filesystem without one.
func TestDiskOf(t *testing.T) {
	major, minor, ok := DiskOf(t.TempDir())
	if ok {
		sys := "/sys/dev/block/" + strconv.Itoa(int(major)) + ":" + strconv.Itoa(int(minor))
		if _, err := os.Stat(filepath.Join(sys, "queue")); err != nil {
			t.Errorf("DiskOf(temp dir) = %d:%d, which has no request queue: %v", major, minor, err)
		}
		if _, err := os.Stat(filepath.Join(sys, "partition")); err == nil {
			t.Errorf("DiskOf(temp dir) = %d:%d, a partition", major, minor)
		}
	} else {
		t.Logf("the temp directory is on no block device of its own")
	}
	if _, _, ok := DiskOf("/proc"); ok {
		t.Error("DiskOf(/proc) found a disk")
	}
	if _, _, ok := DiskOf("/nonexistent/path"); ok {
		t.Error("DiskOf of a missing path found a disk")
	}
}

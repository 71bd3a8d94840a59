package firecracker

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestCopyDiskIsSparseAndGrown(t *testing.T) {
	dir := t.TempDir()
	base := filepath.Join(dir, "base.ext4")
	makeSparse(t, base, 64<<20, baseData)
	if err := os.Chmod(base, 0o444); err != nil {
		t.Fatal(err)
	}
	disk := filepath.Join(dir, "rootfs.ext4")
	if err := copyDisk(base, disk, 100); err != nil {
		t.Fatal(err)
	}
	checkDisk(t, disk, 100<<20)
	// At the base's size.
	same := filepath.Join(dir, "same.ext4")
	if err := copyDisk(base, same, 0); err != nil {
		t.Fatal(err)
	}
	checkDisk(t, same, 64<<20)
	// Never smaller than the filesystem in it.
	err := copyDisk(base, filepath.Join(dir, "small.ext4"), 32)
	if err == nil || !strings.Contains(err.Error(), "smaller than the base image") {
		t.Fatalf("copy to a smaller disk: %v", err)
	}
	if got := entries(t, dir); len(got) != 3 {
		t.Errorf("left behind: %q", got)
	}
	// The copy is the sandbox's own.
	f, err := os.OpenFile(disk, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteAt([]byte("changed"), 0)
	f.Close()
	b, _ := os.ReadFile(base)
	if strings.HasPrefix(string(b), "changed") {
		t.Error("writing the copy changed the base")
	}
}

func TestDynamicIsToldApart(t *testing.T) {
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	for path, want := range map[string]bool{exe: false, "/bin/sh": true, "/etc/passwd": false} {
		f, err := os.Open(path)
		if err != nil {
			t.Fatal(err)
		}
		if got := dynamic(f); got != want {
			t.Errorf("dynamic(%s) = %v, want %v", path, got, want)
		}
		f.Close()
	}
}

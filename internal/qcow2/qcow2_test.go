package qcow2

import (
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

func TestBacking(t *testing.T) {
	if _, err := exec.LookPath("qemu-img"); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("qemu-img is not installed")
		}
		t.Skip("qemu-img is not installed")
	}
	dir := t.TempDir()
	base := filepath.Join(dir, "base.raw")
	if err := os.WriteFile(base, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	overlay := filepath.Join(dir, "disk.qcow2")
	if out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", base, overlay).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img: %v %s", err, out)
	}
	if got, ok := Backing(overlay); !ok || got != base {
		t.Errorf("Backing(overlay) = %q, %v; want %q", got, ok, base)
	}
	plain := filepath.Join(dir, "plain.qcow2")
	if out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", plain, "1M").CombinedOutput(); err != nil {
		t.Fatalf("qemu-img: %v %s", err, out)
	}
	for _, p := range []string{plain, base, filepath.Join(dir, "missing")} {
		if got, ok := Backing(p); ok {
			t.Errorf("Backing(%s) = %q, want none", filepath.Base(p), got)
		}
	}
}

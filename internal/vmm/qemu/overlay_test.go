package qemu

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/smolvm/smolvm/internal/qcow2"
)

// A clone's overlay is a copy of one blank overlay per snapshot, made once
// with qemu-img: a disk qemu-img itself takes for an empty overlay over the
// snapshot's disk, at its size.
func TestOverlayCopiesOneBlank(t *testing.T) {
	t.Parallel()
	if _, err := exec.LookPath(imgBinary); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("qemu-img is not installed")
		}
		t.Skip("qemu-img is not installed")
	}
	ctx := testCtx(t)
	root := t.TempDir()
	snap := filepath.Join(root, "snap")
	if err := os.Mkdir(snap, 0o755); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(imgBinary, "create", "-q", "-f", "qcow2", filepath.Join(snap, fileDisk), "96M").CombinedOutput(); err != nil {
		t.Fatalf("qemu-img create: %v %s", err, out)
	}
	check := func(disk, snapDir string) {
		t.Helper()
		if b, ok := qcow2.Backing(disk); !ok || b != filepath.Join(snapDir, fileDisk) {
			t.Errorf("%s is made over %q, want %s", disk, b, filepath.Join(snapDir, fileDisk))
		}
		out, err := exec.Command(imgBinary, "info", "--output=json", "-U", disk).Output()
		if err != nil {
			t.Fatalf("qemu-img info %s: %v", disk, err)
		}
		var info struct {
			Format      string `json:"format"`
			VirtualSize int64  `json:"virtual-size"`
		}
		if err := json.Unmarshal(out, &info); err != nil {
			t.Fatal(err)
		}
		if info.Format != "qcow2" || info.VirtualSize != 96<<20 {
			t.Errorf("%s: %+v, want a qcow2 of 96 MiB", disk, info)
		}
		if out, err := exec.Command(imgBinary, "check", "-q", "-U", disk).CombinedOutput(); err != nil {
			t.Errorf("qemu-img check %s: %v %s", disk, err, out)
		}
		// QEMU writes it, as the user it was given to.
		if st, err := os.Stat(disk); err != nil || st.Mode().Perm() != 0o644 {
			t.Errorf("%s: %v %v, want mode 0644", disk, st.Mode(), err)
		}
	}

	var clones []string
	var blank os.FileInfo
	for _, n := range []string{"a", "b"} {
		dir := filepath.Join(root, n)
		if err := os.Mkdir(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		disk := filepath.Join(dir, fileDisk)
		if err := overlay(ctx, snap, disk); err != nil {
			t.Fatal(err)
		}
		check(disk, snap)
		clones = append(clones, disk)
		// The first clone made the blank; the second copies it.
		st, err := os.Stat(filepath.Join(snap, fileBlankOverlay))
		if err != nil {
			t.Fatalf("no blank overlay after a clone: %v", err)
		}
		if blank != nil && !os.SameFile(blank, st) {
			t.Error("the blank overlay was made again for a second clone")
		}
		blank = st
	}
	// Writing to one clone leaves the other, and the blank, empty.
	if out, err := exec.Command("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 64k", clones[0]).CombinedOutput(); err != nil {
		t.Fatalf("qemu-io write: %v %s", err, out)
	}
	for _, disk := range []string{clones[0], clones[1], filepath.Join(snap, fileBlankOverlay)} {
		out, err := exec.Command("qemu-io", "-f", "qcow2", "-c", "read -P 0 0 64k", disk).CombinedOutput()
		if wrote := disk == clones[0]; wrote != strings.Contains(string(out), "Pattern verification failed") {
			t.Errorf("%s after a write to the first clone (written: %v): %v %s", disk, wrote, err, out)
		}
	}

	// A snapshot moved elsewhere: its blank names the old path, and is
	// made again rather than copied.
	moved := filepath.Join(root, "moved")
	if err := os.Rename(snap, moved); err != nil {
		t.Fatal(err)
	}
	disk := filepath.Join(root, "c", fileDisk)
	if err := os.Mkdir(filepath.Dir(disk), 0o755); err != nil {
		t.Fatal(err)
	}
	// What a failed start left there is replaced.
	if err := os.WriteFile(disk, []byte("not a disk"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := overlay(ctx, moved, disk); err != nil {
		t.Fatal(err)
	}
	check(disk, moved)
	if ents, _ := filepath.Glob(filepath.Join(moved, ".overlay-*")); len(ents) != 0 {
		t.Errorf("temporary overlays left: %v", ents)
	}
}

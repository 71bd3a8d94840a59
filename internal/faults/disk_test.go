//go:build faults

package faults

import (
	"context"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// smallFS mounts a fresh ext4 filesystem of sizeMiB on a new directory
// and returns it; it is unmounted when the test ends.
func smallFS(t *testing.T, sizeMiB int) string {
	t.Helper()
	if os.Geteuid() != 0 {
		if os.Getenv("CI") != "" {
			t.Fatal("mounting a filesystem needs root")
		}
		t.Skip("mounting a filesystem needs root")
	}
	img, err := os.CreateTemp("", "smolvm-fs-*.img")
	if err != nil {
		t.Fatal(err)
	}
	img.Close()
	t.Cleanup(func() { os.Remove(img.Name()) })
	if err := os.Truncate(img.Name(), int64(sizeMiB)<<20); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("mkfs.ext4", "-q", "-F", img.Name()).CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4: %v\n%s", err, out)
	}
	dir, err := os.MkdirTemp("", "smolvm-d")
	if err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("mount", "-o", "loop", img.Name(), dir).CombinedOutput(); err != nil {
		t.Fatalf("mount: %v\n%s", err, out)
	}
	t.Cleanup(func() {
		killUnder(dir)
		// A VMM just killed may hold its files a moment longer.
		for try := 0; ; try++ {
			out, err := exec.Command("umount", dir).CombinedOutput()
			if err == nil {
				break
			}
			if try == 50 {
				t.Errorf("umount %s: %v\n%s", dir, err, out)
				exec.Command("umount", "-l", dir).Run()
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
		os.Remove(dir)
	})
	return dir
}

// fill takes every free block of the filesystem at dir (root's reserve
// too) with one file, and returns a function that frees them again.
func fill(t *testing.T, dir string) func() {
	t.Helper()
	path := filepath.Join(dir, "filler")
	var st syscall.Statfs_t
	if err := syscall.Statfs(dir, &st); err != nil {
		t.Fatal(err)
	}
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	// fallocate may fall short of the last blocks; writing finishes.
	syscall.Fallocate(int(f.Fd()), 0, 0, int64(st.Bfree)*st.Bsize)
	buf := make([]byte, 64<<10)
	f.Seek(0, 2)
	for {
		if _, err := f.Write(buf); err != nil {
			break
		}
	}
	for len(buf) > 1 {
		buf = buf[:len(buf)/2]
		f.Write(buf)
	}
	return func() { os.Remove(path) }
}

// The host's data directory fills up: creating a sandbox and pulling an
// image are refused with a clear 507, nothing half made is kept, and all
// works again once there is space.
func TestHostDiskFull(t *testing.T) {
	t.Parallel()
	reg := newGatedRegistry(t)
	ref := reg.push(t, "faults/full:1")
	reg.open()
	held := newGatedRegistry(t)
	heldRef := held.push(t, "faults/held:1")
	dir := smallFS(t, 640)
	h := newHost(t, dir)
	h.start()
	bystander := h.srv.create()

	// The disk fills up while an image is being pulled.
	sb := h.srv.createAsync(map[string]any{"image": heldRef, "memory": 256})
	held.waitBlocked(t)
	free := fill(t, dir)
	held.open()
	got := h.waitSettled(sb.ID)
	if got.Status != "error" || !strings.Contains(got.Error, "is full") {
		t.Errorf("a create whose pull ran out of space: %+v, want the error state saying the disk is full", got)
	}
	t.Logf("a pull that ran out of space: %s", got.Error)
	failed := sb.ID

	// With the disk full, creates are refused at once.
	expectFull := func(what string, body map[string]any) {
		t.Helper()
		var p problem
		code := h.srv.call("POST", "/sandboxes", body, &p)
		if code != http.StatusInsufficientStorage || p.Code != "host_disk_full" {
			t.Errorf("%s with the disk full: %d %s, want 507 host_disk_full", what, code, p.raw)
		}
		t.Logf("%s with the disk full: %d %s", what, code, p.Detail)
	}
	expectFull("a create", shape)
	expectFull("a pull", map[string]any{"image": ref, "memory": 256})
	// A refused create's record normally goes; with the database unable
	// to write even that, it stays until there is space (then it is an
	// interrupted create, deleted below with the rest).
	for _, sb := range h.consistent() {
		if sb.ID != bystander.ID && sb.ID != failed && sb.Status == "running" {
			t.Errorf("a refused create left a running sandbox: %+v", sb)
		}
	}
	entries, _ := os.ReadDir(h.d.Images())
	for _, e := range entries {
		if e.Type()&os.ModeSymlink == 0 && !strings.HasSuffix(e.Name(), ".lock") && e.Name() != "refs" {
			t.Errorf("image cache entry %s kept from a pull that failed", e.Name())
		}
	}
	// The bystander cannot write to its disk either: QEMU stops it on
	// such a write, and it goes on once there is space. To be sure of
	// that path, it writes now.
	var p problem
	code, _ := h.srv.try(context.Background(), "POST", "/sandboxes/"+bystander.ID+"/exec",
		map[string]any{"command": "head -c 50000000 /dev/urandom > /root/big; sync", "timeout": 10}, &p)
	if code != http.StatusInsufficientStorage || p.Code != "host_disk_full" {
		t.Errorf("the bystander writing with the host disk full: %d %s, want 507 host_disk_full", code, p.raw)
	}
	t.Logf("the bystander writing 50 MB with the host disk full: %d %s", code, p.Detail)
	marks, _ := filepath.Glob(filepath.Join(h.d.Templates(), "*", "bad"))
	for _, m := range marks {
		// A clone may fail for other reasons on a loaded machine.
		if why, _ := os.ReadFile(m); strings.Contains(string(why), "no space") || strings.Contains(string(why), "is full") {
			t.Errorf("a template was retired for the host's full disk: %s", why)
		}
	}

	// Space again: everything works, the images that failed included,
	// and the bystander goes on by itself.
	free()
	h.srv.answers(bystander.ID)
	h.srv.exec(bystander.ID, "rm -f /root/big")
	h.srv.delete(failed)
	for _, r := range []string{heldRef, ref} {
		sb := h.srv.create2(map[string]any{"image": r, "memory": 256})
		h.srv.answers(sb.ID)
	}
	h.srv.create()
	h.srv.answers(bystander.ID)
	h.consistent()
	h.clean()
}

// waitSettled waits until a sandbox is no longer being created.
func (h *host) waitSettled(id string) sandbox {
	h.t.Helper()
	deadline := time.Now().Add(3 * time.Minute)
	for time.Now().Before(deadline) {
		sb, code := h.srv.get(id)
		if code != http.StatusOK || sb.Status != "creating" {
			return sb
		}
		time.Sleep(50 * time.Millisecond)
	}
	h.t.Fatalf("sandbox %s still creating after 3 minutes", id)
	return sandbox{}
}

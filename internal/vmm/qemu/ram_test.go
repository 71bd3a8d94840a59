package qemu

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// A template RAM file as a template's QEMU leaves it: sparse, with some
// pages of data, some of zeros written out, and holes.
func fakeTemplateRAM(t *testing.T) (path string, want []byte) {
	t.Helper()
	path = filepath.Join(t.TempDir(), fileMemory)
	const size = 64 << 20
	want = make([]byte, size)
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	for _, at := range []int64{0, 5 * pageSize, 1 << 20, 33<<20 + 3*pageSize, size - pageSize} {
		page := bytes.Repeat([]byte{byte(at>>12) | 1}, pageSize)
		copy(want[at:], page)
		if _, err := f.WriteAt(page, at); err != nil {
			t.Fatal(err)
		}
	}
	// Zeros written out: allocated in the file, left a hole in the copy.
	if _, err := f.WriteAt(make([]byte, 2<<20), 40<<20); err != nil {
		t.Fatal(err)
	}
	return path, want
}

// The sealed copy holds the file's bytes, every page allocated, and
// refuses writes, growing and shrinking.
func TestSealCopy(t *testing.T) {
	path, want := fakeTemplateRAM(t)
	var d Driver
	f, name, err := d.rams.open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	defer d.rams.drop()
	if !strings.HasPrefix(name, "smolvm-ram:") {
		t.Errorf("name %q", name)
	}
	got := make([]byte, len(want))
	if _, err := f.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Error("the sealed copy differs from the file")
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		t.Fatal(err)
	}
	// All of it allocated: a clone reading a hole would fill it in its
	// own memory.
	if used := st.Blocks * 512; used != st.Size {
		t.Errorf("the copy has %d of its %d bytes allocated", used, st.Size)
	}
	if _, err := f.WriteAt([]byte("x"), 0); err == nil {
		t.Error("a write into the sealed copy succeeded")
	}
	if err := f.Truncate(1 << 20); err == nil {
		t.Error("the sealed copy shrank")
	}
	seals, err := unix.FcntlInt(f.Fd(), unix.F_GET_SEALS, 0)
	if err != nil || seals&ramSeals != ramSeals {
		t.Errorf("seals %#x, %v", seals, err)
	}
	// A second open in the same process, with no clone running, hands
	// out the same copy.
	f2, _, err := d.rams.open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f2.Close()
	if !sameFile(t, f, f2) {
		t.Error("a second open made a second copy")
	}
}

// A restore in another process borrows the copy from a running clone the
// holders file lists; holders that ended are dropped from it.
func TestBorrowFromHolder(t *testing.T) {
	path, _ := fakeTemplateRAM(t)
	dir := filepath.Dir(path)
	var first Driver
	f, name, err := first.rams.open(path)
	if err != nil {
		t.Fatal(err)
	}
	first.rams.drop()
	// A "clone": any process holding the copy as descriptor 3.
	clone := exec.Command("sleep", "60")
	clone.ExtraFiles = []*os.File{f}
	if err := clone.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { clone.Process.Kill(); clone.Wait() }()
	f.Close()
	// An ended holder, listed after the live one.
	gone := exec.Command("true")
	if err := gone.Run(); err != nil {
		t.Fatal(err)
	}
	held(dir, name, gone.Process.Pid)
	held(dir, name, clone.Process.Pid)
	b, _ := os.ReadFile(filepath.Join(dir, ramHolder))
	if got := strings.Fields(string(b)); len(got) != 1 || got[0] != strconv.Itoa(clone.Process.Pid) {
		t.Errorf("holders %q, want only the live clone %d", got, clone.Process.Pid)
	}

	var other Driver
	g, _, err := other.rams.open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	if other.rams.last != nil {
		t.Error("the second driver made a copy of its own")
	}
	holder, err := os.Open("/proc/" + strconv.Itoa(clone.Process.Pid) + "/fd/3")
	if err != nil {
		t.Fatal(err)
	}
	defer holder.Close()
	if !sameFile(t, g, holder) {
		t.Error("the second driver's copy is not the one the clone holds")
	}

	// A rebuilt template (a new file at the path) is not served the old
	// copy.
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	path2, _ := fakeTemplateRAM(t)
	if err := os.Rename(path2, path); err != nil {
		t.Fatal(err)
	}
	h, _, err := other.rams.open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	defer other.rams.drop()
	if sameFile(t, h, holder) {
		t.Error("the rebuilt template got the old template's copy")
	}
}

func sameFile(t *testing.T, a, b *os.File) bool {
	t.Helper()
	var sa, sb syscall.Stat_t
	if err := errors.Join(syscall.Fstat(int(a.Fd()), &sa), syscall.Fstat(int(b.Fd()), &sb)); err != nil {
		t.Fatal(err)
	}
	return sa.Dev == sb.Dev && sa.Ino == sb.Ino
}

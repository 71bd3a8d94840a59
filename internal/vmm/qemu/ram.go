package qemu

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
)

// A clone maps its template's RAM private, so that every clone shares the
// pages none has written. QEMU 7.2 opens a memory-backend-file read-write
// whatever the sharing, and keeps the descriptor: a clone that mapped the
// template's own file could write into it (pwrite, fallocate), and so into
// every other clone's memory and every later one's. A clone therefore maps
// a sealed copy instead: a memfd holding the template's RAM, sealed
// against writes, growing and shrinking, which a private mapping may still
// write to copy-on-write. QEMU opens it by /proc/self/fd/3, handed down.
//
// One copy serves every clone of a template, made by whichever process
// (the server, the CLI): the template's ramHolder file lists the running
// clones that map it, and a restore borrows the copy from one of them
// (opening its /proc/PID/fd/3, as root or as the user QEMU runs as). A
// copy is made when a template is saved, or by a restore when no clone of
// the template runs, and lives as long as the clones that map it; the
// driver keeps the last one it made only until a restore can borrow it
// from a clone instead.

// ramHolder, in a template's directory, lists running clones' QEMUs that
// hold the template's sealed RAM as their descriptor ramFD, a pid a line,
// newest first.
const ramHolder = "memory.holder"

// maxHolders bounds the list.
const maxHolders = 32

// ramFD is where QEMU finds the sealed RAM: the first descriptor handed
// down.
const ramFD = 3

// ramSeals are what a sealed RAM must carry.
const ramSeals = unix.F_SEAL_SEAL | unix.F_SEAL_SHRINK | unix.F_SEAL_GROW | unix.F_SEAL_WRITE

// sealedRAMs serialises the driver's restores' copies and keeps the last
// one made.
type sealedRAMs struct {
	mu   sync.Mutex
	last *sealedRAM
}

type sealedRAM struct {
	f    *os.File
	name string
}

// ramName names the sealed copy of the file st describes: a template
// rebuilt at the same path is a different file.
func ramName(st *unix.Stat_t) string {
	return fmt.Sprintf("smolvm-ram:%d:%d:%d.%d:%d", st.Dev, st.Ino, st.Size, st.Mtim.Sec, st.Mtim.Nsec)
}

// open returns a descriptor of the sealed copy of the template RAM file
// path, borrowed or made, and its name for held. The caller closes it once
// QEMU has its own.
func (s *sealedRAMs) open(path string) (*os.File, string, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return nil, "", fmt.Errorf("template memory: %w", err)
	}
	name := ramName(&st)
	s.mu.Lock()
	defer s.mu.Unlock()
	if f := borrowRAM(filepath.Dir(path), name, st.Size); f != nil {
		s.drop()
		return f, name, nil
	}
	// By name, which is the file's identity: a template is saved in a
	// directory of its own and then moved into place.
	if s.last == nil || s.last.name != name {
		f, err := sealCopy(path, name, st.Size)
		if err != nil {
			return nil, "", err
		}
		s.drop()
		s.last = &sealedRAM{f: f, name: name}
	}
	fd, err := unix.FcntlInt(s.last.f.Fd(), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, "", fmt.Errorf("template memory: %w", err)
	}
	return os.NewFile(uintptr(fd), s.last.f.Name()), name, nil
}

// drop lets go of the copy kept.
func (s *sealedRAMs) drop() {
	if s.last != nil {
		s.last.f.Close()
		s.last = nil
	}
}

// held adds pid, a clone's QEMU now holding the sealed RAM name, to the
// holders of the template in dir, and drops those that no longer hold it.
func held(dir, name string, pid int) {
	pids := []int{pid}
	if b, err := os.ReadFile(filepath.Join(dir, ramHolder)); err == nil {
		for _, line := range strings.Fields(string(b)) {
			if p, err := strconv.Atoi(line); err == nil && p != pid && len(pids) < maxHolders && holds(p, name) {
				pids = append(pids, p)
			}
		}
	}
	var b strings.Builder
	for _, p := range pids {
		fmt.Fprintln(&b, p)
	}
	tmp := filepath.Join(dir, ramHolder+".tmp"+strconv.Itoa(os.Getpid()))
	err := os.WriteFile(tmp, []byte(b.String()), 0o644)
	if err == nil {
		err = os.Rename(tmp, filepath.Join(dir, ramHolder))
	}
	if err != nil {
		os.Remove(tmp)
		// Only sharing with later clones is lost.
		slog.Warn("record which clones hold a template's memory", "dir", dir, "err", err)
	}
}

// holds reports whether process pid holds the sealed RAM name as ramFD.
func holds(pid int, name string) bool {
	target, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/%d", pid, ramFD))
	return err == nil && target == "/memfd:"+name+" (deleted)"
}

// borrowRAM opens the sealed RAM named name from a clone the holders in
// dir list, or returns nil if none holds it.
func borrowRAM(dir, name string, size int64) *os.File {
	b, err := os.ReadFile(filepath.Join(dir, ramHolder))
	if err != nil {
		return nil
	}
	for _, line := range strings.Fields(string(b)) {
		pid, err := strconv.Atoi(line)
		if err != nil || pid <= 0 || !holds(pid, name) {
			continue
		}
		f, err := os.Open(fmt.Sprintf("/proc/%d/fd/%d", pid, ramFD))
		if err != nil {
			continue
		}
		// Opening the link opened the memfd itself; it must still be
		// the sealed copy of this file.
		seals, err := unix.FcntlInt(f.Fd(), unix.F_GET_SEALS, 0)
		var st unix.Stat_t
		if err != nil || seals&ramSeals != ramSeals || unix.Fstat(int(f.Fd()), &st) != nil || st.Size != size {
			f.Close()
			continue
		}
		return f
	}
	return nil
}

// sealCopy copies the template RAM file path into a new memfd and seals
// it. Only the pages that are not zeros are copied into the memfd, whose
// pages are all allocated, and so zero, first.
func sealCopy(path, name string, size int64) (_ *os.File, err error) {
	src, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("template memory: %w", err)
	}
	defer src.Close()
	fd, err := unix.MemfdCreate(name, unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
	if err != nil {
		return nil, fmt.Errorf("template memory: memfd_create: %w", err)
	}
	f := os.NewFile(uintptr(fd), "memfd:"+name)
	defer func() {
		if err != nil {
			f.Close()
		}
	}()
	// Every page is allocated here, zeros included. A hole would be
	// filled by the first clone to read it, in that clone's memory
	// control group and for good (shmem is not reclaimed without swap),
	// and a write after that copies it again: a clone filling its guest's
	// memory then held twice its RAM and was killed for its limit.
	if err := unix.Fallocate(int(f.Fd()), 0, 0, size); err != nil {
		return nil, fmt.Errorf("template memory: %w", err)
	}
	buf := make([]byte, 1<<20)
	zero := make([]byte, pageSize)
	for off := int64(0); off < size; {
		data, err := unix.Seek(int(src.Fd()), off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			break // no data past off
		}
		if err != nil {
			return nil, fmt.Errorf("template memory: %w", err)
		}
		hole, err := unix.Seek(int(src.Fd()), data, unix.SEEK_HOLE)
		if err != nil {
			return nil, fmt.Errorf("template memory: %w", err)
		}
		for pos := data; pos < hole; {
			n, err := src.ReadAt(buf[:min(int64(len(buf)), hole-pos)], pos)
			if n == 0 && err != nil {
				if err == io.EOF {
					break
				}
				return nil, fmt.Errorf("template memory: %w", err)
			}
			// Each run of pages that are not all zeros, in one write.
			run := -1
			for p := 0; p <= n; p += pageSize {
				nonzero := p < n && !bytes.Equal(buf[p:min(p+pageSize, n)], zero[:min(pageSize, n-p)])
				if nonzero && run < 0 {
					run = p
				}
				if !nonzero && run >= 0 {
					if _, err := f.WriteAt(buf[run:min(p, n)], pos+int64(run)); err != nil {
						return nil, fmt.Errorf("template memory: %w", err)
					}
					run = -1
				}
			}
			pos += int64(n)
		}
		off = hole
	}
	if _, err := unix.FcntlInt(f.Fd(), unix.F_ADD_SEALS, ramSeals); err != nil {
		return nil, fmt.Errorf("template memory: seal: %w", err)
	}
	return f, nil
}

const pageSize = 4096

// Package qcow2 reads what smolvm needs from a qcow2 image's header: the
// backing file a disk overlay is made over. It is read here rather than by
// running qemu-img, so it needs no QEMU and no running VM.
package qcow2

import (
	"encoding/binary"
	"io"
	"os"
)

// Magic begins every qcow2 file.
const Magic = "QFI\xfb"

// maxBackingName bounds the name read from a header; qcow2 allows 1023.
const maxBackingName = 4096

// Backing returns the backing file named in the header of the qcow2 file
// at path, as written there (possibly relative to the file). ok is false
// for a file that is not qcow2 or has no backing file.
func Backing(path string) (name string, ok bool) {
	f, err := os.Open(path)
	if err != nil {
		return "", false
	}
	defer f.Close()
	var h [20]byte
	if _, err := io.ReadFull(f, h[:]); err != nil || string(h[:4]) != Magic {
		return "", false
	}
	off := int64(binary.BigEndian.Uint64(h[8:16]))
	size := int64(binary.BigEndian.Uint32(h[16:20]))
	if off == 0 || size == 0 || size > maxBackingName {
		return "", false
	}
	b := make([]byte, size)
	if _, err := f.ReadAt(b, off); err != nil {
		return "", false
	}
	return string(b), true
}

package libkrun

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"

	"golang.org/x/sys/unix"
)

// qcow2Magic starts a qcow2 image ("QFI\xfb").
var qcow2Magic = []byte{'Q', 'F', 'I', 0xfb}

// createDisk makes the sandbox's raw disk at disk: a copy of the raw ext4
// base image, grown to sizeMiB (0: the base's size). libkrun opens raw
// images only, with no overlay, so each sandbox has a whole copy: a
// reflink where the filesystem shares blocks (XFS, Btrfs), else a copy
// that writes none of the base's holes and zero blocks, so it takes only
// the space the base's data does. The guest grows its filesystem to the
// disk at boot.
func createDisk(ctx context.Context, base, disk string, sizeMiB int) (err error) {
	src, err := os.Open(base)
	if err != nil {
		return fmt.Errorf("sandbox disk: base image: %w", err)
	}
	defer src.Close()
	st, err := src.Stat()
	if err != nil {
		return fmt.Errorf("sandbox disk: base image: %w", err)
	}
	if !st.Mode().IsRegular() {
		return fmt.Errorf("sandbox disk: base image %s is not a file", base)
	}
	head := make([]byte, len(qcow2Magic))
	if _, err := src.ReadAt(head, 0); err == nil && bytes.Equal(head, qcow2Magic) {
		return fmt.Errorf("sandbox disk: base image %s is qcow2; the libkrun backend boots raw images only", base)
	}
	size := st.Size()
	want := int64(sizeMiB) << 20
	if sizeMiB == 0 {
		want = size
	}
	if want < size {
		return fmt.Errorf("sandbox disk: %d MiB is smaller than the base image (%d MiB)", sizeMiB, (size+1<<20-1)>>20)
	}

	// Made under another name, so a disk that exists is a whole one.
	tmp := disk + ".tmp"
	os.Remove(tmp)
	dst, err := os.OpenFile(tmp, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return fmt.Errorf("sandbox disk: %w", err)
	}
	defer func() {
		if cerr := dst.Close(); err == nil && cerr != nil {
			err = fmt.Errorf("sandbox disk: %w", cerr)
		}
		if err != nil {
			os.Remove(tmp)
		}
	}()
	if err := unix.IoctlFileClone(int(dst.Fd()), int(src.Fd())); err != nil {
		if err := sparseCopy(ctx, src, dst, size); err != nil {
			return fmt.Errorf("sandbox disk: copy %s: %w", base, err)
		}
	}
	// Grown as a hole: the guest's filesystem takes the space as it
	// writes. No fsync: a host crash loses the sandbox anyway.
	if err := dst.Truncate(want); err != nil {
		return fmt.Errorf("sandbox disk: grow to %d MiB: %w", sizeMiB, err)
	}
	if err := os.Rename(tmp, disk); err != nil {
		return fmt.Errorf("sandbox disk: %w", err)
	}
	return nil
}

// copyBlock is the unit zero blocks are skipped in: ext4's usual block
// size, so a free block of the base stays a hole in the copy.
const copyBlock = 4096

// sparseCopy copies the first size bytes of src to dst at the same
// offsets, visiting only src's data (SEEK_DATA) and leaving holes where
// src has holes or blocks of zeros.
func sparseCopy(ctx context.Context, src, dst *os.File, size int64) error {
	buf := make([]byte, 1<<20)
	fd := int(src.Fd())
	for off := int64(0); off < size; {
		start, err := unix.Seek(fd, off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			return nil // only a hole is left
		}
		if err != nil {
			// No SEEK_DATA here: all of it counts as data.
			start = off
		}
		end, err := unix.Seek(fd, start, unix.SEEK_HOLE)
		if err != nil || end > size {
			end = size
		}
		for start < end {
			if err := ctx.Err(); err != nil {
				return err
			}
			n := min(int64(len(buf)), end-start)
			if _, err := src.ReadAt(buf[:n], start); err != nil && !errors.Is(err, io.EOF) {
				return err
			}
			for b := int64(0); b < n; b += copyBlock {
				blk := buf[b:min(b+copyBlock, n)]
				if allZero(blk) {
					continue
				}
				if _, err := dst.WriteAt(blk, start+b); err != nil {
					return err
				}
			}
			start += n
		}
		off = end
	}
	return nil
}

var zeroBlock [copyBlock]byte

func allZero(b []byte) bool { return bytes.Equal(b, zeroBlock[:len(b)]) }

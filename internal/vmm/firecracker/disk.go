package firecracker

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// copyDisk makes dst a copy of the raw image src, grown to sizeMiB (0:
// src's size). Firecracker has no copy-on-write image format, so each
// sandbox gets a file of its own: a reflink where the filesystem shares
// extents (btrfs, XFS), else a copy of src's data extents only, so the
// copy is as sparse as src and costs what src has written, not its size.
// The copy is made under a temporary name and renamed into place, so a
// crash never leaves a half-copied disk at dst.
func copyDisk(src, dst string, sizeMiB int) error {
	in, err := os.Open(src)
	if err != nil {
		return fmt.Errorf("disk: %w", err)
	}
	defer in.Close()
	return copyFrom(in, dst, sizeMiB)
}

// copyFrom is copyDisk from an open file.
func copyFrom(in *os.File, dst string, sizeMiB int) (err error) {
	src := in.Name()
	st, err := in.Stat()
	if err != nil {
		return fmt.Errorf("disk: %w", err)
	}
	if !st.Mode().IsRegular() {
		return fmt.Errorf("disk: base image %s is not a regular file", src)
	}
	size := st.Size()
	want := int64(sizeMiB) << 20
	if sizeMiB > 0 && want < size {
		// A raw ext4 image cannot be cut: the filesystem in it would
		// reach past the end of its disk.
		return fmt.Errorf("disk: %d MiB is smaller than the base image %s (%d MiB)", sizeMiB, src, (size+(1<<20)-1)>>20)
	}
	tmp, err := os.CreateTemp(filepath.Dir(dst), "."+filepath.Base(dst)+".*")
	if err != nil {
		return fmt.Errorf("disk: %w", err)
	}
	defer func() {
		tmp.Close()
		if err != nil {
			os.Remove(tmp.Name())
		}
	}()
	// The sandbox's disk is its data: 0600 as CreateTemp made it, for its
	// owner (root, or the jail's user it is handed to) alone.
	if unix.IoctlFileClone(int(tmp.Fd()), int(in.Fd())) != nil {
		if err := copySparse(in, tmp, size); err != nil {
			return fmt.Errorf("disk: copy %s: %w", src, err)
		}
	}
	if want > size {
		size = want
	}
	if err := tmp.Truncate(size); err != nil {
		return fmt.Errorf("disk: grow to %d bytes: %w", size, err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("disk: %w", err)
	}
	if err := os.Rename(tmp.Name(), dst); err != nil {
		return fmt.Errorf("disk: %w", err)
	}
	return nil
}

// copySparse copies the data extents of in (size bytes) to out at the same
// offsets, leaving holes as holes.
func copySparse(in, out *os.File, size int64) error {
	ifd := int(in.Fd())
	var off int64
	for off < size {
		data, err := unix.Seek(ifd, off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			break // only a hole is left
		}
		if err != nil {
			// No SEEK_DATA here: copy everything.
			return copyRange(in, out, 0, size)
		}
		hole, err := unix.Seek(ifd, data, unix.SEEK_HOLE)
		if err != nil {
			hole = size
		}
		if err := copyRange(in, out, data, hole-data); err != nil {
			return err
		}
		off = hole
	}
	return out.Truncate(size)
}

// copyRange copies n bytes at off from in to out, in the kernel when it
// can (copy_file_range, which may share extents itself).
func copyRange(in, out *os.File, off, n int64) error {
	roff, woff := off, off
	for n > 0 {
		c, err := unix.CopyFileRange(int(in.Fd()), &roff, int(out.Fd()), &woff, int(min(n, 1<<30)), 0)
		if err != nil || c == 0 {
			// Not supported between these files: read and write.
			_, werr := io.Copy(io.NewOffsetWriter(out, woff), io.NewSectionReader(in, roff, n))
			return werr
		}
		n -= int64(c)
	}
	return nil
}

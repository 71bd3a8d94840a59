package qemu

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"

	"github.com/smolvm/smolvm/internal/qcow2"
)

// fileBlankOverlay is, in a snapshot's directory, an empty overlay over the
// snapshot's disk, made once with qemu-img. A restore copies it (a few
// hundred KiB, well under a millisecond) rather than running qemu-img,
// which costs 20 to 30 ms of every clone, most of it the program's start.
// Every overlay of one snapshot is the same file: a header naming the same
// backing disk by its absolute path, at the same size, with no clusters.
const fileBlankOverlay = "overlay.qcow2"

// overlay makes disk an empty overlay over the disk of the snapshot in
// snapDir, at its size.
func overlay(ctx context.Context, snapDir, disk string) error {
	base, err := filepath.Abs(filepath.Join(snapDir, fileDisk))
	if err != nil {
		return err
	}
	blank := filepath.Join(snapDir, fileBlankOverlay)
	if b, ok := qcow2.Backing(blank); !ok || b != base {
		if err := makeBlank(ctx, base, blank); err != nil {
			// A snapshot directory this process may not write, say:
			// the clone's own overlay is made as before.
			slog.Debug("no blank overlay for the snapshot; making the clone's with qemu-img", "snapshot", snapDir, "err", err)
			return createDisk(ctx, base, disk, 0)
		}
	}
	// A clone's directory is new, but a failed start may have left a disk.
	if err := removeIfThere(disk); err != nil {
		return fmt.Errorf("create disk overlay: %w", err)
	}
	if err := copySparse(blank, disk, 0o644); err != nil {
		return fmt.Errorf("create disk overlay: %w", err)
	}
	return nil
}

// makeBlank writes blank under another name and renames it into place, so
// that a restore running beside never copies half of one.
func makeBlank(ctx context.Context, base, blank string) error {
	var b [6]byte
	if _, err := rand.Read(b[:]); err != nil {
		return err
	}
	tmp := filepath.Join(filepath.Dir(blank), ".overlay-"+hex.EncodeToString(b[:])+".qcow2")
	if err := createDisk(ctx, base, tmp, 0); err != nil {
		return errors.Join(err, removeIfThere(tmp))
	}
	if err := os.Rename(tmp, blank); err != nil {
		return errors.Join(err, removeIfThere(tmp))
	}
	return nil
}

func removeIfThere(path string) error {
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

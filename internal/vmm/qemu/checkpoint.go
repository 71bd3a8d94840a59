package qemu

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/smolvm/smolvm/internal/vmm"
)

// runState is what query-status says of the VM.
type runState struct {
	Status  string `json:"status"`
	Running bool   `json:"running"`
}

func queryStatus(ctx context.Context, m *monitor) (runState, error) {
	var st runState
	err := m.run(ctx, "query-status", nil, &st)
	return st, err
}

func qemuMachine(vm vmm.Machine, op string) (*machine, error) {
	qm, ok := vm.(*machine)
	if !ok {
		return nil, fmt.Errorf("%s: %T is not a QEMU machine", op, vm)
	}
	return qm, nil
}

// Pause stops the VM's vCPUs; memory and devices stay as they are. A VM
// that is not running is left alone.
func (d *Driver) Pause(ctx context.Context, vm vmm.Machine) error {
	qm, err := qemuMachine(vm, "pause")
	if err != nil {
		return err
	}
	m, err := dialQMP(ctx, qm.rt.QMPSocket)
	if err != nil {
		return fmt.Errorf("pause: %w", err)
	}
	defer m.Close()
	st, err := queryStatus(ctx, m)
	if err != nil {
		return fmt.Errorf("pause: %w", err)
	}
	if !st.Running {
		return nil
	}
	if err := m.run(ctx, "stop", nil, nil); err != nil {
		return fmt.Errorf("pause: %w", err)
	}
	return nil
}

// Resume lets a paused VM run again; a running VM is left alone.
func (d *Driver) Resume(ctx context.Context, vm vmm.Machine) error {
	qm, err := qemuMachine(vm, "resume")
	if err != nil {
		return err
	}
	m, err := dialQMP(ctx, qm.rt.QMPSocket)
	if err != nil {
		return fmt.Errorf("resume: %w", err)
	}
	defer m.Close()
	st, err := queryStatus(ctx, m)
	if err != nil {
		return fmt.Errorf("resume: %w", err)
	}
	if st.Running {
		return nil
	}
	// cont also takes the disks back after a completed migration.
	if err := m.run(ctx, "cont", nil, nil); err != nil {
		return fmt.Errorf("resume (VM %s): %w", st.Status, err)
	}
	return nil
}

// Checkpoint saves a VM that goes on running: its whole state (RAM
// included) into dir/state and a copy of its disk into dir/disk.qcow2,
// which Restore starts copies from as it does from a template. There is no
// memory file: a template's clone maps its template's RAM file private, so
// its RAM is in the stream, and its copies load it into anonymous RAM.
//
// The VM is stopped for the save and the copy of its disk, for the reason
// Save stops it; it runs again afterwards if it was running. A failed
// checkpoint removes what it wrote and leaves the VM as it was.
func (d *Driver) Checkpoint(ctx context.Context, vm vmm.Machine, dir string) (err error) {
	qm, err := qemuMachine(vm, "checkpoint")
	if err != nil {
		return err
	}
	statePath, diskPath := filepath.Join(dir, fileState), filepath.Join(dir, fileDisk)
	if st, err := os.Stat(dir); err != nil {
		return fmt.Errorf("checkpoint: %w", err)
	} else if !st.IsDir() {
		return fmt.Errorf("checkpoint: %s is not a directory", dir)
	}
	// Never overwrite: dir may be a machine's own, whose disk is in use,
	// and what is removed after a failure must be only what was written.
	for _, f := range []string{statePath, diskPath} {
		if _, err := os.Lstat(f); !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("checkpoint into %s: %s is there already", dir, filepath.Base(f))
		}
	}

	m, err := dialQMP(ctx, qm.rt.QMPSocket)
	if err != nil {
		return fmt.Errorf("checkpoint: %w", err)
	}
	defer func() { m.Close() }()
	if err := checkRAMObject(ctx, m); err != nil {
		return err
	}
	st, err := queryStatus(ctx, m)
	if err != nil {
		return fmt.Errorf("checkpoint: %w", err)
	}
	wasRunning := st.Running
	// From here a failure undoes: the VM may be stopped, its disks given
	// up by a migration, and files written.
	migrating := false
	defer func() {
		if err == nil {
			return
		}
		m.Close()
		if uerr := undoCheckpoint(ctx, qm, wasRunning, migrating, statePath, diskPath); uerr != nil {
			err = errors.Join(err, fmt.Errorf("undo the failed checkpoint: %w", uerr))
		}
	}()
	if wasRunning {
		if err := m.run(ctx, "stop", nil, nil); err != nil {
			return fmt.Errorf("checkpoint: %w", err)
		}
	}
	// A template's clone was loaded with x-ignore-shared on, and the
	// capability is the process's: its copies are loaded without it, and
	// QEMU refuses a stream whose capability differs.
	if err := m.run(ctx, "migrate-set-capabilities", map[string]any{
		"capabilities": []map[string]any{{"capability": "x-ignore-shared", "state": false}},
	}, nil); err != nil {
		return fmt.Errorf("checkpoint: %w", err)
	}
	// Local file, paused guest: no reason for the default 32 MiB/s cap.
	if err := m.run(ctx, "migrate-set-parameters", map[string]any{"max-bandwidth": int64(1) << 40}, nil); err != nil {
		return fmt.Errorf("checkpoint: %w", err)
	}
	// Set before the call: a migration may have begun even if its answer
	// never comes.
	migrating = true
	if err := migrateTo(ctx, m, statePath, os.O_EXCL, "checkpoint VM state"); err != nil {
		return qm.withLog(fmt.Errorf("checkpoint: %w", err))
	}
	// The completed migration flushed the disk and let go of it; nothing
	// writes it until cont.
	if err := copySparse(qm.rt.Disk, diskPath, 0o444); err != nil {
		return fmt.Errorf("checkpoint: copy the disk: %w", err)
	}
	// cont takes the disks back (QEMU gave them up for the migration's
	// destination). A paused VM is stopped again at once: left as the
	// migration leaves it, it could be neither migrated nor resized.
	if err := m.run(ctx, "cont", nil, nil); err != nil {
		return fmt.Errorf("checkpoint: %w", err)
	}
	if !wasRunning {
		if err := m.run(ctx, "stop", nil, nil); err != nil {
			return fmt.Errorf("checkpoint: %w", err)
		}
	}
	return nil
}

// checkRAMObject makes sure the VM's RAM is the backend object all its
// copies have (machineArgs): a VM started by an earlier smolvm has QEMU's
// default, and its state would load into none of them.
func checkRAMObject(ctx context.Context, m *monitor) error {
	var backend string
	if err := m.run(ctx, "qom-get", map[string]any{"path": "/machine", "property": "memory-backend"}, &backend); err != nil {
		return fmt.Errorf("checkpoint: %w", err)
	}
	if path.Base(backend) != ramObject {
		return fmt.Errorf("checkpoint: the VM's RAM is %q, not %q: it was started by an earlier smolvm, and its state would restore nowhere; restart it first", backend, ramObject)
	}
	return nil
}

// undoTimeout bounds putting a VM back after a failed checkpoint, which
// runs even when the checkpoint's own context has ended.
const undoTimeout = 30 * time.Second

// undoCheckpoint ends a migration still under way, removes what the
// checkpoint wrote and puts the VM back in its run state. It talks to
// QEMU over a session of its own: the checkpoint's may have been left
// mid-reply by a cancelled context.
func undoCheckpoint(ctx context.Context, qm *machine, wasRunning, migrating bool, files ...string) error {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), undoTimeout)
	defer cancel()
	var errs []error
	m, err := dialQMP(ctx, qm.rt.QMPSocket)
	if err == nil {
		defer m.Close()
		if migrating {
			errs = append(errs, cancelMigration(ctx, m))
		}
	}
	// After the cancel, so cat is not still writing the state.
	for _, f := range files {
		if err := os.Remove(f); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	if err != nil {
		return errors.Join(append(errs, err)...)
	}
	st, err := queryStatus(ctx, m)
	if err != nil {
		return errors.Join(append(errs, err)...)
	}
	switch {
	case wasRunning && !st.Running:
		errs = append(errs, m.run(ctx, "cont", nil, nil))
	case !wasRunning && st.Status == "postmigrate":
		// The disks are back only with cont; stop again at once.
		errs = append(errs, m.run(ctx, "cont", nil, nil), m.run(ctx, "stop", nil, nil))
	case !wasRunning && st.Running:
		errs = append(errs, m.run(ctx, "stop", nil, nil))
	}
	return errors.Join(errs...)
}

// cancelMigration cancels a migration that has not ended and waits until
// it has.
func cancelMigration(ctx context.Context, m *monitor) error {
	cancelled := false
	for {
		var st struct {
			Status string `json:"status"`
		}
		if err := m.run(ctx, "query-migrate", nil, &st); err != nil {
			return err
		}
		switch st.Status {
		case "", "none", "completed", "failed", "cancelled":
			return nil
		}
		if !cancelled {
			if err := m.run(ctx, "migrate_cancel", nil, nil); err != nil {
				return err
			}
			cancelled = true
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("cancel the migration: %w", ctx.Err())
		case <-time.After(5 * time.Millisecond):
		}
	}
}

// copySparse copies the file src to a new file dst of mode (0444 for a
// snapshot's disk): a reflink where the filesystem shares extents (no data
// is copied), else a copy of src's data that leaves its holes holes.
func copySparse(src, dst string, mode os.FileMode) (err error) {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	// The mode from the start; the descriptor still writes.
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, mode)
	if err != nil {
		return err
	}
	defer func() {
		if cerr := out.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			os.Remove(dst)
		}
	}()
	if err := unix.IoctlFileClone(int(out.Fd()), int(in.Fd())); err == nil {
		return nil
	}
	// EOPNOTSUPP, EXDEV, EINVAL, ENOTTY: no shared extents here.
	return copyData(in, out)
}

// copyData copies in's data ranges into the empty file out at the same
// offsets. A filesystem that cannot tell holes reports the whole file as
// data, which is copied whole.
func copyData(in, out *os.File) error {
	st, err := in.Stat()
	if err != nil {
		return err
	}
	size := st.Size()
	if err := out.Truncate(size); err != nil {
		return err
	}
	for off := int64(0); off < size; {
		data, err := in.Seek(off, unix.SEEK_DATA)
		if errors.Is(err, syscall.ENXIO) {
			break // only a hole is left
		}
		if err != nil {
			return fmt.Errorf("find data in %s: %w", in.Name(), err)
		}
		hole, err := in.Seek(data, unix.SEEK_HOLE)
		if err != nil {
			return fmt.Errorf("find a hole in %s: %w", in.Name(), err)
		}
		if _, err := in.Seek(data, io.SeekStart); err != nil {
			return err
		}
		if _, err := out.Seek(data, io.SeekStart); err != nil {
			return err
		}
		// *os.File to *os.File: copy_file_range, in the kernel.
		if _, err := io.CopyN(out, in, hole-data); err != nil {
			return fmt.Errorf("copy %s: %w", in.Name(), err)
		}
		off = hole
	}
	return nil
}

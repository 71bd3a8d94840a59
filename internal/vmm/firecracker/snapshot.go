package firecracker

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"github.com/smolvm/smolvm/internal/vmm"
)

// A snapshot is a directory holding the VM's state (vmstate), its memory
// (memory) and its disk (rootfs.ext4), all frozen: root's, mode 0444. The
// state records the drive and the vsock socket at their paths under vmDir
// and the NIC as tapName, which is what every VM sees (helper.go), so a
// clone's own files stand in for the template's.

// snapshotTimeout bounds a snapshot's writing or loading when the caller
// sets no deadline: it goes as fast as the guest's memory is written.
const snapshotTimeout = 2 * time.Minute

func fcMachine(vm vmm.Machine, op string) (*machine, error) {
	m, ok := vm.(*machine)
	if !ok {
		return nil, fmt.Errorf("%s: %T is not a Firecracker machine", op, vm)
	}
	return m, nil
}

func withSnapshotTimeout(ctx context.Context) (context.Context, context.CancelFunc) {
	if _, ok := ctx.Deadline(); ok {
		return ctx, func() {}
	}
	return context.WithTimeout(ctx, snapshotTimeout)
}

// Save pauses the VM, writes its state and memory into dir (the directory
// it runs in) and ends it. The disk it ran on is then consistent with the
// saved memory and is never written again: each clone gets a copy. What
// stays in dir is the snapshot, and the console for the caller.
func (d *Driver) Save(ctx context.Context, vm vmm.Machine, dir string) error {
	m, err := fcMachine(vm, "save")
	if err != nil {
		return err
	}
	if filepath.Clean(dir) != m.rt.Dir {
		return fmt.Errorf("save: the VM runs in %s, not %s", m.rt.Dir, dir)
	}
	ctx, cancel := withSnapshotTimeout(ctx)
	defer cancel()
	run := filepath.Join(dir, dirRun)
	for _, f := range []string{fileState, fileMemory} {
		if err := m.createFor(filepath.Join(run, f)); err != nil {
			return fmt.Errorf("save: %w", err)
		}
	}
	c := m.api()
	if err := c.patch(ctx, "/vm", vmState{State: "Paused"}); err != nil {
		return fmt.Errorf("save: %w", err)
	}
	// Into Firecracker's own directory, in files made for it.
	if err := c.put(ctx, "/snapshot/create", snapshotCreate{
		SnapshotType: "Full",
		SnapshotPath: inVM(dirRun, fileState),
		MemFilePath:  inVM(dirRun, fileMemory),
	}); err != nil {
		return withLog(fmt.Errorf("save: %w", err), dir)
	}
	// Firecracker has no request to quit; the snapshot is complete.
	if err := m.Kill(ctx); err != nil {
		return fmt.Errorf("save: %w", err)
	}
	var errs []error
	for _, f := range []string{fileState, fileMemory} {
		if err := os.Rename(filepath.Join(run, f), filepath.Join(dir, f)); err != nil {
			errs = append(errs, fmt.Errorf("save: %w", err))
		}
	}
	for _, f := range []string{fileState, fileMemory, fileDisk} {
		errs = append(errs, freeze(filepath.Join(dir, f)))
	}
	for _, f := range []string{dirRun, fileLog, fileRelay} {
		errs = append(errs, os.RemoveAll(filepath.Join(dir, f)))
	}
	return errors.Join(errs...)
}

// freeze makes a snapshot's file root's and read-only: the jail's user,
// which wrote it, may be handed to another VM later. It follows no link:
// the file was the jail's user's.
func freeze(p string) error {
	f, err := openOwn(p)
	if err != nil {
		return fmt.Errorf("freeze: %w", err)
	}
	defer f.Close()
	if err := f.Chown(0, 0); err != nil {
		return fmt.Errorf("freeze %s: %w", p, err)
	}
	if err := f.Chmod(0o444); err != nil {
		return fmt.Errorf("freeze %s: %w", p, err)
	}
	return nil
}

// Restore starts a copy of the snapshot in snapDir: a copy of its disk (a
// reflink, else sparse) in spec.Dir, at the snapshot's size, and a new
// Firecracker that loads its state and maps its memory privately (clones
// share the pages none of them has written, through the page cache) and
// resumes it. spec must describe the machine that was saved; its network
// is its own (a TAP in its own namespace, relayed to spec.Net).
func (d *Driver) Restore(ctx context.Context, spec vmm.Spec, snapDir string) (vmm.Machine, error) {
	if err := d.checkSpec(spec); err != nil {
		return nil, err
	}
	for _, f := range d.SnapshotFiles() {
		if _, err := os.Stat(filepath.Join(snapDir, f)); err != nil {
			return nil, fmt.Errorf("restore: snapshot: %w", err)
		}
	}
	t := time.Now()
	disk := filepath.Join(spec.Dir, fileDisk)
	if err := os.Remove(disk); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("restore: %w", err)
	}
	if err := copyDisk(filepath.Join(snapDir, fileDisk), disk, 0); err != nil {
		return nil, fmt.Errorf("restore: %w", err)
	}
	t = vmm.Step(ctx, "disk copy", t)
	defer vmm.Step(ctx, "state load", t)
	lctx, cancel := withSnapshotTimeout(ctx)
	defer cancel()
	m, err := d.launch(lctx, spec, []string{filepath.Join(snapDir, fileState), filepath.Join(snapDir, fileMemory)}, func(ctx context.Context, c *client) error {
		return c.put(ctx, "/snapshot/load", snapshotLoad{
			SnapshotPath: fdPath(fdState),
			MemBackend:   memBackend{BackendType: "File", BackendPath: fdPath(fdMemory)},
			ResumeVM:     true,
		})
	})
	if err != nil {
		os.Remove(disk)
		return nil, fmt.Errorf("restore from %s: %w", snapDir, err)
	}
	return m, nil
}

// SnapshotFiles are the files of a complete snapshot.
func (d *Driver) SnapshotFiles() []string { return []string{fileDisk, fileState, fileMemory} }

// DropState removes what a restore reads; running clones keep their
// mappings of the memory, and their disks are copies.
func (d *Driver) DropState(snapDir string) error {
	var errs []error
	for _, f := range []string{fileState, fileMemory} {
		if err := os.Remove(filepath.Join(snapDir, f)); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// Uses is always false: a clone's disk is a copy of the snapshot's, not
// an overlay over it, and the memory it maps stays mapped if the file is
// removed.
func (d *Driver) Uses(dir, snapDir string) bool { return false }

// Pause stops the VM's vCPUs.
func (d *Driver) Pause(ctx context.Context, vm vmm.Machine) error {
	return setState(ctx, vm, "Paused")
}

// Resume lets a paused VM run again.
func (d *Driver) Resume(ctx context.Context, vm vmm.Machine) error {
	return setState(ctx, vm, "Resumed")
}

func setState(ctx context.Context, vm vmm.Machine, state string) error {
	m, err := fcMachine(vm, state)
	if err != nil {
		return err
	}
	if err := m.api().patch(ctx, "/vm", vmState{State: state}); err != nil {
		return fmt.Errorf("set the VM %s: %w", state, err)
	}
	return nil
}

// Resize grows the VM's disk: the file first, then Firecracker is told
// to read its size again (PATCH of the drive naming the same file), which
// tells the guest.
func (d *Driver) Resize(ctx context.Context, vm vmm.Machine, bytes int64) error {
	m, err := fcMachine(vm, "resize")
	if err != nil {
		return err
	}
	st, err := os.Stat(m.rt.Disk)
	if err != nil {
		return fmt.Errorf("resize: %w", err)
	}
	if bytes < st.Size() {
		return fmt.Errorf("resize: the disk is %d bytes; it cannot shrink to %d", st.Size(), bytes)
	}
	if err := os.Truncate(m.rt.Disk, bytes); err != nil {
		return fmt.Errorf("resize: %w", err)
	}
	if err := m.api().patch(ctx, "/drives/"+driveID, partialDrive{DriveID: driveID, PathOnHost: inVM(fileDisk)}); err != nil {
		return fmt.Errorf("resize: %w", err)
	}
	return nil
}

// Checkpoint saves a VM that goes on running: its state and memory and a
// copy of its disk into dir, the layout Restore reads. The VM is paused
// for it and runs again afterwards if it was running. A failed checkpoint
// removes what it wrote.
//
// Firecracker resets the guest's vsock connections when it saves, so the
// agent's connection is to be dialled again afterwards.
func (d *Driver) Checkpoint(ctx context.Context, vm vmm.Machine, dir string) (err error) {
	m, err := fcMachine(vm, "checkpoint")
	if err != nil {
		return err
	}
	if st, err := os.Stat(dir); err != nil {
		return fmt.Errorf("checkpoint: %w", err)
	} else if !st.IsDir() {
		return fmt.Errorf("checkpoint: %s is not a directory", dir)
	}
	// Never overwrite: dir may be a machine's own, and what is removed
	// after a failure must be only what was written.
	for _, f := range d.SnapshotFiles() {
		if _, err := os.Lstat(filepath.Join(dir, f)); !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("checkpoint into %s: %s is there already", dir, f)
		}
	}
	ctx, cancel := withSnapshotTimeout(ctx)
	defer cancel()
	c := m.api()
	info, err := c.info(ctx)
	if err != nil {
		return fmt.Errorf("checkpoint: %w", err)
	}
	wasRunning := info.State == "Running"
	run := filepath.Join(m.rt.Dir, dirRun)
	// Names of their own in Firecracker's directory: a Save may follow.
	tmpState, tmpMemory := "checkpoint."+fileState, "checkpoint."+fileMemory
	written := []string{filepath.Join(run, tmpState), filepath.Join(run, tmpMemory)}
	for _, f := range written {
		if err := m.createFor(f); err != nil {
			os.Remove(written[0])
			return fmt.Errorf("checkpoint: %w", err)
		}
	}
	for _, f := range d.SnapshotFiles() {
		written = append(written, filepath.Join(dir, f))
	}
	defer func() {
		if err == nil {
			return
		}
		for _, f := range written {
			os.Remove(f)
		}
		if wasRunning {
			uctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), requestTimeout)
			defer cancel()
			if rerr := c.patch(uctx, "/vm", vmState{State: "Resumed"}); rerr != nil {
				err = errors.Join(err, fmt.Errorf("resume after the failed checkpoint: %w", rerr))
			}
		}
	}()
	if wasRunning {
		if err := c.patch(ctx, "/vm", vmState{State: "Paused"}); err != nil {
			return fmt.Errorf("checkpoint: %w", err)
		}
	}
	if err := c.put(ctx, "/snapshot/create", snapshotCreate{
		SnapshotType: "Full",
		SnapshotPath: inVM(dirRun, tmpState),
		MemFilePath:  inVM(dirRun, tmpMemory),
	}); err != nil {
		return fmt.Errorf("checkpoint: %w", err)
	}
	// Paused, the guest writes nothing: the copy matches the memory.
	if err := copyDisk(m.rt.Disk, filepath.Join(dir, fileDisk), 0); err != nil {
		return fmt.Errorf("checkpoint: %w", err)
	}
	for _, f := range []struct{ from, to string }{{tmpState, fileState}, {tmpMemory, fileMemory}} {
		if err := move(filepath.Join(run, f.from), filepath.Join(dir, f.to)); err != nil {
			return fmt.Errorf("checkpoint: %w", err)
		}
	}
	for _, f := range d.SnapshotFiles() {
		if err := freeze(filepath.Join(dir, f)); err != nil {
			return fmt.Errorf("checkpoint: %w", err)
		}
	}
	if wasRunning {
		if err := c.patch(ctx, "/vm", vmState{State: "Resumed"}); err != nil {
			return fmt.Errorf("checkpoint: %w", err)
		}
	}
	return nil
}

// move renames from to to, copying (sparsely) across filesystems.
func move(from, to string) error {
	err := os.Rename(from, to)
	if !errors.Is(err, syscall.EXDEV) {
		return err
	}
	in, err := openOwn(from)
	if err != nil {
		return err
	}
	defer in.Close()
	if err := copyFrom(in, to, 0); err != nil {
		return err
	}
	return os.Remove(from)
}

package qemu

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"github.com/smolvm/smolvm/internal/qcow2"
	"github.com/smolvm/smolvm/internal/vmm"
)

// Save writes the VM's whole state (memory and devices) into dir, the
// directory it runs in, and ends the process. The disk it ran on is then
// consistent with the saved memory and is never written again: clones
// overlay it.
//
// The VM is stopped first and saved in one pass. A live save copies memory
// while the guest runs and relies on dirty-page tracking to resend what
// changed; the clones of one live-saved template were seen to oops at once
// under TCG (docs/architecture.md, "Why templates are saved stopped"). A
// stopped guest sits on an instruction boundary with nothing in flight,
// and the saved state says "paused", so Restore resumes it explicitly.
func (d *Driver) Save(ctx context.Context, vm vmm.Machine, dir string) error {
	qm, ok := vm.(*machine)
	if !ok {
		return fmt.Errorf("save: %T is not a QEMU machine", vm)
	}
	statePath := filepath.Join(dir, fileState)
	m, err := dialQMP(ctx, qm.rt.QMPSocket)
	if err != nil {
		return err
	}
	defer m.Close()
	if err := m.run(ctx, "stop", nil, nil); err != nil {
		return err
	}
	if qm.rt.MemoryFile != "" {
		// The RAM is already in its file: save only the devices.
		if err := ignoreShared(ctx, m); err != nil {
			return err
		}
	}
	// The default bandwidth cap (32 MiB/s) is for live migration over a
	// network; a paused VM going to a local file should go at disk speed.
	if err := m.run(ctx, "migrate-set-parameters", map[string]any{"max-bandwidth": int64(1) << 40}, nil); err != nil {
		return err
	}
	if err := migrateTo(ctx, m, statePath, os.O_TRUNC, "save VM state"); err != nil {
		return qm.withLog(err)
	}
	// QEMU may close the socket before it answers quit; whether the
	// process ends is what counts.
	qerr := m.run(ctx, "quit", nil, nil)
	if err := qm.Wait(ctx); err != nil {
		return errors.Join(err, qerr)
	}
	// What stays is the snapshot, and the console for the caller. The
	// disk is never written again: clones overlay it.
	var errs []error
	for _, f := range []string{fileAgent, fileQMP, filePID, fileLog} {
		if err := os.Remove(filepath.Join(dir, f)); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	if err := os.Chmod(filepath.Join(dir, fileDisk), 0o444); err != nil {
		errs = append(errs, err)
	}
	// The files the VM's user wrote become root's: that user is handed
	// to another VM once this one has ended.
	for _, f := range []string{fileDisk, fileMemory} {
		if os.Geteuid() != 0 {
			break
		}
		if err := os.Lchown(filepath.Join(dir, f), 0, 0); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	if qm.rt.MemoryFile != "" && len(errs) == 0 {
		// The clones' sealed copy, made now while the memory is in the
		// page cache, so that the first clone does not wait for it. Only
		// that wait is lost if it fails: the first restore makes it.
		if f, _, err := d.rams.open(filepath.Join(dir, fileMemory)); err != nil {
			slog.Warn("copy a saved template's memory for its clones", "dir", dir, "err", err)
		} else {
			f.Close()
		}
	}
	return errors.Join(errs...)
}

// waitMigration polls query-migrate until the migration in either
// direction completes or fails.
func waitMigration(ctx context.Context, m *monitor, what string) error {
	for {
		var st struct {
			Status    string `json:"status"`
			ErrorDesc string `json:"error-desc"`
		}
		if err := m.run(ctx, "query-migrate", nil, &st); err != nil {
			return fmt.Errorf("%s: %w", what, err)
		}
		switch st.Status {
		case "completed":
			// QEMU reports the migration completed a moment before
			// the VM leaves finish-migrate, and refuses cont until it
			// has ("Migration is not finalized yet").
			return waitRunState(ctx, m, "finish-migrate", what)
		case "failed", "cancelled":
			return fmt.Errorf("%s: migration %s: %s", what, st.Status, st.ErrorDesc)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s: %w", what, ctx.Err())
		case <-time.After(5 * time.Millisecond):
		}
	}
}

// waitRunState waits until the VM's run state is no longer leave.
func waitRunState(ctx context.Context, m *monitor, leave, what string) error {
	for {
		st, err := queryStatus(ctx, m)
		if err != nil {
			return fmt.Errorf("%s: %w", what, err)
		}
		if st.Status != leave {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s: still %s: %w", what, leave, ctx.Err())
		case <-time.After(5 * time.Millisecond):
		}
	}
}

// Restore starts a VM from a snapshot written by Save. spec must describe
// the same machine (memory, vCPUs, devices) as the saved one; its disk is
// a new overlay over the snapshot's frozen disk, at the same size. QEMU
// starts waiting for the state (-incoming defer), loads it, and the guest
// resumes where it was stopped.
func (d *Driver) Restore(ctx context.Context, spec vmm.Spec, snapDir string) (vmm.Machine, error) {
	statePath := filepath.Join(snapDir, fileState)
	if _, err := os.Stat(statePath); err != nil {
		return nil, fmt.Errorf("template state: %w", err)
	}
	if err := checkSpec(spec); err != nil {
		return nil, err
	}
	// QEMU saves no VM whose guest has a 9p share mounted, and the agent
	// mounts every share at boot: no snapshot has the devices a spec
	// with shares would add, and the state would not load.
	if len(spec.Mounts) > 0 {
		return nil, fmt.Errorf("restore: a VM with shared directories cannot be restored from a snapshot; boot it instead")
	}
	t := time.Now()
	if err := overlay(ctx, snapDir, filepath.Join(spec.Dir, fileDisk)); err != nil {
		return nil, err
	}
	t = vmm.Step(ctx, "disk overlay", t)
	// A template's RAM is its memory file, mapped private; a checkpoint
	// has none, its RAM is all in the state and loads into anonymous RAM.
	var mem memory
	if f := filepath.Join(snapDir, fileMemory); fileExists(f) {
		sealed, name, err := d.rams.open(f)
		if err != nil {
			return nil, err
		}
		// QEMU has a descriptor of its own once started.
		defer sealed.Close()
		mem = memory{file: f, sealed: sealed, sealedName: name}
	}
	qm, err := d.start(ctx, spec, mem, "-incoming", "defer")
	if err != nil {
		return nil, err
	}
	t = vmm.Step(ctx, "QEMU start", t)
	defer vmm.Step(ctx, "state load", t)
	if err := d.resume(ctx, qm, statePath); err != nil {
		if !qm.Alive() {
			err = fmt.Errorf("QEMU exited while loading the saved state %s (is it damaged?): %w", statePath, err)
		}
		if kerr := qm.Kill(context.WithoutCancel(ctx)); kerr != nil {
			return nil, errors.Join(err, kerr)
		}
		return nil, err
	}
	return qm, nil
}

// SnapshotFiles are the files of a complete snapshot: the disk, the
// device state, and the RAM.
func (d *Driver) SnapshotFiles() []string { return []string{fileDisk, fileState, fileMemory} }

// DropState removes what a restore reads from a snapshot; its disk stays
// for the machines made over it (the clones that map its RAM keep their
// mappings).
func (d *Driver) DropState(snapDir string) error {
	var errs []error
	for _, f := range []string{fileState, fileMemory} {
		if err := os.Remove(filepath.Join(snapDir, f)); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// ignoreShared makes a migration skip RAM mapped shared from a file.
func ignoreShared(ctx context.Context, m *monitor) error {
	return m.run(ctx, "migrate-set-capabilities", map[string]any{
		"capabilities": []map[string]any{{"capability": "x-ignore-shared", "state": true}},
	}, nil)
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

// maxChain bounds the backing chain Uses follows: a base image, a
// template, checkpoints of checkpoints. It stops a loop in a damaged chain.
const maxChain = 64

// Uses reports whether the disk of the machine in dir is made over the
// snapshot's disk in snapDir, directly or through other disks: a machine
// restored from a checkpoint of a template's clone needs the checkpoint's
// disk and the template's.
func (d *Driver) Uses(dir, snapDir string) bool {
	want, err := filepath.Abs(filepath.Join(snapDir, fileDisk))
	if err != nil {
		return false
	}
	disk := filepath.Join(dir, fileDisk)
	for range maxChain {
		backing, ok := qcow2.Backing(disk)
		if !ok {
			return false
		}
		if !filepath.IsAbs(backing) {
			backing = filepath.Join(filepath.Dir(disk), backing)
		}
		if filepath.Clean(backing) == want {
			return true
		}
		disk = backing
	}
	return false
}

// resume loads statePath into a VM started with -incoming defer and lets
// it run.
func (d *Driver) resume(ctx context.Context, qm *machine, statePath string) error {
	m, err := dialQMP(ctx, qm.rt.QMPSocket)
	if err != nil {
		return err
	}
	defer m.Close()
	// With the RAM mapped from the template's file, only the devices are
	// in the stream; the capability must be set before it is read.
	if qm.rt.MemoryFile != "" {
		if err := ignoreShared(ctx, m); err != nil {
			return err
		}
	}
	// After a load QEMU announces the VM's network card: the guest is
	// told to send gratuitous ARP, unsolicited neighbour advertisements
	// and multicast reports, rounds of them. Nothing hears them (the
	// network process is the guest's one peer, and knows its addresses),
	// and in a clone just restored the guest code that sends them runs
	// for the first time, about a thousand blocks for TCG to translate
	// while the host waits for the agent.
	if err := m.run(ctx, "migrate-set-parameters", map[string]any{"announce-rounds": 0}, nil); err != nil {
		return fmt.Errorf("load VM state: %w", err)
	}
	f, err := os.Open(statePath)
	if err != nil {
		return fmt.Errorf("load VM state: %w", err)
	}
	// QEMU has its own copy once getfd answers, and reads it to the end.
	defer f.Close()
	if err := m.passFile(ctx, stateFD, f); err != nil {
		return err
	}
	if err := m.run(ctx, "migrate-incoming", map[string]any{"uri": "fd:" + stateFD}, nil); err != nil {
		return err
	}
	// QEMU sets the VM's run state from the saved one ("paused") when the
	// load ends, and says the migration completed only after that. A cont
	// sent while it still loads only sets autostart, which the saved state
	// then overrides: the clone would stay paused.
	// A state that fails to load ends the process and so this session.
	if err := waitMigration(ctx, m, "load VM state"); err != nil {
		return err
	}
	st, err := queryStatus(ctx, m)
	if err != nil {
		return fmt.Errorf("start the restored VM: %w", err)
	}
	if st.Status == "running" {
		return nil
	}
	if err := m.run(ctx, "cont", nil, nil); err != nil {
		return fmt.Errorf("start the restored VM: %w", err)
	}
	if st, err = queryStatus(ctx, m); err != nil || st.Status != "running" {
		return fmt.Errorf("start the restored VM: it is %q after cont: %v", st.Status, err)
	}
	return nil
}

// Resize grows the VM's root disk; the guest sees the new size at once.
func (d *Driver) Resize(ctx context.Context, vm vmm.Machine, bytes int64) error {
	qm, ok := vm.(*machine)
	if !ok {
		return fmt.Errorf("resize: %T is not a QEMU machine", vm)
	}
	m, err := dialQMP(ctx, qm.rt.QMPSocket)
	if err != nil {
		return err
	}
	defer m.Close()
	return m.run(ctx, "block_resize", map[string]any{"device": "root", "size": bytes}, nil)
}

// Status is the VM's run state as QEMU reports it ("running", "inmigrate",
// "paused", ...).
func (d *Driver) Status(ctx context.Context, vm vmm.Machine) (string, error) {
	qm, ok := vm.(*machine)
	if !ok {
		return "", fmt.Errorf("status: %T is not a QEMU machine", vm)
	}
	m, err := dialQMP(ctx, qm.rt.QMPSocket)
	if err != nil {
		return "", err
	}
	defer m.Close()
	var st struct {
		Status string `json:"status"`
	}
	err = m.run(ctx, "query-status", nil, &st)
	return st.Status, err
}

// Stalled reports whether QEMU stopped the VM on a failed write (its
// default for a full host disk is to stop: werror=enospc).
func (d *Driver) Stalled(ctx context.Context, vm vmm.Machine) (bool, error) {
	st, err := d.Status(ctx, vm)
	return st == "io-error", err
}

// Unstall continues a VM stopped on a failed write.
func (d *Driver) Unstall(ctx context.Context, vm vmm.Machine) error {
	qm, ok := vm.(*machine)
	if !ok {
		return fmt.Errorf("continue: %T is not a QEMU machine", vm)
	}
	m, err := dialQMP(ctx, qm.rt.QMPSocket)
	if err != nil {
		return err
	}
	defer m.Close()
	return m.run(ctx, "cont", nil, nil)
}

// withLog adds what QEMU printed, which often says why a migration
// failed when QMP does not.
func (m *machine) withLog(err error) error {
	b, rerr := os.ReadFile(filepath.Join(filepath.Dir(m.rt.QMPSocket), fileLog))
	if rerr != nil || len(bytes.TrimSpace(b)) == 0 {
		return err
	}
	if len(b) > 2048 {
		b = b[len(b)-2048:]
	}
	return fmt.Errorf("%w (QEMU said: %s)", err, bytes.TrimSpace(b))
}

// stateFD is the name a state file's descriptor is passed to QEMU under.
const stateFD = "smolvm-state"

// migrateTo writes the VM's state to a new file at path through a
// descriptor QEMU is given (flag: os.O_TRUNC to replace a file, os.O_EXCL
// to refuse one), and waits until the migration completes.
func migrateTo(ctx context.Context, m *monitor, path string, flag int, what string) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|flag, 0o644)
	if err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	// QEMU writes to its own copy and closes it when the migration ends.
	defer f.Close()
	if err := m.passFile(ctx, stateFD, f); err != nil {
		return err
	}
	if err := m.run(ctx, "migrate", map[string]any{"uri": "fd:" + stateFD}, nil); err != nil {
		return err
	}
	return waitMigration(ctx, m, what)
}

package qemu

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/smolvm/smolvm/internal/vmm"
)

// Save writes the VM's whole state (memory and devices) to statePath and
// ends the process. The disk it ran on is then consistent with the saved
// memory and must never be written again: clones overlay it.
//
// The VM is stopped first and saved in one pass. A live save copies memory
// while the guest runs and relies on dirty-page tracking to resend what
// changed; under TCG that produced states whose clones oopsed at once
// (docs/architecture.md, "Why templates are saved stopped"). A stopped
// guest sits on an instruction boundary with nothing in flight, and the
// saved state says "paused", so Restore resumes it explicitly.
func (d *Driver) Save(ctx context.Context, inst vmm.Instance, statePath string) error {
	if err := checkStatePath(statePath); err != nil {
		return err
	}
	m, err := dialQMP(ctx, inst.QMPSocket)
	if err != nil {
		return err
	}
	defer m.Close()
	if err := m.run(ctx, "stop", nil, nil); err != nil {
		return err
	}
	// The default bandwidth cap (32 MiB/s) is for live migration over a
	// network; a paused VM going to a local file should go at disk speed.
	if err := m.run(ctx, "migrate-set-parameters", map[string]any{"max-bandwidth": int64(1) << 40}, nil); err != nil {
		return err
	}
	if err := m.run(ctx, "migrate", map[string]any{"uri": "exec:cat > " + statePath}, nil); err != nil {
		return err
	}
	if err := waitMigration(ctx, m, "save VM state"); err != nil {
		return err
	}
	// QEMU may close the socket before it answers quit; whether the
	// process ends is what counts.
	qerr := m.run(ctx, "quit", nil, nil)
	if err := d.Wait(ctx, inst); err != nil {
		return errors.Join(err, qerr)
	}
	return nil
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
			return err
		}
		switch st.Status {
		case "completed":
			return nil
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

// Restore starts a VM from a state written by Save. spec must describe the
// same machine (memory, vCPUs, devices) as the saved one; its disk is an
// overlay over the frozen disk of the saved VM. QEMU starts waiting for
// the state (-incoming defer), loads it, and the guest resumes where it
// was stopped.
func (d *Driver) Restore(ctx context.Context, spec vmm.Spec, statePath string) (vmm.Instance, error) {
	if _, err := os.Stat(statePath); err != nil {
		return vmm.Instance{}, fmt.Errorf("template state: %w", err)
	}
	if err := checkStatePath(statePath); err != nil {
		return vmm.Instance{}, err
	}
	inst, err := d.start(ctx, spec, "-incoming", "defer")
	if err != nil {
		return vmm.Instance{}, err
	}
	if err := d.resume(ctx, inst, statePath); err != nil {
		if !d.Alive(inst) {
			err = fmt.Errorf("QEMU exited while loading the saved state %s (is it damaged?): %w", statePath, err)
		}
		if kerr := d.Kill(context.WithoutCancel(ctx), inst); kerr != nil {
			return vmm.Instance{}, errors.Join(err, kerr)
		}
		return vmm.Instance{}, err
	}
	return inst, nil
}

// resume loads statePath into a VM started with -incoming defer and lets
// it run.
func (d *Driver) resume(ctx context.Context, inst vmm.Instance, statePath string) error {
	m, err := dialQMP(ctx, inst.QMPSocket)
	if err != nil {
		return err
	}
	defer m.Close()
	if err := m.run(ctx, "migrate-incoming", map[string]any{"uri": "exec:cat " + statePath}, nil); err != nil {
		return err
	}
	// cont while QEMU is still "inmigrate" would be overridden by the
	// saved run state ("paused") once loading ends, so wait for that.
	// A state that fails to load ends the process and so this session.
	for {
		var st struct {
			Status string `json:"status"`
		}
		if err := m.run(ctx, "query-status", nil, &st); err != nil {
			return fmt.Errorf("load VM state: %w", err)
		}
		switch st.Status {
		case "running":
			return nil
		case "inmigrate":
			select {
			case <-ctx.Done():
				return fmt.Errorf("load VM state: %w", ctx.Err())
			case <-time.After(5 * time.Millisecond):
			}
		default:
			return m.run(ctx, "cont", nil, nil)
		}
	}
}

// Resize grows the VM's root disk; the guest sees the new size at once.
func (d *Driver) Resize(ctx context.Context, inst vmm.Instance, bytes int64) error {
	m, err := dialQMP(ctx, inst.QMPSocket)
	if err != nil {
		return err
	}
	defer m.Close()
	return m.run(ctx, "block_resize", map[string]any{"device": "root", "size": bytes}, nil)
}

// Status is the VM's run state as QEMU reports it ("running", "inmigrate",
// "paused", ...).
func (d *Driver) Status(ctx context.Context, inst vmm.Instance) (string, error) {
	m, err := dialQMP(ctx, inst.QMPSocket)
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

// checkStatePath refuses a state path the shell would read as more than
// one plain word: QEMU runs "exec:" migration URIs with /bin/sh -c.
func checkStatePath(p string) error {
	if p == "" || strings.Trim(p, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789/._+-=,:@%") != "" {
		return fmt.Errorf("state path %q has characters a shell would interpret: use a data directory (SMOLVM_DATA_DIR) of letters, digits and /._+-=,:@%%", p)
	}
	return nil
}

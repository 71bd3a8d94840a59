package qemu

import (
	"context"
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
// The VM is saved running (QEMU pauses it only for the final copy), so the
// state records it as running and a restored copy resumes by itself, with
// no QMP round trip on the restore path.
func (d *Driver) Save(ctx context.Context, inst vmm.Instance, statePath string) error {
	m, err := dialQMP(ctx, inst.QMPSocket)
	if err != nil {
		return err
	}
	defer m.Close()
	// The default bandwidth cap (32 MiB/s) is for live migration over a
	// network; a paused VM going to a local file should go at disk speed.
	if err := m.run(ctx, "migrate-set-parameters", map[string]any{"max-bandwidth": int64(1) << 40}, nil); err != nil {
		return err
	}
	if strings.ContainsAny(statePath, "'\"\\ ") {
		return fmt.Errorf("state path %q must not contain quotes, spaces or backslashes", statePath)
	}
	if err := m.run(ctx, "migrate", map[string]any{"uri": "exec:cat > " + statePath}, nil); err != nil {
		return err
	}
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
			m.run(ctx, "quit", nil, nil)
			return d.Wait(ctx, inst)
		case "failed", "cancelled":
			return fmt.Errorf("save VM state: migration %s: %s", st.Status, st.ErrorDesc)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("save VM state: %w", ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// Restore starts a VM from a state written by Save. spec must describe the
// same machine (memory, vCPUs, devices) as the saved one; its disk is an
// overlay over the frozen disk of the saved VM. The guest resumes by itself
// once the state is loaded.
func (d *Driver) Restore(ctx context.Context, spec vmm.Spec, statePath string) (vmm.Instance, error) {
	if _, err := os.Stat(statePath); err != nil {
		return vmm.Instance{}, fmt.Errorf("template state: %w", err)
	}
	if strings.ContainsAny(statePath, "'\"\\ ") {
		return vmm.Instance{}, fmt.Errorf("state path %q must not contain quotes, spaces or backslashes", statePath)
	}
	return d.start(ctx, spec, "-incoming", "exec:cat "+statePath)
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

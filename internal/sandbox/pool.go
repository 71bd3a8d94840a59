package sandbox

import (
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/smolvm/smolvm/internal/network"
	"github.com/smolvm/smolvm/internal/store"
)

// statusPooled marks a sandbox restored ahead of time and not yet handed
// out. Pooled sandboxes are real, running VMs, but no caller sees them
// until a Create claims one.
const statusPooled = store.StatusPooled

// statusWarming marks a pool member still running its warm-up commands.
const statusWarming = store.StatusWarming

// poolShape is the one create request the pool serves: the defaults.
func poolShape() CreateRequest {
	return CreateRequest{OS: "", MemoryMiB: DefaultMemoryMiB, DiskSizeMiB: DefaultDiskMiB, VCPUs: DefaultVCPUs, Backend: DefaultBackend,
		Network: network.Policy{Mode: network.ModeOpen}}
}

// poolable reports whether a normalized request can take a pooled sandbox.
func poolable(req CreateRequest) bool {
	want := poolShape()
	return (req.OS == "" || req.OS == "debian") && req.Image == "" &&
		req.MemoryMiB == want.MemoryMiB && req.DiskSizeMiB == want.DiskSizeMiB &&
		req.VCPUs == want.VCPUs && req.Backend == want.Backend &&
		req.Network.Enabled() // the policy and ports are set on the way out
}

// takePooled claims a ready pooled sandbox, if there is one, gives it req's
// network policy and ports, and wakes the refiller. An error is req's fault
// (a host port in use, say): the claimed sandbox is gone again.
func (m *Manager) takePooled(ctx context.Context, req CreateRequest) (Info, bool, error) {
	if m.opts.Pool <= 0 {
		return Info{}, false, nil
	}
	defer m.wakePool()
	recs, err := m.store.List(ctx)
	if err != nil {
		return Info{}, false, nil
	}
	for _, r := range recs {
		// Its network process must be there too: a member whose network
		// died would be handed out without one.
		if r.Status != statusPooled || !readNet(r).Policy.Enabled() || !network.Running(r.Dir) {
			continue
		}
		// Only one that answers: a pooled VM may have died unseen, or be
		// held by another process, which would then claim it itself.
		cctx, cancel := context.WithTimeout(ctx, time.Second)
		_, err := m.client(cctx, r)
		cancel()
		if err != nil {
			continue
		}
		now := time.Now().UTC()
		ok, err := m.store.Claim(ctx, r.ID, statusPooled, StatusRunning, now)
		if err != nil || !ok {
			m.sessions.drop(r.ID)
			continue
		}
		r.Status, r.CreatedAt = StatusRunning, now
		m.publishSandbox(EventSandboxCreated, toInfo(r))
		if err := m.configureClaimed(ctx, &r, req); err != nil {
			m.remove(context.WithoutCancel(ctx), r)
			if e, ok := AsError(err); ok && (e.Kind == KindInvalid || e.Kind == KindConflict) {
				return Info{}, false, err
			}
			continue
		}
		info := toInfo(r)
		info.Boot = BootPool
		return info, true, nil
	}
	return Info{}, false, nil
}

// configureClaimed gives a pooled sandbox, just claimed, the network the
// request asked for: pool members wait with the default policy and no
// ports.
func (m *Manager) configureClaimed(ctx context.Context, r *store.Record, req CreateRequest) error {
	unlock := m.lock(r.ID)
	defer unlock()
	if !req.Network.Equal(poolShape().Network) {
		if err := network.Dial(network.Files{Dir: r.Dir}.Control()).SetPolicy(ctx, req.Network); err != nil {
			return fmt.Errorf("set network policy: %w", err)
		}
	}
	writeNet(r, requestedNet(req))
	if err := m.applyPorts(ctx, r); err != nil {
		return err
	}
	return m.transition(ctx, r, StatusRunning, StatusRunning)
}

func (m *Manager) wakePool() {
	select {
	case m.poolWake <- struct{}{}:
	default:
	}
}

// runPool keeps opts.Pool sandboxes of the default shape restored and
// waiting, until ctx ends.
func (m *Manager) runPool(ctx context.Context) {
	defer close(m.poolDone)
	for {
		if err := m.fillPool(ctx); err != nil && ctx.Err() == nil {
			fmt.Fprintf(m.opts.Progress, "smolvm: pool: %v\n", err)
			select {
			case <-ctx.Done():
				return
			case <-time.After(5 * time.Second):
			}
			continue
		}
		select {
		case <-ctx.Done():
			return
		case <-m.poolWake:
		case <-time.After(10 * time.Second):
		}
	}
}

func (m *Manager) fillPool(ctx context.Context) error {
	for {
		recs, err := m.store.List(ctx)
		if err != nil {
			return err
		}
		ready := 0
		for _, r := range recs {
			if m.abandoned(r) {
				m.remove(context.WithoutCancel(ctx), r)
				continue
			}
			if r.Status != statusPooled {
				continue
			}
			// A member made before sandboxes had networks cannot serve.
			if _, mach, err := m.machine(r); err == nil && mach.Alive() && readNet(r).Policy.Enabled() {
				ready++
				continue
			}
			m.remove(ctx, r)
		}
		if ready >= m.opts.Pool {
			return nil
		}
		if err := m.addPoolMember(ctx); err != nil {
			return err
		}
	}
}

// addPoolMember creates one sandbox for the pool, warms it up and offers it.
func (m *Manager) addPoolMember(ctx context.Context) error {
	info, err := m.create(ctx, poolShape(), statusWarming)
	if err != nil {
		return fmt.Errorf("refill: %w", err)
	}
	m.setWarming(info.ID, true)
	defer m.setWarming(info.ID, false)
	// Whatever happens from here, the member must not be left behind
	// half-made, even when ctx is what ended.
	cleanup := context.WithoutCancel(ctx)
	rec, err := m.store.Get(cleanup, info.ID)
	if err != nil {
		return err
	}
	// Under emulation a restored VM translates every code path anew on
	// first use: run a command through each shell mode now, so the one
	// who takes it does not pay for that.
	for _, req := range []ExecRequest{{Command: "true", Shell: ShellRaw}, {Command: "true", Shell: ShellLogin}} {
		wreq, _ := execRequest(req)
		if _, err := m.stream(ctx, rec, wreq, io.Discard, io.Discard); err != nil {
			m.remove(cleanup, rec)
			return fmt.Errorf("warm up: %w", err)
		}
	}
	if _, err := m.store.Claim(cleanup, info.ID, statusWarming, statusPooled, time.Now().UTC()); err != nil {
		m.remove(cleanup, rec)
		return err
	}
	return nil
}

// abandoned reports a pool member left half-warmed by a process that
// stopped: not being warmed here, and untouched for longer than a warm-up
// takes (another process may be warming it right now).
func (m *Manager) abandoned(r store.Record) bool {
	return r.Status == statusWarming && !m.isWarming(r.ID) && time.Since(r.UpdatedAt) > 2*time.Minute
}

func (m *Manager) setWarming(id string, on bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if on {
		m.warming[id] = true
	} else {
		delete(m.warming, id)
	}
}

func (m *Manager) isWarming(id string) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.warming[id]
}

// drainPool deletes the pooled sandboxes this process holds.
func (m *Manager) drainPool(ctx context.Context) error {
	recs, err := m.store.List(ctx)
	if err != nil {
		return err
	}
	var errs []error
	for _, r := range recs {
		if r.Status == statusPooled || m.abandoned(r) {
			if err := m.remove(ctx, r); err != nil {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}

// visible reports whether callers may see a record.
func visible(r store.Record) bool { return r.Status != statusPooled && r.Status != statusWarming }

// PoolReady counts the pooled sandboxes waiting to be handed out.
func (m *Manager) PoolReady(ctx context.Context) (int, error) {
	recs, err := m.store.List(ctx)
	if err != nil {
		return 0, err
	}
	n := 0
	for _, r := range recs {
		if r.Status == statusPooled {
			n++
		}
	}
	return n, nil
}

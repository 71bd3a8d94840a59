package sandbox

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/smolvm/smolvm/internal/guest"
	"github.com/smolvm/smolvm/internal/store"
	"github.com/smolvm/smolvm/internal/vmm"
)

// DefaultStopTimeout is how long Stop waits for the guest to power off
// before it kills the VM.
const DefaultStopTimeout = 10 * time.Second

// wrongState is the conflict every lifecycle call answers when the sandbox
// is not in a state it can act on; it carries the current status.
func wrongState(rec store.Record, verb string) error {
	msg := fmt.Sprintf("sandbox %s is %s: it cannot be %s", rec.ID, rec.Status, verb)
	if rec.Status == StatusCreating {
		msg = fmt.Sprintf("sandbox %s is still being created", rec.ID)
	}
	return &Error{Kind: KindConflict, Code: "invalid_state", Message: msg, Status: rec.Status}
}

// locked runs fn with the sandbox's lifecycle lock held, on its record
// read again under the lock, so what another caller did while this one
// waited counts.
func (m *Manager) locked(ctx context.Context, id string, fn func(rec store.Record) error) error {
	rec, err := m.get(ctx, id)
	if err != nil {
		return err
	}
	unlock := m.lock(rec.ID)
	defer unlock()
	if rec, err = m.get(ctx, rec.ID); err != nil {
		return err
	}
	return fn(rec)
}

// Stop shuts the guest down cleanly, killing the VM if it has not powered
// off within timeout (0: DefaultStopTimeout), and keeps its disk, so Start
// can boot it again. A paused sandbox is resumed to shut down.
func (m *Manager) Stop(ctx context.Context, id string, timeout time.Duration) error {
	if timeout <= 0 {
		timeout = DefaultStopTimeout
	}
	return m.locked(ctx, id, func(rec store.Record) error {
		if rec.Status != StatusRunning && rec.Status != StatusPaused {
			return wrongState(rec, "stopped")
		}
		return m.stop(ctx, rec, timeout)
	})
}

// stop powers rec's VM off, the caller holding its lock.
func (m *Manager) stop(ctx context.Context, rec store.Record, timeout time.Duration) error {
	drv, mach, err := m.l.machine(rec)
	if err != nil {
		return err
	}
	if rec.Status == StatusPaused {
		if p, ok := drv.(vmm.Pauser); ok {
			if err := p.Resume(ctx, mach); err != nil {
				m.opts.Logger.Warn("resume a paused VM to shut it down", "sandbox", rec.ID, "err", err)
			}
		}
	}
	// A clean shutdown when the agent answers; m.l.client would take the
	// lock this call holds, so dial directly when nothing is cached.
	sctx, cancel := context.WithTimeout(ctx, min(5*time.Second, timeout))
	c := m.sessions.live(rec.ID)
	if c == nil {
		if dialed, err := guest.Dial(sctx, mach.DialAgent); err == nil {
			defer dialed.Close()
			c = dialed
		}
	}
	if c != nil && !c.Closed() {
		c.Shutdown(sctx)
	}
	cancel()
	m.sessions.drop(rec.ID)
	wctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	if mach.Wait(wctx) != nil {
		// It did not power off in time; halt kills it. The network
		// process ends by itself once the VM is gone; halt makes sure.
		m.opts.Logger.Warn("VM did not shut down in time; killing it", "sandbox", rec.ID, "timeout", timeout)
	}
	if err := m.l.halt(ctx, rec); err != nil {
		return fmt.Errorf("stop sandbox %s: %w", rec.ID, err)
	}
	rec.PID, rec.Error = 0, ""
	return m.l.transition(ctx, &rec, StatusStopped, StatusRunning, StatusPaused)
}

// Start boots a stopped sandbox again from its own disk; one that failed
// (status error) is booted again the same way.
func (m *Manager) Start(ctx context.Context, id string) (Info, error) {
	var info Info
	err := m.locked(ctx, id, func(rec store.Record) error {
		if rec.Status != StatusStopped && rec.Status != StatusError {
			return wrongState(rec, "started")
		}
		drv, err := m.drivers.Get(rec.Backend)
		if err != nil {
			return fmt.Errorf("sandbox %s: %w", rec.ID, err)
		}
		a, err := m.l.assets(ctx, sourceOf(rec), rec.DiskSizeMiB, nil)
		if err != nil {
			return err
		}
		if info, err = m.l.boot(ctx, drv, a, &rec, false, StatusRunning); err != nil {
			cctx := context.WithoutCancel(ctx)
			terr := m.l.halt(cctx, rec)
			rec.PID, rec.Error = 0, err.Error()
			if uerr := m.l.transition(cctx, &rec, StatusError); uerr != nil {
				terr = errors.Join(terr, uerr)
			}
			m.l.logTeardown(rec.ID, "failed start", terr)
			return err
		}
		return nil
	})
	return info, err
}

// pauser is rec's driver as a Pauser, or the error saying it is not one.
func (m *Manager) pauser(rec store.Record) (vmm.Pauser, vmm.Machine, error) {
	drv, mach, err := m.l.machine(rec)
	if err != nil {
		return nil, nil, err
	}
	p, ok := drv.(vmm.Pauser)
	if !ok {
		return nil, nil, &Error{Kind: KindUnavailable, Code: "unsupported",
			Message: fmt.Sprintf("backend %s cannot pause a sandbox", rec.Backend)}
	}
	return p, mach, nil
}

// Pause stops the sandbox's vCPUs and keeps its memory: its processes
// stand still, and Resume lets them go on where they were. Commands and
// files are refused while it is paused.
func (m *Manager) Pause(ctx context.Context, id string) (Info, error) {
	var info Info
	err := m.locked(ctx, id, func(rec store.Record) error {
		if rec.Status != StatusRunning {
			return wrongState(rec, "paused")
		}
		var err error
		info, err = m.pause(ctx, rec)
		return err
	})
	return info, err
}

func (m *Manager) pause(ctx context.Context, rec store.Record) (Info, error) {
	p, mach, err := m.pauser(rec)
	if err != nil {
		return Info{}, err
	}
	if err := p.Pause(ctx, mach); err != nil {
		return Info{}, fmt.Errorf("pause sandbox %s: %w", rec.ID, err)
	}
	if err := m.l.transition(ctx, &rec, StatusPaused, StatusRunning); err != nil {
		// The record did not move: neither does the VM.
		if rerr := p.Resume(context.WithoutCancel(ctx), mach); rerr != nil {
			err = errors.Join(err, rerr)
		}
		return Info{}, err
	}
	return toInfo(rec), nil
}

// Resume lets a paused sandbox run again. A sandbox paused by its time
// limit gets that limit again from now.
func (m *Manager) Resume(ctx context.Context, id string) (Info, error) {
	var info Info
	err := m.locked(ctx, id, func(rec store.Record) error {
		if rec.Status != StatusPaused {
			return wrongState(rec, "resumed")
		}
		p, mach, err := m.pauser(rec)
		if err != nil {
			return err
		}
		if err := p.Resume(ctx, mach); err != nil {
			return fmt.Errorf("resume sandbox %s: %w", rec.ID, err)
		}
		if t := readConfig(rec).timeout(); t > 0 && rec.Deadline.IsZero() {
			rec.Deadline = time.Now().Add(t).UTC()
		}
		if err := m.l.transition(ctx, &rec, StatusRunning, StatusPaused); err != nil {
			if perr := p.Pause(context.WithoutCancel(ctx), mach); perr != nil {
				err = errors.Join(err, perr)
			}
			return err
		}
		info = toInfo(rec)
		return nil
	})
	return info, err
}

// UpdateRequest changes a sandbox's settings; nil fields stay as they are.
type UpdateRequest struct {
	// Timeout sets the time limit to this long from now; 0 removes it.
	Timeout *time.Duration
}

// Update changes a sandbox's time limit.
func (m *Manager) Update(ctx context.Context, id string, req UpdateRequest) (Info, error) {
	if req.Timeout != nil && (*req.Timeout < 0 || *req.Timeout > MaxTimeout) {
		return Info{}, invalid("invalid_timeout", "timeout", "timeout must be between 0 (no limit) and %d seconds (24 h), got %.0f", int(MaxTimeout.Seconds()), req.Timeout.Seconds())
	}
	var info Info
	err := m.locked(ctx, id, func(rec store.Record) error {
		if rec.Status == StatusCreating {
			return wrongState(rec, "changed")
		}
		if req.Timeout != nil {
			c := readConfig(rec)
			c.TimeoutMS = req.Timeout.Milliseconds()
			rec.Deadline = time.Time{}
			if *req.Timeout > 0 {
				rec.Deadline = time.Now().Add(*req.Timeout).UTC()
				if c.OnTimeout == "" {
					c.OnTimeout = OnTimeoutDelete
				}
			}
			writeConfig(&rec, c)
		}
		if err := m.l.transition(ctx, &rec, rec.Status); err != nil {
			return err
		}
		info = toInfo(rec)
		return nil
	})
	if err == nil {
		m.l.publishSandbox(EventSandboxUpdated, info)
	}
	return info, err
}

// reapInterval is how often the Manager looks for sandboxes past their
// deadline.
const reapInterval = time.Second

// runReaper enforces time limits until ctx ends: a sandbox past its
// deadline is deleted or paused, as it asked. Deadlines are in the store,
// so a limit that ran out while no server ran is enforced at the next
// start.
func (m *Manager) runReaper(ctx context.Context) {
	defer close(m.reaperDone)
	t := time.NewTicker(reapInterval)
	defer t.Stop()
	for {
		m.reap(ctx)
		m.unstallAll(ctx)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

func (m *Manager) reap(ctx context.Context) {
	recs, err := m.store.Expired(ctx, time.Now())
	if err != nil {
		if ctx.Err() == nil {
			m.opts.Logger.Error("look for sandboxes past their time limit", "err", err)
		}
		return
	}
	for _, rec := range recs {
		if !visible(rec) || rec.Status == StatusCreating {
			continue
		}
		c := readConfig(rec)
		var err error
		switch {
		case c.OnTimeout == OnTimeoutPause:
			err = m.locked(ctx, rec.ID, func(rec store.Record) error {
				if rec.Deadline.IsZero() || rec.Deadline.After(time.Now()) {
					return nil // extended meanwhile
				}
				rec.Deadline = time.Time{}
				if rec.Status != StatusRunning {
					return m.l.transition(ctx, &rec, rec.Status)
				}
				if err := m.l.transition(ctx, &rec, StatusRunning); err != nil {
					return err
				}
				_, err := m.pause(ctx, rec)
				return err
			})
		default:
			err = m.Delete(ctx, rec.ID)
		}
		if err != nil && ctx.Err() == nil {
			if e, ok := AsError(err); ok && e.Kind == KindNotFound {
				continue
			}
			m.opts.Logger.Error("end a sandbox past its time limit", "sandbox", rec.ID, "on_timeout", c.OnTimeout, "err", err)
			continue
		}
		m.opts.Logger.Info("sandbox reached its time limit", "sandbox", rec.ID, "on_timeout", c.OnTimeout)
	}
}

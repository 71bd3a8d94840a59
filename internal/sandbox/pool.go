package sandbox

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"

	"github.com/smolvm/smolvm/internal/agent/agentpb"
	"github.com/smolvm/smolvm/internal/network"
	"github.com/smolvm/smolvm/internal/store"
)

// statusPooled marks a sandbox restored ahead of time and not yet handed
// out. Pooled sandboxes are real, running VMs, but no caller sees them
// until a Create claims one.
const statusPooled = store.StatusPooled

// statusWarming marks a pool member still running its warm-up commands.
const statusWarming = store.StatusWarming

// pool keeps sandboxes of the default shape restored, warmed up and
// waiting, so a default create is handed one at once. Members are real
// records (pooled or warming) that callers do not see until one is claimed.
type pool struct {
	l       *launcher
	host    poolHost
	size    int
	cleanup bool

	wake chan struct{}
	done chan struct{}
	stop func()

	mu      sync.Mutex
	warming map[string]bool // members this process is warming up
}

// poolHost is what the pool needs of the Manager that owns it: making a
// member through the normal create path, removing one, and running the
// warm-up commands.
type poolHost interface {
	create(ctx context.Context, req CreateRequest, status Status) (Info, error)
	remove(ctx context.Context, rec store.Record) error
	stream(ctx context.Context, rec store.Record, wreq *agentpb.StartRequest, stdout, stderr io.Writer) (ExecResult, error)
}

func newPool(l *launcher, host poolHost, size int, cleanup bool) *pool {
	return &pool{l: l, host: host, size: size, cleanup: cleanup, warming: make(map[string]bool)}
}

// start runs the refiller until close.
func (p *pool) start() {
	if p.size <= 0 {
		return
	}
	ctx, cancel := context.WithCancel(context.Background())
	p.stop = cancel
	p.wake = make(chan struct{}, 1)
	p.done = make(chan struct{})
	go p.runPool(ctx)
}

// close stops the refiller and, with cleanup, deletes the waiting members.
func (p *pool) close() {
	if p.stop == nil {
		return
	}
	p.stop()
	<-p.done
	p.stop = nil
	if p.cleanup {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if err := p.drainPool(ctx); err != nil {
			p.l.opts.Logger.Error("delete pooled sandboxes", "err", err)
		}
	}
}

// poolShape is the one create request the pool serves: the defaults, on
// the backend chosen for this host.
func poolShape() CreateRequest {
	return CreateRequest{OS: "", MemoryMiB: DefaultMemoryMiB, DiskSizeMiB: DefaultDiskMiB, VCPUs: DefaultVCPUs, Backend: DefaultBackend,
		Network: network.Policy{Mode: network.ModeOpen}}
}

// poolable reports whether a normalized request can take a pooled sandbox;
// defBackend is the backend a request that names none gets.
func poolable(req CreateRequest, defBackend string) bool {
	want := poolShape()
	return (req.OS == "" || req.OS == "debian") && req.Image == "" &&
		req.MemoryMiB == want.MemoryMiB && req.DiskSizeMiB == want.DiskSizeMiB &&
		req.VCPUs == want.VCPUs && req.Backend == defBackend &&
		req.Network.Enabled() && // the policy and ports are set on the way out
		req.Snapshot == "" && len(req.Mounts) == 0
}

// takePooled claims a ready pooled sandbox, if there is one, gives it req's
// network policy and ports, and wakes the refiller. An error is req's fault
// (a host port in use, say): the claimed sandbox is gone again.
func (p *pool) takePooled(ctx context.Context, req CreateRequest) (Info, bool, error) {
	if p.size <= 0 {
		return Info{}, false, nil
	}
	defer p.wakePool()
	recs, err := p.l.store.List(ctx)
	if err != nil {
		return Info{}, false, nil
	}
	for _, r := range recs {
		// Its network process must be there too: a member whose network
		// died would be handed out without one.
		// And the backend asked for: the pool's may be an earlier
		// default's.
		if r.Status != statusPooled || r.Backend != req.Backend || !readNet(r).Policy.Enabled() || !network.Running(r.Dir) {
			continue
		}
		// Only one that answers: a pooled VM may have died unseen, or be
		// held by another process, which would then claim it itself.
		cctx, cancel := context.WithTimeout(ctx, time.Second)
		_, err := p.l.client(cctx, r)
		cancel()
		if err != nil {
			continue
		}
		now := time.Now().UTC()
		ok, err := p.l.store.Claim(ctx, r.ID, statusPooled, StatusRunning, now)
		if err != nil || !ok {
			p.l.sessions.drop(r.ID)
			continue
		}
		r.Status, r.CreatedAt = StatusRunning, now
		p.l.publishSandbox(EventSandboxCreated, toInfo(r))
		if err := p.configureClaimed(ctx, &r, req); err != nil {
			p.discard(context.WithoutCancel(ctx), r)
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
func (p *pool) configureClaimed(ctx context.Context, r *store.Record, req CreateRequest) error {
	unlock := p.l.sessions.lock(r.ID)
	defer unlock()
	if !req.Network.Equal(poolShape().Network) {
		if err := network.Dial(network.Files{Dir: r.Dir}.Control()).SetPolicy(ctx, req.Network); err != nil {
			return fmt.Errorf("set network policy: %w", err)
		}
	}
	writeNet(r, requestedNet(req))
	applyConfig(r, req)
	if err := p.l.applyPorts(ctx, r); err != nil {
		return err
	}
	return p.l.transition(ctx, r, StatusRunning, StatusRunning)
}

func (p *pool) wakePool() {
	select {
	case p.wake <- struct{}{}:
	default:
	}
}

// runPool keeps opts.Pool sandboxes of the default shape restored and
// waiting, until ctx ends.
func (p *pool) runPool(ctx context.Context) {
	defer close(p.done)
	for {
		if err := p.fillPool(ctx); err != nil && ctx.Err() == nil {
			fmt.Fprintf(p.l.opts.Progress, "smolvm: pool: %v\n", err)
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
		case <-p.wake:
		case <-time.After(10 * time.Second):
		}
	}
}

func (p *pool) fillPool(ctx context.Context) error {
	for {
		recs, err := p.l.store.List(ctx)
		if err != nil {
			return err
		}
		ready := 0
		for _, r := range recs {
			if p.abandoned(r) {
				p.discard(context.WithoutCancel(ctx), r)
				continue
			}
			if r.Status != statusPooled {
				continue
			}
			// A member made before sandboxes had networks cannot serve.
			if _, mach, err := p.l.machine(r); err == nil && mach.Alive() && readNet(r).Policy.Enabled() {
				ready++
				continue
			}
			p.discard(ctx, r)
		}
		if ready >= p.size {
			return nil
		}
		if err := p.addPoolMember(ctx); err != nil {
			return err
		}
	}
}

// addPoolMember creates one sandbox for the pool, warms it up and offers it.
func (p *pool) addPoolMember(ctx context.Context) error {
	info, err := p.host.create(ctx, poolShape(), statusWarming)
	if err != nil {
		return fmt.Errorf("refill: %w", err)
	}
	p.setWarming(info.ID, true)
	defer p.setWarming(info.ID, false)
	// Whatever happens from here, the member must not be left behind
	// half-made, even when ctx is what ended.
	cleanup := context.WithoutCancel(ctx)
	rec, err := p.l.store.Get(cleanup, info.ID)
	if err != nil {
		return err
	}
	// Under emulation a restored VM translates every code path anew on
	// first use: run a command through each shell mode now, so the one
	// who takes it does not pay for that.
	for _, req := range []ExecRequest{{Command: "true", Shell: ShellRaw}, {Command: "true", Shell: ShellLogin}} {
		wreq, _ := execRequest(req)
		if _, err := p.host.stream(ctx, rec, wreq, io.Discard, io.Discard); err != nil {
			p.discard(cleanup, rec)
			return fmt.Errorf("warm up: %w", err)
		}
	}
	if _, err := p.l.store.Claim(cleanup, info.ID, statusWarming, statusPooled, time.Now().UTC()); err != nil {
		p.discard(cleanup, rec)
		return err
	}
	return nil
}

// abandoned reports a pool member left half-warmed by a process that
// stopped: not being warmed here, and untouched for longer than a warm-up
// takes (another process may be warming it right now).
func (p *pool) abandoned(r store.Record) bool {
	return r.Status == statusWarming && !p.isWarming(r.ID) && time.Since(r.UpdatedAt) > 2*time.Minute
}

func (p *pool) setWarming(id string, on bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if on {
		p.warming[id] = true
	} else {
		delete(p.warming, id)
	}
}

func (p *pool) isWarming(id string) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.warming[id]
}

// drainPool deletes the pooled sandboxes this process holds.
func (p *pool) drainPool(ctx context.Context) error {
	recs, err := p.l.store.List(ctx)
	if err != nil {
		return err
	}
	var errs []error
	for _, r := range recs {
		if r.Status == statusPooled || p.abandoned(r) {
			if err := p.host.remove(ctx, r); err != nil {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}

// visible reports whether callers may see a record.
func visible(r store.Record) bool {
	return r.Status != statusPooled && r.Status != statusWarming && r.Status != store.StatusDeleting
}

// PoolReady counts the pooled sandboxes waiting to be handed out.
func (p *pool) ready(ctx context.Context) (int, error) {
	recs, err := p.l.store.List(ctx)
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

// PoolReady counts the pooled sandboxes waiting to be handed out.
func (m *Manager) PoolReady(ctx context.Context) (int, error) { return m.pool.ready(ctx) }

// discard removes a member that cannot serve, logging what the removal
// left behind.
func (p *pool) discard(ctx context.Context, rec store.Record) {
	p.l.logTeardown(rec.ID, "removing a pool member", p.host.remove(ctx, rec))
}

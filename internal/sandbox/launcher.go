package sandbox

import (
	"context"
	"crypto/rand"
	"debug/elf"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/smolvm/smolvm/internal/agent/agentpb"
	"github.com/smolvm/smolvm/internal/cgroup"
	"github.com/smolvm/smolvm/internal/doctor"
	"github.com/smolvm/smolvm/internal/guest"
	"github.com/smolvm/smolvm/internal/image"
	"github.com/smolvm/smolvm/internal/jail"
	"github.com/smolvm/smolvm/internal/kernel"
	"github.com/smolvm/smolvm/internal/network"
	"github.com/smolvm/smolvm/internal/store"
	"github.com/smolvm/smolvm/internal/vmm"
)

// launcher brings one sandbox's machine up and takes it down: it resolves
// the assets (kernel, initramfs, image), builds the driver's spec, starts
// the network process and the VM, waits for the agent, gives the guest its
// identity, and records each step as a store transition. halt is the one
// teardown every failure path and every delete goes through.
//
// It holds no per-sandbox state of its own: the store has the records and
// the session set the agent connections, so the Manager, the template
// cache and the pool can all launch through one launcher.
type launcher struct {
	opts     Options
	store    *store.Store
	drivers  *vmm.Registry
	sessions *sessions
	events   *events
	// netUsers are the users network processes run as; nil when this
	// process is not root and they run as it.
	netUsers *jail.Users
	// cgroups is where network processes get control groups of their
	// own; nil when this process is not root or the host has none.
	cgroups *cgroup.Hierarchy
	// initramfs finds each create's archive without reading it again.
	initramfs kernel.Initramfses

	// afterRestore, set only by tests, runs when a clone's agent has
	// answered and before it is given its identity, with a way to run a
	// shell command in the clone.
	afterRestore func(ctx context.Context, run func(cmd string) error)
}

// assets are the host files a boot needs, resolved before a record exists.
type assets struct {
	kernel *kernel.Kernel
	initrd string
	base   *image.Base
}

func (l *launcher) assets(ctx context.Context, src image.Source, diskMiB int, progress func(image.Progress)) (assets, error) {
	var a assets
	k, err := kernel.Default(l.opts.DataDir)
	if err != nil {
		return a, &Error{Kind: KindUnavailable, Code: "kernel_missing", Message: "no guest kernel is installed: run `smolvm setup`", Err: err}
	}
	agent, err := l.agentPath()
	if err != nil {
		return a, err
	}
	initrd, err := l.initramfs.Build(ctx, l.opts.DataDir, k, agent)
	if err != nil {
		return a, fmt.Errorf("build initramfs: %w", err)
	}
	base, err := image.Resolve(ctx, l.opts.DataDir, src, image.Options{Mirror: l.opts.RegistryMirror, Log: l.opts.Progress, Progress: progress})
	if err != nil {
		return a, imageError(src, err)
	}
	imageMiB := int((base.SizeBytes + 1<<20 - 1) >> 20)
	if diskMiB < imageMiB {
		return a, invalid("invalid_disk_size", "disk_size", "disk_size %d MiB is smaller than the image (%d MiB): ask for at least %d", diskMiB, imageMiB, imageMiB)
	}
	a.kernel, a.initrd, a.base = k, initrd, base
	return a, nil
}

func (l *launcher) agentPath() (string, error) {
	if p := doctor.Agent.Locate(l.opts.AgentPath); p != "" {
		return p, checkStatic(p)
	}
	return "", &Error{Kind: KindUnavailable, Code: "agent_missing",
		Message: "guest agent binary smolvm-agent not found next to smolvm: build it with scripts/setup.sh (or set SMOLVM_AGENT)"}
}

// checkStatic refuses a dynamically linked agent: it runs as /init before
// any root filesystem, with no loader or libc to find, and the kernel
// would only say "No working init found".
func checkStatic(path string) error {
	f, err := elf.Open(path)
	if err != nil {
		return &Error{Kind: KindUnavailable, Code: "agent_invalid", Message: fmt.Sprintf("guest agent %s is not an ELF binary", path), Err: err}
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return &Error{Kind: KindUnavailable, Code: "agent_invalid",
				Message: fmt.Sprintf("guest agent %s is dynamically linked: rebuild it with CGO_ENABLED=0 (scripts/setup.sh does)", path)}
		}
	}
	return nil
}

// boot starts the VM for rec cold (making its disk first when fresh) and
// waits for the agent.
func (l *launcher) boot(ctx context.Context, drv vmm.Driver, a assets, rec *store.Record, fresh bool, final Status) (Info, error) {
	spec := l.spec(a, rec)
	if fresh {
		if err := os.MkdirAll(rec.Dir, 0o755); err != nil {
			return Info{}, fmt.Errorf("create sandbox directory: %w", err)
		}
	}
	mach, err := l.startVM(ctx, rec, spec, func(s vmm.Spec) (vmm.Machine, error) { return drv.Start(ctx, s) })
	if err != nil {
		return Info{}, err
	}
	c, err := l.waitAgent(ctx, mach, rec, l.opts.BootTimeout)
	if err != nil {
		return Info{}, err
	}
	return l.finish(ctx, c, rec, 0, BootCold, final)
}

func (l *launcher) spec(a assets, rec *store.Record) vmm.Spec {
	spec := vmm.Spec{
		ID: rec.ID, Dir: rec.Dir,
		Kernel: a.kernel.Vmlinux, Initrd: a.initrd,
		Cmdline:   bootCmdline(rec.ID, readNet(*rec).Policy.Enabled()),
		BaseImage: a.base.Path, DiskMiB: rec.DiskSizeMiB,
		MemoryMiB: rec.MemoryMiB, VCPUs: rec.VCPUs,
		DiskIO: l.opts.DiskIO,
		Mounts: driverMounts(readConfig(*rec).Mounts),
	}
	for _, mt := range spec.Mounts {
		spec.Cmdline += " " + vmm.MountCmdline(mt)
	}
	return spec
}

// waitAgent records inst on rec and waits up to timeout for the agent to
// answer, giving up at once if the VM process dies or the guest crashes.
func (l *launcher) waitAgent(ctx context.Context, mach vmm.Machine, rec *store.Record, timeout time.Duration) (*guest.Client, error) {
	rec.PID, rec.Runtime = mach.PID(), string(mach.Runtime())
	if err := l.transition(ctx, rec, rec.Status); err != nil {
		return nil, errors.Join(err, mach.Kill(context.WithoutCancel(ctx)))
	}
	t := time.Now()
	c, err := dialWhileAlive(ctx, mach, timeout)
	if err != nil {
		if ctx.Err() == nil && mach.Alive() {
			err = l.withRunState(ctx, rec.Backend, mach, err)
		}
		return nil, errors.Join(err, mach.Kill(context.WithoutCancel(ctx)))
	}
	vmm.Step(ctx, "agent handshake", t)
	return c, nil
}

// withRunState adds to err, a guest that did not answer, what state its
// VMM says the VM is in: a VM left paused is not a guest that hangs.
func (l *launcher) withRunState(ctx context.Context, backend string, mach vmm.Machine, err error) error {
	drv, derr := l.drivers.Get(backend)
	if derr != nil {
		return err
	}
	rs, ok := drv.(vmm.RunStater)
	if !ok {
		return err
	}
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
	defer cancel()
	st, serr := rs.Status(sctx, mach)
	if serr != nil {
		st = "unknown: " + serr.Error()
	}
	var ce *consoleError
	if errors.As(err, &ce) {
		return &consoleError{err: fmt.Errorf("%w (the VM is %s)", ce.err, st), console: ce.console}
	}
	return fmt.Errorf("%w (the VM is %s)", err, st)
}

// errVMExited means the VM process ended before its agent answered.
var errVMExited = errors.New("the VM exited before its agent answered")

// errGuestCrashed means the guest kernel reported a crash on its console
// before the agent answered.
var errGuestCrashed = errors.New("the guest crashed")

// dialWhileAlive connects to inst's agent, watching the VM meanwhile: a VM
// process that ends or a console that shows a kernel crash ends the wait
// within a tick, instead of after timeout.
func dialWhileAlive(ctx context.Context, mach vmm.Machine, timeout time.Duration) (*guest.Client, error) {
	bctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var why error // set before cancel, read after Dial returns
	watched := make(chan struct{})
	go func() {
		defer close(watched)
		console := &consoleWatch{path: mach.ConsoleLog()}
		t := time.NewTicker(50 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-bctx.Done():
				return
			case <-t.C:
				if line := console.crash(); line != "" {
					why = fmt.Errorf("%w (%q)", errGuestCrashed, line)
					cancel()
					return
				}
				if !mach.Alive() {
					why = errVMExited
					if line := console.crash(); line != "" {
						why = fmt.Errorf("%w (%q)", errGuestCrashed, line)
					}
					cancel()
					return
				}
			}
		}
	}()
	c, err := guest.Dial(bctx, mach.DialAgent)
	cancel()
	<-watched
	if err == nil {
		return c, nil
	}
	if why != nil {
		return nil, &consoleError{err: why, console: consoleTail(mach.ConsoleLog())}
	}
	if ve := (*guest.VersionError)(nil); errors.As(err, &ve) {
		return nil, err
	}
	if ctx.Err() != nil {
		return nil, ctx.Err()
	}
	return nil, &consoleError{err: fmt.Errorf("the guest did not answer within %s: %w", timeout, err), console: consoleTail(mach.ConsoleLog())}
}

// finish gives the guest its identity and marks the sandbox running.
func (l *launcher) finish(ctx context.Context, c *guest.Client, rec *store.Record, diskBytes int64, how BootKind, final Status) (Info, error) {
	id := &agentpb.SetIdentityRequest{
		Hostname:  rec.ID,
		MachineId: randomHex(16),
		UnixNano:  time.Now().UnixNano(),
		Seed:      randomBytes(64),
		DiskBytes: diskBytes,
	}
	ictx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	t := time.Now()
	if _, err := c.Identity(ictx, id); err != nil {
		c.Close()
		return Info{}, fmt.Errorf("give the guest its identity: %w", err)
	}
	t = vmm.Step(ctx, "identity", t)
	if err := l.applyPorts(ctx, rec); err != nil {
		c.Close()
		return Info{}, err
	}
	rec.Error = ""
	if err := l.transition(ctx, rec, final); err != nil {
		c.Close()
		return Info{}, err
	}
	vmm.Step(ctx, "ports and record", t)
	l.sessions.set(rec.ID, c)
	info := toInfo(*rec)
	info.Boot = how
	return info, nil
}

func randomBytes(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

func randomHex(n int) string { return hex.EncodeToString(randomBytes(n)) }

func bootCmdline(id string, net bool) string {
	args := []string{
		// An oops leaves the kernel in an unknown state: make it a panic,
		// and a panic an immediate reboot, which -no-reboot turns into
		// the VM process exiting. A crashed guest then ends at once
		// instead of hanging until a timeout.
		"console=ttyS0", "quiet", "loglevel=3", "oops=panic", "panic=-1",
		// No keyboard or mouse is attached; probing for them costs time.
		"i8042.noaux", "i8042.nomux", "i8042.nopnp", "i8042.dumbkbd",
		"smolvm.hostname=" + id,
	}
	if net {
		args = append(args, netCmdline(true))
	}
	return strings.Join(args, " ")
}

// client returns a live session with the sandbox's agent, connecting (or
// reconnecting, after another process or a restart) when needed.
func (l *launcher) client(ctx context.Context, rec store.Record) (*guest.Client, error) {
	if c := l.sessions.live(rec.ID); c != nil {
		return c, nil
	}
	unlock := l.sessions.lock(rec.ID)
	defer unlock()
	if c := l.sessions.live(rec.ID); c != nil {
		return c, nil
	}
	_, mach, err := l.machine(rec)
	if err != nil {
		return nil, err
	}
	dctx, cancel := context.WithTimeout(ctx, connectTimeout)
	defer cancel()
	c, err := guest.Dial(dctx, mach.DialAgent)
	if err != nil {
		// A VM the full host disk stopped cannot answer: say so, or let
		// it go on and try again.
		if stalled, serr := l.unstall(ctx, rec); serr != nil {
			return nil, serr
		} else if stalled {
			dctx, cancel := context.WithTimeout(ctx, connectTimeout)
			defer cancel()
			c, err = guest.Dial(dctx, mach.DialAgent)
		}
	}
	if ve := (*guest.VersionError)(nil); errors.As(err, &ve) {
		return nil, &Error{Kind: KindConflict, Code: "agent_incompatible", Message: fmt.Sprintf("sandbox %s: %v", rec.ID, ve), Err: err}
	}
	if err != nil {
		return nil, &Error{Kind: KindConflict, Code: "agent_unreachable",
			Message: fmt.Sprintf("sandbox %s did not answer; if another smolvm process (a server) is using it, go through that process (--url)", rec.ID), Err: err}
	}
	l.sessions.set(rec.ID, c)
	return c, nil
}

// machine finds rec's VM again through its driver and runtime record.
func (l *launcher) machine(rec store.Record) (vmm.Driver, vmm.Machine, error) {
	drv, err := l.drivers.Get(rec.Backend)
	if err != nil {
		return nil, nil, fmt.Errorf("sandbox %s: %w", rec.ID, err)
	}
	if rec.Runtime == "" {
		return drv, nil, fmt.Errorf("sandbox %s has no runtime record", rec.ID)
	}
	mach, err := drv.Attach(json.RawMessage(rec.Runtime))
	if err != nil {
		return drv, nil, fmt.Errorf("sandbox %s: %w", rec.ID, err)
	}
	return drv, mach, nil
}

// transition records rec with status to, provided the stored status is
// still one of from (by default, rec's own): every state change is one
// compare-and-set, so what another process changed meanwhile is not
// overwritten but reported.
func (l *launcher) transition(ctx context.Context, rec *store.Record, to Status, from ...Status) error {
	if len(from) == 0 {
		from = []Status{rec.Status}
	}
	next := *rec
	next.Status = to
	changed, err := l.store.Transition(ctx, next, from...)
	if errors.Is(err, store.ErrNameTaken) {
		return nameTaken(rec.Name)
	}
	if err != nil {
		if errors.Is(err, store.ErrNotFound) {
			return notFound(rec.ID)
		}
		return fmt.Errorf("record sandbox %s: %w", rec.ID, err)
	}
	if !changed {
		now := "changed"
		if cur, err := l.store.Get(ctx, rec.ID); err == nil {
			now = string(cur.Status)
		}
		return &Error{Kind: KindConflict, Code: "conflict",
			Message: fmt.Sprintf("sandbox %s changed meanwhile (it is %s now); try again", rec.ID, now)}
	}
	if to != rec.Status || next.Network != rec.Network {
		l.publishSandbox(EventSandboxUpdated, toInfo(next))
	}
	*rec = next
	return nil
}

// halt ends what rec runs on this host: its agent session, its VM and its
// network process. It is the one teardown every path uses; the errors of
// all three are joined.
func (l *launcher) halt(ctx context.Context, rec store.Record) error {
	l.sessions.drop(rec.ID)
	var errs []error
	drv, mach, err := l.machine(rec)
	recorded := err == nil && mach.Alive()
	if err == nil {
		if err := mach.Kill(ctx); err != nil {
			errs = append(errs, fmt.Errorf("stop VM: %w", err))
		}
	}
	// A VM whose start the record does not show (the process starting it
	// died first) is found from its directory. The record is current
	// while the VM it names runs, so the common teardown skips the search.
	if drv != nil && rec.Dir != "" && !recorded {
		if err := drv.Reap(ctx, rec.Dir); err != nil {
			errs = append(errs, fmt.Errorf("stop VM: %w", err))
		}
	}
	if rec.Dir != "" {
		if err := network.Stop(ctx, rec.Dir); err != nil {
			errs = append(errs, fmt.Errorf("stop network: %w", err))
		}
	}
	return errors.Join(errs...)
}

// logTeardown logs a teardown's error for the operator: the caller's own
// error has already been returned, and this one must not be lost.
func (l *launcher) logTeardown(id, what string, err error) {
	if err != nil {
		l.opts.Logger.Error("cleanup after "+what+" failed", "sandbox", id, "err", err)
	}
}

// netPath locates cmd/smolvm-net like the agent: the option, then
// $SMOLVM_NET, then next to the running executable, then $PATH.
func (l *launcher) netPath() (string, error) {
	if p := doctor.Net.Locate(l.opts.NetPath); p != "" {
		return p, nil
	}
	return "", &Error{Kind: KindUnavailable, Code: "network_unavailable", Field: "network",
		Message: "the sandbox network helper smolvm-net was not found next to smolvm: build it with scripts/setup.sh (or set SMOLVM_NET), or create the sandbox with network mode \"off\""}
}

// startNetwork launches the network process for a VM about to boot in dir
// and points spec at it; with the network off it does nothing. ready waits
// until the process answers: its socket listens at once, so the VM may
// start meanwhile, and the two start side by side.
func (l *launcher) startNetwork(ctx context.Context, dir string, p network.Policy, spec *vmm.Spec) (ready func(context.Context) error, err error) {
	if !p.Enabled() {
		return func(context.Context) error { return nil }, nil
	}
	bin, err := l.netPath()
	if err != nil {
		return nil, err
	}
	var j network.Jail
	if l.netUsers != nil {
		u, release, err := l.netUsers.Allocate()
		if err != nil {
			return nil, err
		}
		defer release()
		j.UID, j.Cgroups = u, l.cgroups
	}
	started, err := network.Launch(ctx, bin, dir, p, j)
	if err != nil {
		if errors.Is(err, network.ErrPathTooLong) {
			return nil, &Error{Kind: KindUnavailable, Code: "data_dir_too_long", Message: err.Error()}
		}
		return nil, fmt.Errorf("start the sandbox network: %w", err)
	}
	spec.Net = &vmm.NetAttachment{Kind: vmm.NetStream, Socket: network.Files{Dir: dir}.Link(), MAC: network.GuestMAC}
	return func(ctx context.Context) error {
		if err := started.Ready(ctx); err != nil {
			return fmt.Errorf("start the sandbox network: %w", err)
		}
		return nil
	}, nil
}

// startVM starts rec's network, if it has one, then its VM with start; if
// the VM does not start, the network goes too.
func (l *launcher) startVM(ctx context.Context, rec *store.Record, spec vmm.Spec, start func(vmm.Spec) (vmm.Machine, error)) (vmm.Machine, error) {
	t := time.Now()
	ready, err := l.startNetwork(ctx, rec.Dir, readNet(*rec).Policy, &spec)
	if err != nil {
		return nil, err
	}
	vmm.Step(ctx, "network process", t)
	mach, err := start(spec)
	if err == nil {
		t = time.Now()
		if err = ready(ctx); err != nil {
			if kerr := mach.Kill(context.WithoutCancel(ctx)); kerr != nil {
				l.opts.Logger.Error("stop a VM whose network did not start", "sandbox", rec.ID, "err", kerr)
			}
		}
		vmm.Step(ctx, "network answers", t)
	}
	if err != nil {
		if nerr := network.Stop(context.WithoutCancel(ctx), rec.Dir); nerr != nil {
			l.opts.Logger.Error("stop the network of a VM that did not start", "sandbox", rec.ID, "err", nerr)
		}
		return nil, err
	}
	return mach, nil
}

// applyPorts opens rec's recorded forwards on its (new) network process
// and records the host ports they got. A port first asked for as 0 keeps
// its last host port when it is free, and takes another when it is not.
func (l *launcher) applyPorts(ctx context.Context, rec *store.Record) error {
	s := readNet(*rec)
	if !s.Policy.Enabled() || len(s.Ports) == 0 {
		return nil
	}
	c := network.Dial(network.Files{Dir: rec.Dir}.Control())
	for i, p := range s.Ports {
		got, err := c.Expose(ctx, p.Forward)
		if err != nil && p.Requested == 0 && p.Host != 0 && errors.Is(err, network.ErrPortInUse) {
			f := p.Forward
			f.Host = 0
			got, err = c.Expose(ctx, f)
		}
		if err != nil {
			return portError(err)
		}
		s.Ports[i].Forward = got
	}
	writeNet(rec, s)
	return nil
}

// publishSandbox sends a created or updated event for info, if callers
// can see that sandbox.
func (l *launcher) publishSandbox(typ string, info Info) {
	if info.Status == statusPooled || info.Status == statusWarming {
		return
	}
	l.events.publish(Event{Type: typ, SandboxID: info.ID, Sandbox: &info})
}

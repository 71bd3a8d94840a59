package sandbox

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/smolvm/smolvm/internal/agent/agentpb"
	"github.com/smolvm/smolvm/internal/cgroup"
	"github.com/smolvm/smolvm/internal/datadir"
	"github.com/smolvm/smolvm/internal/doctor"
	"github.com/smolvm/smolvm/internal/guest"
	"github.com/smolvm/smolvm/internal/image"
	"github.com/smolvm/smolvm/internal/jail"
	"github.com/smolvm/smolvm/internal/store"
	"github.com/smolvm/smolvm/internal/vmm"
	"github.com/smolvm/smolvm/internal/vmm/drivers"
)

// Options configure a Manager.
type Options struct {
	// DataDir is where kernels, images, sandboxes and the database live.
	DataDir datadir.Dir
	// AgentPath is the guest agent binary; "" locates it ($SMOLVM_AGENT, then
	// next to the running executable).
	AgentPath string
	// NetPath is the sandbox network helper (cmd/smolvm-net); "" locates
	// it ($SMOLVM_NET, then next to the running executable, then $PATH).
	NetPath string
	// Drivers are the VMM backends sandboxes may use; nil means every
	// driver of this build, with Accel.
	Drivers *vmm.Registry
	// Accel forces an accelerator ("kvm" or "tcg") on the default drivers;
	// "" picks KVM only where it really works ($SMOLVM_ACCEL overrides).
	Accel string
	// Progress receives human-readable lines about long work (image builds).
	Progress io.Writer
	// BootTimeout bounds how long a new VM may take to answer; 0 means
	// DefaultBootTimeout.
	BootTimeout time.Duration
	// NoTemplates boots every sandbox cold instead of restoring it from a
	// template ($SMOLVM_TEMPLATES=off does the same).
	NoTemplates bool
	// Pool keeps this many sandboxes of the default shape restored and
	// waiting, so a default create is handed one at once. They use memory
	// like any sandbox. 0 disables the pool.
	Pool int
	// PoolCleanup deletes the waiting sandboxes on Close; otherwise they
	// are left for the next process, which deletes those it cannot use.
	PoolCleanup bool
	// RegistryMirror is pulled through for Docker Hub images (and the os
	// presets); "" means $SMOLVM_REGISTRY_MIRROR.
	RegistryMirror string
	// AllowMounts are the host directories sandboxes may mount (each
	// with what is beneath it); none by default.
	AllowMounts []string
	// DiskIO caps each VMM's I/O on the host disk that holds the data
	// directory, where the server runs as root; zero fields take
	// vmm's defaults.
	DiskIO vmm.DiskIO
	// Logger receives what an operator needs to see: templates retired,
	// guests that crashed, cleanup that failed. nil logs as text to
	// Progress.
	Logger *slog.Logger
}

// DefaultBootTimeout is generous because software emulation on a loaded
// host can take many times its usual few seconds.
const DefaultBootTimeout = 120 * time.Second

// connectTimeout bounds reconnecting to an already running agent.
const connectTimeout = 15 * time.Second

// Manager creates, tracks and removes sandboxes. It is the one door that the
// HTTP API, the CLI and the Go library all go through. It is safe for
// concurrent use, and several Managers (in several processes) may share one
// data directory.
//
// It is a facade: requests are checked and recorded here, and the work is
// done by the launcher (one machine up or down), the template cache, the
// pool and the session set, which share the store.
type Manager struct {
	opts    Options
	store   *store.Store
	drivers *vmm.Registry

	l         *launcher
	templates *templates
	pool      *pool
	sessions  *sessions
	events    *events

	// Asynchronous creates run under bg and are waited for on Close.
	bg     context.Context
	stopBg func()
	async  sync.WaitGroup

	reaperDone chan struct{}

	// mu guards what follows.
	mu       sync.Mutex
	closing  bool
	progress map[string]Progress
	cancels  map[string]func() // asynchronous creates in progress, by id
	// unrecorded holds why a create failed when the database could not
	// take it (the host disk full), until the record says so.
	unrecorded map[string]string
	configs    map[string]image.Config
	// sawFull is set when the reaper found the data directory's
	// filesystem full, so that it looks for stopped VMs once it is not.
	sawFull bool
	// cpu is each sandbox's last CPU samples, newest last, which Stats
	// measures from.
	cpu map[string][]cpuSample
}

// Open opens the store under opts.DataDir and reconciles recorded sandboxes
// with the processes that are really running.
func Open(ctx context.Context, opts Options) (*Manager, error) {
	if opts.DataDir == "" {
		d, err := datadir.Default()
		if err != nil {
			return nil, err
		}
		opts.DataDir = d
	}
	if opts.Progress == nil {
		opts.Progress = io.Discard
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.NewTextHandler(opts.Progress, nil))
	}
	if opts.BootTimeout == 0 {
		opts.BootTimeout = DefaultBootTimeout
	}
	if os.Getenv("SMOLVM_TEMPLATES") == "off" {
		opts.NoTemplates = true
	}
	if err := os.MkdirAll(opts.DataDir.Sandboxes(), 0o755); err != nil {
		return nil, fmt.Errorf("create data directory: %w", err)
	}
	st, err := store.Open(ctx, opts.DataDir.Database())
	if err != nil {
		return nil, err
	}
	if opts.Drivers == nil {
		opts.Drivers = drivers.Default(opts.Accel, opts.NetPath)
	}
	m := &Manager{
		opts:       opts,
		store:      st,
		drivers:    opts.Drivers,
		sessions:   newSessions(),
		events:     newEvents(),
		progress:   make(map[string]Progress),
		cancels:    make(map[string]func()),
		unrecorded: make(map[string]string),
		configs:    make(map[string]image.Config),
	}
	m.l = &launcher{opts: opts, store: st, drivers: opts.Drivers, sessions: m.sessions, events: m.events}
	if os.Geteuid() == 0 {
		m.l.netUsers = jail.NewUsers(jail.NetworkBase, jail.PerRange)
		if h, err := cgroup.Detect(cgroup.Root); err == nil {
			m.l.cgroups = &h
		}
	}
	m.templates = &templates{l: m.l, root: opts.DataDir.Templates(), disabled: opts.NoTemplates}
	m.pool = newPool(m.l, m, opts.Pool, opts.PoolCleanup)
	m.bg, m.stopBg = context.WithCancel(context.Background())
	if _, err := m.List(ctx); err != nil {
		st.Close()
		return nil, err
	}
	m.finishDeletes(ctx)
	m.templates.sweepBuilds(ctx)
	m.templates.sweepRetired(ctx)
	if err := image.SweepTmp(opts.DataDir); err != nil {
		opts.Logger.Error("remove what interrupted image builds left", "err", err)
	}
	m.pool.start()
	m.reaperDone = make(chan struct{})
	go m.runReaper(m.bg)
	return m, nil
}

// Close stops the pool, releases connections and the store. Sandboxes keep
// running.
func (m *Manager) Close() error {
	m.mu.Lock()
	m.closing = true
	m.mu.Unlock()
	// Creates still preparing are cancelled (their records end in the
	// error state, with the reason); the VMs that run stay.
	m.stopBg()
	m.async.Wait()
	<-m.reaperDone
	m.pool.close()
	m.sessions.closeAll()
	return m.store.Close()
}

// lock serialises lifecycle changes to one sandbox within this process.
func (m *Manager) lock(id string) func() { return m.sessions.lock(id) }

func invalid(code, field, format string, args ...any) error {
	return &Error{Kind: KindInvalid, Code: code, Field: field, Message: fmt.Sprintf(format, args...)}
}

// normalize applies defaults and checks bounds, before anything is started.
func (m *Manager) normalize(req *CreateRequest) (vmm.Driver, error) {
	if req.Snapshot != "" {
		if _, err := m.forkShape(req); err != nil {
			return nil, err
		}
	}
	if req.MemoryMiB == 0 {
		req.MemoryMiB = DefaultMemoryMiB
	}
	if req.DiskSizeMiB == 0 {
		req.DiskSizeMiB = DefaultDiskMiB
	}
	if req.VCPUs == 0 {
		req.VCPUs = DefaultVCPUs
	}
	if req.Backend == "" || req.Backend == AutoBackend {
		name, err := m.autoBackend(req)
		if err != nil {
			return nil, err
		}
		req.Backend = name
	}
	if req.MemoryMiB < MinMemoryMiB || req.MemoryMiB > MaxMemoryMiB {
		return nil, invalid("invalid_memory", "memory", "memory must be between %d and %d MiB, got %d", MinMemoryMiB, MaxMemoryMiB, req.MemoryMiB)
	}
	if req.VCPUs < MinVCPUs || req.VCPUs > MaxVCPUs {
		return nil, invalid("invalid_vcpus", "vcpus", "vcpus must be between %d and %d, got %d", MinVCPUs, MaxVCPUs, req.VCPUs)
	}
	if req.DiskSizeMiB < MinDiskMiB || req.DiskSizeMiB > MaxDiskMiB {
		return nil, invalid("invalid_disk_size", "disk_size", "disk_size must be between %d and %d MiB, got %d", MinDiskMiB, MaxDiskMiB, req.DiskSizeMiB)
	}
	switch req.OS {
	case "", "debian", "alpine", "ubuntu":
	case "windows":
		return nil, &Error{Kind: KindUnavailable, Code: "unsupported_os", Field: "os",
			Message: fmt.Sprintf("os \"windows\" is not supported yet by backend %s", req.Backend)}
	default:
		return nil, invalid("unknown_os", "os", "unknown os %q: use alpine, ubuntu, debian or windows, or omit it", req.OS)
	}
	drv, err := m.drivers.Get(req.Backend)
	if err != nil {
		if slices.Contains(Backends, req.Backend) {
			return nil, &Error{Kind: KindUnavailable, Code: "backend_unavailable", Field: "backend",
				Message: fmt.Sprintf("backend %s is not available: this build of smolvm runs sandboxes with %s", req.Backend, strings.Join(m.drivers.Names(), ", "))}
		}
		return nil, invalid("unknown_backend", "backend", "unknown backend %q: use %s", req.Backend, strings.Join(Backends, ", "))
	}
	if err := normalizeNetwork(req); err != nil {
		return nil, err
	}
	if err := drv.Available(); err != nil {
		msg := fmt.Sprintf("backend %s is not available on this host: %s", req.Backend, oneLine(err))
		var runs []string
		for _, b := range BackendStates(m.drivers) {
			if b.Available {
				runs = append(runs, b.Name)
			}
		}
		if len(runs) > 0 {
			msg += fmt.Sprintf(" (it runs %s; omit backend to get the default)", strings.Join(runs, ", "))
		}
		return nil, &Error{Kind: KindUnavailable, Code: "backend_unavailable", Field: "backend", Message: msg}
	}
	if err := m.normalizeConfig(req, drv); err != nil {
		return nil, err
	}
	return drv, nil
}

func newID() string { return "vm-" + randomHex(4) }

// Create boots a sandbox and returns once its agent answers. On failure
// nothing is left behind: no process, no files, no record.
func (m *Manager) Create(ctx context.Context, req CreateRequest) (Info, error) {
	return m.create(ctx, req, StatusRunning)
}

// create makes a sandbox that ends in status (running, or pooled).
func (m *Manager) create(ctx context.Context, req CreateRequest, status Status) (Info, error) {
	drv, err := m.normalize(&req)
	if err != nil {
		return Info{}, err
	}
	if err := m.roomToStart(); err != nil {
		return Info{}, err
	}
	if status == StatusRunning && poolable(req, m.drivers.Default().Name()) {
		if info, ok, err := m.pool.takePooled(ctx, req); ok || err != nil {
			return info, err
		}
	}
	rec, release, err := m.insert(ctx, req, drv, status)
	if err != nil {
		return Info{}, m.storageError(err)
	}
	defer release()
	return m.build(ctx, drv, req, &rec, status, false)
}

// CreateAsync checks req, records the sandbox as creating and returns at
// once; the image is prepared and the VM booted in the background, with
// progress in the sandbox's Info until it is running (or in error, with
// the reason, when that fails).
func (m *Manager) CreateAsync(ctx context.Context, req CreateRequest) (Info, error) {
	drv, err := m.normalize(&req)
	if err != nil {
		return Info{}, err
	}
	if err := m.roomToStart(); err != nil {
		return Info{}, err
	}
	if poolable(req, m.drivers.Default().Name()) {
		if info, ok, err := m.pool.takePooled(ctx, req); ok || err != nil {
			return info, err
		}
	}
	m.mu.Lock()
	closing := m.closing
	if !closing {
		m.async.Add(1)
	}
	m.mu.Unlock()
	if closing {
		return Info{}, &Error{Kind: KindUnavailable, Code: "shutting_down", Message: "smolvm is shutting down; create the sandbox after it restarts"}
	}
	rec, release, err := m.insert(ctx, req, drv, StatusRunning)
	if err != nil {
		m.async.Done()
		return Info{}, m.storageError(err)
	}
	info := toInfo(rec)
	bctx, cancel := context.WithCancel(m.bg)
	m.mu.Lock()
	m.cancels[rec.ID] = cancel
	m.mu.Unlock()
	go func(rec store.Record) {
		defer m.async.Done()
		defer release()
		defer func() {
			m.mu.Lock()
			delete(m.cancels, rec.ID)
			m.mu.Unlock()
			cancel()
		}()
		m.build(bctx, drv, req, &rec, StatusRunning, true)
	}(rec)
	return info, nil
}

// insert records a new sandbox before any work is done for it, so it can
// be seen (and its progress read) while its image is prepared.
func (m *Manager) insert(ctx context.Context, req CreateRequest, drv vmm.Driver, status Status) (store.Record, func(), error) {
	initial := StatusCreating
	if status != StatusRunning {
		initial = status // pool members stay hidden from the start
	}
	rec := store.Record{
		Status: initial, OS: req.OS, Image: req.Image, Backend: drv.Name(),
		MemoryMiB: req.MemoryMiB, DiskSizeMiB: req.DiskSizeMiB, VCPUs: req.VCPUs,
		CreatedAt: time.Now().UTC(),
	}
	writeNet(&rec, requestedNet(req))
	applyConfig(&rec, req)
	if rec.OS == "" {
		rec.OS = "linux"
		if req.Image == "" {
			rec.OS = "debian"
		}
	}
	var err error
	var release func()
	for range 5 {
		rec.ID = newID()
		rec.Dir = m.opts.DataDir.Sandbox(rec.ID)
		if release, err = holdCreation(rec.Dir); err != nil {
			if errors.Is(err, os.ErrExist) {
				continue // another sandbox's directory
			}
			return rec, nil, err
		}
		err = m.store.Insert(ctx, rec)
		if errors.Is(err, store.ErrNameTaken) {
			release()
			os.RemoveAll(rec.Dir)
			return rec, nil, nameTaken(req.Name)
		}
		if err == nil {
			m.l.publishSandbox(EventSandboxCreated, toInfo(rec))
			return rec, release, nil
		}
		release()
		os.RemoveAll(rec.Dir)
		if !errors.Is(err, store.ErrExists) {
			break
		}
	}
	return rec, nil, fmt.Errorf("record sandbox: %w", err)
}

// creationLock is held, as an flock, by the process creating a sandbox
// until it is done, so that another process can tell a creation under way
// from one whose process died (the lock is free then).
const creationLock = "create.lock"

// holdCreation makes a new sandbox's directory and takes its creation
// lock; it fails with os.ErrExist if the directory is there already.
func holdCreation(dir string) (func(), error) {
	if err := os.Mkdir(dir, 0o755); err != nil {
		if errors.Is(err, os.ErrExist) {
			return nil, err
		}
		return nil, fmt.Errorf("create sandbox directory: %w", err)
	}
	path := filepath.Join(dir, creationLock)
	// A new file nobody else knows of: the lock is free at once.
	unlock, err := lockFile(context.Background(), path)
	if err != nil {
		os.RemoveAll(dir)
		return nil, fmt.Errorf("lock new sandbox: %w", err)
	}
	return func() {
		os.Remove(path)
		unlock()
	}, nil
}

// abandonedCreation reports whether the creation of the sandbox in dir
// was left by a process that exited: its lock is there and nobody holds it.
func abandonedCreation(dir string) bool {
	f, err := os.Open(filepath.Join(dir, creationLock))
	if err != nil {
		// A create holds its directory from before its record exists, so
		// a record without one was left by a create whose cleanup could
		// not remove the record (a full disk). Otherwise it is done, or
		// was made before creations were locked.
		_, serr := os.Stat(dir)
		return errors.Is(serr, os.ErrNotExist)
	}
	defer f.Close()
	if unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB) != nil {
		return false
	}
	unix.Flock(int(f.Fd()), unix.LOCK_UN)
	return true
}

// build prepares the image and boots rec's VM. On failure nothing of the
// VM is left; the record goes too, unless keepFailure asks that it stay in
// the error state to tell an asynchronous caller why.
func (m *Manager) build(ctx context.Context, drv vmm.Driver, req CreateRequest, rec *store.Record, status Status, keepFailure bool) (Info, error) {
	unlock := m.lock(rec.ID)
	defer unlock()
	defer m.setProgress(rec.ID, nil)
	src := image.Source{OS: req.OS, Image: req.Image}
	a, err := m.l.assets(ctx, src, req.DiskSizeMiB, func(p image.Progress) { m.setProgress(rec.ID, &p) })
	if err == nil {
		rec.Image = imageName(req, a.base)
		if err = os.MkdirAll(rec.Dir, 0o755); err == nil {
			err = writeImageRecord(rec.Dir, src, a.base)
		}
	}
	var info Info
	if err == nil {
		launch := m.templates.launch
		if req.Snapshot != "" {
			launch = m.fork
		}
		if info, err = launch(ctx, drv, a, rec, status); err == nil {
			return info, nil
		}
	}
	err = m.storageError(err)
	// Cleanup must run even when ctx was what failed.
	cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
	defer cancel()
	if keepFailure {
		terr := m.l.halt(cctx, *rec)
		if rerr := os.RemoveAll(rec.Dir); rerr != nil {
			terr = errors.Join(terr, rerr)
		}
		rec.PID, rec.Runtime, rec.Error = 0, "", err.Error()
		if terr2 := m.l.transition(cctx, rec, StatusError); terr2 != nil {
			terr = errors.Join(terr, terr2)
			// The record stays "creating" and is found abandoned; it
			// must then say why it failed, not that it was abandoned.
			m.mu.Lock()
			m.unrecorded[rec.ID] = rec.Error
			m.mu.Unlock()
		}
		m.l.logTeardown(rec.ID, "failed create", terr)
		return Info{}, err
	}
	m.l.logTeardown(rec.ID, "failed create", m.destroy(cctx, *rec))
	return Info{}, err
}

func (m *Manager) setProgress(id string, p *image.Progress) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if p == nil {
		delete(m.progress, id)
		return
	}
	m.progress[id] = Progress{Phase: p.Phase, Done: p.Done, Total: p.Total}
	pr := m.progress[id]
	m.events.publish(Event{Type: EventImagePull, SandboxID: id, Progress: &pr})
}

func (m *Manager) withProgress(info Info) Info {
	if info.Status != StatusCreating {
		return info
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if p, ok := m.progress[info.ID]; ok {
		info.Progress = &p
	}
	return info
}

func toInfo(r store.Record) Info {
	ns := readNet(r)
	c := readConfig(r)
	return Info{
		ID: r.ID, Status: r.Status, OS: r.OS, Image: r.Image, Backend: r.Backend,
		MemoryMiB: r.MemoryMiB, DiskSizeMiB: r.DiskSizeMiB, VCPUs: r.VCPUs, PID: r.PID,
		CreatedAt: r.CreatedAt, Error: r.Error,
		Network: ns.Policy, Ports: ns.forwards(),
		Name: r.Name, Labels: c.Labels, Env: c.Env, Deadline: r.Deadline,
		Timeout: c.timeout(), OnTimeout: c.OnTimeout, Snapshot: c.Snapshot, Mounts: c.Mounts,
	}
}

// sessionLost explains a request (what) whose agent connection closed:
// the sandbox was deleted (404) or stopped (409) meanwhile; nil when it
// still runs.
func (m *Manager) sessionLost(ctx context.Context, rec store.Record, err error, what string) error {
	m.sessions.drop(rec.ID)
	cur, gerr := m.get(context.WithoutCancel(ctx), rec.ID)
	var e *Error
	switch {
	case errors.As(gerr, &e) && e.Kind == KindNotFound:
		return &Error{Kind: KindNotFound, Code: "sandbox_not_found", Message: fmt.Sprintf("sandbox %s was deleted while %s ran", rec.ID, what), Err: err}
	case gerr == nil && cur.Status != StatusRunning:
		return &Error{Kind: KindConflict, Code: "sandbox_not_running", Message: fmt.Sprintf("sandbox %s stopped while %s ran", rec.ID, what), Err: err}
	}
	return nil
}

func notFound(id string) error {
	return &Error{Kind: KindNotFound, Code: "sandbox_not_found", Message: fmt.Sprintf("no sandbox with id %q", id)}
}

func (m *Manager) get(ctx context.Context, id string) (store.Record, error) {
	rec, err := m.lookup(ctx, id)
	if errors.Is(err, store.ErrNotFound) || (err == nil && !visible(rec)) {
		return rec, notFound(id)
	}
	if err != nil {
		return rec, err
	}
	return m.reconcile(ctx, rec), nil
}

// lookup reads the record of the sandbox with this id, or else this name.
func (m *Manager) lookup(ctx context.Context, id string) (store.Record, error) {
	rec, err := m.store.Get(ctx, id)
	if errors.Is(err, store.ErrNotFound) && nameRE.MatchString(id) {
		return m.store.GetByName(ctx, id)
	}
	return rec, err
}

// reconcile marks a running sandbox whose VM process is gone as stopped,
// and one whose creating process died as failed (ending what it started).
func (m *Manager) reconcile(ctx context.Context, rec store.Record) store.Record {
	if rec.Status == StatusCreating && abandonedCreation(rec.Dir) && !m.creating(rec.ID) {
		return m.interrupted(ctx, rec)
	}
	if rec.Status != StatusRunning && rec.Status != StatusPaused {
		return rec
	}
	_, mach, err := m.l.machine(rec)
	if err != nil || mach.Alive() {
		return rec
	}
	reason := fmt.Sprintf("the VM process (pid %d) exited unexpectedly", rec.PID)
	changed, err := m.store.MarkExited(ctx, rec.ID, rec.PID, StatusStopped, reason)
	if err != nil || !changed {
		// Someone else changed the record meanwhile: theirs is newer.
		if fresh, gerr := m.store.Get(ctx, rec.ID); gerr == nil {
			return fresh
		}
		return rec
	}
	m.sessions.drop(rec.ID)
	rec.Status, rec.Error, rec.PID = StatusStopped, reason, 0
	m.l.publishSandbox(EventSandboxUpdated, toInfo(rec))
	return rec
}

// creating reports whether this process is creating sandbox id in the
// background: a failed one removes its directory a moment before it
// records the failure, which must not pass for an abandoned create.
func (m *Manager) creating(id string) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	_, ok := m.cancels[id]
	return ok
}

// interrupted fails a sandbox whose creation was abandoned and stops the
// VM and network it may have started; Delete then removes it.
func (m *Manager) interrupted(ctx context.Context, rec store.Record) store.Record {
	reason := "creation was interrupted: the process creating it exited; delete it and create it again"
	m.mu.Lock()
	lost, failed := m.unrecorded[rec.ID]
	m.mu.Unlock()
	if failed {
		reason = lost
	}
	changed, err := m.store.MarkInterrupted(ctx, rec.ID, reason)
	if err != nil {
		// The database cannot take it yet (its disk is full): the caller
		// sees the failure all the same, and a later look records it.
		rec.Status, rec.Error, rec.PID = StatusError, reason, 0
		return rec
	}
	m.mu.Lock()
	delete(m.unrecorded, rec.ID)
	m.mu.Unlock()
	if !changed {
		if fresh, gerr := m.store.Get(ctx, rec.ID); gerr == nil {
			return fresh
		}
		return rec
	}
	m.l.logTeardown(rec.ID, "an interrupted create", m.l.halt(ctx, rec))
	os.Remove(filepath.Join(rec.Dir, creationLock))
	rec.Status, rec.Error, rec.PID = StatusError, reason, 0
	m.l.publishSandbox(EventSandboxUpdated, toInfo(rec))
	return rec
}

// finishDeletes ends the deletes that a process which died part-way left:
// the sandbox was already gone for callers, so its VM, files and record go
// too.
func (m *Manager) finishDeletes(ctx context.Context) {
	recs, err := m.store.List(ctx)
	if err != nil {
		m.opts.Logger.Error("find interrupted deletes", "err", err)
		return
	}
	for _, rec := range recs {
		if rec.Status != store.StatusDeleting {
			continue
		}
		unlock := m.lock(rec.ID)
		err := m.destroy(ctx, rec)
		unlock()
		if err != nil {
			m.opts.Logger.Error("finish an interrupted delete", "sandbox", rec.ID, "err", err)
		} else {
			m.opts.Logger.Info("finished an interrupted delete", "sandbox", rec.ID)
		}
	}
}

// List returns every recorded sandbox, oldest first.
func (m *Manager) List(ctx context.Context) ([]Info, error) { return m.Find(ctx, nil) }

// Find returns the sandboxes carrying every label of labels, oldest first.
func (m *Manager) Find(ctx context.Context, labels map[string]string) ([]Info, error) {
	recs, err := m.store.List(ctx)
	if err != nil {
		return nil, err
	}
	out := make([]Info, 0, len(recs))
	for _, r := range recs {
		if visible(r) && labelsMatch(readConfig(r).Labels, labels) {
			out = append(out, m.withProgress(toInfo(m.reconcile(ctx, r))))
		}
	}
	return out, nil
}

// Get returns one sandbox; a *Error of KindNotFound if there is none.
func (m *Manager) Get(ctx context.Context, id string) (Info, error) {
	rec, err := m.get(ctx, id)
	if err != nil {
		return Info{}, err
	}
	return m.withProgress(toInfo(rec)), nil
}

// Exec runs a command to completion or timeout. A timeout is a result
// (ExecResult.TimedOut), not an error.
func (m *Manager) Exec(ctx context.Context, id string, req ExecRequest) (ExecResult, error) {
	var stdout, stderr limitedBuffer
	res, err := m.Stream(ctx, id, req, &stdout, &stderr)
	res.Stdout, res.Stderr = stdout.Bytes(), stderr.Bytes()
	if errors.Is(err, errOutputTooLarge) {
		return res, &Error{Kind: KindInvalid, Code: "output_too_large", Field: "command",
			Message: fmt.Sprintf("the command wrote more than %d MiB, which a single response cannot hold; it was stopped. Write large output to a file in the sandbox instead", maxCollected>>20)}
	}
	return res, err
}

// Stream runs a command like Exec but writes its output to stdout and
// stderr as it arrives instead of collecting it.
func (m *Manager) Stream(ctx context.Context, id string, req ExecRequest, stdout, stderr io.Writer) (ExecResult, error) {
	wreq, err := execRequest(req)
	if err != nil {
		return ExecResult{}, err
	}
	rec, err := m.get(ctx, id)
	if err != nil {
		return ExecResult{}, err
	}
	if rec.Status != StatusRunning {
		return ExecResult{}, &Error{Kind: KindConflict, Code: "sandbox_not_running",
			Message: fmt.Sprintf("sandbox %s is %s, not running", id, rec.Status)}
	}
	applyImageConfig(wreq.Process, m.imageConfig(rec))
	return m.stream(ctx, rec, wreq, stdout, stderr)
}

// stream runs wreq in rec's VM, which the caller found running.
func (m *Manager) stream(ctx context.Context, rec store.Record, wreq *agentpb.StartRequest, stdout, stderr io.Writer) (ExecResult, error) {
	id := rec.ID
	c, err := m.l.client(ctx, rec)
	if err != nil {
		return ExecResult{}, err
	}
	// The agent enforces the timeout; this one only guards against an
	// agent that stopped answering.
	timeout := time.Duration(wreq.TimeoutMs) * time.Millisecond
	rctx, cancel := context.WithTimeout(ctx, timeout+30*time.Second)
	defer cancel()
	start := time.Now()
	exit, err := c.Exec(rctx, wreq, stdout, stderr)
	res := ExecResult{ExitCode: exit.ExitCode, TimedOut: exit.TimedOut, Duration: time.Since(start)}
	if err == nil {
		m.events.publish(Event{Type: EventProcessExited, SandboxID: id,
			Exit: &ExitEvent{ExitCode: res.ExitCode, TimedOut: res.TimedOut, Duration: res.Duration}})
	}
	if err != nil && timeout > 0 && ctx.Err() == nil && rctx.Err() != nil {
		// A guest the full host disk stopped cannot answer at all.
		if _, serr := m.l.unstall(ctx, rec); serr != nil {
			return res, serr
		}
		// Otherwise the agent did not confirm the kill in time (a guest
		// too busy to answer): the command ran past its timeout all the
		// same, and the agent ends it when it gets to.
		m.l.opts.Logger.Warn("the agent did not report a timed-out command's end", "sandbox", id, "timeout", timeout)
		res.TimedOut = true
		return res, nil
	}
	if err != nil {
		if errors.Is(err, guest.ErrSessionClosed) {
			if lost := m.sessionLost(ctx, rec, err, "the command"); lost != nil {
				return res, lost
			}
		}
		if ctx.Err() != nil {
			return res, ctx.Err()
		}
		if cwd := wreq.Process.Cwd; cwd != "" && (guest.IsCode(err, guest.CodeNotFound) || guest.IsCode(err, guest.CodeWrongState)) {
			return res, &Error{Kind: KindInvalid, Code: "invalid_cwd", Field: "cwd",
				Message: fmt.Sprintf("cwd %s is not a directory in the sandbox", cwd), Err: err}
		}
		if guest.IsCode(err, guest.CodeInvalid) {
			return res, &Error{Kind: KindInvalid, Code: "invalid_command", Field: "command", Message: err.Error()}
		}
		return res, fmt.Errorf("run command in %s: %w", id, err)
	}
	return res, nil
}

// Delete stops the VM and removes every file it made, and its record.
func (m *Manager) Delete(ctx context.Context, id string) error {
	rec, err := m.lookup(ctx, id)
	// A delete that failed part-way may be tried again.
	if errors.Is(err, store.ErrNotFound) || (err == nil && !visible(rec) && rec.Status != store.StatusDeleting) {
		return notFound(id)
	}
	if err != nil {
		return err
	}
	// Deleting a sandbox still being created stops that work at once
	// rather than waiting for its pull and boot.
	m.mu.Lock()
	cancel := m.cancels[rec.ID]
	m.mu.Unlock()
	if cancel != nil {
		cancel()
	}
	return m.remove(ctx, rec)
}

func (m *Manager) remove(ctx context.Context, rec store.Record) error {
	id := rec.ID
	// A create in progress holds the lock until it has booted or failed;
	// the record is read again after, so a VM it started is killed too.
	unlock := m.lock(id)
	defer unlock()
	fresh, err := m.store.Get(ctx, id)
	if errors.Is(err, store.ErrNotFound) {
		return nil // removed meanwhile
	}
	if err != nil {
		return err
	}
	return m.destroy(ctx, fresh)
}

// destroy kills the VM, removes its directory, then its record, in that
// order. The record is marked first, so the sandbox is gone for every
// caller from then on, and a delete cut short (the process died, or a
// step failed) is finished by finishDeletes or a later Delete.
func (m *Manager) destroy(ctx context.Context, rec store.Record) error {
	m.mu.Lock()
	delete(m.configs, rec.ID)
	m.mu.Unlock()
	if rec.Status != store.StatusDeleting {
		// With the disk full the mark cannot be written; deleting is
		// how space is freed, so it goes on without it.
		if err := m.store.MarkDeleting(ctx, rec.ID); err != nil && !HostFull(err) {
			return err
		}
	}
	if err := m.l.halt(ctx, rec); err != nil {
		return fmt.Errorf("stop sandbox %s: %w", rec.ID, err)
	}
	if rec.Dir != "" {
		if err := os.RemoveAll(rec.Dir); err != nil {
			return fmt.Errorf("remove sandbox %s files: %w", rec.ID, err)
		}
	}
	if err := m.store.Delete(ctx, rec.ID); err == nil && visible(rec) {
		m.events.publish(Event{Type: EventSandboxDeleted, SandboxID: rec.ID})
	} else if err != nil && !errors.Is(err, store.ErrNotFound) {
		return fmt.Errorf("remove sandbox %s record: %w", rec.ID, err)
	}
	m.templates.sweepRetired(ctx)
	m.mu.Lock()
	delete(m.unrecorded, rec.ID)
	m.mu.Unlock()
	return nil
}

// BootSpec returns the driver and the kernel, initramfs and command line a
// new default sandbox of memMiB would boot with, without starting
// anything. The benchmark boots it bare as its baseline.
func (m *Manager) BootSpec(ctx context.Context, memMiB int) (vmm.Driver, vmm.Spec, error) {
	a, err := m.l.assets(ctx, image.Source{}, MaxDiskMiB, nil)
	if err != nil {
		return nil, vmm.Spec{}, err
	}
	return m.drivers.Default(), vmm.Spec{
		Kernel: a.kernel.Vmlinux, Initrd: a.initrd, Cmdline: bootCmdline("probe", false),
		BaseImage: a.base.Path, MemoryMiB: memMiB, VCPUs: DefaultVCPUs,
	}, nil
}

// Ping asks the sandbox's agent to answer, running no process: the
// protocol's own round trip, and a health check.
func (m *Manager) Ping(ctx context.Context, id string) error {
	rec, err := m.get(ctx, id)
	if err != nil {
		return err
	}
	if rec.Status != StatusRunning {
		return &Error{Kind: KindConflict, Code: "sandbox_not_running", Message: fmt.Sprintf("sandbox %s is %s, not running", id, rec.Status)}
	}
	c, err := m.l.client(ctx, rec)
	if err != nil {
		return err
	}
	_, err = c.Ping(ctx)
	return err
}

// BackendStatus says whether a backend can run sandboxes on this host.
type BackendStatus struct {
	Name      string
	Available bool
	// Reason says what is missing when the backend is not available.
	Reason  string
	Default bool
}

// autoBackend is the most preferred backend this host runs that can also
// run req (host directories need a driver that shares them).
func (m *Manager) autoBackend(req *CreateRequest) (string, error) {
	var why []string
	for _, name := range m.drivers.Names() {
		drv, err := m.drivers.Get(name)
		if err != nil {
			continue
		}
		if err := drv.Available(); err != nil {
			why = append(why, name+": "+oneLine(err))
			continue
		}
		if _, ok := drv.(vmm.DirSharer); len(req.Mounts) > 0 && !ok {
			why = append(why, name+": cannot share host directories (mounts)")
			continue
		}
		return name, nil
	}
	return "", &Error{Kind: KindUnavailable, Code: "backend_unavailable", Field: "backend",
		Message: fmt.Sprintf("no backend can run this sandbox on this host (%s): run `smolvm setup`, and `smolvm doctor` for what is missing", strings.Join(why, "; "))}
}

// oneLine is err's text on one line, however many things it joins.
func oneLine(err error) string { return strings.ReplaceAll(err.Error(), "\n", "; ") }

// Backends reports every backend the API knows, in its order, with
// whether this host can run it.
func (m *Manager) Backends() []BackendStatus { return BackendStates(m.drivers) }

// BackendStates reports every backend the API knows, in its order, as the
// drivers in reg can run them on this host.
func BackendStates(reg *vmm.Registry) []BackendStatus {
	def := reg.Default()
	var out []BackendStatus
	for _, name := range Backends {
		s := BackendStatus{Name: name}
		drv, err := reg.Get(name)
		switch {
		case err != nil:
			s.Reason = fmt.Sprintf("this build of smolvm has no %s driver; it runs sandboxes with %s", name, strings.Join(reg.Names(), ", "))
		default:
			if aerr := drv.Available(); aerr != nil {
				s.Reason = oneLine(aerr)
			} else {
				s.Available = true
			}
			s.Default = def != nil && drv.Name() == def.Name() && s.Available
		}
		out = append(out, s)
	}
	return out
}

// DataDir is where the Manager keeps its state.
func (m *Manager) DataDir() datadir.Dir { return m.opts.DataDir }

// Helpers are the helper binaries (by name) this Manager was configured
// with, for host checks.
func (m *Manager) Helpers() map[string]string {
	return map[string]string{doctor.Agent.Name: m.opts.AgentPath, doctor.Net.Name: m.opts.NetPath, doctor.Jail.Name: drivers.JailPath(m.opts.NetPath)}
}

// Package smolvm creates isolated Linux sandboxes, each a real virtual
// machine with its own kernel, and runs commands in them.
//
//	sb, err := smolvm.New(ctx, smolvm.Config{Memory: 512, DiskSize: 1024})
//	if err != nil { ... }
//	defer sb.Delete(ctx)
//	res, err := sb.Run(ctx, "python3 --version", smolvm.RunOptions{Timeout: 30 * time.Second})
//	fmt.Print(res.ExitCode, res.Stdout, res.Stderr)
//
// Sandboxes outlive the process that created them: Attach finds one again
// by its id from any later process.
package smolvm

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"time"

	"github.com/smolvm/smolvm/internal/datadir"
	"github.com/smolvm/smolvm/internal/network"
	"github.com/smolvm/smolvm/internal/sandbox"
)

// Config describes a sandbox. Zero values take the defaults: the Debian
// image, 512 MiB of memory, a 1024 MiB disk, 1 vCPU, the backend chosen for the host (see Backend).
type Config struct {
	OS       string // "" or "debian" (built locally), "alpine", "ubuntu" (pulled); "windows" is refused
	Image    string // an OCI reference, file:///path (ext4, qcow2, tarball), s3://bucket/key; "" for the OS default
	Memory   int    // MiB, 128..16384
	DiskSize int    // MiB
	VCPUs    int    // 1..32
	Backend  string // "" or "auto": Firecracker where KVM works and it is installed, else QEMU, else libkrun; or one of them by name
	// Network is what the guest may reach; the zero value is mode "open":
	// the public Internet, not the host itself, link-local (metadata)
	// addresses or private ranges unless Allow lists them or AllowPrivate
	// is set.
	Network Network
	// Ports are guest TCP ports to expose on the host (127.0.0.1 unless a
	// host address is given); Ports() reports the host ports they got.
	Ports []Port
	// Name is unique among the host's sandboxes and works wherever the id
	// does.
	Name string
	// Labels are your own key/value pairs.
	Labels map[string]string
	// Env is seen by every command in the sandbox; a command's own Env
	// wins over it.
	Env map[string]string
	// Timeout, when set, ends the sandbox that long after it is created,
	// as OnTimeout says ("delete", the default, or "pause"). Up to 24 h.
	Timeout   time.Duration
	OnTimeout string
	// Snapshot starts the sandbox as a fork of this snapshot (id or name):
	// its memory, processes and files, with an identity of its own.
	// Memory, VCPUs, Backend and the image come from the snapshot.
	Snapshot string
	// Mounts share host directories under Options.AllowMounts with the
	// guest.
	Mounts []Mount
	Host   Options
}

// Mount shares a host directory with the guest, read-only unless
// Writable.
type Mount struct {
	Host     string // absolute host directory
	Guest    string // absolute guest path, made if missing
	Writable bool
}

// Snapshot is a sandbox saved whole, memory, devices and disk; Config's
// Snapshot creates forks of it.
type Snapshot = sandbox.Snapshot

// Network is a sandbox's network policy.
type Network = network.Policy

// Port forwards a host port to a guest port. Host 0 picks a free port.
type Port = network.Forward

// Network modes.
const (
	NetworkOpen       = network.ModeOpen
	NetworkOff        = network.ModeOff
	NetworkRestricted = network.ModeRestricted
)

// Options say where smolvm keeps its state and how it runs VMs.
type Options struct {
	DataDir   string    // "" for $SMOLVM_DATA_DIR or ~/.local/share/smolvm
	AgentPath string    // the guest agent binary; "" to find it next to the executable
	NetPath   string    // the network helper smolvm-net; "" to find it next to the executable or in $PATH
	Accel     string    // "kvm" or "tcg"; "" picks KVM only where it really works
	Progress  io.Writer // human-readable lines about long work, such as a first image build
	// Logger receives what an operator needs to see (a template retired
	// after its clone crashed, cleanup that failed); nil logs as text to
	// Progress.
	Logger *slog.Logger
	// AllowMounts are the host directories sandboxes may mount (with what
	// is beneath them); none by default.
	AllowMounts []string
}

// Shell selects how Run passes a command to the guest.
type Shell = sandbox.Shell

const (
	// ShellLogin runs the command through the image's login shell (bash,
	// else sh), so /etc/profile applies. The default.
	ShellLogin = sandbox.ShellLogin
	// ShellRaw splits the command like a POSIX shell would and runs it
	// without a shell.
	ShellRaw = sandbox.ShellRaw
)

// Status is a sandbox's state: "creating", "running", "paused", "stopped",
// "error".
type Status = sandbox.Status

// Error is a failure with a stable machine-readable Code.
type Error = sandbox.Error

// RunOptions tune one command.
type RunOptions struct {
	Timeout time.Duration // 0 means 30 s
	Shell   Shell         // "" means ShellLogin
	// Argv, when set, is run exactly with no shell, and the command
	// string must be empty.
	Argv []string
	// Cwd is an absolute path in the guest; "" means the image's working
	// directory, else the user's home.
	Cwd string
	// Env is added to the command's environment.
	Env map[string]string
	// Stdin, when not nil, is fed to the command, which then reads end of
	// file.
	Stdin []byte
	// Stdout and Stderr, when set, receive output as it arrives and the
	// Result's fields stay empty: for output too large to hold.
	Stdout, Stderr io.Writer
}

// Result is a finished command. A non-zero ExitCode is a normal result; a
// process killed by a signal reports 128+signal.
type Result struct {
	ExitCode int
	Stdout   string
	Stderr   string
	// TimedOut is set when the command was killed at its timeout; Stdout
	// and Stderr hold what it wrote before that.
	TimedOut bool
	Duration time.Duration
}

// Sandbox is a handle on one sandbox VM.
type Sandbox struct {
	m  *sandbox.Manager
	id string
	// owned is set on handles from New and Attach, which each open a
	// Manager of their own and close it with the handle.
	owned bool
}

// Host is smolvm on this machine: one data directory and one connection to
// each sandbox's agent, shared by every handle it gives out. Open one per
// process and create or attach sandboxes through it: a guest agent serves
// one connection at a time, so two independent handles on one sandbox in
// one process would wait on each other.
type Host struct {
	m *sandbox.Manager
}

// Open opens the host's sandboxes. Sandboxes outlive the Host; Close
// releases only this process's connections.
func Open(ctx context.Context, o Options) (*Host, error) {
	m, err := open(ctx, o)
	if err != nil {
		return nil, err
	}
	return &Host{m: m}, nil
}

// Create creates a sandbox, boots it, and returns once it answers
// commands. cfg.Host is ignored: the Host's options apply.
func (h *Host) Create(ctx context.Context, cfg Config) (*Sandbox, error) {
	info, err := h.m.Create(ctx, createRequest(cfg))
	if err != nil {
		return nil, err
	}
	return &Sandbox{m: h.m, id: info.ID}, nil
}

// Attach returns a handle on an existing sandbox, possibly created by
// another process.
func (h *Host) Attach(ctx context.Context, id string) (*Sandbox, error) {
	info, err := h.m.Get(ctx, id) // id may be a name
	if err != nil {
		return nil, err
	}
	return &Sandbox{m: h.m, id: info.ID}, nil
}

// List returns the ids of the host's sandboxes, oldest first.
func (h *Host) List(ctx context.Context) ([]string, error) {
	infos, err := h.m.List(ctx)
	if err != nil {
		return nil, err
	}
	ids := make([]string, len(infos))
	for i, info := range infos {
		ids[i] = info.ID
	}
	return ids, nil
}

// Close releases the Host's connections; its sandboxes keep running, and
// handles it gave out stop working.
func (h *Host) Close() error { return h.m.Close() }

func createRequest(cfg Config) sandbox.CreateRequest {
	req := sandbox.CreateRequest{
		OS: cfg.OS, Image: cfg.Image, MemoryMiB: cfg.Memory, DiskSizeMiB: cfg.DiskSize,
		VCPUs: cfg.VCPUs, Backend: cfg.Backend, Network: cfg.Network, Ports: cfg.Ports,
		Name: cfg.Name, Labels: cfg.Labels, Env: cfg.Env, Timeout: cfg.Timeout, OnTimeout: cfg.OnTimeout,
		Snapshot: cfg.Snapshot,
	}
	for _, mt := range cfg.Mounts {
		req.Mounts = append(req.Mounts, sandbox.Mount{Host: mt.Host, Guest: mt.Guest, ReadOnly: !mt.Writable})
	}
	return req
}

// Snapshots lists the host's snapshots, newest first.
func (h *Host) Snapshots(ctx context.Context) ([]Snapshot, error) { return h.m.Snapshots() }

// DeleteSnapshot removes a snapshot; with force, the sandboxes forked from
// it go too, else they make it fail.
func (h *Host) DeleteSnapshot(ctx context.Context, ref string, force bool) error {
	return h.m.DeleteSnapshot(ctx, ref, force)
}

func open(ctx context.Context, o Options) (*sandbox.Manager, error) {
	return sandbox.Open(ctx, sandbox.Options{
		DataDir: datadir.Dir(o.DataDir), AgentPath: o.AgentPath, NetPath: o.NetPath, Accel: o.Accel, Progress: o.Progress,
		Logger: o.Logger, AllowMounts: o.AllowMounts,
	})
}

// New creates a sandbox, boots it, and returns once it answers commands.
// The handle has a Host of its own; a process that works with several
// sandboxes, or with one through several handles, should Open one Host.
func New(ctx context.Context, cfg Config) (*Sandbox, error) {
	m, err := open(ctx, cfg.Host)
	if err != nil {
		return nil, err
	}
	info, err := m.Create(ctx, createRequest(cfg))
	if err != nil {
		m.Close()
		return nil, err
	}
	return &Sandbox{m: m, id: info.ID, owned: true}, nil
}

// Attach returns a handle on an existing sandbox, possibly created by
// another process, with a Host of its own (see New).
func Attach(ctx context.Context, id string, o Options) (*Sandbox, error) {
	m, err := open(ctx, o)
	if err != nil {
		return nil, err
	}
	if _, err := m.Get(ctx, id); err != nil {
		m.Close()
		return nil, err
	}
	return &Sandbox{m: m, id: id, owned: true}, nil
}

// ID is the sandbox's id, "vm-" and 8 hex digits.
func (s *Sandbox) ID() string { return s.id }

// Status reports the sandbox's current state.
func (s *Sandbox) Status(ctx context.Context) (Status, error) {
	info, err := s.m.Get(ctx, s.id)
	return info.Status, err
}

// Run runs command and waits for it to finish or time out.
func (s *Sandbox) Run(ctx context.Context, command string, o RunOptions) (*Result, error) {
	req := sandbox.ExecRequest{Command: command, Argv: o.Argv, Timeout: o.Timeout, Shell: o.Shell,
		Cwd: o.Cwd, Env: o.Env, Stdin: o.Stdin}
	var res sandbox.ExecResult
	var err error
	if o.Stdout != nil || o.Stderr != nil {
		res, err = s.m.Stream(ctx, s.id, req, orDiscard(o.Stdout), orDiscard(o.Stderr))
	} else {
		res, err = s.m.Exec(ctx, s.id, req)
	}
	if err != nil {
		return nil, err
	}
	return &Result{ExitCode: res.ExitCode, Stdout: string(res.Stdout), Stderr: string(res.Stderr),
		TimedOut: res.TimedOut, Duration: res.Duration}, nil
}

func orDiscard(w io.Writer) io.Writer {
	if w == nil {
		return io.Discard
	}
	return w
}

// Expose forwards a host port to the guest's port p.Guest and returns the
// forward in effect, with the host port picked when p.Host was 0.
func (s *Sandbox) Expose(ctx context.Context, p Port) (Port, error) {
	return s.m.ExposePort(ctx, s.id, p)
}

// ClosePort stops forwarding the guest's port.
func (s *Sandbox) ClosePort(ctx context.Context, guest int) error {
	_, err := s.m.ClosePort(ctx, s.id, guest)
	return err
}

// Ports lists the exposed ports with the host ports in effect.
func (s *Sandbox) Ports(ctx context.Context) ([]Port, error) { return s.m.Ports(ctx, s.id) }

// Stop shuts the VM down and keeps its disk.
func (s *Sandbox) Stop(ctx context.Context) error { return s.m.Stop(ctx, s.id, 0) }

// Pause stops the sandbox's vCPUs and keeps its memory; Resume lets it go
// on where it was.
func (s *Sandbox) Pause(ctx context.Context) error {
	_, err := s.m.Pause(ctx, s.id)
	return err
}

// Resume lets a paused sandbox run again.
func (s *Sandbox) Resume(ctx context.Context) error {
	_, err := s.m.Resume(ctx, s.id)
	return err
}

// SnapshotOptions tune a snapshot.
type SnapshotOptions struct {
	Name string // unique; "" for none
	Stop bool   // stop the sandbox once it is saved
}

// Snapshot saves the sandbox's memory, devices and disk; it stands still
// meanwhile and then goes on as it was.
func (s *Sandbox) Snapshot(ctx context.Context, o SnapshotOptions) (Snapshot, error) {
	return s.m.CreateSnapshot(ctx, s.id, sandbox.SnapshotRequest{Name: o.Name, Stop: o.Stop})
}

// SetTimeout gives the sandbox a time limit of d from now; 0 removes it.
func (s *Sandbox) SetTimeout(ctx context.Context, d time.Duration) error {
	_, err := s.m.Update(ctx, s.id, sandbox.UpdateRequest{Timeout: &d})
	return err
}

// Start boots a stopped sandbox again.
func (s *Sandbox) Start(ctx context.Context) error {
	_, err := s.m.Start(ctx, s.id)
	return err
}

// Delete stops the VM, removes everything it made, and releases the handle.
func (s *Sandbox) Delete(ctx context.Context) error {
	err := s.m.Delete(ctx, s.id)
	if s.owned {
		return errors.Join(err, s.m.Close())
	}
	return err
}

// Close releases the handle; the sandbox keeps running.
func (s *Sandbox) Close() error {
	if s.owned {
		return s.m.Close()
	}
	return nil
}

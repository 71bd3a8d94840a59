// Package vmm defines what smolvm needs from a virtual machine monitor.
// Each backend (qemu, and later firecracker and libkrun) implements Driver
// and owns everything about its VMM: command lines, file names, disk
// format, snapshot layout, accelerator, and how the agent is dialled. The
// sandbox manager sees only Spec, Machine and the optional interfaces.
package vmm

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"slices"

	"github.com/smolvm/smolvm/internal/agent/wire"
)

// Spec is everything a driver needs to boot one sandbox.
type Spec struct {
	ID  string
	Dir string // the sandbox's own directory; the driver keeps its files here
	// Kernel is an uncompressed vmlinux with a PVH entry note.
	Kernel  string
	Initrd  string
	Cmdline string
	// BaseImage is the read-only root filesystem the sandbox disk is made
	// over, when the disk does not exist yet.
	BaseImage string
	DiskMiB   int
	MemoryMiB int
	VCPUs     int
	// MemoryLimitMiB bounds what the VMM process may hold in all, guest
	// memory and its own; 0 is the driver's default, guest memory plus an
	// allowance for the VMM.
	MemoryLimitMiB int
	// DiskIO caps the VMM's I/O on the disk that holds Dir; a zero field
	// is the default (DefaultDiskBPS, DefaultDiskIOPS).
	DiskIO DiskIO
	// Net attaches the guest's network interface; nil gives the guest no
	// interface but loopback.
	Net *NetAttachment
	// ForSnapshot says the machine will be saved as a template: a driver
	// may lay out its memory so that the copies restored from it share
	// the pages none of them has written.
	ForSnapshot bool
	// Mounts are host directories shared with the guest. A driver that
	// cannot share directories refuses a spec that has any; the guest
	// mounts them when the kernel command line asks it to (MountCmdline).
	Mounts []Mount
}

// Mount shares a host directory with the guest.
type Mount struct {
	Tag      string // the 9p mount tag the guest mounts by: "m0", "m1", ...
	HostPath string // absolute, already resolved and checked by the caller
	// GuestPath is where the guest mounts it: absolute, made if missing.
	GuestPath string
	ReadOnly  bool
}

// MountCmdline is the kernel command line parameter that has the guest
// agent mount m at m.GuestPath; the caller appends one per mount.
func MountCmdline(m Mount) string {
	return wire.Mount{Tag: m.Tag, Path: m.GuestPath, ReadOnly: m.ReadOnly}.Param()
}

// NetKind is how a guest's network interface reaches the host.
type NetKind string

// NetStream is a unix stream socket carrying Ethernet frames, each after
// its length as 4 bytes big-endian (QEMU's stream netdev framing).
const NetStream NetKind = "stream"

// NetAttachment is the host end of a guest's network interface.
type NetAttachment struct {
	Kind NetKind
	// Socket is the listening unix socket, for NetStream.
	Socket string
	// MAC is the guest interface's address.
	MAC string
}

// Machine is one VM, running or found again from its runtime record. Its
// methods may be called from any process, not only the one that started
// it: VMs outlive the process that made them.
type Machine interface {
	// Runtime is how a later process finds this machine again
	// (Driver.Attach); smolvm stores it with the sandbox record.
	Runtime() json.RawMessage
	// PID is the VMM process's id.
	PID() int
	// Alive reports whether the VMM process still runs.
	Alive() bool
	// Kill ends the VMM process at once and waits until it is gone.
	Kill(ctx context.Context) error
	// Wait waits for the VMM process to exit on its own (after the guest
	// powered off), until ctx ends.
	Wait(ctx context.Context) error
	// DialAgent opens a byte stream to the guest agent's port. The agent
	// handshake runs over it; a driver whose transport needs an exchange
	// of its own first (a vsock CONNECT) does it here.
	DialAgent(ctx context.Context) (net.Conn, error)
	// ConsoleLog is the file the guest's serial console is written to.
	ConsoleLog() string
}

// Driver runs VMs with one VMM.
type Driver interface {
	// Name is the backend's name in the API ("qemu").
	Name() string
	// Available returns an error naming what this host lacks, if anything.
	Available() error
	// Identity names what a saved VM state depends on besides the guest:
	// the VMM's version and the accelerator. Templates are keyed by it.
	Identity(ctx context.Context) (string, error)
	// Start makes the sandbox's disk over spec.BaseImage if spec.Dir has
	// none yet, starts the VM and returns once it runs; the guest may still
	// be booting. The process outlives the caller.
	Start(ctx context.Context, spec Spec) (Machine, error)
	// Attach finds a machine again from what its Runtime returned.
	Attach(runtime json.RawMessage) (Machine, error)
	// Clear removes what the driver keeps in dir for a machine (its disk,
	// sockets, console), leaving the directory and others' files.
	Clear(dir string) error
	// Reap ends a VMM still running in dir that no runtime record may
	// name: one whose Start never returned, because the process starting
	// it died. It finds it from the driver's own files in dir; with none
	// running it does nothing.
	Reap(ctx context.Context, dir string) error
}

// Snapshotter is a Driver that can save a running VM and start copies of
// it, which is how templates make creation fast. A snapshot lives in a
// directory whose layout is the driver's.
type Snapshotter interface {
	// Save stops m, writes its memory and device state and its disk into
	// dir (the directory m was started in) and ends it. What stays in dir
	// is the snapshot, and m's console log for the caller to read.
	Save(ctx context.Context, m Machine, dir string) error
	// Restore starts a copy of the snapshot in snapDir. spec describes the
	// same machine (memory, vCPUs, network) in a directory of its own;
	// its disk is made over the snapshot's, at the snapshot's size.
	Restore(ctx context.Context, spec Spec, snapDir string) (Machine, error)
	// SnapshotFiles are the files a complete snapshot in a directory has.
	SnapshotFiles() []string
	// DropState removes what a restore needs from a snapshot while keeping
	// what the copies already made still use (their disks' base).
	DropState(snapDir string) error
	// Uses reports whether the machine in dir depends on the snapshot in
	// snapDir, so the snapshot must not be removed.
	Uses(dir, snapDir string) bool
}

// Checkpointer is a Snapshotter that can save a machine that keeps
// running: its memory, devices and a copy of its disk go into dir, in the
// layout Restore reads, and the machine runs on afterwards (stays paused
// if it was paused).
type Checkpointer interface {
	Checkpoint(ctx context.Context, m Machine, dir string) error
}

// Pauser is a Driver that can stop a running VM's vCPUs and let them run
// again, keeping its memory.
type Pauser interface {
	Pause(ctx context.Context, m Machine) error
	Resume(ctx context.Context, m Machine) error
}

// Staller is a Driver whose VMs stop, rather than fail the guest's
// write, when the host has no space left for their disk: nothing the
// guest wrote is lost, and it goes on once there is space again.
type Staller interface {
	// Stalled reports whether m is stopped on such a write.
	Stalled(ctx context.Context, m Machine) (bool, error)
	// Unstall lets m run again; the write is tried again.
	Unstall(ctx context.Context, m Machine) error
}

// RunStater is a Driver that can say what state a VM is in as its VMM
// sees it ("running", "paused", ...): what an operator needs to know of
// a guest that does not answer.
type RunStater interface {
	Status(ctx context.Context, m Machine) (string, error)
}

// DiskResizer is a Driver that can grow a running VM's root disk.
type DiskResizer interface {
	Resize(ctx context.Context, m Machine, bytes int64) error
}

// ErrUnknownBackend is returned for a backend name smolvm does not know.
var ErrUnknownBackend = errors.New("unknown backend")

// Registry is the set of drivers a Manager may use, by name.
type Registry struct {
	drivers map[string]Driver
	names   []string
}

// NewRegistry holds drivers in order of preference.
func NewRegistry(drivers ...Driver) *Registry {
	r := &Registry{drivers: make(map[string]Driver)}
	for _, d := range drivers {
		r.drivers[d.Name()] = d
		r.names = append(r.names, d.Name())
	}
	return r
}

// Get returns the driver called name.
func (r *Registry) Get(name string) (Driver, error) {
	d, ok := r.drivers[name]
	if !ok {
		return nil, fmt.Errorf("%w %q", ErrUnknownBackend, name)
	}
	return d, nil
}

// Default is the most preferred driver this host can run, else the most
// preferred of all (whose Available then says what is missing). It is
// asked each time: a backend installed while the server runs is picked up.
func (r *Registry) Default() Driver {
	for _, n := range r.names {
		if r.drivers[n].Available() == nil {
			return r.drivers[n]
		}
	}
	if len(r.names) == 0 {
		return nil
	}
	return r.drivers[r.names[0]]
}

// Names lists the registered drivers in order of preference.
func (r *Registry) Names() []string { return slices.Clone(r.names) }

// DirSharer is a Driver that can share host directories with a guest
// (Spec.Mounts); asking another driver for mounts is refused up front.
type DirSharer interface {
	ShareDirs()
}

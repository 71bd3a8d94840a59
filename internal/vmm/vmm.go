// Package vmm defines what smolvm needs from a virtual machine monitor.
// Each backend (qemu, and later firecracker and libkrun) implements Driver;
// the sandbox manager never builds a VMM command line itself.
package vmm

import (
	"context"
	"errors"
)

// Spec is everything a driver needs to boot one sandbox.
type Spec struct {
	ID  string
	Dir string // the sandbox's own directory; the driver keeps its files here
	// Kernel is an uncompressed vmlinux with a PVH entry note.
	Kernel  string
	Initrd  string
	Cmdline string
	// BaseImage is the read-only root filesystem the sandbox disk overlays.
	BaseImage string
	DiskMiB   int
	MemoryMiB int
	VCPUs     int
	// Accel is "kvm" or "tcg".
	Accel string
	// NetSocket, when set, is a unix socket whose listener carries the
	// guest's network interface (frames framed as QEMU's stream netdev
	// does); "" gives the guest no interface but loopback.
	NetSocket string
	// NetMAC is the guest interface's MAC address.
	NetMAC string
}

// Instance is how a running VM is found again, possibly by a later process.
// It is stored as JSON with the sandbox record.
type Instance struct {
	PID         int    `json:"pid"`
	AgentSocket string `json:"agent_socket"`
	QMPSocket   string `json:"qmp_socket,omitempty"`
	Console     string `json:"console,omitempty"`
	Disk        string `json:"disk"`
}

// Driver runs VMs with one VMM.
type Driver interface {
	// Name is the backend's name in the API ("qemu").
	Name() string
	// Available returns an error naming what this host lacks, if anything.
	Available() error
	// CreateDisk makes the sandbox's writable disk over spec.BaseImage.
	CreateDisk(ctx context.Context, spec Spec) error
	// Boot starts the VM process and returns once it runs; the guest may
	// still be booting. The process outlives the caller.
	Boot(ctx context.Context, spec Spec) (Instance, error)
	// Alive reports whether inst's VM process is still running.
	Alive(inst Instance) bool
	// Kill ends the VM process at once and waits until it is gone.
	Kill(ctx context.Context, inst Instance) error
	// Wait waits for the VM process to exit on its own (after the guest
	// powered off), until ctx ends.
	Wait(ctx context.Context, inst Instance) error
}

// ErrUnknownBackend is returned for a backend name smolvm does not know.
var ErrUnknownBackend = errors.New("unknown backend")

// Snapshotter is a Driver that can save a running VM and start copies of
// it, which is how templates make creation fast.
type Snapshotter interface {
	// Save pauses the VM, writes its state to statePath and ends it. Its
	// disk must not be written again; clones overlay it.
	Save(ctx context.Context, inst Instance, statePath string) error
	// Restore starts a VM from a saved state. spec describes the same
	// machine as the saved one, with spec.BaseImage the saved VM's disk.
	Restore(ctx context.Context, spec Spec, statePath string) (Instance, error)
	// Resize grows the running VM's root disk to bytes.
	Resize(ctx context.Context, inst Instance, bytes int64) error
}

// Versioner reports the VMM's version, which templates are keyed by: a
// state saved by one version may not load in another.
type Versioner interface {
	Version(ctx context.Context) (string, error)
}

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

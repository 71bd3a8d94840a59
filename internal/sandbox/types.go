package sandbox

import (
	"errors"
	"fmt"
	"time"

	"github.com/smolvm/smolvm/internal/network"
	"github.com/smolvm/smolvm/internal/store"
)

// Status is a sandbox's lifecycle state, as the store records it.
type Status = store.Status

const (
	StatusCreating = store.StatusCreating
	StatusRunning  = store.StatusRunning
	StatusStopped  = store.StatusStopped
	StatusError    = store.StatusError
	StatusPaused   = store.StatusPaused
)

// Shell selects how a command string is run in the guest.
type Shell string

const (
	// ShellLogin runs the command through the image's login shell (bash, else
	// sh) so /etc/profile applies.
	ShellLogin Shell = "login"
	// ShellRaw runs the command with /bin/sh -c and no login profile.
	ShellRaw Shell = "raw"
)

// Limits enforced on create and exec requests.
const (
	MinMemoryMiB   = 128
	MaxMemoryMiB   = 16384
	MinVCPUs       = 1
	MaxVCPUs       = 32
	MinDiskMiB     = 128
	MaxDiskMiB     = 1 << 20 // 1 TiB; the overlay is sparse
	MinTimeoutSec  = 1
	MaxTimeoutSec  = 3600
	DefaultTimeout = 30 * time.Second
)

// Defaults applied when a create request leaves a field out.
const (
	DefaultMemoryMiB = 512
	DefaultDiskMiB   = 1024
	DefaultVCPUs     = 1
	// DefaultBackend picks the fastest backend this host runs:
	// Firecracker where KVM works and it is installed, else QEMU (with KVM,
	// else emulation), else libkrun.
	DefaultBackend = AutoBackend
)

// AutoBackend asks for the backend chosen for this host.
const AutoBackend = "auto"

// Backends are the backend names the API knows; a driver registry may hold
// fewer, and a known name it lacks is refused as unavailable, not unknown.
var Backends = []string{"qemu", "firecracker", "libkrun"}

// CreateRequest describes a sandbox to create. Zero values take defaults.
type CreateRequest struct {
	OS          string // "" (default Linux), "alpine", "ubuntu", "debian", "windows"
	Image       string // image reference; "" for the OS default
	MemoryMiB   int
	DiskSizeMiB int
	VCPUs       int
	Backend     string // "" or "auto" (chosen for the host), "qemu", "firecracker", "libkrun"
	// Network is what the guest may reach; the zero value is mode open.
	Network network.Policy
	// Ports are exposed from the guest on the host once it runs.
	Ports []network.Forward
	// Name, when set, is unique among sandboxes and works wherever an id
	// does.
	Name string
	// Labels are the caller's own key/value pairs; List can filter by them.
	Labels map[string]string
	// Env is seen by every command run in the sandbox; a command's own
	// Env wins over it.
	Env map[string]string
	// Timeout, when set, ends the sandbox that long after it was created
	// (or its timeout last extended), as OnTimeout says.
	Timeout time.Duration
	// OnTimeout is OnTimeoutDelete (the default) or OnTimeoutPause.
	OnTimeout string
	// Snapshot starts the sandbox as a fork of this snapshot (id or name):
	// its memory, processes and files, with an identity of its own.
	Snapshot string
	// Mounts share host directories with the guest.
	Mounts []Mount
}

// Mount shares a host directory with the guest.
type Mount struct {
	Host  string `json:"host"`
	Guest string `json:"guest"`
	// ReadOnly is the default for a mount in a request; see CreateRequest.
	ReadOnly bool `json:"readonly"`
}

// What a sandbox does when its time limit is reached.
const (
	OnTimeoutDelete = "delete"
	OnTimeoutPause  = "pause"
)

// MaxTimeout bounds a sandbox's time limit.
const MaxTimeout = 24 * time.Hour

// Info is what is known about one sandbox.
type Info struct {
	ID          string
	Status      Status
	OS          string
	Image       string
	Backend     string
	MemoryMiB   int
	DiskSizeMiB int
	VCPUs       int
	PID         int
	CreatedAt   time.Time
	// Network is what the guest may reach.
	Network network.Policy
	// Ports are the guest ports exposed on the host, with the host ports
	// in effect.
	Ports []network.Forward
	// Error explains StatusError.
	Error  string
	Name   string
	Labels map[string]string
	Env    map[string]string
	// Deadline is when the server ends the sandbox, as OnTimeout says;
	// zero when it has no time limit.
	Deadline  time.Time
	Timeout   time.Duration
	OnTimeout string
	// Snapshot is the snapshot the sandbox was forked from, if any.
	Snapshot string
	Mounts   []Mount
	// Boot says how Create or Start brought the VM up; empty elsewhere.
	Boot BootKind
	// Warnings are things Create or Start worked around, such as a
	// template that failed and a cold boot instead; empty elsewhere.
	Warnings []string
	// Progress is the preparation under way while Status is creating, as
	// far as this process knows (it is the one doing the work).
	Progress *Progress
}

// Progress is how far the preparation of a sandbox's image has come.
type Progress struct {
	Phase string // "resolve", "pull", "extract", "mkfs", "ready"
	Done  int64  // bytes, where the phase counts bytes
	Total int64  // bytes expected, 0 if unknown
}

// BootKind is how a sandbox's VM was brought up.
type BootKind string

const (
	// BootCold booted the kernel from scratch.
	BootCold BootKind = "cold"
	// BootTemplate restored a saved, booted VM and gave it a new identity.
	BootTemplate BootKind = "template"
	// BootPool handed out a sandbox restored ahead of time.
	BootPool BootKind = "pool"
)

// ExecRequest is one command to run in a sandbox.
type ExecRequest struct {
	// Command is a command line for Shell; Argv is run exactly, with no
	// shell. Exactly one is set.
	Command string
	Argv    []string
	Timeout time.Duration // 0 means DefaultTimeout
	Shell   Shell         // "" means ShellLogin
	// Cwd is an absolute guest path; "" means the image's working
	// directory, else the user's home.
	Cwd string
	// Env is added to the command's environment, over the image's.
	Env map[string]string
	// Stdin, when not nil, is fed to the command, then closed.
	Stdin []byte
}

// ExecResult is the outcome of a command. A non-zero ExitCode is a normal
// result, not an error.
type ExecResult struct {
	ExitCode int
	Stdout   []byte
	Stderr   []byte
	// TimedOut is set when the command ran past its timeout and was killed;
	// Stdout and Stderr then hold what it wrote before that.
	TimedOut bool
	Duration time.Duration
}

// Kind classifies an Error so each door (HTTP, CLI, library) can map it.
type Kind int

const (
	KindInvalid     Kind = iota + 1 // bad input: 400/422
	KindNotFound                    // unknown sandbox: 404
	KindConflict                    // wrong state for the operation: 409
	KindUnavailable                 // valid request, but this host lacks something: 4xx naming it
	KindInternal                    // our fault or the VM's: 500
	KindUpstream                    // a registry or store we fetch from failed: 502
	// KindInsufficientStorage is a disk that is full, the guest's or the
	// host's: 507.
	KindInsufficientStorage
	// KindForbidden is a request this server's settings refuse: 403.
	KindForbidden
)

// Error is a failure with a stable machine-readable code.
type Error struct {
	Kind    Kind
	Code    string // stable, snake_case, e.g. "invalid_memory", "sandbox_not_found"
	Field   string // the request field at fault, if any
	Message string // what happened and what to do, for a person
	Err     error  // underlying cause, if any
	// Status is the sandbox's status when a call came in the wrong one.
	Status Status
}

func (e *Error) Error() string {
	if e.Err != nil {
		return fmt.Sprintf("%s: %v", e.Message, e.Err)
	}
	return e.Message
}

func (e *Error) Unwrap() error { return e.Err }

// AsError returns the *Error in err's chain, if any.
func AsError(err error) (*Error, bool) {
	var e *Error
	ok := errors.As(err, &e)
	return e, ok
}

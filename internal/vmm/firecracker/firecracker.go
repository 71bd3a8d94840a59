// Package firecracker runs sandboxes under Firecracker: one `firecracker`
// process per sandbox, configured over its REST API on a Unix socket,
// booting the vmlinux and initramfs with a raw ext4 disk of the sandbox's
// own, the agent on a hybrid vsock, the serial console in console.log.
//
// Each Firecracker runs in mount and network namespaces of its own, set
// up by the fc-launch helper (helper.go): the mount namespace is what
// lets a template's clones find their own files at the paths the
// template's snapshot recorded, and the network namespace holds the TAP
// device that the tap-relay helper (relay.go) joins to the sandbox's
// network process. Run as root, as the QEMU driver's jail does, each
// Firecracker also drops to a user of its own (internal/jail) and is put
// in a control group (internal/cgroup). The driver needs root.
package firecracker

import (
	"bytes"
	"context"
	"crypto/sha256"
	"debug/elf"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	goruntime "runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/smolvm/smolvm/internal/agent/wire"
	"github.com/smolvm/smolvm/internal/cgroup"
	"github.com/smolvm/smolvm/internal/jail"
	"github.com/smolvm/smolvm/internal/vmm"
)

// Options configure the driver.
type Options struct {
	// Binary is the firecracker executable; "" finds "firecracker" on
	// $PATH.
	Binary string
	// HelperPath is the binary whose fc-launch and tap-relay subcommands
	// (Main) the driver runs: smolvm-jail. "" finds smolvm-jail beside
	// this executable, then on $PATH.
	HelperPath string
	// NoJail runs Firecracker as root (still in its namespaces), without
	// a user of its own or a control group.
	NoJail bool
	// Env is Firecracker's whole environment ("KEY=value"), and its
	// helpers'. By default they get none: nothing of the server's
	// environment (credentials among it) reaches a process a guest may
	// take over.
	Env []string
	// Users hands out the jail's users. The drivers of one server share
	// one, so that VMs of two backends starting at once never get the
	// same user; nil makes the driver its own.
	Users *jail.Users
}

// Driver is the Firecracker backend.
type Driver struct {
	opts Options
	jail *jail.Users // nil: not jailed
	// cgroups is where each VMM gets a control group; nil without the
	// jail or a usable hierarchy.
	cgroups *cgroup.Hierarchy
	swept   atomic.Int64 // when the groups were last swept, unix ns

	mu      sync.Mutex
	version string // once read; an error is not kept, so it is tried again
}

// New returns the Firecracker driver.
func New(o Options) *Driver {
	d := &Driver{opts: o}
	if !o.NoJail && os.Geteuid() == 0 {
		d.jail = o.Users
		if d.jail == nil {
			d.jail = jail.NewUsers(jail.VMMBase, jail.PerRange)
		}
		// Without a usable hierarchy VMs get no group, as under QEMU.
		if h, err := cgroup.Detect(cgroup.Root); err == nil {
			d.cgroups = &h
		}
	}
	return d
}

func (d *Driver) Name() string { return "firecracker" }

// env is the environment of the processes the driver starts; never nil,
// which would pass on the caller's.
func (d *Driver) env() []string { return append([]string{}, d.opts.Env...) }

// binary is the firecracker executable's path.
func (d *Driver) binary() (string, error) {
	name := d.opts.Binary
	if name == "" {
		name = "firecracker"
	}
	p, err := exec.LookPath(name)
	if err != nil {
		return "", fmt.Errorf("the firecracker binary was not found (%v): install a Firecracker release with `smolvm setup --backend firecracker --firecracker-bin PATH`", err)
	}
	return p, nil
}

// helper is the path of the binary with the fc-launch and tap-relay
// subcommands.
func (d *Driver) helper() (string, error) {
	if d.opts.HelperPath != "" {
		if st, err := os.Stat(d.opts.HelperPath); err != nil || !st.Mode().IsRegular() {
			return "", fmt.Errorf("the firecracker backend's helper %s is not there", d.opts.HelperPath)
		}
		return d.opts.HelperPath, nil
	}
	var candidates []string
	if exe, err := os.Executable(); err == nil {
		candidates = append(candidates, filepath.Join(filepath.Dir(exe), "smolvm-jail"))
	}
	if p, err := exec.LookPath("smolvm-jail"); err == nil {
		candidates = append(candidates, p)
	}
	for _, p := range candidates {
		if st, err := os.Stat(p); err == nil && st.Mode().IsRegular() {
			return p, nil
		}
	}
	return "", errors.New("smolvm-jail was not found beside smolvm or on $PATH: the firecracker backend starts each VM through it (build it with scripts/setup.sh)")
}

// Available says what this host lacks to run Firecracker: root (for the
// namespaces), a /dev/kvm that makes VMs, the binary and the helper.
func (d *Driver) Available() error {
	var errs []error
	if os.Geteuid() != 0 {
		errs = append(errs, errors.New("the firecracker backend needs root: it runs each VM in mount and network namespaces of its own"))
	}
	if err := kvmUsable(); err != nil {
		errs = append(errs, err)
	}
	if _, err := d.binary(); err != nil {
		errs = append(errs, err)
	}
	if _, err := d.helper(); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// KVM ioctls (linux/kvm.h).
const (
	kvmGetAPIVersion = 0xae00
	kvmCreateVM      = 0xae01
)

// kvmUsable checks that /dev/kvm opens read-write and makes a VM, and
// that an x86 CPU has hardware virtualisation, which is all Firecracker
// has: it has no emulation to fall back on. Where KVM works without vmx
// or svm (a nested guest without them) it runs guests about 1000 times
// slower than emulation, which smolvm's doctor counts as no KVM too.
func kvmUsable() error {
	if goruntime.GOARCH == "amd64" {
		cpuinfo, _ := os.ReadFile("/proc/cpuinfo")
		if !cpuHasVirt(string(cpuinfo)) {
			return errors.New("/dev/kvm is not usable: the CPU lists neither vmx nor svm (a nested guest without hardware virtualisation)")
		}
	}
	f, err := os.OpenFile("/dev/kvm", os.O_RDWR|syscall.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("/dev/kvm is not usable: %w", err)
	}
	defer f.Close()
	if v, err := unix.IoctlRetInt(int(f.Fd()), kvmGetAPIVersion); err != nil || v != 12 {
		return fmt.Errorf("/dev/kvm is not usable: API version %d (%v)", v, err)
	}
	vm, err := unix.IoctlRetInt(int(f.Fd()), kvmCreateVM)
	if err != nil {
		return fmt.Errorf("/dev/kvm is not usable: it makes no VM (%w)", err)
	}
	unix.Close(vm)
	return nil
}

// cpuHasVirt reports whether a "flags" line of /proc/cpuinfo lists vmx
// (Intel VT-x) or svm (AMD-V).
func cpuHasVirt(cpuinfo string) bool {
	for _, line := range strings.Split(cpuinfo, "\n") {
		k, v, ok := strings.Cut(line, ":")
		if !ok || strings.TrimSpace(k) != "flags" {
			continue
		}
		for _, f := range strings.Fields(v) {
			if f == "vmx" || f == "svm" {
				return true
			}
		}
	}
	return false
}

// Identity is Firecracker's version, and the path every VM sees its
// directory at, which snapshots record.
func (d *Driver) Identity(ctx context.Context) (string, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.version == "" {
		// Not the caller's cancellation: a request that ended must not
		// decide the version for the server's life.
		v, err := d.readVersion(context.WithoutCancel(ctx))
		if err != nil {
			return "", err
		}
		d.version = v
	}
	return "firecracker " + d.version + "; root " + vmDir, nil
}

// readVersion is the version `firecracker --version` prints first
// ("Firecracker v1.7.0").
func (d *Driver) readVersion(ctx context.Context) (string, error) {
	bin, err := d.binary()
	if err != nil {
		return "", err
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, "--version")
	cmd.Env = d.env()
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("%s --version: %w", bin, err)
	}
	line, _, _ := strings.Cut(string(out), "\n")
	f := strings.Fields(line)
	if len(f) == 0 {
		return "", fmt.Errorf("%s --version printed nothing", bin)
	}
	return f[len(f)-1], nil
}

// The files of a machine in its directory; nothing outside this package
// names them.
const (
	fileDisk    = "rootfs.ext4"
	fileConsole = "console.log"     // Firecracker's stdout: the guest's serial console
	fileLog     = "firecracker.log" // stderr of fc-launch and Firecracker
	fileRelay   = "relay.log"       // the tap relay's output
	// dirRun is Firecracker's own directory, where its user makes its
	// sockets, log and metrics while it starts; locked after that
	// (lockRun), it writes snapshots there into files made for it.
	dirRun      = "run"
	fileAPI     = "fc.sock"
	fileVsock   = "vsock.sock"
	fileFCLog   = "fc.log"
	fileMetrics = "metrics.json"
	// A snapshot: the VM's state and its memory.
	fileState  = "vmstate"
	fileMemory = "memory"
)

// guestCID is the guest's vsock address; the host is 2.
const guestCID = 3

// driveID and ifaceID name the root disk and the NIC in the API (and so
// in snapshots).
const (
	driveID = "rootfs"
	ifaceID = "eth0"
)

// inVM is the path Firecracker sees a file of its sandbox directory at.
func inVM(name ...string) string { return filepath.Join(append([]string{vmDir}, name...)...) }

// marker names a directory's Firecracker (and its helpers) on their
// command lines: it is Firecracker's --id, which allows only letters,
// digits and dashes, so it is a hash of the directory rather than the
// directory itself. It guards against recycled pids and is how Reap finds
// a VM no record names.
func marker(dir string) string {
	sum := sha256.Sum256([]byte(dir))
	return "smolvm-fc-" + hex.EncodeToString(sum[:6])
}

// runRecord is a machine's runtime record.
type runRecord struct {
	PID       int    `json:"pid"`
	Dir       string `json:"dir"`
	APISocket string `json:"api_socket"`
	Vsock     string `json:"vsock"`
	Console   string `json:"console"`
	Disk      string `json:"disk"`
	Marker    string `json:"marker"`
	// Cgroup names the process's control group, if it has one.
	Cgroup string `json:"cgroup,omitempty"`
	// RelayPID is the tap relay's, if the VM has a network.
	RelayPID int `json:"relay_pid,omitempty"`
	// UID is the jail's user Firecracker runs as; 0 for root.
	UID int `json:"uid,omitempty"`
}

func paths(dir string) runRecord {
	run := filepath.Join(dir, dirRun)
	return runRecord{
		Dir:       dir,
		APISocket: filepath.Join(run, fileAPI),
		Vsock:     filepath.Join(run, fileVsock),
		Console:   filepath.Join(dir, fileConsole),
		Disk:      filepath.Join(dir, fileDisk),
		Marker:    marker(dir),
	}
}

// machine is one Firecracker process.
type machine struct {
	rt      runRecord
	cgroups *cgroup.Hierarchy
}

func (m *machine) Runtime() json.RawMessage {
	b, _ := json.Marshal(m.rt)
	return b
}
func (m *machine) PID() int           { return m.rt.PID }
func (m *machine) ConsoleLog() string { return m.rt.Console }
func (m *machine) Alive() bool        { return vmm.ProcessAlive(m.rt.PID, m.rt.Marker) }
func (m *machine) api() *client       { return newClient(m.rt.APISocket) }

// Kill ends Firecracker and its relay at once and waits until both are
// gone.
func (m *machine) Kill(ctx context.Context) error {
	err := vmm.KillProcess(ctx, m.rt.PID, m.rt.Marker)
	return m.ended(ctx, err)
}

// Wait waits for Firecracker to exit on its own: the guest rebooted
// (reboot=k makes a reboot, and so a panic, end the process).
func (m *machine) Wait(ctx context.Context) error {
	err := vmm.WaitGone(ctx, m.rt.PID, m.rt.Marker)
	return m.ended(ctx, err)
}

// relayGrace is how long the relay may take to notice its VM ended.
const relayGrace = 2 * time.Second

// ended cleans up after Firecracker has gone: the relay (which ends by
// itself when it sees the process go) and the control group.
func (m *machine) ended(ctx context.Context, err error) error {
	if err != nil {
		return err
	}
	if m.rt.RelayPID > 0 {
		gctx, cancel := context.WithTimeout(ctx, relayGrace)
		werr := vmm.WaitGone(gctx, m.rt.RelayPID, m.rt.Marker)
		cancel()
		if werr != nil {
			if err := vmm.KillProcess(ctx, m.rt.RelayPID, m.rt.Marker); err != nil {
				return err
			}
		}
	}
	return errors.Join(m.giveBack(), dropGroup(m.cgroups, m.rt.Cgroup))
}

// giveBack makes root the owner again of what the jail's user was given
// to run: its user may be handed to another VM next. The user could
// create nothing in these directories, so none of the names is its link.
func (m *machine) giveBack() error {
	if m.rt.UID == 0 {
		return nil
	}
	return jail.GiveBack(m.rt.Disk, filepath.Join(m.rt.Dir, dirRun), m.rt.Dir)
}

// dropGroup removes a control group once its processes have ended.
func dropGroup(h *cgroup.Hierarchy, name string) error {
	if h == nil || name == "" {
		return nil
	}
	vmm.DropGroup(*h, name)
	return nil
}

// DialAgent connects to the agent's vsock port through Firecracker's
// hybrid vsock socket, trying again while the guest boots.
func (m *machine) DialAgent(ctx context.Context) (net.Conn, error) {
	return dialVsock(ctx, m.rt.Vsock, wire.VsockPort)
}

func (d *Driver) Attach(raw json.RawMessage) (vmm.Machine, error) {
	var rt runRecord
	if err := json.Unmarshal(raw, &rt); err != nil {
		return nil, fmt.Errorf("firecracker runtime record: %w", err)
	}
	if rt.APISocket == "" || rt.Marker == "" || rt.Vsock == "" {
		return nil, errors.New("firecracker runtime record names no API socket, vsock or marker")
	}
	return &machine{rt: rt, cgroups: d.cgroups}, nil
}

// machineFiles are a machine's files in its directory, besides a
// snapshot's.
var machineFiles = []string{fileDisk, fileConsole, fileLog, fileRelay, dirRun}

// Clear removes a machine's files from dir.
func (d *Driver) Clear(dir string) error {
	var errs []error
	for _, f := range machineFiles {
		if err := os.RemoveAll(filepath.Join(dir, f)); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// Reap kills whatever runs for dir, found by its marker on the command
// line (fc-launch or Firecracker, and the relay), and removes its control
// group: a process that died right after starting them recorded nothing.
func (d *Driver) Reap(ctx context.Context, dir string) error {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return err
	}
	mk := marker(abs)
	var errs []error
	for _, pid := range vmm.ProcessesWith(mk) {
		group := ""
		if d.cgroups != nil {
			group = cgroup.Of(pid)
		}
		slog.Warn("ending a Firecracker VM whose start was cut short", "dir", abs, "pid", pid)
		if err := vmm.KillProcess(ctx, pid, mk); err != nil {
			errs = append(errs, err)
			continue
		}
		errs = append(errs, dropGroup(d.cgroups, group))
	}
	return errors.Join(errs...)
}

// maxSocketPath is sun_path's size less its terminating NUL.
const maxSocketPath = 107

// maxCmdline is the longest kernel command line an x86 kernel keeps.
const maxCmdline = 2047

// bootArgs are added to the kernel command line. reboot=k resets through
// the keyboard controller, which ends Firecracker (it does not reboot), so
// a panic (panic=-1 reboots at once) ends the process as QEMU's
// -no-reboot does; pci=off skips probing a bus Firecracker does not have.
// Firecracker has no ACPI power button on x86, so smolvm.poweroff=reset
// has the agent end the VM with a reset when asked to power off.
const bootArgs = "reboot=k pci=off smolvm.poweroff=reset"

// checkSpec refuses what Firecracker or the driver cannot do, before
// anything is made.
func (d *Driver) checkSpec(spec vmm.Spec) error {
	if os.Geteuid() != 0 {
		return errors.New("the firecracker backend needs root: it runs each VM in mount and network namespaces of its own")
	}
	if len(spec.Mounts) > 0 {
		return errors.New("the firecracker backend cannot share host directories with a guest")
	}
	if spec.Net != nil {
		if spec.Net.Kind != vmm.NetStream {
			return fmt.Errorf("the firecracker backend cannot attach a %q network", spec.Net.Kind)
		}
		if spec.Net.Socket == "" {
			return errors.New("network attachment names no socket")
		}
	}
	if !filepath.IsAbs(spec.Dir) {
		return fmt.Errorf("sandbox directory %q is not absolute", spec.Dir)
	}
	p := paths(spec.Dir)
	for _, s := range []string{p.APISocket, p.Vsock} {
		if len(s) > maxSocketPath {
			return fmt.Errorf("socket path %s is longer than %d bytes: use a shorter data directory (SMOLVM_DATA_DIR)", s, maxSocketPath)
		}
	}
	if len(spec.Cmdline)+1+len(bootArgs) > maxCmdline {
		return fmt.Errorf("kernel command line is %d bytes, more than the guest keeps (%d)", len(spec.Cmdline), maxCmdline)
	}
	if spec.VCPUs < 1 || spec.VCPUs > 32 {
		return fmt.Errorf("firecracker runs 1 to 32 vCPUs, not %d", spec.VCPUs)
	}
	if spec.MemoryMiB < 1 {
		return fmt.Errorf("memory of %d MiB", spec.MemoryMiB)
	}
	return nil
}

// Start makes the sandbox's disk if it has none yet and boots the VM.
func (d *Driver) Start(ctx context.Context, spec vmm.Spec) (vmm.Machine, error) {
	if err := d.checkSpec(spec); err != nil {
		return nil, err
	}
	t := time.Now()
	disk := filepath.Join(spec.Dir, fileDisk)
	made := false
	if _, err := os.Stat(disk); errors.Is(err, os.ErrNotExist) {
		if err := copyDisk(spec.BaseImage, disk, spec.DiskMiB); err != nil {
			return nil, err
		}
		made = true
		t = vmm.Step(ctx, "disk copy", t)
	}
	defer vmm.Step(ctx, "firecracker start", t)
	inputs := []string{spec.Kernel}
	if spec.Initrd != "" {
		inputs = append(inputs, spec.Initrd)
	}
	m, err := d.launch(ctx, spec, inputs, func(ctx context.Context, c *client) error {
		return configure(ctx, c, spec)
	})
	if err != nil && made {
		os.Remove(disk)
	}
	return m, err
}

// request is a PUT of body to path.
type request struct {
	path string
	body any
}

// configure sets a new VM up and starts it.
func configure(ctx context.Context, c *client, spec vmm.Spec) error {
	boot := bootSource{KernelImagePath: fdPath(fdKernel), BootArgs: spec.Cmdline + " " + bootArgs}
	if spec.Initrd != "" {
		boot.InitrdPath = fdPath(fdInitrd)
	}
	steps := []request{
		{"/boot-source", boot},
		{"/drives/" + driveID, drive{DriveID: driveID, PathOnHost: inVM(fileDisk), IsRootDevice: true}},
		{"/machine-config", machineConfig{VCPUCount: spec.VCPUs, MemSizeMiB: spec.MemoryMiB}},
		{"/vsock", vsockConfig{GuestCID: guestCID, UDSPath: inVM(dirRun, fileVsock)}},
	}
	if spec.Net != nil {
		steps = append(steps, request{"/network-interfaces/" + ifaceID, networkInterface{IfaceID: ifaceID, HostDevName: tapName, GuestMAC: spec.Net.MAC}})
	}
	for _, s := range steps {
		if err := c.put(ctx, s.path, s.body); err != nil {
			return err
		}
	}
	return c.put(ctx, "/actions", action{ActionType: "InstanceStart"})
}

// The descriptors fc-launch is handed. It waits on the gate until the
// driver has put it in its control group, and closes it; Firecracker
// inherits the others. Files are given to Firecracker as /proc/self/fd/N:
// it may not reach them by their paths as the jail's user, and a snapshot
// records none of them.
const (
	fdGate   = 3
	fdBinary = 4
	fdKernel = 5 // or a snapshot's state
	fdInitrd = 6 // or a snapshot's memory
	fdState  = fdKernel
	fdMemory = fdInitrd
)

func fdPath(fd int) string { return "/proc/self/fd/" + strconv.Itoa(fd) }

// apiTimeout bounds the wait for a new Firecracker's API socket.
const apiTimeout = 10 * time.Second

// vmmAllowanceMiB is what a Firecracker may hold besides its guest's
// memory: its own heap, threads and device buffers, a few tens of MiB,
// and the page cache its files bring in.
const vmmAllowanceMiB = 128

// vmmTasks bounds a Firecracker's threads besides one per vCPU: its API
// and VMM threads, and the relay beside it (a Go program, whose threads
// grow with the host's CPUs).
const vmmTasks = 64

// limits are what spec's VMM may use. Firecracker holds less than QEMU
// (no TCG code buffer), so its allowance is its own.
func limits(spec vmm.Spec) cgroup.Limits {
	mem := spec.MemoryLimitMiB
	if mem == 0 {
		mem = spec.MemoryMiB + vmmAllowanceMiB
	}
	return cgroup.Limits{MemoryBytes: int64(mem) << 20, Tasks: int64(vmmTasks + spec.VCPUs), CPUWeight: 100 * max(1, spec.VCPUs)}
}

// launch starts fc-launch, and so Firecracker, for spec, handing it
// inputs (the kernel and initramfs, or a snapshot's state and memory) as
// descriptors 5 and 6, waits for its API, starts the relay if spec has a
// network, and runs setup (the configuration, or the snapshot load). On
// any failure nothing is left running, and nothing of what it made but
// the directory.
func (d *Driver) launch(ctx context.Context, spec vmm.Spec, inputs []string, setup func(context.Context, *client) error) (_ *machine, err error) {
	bin, err := d.binary()
	if err != nil {
		return nil, err
	}
	helper, err := d.helper()
	if err != nil {
		return nil, err
	}
	rt := paths(spec.Dir)
	var files []*os.File
	defer func() {
		for _, f := range files {
			f.Close()
		}
	}()
	for _, p := range append([]string{bin}, inputs...) {
		f, err := os.Open(p)
		if err != nil {
			return nil, fmt.Errorf("start firecracker: %w", err)
		}
		files = append(files, f)
	}

	// What this launch makes, removed again if it fails.
	run := filepath.Join(spec.Dir, dirRun)
	made := []string{run, rt.Console, filepath.Join(spec.Dir, fileLog), filepath.Join(spec.Dir, fileRelay)}
	defer func() {
		if err != nil {
			for _, f := range made {
				os.RemoveAll(f)
			}
		}
	}()
	if err := os.RemoveAll(run); err != nil {
		return nil, fmt.Errorf("remove stale %s: %w", run, err)
	}
	if err := os.Mkdir(run, 0o700); err != nil {
		return nil, fmt.Errorf("start firecracker: %w", err)
	}

	uid := 0
	if d.jail != nil {
		u, release, aerr := d.jail.Allocate()
		if aerr != nil {
			return nil, aerr
		}
		defer release()
		uid = u
		// On any failure from here, what the user was given is root's
		// again (a disk that was there stays, and is the sandbox's).
		defer func() {
			if err != nil {
				given := rt
				given.UID = uid
				err = errors.Join(err, (&machine{rt: given}).giveBack())
			}
		}()
		if err = enterable(spec.Dir, run, rt.Disk, uid); err != nil {
			return nil, err
		}
	}

	console, err := os.OpenFile(rt.Console, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return nil, fmt.Errorf("start firecracker: %w", err)
	}
	defer console.Close()
	logf, err := os.OpenFile(filepath.Join(spec.Dir, fileLog), os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return nil, fmt.Errorf("start firecracker: %w", err)
	}
	defer logf.Close()

	var group *cgroup.Group
	if d.cgroups != nil && d.jail != nil {
		// Groups are swept once they are a minute old, so sweeping more
		// often than that finds nothing new.
		if now := time.Now().UnixNano(); now-d.swept.Load() > int64(time.Minute) {
			d.swept.Store(now)
			if err := cgroup.Sweep(*d.cgroups, time.Minute, ""); err != nil {
				slog.Warn("remove the control groups of ended VMs", "err", err)
			}
		}
		g, err := cgroup.New(*d.cgroups, vmm.GroupName(spec), limits(spec))
		if err != nil {
			return nil, fmt.Errorf("start firecracker: %w", err)
		}
		group = &g
		rt.Cgroup = vmm.GroupName(spec)
		defer func() {
			if err != nil {
				if rerr := dropGroup(d.cgroups, rt.Cgroup); rerr != nil {
					err = errors.Join(err, rerr)
				}
			}
		}()
	}

	gate, gateOpen, err := os.Pipe()
	if err != nil {
		return nil, fmt.Errorf("start firecracker: %w", err)
	}
	defer gate.Close()
	defer gateOpen.Close()
	args := []string{LaunchCommand, "--dir=" + spec.Dir, "--id=" + rt.Marker,
		"--gate-fd=" + strconv.Itoa(fdGate), "--exec-fd=" + strconv.Itoa(fdBinary)}
	if uid != 0 {
		args = append(args, "--uid="+strconv.Itoa(uid))
	}
	if spec.Net != nil {
		args = append(args, "--tap="+tapName)
	}
	if dynamic(files[0]) {
		args = append(args, "--host-libs")
	}
	args = append(args, "--", "firecracker", "--api-sock", inVM(dirRun, fileAPI), "--id", rt.Marker)
	cmd := exec.Command(helper, args...)
	cmd.Dir = "/"
	cmd.Env = d.env()
	cmd.Stdout, cmd.Stderr = console, logf
	cmd.ExtraFiles = append([]*os.File{gate}, files...) // fds 3 (the gate), 4 (the binary), 5, 6
	// A session of its own, so it outlives the caller; namespaces of its
	// own, which fc-launch sets up. The network namespace is new even
	// without a network: Firecracker never needs the host's, and a NIC
	// in a snapshot finds no device of the host's name there.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Cloneflags: syscall.CLONE_NEWNS | syscall.CLONE_NEWNET}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start firecracker through %s: %w", helper, err)
	}
	rt.PID, rt.UID = cmd.Process.Pid, uid
	m := &machine{rt: rt, cgroups: d.cgroups}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }() // reaps it while the caller lives
	defer func() {
		if err != nil {
			err = withLog(err, spec.Dir)
			if kerr := m.Kill(context.WithoutCancel(ctx)); kerr != nil {
				err = errors.Join(err, kerr)
			}
		}
	}()
	gate.Close()
	if group != nil {
		if err := group.Add(rt.PID); err != nil {
			return nil, fmt.Errorf("start firecracker: %w", err)
		}
	}
	// Only now may fc-launch go on: nothing of Firecracker runs outside
	// its group.
	_, err = gateOpen.Write([]byte{1})
	gateOpen.Close()
	if err != nil {
		return nil, fmt.Errorf("start firecracker: open the gate: %w", err)
	}
	c := m.api()
	if err := waitAPI(ctx, c, exited); err != nil {
		return nil, err
	}
	if spec.Net != nil {
		pid, err := d.startRelay(ctx, helper, spec, rt, uid)
		if err != nil {
			return nil, err
		}
		m.rt.RelayPID = pid
		if group != nil {
			if err := group.Add(pid); err != nil {
				return nil, fmt.Errorf("start the tap relay: %w", err)
			}
		}
	}
	logs := []request{
		{"/logger", logger{LogPath: inVM(dirRun, fileFCLog), Level: "Warning", ShowLevel: true}},
		{"/metrics", metrics{MetricsPath: inVM(dirRun, fileMetrics)}},
	}
	for _, l := range logs {
		if err := c.put(ctx, l.path, l.body); err != nil {
			return nil, err
		}
	}
	if err := setup(ctx, c); err != nil {
		return nil, err
	}
	if uid != 0 {
		// Its sockets are made: from now on the jail's user, which the
		// guest may come to control, may not replace them (or plant a
		// link the host would follow). It writes only into files made
		// for it (snapshots: createFor).
		if err := lockRun(run, uid); err != nil {
			return nil, err
		}
	}
	// A Firecracker whose guest could not start exits: it must still be
	// there.
	select {
	case err := <-exited:
		return nil, fmt.Errorf("firecracker exited as the VM started (%v)", err)
	default:
	}
	slog.Debug("firecracker started", "dir", spec.Dir, "pid", rt.PID, "uid", uid)
	return m, nil
}

// dynamic reports whether the executable bin names an ELF interpreter:
// Firecracker's releases are linked statically and need nothing of the
// host's in their root; a build that is not gets the host's libraries.
func dynamic(bin *os.File) bool {
	f, err := elf.NewFile(bin)
	if err != nil {
		return false
	}
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return true
		}
	}
	return false
}

// enterable lets the jail's user into dir (group uid, mode 0710: it may
// open what it has a name for and list nothing), gives it run (its own)
// and the disk, which it opens read-write.
func enterable(dir, run, disk string, uid int) error {
	if err := os.Chown(dir, 0, uid); err != nil {
		return fmt.Errorf("jail: %w", err)
	}
	if err := os.Chmod(dir, 0o710); err != nil {
		return fmt.Errorf("jail: %w", err)
	}
	for _, p := range []string{run, disk} {
		if err := os.Chown(p, uid, uid); err != nil {
			return fmt.Errorf("jail: give %s to the jail's user: %w", p, err)
		}
	}
	return nil
}

// lockRun makes run, Firecracker's directory, root's again: the jail's
// user keeps its way in (group, 0710) but can no longer add, remove or
// rename anything in it.
func lockRun(run string, uid int) error {
	if err := os.Chown(run, 0, uid); err != nil {
		return fmt.Errorf("jail: %w", err)
	}
	if err := os.Chmod(run, 0o710); err != nil {
		return fmt.Errorf("jail: %w", err)
	}
	return nil
}

// createFor makes an empty file at p for the machine's Firecracker to
// write (a snapshot), in its directory it may no longer create files in.
func (m *machine) createFor(p string) error {
	if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	f, err := os.OpenFile(p, os.O_WRONLY|os.O_CREATE|os.O_EXCL|syscall.O_NOFOLLOW, 0o600)
	if err != nil {
		return err
	}
	defer f.Close()
	return f.Chown(m.rt.UID, m.rt.UID)
}

// openOwn opens a file the jail's user may have had a hand in without
// following a link, and only if it is a regular file.
func openOwn(p string) (*os.File, error) {
	f, err := os.OpenFile(p, os.O_RDONLY|syscall.O_NOFOLLOW|syscall.O_NONBLOCK, 0)
	if err != nil {
		return nil, err
	}
	if st, err := f.Stat(); err != nil || !st.Mode().IsRegular() {
		f.Close()
		return nil, fmt.Errorf("%s is not a regular file", p)
	}
	return f, nil
}

// waitAPI waits until Firecracker answers on its API socket.
func waitAPI(ctx context.Context, c *client, exited <-chan error) error {
	ctx, cancel := context.WithTimeout(ctx, apiTimeout)
	defer cancel()
	for {
		actx, acancel := context.WithTimeout(ctx, time.Second)
		_, err := c.info(actx)
		acancel()
		if err == nil {
			return nil
		}
		select {
		case err := <-exited:
			return fmt.Errorf("firecracker exited during start-up (%v)", err)
		case <-ctx.Done():
			return fmt.Errorf("firecracker did not answer on %s: %w", c.socket, ctx.Err())
		case <-time.After(5 * time.Millisecond):
		}
	}
}

// startRelay starts the tap relay for the VM whose Firecracker is rt.PID
// and returns once it is set up.
func (d *Driver) startRelay(ctx context.Context, helper string, spec vmm.Spec, rt runRecord, uid int) (int, error) {
	logf, err := os.OpenFile(filepath.Join(spec.Dir, fileRelay), os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return 0, fmt.Errorf("start the tap relay: %w", err)
	}
	defer logf.Close()
	pr, pw, err := os.Pipe()
	if err != nil {
		return 0, err
	}
	defer pr.Close()
	args := []string{RelayCommand,
		"--netns=/proc/" + strconv.Itoa(rt.PID) + "/ns/net",
		"--tap=" + tapName,
		"--socket=" + spec.Net.Socket,
		"--pid=" + strconv.Itoa(rt.PID),
		"--ready-fd=3",
		"--tag=" + rt.Marker,
	}
	if uid != 0 {
		args = append(args, "--uid="+strconv.Itoa(uid))
	}
	cmd := exec.Command(helper, args...)
	cmd.Dir = "/"
	cmd.Env = d.env()
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.ExtraFiles = []*os.File{pw}
	// Like the VM, it outlives the caller.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	err = cmd.Start()
	pw.Close()
	if err != nil {
		return 0, fmt.Errorf("start the tap relay: %w", err)
	}
	pid := cmd.Process.Pid
	go cmd.Wait()
	ready := make(chan error, 1)
	go func() {
		b := make([]byte, 16)
		n, err := pr.Read(b)
		if err == nil && string(b[:n]) != "ready\n" {
			err = fmt.Errorf("said %q", b[:n])
		}
		ready <- err
	}()
	timer := time.NewTimer(relayReadyTimeout)
	defer timer.Stop()
	select {
	case err = <-ready:
	case <-timer.C:
		err = errors.New("it did not say ready in time")
	case <-ctx.Done():
		err = ctx.Err()
	}
	if err != nil {
		kerr := vmm.KillProcess(context.WithoutCancel(ctx), pid, rt.Marker)
		b, _ := os.ReadFile(filepath.Join(spec.Dir, fileRelay))
		return 0, errors.Join(fmt.Errorf("start the tap relay: %v: %s", err, tail(b)), kerr)
	}
	return pid, nil
}

// withLog adds the end of what fc-launch and Firecracker printed, which
// says why one exited.
func withLog(err error, dir string) error {
	var said []string
	for _, p := range []string{filepath.Join(dir, fileLog), filepath.Join(dir, dirRun, fileFCLog)} {
		f, rerr := openOwn(p)
		if rerr != nil {
			continue
		}
		b, _ := io.ReadAll(io.LimitReader(f, 1<<20))
		f.Close()
		if len(bytes.TrimSpace(b)) > 0 {
			said = append(said, tail(b))
		}
	}
	if len(said) == 0 {
		return err
	}
	return fmt.Errorf("%w (firecracker said: %s)", err, strings.Join(said, "; "))
}

// tail is the last 2 KiB of b, trimmed.
func tail(b []byte) string {
	if len(b) > 2048 {
		b = b[len(b)-2048:]
	}
	return string(bytes.TrimSpace(b))
}

var (
	_ vmm.Driver       = (*Driver)(nil)
	_ vmm.Snapshotter  = (*Driver)(nil)
	_ vmm.Pauser       = (*Driver)(nil)
	_ vmm.DiskResizer  = (*Driver)(nil)
	_ vmm.Checkpointer = (*Driver)(nil)
)

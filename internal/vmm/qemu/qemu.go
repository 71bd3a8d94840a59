// Package qemu runs sandboxes under QEMU: q35 with direct PVH boot of an
// uncompressed vmlinux, a qcow2 overlay per sandbox, and the agent on a
// virtio-serial port.
package qemu

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
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

const (
	qemuBinary = "qemu-system-x86_64"
	imgBinary  = "qemu-img"
	// qboot is a minimal firmware that skips SeaBIOS's device probing,
	// saving about half a second per boot; SeaBIOS remains the fallback.
	qbootROM = "/usr/share/qemu/qboot.rom"
	// maxSocketPath is sun_path's size less its terminating NUL.
	maxSocketPath = 107
)

// Options configure the driver.
type Options struct {
	// Accel is "kvm" or "tcg"; "" means tcg.
	Accel string
	// NoJail runs QEMU as the calling user, without a chroot. The jail
	// needs root; without it QEMU keeps only its seccomp filter.
	NoJail bool
	// HelperPath is the binary with the qemu-launch subcommand
	// (smolvm-jail), through which a jailed QEMU starts (launch.go).
	// Without it a jailed QEMU starts as root and drops root itself
	// (-runas, -chroot).
	HelperPath string
	// Users hands out the jail's users. The drivers of one server share
	// one, so that VMs of two backends starting at once never get the
	// same user; nil makes the driver its own.
	Users *jail.Users
}

// Driver is the QEMU backend.
type Driver struct {
	accel string
	jail  *jail.Users // nil: not jailed
	// helper is the binary whose qemu-launch starts a jailed QEMU.
	helper string
	// cgroups is where each VMM gets a control group; nil without root
	// or without a usable hierarchy (cgroupErr says why).
	cgroups   *cgroup.Hierarchy
	cgroupErr error
	swept     atomic.Int64 // when the groups were last swept, unix ns

	// rams makes the sealed copies of template RAM its clones map.
	rams sealedRAMs

	versionOnce sync.Once
	version     string
	versionErr  error
}

// New returns the QEMU driver.
func New(o Options) *Driver {
	accel := o.Accel
	if accel == "" {
		accel = "tcg"
	}
	d := &Driver{accel: accel, helper: o.HelperPath}
	if !o.NoJail && os.Geteuid() == 0 {
		d.jail = o.Users
		if d.jail == nil {
			d.jail = jail.NewUsers(jail.VMMBase, jail.PerRange)
		}
		if h, err := cgroup.Detect(cgroup.Root); err == nil {
			d.cgroups = &h
		} else {
			d.cgroupErr = err
		}
	}
	return d
}

func (d *Driver) Name() string { return "qemu" }

// Accel is the accelerator the driver runs guests with.
func (d *Driver) Accel() string { return d.accel }

func (d *Driver) Available() error {
	for _, bin := range []string{qemuBinary, imgBinary} {
		if _, err := exec.LookPath(bin); err != nil {
			pkg := "qemu-system-x86"
			if bin == imgBinary {
				pkg = "qemu-utils"
			}
			return fmt.Errorf("%s not found: install it with `apt-get install %s` or run `smolvm setup`", bin, pkg)
		}
	}
	return nil
}

// Identity is QEMU's version and the accelerator: a state saved by one
// QEMU may not load in another, nor under another accelerator.
func (d *Driver) Identity(ctx context.Context) (string, error) {
	d.versionOnce.Do(func() { d.version, d.versionErr = version(ctx) })
	if d.versionErr != nil {
		return "", d.versionErr
	}
	id := d.version + "; accel " + d.accel
	if d.accel != "kvm" {
		// Emulated guests boot with fixed address layouts (cmdline) on a
		// CPU without ERMS, and their devices are notified in the vCPU
		// thread (virtioOpts).
		id += "; cpu " + emulatedCPU + "; " + emulatedCmdline + "; virtio" + virtioOpts(d.accel)
	}
	return id, nil
}

// The files of a machine in its directory. They are this driver's alone:
// nothing outside vmm/qemu names them.
const (
	fileDisk    = "disk.qcow2"
	fileAgent   = "agent.sock"
	fileQMP     = "qmp.sock"
	filePID     = "qemu.pid"
	fileLog     = "qemu.log"
	fileConsole = "console.log"
	fileState   = "state"
	// fileMemory is a template's RAM, a file the template VM maps shared
	// and every clone maps private, so clones share the pages none of
	// them has written through the host's page cache.
	fileMemory = "memory"
)

func paths(dir string) runtime {
	return runtime{
		AgentSocket: filepath.Join(dir, fileAgent),
		QMPSocket:   filepath.Join(dir, fileQMP),
		Console:     filepath.Join(dir, fileConsole),
		Disk:        filepath.Join(dir, fileDisk),
	}
}

// runtime is a machine's runtime record. Its JSON is what earlier
// versions stored, so a newer smolvm finds their VMs again.
type runtime struct {
	PID         int    `json:"pid"`
	AgentSocket string `json:"agent_socket"`
	QMPSocket   string `json:"qmp_socket,omitempty"`
	Console     string `json:"console,omitempty"`
	Disk        string `json:"disk"`
	// MemoryFile is the file the guest's RAM is mapped from, if any.
	MemoryFile string `json:"memory_file,omitempty"`
	// Cgroup names the process's control group, if it has one.
	Cgroup string `json:"cgroup,omitempty"`
	// UID is the user QEMU runs as when jailed (its own, or a share's
	// owner), who was given the disk and console; 0 for none.
	UID int `json:"uid,omitempty"`
}

// machine is one QEMU process.
type machine struct {
	rt      runtime
	cgroups *cgroup.Hierarchy
}

// dropGroup removes the process's control group once it has ended.
func (m *machine) dropGroup(err error) error {
	if err != nil || m.rt.Cgroup == "" || m.cgroups == nil {
		return err
	}
	vmm.DropGroup(*m.cgroups, m.rt.Cgroup)
	return nil
}

func (m *machine) Runtime() json.RawMessage {
	b, _ := json.Marshal(m.rt)
	return b
}
func (m *machine) PID() int           { return m.rt.PID }
func (m *machine) ConsoleLog() string { return m.rt.Console }

// marker identifies a sandbox's QEMU process on its command line, which
// guards against a recycled pid: its console file, named there however
// QEMU was started (a launched QEMU is handed its sockets, not their
// names).
func (m *machine) marker() string { return consoleMarker(m.rt) }

func consoleMarker(rt runtime) string {
	if rt.Console == "" {
		return rt.AgentSocket // records from before the console was kept
	}
	return "file:" + rt.Console
}

func (m *machine) Alive() bool { return vmm.ProcessAlive(m.rt.PID, m.marker()) }

func (m *machine) Kill(ctx context.Context) error {
	return m.ended(vmm.KillProcess(ctx, m.rt.PID, m.marker()))
}

func (m *machine) Wait(ctx context.Context) error {
	return m.ended(vmm.WaitGone(ctx, m.rt.PID, m.marker()))
}

// ended cleans up after QEMU has gone: what its user was given becomes
// root's again (the user may go to another VM), and its group goes.
func (m *machine) ended(err error) error {
	if err != nil {
		return err
	}
	return errors.Join(giveBack(m.rt), m.dropGroup(nil))
}

// giveBack makes root the owner again of the directory, disk and console
// that rt's jail user was given. That user could create no name in the
// directory, so none of them is its link.
func giveBack(rt runtime) error {
	if rt.UID == 0 {
		return nil
	}
	return jail.GiveBack(rt.Disk, rt.Console, filepath.Dir(rt.Disk))
}

// DialAgent connects to the virtio-serial port's chardev socket.
func (m *machine) DialAgent(ctx context.Context) (net.Conn, error) {
	var d net.Dialer
	return d.DialContext(ctx, "unix", m.rt.AgentSocket)
}

func (d *Driver) Attach(raw json.RawMessage) (vmm.Machine, error) {
	var rt runtime
	if err := json.Unmarshal(raw, &rt); err != nil {
		return nil, fmt.Errorf("qemu runtime record: %w", err)
	}
	if rt.AgentSocket == "" {
		return nil, fmt.Errorf("qemu runtime record names no agent socket")
	}
	return &machine{rt: rt, cgroups: d.cgroups}, nil
}

// Clear removes a machine's files from dir.
func (d *Driver) Clear(dir string) error {
	var errs []error
	for _, f := range []string{fileDisk, fileAgent, fileQMP, filePID, fileConsole, fileLog} {
		if err := os.Remove(filepath.Join(dir, f)); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// Reap kills any QEMU whose command line names dir's console, and
// removes its control group. The command line, not a pid file, finds it:
// a process that died right after starting QEMU wrote nothing, and QEMU
// writes its own pid file only once it has parsed its options.
func (d *Driver) Reap(ctx context.Context, dir string) error {
	var errs []error
	for _, pid := range vmm.ProcessesWith(consoleMarker(paths(dir))) {
		m := &machine{rt: paths(dir), cgroups: d.cgroups}
		m.rt.PID = pid
		if d.cgroups != nil {
			m.rt.Cgroup = cgroup.Of(pid)
		}
		slog.Warn("ending a VM whose start was cut short", "dir", dir, "pid", pid)
		errs = append(errs, m.Kill(ctx))
	}
	return errors.Join(errs...)
}

// createDisk makes a qcow2 overlay at disk over base, of sizeMiB (0: the
// base's size).
func createDisk(ctx context.Context, base, disk string, sizeMiB int) error {
	base, err := filepath.Abs(base)
	if err != nil {
		return err
	}
	format := "raw"
	if strings.HasSuffix(base, ".qcow2") {
		format = "qcow2" // a template's frozen disk
	}
	args := []string{"create", "-q", "-f", "qcow2", "-F", format, "-b", base, disk}
	if sizeMiB > 0 {
		args = append(args, strconv.Itoa(sizeMiB)+"M")
	}
	out, err := exec.CommandContext(ctx, imgBinary, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("create disk overlay: %v: %s", err, bytes.TrimSpace(out))
	}
	return nil
}

// machineArgs is the VM itself: machine, accelerator, CPU, memory, firmware
// and kernel. Args and ProbeArgs share it so the baseline boots exactly the
// VM that sandboxes do.
func machineArgs(spec vmm.Spec, accel string, mem memory) []string {
	args := []string{
		"-nodefaults", "-no-user-config", "-display", "none",
		"-m", strconv.Itoa(spec.MemoryMiB),
		"-smp", strconv.Itoa(spec.VCPUs),
	}
	// Every machine's RAM is the backend object ram0, whatever backs it. A
	// saved state names its RAM by that object, so a state saved from a
	// template's clone (RAM mapped from a file) loads into anonymous RAM,
	// as a checkpoint's restore has, and the other way round.
	ram := fmt.Sprintf("memory-backend-ram,id=%s,size=%dM", ramObject, spec.MemoryMiB)
	if mem.file != "" {
		share := "off"
		if mem.shared {
			share = "on"
		}
		ram = fmt.Sprintf("memory-backend-file,id=%s,size=%dM,mem-path=%s,share=%s", ramObject, spec.MemoryMiB, optValue(mem.path()), share)
	}
	args = append(args, "-object", ram)
	machine := "q35,memory-backend=" + ramObject
	if accel == "kvm" {
		args = append(args, "-machine", machine, "-accel", "kvm", "-cpu", "host")
	} else {
		// TCG keeps the code it translated in a buffer that grows to 1 GiB
		// by default before it is flushed: every guest process used to add
		// megabytes (see emulatedCmdline), so a busy sandbox's VMM grew to
		// twice its guest. A boot needs far less; 64 MiB bounds it.
		tcg := "tcg,tb-size=" + strconv.Itoa(tcgBufferMiB)
		if spec.VCPUs > 1 {
			tcg += ",thread=multi"
		}
		args = append(args, "-machine", machine, "-accel", tcg, "-cpu", emulatedCPU)
	}
	// vmgenid would be wanted for clones, but qboot hangs with it.
	if _, err := os.Stat(qbootROM); err == nil {
		args = append(args, "-bios", qbootROM)
	}
	// A restore needs no kernel, but -kernel adds the PVH option ROM as a
	// RAM block, and a clone must have every block its template had.
	cmdline := spec.Cmdline
	if accel != "kvm" {
		cmdline += " " + emulatedCmdline
	}
	return append(args,
		"-kernel", spec.Kernel,
		"-initrd", spec.Initrd,
		"-append", cmdline,
		// A guest that powers off or panics ends the process, so a dead
		// guest is never mistaken for a running one.
		"-no-reboot",
	)
}

// tcgBufferMiB is the size of TCG's translated-code buffer.
const tcgBufferMiB = 64

// emulatedCmdline is added to the kernel command line of emulated guests.
// TCG finds the code it has translated by guest virtual address as well
// as physical: with address space layout randomisation every new process
// maps the same shell and C library at new addresses and has all of it
// translated again, which made a login shell's `true` cost three times
// what it does with fixed layouts, and filled the code buffer with
// megabytes per command. Inside a disposable sandbox that runs untrusted
// code as root anyway, ASLR protects little; a guest can turn it back on
// (sysctl kernel.randomize_va_space=2). KVM runs guest code natively and
// keeps it.
//
// The kernel's defences against speculative execution (retpolines, return
// stack filling, barriers) go too: an emulated CPU executes nothing
// speculatively, and what TCG makes of those sequences protects nothing on
// the host's CPU either. They only cost: fork and exec of `true` took
// about a tenth longer with them, a login shell about an eighth (a loop of
// each in the guest, clones of two templates side by side). KVM guests
// keep them.
//
// And the TSC is taken as reliable: TCG derives it from QEMU's own clock,
// so the kernel's watchdog, which reads the emulated HPET against it
// every half second (and logs that the read was too slow to judge), only
// costs.
const emulatedCmdline = "norandmaps mitigations=off tsc=reliable"

// emulatedCPU is the CPU an emulated guest sees: every feature TCG
// emulates ("max") but ERMS. With ERMS the guest kernel copies and clears
// memory with rep movsb and rep stosb (to and from user space, through
// pipes and the page cache, every page it zeroes), and the C library
// copies and sets large buffers with them too; TCG runs such an
// instruction one byte per pass through its translated loop. Without it
// the kernel uses rep movsq and rep stosq, eight bytes a pass, and the C
// library its vector loops: a pipe in the guest carried 128 MiB in 0.43 s
// instead of 1.6, and 100 MiB of a command's stdout reached the host in
// 2.5 s instead of 5.3. ERMS only says the byte-wise string instructions
// are fast, so no program needs it; AVX and the rest stay, as programs
// may. KVM guests see the host's CPU.
const emulatedCPU = "max,-erms"

// virtioOpts are the options of an emulated machine's virtio devices.
// With an ioeventfd, a guest's notification of new buffers is a write to
// an eventfd that wakes QEMU's main loop, which then takes the big QEMU
// lock from the vCPU thread and does the work; under KVM that spares the
// vCPU a trip to user space, but under TCG the vCPU thread is already in
// QEMU and can do the work at once. Without them, a command's messages
// to and from the agent take a dozen fewer hand-offs between threads.
func virtioOpts(accel string) string {
	if accel == "kvm" {
		return ""
	}
	return ",ioeventfd=off"
}

// ramObject is the id of every machine's memory backend (machineArgs).
const ramObject = "ram0"

// memory is how a machine's RAM is laid out.
type memory struct {
	file   string // "" for anonymous memory
	shared bool   // map file shared (a template) or private (a clone)
	// sealed, for a clone, is the sealed copy of file it maps instead
	// (ram.go), handed down as descriptor ramFD; sealedName names it.
	sealed     *os.File
	sealedName string
}

// path is what QEMU opens for the RAM.
func (m memory) path() string {
	if m.sealed != nil {
		return "/proc/self/fd/" + strconv.Itoa(ramFD)
	}
	return m.file
}

// Descriptors a launched QEMU is handed (ramFD, 3, is the first): its
// two sockets, made and listening, and the launcher's gate.
const (
	agentFD = 4
	qmpFD   = 5
	gateFD  = 6
)

// args builds the QEMU command line for a sandbox. A launched QEMU
// (launch.go) is handed its sockets rather than naming them, writes no
// pid file, and refuses the set*id calls too.
// args is spec's QEMU command line. launched: QEMU starts through the
// jail's launcher; dropsRoot: QEMU drops root itself (-runas).
func (d *Driver) args(spec vmm.Spec, mem memory, launched, dropsRoot bool) []string {
	p := paths(spec.Dir)
	args := append([]string{"-name", spec.ID + ",process=smolvm-" + spec.ID}, machineArgs(spec, d.accel, mem)...)
	if n := spec.Net; n != nil {
		// The other end is smolvm's own network stack, not QEMU's slirp,
		// which could not keep the guest from the host's loopback. No
		// option ROM: nothing boots from the network.
		args = append(args,
			"-netdev", "stream,id=net0,server=off,addr.type=unix,addr.path="+n.Socket,
			"-device", "virtio-net-pci,netdev=net0,romfile=,mac="+n.MAC+virtioOpts(d.accel))
	}
	args = append(args,
		// Relative to the sandbox directory, QEMU's working directory and,
		// in the jail, its root: QEMU opens the disk again by name when a
		// migration gives it up (read-only) and when cont takes it back.
		"-drive", "file="+fileDisk+",if=none,id=root,format=qcow2,discard=unmap",
		"-device", "virtio-blk-pci,drive=root"+virtioOpts(d.accel),
		"-device", "virtio-serial-pci,id=vser"+virtioOpts(d.accel),
	)
	if launched {
		args = append(args, "-chardev", "socket,id=agent,fd="+strconv.Itoa(agentFD)+",server=on,wait=off")
	} else {
		args = append(args, "-chardev", "socket,id=agent,path="+p.AgentSocket+",server=on,wait=off")
	}
	args = append(args, "-device", "virtserialport,bus=vser.0,chardev=agent,name="+wire.PortName)
	// After the other devices, so a machine without shares has the same
	// PCI layout as before there were any.
	args = append(args, mountArgs(spec.Mounts)...)
	if launched {
		return append(args,
			"-chardev", "socket,id=qmp,fd="+strconv.Itoa(qmpFD)+",server=on,wait=off",
			"-mon", "chardev=qmp,mode=control",
			"-serial", "file:"+p.Console,
			"-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
		)
	}
	// The seccomp filter: no obsolete system calls, no processes (the
	// state of a save or restore comes through a passed descriptor), no
	// scheduling or affinity changes, and no set*id calls. Those are
	// allowed only to a QEMU that drops root itself: QEMU 7.2 installs
	// the filter before -runas's setuid, and then has only no_new_privs,
	// and no privileges left to raise.
	filter := "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
	if dropsRoot {
		filter = "on,obsolete=deny,spawn=deny,resourcecontrol=deny"
	}
	return append(args,
		"-qmp", "unix:"+p.QMPSocket+",server=on,wait=off",
		"-serial", "file:"+p.Console,
		"-pidfile", filepath.Join(spec.Dir, filePID),
		"-sandbox", filter,
	)
}

// mountArgs shares each host directory over virtio-9p. security_model=none
// has files keep the host's owners and modes, as QEMU's user can set
// them, which suits a sandbox working on a user's own directory.
func mountArgs(mounts []vmm.Mount) []string {
	var args []string
	for i, m := range mounts {
		id := "fs" + strconv.Itoa(i)
		fsdev := "local,id=" + id + ",path=" + optValue(m.HostPath) + ",security_model=none"
		if m.ReadOnly {
			fsdev += ",readonly=on"
		}
		args = append(args, "-fsdev", fsdev, "-device", "virtio-9p-pci,fsdev="+id+",mount_tag="+m.Tag)
	}
	return args
}

// optValue escapes a value for QEMU's option parser, which ends a value at
// a comma unless it is doubled.
func optValue(v string) string { return strings.ReplaceAll(v, ",", ",,") }

// maxMountTag is the longest 9p mount tag QEMU accepts.
const maxMountTag = 31

// checkMounts refuses shares QEMU or the guest could not take: the tag
// ends up in an option and on the kernel command line.
func checkMounts(mounts []vmm.Mount) error {
	tags := map[string]bool{}
	for _, m := range mounts {
		if m.Tag == "" || len(m.Tag) > maxMountTag || strings.Trim(m.Tag, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-") != "" {
			return fmt.Errorf("mount tag %q: want 1 to %d letters, digits or _.-", m.Tag, maxMountTag)
		}
		if tags[m.Tag] {
			return fmt.Errorf("mount tag %q is used twice", m.Tag)
		}
		tags[m.Tag] = true
		if !filepath.IsAbs(m.HostPath) {
			return fmt.Errorf("mount %s: host path %q is not absolute", m.Tag, m.HostPath)
		}
	}
	return nil
}

// maxCmdline is the longest kernel command line an x86 kernel keeps
// (COMMAND_LINE_SIZE less its NUL); it cuts the rest off silently.
const maxCmdline = 2047

// checkSpec refuses, before anything is made, what QEMU or the guest
// would not take.
func checkSpec(spec vmm.Spec) error {
	if err := checkMounts(spec.Mounts); err != nil {
		return err
	}
	// Emulated guests get emulatedCmdline too.
	if len(spec.Cmdline)+1+len(emulatedCmdline) > maxCmdline {
		return fmt.Errorf("kernel command line is %d bytes, more than the guest keeps (%d): fewer or shorter mounts", len(spec.Cmdline), maxCmdline)
	}
	return nil
}

// ProbeCommand boots spec's kernel and initramfs with no devices; with
// "smolvm.probe=poweroff" on the command line the agent powers off the
// moment it starts as /init, so the process's run time is the raw cost of
// booting this kernel to /init, the baseline the benchmarks compare with.
func (d *Driver) ProbeCommand(ctx context.Context, spec vmm.Spec) *exec.Cmd {
	return exec.CommandContext(ctx, qemuBinary, append(machineArgs(spec, d.accel, memory{}), "-serial", "none")...)
}

// Start makes the sandbox's disk if it has none yet and boots the VM.
func (d *Driver) Start(ctx context.Context, spec vmm.Spec) (vmm.Machine, error) {
	if err := checkSpec(spec); err != nil {
		return nil, err
	}
	disk := filepath.Join(spec.Dir, fileDisk)
	if _, err := os.Stat(disk); errors.Is(err, os.ErrNotExist) {
		if err := createDisk(ctx, spec.BaseImage, disk, spec.DiskMiB); err != nil {
			return nil, err
		}
	}
	var mem memory
	if spec.ForSnapshot {
		mem = memory{file: filepath.Join(spec.Dir, fileMemory), shared: true}
	}
	return d.start(ctx, spec, mem)
}

func (d *Driver) start(ctx context.Context, spec vmm.Spec, mem memory, extra ...string) (_ *machine, err error) {
	rt := paths(spec.Dir)
	if len(rt.AgentSocket) > maxSocketPath {
		return nil, fmt.Errorf("socket path %s is longer than %d bytes: use a shorter data directory (SMOLVM_DATA_DIR)", rt.AgentSocket, maxSocketPath)
	}
	for _, f := range []string{rt.AgentSocket, rt.QMPSocket, filepath.Join(spec.Dir, filePID)} {
		if err := os.Remove(f); err != nil && !errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("remove stale %s: %w", f, err)
		}
	}
	var release func()
	var l *launch    // QEMU starts through the launcher, into its jail
	var own []string // or drops root itself, with these arguments
	if d.jail != nil {
		// A VM that shares host directories needs their owner's rights
		// on them: it runs as that user, with the shares in its root.
		// Shares of root's, or of several owners, leave it unjailed but
		// for its filter.
		uid, gid, ok := sharesOwner(spec.Mounts)
		if len(spec.Mounts) == 0 {
			var err error
			if uid, release, err = d.jail.Allocate(); err != nil {
				return nil, err
			}
			gid, ok = uid, true
		}
		if !ok {
			slog.Warn("a sandbox sharing directories of root's, or of more than one user, runs its QEMU as root", "sandbox", spec.ID)
		} else {
			rt.UID = uid
			// On any failure from here, what the user was given is
			// root's again.
			defer func() {
				if err != nil {
					err = errors.Join(err, giveBack(rt))
				}
			}()
			if err := enterable(spec.Dir, rt.Disk, uid, gid); err != nil {
				if release != nil {
					release()
				}
				return nil, err
			}
			if d.helper != "" {
				var err error
				if l, err = d.prepareLaunch(spec, rt, mem, uid, gid); err != nil {
					if release != nil {
						release()
					}
					return nil, err
				}
			}
			switch {
			case l != nil:
				defer l.close()
			case len(spec.Mounts) > 0:
				// Not chrooted: QEMU's 9p server sets modes through
				// /proc/self/fd, which the sandbox directory lacks.
				own = []string{"-runas", strconv.Itoa(uid) + ":" + strconv.Itoa(gid)}
			default:
				own = jailArgs(uid, gid, spec.Dir)
			}
		}
	}
	if release != nil {
		defer release()
	}
	args := append(append(d.args(spec, mem, l != nil, slices.Contains(own, "-runas")), extra...), own...)
	// QEMU runs in a session of its own, so it outlives this process, and
	// is not daemonized: its filter forbids the fork -daemonize makes.
	// Until it answers on QMP it is starting; if it exits first, its log
	// says why.
	logPath := filepath.Join(spec.Dir, fileLog)
	logf, err := os.OpenFile(logPath, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return nil, fmt.Errorf("start qemu: %w", err)
	}
	var group *cgroup.Group
	if d.cgroups != nil {
		// Groups are swept once they are a minute old, so sweeping more
		// often than that finds nothing new.
		if now := time.Now().UnixNano(); now-d.swept.Load() > int64(time.Minute) {
			d.swept.Store(now)
			if err := cgroup.Sweep(*d.cgroups, time.Minute, ""); err != nil {
				slog.Warn("remove the control groups of ended VMs", "err", err)
			}
		}
		g, err := cgroup.New(*d.cgroups, vmm.GroupName(spec), vmm.Limits(spec))
		if err != nil {
			return nil, fmt.Errorf("start qemu: %w", err)
		}
		group = &g
		rt.Cgroup = vmm.GroupName(spec)
	}
	var cmd *exec.Cmd
	if l != nil {
		cmd = exec.Command(d.helper, append(l.argv, args...)...)
		cmd.ExtraFiles = l.files
		cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Unshareflags: syscall.CLONE_NEWNS}
	} else {
		cmd = exec.Command(qemuBinary, args...)
		cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
		if mem.sealed != nil {
			cmd.ExtraFiles = []*os.File{mem.sealed} // ramFD
		}
	}
	cmd.Dir = spec.Dir
	cmd.Stdout, cmd.Stderr = logf, logf
	err = cmd.Start()
	logf.Close()
	if err == nil && group != nil {
		// At once: QEMU allocates the guest's memory only as it builds
		// the machine (a launched one waits for the gate).
		err = group.Add(cmd.Process.Pid)
	}
	if err == nil && l != nil {
		_, err = l.gate.Write([]byte{1})
	}
	if err != nil && cmd.Process != nil {
		cmd.Process.Kill()
		cmd.Wait()
	}
	if l != nil {
		// QEMU has its own copies; with ours closed, a QEMU that dies
		// leaves its sockets refusing rather than queueing connects.
		l.close()
	}
	if err != nil {
		if group != nil {
			err = errors.Join(err, group.Remove())
		}
		return nil, fmt.Errorf("start qemu: %w", err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	rt.PID, rt.MemoryFile = cmd.Process.Pid, mem.file
	qm := &machine{rt: rt, cgroups: d.cgroups}
	if err := waitStarted(ctx, qm, exited); err != nil {
		err = qm.withLog(err)
		if kerr := qm.Kill(context.WithoutCancel(ctx)); kerr != nil {
			err = errors.Join(err, kerr)
		}
		return nil, fmt.Errorf("start qemu: %w", err)
	}
	if d.accel != "kvm" {
		batchMainLoop(qm.rt.PID)
	}
	if l != nil {
		// A launched QEMU cannot write its pid file; the pid is the
		// launcher's, which became QEMU.
		if err := os.WriteFile(filepath.Join(spec.Dir, filePID), []byte(strconv.Itoa(qm.rt.PID)+"\n"), 0o644); err != nil {
			return nil, errors.Join(fmt.Errorf("start qemu: %w", err), qm.Kill(context.WithoutCancel(ctx)))
		}
	}
	if mem.sealed != nil {
		held(filepath.Dir(mem.file), mem.sealedName, qm.rt.PID)
	}
	return qm, nil
}

// batchMainLoop takes from QEMU's main loop thread (the process's first,
// whose tid is its pid) the right to preempt on waking. Under TCG the
// guest wakes it many times a command (every timer the guest arms is a
// QEMU timer the main loop runs), the host's scheduler ran it at once on
// the waking vCPU thread's core, and the vCPU thread then waited, often
// for the lock the main loop had just taken: a login shell's `true` took
// 18 to 22 ms, 11 with this, and its spread (p25 to p75) fell from 6 ms
// to 1.3 (two clones side by side, one of them set). SCHED_BATCH keeps
// the thread's share of the CPU; only the preemption on waking goes. It
// is set once QEMU answers on QMP: the vCPU threads exist by then and
// keep the policy they were created with.
func batchMainLoop(pid int) {
	attr, err := unix.SchedGetAttr(pid, 0)
	if err == nil {
		attr.Policy = unix.SCHED_BATCH
		err = unix.SchedSetAttr(pid, attr, 0)
	}
	if err != nil {
		slog.Warn("QEMU's main loop keeps preempting its vCPU threads: commands take longer", "pid", pid, "err", err)
	}
}

// waitStarted waits until QEMU answers on QMP, which it does only from its
// main loop, after it has built the machine.
func waitStarted(ctx context.Context, qm *machine, exited <-chan error) error {
	for {
		select {
		case err := <-exited:
			return fmt.Errorf("qemu exited during start-up (%v)", err)
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(5 * time.Millisecond):
		}
		dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		m, err := dialQMP(dctx, qm.rt.QMPSocket)
		cancel()
		if err == nil {
			m.Close()
			return nil
		}
	}
}

// version is the first line of `qemu-system-x86_64 --version`.
func version(ctx context.Context) (string, error) {
	out, err := exec.CommandContext(ctx, qemuBinary, "--version").Output()
	if err != nil {
		return "", fmt.Errorf("%s --version: %w", qemuBinary, err)
	}
	line, _, _ := strings.Cut(string(out), "\n")
	return strings.TrimSpace(line), nil
}

var (
	_ vmm.Driver       = (*Driver)(nil)
	_ vmm.Snapshotter  = (*Driver)(nil)
	_ vmm.DiskResizer  = (*Driver)(nil)
	_ vmm.Pauser       = (*Driver)(nil)
	_ vmm.Checkpointer = (*Driver)(nil)
)

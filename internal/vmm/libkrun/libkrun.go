// Package libkrun runs sandboxes under libkrun: a KVM microVM with virtio
// devices over MMIO, the sandbox's raw ext4 disk as its root, and the
// agent on a vsock port that libkrun bridges to a Unix socket on the host.
//
// libkrun is a library whose krun_start_enter takes over the process that
// calls it, so each VM runs in a helper process of its own, smolvm-krun
// (cmd/smolvm-krun), which the driver starts detached and configures
// through a JSON file (krunconf.Config). libkrun saves no VM state, so the
// driver is no Snapshotter: templates fall back to cold boots.
package libkrun

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
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
	"github.com/smolvm/smolvm/internal/vmm/libkrun/krunconf"
)

// The helper binary and the variable that may name it.
const (
	HelperName = "smolvm-krun"
	HelperEnv  = "SMOLVM_KRUN"
)

// Options configure the driver.
type Options struct {
	// Helper is smolvm-krun's path; "" finds it as smolvm's other helpers
	// are found: $SMOLVM_KRUN, beside the running executable, $PATH.
	Helper string
	// Library is libkrun's shared library; "" looks for libkrun.so.1,
	// then libkrun.so, in the directories the dynamic loader searches.
	Library string
	// NoCgroup runs VMMs without a control group of their own; they get
	// one only when smolvm runs as root.
	NoCgroup bool
	// NoJail runs smolvm-krun as the server's user, in the host's root;
	// it is jailed (krunconf.Jail) only when smolvm runs as root.
	NoJail bool
	// Users hands out the jail's users. The drivers of one server share
	// one, so that VMs of two backends starting at once never get the
	// same user; nil makes the driver its own.
	Users *jail.Users
}

// Driver is the libkrun backend.
type Driver struct {
	opts Options
	// cgroups is where each VMM gets a control group; nil without root
	// or without a usable hierarchy (cgroupErr says why).
	cgroups   *cgroup.Hierarchy
	cgroupErr error
	swept     atomic.Int64 // when the groups were last swept, unix ns
	jail      *jail.Users  // nil: not jailed

	identityMu sync.Mutex
	identity   string // "" until one is found
}

// New returns the libkrun driver.
func New(o Options) *Driver {
	d := &Driver{opts: o}
	if !o.NoJail && os.Geteuid() == 0 {
		d.jail = o.Users
		if d.jail == nil {
			d.jail = jail.NewUsers(jail.VMMBase, jail.PerRange)
		}
	}
	if !o.NoCgroup && os.Geteuid() == 0 {
		if h, err := cgroup.Detect(cgroup.Root); err == nil {
			d.cgroups = &h
		} else {
			d.cgroupErr = err
		}
	}
	return d
}

func (d *Driver) Name() string { return "libkrun" }

// Available names everything this host lacks to run libkrun VMs: libkrun
// has no emulator to fall back on, so KVM is one of them.
func (d *Driver) Available() error {
	var errs []error
	if err := kvmUsable(); err != nil {
		errs = append(errs, err)
	}
	if _, err := d.library(); err != nil {
		errs = append(errs, err)
	}
	if _, err := d.helper(); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// Identity is libkrun's version and a hash of the library: libkrun saves
// no state today, but templates are keyed by it all the same.
// It is worked out once found (hashing the library takes a moment); a
// library not found yet is looked for again next time.
func (d *Driver) Identity(ctx context.Context) (string, error) {
	d.identityMu.Lock()
	defer d.identityMu.Unlock()
	if d.identity != "" {
		return d.identity, nil
	}
	lib, err := d.library()
	if err != nil {
		return "", err
	}
	id, err := libraryIdentity(lib)
	if err != nil {
		return "", err
	}
	d.identity = id
	return id, nil
}

// helper finds smolvm-krun, in the order doctor.Helper.Locate uses (not
// called, so that doctor may come to ask this package what it lacks).
func (d *Driver) helper() (string, error) {
	candidates := []string{d.opts.Helper, os.Getenv(HelperEnv)}
	if exe, err := os.Executable(); err == nil {
		candidates = append(candidates, filepath.Join(filepath.Dir(exe), HelperName))
	}
	if p, err := exec.LookPath(HelperName); err == nil {
		candidates = append(candidates, p)
	}
	for _, p := range candidates {
		if p == "" {
			continue
		}
		if st, err := os.Stat(p); err == nil && st.Mode().IsRegular() {
			return filepath.Abs(p)
		}
	}
	return "", fmt.Errorf("%s not found next to smolvm, in $%s or in $PATH: build it with `CGO_ENABLED=0 go build -o bin/%s ./cmd/%s`", HelperName, HelperEnv, HelperName, HelperName)
}

// The files of a machine in its directory. They are this driver's alone.
const (
	fileDisk    = "disk.raw"
	fileAgent   = "agent.sock" // in dirRun
	fileConfig  = "krun.json"
	fileLog     = "krun.log"
	fileConsole = "console.log"
	// dirRun is where libkrun makes the agent's socket: the jail's user
	// may create nothing in the sandbox's directory itself.
	dirRun = "run"
)

// maxSocketPath is sun_path's size less its terminating NUL.
const maxSocketPath = 107

func paths(dir string) runtime {
	return runtime{
		Dir:         dir,
		AgentSocket: filepath.Join(dir, dirRun, fileAgent),
		Console:     filepath.Join(dir, fileConsole),
		Disk:        filepath.Join(dir, fileDisk),
		Config:      filepath.Join(dir, fileConfig),
	}
}

// runtime is a machine's runtime record.
type runtime struct {
	PID         int    `json:"pid"`
	Dir         string `json:"dir"`
	AgentSocket string `json:"agent_socket"`
	Console     string `json:"console"`
	Disk        string `json:"disk"`
	// Config is the helper's config file, which its command line names:
	// how the process is told from another with a recycled pid.
	Config string `json:"config"`
	// Cgroup names the process's control group, if it has one.
	Cgroup string `json:"cgroup,omitempty"`
	// UID is the jail's user the helper runs as; 0 for none.
	UID int `json:"uid,omitempty"`
}

// machine is one smolvm-krun process.
type machine struct {
	rt      runtime
	cgroups *cgroup.Hierarchy
}

func (m *machine) Runtime() json.RawMessage {
	b, _ := json.Marshal(m.rt)
	return b
}
func (m *machine) PID() int           { return m.rt.PID }
func (m *machine) ConsoleLog() string { return m.rt.Console }

// marker identifies the helper on its command line (-config names it).
func (m *machine) marker() string { return m.rt.Config }

func (m *machine) Alive() bool { return vmm.ProcessAlive(m.rt.PID, m.marker()) }

func (m *machine) Kill(ctx context.Context) error {
	return m.ended(vmm.KillProcess(ctx, m.rt.PID, m.marker()))
}

func (m *machine) Wait(ctx context.Context) error {
	return m.ended(vmm.WaitGone(ctx, m.rt.PID, m.marker()))
}

// ended cleans up after the helper has gone: its control group, and what
// its jail's user was given, which becomes root's again.
func (m *machine) ended(err error) error {
	if err != nil {
		return err
	}
	return errors.Join(giveBack(m.rt), m.dropGroup(nil))
}

// dialRetry is how often DialAgent tries again while the socket is not
// there yet.
const dialRetry = 10 * time.Millisecond

// DialAgent connects to the socket libkrun bridges to the agent's vsock
// port. libkrun makes the socket only once the guest's vsock driver is up,
// so while the guest boots there is none, or none listening yet: that is
// tried again until ctx ends. Once connected, a guest agent not yet
// listening shows as the connection closing, which the caller's handshake
// retries.
func (m *machine) DialAgent(ctx context.Context) (net.Conn, error) {
	for {
		c, err := dialNoFollow(ctx, m.rt.AgentSocket)
		if err == nil {
			return c, nil
		}
		if !errors.Is(err, syscall.ENOENT) && !errors.Is(err, syscall.ECONNREFUSED) {
			return nil, fmt.Errorf("connect to the agent: %w", err)
		}
		if !m.Alive() {
			return nil, fmt.Errorf("connect to the agent: the libkrun VM (pid %d) has exited", m.rt.PID)
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("connect to the agent at %s: %w (%v)", m.rt.AgentSocket, ctx.Err(), err)
		case <-time.After(dialRetry):
		}
	}
}

// dialNoFollow connects to the Unix socket at path, which must be one and
// not a link to one: the jail's user makes what is in dirRun, and could
// otherwise point the server at any socket of the host. The socket is
// opened without following a link and reached through its descriptor.
func dialNoFollow(ctx context.Context, path string) (net.Conn, error) {
	fd, err := unix.Open(path, unix.O_PATH|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: path, Err: err}
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, &os.PathError{Op: "stat", Path: path, Err: err}
	}
	if st.Mode&unix.S_IFMT != unix.S_IFSOCK {
		return nil, fmt.Errorf("%s is not a socket", path)
	}
	var d net.Dialer
	return d.DialContext(ctx, "unix", "/proc/self/fd/"+strconv.Itoa(fd))
}

// dropGroup removes the process's control group once it has ended.
func (m *machine) dropGroup(err error) error {
	if err != nil || m.rt.Cgroup == "" || m.cgroups == nil {
		return err
	}
	vmm.DropGroup(*m.cgroups, m.rt.Cgroup)
	return nil
}

func (d *Driver) Attach(raw json.RawMessage) (vmm.Machine, error) {
	var rt runtime
	if err := json.Unmarshal(raw, &rt); err != nil {
		return nil, fmt.Errorf("libkrun runtime record: %w", err)
	}
	if rt.AgentSocket == "" || rt.Config == "" {
		return nil, fmt.Errorf("libkrun runtime record names no agent socket or config")
	}
	return &machine{rt: rt, cgroups: d.cgroups}, nil
}

// Clear removes a machine's files from dir.
func (d *Driver) Clear(dir string) error {
	var errs []error
	for _, f := range []string{fileDisk, fileDisk + ".tmp", fileAgent, fileConfig, fileConfig + ".tmp", fileLog, fileConsole} {
		if err := os.Remove(filepath.Join(dir, f)); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	if err := os.RemoveAll(filepath.Join(dir, dirRun)); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// Reap kills any smolvm-krun whose command line names dir's config, and
// removes its control group. The command line finds it even when the
// process that started it died before recording its pid.
func (d *Driver) Reap(ctx context.Context, dir string) error {
	// As Start names it.
	if abs, err := filepath.Abs(dir); err == nil {
		dir = abs
	}
	var errs []error
	for _, pid := range vmm.ProcessesWith(paths(dir).Config) {
		m := &machine{rt: paths(dir), cgroups: d.cgroups}
		m.rt.PID = pid
		if d.cgroups != nil {
			m.rt.Cgroup = cgroup.Of(pid)
		}
		if d.jail != nil {
			m.rt.UID, _ = jail.ProcessUID(pid)
		}
		slog.Warn("ending a VM whose start was cut short", "dir", dir, "pid", pid)
		errs = append(errs, m.Kill(ctx))
	}
	return errors.Join(errs...)
}

// maxCmdline is what the command line given may take of the kernel's
// 2047 bytes: libkrun appends its own (a virtio_mmio.device= per device,
// and a few more), and the guest drops whatever goes past the end.
const maxCmdline = 2047 - 512

// kernelCmdline adapts the command line smolvm boots every backend with to
// libkrun's machine. Its console is the virtio console hvc0 (it has no
// UART unless it boots firmware), so console= names that. The guest ends
// the VM by resetting through the keyboard controller, which libkrun
// turns into its exit: reboot=k goes there at once, for the panic=-1 that
// ends a crashed guest.
func kernelCmdline(c string) string {
	var out []string
	for _, f := range strings.Fields(c) {
		if strings.HasPrefix(f, "console=") || strings.HasPrefix(f, "reboot=") {
			continue
		}
		out = append(out, f)
	}
	// No ACPI power button either: the agent powers off by a reset.
	return strings.Join(append(out, "console=hvc0", "reboot=k", "smolvm.poweroff=reset"), " ")
}

// checkSpec refuses, before anything is made, what libkrun or the guest
// would not take.
func checkSpec(spec vmm.Spec) error {
	if len(spec.Mounts) > 0 {
		return errors.New("the libkrun backend does not share host directories")
	}
	if spec.VCPUs < 1 || spec.VCPUs > krunconf.MaxVCPUs {
		return fmt.Errorf("%d vCPUs: libkrun takes 1 to %d", spec.VCPUs, krunconf.MaxVCPUs)
	}
	if spec.MemoryMiB < 1 {
		return fmt.Errorf("%d MiB of memory: want at least 1", spec.MemoryMiB)
	}
	if spec.Kernel == "" || spec.Cmdline == "" {
		return errors.New("a libkrun VM needs a kernel and a command line")
	}
	if n := len(kernelCmdline(spec.Cmdline)); n > maxCmdline {
		return fmt.Errorf("kernel command line is %d bytes, more than libkrun leaves room for (%d): fewer or shorter parameters", n, maxCmdline)
	}
	if s := paths(spec.Dir).AgentSocket; len(s) > maxSocketPath {
		return fmt.Errorf("socket path %s is longer than %d bytes: use a shorter data directory (SMOLVM_DATA_DIR)", s, maxSocketPath)
	}
	if n := spec.Net; n != nil {
		if n.Kind != vmm.NetStream {
			return fmt.Errorf("network attachment %q: the libkrun backend takes only %q", n.Kind, vmm.NetStream)
		}
		if len(n.Socket) > maxSocketPath {
			return fmt.Errorf("network socket path %s is longer than %d bytes", n.Socket, maxSocketPath)
		}
		if _, err := krunconf.ParseMAC(n.MAC); err != nil {
			return err
		}
	}
	return nil
}

// config is what the helper is told for spec.
func config(spec vmm.Spec) (krunconf.Config, error) {
	p := paths(spec.Dir)
	c := krunconf.Config{
		Kernel:      spec.Kernel,
		Initrd:      spec.Initrd,
		Cmdline:     kernelCmdline(spec.Cmdline),
		Disk:        p.Disk,
		VCPUs:       spec.VCPUs,
		MemoryMiB:   spec.MemoryMiB,
		AgentSocket: p.AgentSocket,
		AgentPort:   wire.VsockPort,
		Console:     p.Console,
	}
	if n := spec.Net; n != nil {
		c.Net = &krunconf.Net{Socket: n.Socket, MAC: n.MAC}
	}
	// The helper checks paths are absolute: relative ones would be read
	// from its working directory, the sandbox's.
	var err error
	for _, s := range []*string{&c.Kernel, &c.Initrd, &c.Disk, &c.AgentSocket, &c.Console} {
		if *s != "" {
			if *s, err = filepath.Abs(*s); err != nil {
				return c, err
			}
		}
	}
	if c.Net != nil {
		if c.Net.Socket, err = filepath.Abs(c.Net.Socket); err != nil {
			return c, err
		}
	}
	return c, c.Check()
}

// Start makes the sandbox's disk if it has none yet and boots the VM.
func (d *Driver) Start(ctx context.Context, spec vmm.Spec) (vmm.Machine, error) {
	if err := checkSpec(spec); err != nil {
		return nil, err
	}
	helper, err := d.helper()
	if err != nil {
		return nil, err
	}
	lib, err := d.library()
	if err != nil {
		return nil, err
	}
	dir, err := filepath.Abs(spec.Dir)
	if err != nil {
		return nil, err
	}
	spec.Dir = dir
	cfg, err := config(spec)
	if err != nil {
		return nil, fmt.Errorf("libkrun config: %w", err)
	}

	t := time.Now()
	rt := paths(spec.Dir)
	madeDisk := false
	if _, err := os.Stat(rt.Disk); errors.Is(err, os.ErrNotExist) {
		if err := createDisk(ctx, spec.BaseImage, rt.Disk, spec.DiskMiB); err != nil {
			return nil, err
		}
		madeDisk = true
	} else if err != nil {
		return nil, fmt.Errorf("sandbox disk: %w", err)
	}
	t = vmm.Step(ctx, "disk", t)
	m, err := d.start(ctx, spec, cfg, helper, lib)
	if err != nil {
		// A disk this call made holds nothing yet; one it found is the
		// sandbox's and stays.
		if madeDisk {
			os.Remove(rt.Disk)
		}
		return nil, err
	}
	vmm.Step(ctx, "libkrun start", t)
	return m, nil
}

// startTimeout bounds how long the helper may take to configure libkrun.
const startTimeout = 30 * time.Second

// startSettle is how long Start watches a helper that has entered
// krun_start_enter before taking the VM as running, unless its vCPU
// threads show first: libkrun loads the kernel and opens the devices there
// and fails within moments if it cannot, which is better told to Start's
// caller than found as a VM that died.
var startSettle = time.Second

func (d *Driver) start(ctx context.Context, spec vmm.Spec, cfg krunconf.Config, helper, lib string) (_ *machine, err error) {
	rt := paths(spec.Dir)
	// libkrun refuses to listen on a socket path that exists, and a
	// console left from an earlier boot would be read as this one's.
	run := filepath.Join(spec.Dir, dirRun)
	for _, f := range []string{run, rt.Console} {
		if err := os.RemoveAll(f); err != nil {
			return nil, fmt.Errorf("remove stale %s: %w", f, err)
		}
	}
	if err := os.Mkdir(run, 0o700); err != nil {
		return nil, fmt.Errorf("start libkrun: %w", err)
	}
	defer func() {
		if err != nil {
			os.Remove(rt.Config)
			os.RemoveAll(run)
		}
	}()
	if d.jail != nil {
		uid, release, aerr := d.jail.Allocate()
		if aerr != nil {
			return nil, aerr
		}
		defer release()
		rt.UID = uid
		cfg.Jail = &krunconf.Jail{UID: uid, Dir: spec.Dir}
		// On any failure from here, what the user was given is root's
		// again (a disk that was there stays, and is the sandbox's).
		defer func() {
			if err != nil {
				err = errors.Join(err, giveBack(rt))
			}
		}()
		if err = jailFiles(spec, rt); err != nil {
			return nil, err
		}
	}
	if err := cfg.Write(rt.Config); err != nil {
		return nil, err
	}
	logPath := filepath.Join(spec.Dir, fileLog)
	logf, err := os.OpenFile(logPath, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return nil, fmt.Errorf("start libkrun: %w", err)
	}
	defer logf.Close()
	statusR, statusW, err := os.Pipe()
	if err != nil {
		return nil, fmt.Errorf("start libkrun: %w", err)
	}
	defer statusR.Close()

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
			statusW.Close()
			return nil, fmt.Errorf("start libkrun: %w", err)
		}
		group = &g
		rt.Cgroup = vmm.GroupName(spec)
	}

	// The helper runs in a session of its own, so it outlives this
	// process; descriptor 3 is its status pipe.
	cmd := exec.Command(helper,
		"-"+krunconf.FlagConfig, rt.Config,
		"-"+krunconf.FlagLibrary, lib,
		"-"+krunconf.FlagStatusFD, "3")
	cmd.Dir = spec.Dir
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.ExtraFiles = []*os.File{statusW}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if cfg.Jail != nil {
		// The helper builds its root in a mount namespace of its own.
		cmd.SysProcAttr.Cloneflags = syscall.CLONE_NEWNS
	}
	err = cmd.Start()
	statusW.Close() // the helper's copy is the only one left
	if err == nil && group != nil {
		// At once: the guest's memory is allocated only in
		// krun_start_enter, well after this.
		if err = group.Add(cmd.Process.Pid); err != nil {
			cmd.Process.Kill()
			cmd.Wait()
		}
	}
	if err != nil {
		if group != nil {
			err = errors.Join(err, group.Remove())
		}
		return nil, fmt.Errorf("start libkrun: %w", err)
	}
	exited := make(chan struct{})
	go func() {
		cmd.Wait()
		close(exited)
	}()
	rt.PID = cmd.Process.Pid
	m := &machine{rt: rt, cgroups: d.cgroups}
	if err := waitStarted(ctx, statusR, exited, rt.PID); err != nil {
		kctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), killTimeout)
		defer cancel()
		if kerr := m.Kill(kctx); kerr != nil {
			err = errors.Join(err, kerr)
		}
		// Reaped, so no zombie is left behind either.
		select {
		case <-exited:
		case <-kctx.Done():
		}
		return nil, fmt.Errorf("start libkrun: %w", withLog(err, logPath))
	}
	return m, nil
}

// jailFiles gives the jail's user rt.UID what it opens in the sandbox's
// directory: a way in (group, mode 0710: it may open what it has a name
// for and make nothing), the disk, the console and the directory libkrun
// makes the agent's socket in, and the network process's socket. The
// directory stays root's, so it cannot plant a name the server follows.
func jailFiles(spec vmm.Spec, rt runtime) error {
	uid := rt.UID
	if err := os.Chown(spec.Dir, 0, uid); err != nil {
		return fmt.Errorf("jail: %w", err)
	}
	if err := os.Chmod(spec.Dir, 0o710); err != nil {
		return fmt.Errorf("jail: %w", err)
	}
	console, err := os.OpenFile(rt.Console, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o640)
	if err != nil {
		return fmt.Errorf("jail: %w", err)
	}
	err = errors.Join(console.Chown(uid, uid), console.Close())
	if err != nil {
		return fmt.Errorf("jail: %w", err)
	}
	owned := []string{rt.Disk, filepath.Join(spec.Dir, dirRun)}
	if spec.Net != nil {
		owned = append(owned, spec.Net.Socket)
	}
	for _, p := range owned {
		if err := os.Lchown(p, uid, uid); err != nil {
			return fmt.Errorf("jail: give %s to the jail's user: %w", p, err)
		}
	}
	return nil
}

// giveBack makes root the owner again of what the jail's user was given:
// the user may go to another VM next. The user could create no name in
// the sandbox's directory, so none of these is its link.
func giveBack(rt runtime) error {
	if rt.UID == 0 {
		return nil
	}
	return jail.GiveBack(rt.Disk, rt.Console, filepath.Join(rt.Dir, dirRun), rt.Dir)
}

// killTimeout bounds the wait for a helper killed on a failed start.
const killTimeout = 10 * time.Second

// waitStarted waits for the helper's status line, then watches it for
// startSettle or until its vCPUs run.
func waitStarted(ctx context.Context, status io.Reader, exited <-chan struct{}, pid int) error {
	ctx, cancel := context.WithTimeout(ctx, startTimeout)
	defer cancel()
	line := make(chan string, 1)
	go func() {
		// Ends at the helper's status or its exit, either of which closes
		// the pipe's last writer.
		s, _ := bufio.NewReader(status).ReadString('\n')
		line <- strings.TrimSpace(s)
	}()
	select {
	case <-ctx.Done():
		return fmt.Errorf("smolvm-krun did not configure libkrun: %w", ctx.Err())
	case s := <-line:
		if msg, ok := strings.CutPrefix(s, krunconf.ErrorPrefix); ok {
			return errors.New(msg)
		}
		if s != krunconf.Ready {
			return errors.New("smolvm-krun exited before configuring libkrun")
		}
	}
	settle := time.NewTimer(startSettle)
	defer settle.Stop()
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-exited:
			return errors.New("smolvm-krun exited in krun_start_enter: libkrun could not start the VM")
		case <-ctx.Done():
			return ctx.Err()
		case <-settle.C:
			return nil
		case <-tick.C:
			if vcpusRunning(pid) {
				return nil
			}
		}
	}
}

// vcpusRunning reports whether libkrun has started pid's vCPU threads,
// which it does last, once the VM is built.
func vcpusRunning(pid int) bool {
	tasks, err := os.ReadDir("/proc/" + strconv.Itoa(pid) + "/task")
	if err != nil {
		return false
	}
	for _, t := range tasks {
		comm, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/task/" + t.Name() + "/comm")
		if err == nil && strings.HasPrefix(string(comm), "fc_vcpu") {
			return true
		}
	}
	return false
}

// withLog adds the end of the helper's log, where libkrun says why it
// failed, to err.
func withLog(err error, logPath string) error {
	b, rerr := os.ReadFile(logPath)
	if rerr != nil {
		return err
	}
	// Without a line the status already gave: libkrun's own say more, and
	// the helper's says which call failed after it had reported ready.
	var lines []string
	for _, l := range strings.Split(string(b), "\n") {
		l = strings.TrimSpace(l)
		if l == "" {
			continue
		}
		if own, ok := strings.CutPrefix(l, "smolvm-krun: "); ok && strings.Contains(err.Error(), own) {
			continue
		}
		lines = append(lines, l)
	}
	const tail = 2048
	s := strings.Join(lines, "\n")
	if len(s) > tail {
		s = "..." + s[len(s)-tail:]
	}
	if s == "" {
		return err
	}
	return fmt.Errorf("%w\n%s", err, s)
}

var (
	_ vmm.Driver  = (*Driver)(nil)
	_ vmm.Machine = (*machine)(nil)
)

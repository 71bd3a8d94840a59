package qemu

import (
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	goruntime "runtime"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/smolvm/smolvm/internal/jail"
	"github.com/smolvm/smolvm/internal/qcow2"
	"github.com/smolvm/smolvm/internal/vmm"
)

// The jail's launcher. A jailed QEMU never runs as root: qemu-launch, a
// subcommand of the helper binary (smolvm-jail) started by the driver as
// root in a mount namespace of its own, builds a root holding only what
// QEMU needs, moves into it, drops root for the VM's own user and
// executes QEMU, which then installs its filter with
// elevateprivileges=deny: with nothing left to raise, even the set*id
// calls are refused. The root holds:
//   - /usr (and the /bin, /lib... links into it), read-only: QEMU, its
//     libraries and firmware; /etc/ld.so.cache, for the loader;
//   - /dev with null, zero, full, random, urandom and, for KVM, a kvm
//     node of the VM user's own;
//   - /proc showing the VM user's own processes only (QEMU maps a
//     clone's sealed RAM through /proc/self/fd);
//   - the sandbox directory, at its own path, its working directory;
//   - the kernel, the initramfs and each image under the disk,
//     read-only, at their own paths.
//
// The sandbox directory stays root's (mode 0710, group the VM's): QEMU
// writes only into files made for it (the disk, the console log, a
// template's memory) and listens on sockets the driver made and handed
// down, so it cannot plant a name the server would later follow.

// LaunchCommand is the helper's subcommand that launches a jailed QEMU.
const LaunchCommand = "qemu-launch"

// Main runs the helper subcommand args[0] (LaunchCommand); it returns
// only on failure, having become QEMU otherwise.
func Main(args []string) error {
	if len(args) == 0 || args[0] != LaunchCommand {
		return fmt.Errorf("unknown subcommand %v", args)
	}
	return launchMain(args[1:])
}

type pathList []string

func (p *pathList) String() string     { return strings.Join(*p, ",") }
func (p *pathList) Set(v string) error { *p = append(*p, v); return nil }

func launchMain(args []string) error {
	// no_new_privs belongs to a thread; the one that sets it must be the
	// one that executes QEMU.
	goruntime.LockOSThread()
	fs := flag.NewFlagSet(LaunchCommand, flag.ContinueOnError)
	dir := fs.String("dir", "", "the sandbox directory: bound read-write, the working directory")
	uid := fs.Int("uid", 0, "the user QEMU runs as")
	gid := fs.Int("gid", -1, "the group QEMU runs as (default: the user's number)")
	kvm := fs.Bool("kvm", false, "give the user a /dev/kvm")
	gateFD := fs.Int("gate-fd", 0, "a pipe to read a byte from before anything else (0: none)")
	var ro, rw pathList
	fs.Var(&ro, "ro", "a file or directory bound read-only at its own path (repeatable)")
	fs.Var(&rw, "rw", "a directory shared with the guest, bound read-write at its own path (repeatable)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	argv := fs.Args()
	if *gid < 0 {
		*gid = *uid
	}
	if *dir == "" || !filepath.IsAbs(*dir) || *uid <= 0 || *gid <= 0 || len(argv) == 0 || !filepath.IsAbs(argv[0]) {
		return fmt.Errorf("usage: %s --dir=ABSDIR --uid=N [--gid=N] [--kvm] [--ro=PATH]... [--rw=PATH]... [--gate-fd=N] -- /ABS/qemu ARGS", LaunchCommand)
	}
	// The driver puts this process in its control group first.
	if err := jail.WaitGate(*gateFD); err != nil {
		return err
	}
	var root jail.Root
	if err := root.HostLibraries(); err != nil {
		return err
	}
	for _, p := range ro {
		if err := root.Bind(p, p, false); err != nil {
			return err
		}
	}
	for _, p := range rw {
		if err := root.Bind(p, p, true); err != nil {
			return err
		}
	}
	if err := root.Bind(*dir, *dir, true); err != nil {
		return err
	}
	devs := jail.StandardDevices()
	if *kvm {
		// QEMU says so if the host has none.
		devs = append(devs, jail.Device{Name: "kvm", Owner: *uid, Optional: true})
	}
	if err := root.Enter(LaunchCommand, devs); err != nil {
		return err
	}
	if err := os.Chdir(*dir); err != nil {
		return err
	}
	if err := jail.DropToGroup(*uid, *gid); err != nil {
		return err
	}
	if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
		return fmt.Errorf("no_new_privs: %w", err)
	}
	return fmt.Errorf("exec %s: %w", argv[0], unix.Exec(argv[0], argv, os.Environ()))
}

// launch is what the driver prepares to start QEMU through qemu-launch.
type launch struct {
	argv  []string   // the helper's arguments, up to QEMU's
	files []*os.File // descriptors 3 on: ramFD, agentFD, qmpFD, gateFD
	gate  *os.File   // its other end: a byte lets the launcher go on
}

// prepareLaunch makes what a QEMU launched into its jail as uid needs
// made for it: the files it writes, owned by uid; its sockets, listening;
// the list of what it reads. It returns nil when this host's QEMU is not
// under /usr, which the jail's root holds.
func (d *Driver) prepareLaunch(spec vmm.Spec, rt runtime, mem memory, uid, gid int) (_ *launch, err error) {
	qemu, err := exec.LookPath(qemuBinary)
	if err != nil {
		return nil, err
	}
	if qemu, err = filepath.Abs(qemu); err != nil || !strings.HasPrefix(qemu, "/usr/") {
		return nil, err
	}
	l := &launch{}
	defer func() {
		if err != nil {
			l.close()
		}
	}()
	// Files QEMU writes, which it could not make in a directory that is
	// not its own.
	made := []string{rt.Console}
	if mem.file != "" && mem.shared {
		made = append(made, mem.file)
	}
	for _, f := range made {
		fh, err := os.OpenFile(f, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o640)
		if err != nil {
			return nil, fmt.Errorf("start qemu: %w", err)
		}
		err = errors.Join(fh.Chown(uid, gid), fh.Close())
		if err != nil {
			return nil, fmt.Errorf("start qemu: %w", err)
		}
	}
	if spec.Net != nil {
		// QEMU connects to the network process's socket as uid.
		if err := os.Chown(spec.Net.Socket, uid, gid); err != nil {
			return nil, fmt.Errorf("start qemu: %w", err)
		}
	}
	ram := mem.sealed
	if ram == nil {
		// Keeps the numbering: descriptor 3 is always the RAM's.
		if ram, err = os.Open(os.DevNull); err != nil {
			return nil, err
		}
		l.files = append(l.files, ram)
	} else if ram, err = dupFile(ram); err != nil {
		return nil, err
	} else {
		l.files = append(l.files, ram)
	}
	for _, path := range []string{rt.AgentSocket, rt.QMPSocket} {
		f, err := listenFile(path)
		if err != nil {
			return nil, fmt.Errorf("start qemu: %w", err)
		}
		l.files = append(l.files, f)
	}
	r, w, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	l.files, l.gate = append(l.files, r), w
	l.argv = []string{LaunchCommand, "--dir=" + spec.Dir, "--uid=" + strconv.Itoa(uid), "--gid=" + strconv.Itoa(gid), "--gate-fd=" + strconv.Itoa(gateFD)}
	if d.accel == "kvm" {
		l.argv = append(l.argv, "--kvm")
	}
	ro := []string{spec.Kernel}
	if spec.Initrd != "" {
		ro = append(ro, spec.Initrd)
	}
	ro = append(ro, backingChain(rt.Disk)...)
	for _, m := range spec.Mounts {
		if m.ReadOnly {
			ro = append(ro, m.HostPath)
		} else {
			l.argv = append(l.argv, "--rw="+m.HostPath)
		}
	}
	for _, p := range ro {
		l.argv = append(l.argv, "--ro="+p)
	}
	l.argv = append(l.argv, "--", qemu)
	return l, nil
}

// close lets go of this process's copies of what was handed down.
func (l *launch) close() {
	for _, f := range l.files {
		f.Close()
	}
	if l.gate != nil {
		l.gate.Close()
	}
	l.files, l.gate = nil, nil
}

// backingChain lists the images under the qcow2 disk, nearest first.
func backingChain(disk string) []string {
	var chain []string
	for f := disk; len(chain) < 16; {
		name, ok := qcow2.Backing(f)
		if !ok {
			break
		}
		if !filepath.IsAbs(name) {
			name = filepath.Join(filepath.Dir(f), name)
		}
		chain = append(chain, name)
		f = name
	}
	return chain
}

// listenFile makes a unix socket listening at path and returns it as a
// file to hand down; the path stays when this process's copy is closed.
func listenFile(path string) (*os.File, error) {
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, err
	}
	ln.SetUnlinkOnClose(false)
	f, err := ln.File()
	return f, errors.Join(err, ln.Close())
}

func dupFile(f *os.File) (*os.File, error) {
	fd, err := unix.FcntlInt(f.Fd(), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	return os.NewFile(uintptr(fd), f.Name()), nil
}

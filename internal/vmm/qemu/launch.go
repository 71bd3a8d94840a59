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
// subcommand of the helper binary (smolvm-net) started by the driver as
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

// launchRoot is where the root is put together: any directory every host
// has does, as the tmpfs covers it in the launcher's namespace only, and
// what is bound into it is opened first, through descriptors.
const launchRoot = "/tmp"

type pathList []string

func (p *pathList) String() string     { return strings.Join(*p, ",") }
func (p *pathList) Set(v string) error { *p = append(*p, v); return nil }

func launchMain(args []string) error {
	// no_new_privs belongs to a thread; the one that sets it must be the
	// one that executes QEMU.
	goruntime.LockOSThread()
	fs := flag.NewFlagSet(LaunchCommand, flag.ContinueOnError)
	dir := fs.String("dir", "", "the sandbox directory: bound read-write, the working directory")
	uid := fs.Int("uid", 0, "the user (and group) QEMU runs as")
	kvm := fs.Bool("kvm", false, "give the user a /dev/kvm")
	gateFD := fs.Int("gate-fd", 0, "a pipe to read a byte from before anything else (0: none)")
	var ro pathList
	fs.Var(&ro, "ro", "a file or directory bound read-only at its own path (repeatable)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	argv := fs.Args()
	if *dir == "" || !filepath.IsAbs(*dir) || *uid <= 0 || len(argv) == 0 || !filepath.IsAbs(argv[0]) {
		return fmt.Errorf("usage: %s --dir=ABSDIR --uid=N [--kvm] [--ro=PATH]... [--gate-fd=N] -- /ABS/qemu ARGS", LaunchCommand)
	}
	// The driver puts this process in its control group first.
	if err := jail.WaitGate(*gateFD); err != nil {
		return err
	}
	if err := jail.OwnNamespace(LaunchCommand, "mnt"); err != nil {
		return err
	}
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		return fmt.Errorf("make the mount namespace private: %w", err)
	}
	// Everything to bind, opened before the tmpfs hides any of it.
	type bind struct {
		path string
		fd   int
		dir  bool
		rw   bool
	}
	var binds []bind
	add := func(path string, rw bool) error {
		fd, err := unix.Open(path, unix.O_PATH|unix.O_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("%s: %w", path, err)
		}
		var st unix.Stat_t
		if err := unix.Fstat(fd, &st); err != nil {
			return err
		}
		binds = append(binds, bind{path: path, fd: fd, dir: st.Mode&unix.S_IFMT == unix.S_IFDIR, rw: rw})
		return nil
	}
	if err := add("/usr", false); err != nil {
		return err
	}
	if _, err := os.Stat("/etc/ld.so.cache"); err == nil {
		if err := add("/etc/ld.so.cache", false); err != nil {
			return err
		}
	}
	for _, p := range ro {
		if err := add(p, false); err != nil {
			return err
		}
	}
	if err := add(*dir, true); err != nil {
		return err
	}
	if err := unix.Mount("tmpfs", launchRoot, "tmpfs", unix.MS_NOSUID, "mode=0755,size=1m"); err != nil {
		return fmt.Errorf("mount the root: %w", err)
	}
	// The merged-/usr links (bin -> usr/bin...), as the host has them; a
	// host with real directories there gets them bound.
	for _, name := range []string{"bin", "sbin", "lib", "lib32", "lib64", "libx32"} {
		target, err := os.Readlink("/" + name)
		if err == nil {
			if err := os.Symlink(target, filepath.Join(launchRoot, name)); err != nil {
				return err
			}
			continue
		}
		if st, err := os.Stat("/" + name); err == nil && st.IsDir() {
			fd, err := unix.Open("/"+name, unix.O_PATH|unix.O_CLOEXEC, 0)
			if err != nil {
				return err
			}
			binds = append(binds, bind{path: "/" + name, fd: fd, dir: true})
		}
	}
	for _, b := range binds {
		dst := filepath.Join(launchRoot, b.path)
		if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
			return err
		}
		if b.dir {
			err := os.Mkdir(dst, 0o755)
			if err != nil && !errors.Is(err, os.ErrExist) {
				return err
			}
		} else if err := os.WriteFile(dst, nil, 0o644); err != nil {
			return err
		}
		src := "/proc/self/fd/" + strconv.Itoa(b.fd)
		if err := unix.Mount(src, dst, "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
			return fmt.Errorf("bind %s: %w", b.path, err)
		}
		flags := uintptr(unix.MS_BIND | unix.MS_REMOUNT | unix.MS_NOSUID | unix.MS_NODEV)
		if !b.rw {
			flags |= unix.MS_RDONLY
		}
		if err := unix.Mount("", dst, "", flags, ""); err != nil {
			return fmt.Errorf("bind %s: %w", b.path, err)
		}
		unix.Close(b.fd)
	}
	if err := makeDevices(filepath.Join(launchRoot, "dev"), *uid, *kvm); err != nil {
		return err
	}
	proc := filepath.Join(launchRoot, "proc")
	if err := os.Mkdir(proc, 0o555); err != nil {
		return err
	}
	// Its own processes only, and no /proc/sys and the like (subset=pid,
	// Linux 5.8); an older kernel hides the others' at least.
	if err := unix.Mount("proc", proc, "proc", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, "hidepid=invisible,subset=pid"); err != nil {
		if err := unix.Mount("proc", proc, "proc", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, "hidepid=2"); err != nil {
			return fmt.Errorf("mount /proc: %w", err)
		}
	}
	old := filepath.Join(launchRoot, ".old")
	if err := os.Mkdir(old, 0o700); err != nil {
		return err
	}
	if err := unix.PivotRoot(launchRoot, old); err != nil {
		return fmt.Errorf("pivot_root: %w", err)
	}
	if err := unix.Chdir("/"); err != nil {
		return err
	}
	if err := unix.Unmount("/.old", unix.MNT_DETACH); err != nil {
		return fmt.Errorf("let go of the host's root: %w", err)
	}
	if err := os.Remove("/.old"); err != nil {
		return err
	}
	if err := unix.Mount("", "/", "", unix.MS_REMOUNT|unix.MS_RDONLY|unix.MS_NOSUID, ""); err != nil {
		return fmt.Errorf("make the root read-only: %w", err)
	}
	if err := os.Chdir(*dir); err != nil {
		return err
	}
	if err := jail.DropTo(*uid); err != nil {
		return err
	}
	if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
		return fmt.Errorf("no_new_privs: %w", err)
	}
	return fmt.Errorf("exec %s: %w", argv[0], unix.Exec(argv[0], argv, os.Environ()))
}

// makeDevices makes dir with the device nodes QEMU opens, of the same
// devices as the host's; /dev/kvm belongs to uid alone.
func makeDevices(dir string, uid int, kvm bool) error {
	if err := os.Mkdir(dir, 0o755); err != nil {
		return err
	}
	nodes := []string{"null", "zero", "full", "random", "urandom"}
	if kvm {
		nodes = append(nodes, "kvm")
	}
	for _, n := range nodes {
		var st unix.Stat_t
		if err := unix.Stat("/dev/"+n, &st); err != nil {
			if n == "kvm" {
				continue // QEMU says what is missing
			}
			return fmt.Errorf("/dev/%s: %w", n, err)
		}
		node := filepath.Join(dir, n)
		if err := unix.Mknod(node, unix.S_IFCHR|0o666, int(st.Rdev)); err != nil {
			return fmt.Errorf("device node %s: %w", n, err)
		}
		// mknod's mode passes through the umask.
		mode, owner := uint32(0o666), 0
		if n == "kvm" {
			mode, owner = 0o600, uid
		}
		if err := errors.Join(unix.Chmod(node, mode), os.Chown(node, owner, owner)); err != nil {
			return err
		}
	}
	return nil
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
func (d *Driver) prepareLaunch(spec vmm.Spec, rt runtime, mem memory, uid int) (_ *launch, err error) {
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
		err = errors.Join(fh.Chown(uid, uid), fh.Close())
		if err != nil {
			return nil, fmt.Errorf("start qemu: %w", err)
		}
	}
	if spec.Net != nil {
		// QEMU connects to the network process's socket as uid.
		if err := os.Chown(spec.Net.Socket, uid, uid); err != nil {
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
	l.argv = []string{LaunchCommand, "--dir=" + spec.Dir, "--uid=" + strconv.Itoa(uid), "--gate-fd=" + strconv.Itoa(gateFD)}
	if d.accel == "kvm" {
		l.argv = append(l.argv, "--kvm")
	}
	ro := []string{spec.Kernel}
	if spec.Initrd != "" {
		ro = append(ro, spec.Initrd)
	}
	ro = append(ro, backingChain(rt.Disk)...)
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

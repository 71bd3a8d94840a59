package jail

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"

	"golang.org/x/sys/unix"
)

// Root is the file system a VMM launcher moves its VMM into: a read-only
// tmpfs holding only what is bound into it, device nodes of the host's
// devices and a /proc that shows the jail user's own processes. Every
// launcher builds one in a mount namespace of its own, as root, before it
// drops to the VM's user; the host's root is gone from the namespace once
// it has entered.
type Root struct {
	binds []bind
}

type bind struct {
	dst string
	fd  int // O_PATH, opened when added: the tmpfs may later hide the path
	dir bool
	rw  bool
}

// rootBuild is where the root is put together: any directory every host
// has will do, as a tmpfs covers it in the launcher's namespace only.
const rootBuild = "/tmp"

// Bind adds src, a file or directory of the host, at dst in the root,
// read-only unless rw. src is opened now, through its links.
func (r *Root) Bind(src, dst string, rw bool) error {
	if !filepath.IsAbs(dst) || filepath.Clean(dst) != dst || dst == "/" {
		return fmt.Errorf("jail: bind %s at %q: not a clean absolute path", src, dst)
	}
	fd, err := unix.Open(src, unix.O_PATH|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("jail: %s: %w", src, err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		unix.Close(fd)
		return fmt.Errorf("jail: %s: %w", src, err)
	}
	r.binds = append(r.binds, bind{dst: dst, fd: fd, dir: st.Mode&unix.S_IFMT == unix.S_IFDIR, rw: rw})
	return nil
}

// HostLibraries adds what a dynamically linked program of the host needs
// to run: /usr (programs, libraries, firmware), the loader's cache and the
// top-level directories of a host that has them (bin, lib...), or links
// to /usr where it has merged them.
func (r *Root) HostLibraries() error {
	if err := r.Bind("/usr", "/usr", false); err != nil {
		return err
	}
	if _, err := os.Stat("/etc/ld.so.cache"); err == nil {
		if err := r.Bind("/etc/ld.so.cache", "/etc/ld.so.cache", false); err != nil {
			return err
		}
	}
	for _, name := range []string{"bin", "sbin", "lib", "lib32", "lib64", "libx32"} {
		if _, err := os.Readlink("/" + name); err == nil {
			// A link: made as a link in Enter.
			r.binds = append(r.binds, bind{dst: "/" + name, fd: -1})
			continue
		}
		if st, err := os.Stat("/" + name); err == nil && st.IsDir() {
			if err := r.Bind("/"+name, "/"+name, false); err != nil {
				return err
			}
		}
	}
	return nil
}

// Close lets go of what was opened to bind, when the root is not entered.
func (r *Root) Close() {
	for _, b := range r.binds {
		if b.fd >= 0 {
			unix.Close(b.fd)
		}
	}
	r.binds = nil
}

// Device is a device node the root gets in /dev, of the host's device at
// the same path; Owner's alone (mode 0600) when Owner is not 0.
type Device struct {
	Name  string // under /dev: "kvm", "net/tun"
	Owner int
	// Optional devices the host lacks are left out: the VMM says what is
	// missing in its own words.
	Optional bool
}

// StandardDevices are the nodes every VMM may open: null, zero, full,
// random and urandom.
func StandardDevices() []Device {
	var ds []Device
	for _, n := range []string{"null", "zero", "full", "random", "urandom"} {
		ds = append(ds, Device{Name: n})
	}
	return ds
}

// Enter builds the root with devs in /dev, moves the calling process into
// it (pivot_root) and makes it read-only; the process's working directory
// becomes /. The process must be root in a mount namespace of its own.
func (r *Root) Enter(launcher string, devs []Device) error {
	defer r.Close()
	if err := OwnNamespace(launcher, "mnt"); err != nil {
		return err
	}
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		return fmt.Errorf("make the mount namespace private: %w", err)
	}
	if err := unix.Mount("tmpfs", rootBuild, "tmpfs", unix.MS_NOSUID, "mode=0755,size=1m"); err != nil {
		return fmt.Errorf("mount the root: %w", err)
	}
	for _, b := range r.binds {
		dst := filepath.Join(rootBuild, b.dst)
		if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
			return err
		}
		if b.fd < 0 {
			target, err := os.Readlink(b.dst)
			if err != nil {
				return err
			}
			if err := os.Symlink(target, dst); err != nil {
				return err
			}
			continue
		}
		if b.dir {
			if err := os.Mkdir(dst, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
				return err
			}
		} else if err := os.WriteFile(dst, nil, 0o644); err != nil {
			return err
		}
		src := "/proc/self/fd/" + strconv.Itoa(b.fd)
		if err := unix.Mount(src, dst, "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
			return fmt.Errorf("bind %s: %w", b.dst, err)
		}
		flags := uintptr(unix.MS_BIND | unix.MS_REMOUNT | unix.MS_NOSUID | unix.MS_NODEV)
		if !b.rw {
			flags |= unix.MS_RDONLY
		}
		if err := unix.Mount("", dst, "", flags, ""); err != nil {
			return fmt.Errorf("bind %s: %w", b.dst, err)
		}
	}
	if err := makeDevices(filepath.Join(rootBuild, "dev"), devs); err != nil {
		return err
	}
	proc := filepath.Join(rootBuild, "proc")
	if err := os.Mkdir(proc, 0o555); err != nil {
		return err
	}
	// Its own processes only (the VMM reaches what it was handed as
	// /proc/self/fd/N), and no /proc/sys and the like (subset=pid, Linux
	// 5.8); an older kernel hides the others' at least.
	if err := unix.Mount("proc", proc, "proc", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, "hidepid=invisible,subset=pid"); err != nil {
		if err := unix.Mount("proc", proc, "proc", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, "hidepid=2"); err != nil {
			return fmt.Errorf("mount /proc: %w", err)
		}
	}
	old := filepath.Join(rootBuild, ".old")
	if err := os.Mkdir(old, 0o700); err != nil {
		return err
	}
	if err := unix.PivotRoot(rootBuild, old); err != nil {
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
	return nil
}

// makeDevices makes dir with nodes of the host's devices devs.
func makeDevices(dir string, devs []Device) error {
	if err := os.Mkdir(dir, 0o755); err != nil {
		return err
	}
	for _, d := range devs {
		host := filepath.Join("/dev", d.Name)
		var st unix.Stat_t
		if err := unix.Stat(host, &st); err != nil {
			if d.Optional {
				continue
			}
			return fmt.Errorf("%s: %w", host, err)
		}
		if st.Mode&unix.S_IFMT != unix.S_IFCHR {
			return fmt.Errorf("%s is not a character device", host)
		}
		node := filepath.Join(dir, d.Name)
		if err := os.MkdirAll(filepath.Dir(node), 0o755); err != nil {
			return err
		}
		if err := unix.Mknod(node, unix.S_IFCHR|0o600, int(st.Rdev)); err != nil {
			return fmt.Errorf("device node %s: %w", d.Name, err)
		}
		// mknod's mode passes through the umask.
		mode := uint32(0o666)
		if d.Owner != 0 {
			mode = 0o600
		}
		if err := errors.Join(unix.Chmod(node, mode), os.Chown(node, d.Owner, d.Owner)); err != nil {
			return err
		}
	}
	return nil
}

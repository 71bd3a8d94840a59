package agent

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/smolvm/smolvm/internal/agent/wire"
)

const (
	modulesOrder = "/smolvm/modules.order"
	modulesDir   = "/smolvm/modules"
	newRoot      = "/newroot"
	rootDevice   = "/dev/vda"
)

// bootParams are read from the kernel command line (smolvm.KEY=VALUE).
type bootParams struct {
	hostname string
	rootFS   string
	probe    string
	net      *netParams // nil: no network interface
	netErr   error
	mounts   []wire.Mount // host directories to mount, in order
	mountErr []error      // malformed smolvm.mount parameters
	// resetToPowerOff (smolvm.poweroff=reset) powers off by resetting.
	resetToPowerOff bool
}

func readBootParams() bootParams {
	p := bootParams{hostname: "smolvm", rootFS: "ext4"}
	b, err := os.ReadFile("/proc/cmdline")
	if err != nil {
		return p
	}
	for _, f := range strings.Fields(string(b)) {
		k, v, ok := strings.Cut(f, "=")
		if !ok {
			continue
		}
		switch k {
		case "smolvm.hostname":
			p.hostname = v
		case "smolvm.rootfs":
			p.rootFS = v
		case "smolvm.probe":
			p.probe = v
		case "smolvm.poweroff":
			p.resetToPowerOff = v == "reset"
		case "smolvm.net":
			p.net, p.netErr = parseNetParam(v)
		case wire.MountKey:
			if m, err := wire.ParseMount(v); err != nil {
				p.mountErr = append(p.mountErr, err)
			} else {
				p.mounts = append(p.mounts, m)
			}
		}
	}
	return p
}

// mountEarly gives the initramfs the kernel interfaces it needs to load
// modules and find the disk.
func mountEarly() error {
	for _, m := range []struct{ src, dst, fs string }{
		{"devtmpfs", "/dev", "devtmpfs"},
		{"proc", "/proc", "proc"},
		{"sysfs", "/sys", "sysfs"},
	} {
		if err := os.MkdirAll(m.dst, 0o755); err != nil {
			return err
		}
		if err := unix.Mount(m.src, m.dst, m.fs, unix.MS_NOSUID|unix.MS_NOEXEC, ""); err != nil && err != unix.EBUSY {
			return fmt.Errorf("mount %s: %w", m.dst, err)
		}
	}
	return nil
}

// loadModules loads the modules the host listed, in the host's order (which
// puts every dependency before its dependents).
func loadModules() error {
	f, err := os.Open(modulesOrder)
	if os.IsNotExist(err) {
		return nil
	}
	if err != nil {
		return err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		name := strings.TrimSpace(sc.Text())
		if name == "" {
			continue
		}
		if err := loadModule(filepath.Join(modulesDir, name)); err != nil {
			return err
		}
	}
	return sc.Err()
}

func loadModule(path string) error {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open module %s: %w", path, err)
	}
	defer unix.Close(fd)
	if err := unix.FinitModule(fd, "", 0); err != nil && err != unix.EEXIST {
		return fmt.Errorf("load module %s: %w", filepath.Base(path), err)
	}
	return nil
}

func waitForFile(path string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		if _, err := os.Stat(path); err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s did not appear within %s", path, timeout)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// rootOptions are the root filesystem's mount options, the first this
// kernel takes. ext4 starts a kernel thread after mount that zeroes the
// inode tables mkfs left alone and reads every block bitmap ahead; in a
// template's clone it carries on where the template was saved, in every
// clone, reading and writing each clone's disk. noinit_itable leaves the
// tables as they are (ext4 keeps track, e2fsck accepts it) and
// no_prefetch_block_bitmaps reads a bitmap when it is needed; kernels
// before 5.9 know only the first.
func rootOptions(fs string) []string {
	if fs == "ext4" {
		return []string{"noinit_itable,no_prefetch_block_bitmaps", "noinit_itable", ""}
	}
	return []string{""}
}

// switchRoot mounts the sandbox disk and makes it "/", carrying the early
// mounts along, as switch_root(8) does.
func switchRoot(fs string) error {
	if err := waitForFile(rootDevice, 10*time.Second); err != nil {
		return err
	}
	if err := os.MkdirAll(newRoot, 0o755); err != nil {
		return err
	}
	var err error
	for _, opts := range rootOptions(fs) {
		if err = unix.Mount(rootDevice, newRoot, fs, 0, opts); err != unix.EINVAL {
			break
		}
	}
	if err != nil {
		return fmt.Errorf("mount root disk %s: %w", rootDevice, err)
	}
	if err := growRootFS(newRoot, rootDevice); err != nil {
		logf("grow root filesystem: %v", err)
	}
	for _, d := range []string{"/dev", "/proc", "/sys"} {
		dst := newRoot + d
		if err := os.MkdirAll(dst, 0o755); err != nil {
			return err
		}
		if err := unix.Mount(d, dst, "", unix.MS_MOVE, ""); err != nil {
			return fmt.Errorf("move %s: %w", d, err)
		}
	}
	// The initramfs stays in RAM after the switch; free what it held.
	os.RemoveAll("/smolvm")
	os.Remove("/init")
	if err := unix.Chdir(newRoot); err != nil {
		return err
	}
	if err := unix.Mount(".", "/", "", unix.MS_MOVE, ""); err != nil {
		return fmt.Errorf("move root: %w", err)
	}
	if err := unix.Chroot("."); err != nil {
		return fmt.Errorf("chroot: %w", err)
	}
	return unix.Chdir("/")
}

// growRootFS grows the mounted ext4 filesystem online to fill its device,
// which the host made as large as the sandbox's disk_size.
func growRootFS(mnt, dev string) error {
	size, err := deviceSize(dev)
	if err != nil {
		return err
	}
	var st unix.Statfs_t
	if err := unix.Statfs(mnt, &st); err != nil {
		return err
	}
	blocks := size / uint64(st.Bsize)
	if blocks <= st.Blocks {
		return nil
	}
	dir, err := unix.Open(mnt, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(dir)
	const ext4IocResizeFS = 0x40086610 // _IOW('f', 16, __u64)
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(dir), ext4IocResizeFS, uintptr(unsafe.Pointer(&blocks))); errno != 0 {
		return fmt.Errorf("EXT4_IOC_RESIZE_FS to %d blocks: %w", blocks, errno)
	}
	return nil
}

func deviceSize(dev string) (uint64, error) {
	fd, err := unix.Open(dev, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return 0, err
	}
	defer unix.Close(fd)
	var size uint64
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.BLKGETSIZE64, uintptr(unsafe.Pointer(&size))); errno != 0 {
		return 0, fmt.Errorf("size of %s: %w", dev, errno)
	}
	return size, nil
}

// prepareRoot sets up what programs expect of a running Linux system.
func prepareRoot(p bootParams) {
	mounts := []struct {
		src, dst, fs string
		flags        uintptr
		data         string
	}{
		{"devpts", "/dev/pts", "devpts", unix.MS_NOSUID | unix.MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620,gid=5"},
		{"tmpfs", "/dev/shm", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=1777"},
		{"tmpfs", "/run", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=0755"},
		{"cgroup2", "/sys/fs/cgroup", "cgroup2", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, ""},
	}
	for _, m := range mounts {
		if err := os.MkdirAll(m.dst, 0o755); err != nil {
			logf("mkdir %s: %v", m.dst, err)
			continue
		}
		if err := unix.Mount(m.src, m.dst, m.fs, m.flags, m.data); err != nil {
			logf("mount %s: %v", m.dst, err)
		}
	}
	// devtmpfs lacks the conventional links that shells rely on.
	for link, target := range map[string]string{
		"/dev/fd": "/proc/self/fd", "/dev/stdin": "/proc/self/fd/0",
		"/dev/stdout": "/proc/self/fd/1", "/dev/stderr": "/proc/self/fd/2",
		"/dev/ptmx": "pts/ptmx",
	} {
		os.Remove(link)
		if err := os.Symlink(target, link); err != nil {
			logf("link %s: %v", link, err)
		}
	}
	if err := os.MkdirAll("/tmp", 0o1777); err == nil {
		os.Chmod("/tmp", 0o1777)
	}
	for _, d := range []string{"/run/lock", "/var/tmp"} {
		os.MkdirAll(d, 0o1777)
	}
	if err := unix.Sethostname([]byte(p.hostname)); err != nil {
		logf("sethostname: %v", err)
	}
	writeIfChanged("/etc/hostname", p.hostname+"\n")
	writeIfChanged("/etc/hosts", hostsFile(p.hostname))
	if _, err := os.Stat("/etc/resolv.conf"); err != nil {
		// No network yet: an empty resolver config keeps lookups failing
		// fast instead of timing out on a nameserver nobody runs.
		os.Remove("/etc/resolv.conf") // may be a dangling link
		writeIfChanged("/etc/resolv.conf", "# no network configured\n")
	}
	if err := loopbackUp(); err != nil {
		logf("bring up lo: %v", err)
	}
	if p.netErr != nil {
		logf("network: %v", p.netErr)
	}
	if p.net != nil {
		if err := configureNetwork(p.net); err != nil {
			logf("network: %v", err)
		}
	}
}

func hostsFile(hostname string) string {
	return "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t" + hostname + "\n"
}

func writeIfChanged(path, content string) {
	old, rerr := os.ReadFile(path)
	if rerr == nil && string(old) == content {
		return
	}
	// Rewritten in place, not truncated to nothing first: in a clone just
	// restored, the truncating write cost three times as much (about
	// 20 ms more per file under emulation, timed in the agent). Cut only
	// what is left over: ext4 runs its whole truncate path (journal,
	// orphan list, extent walk) even for a size that does not change.
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE, 0o644)
	if err == nil {
		_, err = f.WriteAt([]byte(content), 0)
		if err == nil && (rerr != nil || len(content) < len(old)) {
			err = f.Truncate(int64(len(content)))
		}
		err = errors.Join(err, f.Close())
	}
	if err != nil {
		logf("write %s: %v", path, err)
	}
}

func loopbackUp() error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	ifr, err := unix.NewIfreq("lo")
	if err != nil {
		return err
	}
	if err := unix.IoctlIfreq(fd, unix.SIOCGIFFLAGS, ifr); err != nil {
		return err
	}
	ifr.SetUint16(ifr.Uint16() | unix.IFF_UP)
	return unix.IoctlIfreq(fd, unix.SIOCSIFFLAGS, ifr)
}

func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "smolvm-agent: "+format+"\n", args...)
}

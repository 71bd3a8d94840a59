package firecracker

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"strconv"
	"syscall"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/smolvm/smolvm/internal/jail"
)

// The driver's two helper processes are subcommands of a helper binary
// (smolvm-jail), since a process must be running to hold a namespace or a
// relay after the server that started it is gone:
//
//	fc-launch  sets up one VM's namespaces and becomes its Firecracker
//	tap-relay  carries Ethernet frames between the VM's TAP device and
//	           its network process's stream socket
const (
	LaunchCommand = "fc-launch"
	RelayCommand  = "tap-relay"
)

// Subcommands are the hidden subcommands Main runs.
var Subcommands = []string{LaunchCommand, RelayCommand}

// Main runs the subcommand args[0] (one of Subcommands) with the rest of
// args. fc-launch returns only on failure: it becomes Firecracker.
func Main(args []string) error {
	if len(args) == 0 {
		return errors.New("no subcommand")
	}
	switch args[0] {
	case LaunchCommand:
		return launchMain(args[1:])
	case RelayCommand:
		ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
		defer stop()
		return relayMain(ctx, args[1:])
	}
	return fmt.Errorf("unknown subcommand %q", args[0])
}

// Where Firecracker sees its files. Every Firecracker runs in a root of
// its own (jail.Root) that holds the sandbox's directory at vmDir, the
// device nodes it opens and a /proc of its own processes, and nothing
// else of the host: no binary, library or file it was not given. Every
// path Firecracker is given, and so every path a snapshot records (the
// drive, the vsock socket), is under vmDir: a clone restored from a
// template sees its own disk and socket at the paths the template's
// recorded, whatever the template's directory was called when it was
// saved and wherever the clone's is. The host never sees these mounts.
const vmDir = "/run/smolvm-firecracker/vm"

// tapName is the guest's TAP device in its VM's network namespace: each
// namespace has its own, so every VM (and every snapshot) names the same.
const tapName = "tap0"

// tapMTU is the TAP device's MTU, the largest a TAP takes (65535 less
// its Ethernet header): the relay sends each frame from the network
// process through it whole, and the guest's link carries up to
// 65520-byte packets.
const tapMTU = 65521

// launchMain is fc-launch. It is started by the driver, as root, in new
// mount and network namespaces, with Firecracker's binary open on
// --exec-fd, and, once the driver opens --gate-fd:
//   - with --tap, makes the TAP device, owned by --uid;
//   - moves into a root of its own (jail.Root) with --dir at vmDir,
//     /dev/kvm (and /dev/net/tun) of --uid's own, and, with --host-libs,
//     the host's libraries for a Firecracker that is not linked
//     statically;
//   - drops root for --uid (no supplementary groups), sets no_new_privs,
//     and executes Firecracker with the arguments after "--".
func launchMain(args []string) error {
	// no_new_privs belongs to a thread; the one that sets it must be the
	// one that executes Firecracker.
	runtime.LockOSThread()
	fs := flag.NewFlagSet(LaunchCommand, flag.ContinueOnError)
	dir := fs.String("dir", "", "the sandbox directory, bound at "+vmDir)
	fs.String("id", "", "the VM's marker (names the process)")
	uid := fs.Int("uid", 0, "the user Firecracker runs as (0: root)")
	tap := fs.String("tap", "", "the TAP device to make in the network namespace")
	execFD := fs.Int("exec-fd", 4, "Firecracker's binary, open")
	gateFD := fs.Int("gate-fd", 0, "a pipe to read a byte from before anything else (0: none)")
	hostLibs := fs.Bool("host-libs", false, "give Firecracker the host's libraries (a dynamically linked build)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if err := jail.WaitGate(*gateFD); err != nil {
		return err
	}
	argv := fs.Args()
	if *dir == "" || !filepath.IsAbs(*dir) || len(argv) == 0 {
		return fmt.Errorf("usage: %s --dir=ABSDIR [--uid=N] [--tap=NAME] [--host-libs] [--gate-fd=N] [--exec-fd=N] -- firecracker ARGS", LaunchCommand)
	}
	// What follows changes mounts and links: they must not be the host's.
	for _, kind := range []string{"mnt", "net"} {
		if err := jail.OwnNamespace(LaunchCommand, kind); err != nil {
			return err
		}
	}
	if *tap != "" {
		// Before the root is left: it writes to the namespace's /proc/sys.
		if err := makeTap(*tap, *uid); err != nil {
			return err
		}
	}
	var root jail.Root
	if *hostLibs {
		if err := root.HostLibraries(); err != nil {
			return err
		}
	}
	if err := root.Bind(*dir, vmDir, true); err != nil {
		return err
	}
	devs := append(jail.StandardDevices(), jail.Device{Name: "kvm", Owner: *uid, Optional: true})
	if *tap != "" {
		devs = append(devs, jail.Device{Name: "net/tun", Owner: *uid})
	}
	if err := root.Enter(LaunchCommand, devs); err != nil {
		return err
	}
	if err := os.Chdir(vmDir); err != nil {
		return err
	}
	if *uid != 0 {
		if err := jail.DropTo(*uid); err != nil {
			return err
		}
	}
	if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
		return fmt.Errorf("no_new_privs: %w", err)
	}
	// Through the descriptor: the root holds no binary. The environment
	// is the one the driver gave fc-launch (Options.Env).
	bin := "/proc/self/fd/" + strconv.Itoa(*execFD)
	return fmt.Errorf("exec firecracker: %w", unix.Exec(bin, argv, os.Environ()))
}

// makeTap makes the persistent TAP device name, owned by uid, with no
// IPv6 (the namespace's kernel must not talk on the guest's link), and
// brings it up. The namespace goes when its last process does, and the
// device with it.
func makeTap(name string, uid int) error {
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("tap: %w", err)
	}
	defer unix.Close(fd)
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		return fmt.Errorf("tap: %w", err)
	}
	ifr.SetUint16(unix.IFF_TAP | unix.IFF_NO_PI)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		return fmt.Errorf("tap %s: %w", name, err)
	}
	if uid != 0 {
		if err := unix.IoctlSetInt(fd, unix.TUNSETOWNER, uid); err != nil {
			return fmt.Errorf("tap %s owner: %w", name, err)
		}
		if err := unix.IoctlSetInt(fd, unix.TUNSETGROUP, uid); err != nil {
			return fmt.Errorf("tap %s group: %w", name, err)
		}
	}
	if err := unix.IoctlSetInt(fd, unix.TUNSETPERSIST, 1); err != nil {
		return fmt.Errorf("tap %s: %w", name, err)
	}
	// /proc/sys/net is the reading process's namespace's.
	if err := os.WriteFile("/proc/sys/net/ipv6/conf/"+name+"/disable_ipv6", []byte("1"), 0); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("tap %s: disable IPv6: %w", name, err)
	}
	link, err := netlink.LinkByName(name)
	if err != nil {
		return fmt.Errorf("tap %s: %w", name, err)
	}
	if err := netlink.LinkSetMTU(link, tapMTU); err != nil {
		return fmt.Errorf("tap %s: MTU: %w", name, err)
	}
	if err := netlink.LinkSetUp(link); err != nil {
		return fmt.Errorf("tap %s: up: %w", name, err)
	}
	return nil
}

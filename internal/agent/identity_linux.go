package agent

import (
	"fmt"
	"os"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/smolvm/smolvm/internal/agent/agentpb"
)

// RNDADDENTROPY and RNDRESEEDCRNG from <linux/random.h>.
const (
	rndAddEntropy  = 0x40085203
	rndReseedCRNG  = 0x5207
	entropyMaxSeed = 512
)

// ApplyIdentity turns a VM restored from a template into a sandbox of its
// own: name, machine id, clock, random state and disk size.
func (guestSystem) ApplyIdentity(id *agentpb.SetIdentityRequest) error {
	if id.UnixNano != 0 {
		ts := unix.NsecToTimespec(id.UnixNano)
		if err := unix.ClockSettime(unix.CLOCK_REALTIME, &ts); err != nil {
			return fmt.Errorf("set clock: %w", err)
		}
	}
	if err := reseed(id.Seed); err != nil {
		return err
	}
	if id.Hostname != "" {
		if err := unix.Sethostname([]byte(id.Hostname)); err != nil {
			return fmt.Errorf("sethostname: %w", err)
		}
		writeIfChanged("/etc/hostname", id.Hostname+"\n")
		writeIfChanged("/etc/hosts", hostsFile(id.Hostname))
	}
	if id.MachineId != "" {
		writeIfChanged("/etc/machine-id", id.MachineId+"\n")
	}
	if id.DiskBytes > 0 {
		if err := waitDiskSize(rootDevice, uint64(id.DiskBytes), 5*time.Second); err != nil {
			return err
		}
		if err := growRootFS("/", rootDevice); err != nil {
			return fmt.Errorf("grow root filesystem: %w", err)
		}
	}
	return nil
}

// reseed credits seed to the kernel's input pool and forces the CRNG to
// reseed from it at once, so output after this differs from every sibling
// restored from the same memory image.
func reseed(seed []byte) error {
	if len(seed) == 0 {
		return fmt.Errorf("identity without a random seed")
	}
	if len(seed) > entropyMaxSeed {
		seed = seed[:entropyMaxSeed]
	}
	buf := make([]byte, 8+len(seed))
	*(*int32)(unsafe.Pointer(&buf[0])) = int32(len(seed) * 8)
	*(*int32)(unsafe.Pointer(&buf[4])) = int32(len(seed))
	copy(buf[8:], seed)
	f, err := os.OpenFile("/dev/urandom", os.O_WRONLY, 0)
	if err != nil {
		return fmt.Errorf("open /dev/urandom: %w", err)
	}
	defer f.Close()
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), rndAddEntropy, uintptr(unsafe.Pointer(&buf[0]))); errno != 0 {
		return fmt.Errorf("RNDADDENTROPY: %w", errno)
	}
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), rndReseedCRNG, 0); errno != 0 {
		return fmt.Errorf("RNDRESEEDCRNG: %w", errno)
	}
	return nil
}

func waitDiskSize(dev string, want uint64, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		size, err := deviceSize(dev)
		if err != nil {
			return err
		}
		if size >= want {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s reports %d bytes, not the %d the host set", dev, size, want)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

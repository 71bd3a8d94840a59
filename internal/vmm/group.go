package vmm

import (
	"crypto/sha256"
	"encoding/hex"
	"log/slog"
	"time"

	"github.com/smolvm/smolvm/internal/cgroup"
)

// AllowanceMiB is what a VMM may hold besides its guest's memory: TCG's
// 64 MiB code buffer, the VMM's heap, libraries and device threads, and
// the page cache its files bring in. Measured, an idle 512 MiB clone's
// QEMU holds about 100 MiB in all.
const AllowanceMiB = 256

// Tasks bounds a VMM's threads: one per vCPU, the VMM's own, and a block
// I/O pool of up to 64.
const Tasks = 256

// DiskIO caps a VMM's disk I/O, per second, each way; a zero field takes
// the default (DefaultDiskBPS, DefaultDiskIOPS), and NoCap leaves that
// one uncapped.
type DiskIO struct {
	ReadBPS, WriteBPS   uint64
	ReadIOPS, WriteIOPS uint64
}

// The default caps keep one sandbox from taking the whole of a host disk
// while leaving it the speed of a good SSD: a guest's disk is a file on
// the host's, and without a cap one guest copying files in a loop slows
// every other sandbox and the host itself.
const (
	DefaultDiskBPS  = 256 << 20
	DefaultDiskIOPS = 8192
)

// NoCap in a DiskIO field leaves that direction uncapped.
const NoCap = ^uint64(0)

// orDefault fills d's zero fields with the defaults.
func (d DiskIO) orDefault() DiskIO {
	pick := func(v, dv uint64) uint64 {
		switch v {
		case 0:
			return dv
		case NoCap:
			return 0 // cgroup.DeviceIO's "no cap"
		}
		return v
	}
	return DiskIO{
		ReadBPS: pick(d.ReadBPS, DefaultDiskBPS), WriteBPS: pick(d.WriteBPS, DefaultDiskBPS),
		ReadIOPS: pick(d.ReadIOPS, DefaultDiskIOPS), WriteIOPS: pick(d.WriteIOPS, DefaultDiskIOPS),
	}
}

// Limits are what spec's VMM may use, in the control group every driver
// puts its VMM in when it runs as root: its memory, tasks and CPU share,
// and its I/O on the disk that holds its directory (its disk image and
// memory files), where that is a block device of the host's.
func Limits(spec Spec) cgroup.Limits {
	mem := spec.MemoryLimitMiB
	if mem == 0 {
		mem = spec.MemoryMiB + AllowanceMiB
	}
	l := cgroup.Limits{MemoryBytes: int64(mem) << 20, Tasks: Tasks, CPUWeight: 100 * max(1, spec.VCPUs)}
	if major, minor, ok := cgroup.DiskOf(spec.Dir); ok {
		io := spec.DiskIO.orDefault()
		l.IO = []cgroup.DeviceIO{{Major: major, Minor: minor, ReadBPS: io.ReadBPS, WriteBPS: io.WriteBPS, ReadIOPS: io.ReadIOPS, WriteIOPS: io.WriteIOPS}}
	}
	return l
}

// GroupName is a control group name unique to the machine in spec.Dir:
// ids alone repeat across data directories.
func GroupName(spec Spec) string {
	sum := sha256.Sum256([]byte(spec.Dir))
	return spec.ID + "." + hex.EncodeToString(sum[:4])
}

// groupRelease is how long DropGroup waits for the kernel to let go.
const groupRelease = 5 * time.Second

// DropGroup removes an ended VMM's control group. The kernel lets go of a
// group only once its last task is reaped, a moment after the process is
// gone (and longer when its parent is busy), so the removal is retried
// briefly; a group still busy then is left to the sweep at the next start,
// and logged, rather than failing the caller.
func DropGroup(h cgroup.Hierarchy, name string) {
	g := cgroup.Open(h, name)
	deadline := time.Now().Add(groupRelease)
	for {
		err := g.Remove()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			slog.Warn("the control group of an ended VM is still busy; the next start sweeps it", "group", name, "err", err)
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
}

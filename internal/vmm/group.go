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

// Limits are what spec's VMM may use, in the control group every driver
// puts its VMM in when it runs as root.
func Limits(spec Spec) cgroup.Limits {
	mem := spec.MemoryLimitMiB
	if mem == 0 {
		mem = spec.MemoryMiB + AllowanceMiB
	}
	return cgroup.Limits{MemoryBytes: int64(mem) << 20, Tasks: Tasks, CPUWeight: 100 * max(1, spec.VCPUs)}
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

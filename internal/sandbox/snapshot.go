package sandbox

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"time"

	"github.com/smolvm/smolvm/internal/image"
	"github.com/smolvm/smolvm/internal/store"
	"github.com/smolvm/smolvm/internal/vmm"
)

// Snapshot is a sandbox saved whole, memory, devices and disk, at one
// moment. Sandboxes created from it are forks: they go on from that
// moment, each with an identity of its own.
type Snapshot struct {
	ID   string `json:"id"`
	Name string `json:"name,omitempty"`
	// Sandbox is the id of the sandbox it was taken of.
	Sandbox   string `json:"sandbox"`
	Backend   string `json:"backend"`
	OS        string `json:"os"`
	Image     string `json:"image"`
	MemoryMiB int    `json:"memory"`
	VCPUs     int    `json:"vcpus"`
	DiskMiB   int    `json:"disk_size"`
	// Network says whether the saved machine has a network interface;
	// its forks must have one too, or none.
	Network bool `json:"network"`
	// Kernel and Initrd are what the saved machine booted; a fork needs
	// the same.
	Kernel    string    `json:"kernel"`
	Initrd    string    `json:"initrd"`
	CreatedAt time.Time `json:"created_at"`
	SizeBytes int64     `json:"size_bytes"`
	Dir       string    `json:"-"`
}

const snapshotMeta = "snapshot.json"

// SnapshotRequest asks for a snapshot of a running or paused sandbox.
type SnapshotRequest struct {
	// Name, when set, is unique among snapshots and works wherever the
	// snapshot's id does.
	Name string
	// Stop stops the sandbox once it is saved; otherwise it goes on
	// running (or stays paused).
	Stop bool
}

func snapshotNotFound(ref string) error {
	return &Error{Kind: KindNotFound, Code: "snapshot_not_found", Message: fmt.Sprintf("no snapshot %q", ref)}
}

// checkpointer is rec's driver as a Checkpointer.
func (m *Manager) checkpointer(rec store.Record) (vmm.Checkpointer, vmm.Machine, error) {
	drv, mach, err := m.l.machine(rec)
	if err != nil {
		return nil, nil, err
	}
	cp, ok := drv.(vmm.Checkpointer)
	if !ok {
		return nil, nil, &Error{Kind: KindUnavailable, Code: "unsupported",
			Message: fmt.Sprintf("backend %s cannot snapshot a running sandbox", rec.Backend)}
	}
	return cp, mach, nil
}

// CreateSnapshot saves the sandbox's memory, devices and disk. The sandbox
// stands still while it is saved and then goes on as it was (running or
// paused), unless req.Stop asks that it stop.
func (m *Manager) CreateSnapshot(ctx context.Context, id string, req SnapshotRequest) (Snapshot, error) {
	if req.Name != "" {
		if err := CheckName("name", req.Name); err != nil {
			return Snapshot{}, err
		}
		if strings.HasPrefix(req.Name, "snap-") {
			return Snapshot{}, invalid("invalid_name", "name", "name %q may not start with \"snap-\", which snapshot ids use", req.Name)
		}
	}
	root := m.opts.DataDir.Snapshots()
	if err := os.MkdirAll(root, 0o755); err != nil {
		return Snapshot{}, fmt.Errorf("create snapshot directory: %w", err)
	}
	var snap Snapshot
	err := m.locked(ctx, id, func(rec store.Record) error {
		if rec.Status != StatusRunning && rec.Status != StatusPaused {
			return wrongState(rec, "snapshotted")
		}
		if len(readConfig(rec).Mounts) > 0 {
			return &Error{Kind: KindUnavailable, Code: "unsupported",
				Message: fmt.Sprintf("sandbox %s shares host directories; a snapshot cannot hold them", rec.ID)}
		}
		cp, mach, err := m.checkpointer(rec)
		if err != nil {
			return err
		}
		// Names are taken under one lock so two snapshots cannot both
		// take one.
		unlock, err := lockFile(ctx, filepath.Join(root, ".lock"))
		if err != nil {
			return err
		}
		defer unlock()
		if req.Name != "" {
			if _, err := m.snapshot(req.Name); err == nil {
				return &Error{Kind: KindConflict, Code: "name_taken", Field: "name",
					Message: fmt.Sprintf("a snapshot named %q exists already", req.Name)}
			}
		}
		snap, err = m.checkpoint(ctx, cp, mach, rec, req.Name)
		if err != nil {
			return err
		}
		if req.Stop {
			return m.stop(ctx, rec, DefaultStopTimeout)
		}
		return nil
	})
	return snap, err
}

// checkpoint writes the snapshot into a directory of its own, complete or
// not at all.
func (m *Manager) checkpoint(ctx context.Context, cp vmm.Checkpointer, mach vmm.Machine, rec store.Record, name string) (Snapshot, error) {
	root := m.opts.DataDir.Snapshots()
	tmp, err := os.MkdirTemp(root, ".s")
	if err != nil {
		return Snapshot{}, fmt.Errorf("create snapshot directory: %w", err)
	}
	defer os.RemoveAll(tmp) // gone once renamed
	start := time.Now()
	if err := cp.Checkpoint(ctx, mach, tmp); err != nil {
		return Snapshot{}, fmt.Errorf("snapshot sandbox %s: %w", rec.ID, err)
	}
	ir := readImageRecord(rec.Dir)
	if err := copyFile(imageRecordPath(rec.Dir), imageRecordPath(tmp)); err != nil {
		return Snapshot{}, fmt.Errorf("snapshot sandbox %s: %w", rec.ID, err)
	}
	a, err := m.l.assets(ctx, ir.Source, rec.DiskSizeMiB, nil)
	if err != nil {
		return Snapshot{}, err
	}
	snap := Snapshot{
		ID: "snap-" + randomHex(4), Name: name, Sandbox: rec.ID,
		Backend: rec.Backend, OS: rec.OS, Image: rec.Image,
		MemoryMiB: rec.MemoryMiB, VCPUs: rec.VCPUs, DiskMiB: rec.DiskSizeMiB,
		Network: readNet(rec).Policy.Enabled(),
		Kernel:  a.kernel.Version, Initrd: filepath.Base(a.initrd),
		CreatedAt: time.Now().UTC(), SizeBytes: diskUsage(tmp),
	}
	meta, _ := json.MarshalIndent(snap, "", "  ")
	if err := os.WriteFile(filepath.Join(tmp, snapshotMeta), meta, 0o444); err != nil {
		return Snapshot{}, fmt.Errorf("record snapshot: %w", err)
	}
	snap.Dir = filepath.Join(root, snap.ID)
	if err := os.Rename(tmp, snap.Dir); err != nil {
		return Snapshot{}, fmt.Errorf("record snapshot: %w", err)
	}
	m.opts.Logger.Info("snapshot taken", "sandbox", rec.ID, "snapshot", snap.ID, "bytes", snap.SizeBytes, "ms", time.Since(start).Milliseconds())
	return snap, nil
}

// diskUsage is what the files in dir take on disk.
func diskUsage(dir string) int64 {
	var n int64
	entries, _ := os.ReadDir(dir)
	for _, e := range entries {
		if st, err := e.Info(); err == nil && st.Mode().IsRegular() {
			n += allocated(st)
		}
	}
	return n
}

// allocated is what a file holds on disk rather than its length: RAM
// images and disk copies are sparse.
func allocated(st os.FileInfo) int64 {
	if sys, ok := st.Sys().(*syscall.Stat_t); ok {
		return sys.Blocks * 512
	}
	return st.Size()
}

func copyFile(from, to string) error {
	in, err := os.Open(from)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.Create(to)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// Snapshots lists the snapshots, newest first.
func (m *Manager) Snapshots() ([]Snapshot, error) {
	metas, err := filepath.Glob(filepath.Join(m.opts.DataDir.Snapshots(), "snap-*", snapshotMeta))
	if err != nil {
		return nil, err
	}
	out := []Snapshot{}
	for _, p := range metas {
		b, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		var s Snapshot
		if json.Unmarshal(b, &s) != nil {
			continue
		}
		s.Dir = filepath.Dir(p)
		out = append(out, s)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].CreatedAt.After(out[j].CreatedAt) })
	return out, nil
}

// snapshot finds a snapshot by id or name.
func (m *Manager) snapshot(ref string) (Snapshot, error) {
	all, err := m.Snapshots()
	if err != nil {
		return Snapshot{}, err
	}
	for _, s := range all {
		if s.ID == ref || (s.Name != "" && s.Name == ref) {
			return s, nil
		}
	}
	return Snapshot{}, snapshotNotFound(ref)
}

// GetSnapshot returns the snapshot with this id or name.
func (m *Manager) GetSnapshot(ctx context.Context, ref string) (Snapshot, error) {
	return m.snapshot(ref)
}

// snapshotUsers are the sandboxes whose disks are made over s's, and the
// snapshots taken of those.
func (m *Manager) snapshotUsers(ctx context.Context, s Snapshot) ([]store.Record, []Snapshot, error) {
	snapper, err := m.templates.snapshotter(s.Backend)
	if err != nil {
		return nil, nil, err
	}
	recs, err := m.store.List(ctx)
	if err != nil {
		return nil, nil, err
	}
	var users []store.Record
	for _, r := range recs {
		if snapper.Uses(r.Dir, s.Dir) {
			users = append(users, r)
		}
	}
	all, err := m.Snapshots()
	if err != nil {
		return nil, nil, err
	}
	var snaps []Snapshot
	for _, o := range all {
		if o.ID != s.ID && snapper.Uses(o.Dir, s.Dir) {
			snaps = append(snaps, o)
		}
	}
	return users, snaps, nil
}

// DeleteSnapshot removes a snapshot. It is refused while sandboxes are
// forks of it, unless force, which deletes those sandboxes first; it is
// refused while other snapshots are made over it.
func (m *Manager) DeleteSnapshot(ctx context.Context, ref string, force bool) error {
	s, err := m.snapshot(ref)
	if err != nil {
		return err
	}
	users, snaps, err := m.snapshotUsers(ctx, s)
	if err != nil {
		return err
	}
	if len(snaps) > 0 {
		return &Error{Kind: KindConflict, Code: "snapshot_in_use",
			Message: fmt.Sprintf("snapshot %s has snapshots made over it (%s); delete them first", s.ID, snaps[0].ID)}
	}
	if len(users) > 0 && !force {
		ids := make([]string, len(users))
		for i, u := range users {
			ids[i] = u.ID
		}
		return &Error{Kind: KindConflict, Code: "snapshot_in_use",
			Message: fmt.Sprintf("snapshot %s is the disk of %d sandbox(es) (%s); delete them first, or force", s.ID, len(users), strings.Join(ids, ", "))}
	}
	for _, u := range users {
		if err := m.remove(ctx, u); err != nil {
			return fmt.Errorf("delete fork %s of snapshot %s: %w", u.ID, s.ID, err)
		}
	}
	if err := os.RemoveAll(s.Dir); err != nil {
		return fmt.Errorf("delete snapshot %s: %w", s.ID, err)
	}
	return nil
}

// PruneSnapshots removes every snapshot that no sandbox and no other
// snapshot is made over.
func (m *Manager) PruneSnapshots(ctx context.Context) ([]Snapshot, error) {
	all, err := m.Snapshots()
	if err != nil {
		return nil, err
	}
	var removed []Snapshot
	for _, s := range all {
		users, snaps, err := m.snapshotUsers(ctx, s)
		if err != nil || len(users) > 0 || len(snaps) > 0 {
			continue
		}
		if err := os.RemoveAll(s.Dir); err != nil {
			return removed, fmt.Errorf("delete snapshot %s: %w", s.ID, err)
		}
		removed = append(removed, s)
	}
	return removed, nil
}

// forkShape gives a request for a fork the snapshot's machine: a fork's
// memory, vCPUs, backend, image and network interface are the saved
// machine's, so a request may repeat them but not change them.
func (m *Manager) forkShape(req *CreateRequest) (Snapshot, error) {
	s, err := m.snapshot(req.Snapshot)
	if err != nil {
		if e, ok := AsError(err); ok {
			e.Kind, e.Field = KindInvalid, "snapshot"
		}
		return s, err
	}
	mismatch := func(field string, got, want any) error {
		return invalid("snapshot_mismatch", field, "a fork of snapshot %s has its %s (%v), not %v: leave %s out", s.ID, field, want, got, field)
	}
	switch {
	case req.MemoryMiB != 0 && req.MemoryMiB != s.MemoryMiB:
		return s, mismatch("memory", req.MemoryMiB, s.MemoryMiB)
	case req.VCPUs != 0 && req.VCPUs != s.VCPUs:
		return s, mismatch("vcpus", req.VCPUs, s.VCPUs)
	case req.Backend != "" && req.Backend != AutoBackend && req.Backend != s.Backend:
		return s, mismatch("backend", req.Backend, s.Backend)
	case req.OS != "" || req.Image != "":
		return s, invalid("snapshot_mismatch", "image", "a fork of snapshot %s runs its image (%s): leave os and image out", s.ID, s.Image)
	case req.DiskSizeMiB != 0 && req.DiskSizeMiB < s.DiskMiB:
		return s, invalid("invalid_disk_size", "disk_size", "a fork's disk cannot be smaller than its snapshot's (%d MiB)", s.DiskMiB)
	case len(req.Mounts) > 0:
		return s, invalid("snapshot_mismatch", "mounts", "a fork cannot add host directories to the saved machine")
	}
	if req.Network.Mode == "" && !s.Network {
		req.Network.Mode = "off"
	}
	if req.Network.Mode != "" && (req.Network.Mode != "off") != s.Network {
		want := "a network (mode open or restricted)"
		if !s.Network {
			want = "no network (mode off)"
		}
		return s, invalid("snapshot_mismatch", "network", "snapshot %s was taken of a machine with %s; its forks must have the same", s.ID, want)
	}
	src := forkSource(s)
	req.Snapshot, req.OS, req.Image = s.ID, src.OS, src.Image
	req.MemoryMiB, req.VCPUs, req.Backend = s.MemoryMiB, s.VCPUs, s.Backend
	if req.DiskSizeMiB == 0 {
		req.DiskSizeMiB = s.DiskMiB
	}
	return s, nil
}

// fork starts rec's VM from snapshot s and gives it its own identity.
func (m *Manager) fork(ctx context.Context, drv vmm.Driver, a assets, rec *store.Record, final Status) (Info, error) {
	s, err := m.snapshot(readConfig(*rec).Snapshot)
	if err != nil {
		return Info{}, err
	}
	snapper, ok := drv.(vmm.Snapshotter)
	if !ok {
		return Info{}, &Error{Kind: KindUnavailable, Code: "unsupported", Message: fmt.Sprintf("backend %s cannot restore a snapshot", drv.Name())}
	}
	if s.Kernel != a.kernel.Version || s.Initrd != filepath.Base(a.initrd) {
		return Info{}, &Error{Kind: KindConflict, Code: "snapshot_incompatible",
			Message: fmt.Sprintf("snapshot %s was taken under kernel %s with initramfs %s; this host now boots %s with %s, which cannot resume it", s.ID, s.Kernel, s.Initrd, a.kernel.Version, filepath.Base(a.initrd))}
	}
	info, _, err := m.templates.restore(ctx, drv, snapper, &Template{Key: s.ID, Dir: s.Dir, DiskMiB: s.DiskMiB}, a, rec, final)
	return info, err
}

// forkSource is the image a fork of s was made from.
func forkSource(s Snapshot) image.Source { return readImageRecord(s.Dir).Source }

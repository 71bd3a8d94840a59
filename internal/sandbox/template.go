package sandbox

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"time"

	"golang.org/x/sys/unix"

	"github.com/smolvm/smolvm/internal/agent/agentpb"
	"github.com/smolvm/smolvm/internal/guest"
	"github.com/smolvm/smolvm/internal/network"
	"github.com/smolvm/smolvm/internal/store"
	"github.com/smolvm/smolvm/internal/vmm"
)

// templateFormat is part of every template key: bump it when what a
// template holds, or how a clone is made from it, changes.
const templateFormat = 4

// Template is a booted VM saved to disk: its memory and device state, and
// the frozen disk it ran on. Sandboxes are restored from it instead of
// booting, then given their own identity.
type Template struct {
	Key       string `json:"key"`
	Dir       string `json:"-"`
	Kernel    string `json:"kernel"`
	Initrd    string `json:"initrd"`
	Image     string `json:"image"`
	Digest    string `json:"image_digest"`
	MemoryMiB int    `json:"memory"`
	VCPUs     int    `json:"vcpus"`
	DiskMiB   int    `json:"disk_size"`
	Backend   string `json:"backend"`
	// Network says whether the saved machine has a network interface.
	Network bool `json:"network"`
	// VMM is the driver's identity: its version and accelerator.
	VMM       string    `json:"vmm"`
	CreatedAt time.Time `json:"created_at"`
	BuildMS   int64     `json:"build_ms"`
	SizeBytes int64     `json:"size_bytes"`
	// Retired is set on a build that failed to restore or was replaced;
	// it stays only while sandboxes overlay its disk.
	Retired bool `json:"retired,omitempty"`
}

// templates is the template cache: saved VMs keyed by everything they
// depend on, built once per key (by whichever process asks first, under a
// file lock) and restored into new sandboxes, with a cold boot through the
// launcher whenever no template can serve.
type templates struct {
	l        *launcher
	root     string
	disabled bool
}

// templateKey names everything a saved VM depends on; a clone may only be
// restored from a template whose key matches exactly, so a new kernel,
// agent (inside the initramfs's hash), image, QEMU or machine shape never
// restores a stale template.
func (tc *templates) templateKey(ctx context.Context, drv vmm.Driver, a assets, memMiB, vcpus, diskMiB int, net bool) (*Template, error) {
	identity, err := drv.Identity(ctx)
	if err != nil {
		return nil, err
	}
	t := &Template{
		Kernel: a.kernel.Version, Initrd: filepath.Base(a.initrd),
		Image: a.base.Name, Digest: a.base.Digest,
		MemoryMiB: memMiB, VCPUs: vcpus,
		Backend: drv.Name(), VMM: identity,
		DiskMiB: templateDiskMiB(a, diskMiB),
		Network: net,
	}
	b, _ := json.Marshal(struct {
		Format  int
		T       *Template
		Cmdline string
	}{templateFormat, t, bootCmdline("template", net)})
	sum := sha256.Sum256(b)
	t.Key = hex.EncodeToString(sum[:])[:24]
	return t, nil
}

// templateDiskMiB sizes a template's disk. Clones can grow a disk but not
// shrink it, and growing costs a resize in every clone, so templates are
// made at the default size; a smaller request gets a template of its own.
func templateDiskMiB(a assets, diskMiB int) int {
	imageMiB := int((a.base.SizeBytes + 1<<20 - 1) >> 20)
	return max(imageMiB, min(diskMiB, DefaultDiskMiB))
}

// hostFull reports whether err is, or may well be, the data directory's
// filesystem running out of space.
func (tc *templates) hostFull(err error) bool {
	full, _ := explainsFull(tc.l.opts.DataDir.Path(), err)
	return full
}

// launch brings rec's VM up from a template when it can, and cold when it
// cannot; a template that fails is retired at once, logged with why, and
// never returned as a broken sandbox.
func (tc *templates) launch(ctx context.Context, drv vmm.Driver, a assets, rec *store.Record, final Status) (Info, error) {
	snap, ok := drv.(vmm.Snapshotter)
	// A template has no shared directories, so a machine with some boots
	// cold.
	if !ok || tc.disabled || len(readConfig(*rec).Mounts) > 0 {
		return tc.l.boot(ctx, drv, a, rec, true, final)
	}
	t, err := tc.ensureTemplate(ctx, drv, snap, a, rec.MemoryMiB, rec.VCPUs, rec.DiskSizeMiB, readNet(*rec).Policy.Enabled())
	var warning string
	if err == nil {
		info, console, rerr := tc.restore(ctx, drv, snap, t, a, rec, final)
		if rerr == nil {
			return info, nil
		}
		if ctx.Err() != nil {
			return Info{}, rerr
		}
		// The request's own fault (a host port in use) says nothing
		// about the template, and a cold boot would fail the same way.
		if e, ok := AsError(rerr); ok && (e.Kind == KindInvalid || e.Kind == KindConflict) {
			return Info{}, rerr
		}
		// Nor does the host's disk filling up, which a cold boot needs
		// space on as well.
		if tc.hostFull(rerr) {
			return Info{}, rerr
		}
		// A crash the console shows says more than the broken
		// connection it caused.
		if line := (&consoleWatch{path: console}).crash(); line != "" && !errors.Is(rerr, errGuestCrashed) {
			rerr = fmt.Errorf("%w (%q): %w", errGuestCrashed, line, rerr)
		}
		err = rerr
		// Whatever went wrong, the next create builds a fresh template
		// rather than trying this one again.
		if berr := markBad(snap, t, rerr); berr != nil {
			tc.l.opts.Logger.Error("retire template", "template", t.Key, "err", berr)
		}
		tc.l.opts.Logger.Warn("template clone failed; template retired, booting cold",
			"sandbox", rec.ID, "template", t.Key, "build", filepath.Base(t.Dir), "err", summary(rerr),
			"console", consoleTail(console))
		warning = fmt.Sprintf("booted cold: the clone of template %s failed (%s); the template is retired", t.Key, summary(rerr))
	} else {
		if ctx.Err() != nil || tc.hostFull(err) {
			return Info{}, err
		}
		tc.l.opts.Logger.Warn("no template; booting cold", "sandbox", rec.ID, "err", err)
		warning = fmt.Sprintf("booted cold: no template could be built (%s)", summary(err))
	}
	fmt.Fprintf(tc.l.opts.Progress, "smolvm: %s: %s\n", rec.ID, warning)
	// The failed clone's VM is gone; its network and files go too
	// (image.json stays).
	terr := tc.l.halt(context.WithoutCancel(ctx), *rec)
	if err := drv.Clear(rec.Dir); err != nil {
		terr = errors.Join(terr, err)
	}
	tc.l.logTeardown(rec.ID, "a failed clone", terr)
	info, err := tc.l.boot(ctx, drv, a, rec, true, final)
	if err != nil {
		return Info{}, err
	}
	info.Warnings = append(info.Warnings, warning)
	return info, nil
}

// restoreTimeout bounds how long a clone may take to answer. A restore
// answers in well under a second when the host is idle; one that takes
// longer than this is hung, and booting cold is the faster way out.
const restoreTimeout = 30 * time.Second

// restore starts rec's VM from t, grows its disk to the size asked for, and
// gives it its identity. It returns the clone's console log too, which says
// why when a clone fails.
func (tc *templates) restore(ctx context.Context, drv vmm.Driver, snap vmm.Snapshotter, t *Template, a assets, rec *store.Record, final Status) (Info, string, error) {
	spec := tc.l.spec(a, rec)
	if err := os.MkdirAll(rec.Dir, 0o755); err != nil {
		return Info{}, "", fmt.Errorf("create sandbox directory: %w", err)
	}
	// Each clone gets a network process of its own; the saved machine
	// holds only the guest's side of the link.
	mach, err := tc.l.startVM(ctx, rec, spec, func(s vmm.Spec) (vmm.Machine, error) { return snap.Restore(ctx, s, t.Dir) })
	if err != nil {
		return Info{}, "", err
	}
	console := mach.ConsoleLog()
	c, err := tc.l.waitAgent(ctx, mach, rec, min(restoreTimeout, tc.l.opts.BootTimeout))
	if err != nil {
		return Info{}, console, err
	}
	if tc.l.afterRestore != nil {
		tc.l.afterRestore(ctx, func(cmd string) error {
			_, err := c.Exec(ctx, &agentpb.StartRequest{Process: &agentpb.ProcessConfig{Script: cmd, Shell: agentpb.Shell_SHELL_RAW}}, io.Discard, io.Discard)
			return err
		})
	}
	// The clone starts with exactly the template's disk so the restored
	// device matches; growing it afterwards is what tells the guest.
	var diskBytes int64
	if rec.DiskSizeMiB > t.DiskMiB {
		start := time.Now()
		diskBytes = int64(rec.DiskSizeMiB) << 20
		err := fmt.Errorf("backend %s cannot grow a disk", drv.Name())
		if r, ok := drv.(vmm.DiskResizer); ok {
			err = r.Resize(ctx, mach, diskBytes)
		}
		if err != nil {
			c.Close()
			return Info{}, console, errors.Join(fmt.Errorf("grow disk: %w", err), mach.Kill(context.WithoutCancel(ctx)))
		}
		vmm.Step(ctx, "disk resize", start)
	}
	info, err := tc.l.finish(ctx, c, rec, diskBytes, BootTemplate, final)
	if err != nil {
		return Info{}, console, errors.Join(err, mach.Kill(context.WithoutCancel(ctx)))
	}
	return info, console, nil
}

// ensureTemplate returns the template for this machine, building it first
// if no process has: boot a VM cold, wait for its agent, save it. Concurrent
// callers, in this process or others, build it once.
func (tc *templates) ensureTemplate(ctx context.Context, drv vmm.Driver, snap vmm.Snapshotter, a assets, memMiB, vcpus, diskMiB int, net bool) (*Template, error) {
	t, err := tc.templateKey(ctx, drv, a, memMiB, vcpus, diskMiB, net)
	if err != nil {
		return nil, err
	}
	root := tc.root
	if findTemplate(root, snap, t) {
		return t, nil
	}
	if err := os.MkdirAll(root, 0o755); err != nil {
		return nil, err
	}
	unlock, err := lockFile(ctx, filepath.Join(root, t.Key+".lock"))
	if err != nil {
		return nil, err
	}
	defer unlock()
	if findTemplate(root, snap, t) {
		return t, nil
	}
	fmt.Fprintf(tc.l.opts.Progress, "smolvm: building a template for %s, %d MiB memory, %d vCPU, %d MiB disk (one cold boot)...\n", a.base.Name, memMiB, vcpus, t.DiskMiB)
	start := time.Now()
	if err := tc.buildTemplate(ctx, drv, snap, a, t); err != nil {
		return nil, fmt.Errorf("build template: %w", err)
	}
	t.BuildMS = time.Since(start).Milliseconds()
	fmt.Fprintf(tc.l.opts.Progress, "smolvm: template %s ready in %.1f s\n", t.Key, time.Since(start).Seconds())
	return t, nil
}

func (tc *templates) buildTemplate(ctx context.Context, drv vmm.Driver, snap vmm.Snapshotter, a assets, t *Template) error {
	// Short names: the sockets inside must fit in 107 bytes.
	tmp, err := os.MkdirTemp(tc.root, ".b")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	// Held until the build ends; a build whose process died is swept by
	// the next Manager (sweepBuilds).
	lock, err := lockFile(ctx, filepath.Join(tmp, creationLock))
	if err != nil {
		return err
	}
	defer lock()
	spec := vmm.Spec{
		ID: "tpl-" + t.Key[:8], Dir: tmp,
		Kernel: a.kernel.Vmlinux, Initrd: a.initrd, Cmdline: bootCmdline("template", t.Network),
		BaseImage: a.base.Path, DiskMiB: t.DiskMiB,
		MemoryMiB: t.MemoryMiB, VCPUs: t.VCPUs,
		DiskIO:      tc.l.opts.DiskIO,
		ForSnapshot: true,
	}
	if t.Network {
		// The template runs no commands; its network refuses everything.
		ready, err := tc.l.startNetwork(ctx, tmp, network.Policy{Mode: network.ModeRestricted}, &spec)
		if err != nil {
			return err
		}
		defer network.Stop(context.WithoutCancel(ctx), tmp)
		if err := ready(ctx); err != nil {
			return err
		}
	}
	mach, err := drv.Start(ctx, spec)
	if err != nil {
		return err
	}
	defer func() {
		if err := mach.Kill(context.WithoutCancel(ctx)); err != nil {
			tc.l.opts.Logger.Error("stop template build VM", "template", t.Key, "err", err)
		}
	}()
	if b, err := json.Marshal(buildVM{Backend: drv.Name(), Runtime: mach.Runtime()}); err == nil {
		if err := os.WriteFile(filepath.Join(tmp, buildVMFile), b, 0o644); err != nil {
			return fmt.Errorf("record template build: %w", err)
		}
	}
	c, err := dialWhileAlive(ctx, mach, tc.l.opts.BootTimeout)
	if err != nil {
		return err
	}
	err = warmUp(ctx, c)
	// Save with no host attached, so every clone starts waiting for one.
	c.Close()
	if err != nil {
		return err
	}
	sctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	if err := snap.Save(sctx, mach, tmp); err != nil {
		return err
	}
	// A guest that oopsed before it was stopped would hand the oops to
	// every clone; such a state is never kept.
	console := mach.ConsoleLog()
	if line := (&consoleWatch{path: console}).crash(); line != "" {
		return &consoleError{err: fmt.Errorf("%w while it was saved (%q)", errGuestCrashed, line), console: consoleTail(console)}
	}
	if err := network.Stop(ctx, tmp); err != nil {
		return fmt.Errorf("stop the template's network: %w", err)
	}
	// Only the snapshot and template.json stay.
	leftovers := append(network.Files{Dir: tmp}.All(), console, filepath.Join(tmp, buildVMFile), filepath.Join(tmp, creationLock))
	for _, f := range leftovers {
		if err := os.Remove(f); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("tidy the template: %w", err)
		}
	}
	t.CreatedAt = time.Now().UTC()
	for _, f := range snap.SnapshotFiles() {
		if st, err := os.Stat(filepath.Join(tmp, f)); err == nil {
			t.SizeBytes += allocated(st)
		}
	}
	meta, _ := json.MarshalIndent(t, "", "  ")
	if err := os.WriteFile(filepath.Join(tmp, "template.json"), meta, 0o444); err != nil {
		return err
	}
	// Each build gets a directory of its own: sandboxes restored from an
	// earlier build of the same key keep overlaying its disk.
	dir := filepath.Join(tc.root, t.Key+"."+strconv.FormatInt(time.Now().UnixNano(), 36))
	if err := os.Rename(tmp, dir); err != nil {
		return err
	}
	t.Dir = dir
	return nil
}

// buildVM is how a template build's VM is found again if its process dies.
type buildVM struct {
	Backend string          `json:"backend"`
	Runtime json.RawMessage `json:"instance"`
}

const buildVMFile = "vm.json"

// sweepBuilds ends template builds left by processes that died while
// building: their VM and network process, and their directory.
func (tc *templates) sweepBuilds(ctx context.Context) {
	dirs, _ := filepath.Glob(filepath.Join(tc.root, ".b*"))
	for _, dir := range dirs {
		if !abandonedCreation(dir) {
			continue // being built, or not ours
		}
		var errs []error
		var vm buildVM
		if b, err := os.ReadFile(filepath.Join(dir, buildVMFile)); err == nil && json.Unmarshal(b, &vm) == nil {
			if drv, err := tc.l.drivers.Get(vm.Backend); err == nil {
				if mach, err := drv.Attach(vm.Runtime); err == nil {
					errs = append(errs, mach.Kill(ctx))
				}
			}
		}
		// The build may have died before it recorded its VM.
		for _, name := range tc.l.drivers.Names() {
			if drv, err := tc.l.drivers.Get(name); err == nil {
				errs = append(errs, drv.Reap(ctx, dir))
			}
		}
		errs = append(errs, network.Stop(ctx, dir), os.RemoveAll(dir))
		if err := errors.Join(errs...); err != nil {
			tc.l.opts.Logger.Error("sweep an abandoned template build", "dir", dir, "err", err)
		}
	}
}

// findTemplate points t at the newest usable build of its key.
func findTemplate(root string, snap vmm.Snapshotter, t *Template) bool {
	builds, _ := filepath.Glob(filepath.Join(root, t.Key+".*", "template.json"))
	sort.Sort(sort.Reverse(sort.StringSlice(builds)))
	for _, meta := range builds {
		dir := filepath.Dir(meta)
		if usable(snap, dir) {
			t.Dir = dir
			return true
		}
	}
	return false
}

// usable reports whether the build in dir is complete and not retired.
func usable(snap vmm.Snapshotter, dir string) bool {
	for _, f := range append(snap.SnapshotFiles(), "template.json") {
		if _, err := os.Stat(filepath.Join(dir, f)); err != nil {
			return false
		}
	}
	_, err := os.Stat(filepath.Join(dir, "bad"))
	return os.IsNotExist(err)
}

// warmUp runs, in a template about to be saved, what every clone runs
// first: the identity call and a command through the login shell and
// without one. What that leaves in the guest (its page cache holding the
// shell, the C library and the profile; the agent's lazily built tables)
// is saved with it, so a clone does not read those from its disk and
// build those again on its first request. The identity given here is the
// template's own; every clone replaces it.
func warmUp(ctx context.Context, c *guest.Client) error {
	wctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	for _, p := range []*agentpb.ProcessConfig{{Argv: []string{"true"}}, {Script: "true"}} {
		if _, err := c.Exec(wctx, &agentpb.StartRequest{Process: p}, io.Discard, io.Discard); err != nil {
			return fmt.Errorf("warm up the template: run %v: %w", p, err)
		}
	}
	// Last, as it drops the login shell the agent starts ahead for the
	// next command: each clone's would have the template's name.
	if _, err := c.Identity(wctx, &agentpb.SetIdentityRequest{
		Hostname: "template", MachineId: randomHex(16), UnixNano: time.Now().UnixNano(), Seed: randomBytes(64),
	}); err != nil {
		return fmt.Errorf("warm up the template: identity: %w", err)
	}
	return nil
}

// markBad retires a template build after a failed restore: what a restore
// needs goes, its disk stays for the sandboxes already overlaying it.
func markBad(snap vmm.Snapshotter, t *Template, why error) error {
	werr := os.WriteFile(filepath.Join(t.Dir, "bad"), []byte(why.Error()+"\n"), 0o644)
	return errors.Join(werr, snap.DropState(t.Dir))
}

// snapshotter is the driver that made a template, as a Snapshotter.
func (tc *templates) snapshotter(backend string) (vmm.Snapshotter, error) {
	drv, err := tc.l.drivers.Get(backend)
	if err != nil {
		return nil, err
	}
	snap, ok := drv.(vmm.Snapshotter)
	if !ok {
		return nil, fmt.Errorf("backend %s makes no templates", backend)
	}
	return snap, nil
}

// lockFile takes an exclusive flock, waiting (within ctx) for another
// holder, in this process or another.
func lockFile(ctx context.Context, path string) (func(), error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, err
	}
	for {
		err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			return func() { unix.Flock(int(f.Fd()), unix.LOCK_UN); f.Close() }, nil
		}
		if err != unix.EWOULDBLOCK {
			f.Close()
			return nil, fmt.Errorf("lock %s: %w", path, err)
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// Templates lists the saved templates, newest first.
func (tc *templates) list() ([]Template, error) {
	dirs, err := filepath.Glob(filepath.Join(tc.root, "*", "template.json"))
	if err != nil {
		return nil, err
	}
	var out []Template
	for _, p := range dirs {
		b, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		var t Template
		if json.Unmarshal(b, &t) != nil {
			continue
		}
		t.Dir = filepath.Dir(p)
		snap, err := tc.snapshotter(t.Backend)
		t.Retired = err != nil || !usable(snap, t.Dir)
		out = append(out, t)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].CreatedAt.After(out[j].CreatedAt) })
	return out, nil
}

// RemoveTemplate deletes every build of the template with this key that
// no sandbox's disk overlays; it refuses for builds still in use, since
// those sandboxes would lose their disks.
func (tc *templates) remove(ctx context.Context, key string) error {
	ts, err := tc.list()
	if err != nil {
		return err
	}
	found, inUse := false, 0
	for _, t := range ts {
		if t.Key != key {
			continue
		}
		found = true
		n, err := tc.templateUsers(ctx, t)
		if err != nil {
			return err
		}
		if n > 0 {
			inUse += n
			continue
		}
		if err := os.RemoveAll(t.Dir); err != nil {
			return fmt.Errorf("remove template %s: %w", key, err)
		}
	}
	switch {
	case !found:
		return &Error{Kind: KindNotFound, Code: "template_not_found", Message: fmt.Sprintf("no template %q", key)}
	case inUse > 0:
		return &Error{Kind: KindConflict, Code: "template_in_use",
			Message: fmt.Sprintf("template %s backs %d sandbox(es); delete them first", key, inUse)}
	}
	return nil
}

// sweepRetired removes the retired builds that no sandbox or snapshot
// uses any more: nothing can restore from them, and their disk was kept
// only for the clones made before they were retired.
func (tc *templates) sweepRetired(ctx context.Context) {
	marks, _ := filepath.Glob(filepath.Join(tc.root, "*", "bad"))
	if len(marks) == 0 {
		return
	}
	ts, err := tc.list()
	if err != nil {
		return
	}
	for _, t := range ts {
		if _, err := os.Stat(filepath.Join(t.Dir, "bad")); err != nil {
			continue
		}
		if n, err := tc.templateUsers(ctx, t); err != nil || n > 0 {
			continue
		}
		if err := os.RemoveAll(t.Dir); err != nil {
			tc.l.opts.Logger.Error("remove a retired template", "template", t.Key, "err", err)
		}
	}
}

// PruneTemplates removes every template that no sandbox uses.
func (tc *templates) prune(ctx context.Context) ([]Template, error) {
	ts, err := tc.list()
	if err != nil {
		return nil, err
	}
	var removed []Template
	for _, t := range ts {
		if n, err := tc.templateUsers(ctx, t); err != nil || n > 0 {
			continue
		}
		if err := os.RemoveAll(t.Dir); err == nil {
			removed = append(removed, t)
		}
	}
	return removed, nil
}

// templateUsers counts sandboxes and snapshots whose disk is made over
// t's.
func (tc *templates) templateUsers(ctx context.Context, t Template) (int, error) {
	snap, err := tc.snapshotter(t.Backend)
	if err != nil {
		return 0, err
	}
	recs, err := tc.l.store.List(ctx)
	if err != nil {
		return 0, err
	}
	n := 0
	for _, r := range recs {
		if snap.Uses(r.Dir, t.Dir) {
			n++
		}
	}
	// A snapshot of a clone keeps the clone's disk, made over the
	// template's.
	dirs, _ := filepath.Glob(filepath.Join(tc.l.opts.DataDir.Snapshots(), "snap-*"))
	for _, d := range dirs {
		if snap.Uses(d, t.Dir) {
			n++
		}
	}
	return n, nil
}

// Templates lists the saved templates, newest first.
func (m *Manager) Templates() ([]Template, error) { return m.templates.list() }

// RemoveTemplate deletes every build of the template with this key that
// no sandbox's disk overlays; it refuses for builds still in use, since
// those sandboxes would lose their disks.
func (m *Manager) RemoveTemplate(ctx context.Context, key string) error {
	return m.templates.remove(ctx, key)
}

// PruneTemplates removes every template that no sandbox uses.
func (m *Manager) PruneTemplates(ctx context.Context) ([]Template, error) {
	return m.templates.prune(ctx)
}

package sandbox

import (
	"bytes"
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
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/smolvm/smolvm/internal/agent/wire"
	"github.com/smolvm/smolvm/internal/network"
	"github.com/smolvm/smolvm/internal/store"
	"github.com/smolvm/smolvm/internal/vmm"
)

// templateFormat is part of every template key: bump it when what a
// template holds, or how a clone is made from it, changes.
const templateFormat = 3

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
	Accel     string `json:"accel"`
	Backend   string `json:"backend"`
	// Network says whether the saved machine has a network interface.
	Network   bool      `json:"network"`
	VMM       string    `json:"vmm_version"`
	CreatedAt time.Time `json:"created_at"`
	BuildMS   int64     `json:"build_ms"`
	SizeBytes int64     `json:"size_bytes"`
	// Retired is set on a build that failed to restore or was replaced;
	// it stays only while sandboxes overlay its disk.
	Retired bool `json:"retired,omitempty"`
}

func (t *Template) disk() string  { return filepath.Join(t.Dir, "disk.qcow2") }
func (t *Template) state() string { return filepath.Join(t.Dir, "state") }

// templateKey names everything a saved VM depends on; a clone may only be
// restored from a template whose key matches exactly, so a new kernel,
// agent (inside the initramfs's hash), image, QEMU or machine shape never
// restores a stale template.
func (m *Manager) templateKey(ctx context.Context, drv vmm.Driver, a assets, memMiB, vcpus, diskMiB int, net bool) (*Template, error) {
	version := ""
	if v, ok := drv.(vmm.Versioner); ok {
		var err error
		if version, err = m.vmmVersion(ctx, v); err != nil {
			return nil, err
		}
	}
	t := &Template{
		Kernel: a.kernel.Version, Initrd: filepath.Base(a.initrd),
		Image: a.base.Name, Digest: a.base.Digest,
		MemoryMiB: memMiB, VCPUs: vcpus, Accel: a.accel,
		Backend: drv.Name(), VMM: version,
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

func (m *Manager) vmmVersion(ctx context.Context, v vmm.Versioner) (string, error) {
	m.mu.Lock()
	s, ok := m.vmmVersions[v]
	m.mu.Unlock()
	if ok {
		return s, nil
	}
	// Run outside the lock: the Manager's mutex guards maps, not commands.
	s, err := v.Version(ctx)
	if err != nil {
		return "", err
	}
	m.mu.Lock()
	if m.vmmVersions == nil {
		m.vmmVersions = make(map[vmm.Versioner]string)
	}
	m.vmmVersions[v] = s
	m.mu.Unlock()
	return s, nil
}

// launch brings rec's VM up from a template when it can, and cold when it
// cannot; a template that fails is retired at once, logged with why, and
// never returned as a broken sandbox.
func (m *Manager) launch(ctx context.Context, drv vmm.Driver, a assets, rec *store.Record, final string) (Info, error) {
	snap, ok := drv.(vmm.Snapshotter)
	if !ok || m.opts.NoTemplates {
		return m.boot(ctx, drv, a, rec, true, final)
	}
	t, err := m.ensureTemplate(ctx, drv, snap, a, rec.MemoryMiB, rec.VCPUs, rec.DiskSizeMiB, readNet(*rec).Policy.Enabled())
	var warning string
	if err == nil {
		info, rerr := m.restore(ctx, drv, snap, t, a, rec, final)
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
		// A crash the console shows says more than the broken
		// connection it caused.
		if line := (&consoleWatch{path: filepath.Join(rec.Dir, "console.log")}).crash(); line != "" && !errors.Is(rerr, errGuestCrashed) {
			rerr = fmt.Errorf("%w (%q): %w", errGuestCrashed, line, rerr)
		}
		err = rerr
		// Whatever went wrong, the next create builds a fresh template
		// rather than trying this one again.
		if berr := markBad(t, rerr); berr != nil {
			m.opts.Logger.Error("retire template", "template", t.Key, "err", berr)
		}
		m.opts.Logger.Warn("template clone failed; template retired, booting cold",
			"sandbox", rec.ID, "template", t.Key, "build", filepath.Base(t.Dir), "err", firstLine(rerr),
			"console", consoleTail(filepath.Join(rec.Dir, "console.log")))
		warning = fmt.Sprintf("booted cold: the clone of template %s failed (%s); the template is retired", t.Key, firstLine(rerr))
	} else {
		if ctx.Err() != nil {
			return Info{}, err
		}
		m.opts.Logger.Warn("no template; booting cold", "sandbox", rec.ID, "err", err)
		warning = fmt.Sprintf("booted cold: no template could be built (%s)", firstLine(err))
	}
	fmt.Fprintf(m.opts.Progress, "smolvm: %s: %s\n", rec.ID, warning)
	if err := network.Stop(context.WithoutCancel(ctx), rec.Dir); err != nil {
		m.opts.Logger.Warn("stop network of failed clone", "sandbox", rec.ID, "err", err)
	}
	for _, f := range []string{"disk.qcow2", "agent.sock", "qmp.sock", "qemu.pid", "console.log"} {
		os.Remove(filepath.Join(rec.Dir, f)) // image.json stays
	}
	info, err := m.boot(ctx, drv, a, rec, true, final)
	if err != nil {
		return Info{}, err
	}
	info.Warnings = append(info.Warnings, warning)
	return info, nil
}

// firstLine is an error's first line, for one-line summaries of errors
// that carry a console log.
func firstLine(err error) string {
	s, _, _ := strings.Cut(err.Error(), "\n")
	return strings.TrimSuffix(strings.TrimSpace(s), "; console output:")
}

// restoreTimeout bounds how long a clone may take to answer. A restore
// answers in well under a second when the host is idle; one that takes
// longer than this is hung, and booting cold is the faster way out.
const restoreTimeout = 30 * time.Second

// restore starts rec's VM from t, grows its disk to the size asked for, and
// gives it its identity.
func (m *Manager) restore(ctx context.Context, drv vmm.Driver, snap vmm.Snapshotter, t *Template, a assets, rec *store.Record, final string) (Info, error) {
	spec := m.spec(a, rec)
	spec.BaseImage = t.disk()
	// The clone starts with exactly the template's disk so the restored
	// device matches; growing it afterwards is what tells the guest.
	spec.DiskMiB = t.DiskMiB
	if err := os.MkdirAll(rec.Dir, 0o755); err != nil {
		return Info{}, fmt.Errorf("create sandbox directory: %w", err)
	}
	if err := drv.CreateDisk(ctx, spec); err != nil {
		return Info{}, err
	}
	// Each clone gets a network process of its own; the saved machine
	// holds only the guest's side of the link.
	inst, err := m.startVM(ctx, rec, spec, func(s vmm.Spec) (vmm.Instance, error) { return snap.Restore(ctx, s, t.state()) })
	if err != nil {
		return Info{}, err
	}
	c, err := m.waitAgent(ctx, drv, inst, rec, min(restoreTimeout, m.opts.BootTimeout))
	if err != nil {
		return Info{}, err
	}
	if m.afterRestore != nil {
		m.afterRestore(ctx, func(cmd string) error {
			_, err := c.Do(ctx, wire.Request{Op: wire.OpExec, Argv: []string{"/bin/sh", "-c", cmd}}, io.Discard, io.Discard)
			return err
		})
	}
	var diskBytes int64
	if rec.DiskSizeMiB > t.DiskMiB {
		diskBytes = int64(rec.DiskSizeMiB) << 20
		if err := snap.Resize(ctx, inst, diskBytes); err != nil {
			c.Close()
			drv.Kill(context.WithoutCancel(ctx), inst)
			return Info{}, fmt.Errorf("grow disk: %w", err)
		}
	}
	info, err := m.finish(ctx, c, rec, diskBytes, BootTemplate, final)
	if err != nil {
		drv.Kill(context.WithoutCancel(ctx), inst)
	}
	return info, err
}

// ensureTemplate returns the template for this machine, building it first
// if no process has: boot a VM cold, wait for its agent, save it. Concurrent
// callers, in this process or others, build it once.
func (m *Manager) ensureTemplate(ctx context.Context, drv vmm.Driver, snap vmm.Snapshotter, a assets, memMiB, vcpus, diskMiB int, net bool) (*Template, error) {
	t, err := m.templateKey(ctx, drv, a, memMiB, vcpus, diskMiB, net)
	if err != nil {
		return nil, err
	}
	root := m.opts.DataDir.Templates()
	if findTemplate(root, t) {
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
	if findTemplate(root, t) {
		return t, nil
	}
	fmt.Fprintf(m.opts.Progress, "smolvm: building a template for %s, %d MiB memory, %d vCPU, %d MiB disk (one cold boot)...\n", a.base.Name, memMiB, vcpus, t.DiskMiB)
	start := time.Now()
	if err := m.buildTemplate(ctx, drv, snap, a, t); err != nil {
		return nil, fmt.Errorf("build template: %w", err)
	}
	t.BuildMS = time.Since(start).Milliseconds()
	fmt.Fprintf(m.opts.Progress, "smolvm: template %s ready in %.1f s\n", t.Key, time.Since(start).Seconds())
	return t, nil
}

func (m *Manager) buildTemplate(ctx context.Context, drv vmm.Driver, snap vmm.Snapshotter, a assets, t *Template) error {
	// Short names: the sockets inside must fit in 107 bytes.
	tmp, err := os.MkdirTemp(m.opts.DataDir.Templates(), ".b")
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
		MemoryMiB: t.MemoryMiB, VCPUs: t.VCPUs, Accel: a.accel,
	}
	if err := drv.CreateDisk(ctx, spec); err != nil {
		return err
	}
	if t.Network {
		// The template runs no commands; its network refuses everything.
		if err := m.startNetwork(ctx, tmp, network.Policy{Mode: network.ModeRestricted}, &spec); err != nil {
			return err
		}
		defer network.Stop(context.WithoutCancel(ctx), tmp)
	}
	inst, err := drv.Boot(ctx, spec)
	if err != nil {
		return err
	}
	defer drv.Kill(context.WithoutCancel(ctx), inst)
	if b, err := json.Marshal(buildVM{Backend: drv.Name(), Instance: inst}); err == nil {
		os.WriteFile(filepath.Join(tmp, buildVMFile), b, 0o644)
	}
	c, err := dialWhileAlive(ctx, drv, inst, m.opts.BootTimeout)
	if err != nil {
		return err
	}
	_, err = c.Ping(ctx)
	// Save with no host attached, so every clone starts waiting for one.
	c.Close()
	if err != nil {
		return err
	}
	sctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	if err := snap.Save(sctx, inst, filepath.Join(tmp, "state")); err != nil {
		return err
	}
	// A guest that oopsed before it was stopped would hand the oops to
	// every clone; such a state is never kept.
	if line := (&consoleWatch{path: inst.Console}).crash(); line != "" {
		return fmt.Errorf("%w while it was saved (%q); console output:\n%s", errGuestCrashed, line, consoleTail(inst.Console))
	}
	network.Stop(ctx, tmp)
	for _, f := range []string{"agent.sock", "qmp.sock", "qemu.pid", "console.log", "net.sock", "net.ctl", "net.pid", "net.log", buildVMFile, creationLock} {
		os.Remove(filepath.Join(tmp, f))
	}
	if err := os.Chmod(filepath.Join(tmp, "disk.qcow2"), 0o444); err != nil {
		return err
	}
	t.CreatedAt = time.Now().UTC()
	for _, f := range []string{"disk.qcow2", "state"} {
		if st, err := os.Stat(filepath.Join(tmp, f)); err == nil {
			t.SizeBytes += st.Size()
		}
	}
	meta, _ := json.MarshalIndent(t, "", "  ")
	if err := os.WriteFile(filepath.Join(tmp, "template.json"), meta, 0o444); err != nil {
		return err
	}
	// Each build gets a directory of its own: sandboxes restored from an
	// earlier build of the same key keep overlaying its disk.
	dir := filepath.Join(m.opts.DataDir.Templates(), t.Key+"."+strconv.FormatInt(time.Now().UnixNano(), 36))
	if err := os.Rename(tmp, dir); err != nil {
		return err
	}
	t.Dir = dir
	return nil
}

// buildVM is how a template build's VM is found again if its process dies.
type buildVM struct {
	Backend  string       `json:"backend"`
	Instance vmm.Instance `json:"instance"`
}

const buildVMFile = "vm.json"

// sweepBuilds ends template builds left by processes that died while
// building: their VM and network process, and their directory.
func (m *Manager) sweepBuilds(ctx context.Context) {
	dirs, _ := filepath.Glob(filepath.Join(m.opts.DataDir.Templates(), ".b*"))
	for _, dir := range dirs {
		if !abandonedCreation(dir) {
			continue // being built, or not ours
		}
		var vm buildVM
		if b, err := os.ReadFile(filepath.Join(dir, buildVMFile)); err == nil && json.Unmarshal(b, &vm) == nil {
			if drv, ok := m.drivers[vm.Backend]; ok {
				drv.Kill(ctx, vm.Instance)
			}
		}
		network.Stop(ctx, dir)
		os.RemoveAll(dir)
	}
}

// findTemplate points t at the newest usable build of its key.
func findTemplate(root string, t *Template) bool {
	builds, _ := filepath.Glob(filepath.Join(root, t.Key+".*", "template.json"))
	sort.Sort(sort.Reverse(sort.StringSlice(builds)))
	for _, meta := range builds {
		dir := filepath.Dir(meta)
		if usable(dir) {
			t.Dir = dir
			return true
		}
	}
	return false
}

func usable(dir string) bool {
	for _, f := range []string{"template.json", "disk.qcow2", "state"} {
		if _, err := os.Stat(filepath.Join(dir, f)); err != nil {
			return false
		}
	}
	_, err := os.Stat(filepath.Join(dir, "bad"))
	return os.IsNotExist(err)
}

// markBad retires a template build after a failed restore: its state goes,
// its disk stays for the sandboxes already overlaying it.
func markBad(t *Template, why error) error {
	werr := os.WriteFile(filepath.Join(t.Dir, "bad"), []byte(why.Error()+"\n"), 0o644)
	rerr := os.Remove(t.state())
	if errors.Is(rerr, os.ErrNotExist) {
		rerr = nil // retired by another create already
	}
	return errors.Join(werr, rerr)
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
func (m *Manager) Templates() ([]Template, error) {
	dirs, err := filepath.Glob(filepath.Join(m.opts.DataDir.Templates(), "*", "template.json"))
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
		t.Retired = !usable(t.Dir)
		out = append(out, t)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].CreatedAt.After(out[j].CreatedAt) })
	return out, nil
}

// RemoveTemplate deletes every build of the template with this key that
// no sandbox's disk overlays; it refuses for builds still in use, since
// those sandboxes would lose their disks.
func (m *Manager) RemoveTemplate(ctx context.Context, key string) error {
	ts, err := m.Templates()
	if err != nil {
		return err
	}
	found, inUse := false, 0
	for _, t := range ts {
		if t.Key != key {
			continue
		}
		found = true
		n, err := m.templateUsers(ctx, t)
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

// PruneTemplates removes every template that no sandbox uses.
func (m *Manager) PruneTemplates(ctx context.Context) ([]Template, error) {
	ts, err := m.Templates()
	if err != nil {
		return nil, err
	}
	var removed []Template
	for _, t := range ts {
		if n, err := m.templateUsers(ctx, t); err != nil || n > 0 {
			continue
		}
		if err := os.RemoveAll(t.Dir); err == nil {
			removed = append(removed, t)
		}
	}
	return removed, nil
}

// templateUsers counts sandboxes whose disk overlays t's disk.
func (m *Manager) templateUsers(ctx context.Context, t Template) (int, error) {
	recs, err := m.store.List(ctx)
	if err != nil {
		return 0, err
	}
	n := 0
	for _, r := range recs {
		if backedBy(filepath.Join(r.Dir, "disk.qcow2"), t.Dir) {
			n++
		}
	}
	return n, nil
}

// backedBy reports whether the qcow2 file at disk names a backing file in
// dir. The backing file name sits in the header's first cluster.
func backedBy(disk, dir string) bool {
	f, err := os.Open(disk)
	if err != nil {
		return false
	}
	defer f.Close()
	header := make([]byte, 64<<10)
	n, _ := io.ReadFull(f, header)
	return bytes.Contains(header[:n], []byte(dir+"/"))
}

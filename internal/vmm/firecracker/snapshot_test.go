package firecracker

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/smolvm/smolvm/internal/vmm"
)

// TestTemplateSaveAndClones builds a template as the sandbox manager
// does (a VM in a build directory, saved, the directory renamed), then
// restores two clones at once, each with its own network, and checks that
// each one's Firecracker found its own disk and vsock socket at the paths
// the template's snapshot recorded.
func TestTemplateSaveAndClones(t *testing.T) {
	e := newEnv(t, true)
	ctx := testCtx(t)
	const mac = "02:fc:00:00:00:02"
	tpl := e.spec(".b1234")
	tpl.ForSnapshot = true
	fl := withNet(t, &tpl, mac)
	m, err := e.d.Start(ctx, tpl)
	if err != nil {
		t.Fatal(err)
	}
	killAtEnd(t, m)
	c := fl.conn(t)
	checkHello(t, readFrame(t, c), mac, m.PID())
	ping(t, ctx, m)

	if err := e.d.Save(ctx, m, tpl.Dir); err != nil {
		t.Fatal(err)
	}
	want := append(bootRequests(tpl, true),
		[2]string{"PATCH /vm", `{"state":"Paused"}`},
		[2]string{"PUT /snapshot/create", `{"snapshot_type":"Full","snapshot_path":"` + vmDir + `/run/vmstate","mem_file_path":"` + vmDir + `/run/memory"}`},
	)
	wantRequests(t, e.records(), m.PID(), want)
	if m.Alive() {
		t.Fatal("the template's firecracker outlived Save")
	}
	groupGone(t, tpl)
	// What stays is the snapshot, frozen, and the console.
	if got, want := entries(t, tpl.Dir), []string{fileConsole, "memory", "net.sock", fileDisk, "vmstate"}; !slices.Equal(got, want) {
		t.Errorf("the template holds %q, want %q", got, want)
	}
	for _, f := range e.d.SnapshotFiles() {
		var st syscall.Stat_t
		if err := syscall.Stat(filepath.Join(tpl.Dir, f), &st); err != nil || st.Uid != 0 || st.Mode&0o777 != 0o444 {
			t.Errorf("%s: uid %d mode %o (%v); want root's and read-only", f, st.Uid, st.Mode&0o777, err)
		}
	}
	// The manager renames a finished build: nothing may depend on the
	// name it was saved under.
	snapDir := filepath.Join(e.work, "tpl-key.1")
	if err := os.Rename(tpl.Dir, snapDir); err != nil {
		t.Fatal(err)
	}

	type clone struct {
		spec vmm.Spec
		mac  string
		fl   *frameListener
		m    vmm.Machine
		err  error
	}
	clones := []*clone{{mac: "02:fc:00:00:00:0a"}, {mac: "02:fc:00:00:00:0b"}}
	for i, cl := range clones {
		cl.spec = e.spec("vm-clone-" + string(rune('a'+i)))
		cl.spec.MemoryMiB, cl.spec.VCPUs = tpl.MemoryMiB, tpl.VCPUs
		cl.fl = withNet(t, &cl.spec, cl.mac)
	}
	var wg sync.WaitGroup
	for _, cl := range clones {
		wg.Go(func() { cl.m, cl.err = e.d.Restore(ctx, cl.spec, snapDir) })
	}
	wg.Wait()
	for _, cl := range clones {
		if cl.err != nil {
			t.Fatal(cl.err)
		}
		killAtEnd(t, cl.m)
	}
	recs := e.records()
	for _, cl := range clones {
		pid := cl.m.PID()
		wantRequests(t, recs, pid, append(slices.Clone(logRequests),
			[2]string{"PUT /snapshot/load", `{"snapshot_path":"/proc/self/fd/5","mem_backend":{"backend_type":"File","backend_path":"/proc/self/fd/6"},"resume_vm":true}`}))
		checkJailed(t, recs, pid, cl.spec)
		// The drive the snapshot recorded is, in the clone's namespace,
		// the clone's own disk.
		ev := eventsOf(recs, pid, "restored-drive")
		var own syscall.Stat_t
		if err := syscall.Stat(filepath.Join(cl.spec.Dir, fileDisk), &own); err != nil {
			t.Fatal(err)
		}
		if len(ev) != 1 || ev[0].Data["path"] != vmDir+"/"+fileDisk ||
			uint64(ev[0].Data["ino"].(float64)) != own.Ino || uint64(ev[0].Data["dev"].(float64)) != own.Dev {
			t.Errorf("clone %s restored its drive from %v; want its own disk (ino %d)", cl.spec.ID, ev, own.Ino)
		}
		// The vsock socket the snapshot recorded is in the clone's
		// directory, and the NIC is the clone's, joined to its network.
		ping(t, ctx, cl.m)
		checkHello(t, readFrame(t, cl.fl.conn(t)), mac, pid)
	}
	// The template's disk is untouched; each clone's is a copy of it.
	checkDisk(t, filepath.Join(snapDir, fileDisk), int64(tpl.DiskMiB)<<20)
	for _, cl := range clones {
		checkDisk(t, filepath.Join(cl.spec.Dir, fileDisk), int64(tpl.DiskMiB)<<20)
		if e.d.Uses(cl.spec.Dir, snapDir) {
			t.Error("a clone's disk is a copy: it uses nothing of the template")
		}
	}
	for _, cl := range clones {
		if err := cl.m.Kill(ctx); err != nil {
			t.Fatal(err)
		}
		groupGone(t, cl.spec)
	}
	if err := e.d.DropState(snapDir); err != nil {
		t.Fatal(err)
	}
	if got := entries(t, snapDir); !slices.Equal(got, []string{fileConsole, "net.sock", fileDisk}) {
		t.Errorf("after DropState the template holds %q", got)
	}
	if _, err := e.d.Restore(ctx, e.spec("vm-clone-late"), snapDir); err == nil {
		t.Error("restored from a snapshot without its state")
	}
}

func TestPauseResizeCheckpoint(t *testing.T) {
	e := newEnv(t, true)
	ctx := testCtx(t)
	spec := e.spec("vm-ops")
	m, err := e.d.Start(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	killAtEnd(t, m)
	if err := e.d.Pause(ctx, m); err != nil {
		t.Fatal(err)
	}
	if err := e.d.Resume(ctx, m); err != nil {
		t.Fatal(err)
	}
	const grown = 256 << 20
	if err := e.d.Resize(ctx, m, grown); err != nil {
		t.Fatal(err)
	}
	if st, err := os.Stat(filepath.Join(spec.Dir, fileDisk)); err != nil || st.Size() != grown {
		t.Errorf("disk after Resize: %v, %v", st, err)
	}
	if err := e.d.Resize(ctx, m, 64<<20); err == nil {
		t.Error("Resize shrank a disk")
	}
	e.waitEvent(m.PID(), "drive-size", func(d map[string]any) bool { return d["bytes"] == float64(grown) })

	ck := filepath.Join(e.work, "checkpoint")
	if err := os.Mkdir(ck, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := e.d.Checkpoint(ctx, m, ck); err != nil {
		t.Fatal(err)
	}
	want := append(bootRequests(spec, false),
		[2]string{"PATCH /vm", `{"state":"Paused"}`},
		[2]string{"PATCH /vm", `{"state":"Resumed"}`},
		[2]string{"PATCH /drives/rootfs", `{"drive_id":"rootfs","path_on_host":"` + vmDir + `/rootfs.ext4"}`},
		[2]string{"PATCH /vm", `{"state":"Paused"}`},
		[2]string{"PUT /snapshot/create", `{"snapshot_type":"Full","snapshot_path":"` + vmDir + `/run/checkpoint.vmstate","mem_file_path":"` + vmDir + `/run/checkpoint.memory"}`},
		[2]string{"PATCH /vm", `{"state":"Resumed"}`},
	)
	wantRequests(t, e.records(), m.PID(), want)
	if !m.Alive() {
		t.Fatal("the VM did not outlive its checkpoint")
	}
	ping(t, ctx, m)
	if got := entries(t, ck); !slices.Equal(got, []string{"memory", fileDisk, "vmstate"}) {
		t.Errorf("the checkpoint holds %q", got)
	}
	if got := entries(t, filepath.Join(spec.Dir, dirRun)); slices.Contains(got, "checkpoint.vmstate") {
		t.Errorf("the checkpoint's state stayed in the VM's directory: %q", got)
	}
	// Into a directory that has one already: refused, nothing touched.
	if err := e.d.Checkpoint(ctx, m, ck); err == nil {
		t.Error("a checkpoint overwrote another")
	}
	// A copy of the checkpoint runs, on a disk of the grown size.
	cp := e.spec("vm-ops-copy")
	c, err := e.d.Restore(ctx, cp, ck)
	if err != nil {
		t.Fatal(err)
	}
	killAtEnd(t, c)
	ping(t, ctx, c)
	if st, err := os.Stat(filepath.Join(cp.Dir, fileDisk)); err != nil || st.Size() != grown {
		t.Errorf("the copy's disk: %v, %v", st, err)
	}
}

// TestFreezeFollowsNoLink: a snapshot's files were the jail user's, who
// could have left a link in their place; freezing one must not change
// what it points at.
func TestFreezeFollowsNoLink(t *testing.T) {
	dir := t.TempDir()
	target := filepath.Join(dir, "shadow")
	if err := os.WriteFile(target, []byte("secret"), 0o600); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(dir, "vmstate")
	if err := os.Symlink(target, link); err != nil {
		t.Fatal(err)
	}
	if err := freeze(link); err == nil {
		t.Error("froze through a link")
	}
	if st, err := os.Stat(target); err != nil || st.Mode().Perm() != 0o600 {
		t.Errorf("the link's target changed: %v, %v", st.Mode(), err)
	}
	if err := move(link, filepath.Join(dir, "moved")); err != nil {
		t.Fatal(err) // a rename moves the link itself
	}
}

func TestRestoreFailureLeavesNothing(t *testing.T) {
	e := newEnv(t, true)
	ctx := testCtx(t)
	tpl := e.spec("tpl-fail")
	m, err := e.d.Start(ctx, tpl)
	if err != nil {
		t.Fatal(err)
	}
	killAtEnd(t, m)
	if err := e.d.Save(ctx, m, tpl.Dir); err != nil {
		t.Fatal(err)
	}
	e.failing(t, "PUT /snapshot/load")
	spec := e.spec("vm-clone-fails")
	fl := withNet(t, &spec, "02:fc:00:00:00:0c")
	c, err := e.d.Restore(ctx, spec, tpl.Dir)
	if err == nil {
		c.Kill(ctx)
		t.Fatal("Restore succeeded")
	}
	if !strings.Contains(err.Error(), "fake: failing PUT /snapshot/load as asked") {
		t.Errorf("error does not carry the fault: %v", err)
	}
	if pids := vmm.ProcessesWith(marker(spec.Dir)); len(pids) > 0 {
		t.Errorf("processes left running (firecracker or its relay): %v", pids)
	}
	if left := entries(t, spec.Dir); !slices.Equal(left, []string{filepath.Base(fl.path)}) {
		t.Errorf("files left: %q", left)
	}
	groupGone(t, spec)
}

package qemu

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	goruntime "runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/smolvm/smolvm/internal/agent/agentpb"
	"github.com/smolvm/smolvm/internal/cgroup"
	"github.com/smolvm/smolvm/internal/datadir"
	"github.com/smolvm/smolvm/internal/guest"
	"github.com/smolvm/smolvm/internal/image"
	"github.com/smolvm/smolvm/internal/jail/jailtest"
	"github.com/smolvm/smolvm/internal/kernel"
	"github.com/smolvm/smolvm/internal/vmm"
)

// The tests below boot real guests under QEMU with the kernel and base
// image `smolvm setup` prepared (internal/testenv cannot be used here: it
// imports the sandbox manager, which imports this package).

// realGuest is what booting a sandbox's guest takes.
type realGuest struct {
	kernel, initrd, base string
	// jail is smolvm-jail, whose qemu-launch starts jailed QEMUs.
	jail string
}

// driver is the driver as the server makes it, with its launcher.
func (g realGuest) driver() *Driver { return New(Options{HelperPath: g.jail}) }

var realBuild struct {
	once sync.Once
	dir  string // the agent and initramfs built for this test process
	g    realGuest
	skip string
	err  error
}

func TestMain(m *testing.M) {
	code := m.Run()
	if realBuild.dir != "" {
		os.RemoveAll(realBuild.dir)
	}
	os.Exit(code)
}

// needGuest skips the test unless this machine can boot guests (it fails
// under CI, which must have run setup), and builds the agent and an
// initramfs once.
func needGuest(t *testing.T) realGuest {
	t.Helper()
	realBuild.once.Do(func() {
		shared, err := datadir.Default()
		if err != nil {
			realBuild.err = err
			return
		}
		k, kerr := kernel.Default(shared)
		base, ierr := image.Cached(shared)
		_, qerr := exec.LookPath(qemuBinary)
		switch {
		case qerr != nil:
			realBuild.skip = qemuBinary + " is not installed"
			return
		case kerr != nil:
			realBuild.skip = "no guest kernel in " + shared.Path()
			return
		case ierr != nil:
			realBuild.skip = "the default image is not built in " + shared.Path()
			return
		}
		dir, err := os.MkdirTemp("", "smolvm-qemu-test-")
		if err != nil {
			realBuild.err = err
			return
		}
		realBuild.dir = dir
		agent, jail := filepath.Join(dir, "smolvm-agent"), filepath.Join(dir, "smolvm-jail")
		_, file, _, _ := goruntime.Caller(0)
		for out, pkg := range map[string]string{agent: "./cmd/smolvm-agent", jail: "./cmd/smolvm-jail"} {
			cmd := exec.Command("go", "build", "-ldflags=-s -w", "-o", out, pkg)
			cmd.Dir = filepath.Join(filepath.Dir(file), "..", "..", "..")
			cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH=amd64")
			if b, err := cmd.CombinedOutput(); err != nil {
				realBuild.err = errors.New("build " + pkg + ": " + err.Error() + ": " + string(b))
				return
			}
		}
		initrd, err := kernel.BuildInitramfs(context.Background(), datadir.Dir(dir), k, agent)
		if err != nil {
			realBuild.err = err
			return
		}
		realBuild.g = realGuest{kernel: k.Vmlinux, initrd: initrd, base: base.Path, jail: jail}
	})
	if realBuild.skip != "" {
		msg := realBuild.skip + ": run `scripts/setup.sh` (or `smolvm setup`) first"
		if os.Getenv("CI") != "" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	if realBuild.err != nil {
		t.Fatal(realBuild.err)
	}
	return realBuild.g
}

// machineDir is a directory for one machine, short enough for its sockets.
func machineDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "smq")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

func (g realGuest) spec(t *testing.T, id string, extra ...string) vmm.Spec {
	return vmm.Spec{
		ID: id, Dir: machineDir(t), Kernel: g.kernel, Initrd: g.initrd, BaseImage: g.base,
		Cmdline: strings.Join(append([]string{"console=ttyS0", "quiet", "loglevel=3", "oops=panic", "panic=-1",
			"i8042.noaux", "i8042.nomux", "i8042.nopnp", "i8042.dumbkbd", "smolvm.hostname=" + id}, extra...), " "),
		DiskMiB: 1024, MemoryMiB: 256, VCPUs: 1,
	}
}

// killed ends m when the test does.
func killed(t *testing.T, m vmm.Machine) vmm.Machine {
	t.Cleanup(func() { m.Kill(context.Background()) })
	return m
}

// agent waits for m's agent and connects to it.
func agent(t *testing.T, ctx context.Context, m vmm.Machine) *guest.Client {
	t.Helper()
	dctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()
	c, err := guest.Dial(dctx, func(ctx context.Context) (net.Conn, error) {
		if !m.Alive() {
			return nil, errors.New("the VM is gone")
		}
		return m.DialAgent(ctx)
	})
	if err != nil {
		b, _ := os.ReadFile(m.ConsoleLog())
		t.Fatalf("agent: %v; console:\n%s", err, b)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// sh runs script in the guest and returns its output, and an error if it
// did not exit 0.
func sh(t *testing.T, ctx context.Context, c *guest.Client, script string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	var out, errOut bytes.Buffer
	exit, err := c.Exec(ctx, &agentpb.StartRequest{Process: &agentpb.ProcessConfig{Argv: []string{"/bin/sh", "-c", script}}}, &out, &errOut)
	if err != nil {
		t.Fatalf("exec %q: %v", script, err)
	}
	if exit.ExitCode != 0 || exit.Error != "" {
		return out.String(), fmt.Errorf("exit %d %s: %s", exit.ExitCode, exit.Error, errOut.String())
	}
	return out.String(), nil
}

func mustSh(t *testing.T, ctx context.Context, c *guest.Client, script string) string {
	t.Helper()
	out, err := sh(t, ctx, c, script)
	if err != nil {
		t.Fatalf("%q: %v", script, err)
	}
	return out
}

// wantJailed checks each wall of m's jail from outside, as the kernel
// reports it: a user of its own that is not root, no capabilities, no
// new privileges, QEMU's seccomp filter refusing set*id calls too, and a
// root of its own in which, of the host's files, only /usr, the loader's
// cache and its own directory (and the images it reads) are there. It
// returns the user.
func wantJailed(t *testing.T, m vmm.Machine, dir string) string {
	t.Helper()
	proc := fmt.Sprintf("/proc/%d", m.PID())
	uid := jailtest.CheckWalls(t, m.PID(), "jailed QEMU")
	if got := jailtest.Status(t, m.PID())["Seccomp"]; got != "2" {
		t.Errorf("jailed QEMU: Seccomp %q, want 2 (a filter)", got)
	}
	cmdline, _ := os.ReadFile(proc + "/cmdline")
	if !bytes.Contains(cmdline, []byte("elevateprivileges=deny")) || bytes.Contains(cmdline, []byte("-runas")) {
		t.Errorf("jailed QEMU's command line: %q, want elevateprivileges=deny and no -runas", cmdline)
	}
	root := proc + "/root"
	names := func(d string) []string {
		ents, err := os.ReadDir(root + d)
		if err != nil {
			t.Errorf("jailed QEMU's %s: %v", d, err)
		}
		var out []string
		for _, e := range ents {
			out = append(out, e.Name())
		}
		return out
	}
	top := strings.Split(strings.TrimPrefix(dir, "/"), "/")[0]
	for _, n := range names("/") {
		if !slices.Contains([]string{"bin", "sbin", "lib", "lib32", "lib64", "libx32", "usr", "etc", "dev", "proc", top}, n) && !strings.HasPrefix(m.(*machine).rt.Disk, "/"+n) && !strings.HasPrefix(realBuild.g.kernel, "/"+n) && !strings.HasPrefix(realBuild.g.initrd, "/"+n) && !strings.HasPrefix(realBuild.g.base, "/"+n) {
			t.Errorf("jailed QEMU sees /%s", n)
		}
	}
	if got := names("/etc"); !slices.Equal(got, []string{"ld.so.cache"}) {
		t.Errorf("jailed QEMU's /etc holds %q", got)
	}
	// Its own directory and the images it reads, each alone in its
	// directory, and nothing beside them.
	read := append(backingChain(m.(*machine).rt.Disk), realBuild.g.kernel, realBuild.g.initrd)
	parent := filepath.Dir(dir)
	want := []string{filepath.Base(dir)}
	for _, p := range read {
		if got := names(filepath.Dir(p)); !slices.Equal(got, []string{filepath.Base(p)}) {
			t.Errorf("jailed QEMU sees %q beside %s", got, p)
		}
		if rel, err := filepath.Rel(parent, p); err == nil && !strings.HasPrefix(rel, "..") {
			want = append(want, strings.Split(rel, "/")[0])
		}
	}
	for _, n := range names(parent) {
		if !slices.Contains(want, n) {
			t.Errorf("jailed QEMU sees %s in %s, which holds its own directory", n, parent)
		}
	}
	return strconv.Itoa(uid)
}

func wantStatus(t *testing.T, ctx context.Context, d *Driver, m vmm.Machine, want string) {
	t.Helper()
	if got, err := d.Status(ctx, m); err != nil || got != want {
		t.Fatalf("status %q, %v; want %q", got, err, want)
	}
}

// A template's clone is checkpointed while it runs; the copy restored
// from the checkpoint has the clone's memory and disk as they were then,
// and so does a copy of a checkpoint of that copy, taken while paused.
func TestRealCheckpoint(t *testing.T) {
	g := needGuest(t)
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Minute)
	defer cancel()
	d := g.driver()

	// A template, as the sandbox manager makes one.
	tpl := g.spec(t, "tpl")
	tpl.ForSnapshot = true
	tm, err := d.Start(ctx, tpl)
	if err != nil {
		t.Fatal(err)
	}
	killed(t, tm)
	if _, err := agent(t, ctx, tm).Ping(ctx); err != nil {
		t.Fatal(err)
	}
	if err := d.Save(ctx, tm, tpl.Dir); err != nil {
		t.Fatalf("Save: %v", err)
	}
	// The clones' sealed copy is made at once, not by the first clone.
	if d.rams.last == nil {
		t.Error("Save made no sealed copy of the template's memory")
	}

	// Its clone maps the template's RAM file private.
	cloneSpec := g.spec(t, "clone")
	clone, err := d.Restore(ctx, cloneSpec, tpl.Dir)
	if err != nil {
		t.Fatalf("Restore the template: %v", err)
	}
	killed(t, clone)
	cc := agent(t, ctx, clone)
	// It maps a sealed copy, not the template's file, which it could
	// write through; a clone made by another process maps the same copy.
	ram := checkSealedRAM(t, clone.PID(), filepath.Join(tpl.Dir, fileMemory))
	clone2, err := g.driver().Restore(ctx, g.spec(t, "clone2"), tpl.Dir)
	if err != nil {
		t.Fatalf("Restore the template again: %v", err)
	}
	killed(t, clone2)
	if ram2 := checkSealedRAM(t, clone2.PID(), filepath.Join(tpl.Dir, fileMemory)); ram2 != ram {
		t.Errorf("two clones of one template map different copies of its RAM (inodes %d and %d)", ram, ram2)
	}
	if got := mustSh(t, ctx, agent(t, ctx, clone2), "echo clone2"); got != "clone2\n" {
		t.Errorf("the second clone answers %q", got)
	}
	// An emulated guest runs with fixed address layouts, which lets TCG
	// reuse the code it translated for one process in the next, and
	// without the kernel's defences against speculation, which an
	// emulated CPU does not do.
	if got := mustSh(t, ctx, cc, "cat /proc/sys/kernel/randomize_va_space; grep -o 'norandmaps mitigations=off tsc=reliable' /proc/cmdline; cut -d';' -f1 /sys/devices/system/cpu/vulnerabilities/spectre_v2"); got != "0\nnorandmaps mitigations=off tsc=reliable\nVulnerable\n" {
		t.Errorf("emulated guest: randomize_va_space, command line and spectre_v2 say %q, want 0, norandmaps mitigations=off tsc=reliable, Vulnerable", got)
	}
	if d.accel != "kvm" {
		checkEmulatedThreads(t, clone.PID())
		// No ERMS, so the guest copies memory eight bytes per step of
		// TCG's loop rather than one; the rest of what TCG emulates stays.
		if got := mustSh(t, ctx, cc, "flags=$(grep -m1 '^flags' /proc/cpuinfo); for f in erms sse4_2 avx2; do case \" $flags \" in *\" $f \"*) echo $f;; esac; done"); got != "sse4_2\navx2\n" {
			t.Errorf("emulated guest's CPU has, of erms, sse4_2 and avx2: %q; want sse4_2 and avx2", got)
		}
	}
	// The root filesystem leaves its inode tables as they are and reads
	// its bitmaps when needed: no kernel thread goes on zeroing and
	// reading in every clone.
	if got := mustSh(t, ctx, cc, "awk '$2 == \"/\" {print $4}' /proc/mounts | tr , '\\n' | grep -x -e noinit_itable -e no_prefetch_block_bitmaps | sort; grep -lx ext4lazyinit /proc/[0-9]*/comm || true"); got != "no_prefetch_block_bitmaps\nnoinit_itable\n" {
		t.Errorf("clone: root mount options and lazy-init threads say %q, want noinit_itable, no_prefetch_block_bitmaps and no thread", got)
	}
	mark := mustSh(t, ctx, cc, "head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n' | tee /dev/shm/mark; echo on disk > /root/before; sync")
	if len(mark) != 32 {
		t.Fatalf("mark %q", mark)
	}

	ck := machineDir(t)
	start := time.Now()
	if err := d.Checkpoint(ctx, clone, ck); err != nil {
		t.Fatalf("Checkpoint: %v", err)
	}
	t.Logf("checkpoint of a running clone took %s", time.Since(start))
	for _, f := range []string{fileState, fileDisk} {
		if _, err := os.Stat(filepath.Join(ck, f)); err != nil {
			t.Errorf("checkpoint lacks %s: %v", f, err)
		}
	}
	if _, err := os.Stat(filepath.Join(ck, fileMemory)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("checkpoint has a memory file: %v", err)
	}
	// The clone runs on, its disk writable again (cont took it back).
	wantStatus(t, ctx, d, clone, "running")
	if got := mustSh(t, ctx, cc, "cat /dev/shm/mark; echo later > /root/after; sync; rm /dev/shm/mark"); got != mark {
		t.Errorf("the clone's mark after its checkpoint: %q, want %q", got, mark)
	}
	// QEMU aborts on a write to a disk it gave up; this one was taken back.
	wantStatus(t, ctx, d, clone, "running")

	// The fork: RAM from the state into anonymous memory, disk over the
	// checkpoint's copy.
	forkSpec := g.spec(t, "fork")
	fork, err := d.Restore(ctx, forkSpec, ck)
	if err != nil {
		t.Fatalf("Restore the checkpoint: %v", err)
	}
	killed(t, fork)
	wantStatus(t, ctx, d, fork, "running")
	fc := agent(t, ctx, fork)
	if os.Geteuid() == 0 {
		cloneUID := wantJailed(t, clone, cloneSpec.Dir)
		if forkUID := wantJailed(t, fork, forkSpec.Dir); forkUID == cloneUID {
			t.Errorf("the clone and the fork run as the same user %s", forkUID)
		}
	}
	if got := mustSh(t, ctx, fc, "cat /dev/shm/mark /root/before; test ! -e /root/after && echo no after"); got != mark+"on disk\nno after\n" {
		t.Errorf("the fork sees %q, want the mark, the file written before and not the one after", got)
	}
	if !d.Uses(forkSpec.Dir, ck) || !d.Uses(forkSpec.Dir, tpl.Dir) || d.Uses(forkSpec.Dir, cloneSpec.Dir) {
		t.Errorf("Uses(fork): checkpoint %v, template %v, clone %v; want true, true, false",
			d.Uses(forkSpec.Dir, ck), d.Uses(forkSpec.Dir, tpl.Dir), d.Uses(forkSpec.Dir, cloneSpec.Dir))
	}

	// Paused, checkpointed, still paused; and then as usable as before.
	if err := d.Pause(ctx, fork); err != nil {
		t.Fatal(err)
	}
	if err := d.Pause(ctx, fork); err != nil {
		t.Fatalf("second Pause: %v", err)
	}
	wantStatus(t, ctx, d, fork, "paused")
	ck2 := machineDir(t)
	if err := d.Checkpoint(ctx, fork, ck2); err != nil {
		t.Fatalf("Checkpoint a paused VM: %v", err)
	}
	wantStatus(t, ctx, d, fork, "paused")
	// A disk left to the migration's destination would crash QEMU here.
	if err := d.Resize(ctx, fork, 2<<30); err != nil {
		t.Fatalf("Resize after a paused checkpoint: %v", err)
	}
	if err := d.Resume(ctx, fork); err != nil {
		t.Fatal(err)
	}
	if err := d.Resume(ctx, fork); err != nil {
		t.Fatalf("second Resume: %v", err)
	}
	wantStatus(t, ctx, d, fork, "running")
	if got := mustSh(t, ctx, fc, "echo fork > /root/fork; sync; cat /dev/shm/mark"); got != mark {
		t.Errorf("the fork after pause, checkpoint and resume: %q", got)
	}

	// A copy of the paused checkpoint: anonymous RAM to anonymous RAM.
	fork2, err := d.Restore(ctx, g.spec(t, "fork2"), ck2)
	if err != nil {
		t.Fatalf("Restore the paused checkpoint: %v", err)
	}
	killed(t, fork2)
	wantStatus(t, ctx, d, fork2, "running")
	if got := mustSh(t, ctx, agent(t, ctx, fork2), "cat /dev/shm/mark; test ! -e /root/fork && echo no fork"); got != mark+"no fork\n" {
		t.Errorf("the second fork sees %q", got)
	}
}

// Host directories mounted over virtio-9p: read-only and read-write, with
// a comma in the host path and a space in the guest's.
func TestRealMounts(t *testing.T) {
	g := needGuest(t)
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Minute)
	defer cancel()
	d := g.driver()

	host := t.TempDir()
	ro, rw := filepath.Join(host, "read,only"), filepath.Join(host, "rw")
	for _, dir := range []string{ro, rw} {
		if err := os.Mkdir(dir, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(ro, "hello"), []byte("from the host\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	// As root, the shares belong to a user, as a user's project would:
	// QEMU then runs as that user.
	const owner = 65534
	jailed := os.Geteuid() == 0
	if jailed {
		for _, p := range []string{ro, rw, filepath.Join(ro, "hello")} {
			if err := os.Chown(p, owner, owner); err != nil {
				t.Fatal(err)
			}
		}
	}
	mounts := []vmm.Mount{
		{Tag: "m0", HostPath: ro, GuestPath: "/mnt/host files", ReadOnly: true},
		{Tag: "m1", HostPath: rw, GuestPath: "/work"},
		// A share the host did not give: logged, and the rest go on.
		{Tag: "m9", GuestPath: "/missing"},
	}
	var params []string
	for _, m := range mounts {
		params = append(params, vmm.MountCmdline(m))
	}
	spec := g.spec(t, "mounts", params...)
	spec.Mounts = mounts[:2]
	start := time.Now()
	m, err := d.Start(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	killed(t, m)
	c := agent(t, ctx, m)
	t.Logf("boot with two shares took %s", time.Since(start))

	if got := mustSh(t, ctx, c, "cat '/mnt/host files/hello'"); got != "from the host\n" {
		t.Errorf("read-only share: %q", got)
	}
	if _, err := sh(t, ctx, c, "echo no > '/mnt/host files/new'"); err == nil {
		t.Error("wrote into the read-only share")
	}
	mustSh(t, ctx, c, "echo from the guest > /work/out && mkdir -p /work/d/e")
	if b, err := os.ReadFile(filepath.Join(rw, "out")); err != nil || string(b) != "from the guest\n" {
		t.Errorf("read-write share on the host: %q, %v", b, err)
	}
	if jailed {
		status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", m.PID()))
		if err != nil {
			t.Fatal(err)
		}
		for _, want := range []string{fmt.Sprintf("Uid:\t%d\t%d\t%d\t%d\n", owner, owner, owner, owner), "CapEff:\t0000000000000000\n", "Seccomp:\t2\n"} {
			if !strings.Contains(string(status), want) {
				t.Errorf("QEMU sharing a user's directories: status lacks %q:\n%s", want, status)
			}
		}
		// In a root of its own that holds the shares and its own
		// directory, and nothing else of the test's.
		jailtest.CheckRoot(t, m.PID(), "QEMU sharing a user's directories")
		if st := jailtest.Status(t, m.PID()); st["NoNewPrivs"] != "1" || st["Groups"] != "" {
			t.Errorf("QEMU sharing a user's directories: NoNewPrivs %q Groups %q", st["NoNewPrivs"], st["Groups"])
		}
		seen, err := os.ReadDir(fmt.Sprintf("/proc/%d/root%s", m.PID(), host))
		if err != nil {
			t.Fatal(err)
		}
		var names []string
		for _, e := range seen {
			names = append(names, e.Name())
		}
		if !slices.Equal(names, []string{"read,only", "rw"}) {
			t.Errorf("QEMU sharing a user's directories sees %q in %s, want the two shares", names, host)
		}
		if cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", m.PID())); !bytes.Contains(cmdline, []byte("elevateprivileges=deny")) || bytes.Contains(cmdline, []byte("-runas")) {
			t.Errorf("QEMU sharing a user's directories: command line %q, want elevateprivileges=deny and no -runas", cmdline)
		}
		// What the guest makes in a share belongs to the share's owner.
		var st syscall.Stat_t
		if err := syscall.Stat(filepath.Join(rw, "out"), &st); err != nil || st.Uid != owner {
			t.Errorf("the guest's file in the share is owned by %d (%v), want %d", st.Uid, err, owner)
		}
	}
	if st, err := os.Stat(filepath.Join(rw, "d", "e")); err != nil || !st.IsDir() {
		t.Errorf("directory made in the share: %v", err)
	}
	mounted := mustSh(t, ctx, c, "grep ' 9p ' /proc/mounts")
	if !strings.Contains(mounted, "m0 /mnt/host\\040files 9p ro,") || !strings.Contains(mounted, "m1 /work 9p rw,") || strings.Contains(mounted, "m9") {
		t.Errorf("9p mounts in the guest:\n%s", mounted)
	}
	if b, _ := os.ReadFile(m.ConsoleLog()); !strings.Contains(string(b), `mount share m9 at /missing`) {
		t.Errorf("the missing share is not on the console:\n%s", b)
	}

	// QEMU cannot migrate a mounted 9p share: the checkpoint fails, and
	// leaves the VM running and nothing written.
	ck := machineDir(t)
	err = d.Checkpoint(ctx, m, ck)
	if err == nil {
		t.Fatal("Checkpoint of a VM with a mounted share succeeded")
	}
	t.Logf("checkpoint with a share: %v", err)
	wantStatus(t, ctx, d, m, "running")
	if ents, _ := os.ReadDir(ck); len(ents) != 0 {
		t.Errorf("a failed checkpoint left %v", ents)
	}
	if got := mustSh(t, ctx, c, "cat /work/out"); got != "from the guest\n" {
		t.Errorf("after the failed checkpoint: %q", got)
	}

	// Once QEMU has ended, what its user was given is root's again.
	if err := m.Kill(ctx); err != nil {
		t.Fatal(err)
	}
	if jailed {
		for _, p := range []string{spec.Dir, filepath.Join(spec.Dir, fileDisk), m.ConsoleLog()} {
			var st syscall.Stat_t
			if err := syscall.Stat(p, &st); err != nil || st.Uid != 0 || st.Gid != 0 {
				t.Errorf("%s after QEMU ended: %d:%d (%v), want root's", p, st.Uid, st.Gid, err)
			}
		}
	}
}

// A VMM is held to its memory limit: a guest that touches more memory
// than its VMM may hold gets that VMM killed inside its control group,
// and nothing else on the host is touched.
func TestRealMemoryLimit(t *testing.T) {
	g := needGuest(t)
	d := g.driver()
	if d.cgroups == nil {
		t.Skipf("no control groups for VMMs here (root: %v; %v)", os.Geteuid() == 0, d.cgroupErr)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Minute)
	defer cancel()
	spec := g.spec(t, "memlimit")
	spec.MemoryMiB, spec.MemoryLimitMiB = 384, 256
	m, err := d.Start(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	killed(t, m)
	c := agent(t, ctx, m)
	qm := m.(*machine)
	group := cgroup.Open(*d.cgroups, qm.rt.Cgroup)
	in, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", m.PID()))
	if err != nil || !strings.Contains(string(in), "/smolvm/"+qm.rt.Cgroup) {
		t.Fatalf("the VMM's groups: %q, %v; want %s", in, err, qm.rt.Cgroup)
	}
	// 300 MiB in the guest's RAM: over the VMM's 256 MiB, under the
	// guest's 384.
	var out bytes.Buffer
	c.Exec(ctx, &agentpb.StartRequest{Process: &agentpb.ProcessConfig{Argv: []string{"/bin/sh", "-c", "head -c 300M /dev/zero > /dev/shm/fill; echo filled"}}}, &out, &out)
	if strings.Contains(out.String(), "filled") {
		t.Fatalf("the guest filled 300 MiB and its VMM lives: %q", out.String())
	}
	for deadline := time.Now().Add(time.Minute); m.Alive(); time.Sleep(50 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the VMM over its limit is still running")
		}
	}
	if n, err := group.OOMKills(); err != nil || n < 1 {
		t.Errorf("the group's OOM kills: %d, %v; want the VMM killed for its limit", n, err)
	}
	if err := m.Wait(ctx); err != nil {
		t.Fatal(err)
	}
	// Wait removed the group.
	if _, err := os.Stat(group.Dir("memory")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the ended VMM's group is still there: %v", err)
	}
	console, _ := os.ReadFile(m.ConsoleLog())
	if bytes.Contains(console, []byte("Out of memory")) {
		t.Errorf("the guest's own OOM killer acted, not the host's limit:\n%s", console)
	}
}

// Under smolvm.poweroff=reset (what Firecracker and libkrun guests get,
// having no ACPI power button) the agent ends the VM with a reset when
// asked to shut down; QEMU, started with -no-reboot, then exits as it
// does on a power-off.
func TestRealPowerOffByReset(t *testing.T) {
	t.Parallel()
	g := needGuest(t)
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Minute)
	defer cancel()
	d := g.driver()
	spec := g.spec(t, "reset", "smolvm.poweroff=reset")
	m, err := d.Start(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	killed(t, m)
	if err := agent(t, ctx, m).Shutdown(ctx); err != nil {
		t.Fatalf("shutdown: %v", err)
	}
	if err := m.Wait(ctx); err != nil {
		t.Fatalf("the VM did not end after a shutdown by reset: %v", err)
	}
	// The kernel says which it did, at a level quiet does not hide.
	b, _ := os.ReadFile(m.ConsoleLog())
	if !strings.Contains(string(b), "reboot: Restarting system") || strings.Contains(string(b), "reboot: Power down") {
		t.Errorf("console does not show a reset:\n%s", b)
	}
}

// A VMM's disk I/O is capped on the host disk that holds its directory,
// and what the guest writes and syncs passes through that cap: the
// kernel counts it against the VMM's group.
func TestRealDiskIOCap(t *testing.T) {
	t.Parallel()
	g := needGuest(t)
	d := g.driver()
	if d.cgroups == nil || d.cgroups.Mounts["io"] == "" {
		t.Skipf("no io control group for VMMs here (root: %v; %v)", os.Geteuid() == 0, d.cgroupErr)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Minute)
	defer cancel()
	spec := g.spec(t, "diskio")
	major, minor, ok := cgroup.DiskOf(spec.Dir)
	if !ok {
		t.Skipf("%s is on no block device of its own", spec.Dir)
	}
	spec.DiskIO = vmm.DiskIO{WriteBPS: 64 << 20}
	m, err := d.Start(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	killed(t, m)
	c := agent(t, ctx, m)
	dir := cgroup.Open(*d.cgroups, m.(*machine).rt.Cgroup).Dir("io")
	dev := fmt.Sprintf("%d:%d", major, minor)
	// v1 caps reads only (cgroup.setIO says why).
	caps := map[string]string{
		"blkio.throttle.write_bps_device": "",
		"blkio.throttle.read_bps_device":  fmt.Sprintf("%s %d", dev, vmm.DefaultDiskBPS),
		"blkio.throttle.read_iops_device": fmt.Sprintf("%s %d", dev, vmm.DefaultDiskIOPS),
	}
	if d.cgroups.V2 {
		caps = map[string]string{"io.max": fmt.Sprintf("%s rbps=%d wbps=67108864 riops=%d wiops=%d", dev, vmm.DefaultDiskBPS, vmm.DefaultDiskIOPS, vmm.DefaultDiskIOPS)}
	}
	for f, want := range caps {
		b, err := os.ReadFile(filepath.Join(dir, f))
		if err != nil || strings.TrimSpace(string(b)) != want {
			t.Errorf("%s = %q, %v; want %q", f, b, err, want)
		}
	}
	// 16 MiB written and synced in the guest: QEMU flushes the disk file,
	// and the host writes it out from QEMU's own thread.
	mustSh(t, ctx, c, "dd if=/dev/urandom of=/root/blob bs=1M count=16 conv=fsync 2>/dev/null; sync")
	stat := "blkio.throttle.io_service_bytes"
	if d.cgroups.V2 {
		stat = "io.stat"
	}
	b, err := os.ReadFile(filepath.Join(dir, stat))
	if err != nil {
		t.Fatal(err)
	}
	var written int64
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		switch {
		case !d.cgroups.V2 && len(f) == 3 && f[0] == dev && f[1] == "Write":
			fmt.Sscan(f[2], &written)
		case d.cgroups.V2 && len(f) > 1 && f[0] == dev:
			for _, kv := range f[1:] {
				if v, ok := strings.CutPrefix(kv, "wbytes="); ok {
					fmt.Sscan(v, &written)
				}
			}
		}
	}
	t.Logf("the VMM's group counts %d bytes written to %s", written, dev)
	if written < 8<<20 {
		t.Errorf("the VMM's group counts %d bytes written to %s, want the guest's 16 MiB or most of it:\n%s", written, dev, b)
	}
}

// checkSealedRAM checks that QEMU pid holds no descriptor of the template
// RAM file tplRAM, and maps instead a memfd that refuses writes, whose
// inode it returns.
func checkSealedRAM(t *testing.T, pid int, tplRAM string) uint64 {
	t.Helper()
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range fds {
		if target, _ := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", pid, e.Name())); target == tplRAM {
			t.Errorf("the clone holds the template's RAM file as descriptor %s", e.Name())
		}
	}
	link := fmt.Sprintf("/proc/%d/fd/%d", pid, ramFD)
	if target, err := os.Readlink(link); err != nil || !strings.HasPrefix(target, "/memfd:smolvm-ram:") {
		t.Fatalf("the clone's descriptor %d is %q (%v), want the sealed RAM", ramFD, target, err)
	}
	f, err := os.OpenFile(link, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt([]byte("x"), 4096); !errors.Is(err, syscall.EPERM) {
		t.Errorf("a write into the sealed RAM: %v, want EPERM", err)
	}
	if err := f.Truncate(0); err == nil {
		t.Error("the sealed RAM could be truncated")
	}
	var st syscall.Stat_t
	if err := syscall.Fstat(int(f.Fd()), &st); err != nil {
		t.Fatal(err)
	}
	return st.Ino
}

// checkEmulatedThreads checks how an emulated machine's QEMU runs: its
// main loop cannot preempt the vCPU thread on waking, the vCPU thread (the
// one that has run longest) keeps the normal policy, and every virtio
// device is notified in the vCPU thread, without an ioeventfd.
func checkEmulatedThreads(t *testing.T, pid int) {
	t.Helper()
	policy := func(tid int) uint32 {
		attr, err := unix.SchedGetAttr(tid, 0)
		if err != nil {
			t.Fatalf("sched_getattr %d: %v", tid, err)
		}
		return attr.Policy
	}
	if p := policy(pid); p != unix.SCHED_BATCH {
		t.Errorf("QEMU's main loop thread has scheduling policy %d, want SCHED_BATCH (%d)", p, unix.SCHED_BATCH)
	}
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	if err != nil {
		t.Fatal(err)
	}
	busiest, most := 0, int64(-1)
	for _, e := range ents {
		tid, _ := strconv.Atoi(e.Name())
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/schedstat", pid, tid))
		if err != nil {
			continue // a thread that ended meanwhile
		}
		var run int64
		fmt.Sscan(string(b), &run)
		if tid != pid && run > most {
			busiest, most = tid, run
		}
	}
	if busiest == 0 {
		t.Fatal("QEMU has no thread but its main loop")
	}
	if p := policy(busiest); p != unix.SCHED_NORMAL {
		t.Errorf("QEMU's vCPU thread (%d) has scheduling policy %d, want SCHED_OTHER (%d)", busiest, p, unix.SCHED_NORMAL)
	}
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, arg := range strings.Split(string(cmdline), "\x00") {
		if strings.HasPrefix(arg, "virtio-") && strings.Contains(arg, "-pci") {
			n++
			if !strings.Contains(arg, ",ioeventfd=off") {
				t.Errorf("emulated machine's device %q keeps its ioeventfd", arg)
			}
		}
	}
	if n < 2 {
		t.Errorf("QEMU's command line has %d virtio PCI devices, want the disk and the agent's port at least: %q", n, cmdline)
	}
}

package firecracker

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/smolvm/smolvm/internal/cgroup"
	"github.com/smolvm/smolvm/internal/jail"
	"github.com/smolvm/smolvm/internal/jail/jailtest"
	"github.com/smolvm/smolvm/internal/vmm"
)

// env is a driver pointed at the fake Firecracker (this test binary), with
// a kernel, an initramfs and a base image.
type env struct {
	t                    *testing.T
	d                    *Driver
	log                  string // the fake's records
	work                 string // where sandboxes live: a jailed VM cannot reach it by path
	kernel, initrd, base string
}

func newEnv(t *testing.T, jailed bool) *env {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("the firecracker driver needs root (namespaces, jail users)")
	}
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	// The fake runs in its VM's root, as a jail user: it reaches its
	// records through a link in each VM's directory (fakeRecords), all
	// to this one file, which anyone may write.
	e := &env{t: t, work: t.TempDir()}
	e.log = filepath.Join(e.work, "records.jsonl")
	if err := os.WriteFile(e.log, nil, 0o666); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(e.log, 0o666); err != nil {
		t.Fatal(err)
	}
	e.d = New(Options{Binary: exe, HelperPath: exe, NoJail: !jailed, Env: []string{fakeEnv + "=1", fakeLogEnv + "=" + fakeRecords, fakeSeeEnv + "=" + strings.Join(hostFiles, ":")}})
	if jailed && e.d.jail == nil {
		t.Fatal("a root driver without NoJail has no jail")
	}
	e.kernel = filepath.Join(e.work, "vmlinux")
	e.initrd = filepath.Join(e.work, "initrd.img")
	for _, p := range []string{e.kernel, e.initrd} {
		if err := os.WriteFile(p, []byte("not really "+filepath.Base(p)), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	e.base = filepath.Join(e.work, "base.ext4")
	makeSparse(t, e.base, 64<<20, baseData)
	return e
}

// hostFiles are files of the host anyone may read, which no Firecracker
// may see.
var hostFiles = []string{"/etc/passwd", "/proc/1/status", "/sys/kernel/mm/transparent_hugepage/enabled"}

// fakeRecords is the name, in each VM's directory, of the fakes' records.
const fakeRecords = "fake-records.jsonl"

// baseData is what the base image holds, by offset; the rest is holes.
var baseData = map[int64]string{0: "superblock", 8 << 20: "inode table", 40 << 20: "a file"}

// makeSparse writes a sparse file of size bytes with data at its offsets.
func makeSparse(t *testing.T, path string, size int64, data map[int64]string) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for off, s := range data {
		if _, err := f.WriteAt(bytes.Repeat([]byte(s), 4096/len(s)+1)[:4096], off); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
}

func (e *env) spec(name string) vmm.Spec {
	e.t.Helper()
	dir := filepath.Join(e.work, name)
	if err := os.Mkdir(dir, 0o755); err != nil {
		e.t.Fatal(err)
	}
	if err := os.Link(e.log, filepath.Join(dir, fakeRecords)); err != nil {
		e.t.Fatal(err)
	}
	return vmm.Spec{
		ID: name, Dir: dir,
		Kernel: e.kernel, Initrd: e.initrd,
		Cmdline:   "console=ttyS0 panic=-1 smolvm.hostname=" + name,
		BaseImage: e.base, DiskMiB: 128,
		MemoryMiB: 128, VCPUs: 2,
	}
}

func (e *env) records() []record { return readRecords(e.t, e.log) }

// failing has the fakes started from now until t ends answer request
// ("METHOD /path") 400.
func (e *env) failing(t *testing.T, request string) {
	env := e.d.opts.Env
	e.d.opts.Env = append(slices.Clone(env), fakeFailEnv+"="+request)
	t.Cleanup(func() { e.d.opts.Env = env })
}

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// killAtEnd ends m when the test does, whatever happened.
func killAtEnd(t *testing.T, m vmm.Machine) {
	t.Cleanup(func() { m.Kill(context.Background()) })
}

// wantRequests checks the requests process pid got, in order, each
// answered 204, with these bodies (compared as JSON values).
func wantRequests(t *testing.T, recs []record, pid int, want [][2]string) {
	t.Helper()
	got := requestsOf(recs, pid)
	var gotLines, wantLines []string
	for _, w := range want {
		wantLines = append(wantLines, w[0])
	}
	gotLines = lines(got)
	if !slices.Equal(gotLines, wantLines) {
		t.Fatalf("requests of process %d:\n got %q\nwant %q", pid, gotLines, wantLines)
	}
	for i, r := range got {
		if r.Status != 204 {
			t.Errorf("%s answered %d: %s", gotLines[i], r.Status, r.Fault)
		}
		if want[i][1] == "" {
			continue
		}
		var g, w any
		json.Unmarshal(r.Body, &g)
		if err := json.Unmarshal([]byte(want[i][1]), &w); err != nil {
			t.Fatalf("want body %s: %v", want[i][1], err)
		}
		gb, _ := json.Marshal(g)
		wb, _ := json.Marshal(w)
		if !bytes.Equal(gb, wb) {
			t.Errorf("%s body:\n got %s\nwant %s", gotLines[i], gb, wb)
		}
	}
}

// logRequests are the logger and metrics requests every launch starts with.
var logRequests = [][2]string{
	{"PUT /logger", `{"log_path":"` + vmDir + `/run/fc.log","level":"Warning","show_level":true,"show_log_origin":false}`},
	{"PUT /metrics", `{"metrics_path":"` + vmDir + `/run/metrics.json"}`},
}

func bootRequests(spec vmm.Spec, net bool) [][2]string {
	want := append(slices.Clone(logRequests),
		[2]string{"PUT /boot-source", `{"kernel_image_path":"/proc/self/fd/5","initrd_path":"/proc/self/fd/6","boot_args":"` + spec.Cmdline + ` reboot=k pci=off smolvm.poweroff=reset"}`},
		[2]string{"PUT /drives/rootfs", `{"drive_id":"rootfs","path_on_host":"` + vmDir + `/rootfs.ext4","is_root_device":true,"is_read_only":false}`},
		[2]string{"PUT /machine-config", `{"vcpu_count":` + strconv.Itoa(spec.VCPUs) + `,"mem_size_mib":` + strconv.Itoa(spec.MemoryMiB) + `}`},
		[2]string{"PUT /vsock", `{"guest_cid":3,"uds_path":"` + vmDir + `/run/vsock.sock"}`},
	)
	if net {
		want = append(want, [2]string{"PUT /network-interfaces/eth0", `{"iface_id":"eth0","host_dev_name":"tap0","guest_mac":"` + spec.Net.MAC + `"}`})
	}
	return append(want, [2]string{"PUT /actions", `{"action_type":"InstanceStart"}`})
}

// startedEvent is what the fake recorded of its process.
func startedEvent(t *testing.T, recs []record, pid int) map[string]any {
	t.Helper()
	ev := eventsOf(recs, pid, "started")
	if len(ev) != 1 {
		t.Fatalf("process %d recorded %d starts", pid, len(ev))
	}
	return ev[0].Data
}

func nsOf(kind string) string { s, _ := os.Readlink("/proc/self/ns/" + kind); return s }

// checkJailed checks that process pid ran as a jail user of its own,
// without privileges, in its namespaces and control group.
func checkJailed(t *testing.T, recs []record, pid int, spec vmm.Spec) int {
	t.Helper()
	ev := startedEvent(t, recs, pid)
	uid := int(ev["uid"].(float64))
	if uid < jail.VMMBase || uid >= jail.VMMBase+jail.PerRange || int(ev["gid"].(float64)) != uid {
		t.Errorf("firecracker ran as %v:%v, not a jail user", ev["uid"], ev["gid"])
	}
	if ev["groups"] != "" || ev["no_new_privs"] != "1" || ev["cap_eff"] != "0000000000000000" {
		t.Errorf("firecracker kept privileges: groups %q no_new_privs %v capabilities %v", ev["groups"], ev["no_new_privs"], ev["cap_eff"])
	}
	if ev["mnt_ns"] == nsOf("mnt") {
		t.Error("firecracker ran in the host's mount namespace")
	}
	if ev["net_ns"] == nsOf("net") {
		t.Error("firecracker ran in the host's network namespace")
	}
	if ev["cwd"] != vmDir {
		t.Errorf("firecracker's working directory is %v", ev["cwd"])
	}
	checkRoot(t, ev, pid)
	wantArgs := []any{"firecracker", "--api-sock", vmDir + "/run/fc.sock", "--id", marker(spec.Dir)}
	if args, _ := ev["args"].([]any); !slices.Equal(args, wantArgs) {
		t.Errorf("firecracker's arguments %q, want %q", ev["args"], wantArgs)
	}
	if h, err := cgroup.Detect(cgroup.Root); err == nil && len(h.Mounts) > 0 {
		if !strings.Contains(ev["cgroup"].(string), "/smolvm/"+vmm.GroupName(spec)) {
			t.Errorf("firecracker is not in its control group %s: %s", vmm.GroupName(spec), ev["cgroup"])
		}
		t.Logf("firecracker's control groups: %q", ev["cgroup"])
	}
	return uid
}

// checkRoot checks, from what the fake recorded, that Firecracker (pid)
// ran in a root of its own: only /dev, /proc and its directory, its
// own process alone in /proc, and none of the host's files.
func checkRoot(t *testing.T, ev map[string]any, pid int) {
	t.Helper()
	var root []string
	for _, n := range ev["root"].([]any) {
		root = append(root, n.(string))
	}
	if !slices.Equal(root, []string{"dev", "proc", "run"}) {
		t.Errorf("firecracker's root holds %q, want dev, proc and run", root)
	}
	if procs, _ := ev["procs"].([]any); len(procs) != 1 || procs[0] != strconv.Itoa(pid) {
		t.Errorf("firecracker's /proc shows processes %v, want its own (%d) alone", procs, pid)
	}
	opened, _ := ev["opened"].(map[string]any)
	for _, p := range hostFiles {
		if got, ok := opened[p].(string); !ok || !strings.Contains(got, "no such file") {
			t.Errorf("firecracker opening the host's %s: %v, want no such file", p, opened[p])
		}
	}
}

// groupGone checks that spec's control group was removed.
func groupGone(t *testing.T, spec vmm.Spec) {
	t.Helper()
	h, err := cgroup.Detect(cgroup.Root)
	if err != nil {
		return
	}
	g := cgroup.Open(h, vmm.GroupName(spec))
	for _, c := range []string{"memory", "pids", "cpu"} {
		if d := g.Dir(c); d != "" {
			if _, err := os.Stat(d); err == nil {
				t.Errorf("control group %s is still there", d)
			}
		}
	}
}

// entries lists what dir holds.
func entries(t *testing.T, dir string) []string {
	t.Helper()
	es, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range es {
		if e.Name() != fakeRecords { // the test's, not the driver's
			out = append(out, e.Name())
		}
	}
	return out
}

// ping checks the agent's stream through m's vsock: the fake echoes.
func ping(t *testing.T, ctx context.Context, m vmm.Machine) {
	t.Helper()
	c, err := m.DialAgent(ctx)
	if err != nil {
		t.Fatalf("dial the agent: %v", err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 4)
	if _, err := io.ReadFull(c, b); err != nil || string(b) != "ping" {
		t.Fatalf("echo through the vsock: %q, %v", b, err)
	}
}

func TestStartConfiguresJailsAndKills(t *testing.T) {
	e := newEnv(t, true)
	ctx := testCtx(t)
	t.Setenv("SMOLVM_TEST_SECRET", "the server's, not the VM's")
	spec := e.spec("vm-a")
	m, err := e.d.Start(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	killAtEnd(t, m)
	recs := e.records()
	wantRequests(t, recs, m.PID(), bootRequests(spec, false))
	uid := checkJailed(t, recs, m.PID(), spec)
	if got := jailtest.CheckWalls(t, m.PID(), "firecracker"); got != uid {
		t.Errorf("firecracker runs as %d, and recorded %d", got, uid)
	}
	// Firecracker's environment is the driver's Env and nothing else.
	var env []string
	for _, v := range startedEvent(t, recs, m.PID())["env"].([]any) {
		env = append(env, v.(string))
	}
	if !slices.Equal(env, e.d.opts.Env) {
		t.Errorf("firecracker's environment is %q, want %q", env, e.d.opts.Env)
	}

	// The directory, and Firecracker's own once its sockets are made, let
	// the jail's user in and no one else, and it can make or replace
	// nothing in them; the disk is its.
	var st syscall.Stat_t
	for _, d := range []string{spec.Dir, filepath.Join(spec.Dir, dirRun)} {
		if err := syscall.Stat(d, &st); err != nil || st.Uid != 0 || int(st.Gid) != uid || st.Mode&0o777 != 0o710 {
			t.Errorf("%s: uid %d gid %d mode %o", d, st.Uid, st.Gid, st.Mode&0o777)
		}
	}
	if err := syscall.Stat(filepath.Join(spec.Dir, fileDisk), &st); err != nil || int(st.Uid) != uid {
		t.Errorf("the disk is not the jail user's: uid %d (%v)", st.Uid, err)
	}
	// The disk: a sparse copy of the base grown to the size asked for.
	checkDisk(t, filepath.Join(spec.Dir, fileDisk), int64(spec.DiskMiB)<<20)

	// Found again from its record, in this process or another.
	m2, err := e.d.Attach(m.Runtime())
	if err != nil {
		t.Fatal(err)
	}
	if m2.PID() != m.PID() || !m2.Alive() || m2.ConsoleLog() != filepath.Join(spec.Dir, fileConsole) {
		t.Fatalf("attached: pid %d alive %v console %s", m2.PID(), m2.Alive(), m2.ConsoleLog())
	}
	ping(t, ctx, m2)
	console, _ := os.ReadFile(m.ConsoleLog())
	if !strings.Contains(string(console), "the guest runs") {
		t.Errorf("console.log does not have the guest's output: %q", console)
	}
	if id, err := e.d.Identity(ctx); err != nil || id != "firecracker "+fakeVersion+"; root "+vmDir {
		t.Errorf("Identity = %q, %v", id, err)
	}

	if err := m2.Kill(ctx); err != nil {
		t.Fatal(err)
	}
	if m.Alive() {
		t.Fatal("firecracker outlived Kill")
	}
	groupGone(t, spec)
	// What the jail's user was given is root's again: the user may go to
	// another VM.
	for _, p := range []string{spec.Dir, filepath.Join(spec.Dir, dirRun), filepath.Join(spec.Dir, fileDisk)} {
		if err := syscall.Stat(p, &st); err != nil || st.Uid != 0 || st.Gid != 0 {
			t.Errorf("%s after the VM ended: uid %d gid %d (%v), want root's", p, st.Uid, st.Gid, err)
		}
	}
	if err := e.d.Clear(spec.Dir); err != nil {
		t.Fatal(err)
	}
	if left := entries(t, spec.Dir); len(left) != 0 {
		t.Errorf("Clear left %q", left)
	}
}

// checkDisk checks that the disk at p is size bytes, holds the base
// image's data, and takes little more room than that data.
func checkDisk(t *testing.T, p string, size int64) {
	t.Helper()
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var st syscall.Stat_t
	if err := syscall.Fstat(int(f.Fd()), &st); err != nil {
		t.Fatal(err)
	}
	if st.Size != size {
		t.Errorf("disk is %d bytes, want %d", st.Size, size)
	}
	if used := st.Blocks * 512; used > 1<<20 {
		t.Errorf("disk takes %d bytes: not sparse (the base holds %d)", used, len(baseData)*4096)
	}
	for off, s := range baseData {
		b := make([]byte, len(s))
		if _, err := f.ReadAt(b, off); err != nil || string(b) != s {
			t.Errorf("disk at %d: %q, %v", off, b, err)
		}
	}
	b := make([]byte, 4096)
	if _, err := f.ReadAt(b, 20<<20); err != nil || !bytes.Equal(b, make([]byte, 4096)) {
		t.Errorf("a hole of the base reads %q, %v", b[:16], err)
	}
}

func TestStartFailureLeavesNothing(t *testing.T) {
	e := newEnv(t, true)
	ctx := testCtx(t)
	for _, fail := range []string{"PUT /machine-config", "PUT /actions", "PUT /logger"} {
		t.Run(strings.ReplaceAll(fail, "/", "_"), func(t *testing.T) {
			e.failing(t, fail)
			spec := e.spec("vm-fail-" + strings.Fields(strings.ReplaceAll(fail, "/", " "))[1])
			m, err := e.d.Start(ctx, spec)
			if err == nil {
				m.Kill(ctx)
				t.Fatal("Start succeeded")
			}
			if !strings.Contains(err.Error(), "fake: failing "+fail+" as asked") || !strings.Contains(err.Error(), "HTTP 400") {
				t.Errorf("error does not carry the fault: %v", err)
			}
			if pids := vmm.ProcessesWith(marker(spec.Dir)); len(pids) > 0 {
				t.Errorf("processes left running: %v", pids)
			}
			if left := entries(t, spec.Dir); len(left) != 0 {
				t.Errorf("files left: %q", left)
			}
			groupGone(t, spec)
		})
	}
	t.Run("firecracker exits", func(t *testing.T) {
		d := New(Options{Binary: "/bin/false", HelperPath: e.d.opts.HelperPath, Env: e.d.opts.Env})
		spec := e.spec("vm-exits")
		_, err := d.Start(ctx, spec)
		if err == nil || !strings.Contains(err.Error(), "exited during start-up") {
			t.Fatalf("Start = %v", err)
		}
		if left := entries(t, spec.Dir); len(left) != 0 {
			t.Errorf("files left: %q", left)
		}
		groupGone(t, spec)
	})
	t.Run("disk made before is kept", func(t *testing.T) {
		e.failing(t, "PUT /actions")
		spec := e.spec("vm-restart")
		disk := filepath.Join(spec.Dir, fileDisk)
		if err := copyDisk(e.base, disk, spec.DiskMiB); err != nil {
			t.Fatal(err)
		}
		// Failing in Firecracker, and failing to start the launcher at all.
		noExec := filepath.Join(e.work, "not-a-launcher")
		if err := os.WriteFile(noExec, []byte("not a program"), 0o644); err != nil {
			t.Fatal(err)
		}
		for name, d := range map[string]*Driver{
			"in firecracker":   e.d,
			"no launcher runs": New(Options{Binary: e.d.opts.Binary, HelperPath: noExec, Env: e.d.opts.Env}),
		} {
			if _, err := d.Start(ctx, spec); err == nil {
				t.Fatalf("%s: Start succeeded", name)
			}
			if left := entries(t, spec.Dir); !slices.Equal(left, []string{fileDisk}) {
				t.Errorf("%s: files left: %q, want only the disk that was there", name, left)
			}
			// And root's again, as the directory.
			for _, p := range []string{spec.Dir, disk} {
				var st syscall.Stat_t
				if err := syscall.Stat(p, &st); err != nil || st.Uid != 0 || st.Gid != 0 {
					t.Errorf("%s: %s after a failed start: %d:%d (%v), want root's", name, p, st.Uid, st.Gid, err)
				}
			}
		}
	})
}

func TestSpecsRefused(t *testing.T) {
	e := newEnv(t, false)
	ctx := testCtx(t)
	for name, mod := range map[string]func(*vmm.Spec){
		"mounts":     func(s *vmm.Spec) { s.Mounts = []vmm.Mount{{Tag: "m0", HostPath: "/tmp", GuestPath: "/mnt"}} },
		"net kind":   func(s *vmm.Spec) { s.Net = &vmm.NetAttachment{Kind: "tap", Socket: "/x", MAC: "02:00:00:00:00:01"} },
		"vcpus":      func(s *vmm.Spec) { s.VCPUs = 33 },
		"small disk": func(s *vmm.Spec) { s.DiskMiB = 32 },
	} {
		spec := e.spec("vm-refused-" + strings.ReplaceAll(name, " ", "-"))
		mod(&spec)
		if m, err := e.d.Start(ctx, spec); err == nil {
			m.Kill(ctx)
			t.Errorf("%s: Start succeeded", name)
		} else if left := entries(t, spec.Dir); len(left) != 0 {
			t.Errorf("%s: files left: %q", name, left)
		}
	}
}

func TestReapFindsAVMNoRecordNames(t *testing.T) {
	e := newEnv(t, true)
	ctx := testCtx(t)
	spec := e.spec("vm-reap")
	m, err := e.d.Start(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	killAtEnd(t, m)
	if err := e.d.Reap(ctx, spec.Dir); err != nil {
		t.Fatal(err)
	}
	if m.Alive() {
		t.Fatal("Reap left the VM running")
	}
	groupGone(t, spec)
	// Nothing to do the second time.
	if err := e.d.Reap(ctx, spec.Dir); err != nil {
		t.Fatal(err)
	}
}

func TestAvailableSaysWhatIsMissing(t *testing.T) {
	d := New(Options{Binary: "/nonexistent/firecracker", HelperPath: "/nonexistent/smolvm-net", NoJail: true})
	err := d.Available()
	if err == nil {
		t.Fatal("Available with no binary")
	}
	for _, want := range []string{"firecracker binary was not found", "/nonexistent/smolvm-net"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("Available = %v; want it to say %q", err, want)
		}
	}
	// This host's KVM is usable, or not (no hardware virtualisation).
	if kerr := kvmUsable(); kerr != nil && !strings.Contains(err.Error(), "/dev/kvm is not usable") {
		t.Errorf("Available = %v; want it to say /dev/kvm is not usable (%v)", err, kerr)
	}
	for cpuinfo, want := range map[string]bool{
		"processor\t: 0\nflags\t\t: fpu vme de pse vmx sse\n": true,
		"flags\t\t: fpu svm\n":                                true,
		"flags\t\t: fpu vme de pse sse hypervisor\n":          false,
		"": false,
	} {
		if cpuHasVirt(cpuinfo) != want {
			t.Errorf("cpuHasVirt(%q) = %v", cpuinfo, !want)
		}
	}
}

// frameListener stands in for the network process: it listens on a
// stream socket and hands over the connection the relay makes.
type frameListener struct {
	path  string
	conns chan net.Conn
}

func listenFrames(t *testing.T, path string) *frameListener {
	t.Helper()
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	fl := &frameListener{path: path, conns: make(chan net.Conn, 1)}
	go func() {
		c, err := ln.Accept()
		if err == nil {
			fl.conns <- c
		}
	}()
	return fl
}

func (fl *frameListener) conn(t *testing.T) net.Conn {
	t.Helper()
	select {
	case c := <-fl.conns:
		t.Cleanup(func() { c.Close() })
		return c
	case <-time.After(10 * time.Second):
		t.Fatal("the relay did not connect")
		return nil
	}
}

// readFrame reads one length-prefixed frame.
func readFrame(t *testing.T, c net.Conn) []byte {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	var lb [4]byte
	if _, err := io.ReadFull(c, lb[:]); err != nil {
		t.Fatalf("read a frame: %v", err)
	}
	f := make([]byte, binary.BigEndian.Uint32(lb[:]))
	if _, err := io.ReadFull(c, f); err != nil {
		t.Fatalf("read a frame: %v", err)
	}
	return f
}

func writeFrame(t *testing.T, c net.Conn, f []byte) {
	t.Helper()
	b := binary.BigEndian.AppendUint32(nil, uint32(len(f)))
	if _, err := c.Write(append(b, f...)); err != nil {
		t.Fatal(err)
	}
}

// withNet gives spec a network whose process is a frameListener.
func withNet(t *testing.T, spec *vmm.Spec, mac string) *frameListener {
	fl := listenFrames(t, filepath.Join(spec.Dir, "net.sock"))
	spec.Net = &vmm.NetAttachment{Kind: vmm.NetStream, Socket: fl.path, MAC: mac}
	return fl
}

// checkHello checks the frame the fake guest sends first.
func checkHello(t *testing.T, f []byte, mac string, pid int) {
	t.Helper()
	want := "hello from the fake guest " + strconv.Itoa(pid)
	if len(f) < 14 || net.HardwareAddr(f[6:12]).String() != mac || !bytes.Equal(f[12:14], []byte{0x88, 0xb5}) || string(f[14:]) != want {
		t.Fatalf("frame from the guest: %x; want one from %s saying %q", f, mac, want)
	}
}

// waitEvent waits for the fake process pid to record what.
func (e *env) waitEvent(pid int, what string, ok func(map[string]any) bool) {
	e.t.Helper()
	if !e.sawEvent(pid, what, ok) {
		e.t.Fatalf("process %d recorded no %s event that fits", pid, what)
	}
}

// sawEvent waits a while for the fake process pid to record what.
func (e *env) sawEvent(pid int, what string, ok func(map[string]any) bool) bool {
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		for _, ev := range eventsOf(e.records(), pid, what) {
			if ok(ev.Data) {
				return true
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	return false
}

func TestNetworkThroughTapAndRelay(t *testing.T) {
	e := newEnv(t, true)
	ctx := testCtx(t)
	spec := e.spec("vm-net")
	const mac = "02:fc:00:00:00:01"
	fl := withNet(t, &spec, mac)
	m, err := e.d.Start(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	killAtEnd(t, m)
	recs := e.records()
	wantRequests(t, recs, m.PID(), bootRequests(spec, true))
	checkJailed(t, recs, m.PID(), spec)
	var rt runRecord
	json.Unmarshal(m.Runtime(), &rt)
	if !vmm.ProcessAlive(rt.RelayPID, rt.Marker) {
		t.Fatalf("no relay runs (record %+v)", rt)
	}
	// The relay, set up, runs as its VM's user.
	status, _ := os.ReadFile("/proc/" + strconv.Itoa(rt.RelayPID) + "/status")
	uid := strconv.Itoa(int(startedEvent(t, recs, m.PID())["uid"].(float64)))
	if !strings.Contains(string(status), "\nUid:\t"+uid+"\t"+uid+"\t"+uid+"\t"+uid+"\n") {
		t.Errorf("the relay does not run as its VM's user %s:\n%s", uid, status)
	}

	// The guest's first frame reaches the network process, framed.
	c := fl.conn(t)
	checkHello(t, readFrame(t, c), mac, m.PID())
	// And one from the network process reaches the guest.
	reply := append([]byte{2, 0xfc, 0, 0, 0, 1, 2, 0, 0, 0, 0, 0xfe, 0x88, 0xb5}, "hello from the network"...)
	writeFrame(t, c, reply)
	if !e.sawEvent(m.PID(), "frame-to-guest", func(d map[string]any) bool { return d["hex"] == hex.EncodeToString(reply) }) {
		rl, _ := os.ReadFile(filepath.Join(spec.Dir, fileRelay))
		var evs []record
		for _, r := range e.records() {
			if r.PID == m.PID() && r.Kind == "event" {
				evs = append(evs, r)
			}
		}
		t.Fatalf("the frame did not reach the guest; relay log %q; events %+v", rl, evs)
	}

	// The relay ends with the VM, and the network process sees the link
	// close.
	if err := m.Kill(ctx); err != nil {
		t.Fatal(err)
	}
	if vmm.ProcessAlive(rt.RelayPID, rt.Marker) {
		t.Error("the relay outlived its VM")
	}
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Read(make([]byte, 1)); !errors.Is(err, io.EOF) {
		t.Errorf("the link did not close with the VM: %v", err)
	}
	groupGone(t, spec)
}

func TestWaitForAGuestThatEnds(t *testing.T) {
	e := newEnv(t, true)
	ctx := testCtx(t)
	spec := e.spec("vm-ends")
	fl := withNet(t, &spec, "02:fc:00:00:00:03")
	m, err := e.d.Start(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	killAtEnd(t, m)
	c := fl.conn(t)
	var rt runRecord
	json.Unmarshal(m.Runtime(), &rt)
	// Still running: Wait gives up with its context.
	wctx, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
	if err := m.Wait(wctx); err == nil {
		t.Fatal("Wait returned while the VM runs")
	}
	cancel()
	// The guest reboots (here: is asked to), which ends Firecracker.
	if err := m.(*machine).api().put(ctx, "/actions", action{ActionType: "SendCtrlAltDel"}); err != nil {
		t.Fatal(err)
	}
	if err := m.Wait(ctx); err != nil {
		t.Fatal(err)
	}
	if vmm.ProcessAlive(rt.RelayPID, rt.Marker) {
		t.Error("the relay outlived its VM")
	}
	// The link closes (after the guest's hello frame, unread).
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.Copy(io.Discard, c); err != nil {
		t.Errorf("the link did not close with the VM: %v", err)
	}
	groupGone(t, spec)
}

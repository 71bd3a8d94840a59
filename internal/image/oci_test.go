package image

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"

	"github.com/smolvm/smolvm/internal/datadir"
)

func TestResolveOCIImageFlattensLayers(t *testing.T) {
	requireRoot(t)
	reg := newTestRegistry(t)
	img := testImage(t)
	reg.push(t, "test:1", img)
	manifestDigest, err := img.Digest()
	if err != nil {
		t.Fatal(err)
	}
	d := testDir(t)
	ctx := context.Background()
	ref := reg.host + "/test:1"

	var phases []string
	o := testOptions(t)
	o.Progress = func(p Progress) {
		if len(phases) == 0 || phases[len(phases)-1] != p.Phase {
			phases = append(phases, p.Phase)
		}
	}
	start := time.Now()
	b, err := Resolve(ctx, d, Source{Image: ref}, o)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("pull and build of the test image: %s (%d registry requests, image %d MiB)",
		time.Since(start).Round(time.Millisecond), reg.requests.Load(), b.SizeBytes>>20)
	if want := []string{PhaseResolve, PhasePull, PhaseExtract, PhaseMkfs, PhaseReady}; !slices.Equal(phases, want) {
		t.Errorf("progress phases %v, want %v", phases, want)
	}

	// What the Manager needs.
	if b.Ref != ref || b.Kind != KindOCI || b.SourceDigest != manifestDigest.String() || b.Name != ref {
		t.Errorf("base %+v: want ref and name %s, kind oci, source digest %s", b, ref, manifestDigest)
	}
	wantCfg := Config{Env: []string{"SMOLVM_IMAGE_VAR=hello", "PATH=/usr/local/bin:/usr/bin:/bin"}, WorkingDir: "/data"}
	if !reflect.DeepEqual(b.Config, wantCfg) {
		t.Errorf("config %+v, want %+v", b.Config, wantCfg)
	}
	st, err := os.Stat(b.Path)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o444 || st.Size() != b.SizeBytes {
		t.Errorf("image file mode %v size %d; want 0444 and %d", st.Mode().Perm(), st.Size(), b.SizeBytes)
	}
	if digest, _ := fileDigest(ctx, b.Path); digest != b.Digest {
		t.Errorf("digest %s, Base says %s", digest, b.Digest)
	}
	if dump := run(t, "dumpe2fs", "-h", b.Path); !strings.Contains(dump, "Filesystem volume name:   rootfs") || !strings.Contains(dump, "Block size:               4096") {
		t.Errorf("not the expected ext4:\n%s", dump)
	}

	// Whiteout and opaque directory.
	if out := debugfs(t, b.Path, "stat /data/gone.txt"); strings.Contains(out, "Inode:") {
		t.Errorf("/data/gone.txt survived its whiteout")
	}
	if got := lsNames(t, b.Path, "/data/dir"); !slices.Equal(got, []string{"new.txt"}) {
		t.Errorf("/data/dir holds %v, want only new.txt", got)
	}
	if got := strings.TrimSpace(debugfs(t, b.Path, "cat /data/dir/new.txt")); got != "new" {
		t.Errorf("new.txt = %q", got)
	}
	// Owner, mode, xattr, set-user-ID bit, device node, links.
	secret := debugfs(t, b.Path, "stat /data/secret.txt")
	for _, want := range []string{"Mode:  0640", "User:  1000", "Group:  1000"} {
		if !strings.Contains(secret, want) {
			t.Errorf("secret.txt lacks %q:\n%s", want, secret)
		}
	}
	if xa := debugfs(t, b.Path, "ea_list /data/secret.txt"); !strings.Contains(xa, "user.smolvm") || !strings.Contains(xa, "kept") {
		t.Errorf("xattr not kept: %q", xa)
	}
	if out := debugfs(t, b.Path, "stat /bin/suid"); !strings.Contains(out, "Mode:  04755") {
		t.Errorf("set-user-ID bit lost:\n%s", out)
	}
	if out := debugfs(t, b.Path, "stat /dev/null"); !strings.Contains(out, "Type: character special") || !strings.Contains(out, "Device major/minor number: 01:03") {
		t.Errorf("/dev/null:\n%s", out)
	}
	if out := debugfs(t, b.Path, "stat /bin/sh"); !strings.Contains(out, "Type: symlink") || !strings.Contains(out, `Fast link dest: "busybox"`) {
		t.Errorf("/bin/sh is not the busybox symlink:\n%s", out)
	}
	if out := debugfs(t, b.Path, "stat /bin/busybox-hard"); !strings.Contains(out, "Links: 2") {
		t.Errorf("hard link lost:\n%s", out)
	}
	// The entry written through the absolute symlink landed inside the root.
	if got := strings.TrimSpace(debugfs(t, b.Path, "cat /etc/through-link.txt")); got != "inside" {
		t.Errorf("/etc/through-link.txt = %q", got)
	}
	if _, err := os.Stat("/etc/through-link.txt"); err == nil {
		t.Fatal("an image entry was written to the host's /etc")
	}
	// Mount points the agent uses exist.
	for _, p := range []string{"/proc", "/sys", "/dev", "/tmp", "/run"} {
		if out := debugfs(t, b.Path, "stat "+p); !strings.Contains(out, "Type: directory") {
			t.Errorf("%s missing", p)
		}
	}
	if tmp, _ := os.ReadDir(d.Tmp()); len(tmp) > 0 {
		t.Errorf("temp entries left: %v", tmp)
	}

	// Again: from the cache, no request at all.
	reg.requests.Store(0)
	start = time.Now()
	again, err := Resolve(ctx, d, Source{Image: ref}, o)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("resolve from cache: %s", time.Since(start))
	if n := reg.requests.Load(); n != 0 {
		t.Errorf("cached resolve made %d registry requests", n)
	}
	if !reflect.DeepEqual(again, b) {
		t.Errorf("cached resolve %+v, want %+v", again, b)
	}

	// With the registry gone: by digest and by tag, still from the cache.
	reg.srv.Close()
	byDigest := reg.host + "/test@" + manifestDigest.String()
	bd, err := Resolve(ctx, d, Source{Image: byDigest}, o)
	if err != nil {
		t.Fatalf("resolve by digest with the registry down: %v", err)
	}
	if bd.Path != b.Path || bd.Ref != byDigest {
		t.Errorf("by digest: %+v", bd)
	}
	if _, err := Resolve(ctx, d, Source{Image: ref}, o); err != nil {
		t.Fatalf("resolve by tag with the registry down: %v", err)
	}
	// An explicit refresh says it falls back.
	var log strings.Builder
	o.Log, o.Refresh = &log, true
	if _, err := Resolve(ctx, d, Source{Image: ref}, o); err != nil {
		t.Fatalf("refresh with the registry down: %v", err)
	}
	if !strings.Contains(log.String(), "unreachable") || !strings.Contains(log.String(), "using the cached") {
		t.Errorf("refresh log does not say it used the cache: %q", log.String())
	}

	list, err := List(d)
	if err != nil || len(list) != 1 || list[0].Path != b.Path || !reflect.DeepEqual(list[0].Config, wantCfg) {
		t.Errorf("List = %+v, %v", list, err)
	}
}

func TestPresetsResolveThroughMirror(t *testing.T) {
	requireRoot(t)
	reg := newTestRegistry(t)
	img := testImage(t)
	// A multi-platform index, as Docker Hub serves: the amd64 image and an
	// arm64 one that must not be chosen.
	arm, err := mutate.ConfigFile(empty.Image, &v1.ConfigFile{OS: "linux", Architecture: "arm64"})
	if err != nil {
		t.Fatal(err)
	}
	idx := mutate.AppendManifests(empty.Index,
		mutate.IndexAddendum{Add: arm, Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: "arm64"}}},
		mutate.IndexAddendum{Add: img, Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: "amd64"}}},
	)
	for _, os := range []string{"alpine", "ubuntu"} {
		ref, _ := Preset(os)
		reg.pushIndex(t, "library/"+ref, idx)
	}
	want, _ := img.Digest()
	d := testDir(t)
	o := testOptions(t)
	o.Mirror = reg.host
	for _, osName := range []string{"alpine", "ubuntu"} {
		reg.requests.Store(0)
		b, err := Resolve(context.Background(), d, Source{OS: osName}, o)
		if err != nil {
			t.Fatalf("%s: %v", osName, err)
		}
		ref, _ := Preset(osName)
		if b.Ref != ref || b.SourceDigest != want.String() {
			t.Errorf("%s: ref %q digest %s, want %q and the amd64 manifest %s", osName, b.Ref, b.SourceDigest, ref, want)
		}
		if n := reg.requests.Load(); n == 0 {
			t.Errorf("%s: the mirror saw no request", osName)
		}
		t.Logf("%s through the mirror: %d requests", osName, reg.requests.Load())
	}
	// Both presets are the same image here: one entry.
	if list, _ := List(d); len(list) != 1 {
		t.Errorf("%d entries, want 1", len(list))
	}
	// The mirror setting also comes from the environment.
	t.Setenv("SMOLVM_REGISTRY_MIRROR", "http://"+reg.host)
	o.Mirror = ""
	o.Refresh = true
	reg.requests.Store(0)
	if _, err := Resolve(context.Background(), d, Source{Image: "alpine:3.20"}, o); err != nil {
		t.Fatal(err)
	}
	if reg.requests.Load() == 0 {
		t.Error("SMOLVM_REGISTRY_MIRROR was not used")
	}
}

func TestConcurrentFirstResolvesBuildOnce(t *testing.T) {
	requireRoot(t)
	reg := newTestRegistry(t)
	img := testImage(t)
	reg.push(t, "test:1", img)
	layers, _ := img.Layers()
	d := testDir(t)
	const n = 4
	var wg sync.WaitGroup
	bases := make([]*Base, n)
	errs := make([]error, n)
	logs := make([]strings.Builder, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			o := testOptions(t)
			o.Log = &logs[i]
			bases[i], errs[i] = Resolve(context.Background(), d, Source{Image: reg.host + "/test:1"}, o)
		}()
	}
	wg.Wait()
	builds := 0
	for i := range n {
		if errs[i] != nil {
			t.Fatalf("resolve %d: %v", i, errs[i])
		}
		if bases[i].Path != bases[0].Path {
			t.Errorf("resolve %d got %s, resolve 0 %s", i, bases[i].Path, bases[0].Path)
		}
		builds += strings.Count(logs[i].String(), "pulling ")
	}
	if builds != 1 {
		t.Errorf("%d builds, want 1", builds)
	}
	// Each layer and the config were fetched once.
	if got, want := reg.blobGets.Load(), int64(len(layers)+1); got != want {
		t.Errorf("%d blob downloads, want %d", got, want)
	}
}

func TestUnknownImageIsNotFound(t *testing.T) {
	requireRoot(t)
	reg := newTestRegistry(t)
	reg.push(t, "test:1", testImage(t))
	d := testDir(t)
	for _, ref := range []string{reg.host + "/nope:1", reg.host + "/test:2"} {
		_, err := Resolve(context.Background(), d, Source{Image: ref}, testOptions(t))
		e := wantCode(t, err, CodeNotFound)
		if e.Ref != ref || !strings.Contains(e.Error(), ref) {
			t.Errorf("error does not name %s: %v", ref, e)
		}
	}
	assertClean(t, d)
}

func TestCorruptLayerIsReportedAndNotCached(t *testing.T) {
	requireRoot(t)
	reg := newTestRegistry(t)
	img := testImage(t)
	reg.push(t, "test:1", img)
	layers, _ := img.Layers()
	dg, _ := layers[1].Digest()
	reg.setCorrupt(dg.String())
	d := testDir(t)
	_, err := Resolve(context.Background(), d, Source{Image: reg.host + "/test:1"}, testOptions(t))
	e := wantCode(t, err, CodeCorrupt)
	t.Logf("error: %v", e)
	assertClean(t, d)
}

func TestUnreachableRegistry(t *testing.T) {
	// A closed port: connection refused.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	d := testDir(t)
	start := time.Now()
	_, err = Resolve(context.Background(), d, Source{Image: addr + "/test:1"}, testOptions(t))
	wantCode(t, err, CodeRegistryUnreachable)
	if took := time.Since(start); took > defaultResolveTimeout+5*time.Second {
		t.Errorf("took %s", took)
	}
	t.Logf("closed port: %v after %s", err, time.Since(start).Round(time.Millisecond))
	assertClean(t, d)

	// A registry that accepts connections and never answers.
	hang, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer hang.Close()
	var conns sync.WaitGroup
	defer conns.Wait()
	go func() {
		for {
			c, err := hang.Accept()
			if err != nil {
				return
			}
			conns.Add(1)
			go func() {
				defer conns.Done()
				buf := make([]byte, 1024)
				for {
					if _, err := c.Read(buf); err != nil {
						c.Close()
						return
					}
				}
			}()
		}
	}()
	o := testOptions(t)
	o.resolveTimeout = 2 * time.Second
	start = time.Now()
	_, err = Resolve(context.Background(), d, Source{Image: hang.Addr().String() + "/test:1"}, o)
	wantCode(t, err, CodeRegistryUnreachable)
	if took := time.Since(start); took > 10*time.Second {
		t.Errorf("hanging registry took %s with a 2 s bound", took)
	}
	t.Logf("hanging registry: %v after %s", err, time.Since(start).Round(time.Millisecond))
	assertClean(t, d)

	// The caller's own cancellation is not dressed up as a registry error.
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	_, err = Resolve(ctx, d, Source{Image: hang.Addr().String() + "/test:1"}, testOptions(t))
	if _, ok := AsError(err); ok || ctx.Err() == nil {
		t.Errorf("cancelled resolve: %v", err)
	}
	hang.Close()
}

func TestImageWithoutShellIsUnsupported(t *testing.T) {
	requireRoot(t)
	reg := newTestRegistry(t)
	img, err := mutate.AppendLayers(empty.Image, layer(t, []entry{file("hello.txt", 0o644, "hi\n")}))
	if err != nil {
		t.Fatal(err)
	}
	reg.push(t, "noshell:1", img)
	d := testDir(t)
	_, err = Resolve(context.Background(), d, Source{Image: reg.host + "/noshell:1"}, testOptions(t))
	wantCode(t, err, CodeUnsupported)
	assertClean(t, d)
}

func TestRemoveAndPrune(t *testing.T) {
	requireRoot(t)
	reg := newTestRegistry(t)
	img := testImage(t)
	reg.push(t, "test:1", img)
	d := testDir(t)
	ref := reg.host + "/test:1"
	b, err := Resolve(context.Background(), d, Source{Image: ref}, testOptions(t))
	if err != nil {
		t.Fatal(err)
	}
	// A sandbox disk built on it keeps it from Prune with InUse.
	sb := filepath.Join(d.Sandboxes(), "vm-1")
	if err := os.MkdirAll(sb, 0o755); err != nil {
		t.Fatal(err)
	}
	out, err := runTool("qemu-img", "create", "-q", "-f", "qcow2", "-b", b.Path, "-F", "raw", filepath.Join(sb, "disk.qcow2"), "1G")
	if err != nil {
		t.Skipf("qemu-img: %v %s", err, out)
	}
	keep, err := InUse(d)
	if err != nil {
		t.Fatal(err)
	}
	if !keep(b) {
		t.Fatal("InUse does not see the overlay's base")
	}
	if removed, err := Prune(d, keep); err != nil || len(removed) != 0 {
		t.Fatalf("Prune removed %v, %v", removed, err)
	}
	os.RemoveAll(sb)

	// Remove by short digest; the tag's record goes with it.
	if err := Remove(d, b.SourceDigest[:19]); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(b.Path); !os.IsNotExist(err) {
		t.Errorf("image file still there: %v", err)
	}
	if _, ok := readRef(d, reg.host+"/test:1"); ok {
		t.Error("ref record survived Remove")
	}
	wantCode(t, Remove(d, ref), CodeNotFound)
	assertClean(t, d)

	// Pulled again (the registry is asked again), then pruned with nothing kept.
	reg.requests.Store(0)
	if _, err := Resolve(context.Background(), d, Source{Image: ref}, testOptions(t)); err != nil {
		t.Fatal(err)
	}
	if reg.requests.Load() == 0 {
		t.Error("resolve after Remove used no registry")
	}
	// Leftovers of a killed build go too, unless their build is running.
	stale := filepath.Join(d.Tmp(), "build-oci-dead-123")
	live := filepath.Join(d.Tmp(), "build-oci-live-456")
	for _, p := range []string{stale, live} {
		if err := os.MkdirAll(filepath.Join(p, "root"), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	unlock, err := lockExclusive(context.Background(), entryLock(d, "oci-live"), func() {})
	if err != nil {
		t.Fatal(err)
	}
	removed, err := Prune(d, nil)
	if err != nil || len(removed) != 1 {
		t.Fatalf("Prune: %v, %v", removed, err)
	}
	if _, err := os.Stat(stale); !os.IsNotExist(err) {
		t.Errorf("stale build directory kept: %v", err)
	}
	if _, err := os.Stat(live); err != nil {
		t.Errorf("running build's directory removed: %v", err)
	}
	unlock()
	os.RemoveAll(live)
	assertClean(t, d)
}

// BenchmarkResolveCached measures Resolve of a cached OCI image: what a
// sandbox create pays for its image once the image is pulled.
func BenchmarkResolveCached(b *testing.B) {
	if os.Geteuid() != 0 {
		b.Skip("needs root")
	}
	reg := newTestRegistry(b)
	ref := reg.push(b, "test:1", testImage(b)).String()
	d := datadir.Dir(b.TempDir())
	o := Options{Keychain: testOptions(b).Keychain}
	start := time.Now()
	if _, err := Resolve(context.Background(), d, Source{Image: ref}, o); err != nil {
		b.Fatal(err)
	}
	b.Logf("first resolve (pull and build): %s", time.Since(start).Round(time.Millisecond))
	reg.requests.Store(0)
	for b.Loop() {
		if _, err := Resolve(context.Background(), d, Source{Image: ref}, o); err != nil {
			b.Fatal(err)
		}
	}
	if n := reg.requests.Load(); n != 0 {
		b.Errorf("%d registry requests from the cache", n)
	}
}

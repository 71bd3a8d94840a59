package image

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/smolvm/smolvm/internal/datadir"
)

// The build tests run the real debootstrap and mkfs.ext4: they need root, the
// tools (`smolvm setup` installs them) and a reachable Debian mirror, and the
// build takes about a minute. It runs once per test binary: two concurrent
// Default calls in a fresh temp data dir, whose result every test shares.
//
// With SMOLVM_TEST_IMAGE_SHARED=1 the build goes to the user's data dir
// (datadir.Default, so $SMOLVM_DATA_DIR) instead and is kept, so other
// packages' tests and later runs reuse it; the "builds once" check then only
// asserts that at most one of the two calls built.

type buildFixture struct {
	once    sync.Once
	dir     datadir.Dir
	shared  bool
	bases   [2]*Base
	errs    [2]error
	logs    [2]string
	elapsed time.Duration
	setup   error
}

var fixture buildFixture

var scratch string // per-binary temp root, removed by TestMain

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "smolvm-image-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	scratch = dir
	code := m.Run()
	if err := removeTree(dir); err != nil {
		fmt.Fprintln(os.Stderr, "cleanup:", err)
	}
	os.Exit(code)
}

func requireBuildable(t *testing.T) {
	t.Helper()
	if testing.Short() {
		t.Skip("builds a real image (about a minute); skipped with -short")
	}
	if os.Geteuid() != 0 {
		t.Skip("building the image needs root (debootstrap)")
	}
}

// sharedImage builds the default image once for the whole test binary.
func sharedImage(t *testing.T) *buildFixture {
	t.Helper()
	requireBuildable(t)
	f := &fixture
	f.once.Do(func() {
		if os.Getenv("SMOLVM_TEST_IMAGE_SHARED") == "1" {
			f.shared = true
			f.dir, f.setup = datadir.Default()
		} else {
			f.dir = datadir.Dir(filepath.Join(scratch, "shared"))
		}
		if f.setup != nil {
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
		defer cancel()
		start := time.Now()
		var wg sync.WaitGroup
		for i := range 2 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				var log bytes.Buffer
				f.bases[i], f.errs[i] = Default(ctx, f.dir, &log)
				f.logs[i] = log.String()
			}()
		}
		wg.Wait()
		f.elapsed = time.Since(start)
		for i := range 2 {
			t.Logf("Default call %d log:\n%s", i, f.logs[i])
		}
	})
	if f.setup != nil {
		t.Fatal(f.setup)
	}
	for i := range 2 {
		if f.errs[i] != nil {
			t.Fatalf("Default call %d: %v", i, f.errs[i])
		}
	}
	return f
}

func TestDefaultBuildsOnceForConcurrentCallers(t *testing.T) {
	f := sharedImage(t)
	builds := 0
	for _, l := range f.logs {
		builds += strings.Count(l, "building default image")
	}
	if f.shared {
		if builds > 1 {
			t.Fatalf("%d builds, want at most 1", builds)
		}
	} else if builds != 1 {
		t.Fatalf("%d builds, want exactly 1; logs:\n%s\n%s", builds, f.logs[0], f.logs[1])
	}
	if !reflect.DeepEqual(f.bases[0], f.bases[1]) {
		t.Fatalf("concurrent callers got different images: %+v vs %+v", f.bases[0], f.bases[1])
	}
	left, err := filepath.Glob(filepath.Join(f.dir.Tmp(), "build-*"))
	if err != nil || len(left) > 0 {
		t.Fatalf("build directories left behind: %v %v", left, err)
	}
	t.Logf("both calls returned after %s; image %s, %d MiB", f.elapsed.Round(time.Second), f.bases[0].Path, f.bases[0].SizeBytes>>20)
}

func TestDefaultImageIsExt4WithExpectedFiles(t *testing.T) {
	f := sharedImage(t)
	b := f.bases[0]

	fh, err := os.Open(b.Path)
	if err != nil {
		t.Fatal(err)
	}
	defer fh.Close()
	magic := make([]byte, 2)
	if _, err := fh.ReadAt(magic, 1080); err != nil {
		t.Fatal(err)
	}
	if m := binary.LittleEndian.Uint16(magic); m != 0xEF53 {
		t.Fatalf("superblock magic %#x, want 0xef53", m)
	}

	dump := run(t, "dumpe2fs", "-h", b.Path)
	for _, want := range []string{"Filesystem volume name:   rootfs", "Block size:               4096"} {
		if !strings.Contains(dump, want) {
			t.Errorf("dumpe2fs lacks %q", want)
		}
	}

	for _, p := range []string{"/usr/bin/python3", "/etc/profile", "/usr/bin/bash", "/usr/lib/locale/C.utf8"} {
		out := debugfs(t, b.Path, "stat "+p)
		if !strings.Contains(out, "Inode:") {
			t.Errorf("%s missing from image: %s", p, out)
		}
	}
	if out := debugfs(t, b.Path, "cat /etc/profile"); !strings.Contains(out, "/etc/profile.d/*.sh") {
		t.Errorf("/etc/profile does not source /etc/profile.d: %s", out)
	}
	if out := debugfs(t, b.Path, "cat /etc/hostname"); strings.TrimSpace(out) != "localhost" {
		t.Errorf("/etc/hostname = %q, want the neutral localhost", out)
	}
	// Shrunk: documentation and apt lists are gone.
	for _, dir := range []string{"/usr/share/doc", "/var/lib/apt/lists"} {
		out := debugfs(t, b.Path, "ls -p "+dir)
		for _, line := range strings.Split(out, "\n") {
			// ls -p prints /inode/mode/uid/gid/name/size/ per entry.
			fields := strings.Split(line, "/")
			if len(fields) < 6 || fields[5] == "." || fields[5] == ".." || fields[5] == "" {
				continue
			}
			if strings.HasPrefix(fields[2], "10") { // regular file
				t.Errorf("%s still holds file %s", dir, fields[5])
			}
			if dir == "/usr/share/doc" {
				t.Errorf("/usr/share/doc still holds %s", fields[5])
			}
		}
	}
}

func TestDefaultImageFileIsReadOnlyAndMatchesDigest(t *testing.T) {
	f := sharedImage(t)
	b := f.bases[0]
	st, err := os.Stat(b.Path)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o444 {
		t.Errorf("mode %v, want 0444", st.Mode().Perm())
	}
	if st.Size() != b.SizeBytes || b.SizeBytes%(1<<20) != 0 {
		t.Errorf("size %d, Base says %d (want whole MiB)", st.Size(), b.SizeBytes)
	}
	digest, err := fileDigest(context.Background(), b.Path)
	if err != nil {
		t.Fatal(err)
	}
	if digest != b.Digest || !strings.HasPrefix(digest, "sha256:") {
		t.Errorf("digest %s, Base says %s", digest, b.Digest)
	}
	if b.Name != "debian-bookworm" {
		t.Errorf("name %q", b.Name)
	}
}

func TestDefaultAgainAndCachedReturnAtOnce(t *testing.T) {
	f := sharedImage(t)
	var log bytes.Buffer
	start := time.Now()
	again, err := Default(context.Background(), f.dir, &log)
	if err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("second Default took %s", d)
	}
	if !reflect.DeepEqual(again, f.bases[0]) || log.Len() != 0 {
		t.Errorf("second Default: %+v, log %q; want %+v and no log", again, log.String(), f.bases[0])
	}
	cached, err := Cached(f.dir)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(cached, f.bases[0]) {
		t.Errorf("Cached %+v, want %+v", cached, f.bases[0])
	}
}

func TestCachedOnEmptyDirIsNotBuilt(t *testing.T) {
	_, err := Cached(datadir.Dir(t.TempDir()))
	if !errors.Is(err, ErrNotBuilt) {
		t.Fatalf("err = %v, want ErrNotBuilt", err)
	}
}

func TestRecipeKey(t *testing.T) {
	a := defaultRecipe()
	if a.key() != defaultRecipe().key() || len(a.key()) != 16 {
		t.Fatalf("key not stable: %s", a.key())
	}
	reordered := defaultRecipe()
	reordered.Include = []string{"b", "a"}
	sorted := defaultRecipe()
	sorted.Include = []string{"a", "b"}
	if reordered.key() != sorted.key() {
		t.Error("include order changes the key")
	}
	for name, change := range map[string]func(*recipe){
		"suite":   func(r *recipe) { r.Suite = "trixie" },
		"variant": func(r *recipe) { r.Variant = "buildd" },
		"include": func(r *recipe) { r.Include = append(r.Include, "curl") },
		"format":  func(r *recipe) { r.Format++ },
	} {
		r := defaultRecipe()
		change(&r)
		if r.key() == a.key() {
			t.Errorf("changing %s keeps the key", name)
		}
	}
}

func TestMirrorURL(t *testing.T) {
	apt := t.TempDir()
	if got := mirrorURL("", apt, "bookworm"); got != defaultMirror {
		t.Errorf("no sources: %s", got)
	}
	if got := mirrorURL("http://override/debian", apt, "bookworm"); got != "http://override/debian" {
		t.Errorf("override: %s", got)
	}
	write := func(name, text string) {
		t.Helper()
		p := filepath.Join(apt, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("sources.list.d/debian.sources", `Types: deb
URIs: http://security.example/debian-security
Suites: bookworm-security
Components: main

Types: deb deb-src
# a comment
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main
`)
	write("sources.list.d/other.list.disabled", "deb http://wrong.example/debian bookworm main\n")
	if got := mirrorURL("", apt, "bookworm"); got != "http://mirror.example/debian" {
		t.Errorf("deb822: %s", got)
	}
	write("sources.list", "# deb http://commented.example/debian bookworm main\n"+
		"deb-src http://src.example/debian bookworm main\n"+
		"deb [arch=amd64 signed-by=/k.gpg] http://list.example/debian bookworm main\n")
	if got := mirrorURL("", apt, "bookworm"); got != "http://list.example/debian" {
		t.Errorf("sources.list: %s", got)
	}
	if got := mirrorURL("", apt, "trixie"); got != defaultMirror {
		t.Errorf("other suite: %s", got)
	}
}

func TestLookToolSaysHowToInstall(t *testing.T) {
	_, err := LookTool("smolvm-no-such-tool", "some-package")
	if err == nil || !strings.Contains(err.Error(), "apt-get install some-package") || !strings.Contains(err.Error(), "smolvm setup") {
		t.Fatalf("err = %v", err)
	}
}

func TestImageSize(t *testing.T) {
	const mib = 1 << 20
	if got := imageSize(100 * mib); got != 194*mib {
		t.Errorf("imageSize(100 MiB) = %d MiB", got/mib)
	}
	if got := imageSize(1); got%mib != 0 || got < 64*mib {
		t.Errorf("imageSize(1) = %d", got)
	}
}

func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	bin, err := LookTool(name, "e2fsprogs")
	if err != nil {
		t.Fatal(err)
	}
	var stdout, stderr bytes.Buffer
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("%s %v: %v\n%s%s", name, args, err, stdout.String(), stderr.String())
	}
	// debugfs prints its banner and lookup errors on stderr; callers look
	// only at the answer.
	return stdout.String()
}

func debugfs(t *testing.T, img, request string) string {
	return run(t, "debugfs", "-R", request, img)
}

package image

import (
	"archive/tar"
	"bytes"
	"context"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"

	"github.com/smolvm/smolvm/internal/datadir"
)

// requireRoot skips tests that unpack layers: owners and device nodes need
// root, as they do in production.
func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("unpacking image layers needs root")
	}
	for _, tool := range []string{"mkfs.ext4", "debugfs"} {
		if _, err := LookTool(tool, "e2fsprogs"); err != nil {
			t.Skip(err)
		}
	}
}

// testRegistry is go-containerregistry's in-process registry on loopback,
// counting requests and able to corrupt chosen blobs on the way out.
type testRegistry struct {
	srv      *httptest.Server
	host     string // localhost:PORT
	requests atomic.Int64
	blobGets atomic.Int64

	mu      sync.Mutex
	corrupt map[string]bool // blob digests served with a flipped byte
}

func newTestRegistry(t testing.TB) *testRegistry {
	t.Helper()
	tr := &testRegistry{corrupt: map[string]bool{}}
	inner := registry.New(registry.Logger(log.New(io.Discard, "", 0)))
	tr.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		tr.requests.Add(1)
		if r.Method == http.MethodGet && strings.Contains(r.URL.Path, "/blobs/sha256:") {
			tr.blobGets.Add(1)
			dg := r.URL.Path[strings.LastIndex(r.URL.Path, "/")+1:]
			tr.mu.Lock()
			bad := tr.corrupt[dg]
			tr.mu.Unlock()
			if bad {
				rec := httptest.NewRecorder()
				inner.ServeHTTP(rec, r)
				body := rec.Body.Bytes()
				if len(body) > 0 {
					body[len(body)/2] ^= 0xff
				}
				for k, v := range rec.Header() {
					w.Header()[k] = v
				}
				w.WriteHeader(rec.Code)
				w.Write(body)
				return
			}
		}
		inner.ServeHTTP(w, r)
	}))
	t.Cleanup(tr.srv.Close)
	_, port, _ := net.SplitHostPort(tr.srv.Listener.Addr().String())
	tr.host = "localhost:" + port
	return tr
}

func (r *testRegistry) setCorrupt(digest string) {
	r.mu.Lock()
	r.corrupt[digest] = true
	r.mu.Unlock()
}

// push writes img (or an index) as repo:tag and resets the counters.
func (r *testRegistry) push(t testing.TB, repoTag string, img v1.Image) name.Reference {
	t.Helper()
	ref, err := name.ParseReference(r.host + "/" + repoTag)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(ref, img); err != nil {
		t.Fatalf("push %s: %v", ref, err)
	}
	r.requests.Store(0)
	r.blobGets.Store(0)
	return ref
}

func (r *testRegistry) pushIndex(t testing.TB, repoTag string, idx v1.ImageIndex) name.Reference {
	t.Helper()
	ref, err := name.ParseReference(r.host + "/" + repoTag)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.WriteIndex(ref, idx); err != nil {
		t.Fatalf("push %s: %v", ref, err)
	}
	r.requests.Store(0)
	r.blobGets.Store(0)
	return ref
}

// entry is one member of a test archive.
type entry struct {
	hdr  tar.Header
	body []byte
}

func file(name string, mode int64, body string) entry {
	return entry{hdr: tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: mode}, body: []byte(body)}
}

func dir(name string, mode int64) entry {
	return entry{hdr: tar.Header{Typeflag: tar.TypeDir, Name: name, Mode: mode}}
}

func symlink(name, target string) entry {
	return entry{hdr: tar.Header{Typeflag: tar.TypeSymlink, Name: name, Linkname: target, Mode: 0o777}}
}

func hardlink(name, target string) entry {
	return entry{hdr: tar.Header{Typeflag: tar.TypeLink, Name: name, Linkname: target}}
}

func tarBytes(t testing.TB, entries []entry) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	mtime := time.Date(2024, 5, 1, 12, 0, 0, 0, time.UTC)
	for _, e := range entries {
		h := e.hdr
		if h.ModTime.IsZero() {
			h.ModTime = mtime
		}
		if h.Typeflag == tar.TypeReg {
			h.Size = int64(len(e.body))
		}
		if h.PAXRecords != nil {
			h.Format = tar.FormatPAX
		}
		if err := tw.WriteHeader(&h); err != nil {
			t.Fatalf("tar %s: %v", h.Name, err)
		}
		if len(e.body) > 0 {
			if _, err := tw.Write(e.body); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func layer(t testing.TB, entries []entry) v1.Layer {
	t.Helper()
	b := tarBytes(t, entries)
	l, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(b)), nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// busyboxRoot is a minimal root: Debian's static busybox as /bin/busybox,
// the applets a shell session needs as symlinks, and /etc files.
func busyboxRoot(t testing.TB) []entry {
	t.Helper()
	bb, err := os.ReadFile("/bin/busybox")
	if err != nil {
		t.Skipf("busybox-static is needed: %v", err)
	}
	es := []entry{
		dir("bin/", 0o755), dir("etc/", 0o755), dir("root/", 0o700),
		file("bin/busybox", 0o755, string(bb)),
	}
	for _, applet := range []string{"sh", "ls", "cat", "echo", "env", "pwd", "id", "test", "mkdir", "rm", "uname", "sleep"} {
		es = append(es, symlink("bin/"+applet, "busybox"))
	}
	es = append(es,
		file("etc/passwd", 0o644, "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/home/user:/bin/sh\n"),
		file("etc/group", 0o644, "root:x:0:\nuser:x:1000:\n"),
		file("etc/profile", 0o644, "export PROFILE_LOADED=1\n"),
	)
	return es
}

// testImage is the two-layer image of the tests: the busybox root with
// /data content in layer 1; layer 2 deletes /data/gone.txt and makes
// /data/dir opaque, holding only new.txt (with the marker after it, which
// is legal and the harder order).
func testImage(t testing.TB) v1.Image {
	t.Helper()
	secret := file("data/secret.txt", 0o640, "secret\n")
	secret.hdr.Uid, secret.hdr.Gid = 1000, 1000
	secret.hdr.PAXRecords = map[string]string{"SCHILY.xattr.user.smolvm": "kept"}
	null := entry{hdr: tar.Header{Typeflag: tar.TypeChar, Name: "dev/null", Mode: 0o666, Devmajor: 1, Devminor: 3}}
	suid := file("bin/suid", 0o4755, "#!/bin/sh\n")
	l1 := append(busyboxRoot(t),
		dir("dev/", 0o755), null,
		hardlink("bin/busybox-hard", "bin/busybox"),
		suid,
		dir("data/", 0o755),
		file("data/gone.txt", 0o644, "gone\n"),
		dir("data/dir/", 0o755),
		file("data/dir/old.txt", 0o644, "old\n"),
		dir("data/dir/sub/", 0o755),
		file("data/dir/sub/deep.txt", 0o644, "deep\n"),
		secret,
		// An absolute symlink to "/" must not let a later entry out.
		symlink("data/up", "/"),
	)
	l2 := []entry{
		dir("data/", 0o755),
		file("data/.wh.gone.txt", 0o644, ""),
		dir("data/dir/", 0o755),
		file("data/dir/new.txt", 0o644, "new\n"),
		file("data/dir/.wh..wh..opq", 0o644, ""),
		file("data/up/etc/through-link.txt", 0o644, "inside\n"),
	}
	img, err := mutate.ConfigFile(empty.Image, &v1.ConfigFile{
		Architecture: "amd64", OS: "linux",
		Config: v1.Config{
			Env:        []string{"SMOLVM_IMAGE_VAR=hello", "PATH=/usr/local/bin:/usr/bin:/bin"},
			WorkingDir: "/data",
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	img, err = mutate.AppendLayers(img, layer(t, l1), layer(t, l2))
	if err != nil {
		t.Fatal(err)
	}
	return img
}

// testOptions are Options for the tests: no Docker config, logs to t.
func testOptions(t testing.TB) Options {
	return Options{Keychain: authn.NewMultiKeychain(), Log: testWriter{t}}
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Helper()
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

func testDir(t testing.TB) datadir.Dir {
	return datadir.Dir(t.TempDir())
}

// assertClean checks that nothing of a failed build is left: no entry, no
// temp directory.
func assertClean(t *testing.T, d datadir.Dir) {
	t.Helper()
	if bs, err := List(d); err != nil || len(bs) > 0 {
		t.Errorf("cache entries left: %v %v", bs, err)
	}
	ents, _ := os.ReadDir(d.Images())
	for _, e := range ents {
		if e.IsDir() && e.Name() != "refs" {
			t.Errorf("directory left in the cache: %s", e.Name())
		}
	}
	tmp, _ := os.ReadDir(d.Tmp())
	if len(tmp) > 0 {
		t.Errorf("temp entries left: %v", tmp)
	}
}

func wantCode(t *testing.T, err error, code string) *Error {
	t.Helper()
	e, ok := AsError(err)
	if !ok {
		t.Fatalf("err = %v (%T), want *Error with code %s", err, err, code)
	}
	if e.Code != code {
		t.Fatalf("code %s, want %s: %v", e.Code, code, err)
	}
	if strings.Contains(e.Error(), "\n") {
		t.Errorf("error is not one line: %q", e.Error())
	}
	return e
}

// ls lists a directory of an ext4 image by name.
func lsNames(t *testing.T, img, dir string) []string {
	t.Helper()
	var names []string
	for _, line := range strings.Split(debugfs(t, img, "ls -p "+dir), "\n") {
		f := strings.Split(line, "/")
		if len(f) >= 6 && f[5] != "." && f[5] != ".." && f[5] != "" {
			names = append(names, f[5])
		}
	}
	return names
}

// makeExt4Image packs entries into a small ext4 file with mkfs.ext4 -d.
func makeExt4Image(t *testing.T, entries []entry, dst string) {
	t.Helper()
	root := filepath.Join(t.TempDir(), "root")
	if err := os.Mkdir(root, 0o755); err != nil {
		t.Fatal(err)
	}
	a, err := newApplier(root, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer a.close()
	if err := a.apply(context.Background(), bytes.NewReader(tarBytes(t, entries))); err != nil {
		t.Fatal(err)
	}
	if err := a.finish(); err != nil {
		t.Fatal(err)
	}
	f, err := os.Create(dst)
	if err != nil {
		t.Fatal(err)
	}
	f.Truncate(32 << 20)
	f.Close()
	out, err := exec.Command("mkfs.ext4", "-q", "-F", "-d", root, dst).CombinedOutput()
	if err != nil {
		t.Fatalf("mkfs.ext4: %v: %s", err, out)
	}
}

func runTool(name string, args ...string) ([]byte, error) {
	bin, err := LookTool(name, name)
	if err != nil {
		return nil, err
	}
	return exec.Command(bin, args...).CombinedOutput()
}

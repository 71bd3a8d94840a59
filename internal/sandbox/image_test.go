package sandbox_test

import (
	"archive/tar"
	"bytes"
	"context"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"os"
	osexec "os/exec"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/johannesboyne/gofakes3"
	"github.com/johannesboyne/gofakes3/backend/s3mem"

	"github.com/smolvm/smolvm/internal/image"
	"github.com/smolvm/smolvm/internal/sandbox"
	"github.com/smolvm/smolvm/internal/testenv"
)

type tarEntry struct {
	name, body, link string
	mode             int64
	typ              byte
}

func layer(t *testing.T, entries ...tarEntry) v1.Layer {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range entries {
		h := &tar.Header{Name: e.name, Mode: e.mode, Typeflag: e.typ, Linkname: e.link, Size: int64(len(e.body))}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		io.WriteString(tw, e.body)
	}
	tw.Close()
	b := buf.Bytes()
	l, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(b)), nil })
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// testImage is a busybox root in one layer, and a second layer that
// deletes a file and replaces a directory, as image builds do.
func testImage(t *testing.T) v1.Image {
	t.Helper()
	bb, err := os.ReadFile("/bin/busybox")
	if err != nil {
		t.Skipf("Debian's busybox-static is needed to build a test image (scripts/test.sh installs it): %v", err)
	}
	base := []tarEntry{
		{name: "bin/", mode: 0o755, typ: tar.TypeDir},
		{name: "bin/busybox", mode: 0o755, typ: tar.TypeReg, body: string(bb)},
		{name: "etc/", mode: 0o755, typ: tar.TypeDir},
		{name: "etc/passwd", mode: 0o644, typ: tar.TypeReg, body: "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/sh\n"},
		{name: "etc/group", mode: 0o644, typ: tar.TypeReg, body: "root:x:0:\nnogroup:x:65534:\n"},
		{name: "etc/profile", mode: 0o644, typ: tar.TypeReg, body: "export FROM_PROFILE=yes\n"},
		{name: "root/", mode: 0o700, typ: tar.TypeDir},
		{name: "data/", mode: 0o755, typ: tar.TypeDir},
		{name: "data/gone.txt", mode: 0o644, typ: tar.TypeReg, body: "deleted in layer 2\n"},
		{name: "data/dir/", mode: 0o755, typ: tar.TypeDir},
		{name: "data/dir/old.txt", mode: 0o644, typ: tar.TypeReg, body: "old\n"},
	}
	for _, applet := range []string{"sh", "ls", "cat", "echo", "pwd", "id", "env", "test", "hostname", "uname", "true", "sleep"} {
		base = append(base, tarEntry{name: "bin/" + applet, typ: tar.TypeSymlink, link: "busybox", mode: 0o777})
	}
	upper := []tarEntry{
		{name: "data/.wh.gone.txt", mode: 0o644, typ: tar.TypeReg},
		{name: "data/dir/", mode: 0o755, typ: tar.TypeDir},
		{name: "data/dir/.wh..wh..opq", mode: 0o644, typ: tar.TypeReg},
		{name: "data/dir/new.txt", mode: 0o644, typ: tar.TypeReg, body: "new\n"},
	}
	img, err := mutate.AppendLayers(empty.Image, layer(t, base...), layer(t, upper...))
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	cfg = cfg.DeepCopy()
	cfg.OS, cfg.Architecture = "linux", "amd64"
	cfg.Config.Env = []string{"PATH=/bin", "SMOLVM_IMAGE_VAR=hello"}
	cfg.Config.WorkingDir = "/data"
	img, err = mutate.ConfigFile(img, cfg)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

func serveRegistry(t *testing.T, img v1.Image, repos ...string) string {
	t.Helper()
	srv := httptest.NewServer(registry.New(registry.Logger(log.New(io.Discard, "", 0))))
	t.Cleanup(srv.Close)
	host := strings.TrimPrefix(srv.URL, "http://")
	for _, repo := range repos {
		ref, err := name.ParseReference(host+"/"+repo, name.Insecure)
		if err != nil {
			t.Fatal(err)
		}
		if err := remote.Write(ref, img); err != nil {
			t.Fatal(err)
		}
	}
	return host
}

// A sandbox boots from an OCI image pulled from a registry, with the
// layers applied as an image runtime would and the image's config in force.
func TestSandboxFromOCIImage(t *testing.T) {
	t.Parallel()
	host := serveRegistry(t, testImage(t), "test:1", "library/alpine:3.20")
	d := testenv.DataDir(t)
	ctx := context.Background()
	m, err := sandbox.Open(ctx, sandbox.Options{DataDir: d, AgentPath: testenv.AgentPath(t), NetPath: testenv.NetPath(t), RegistryMirror: "http://" + host})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()

	info, err := m.Create(ctx, sandbox.CreateRequest{Image: host + "/test:1", MemoryMiB: 256})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Delete(ctx, info.ID)
	if info.Image != host+"/test:1" {
		t.Errorf("image reported as %q", info.Image)
	}
	for cmd, want := range map[string]string{
		"pwd":                                  "/data\n",
		"echo $SMOLVM_IMAGE_VAR $FROM_PROFILE": "hello yes\n",
		"ls /data/dir":                         "new.txt\n",
		"test -e /data/gone.txt && echo present || echo absent": "absent\n",
		"hostname": info.ID + "\n",
	} {
		if got := exec(t, m, info.ID, cmd); got != want {
			t.Errorf("%s: got %q, want %q", cmd, got, want)
		}
	}

	// The alpine preset resolves through the mirror to the same registry.
	alpine, err := m.Create(ctx, sandbox.CreateRequest{OS: "alpine", MemoryMiB: 256})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Delete(ctx, alpine.ID)
	if got := exec(t, m, alpine.ID, "ls /data/dir"); got != "new.txt\n" {
		t.Errorf("alpine preset through the mirror: ls /data/dir = %q", got)
	}

	// An image the registry does not have is a clear, field-named error,
	// and leaves nothing behind.
	_, err = m.Create(ctx, sandbox.CreateRequest{Image: host + "/missing:1"})
	if e, ok := sandbox.AsError(err); !ok || e.Code != "image_not_found" || e.Field != "image" {
		t.Errorf("missing image: %v", err)
	}
	if list, _ := m.List(ctx); len(list) != 2 {
		t.Errorf("%d sandboxes listed after a failed create, want 2", len(list))
	}
}

// busyboxTar is the test image flattened into one tarball.
func busyboxTar(t *testing.T) []byte {
	t.Helper()
	img := testImage(t)
	flat := mutate.Extract(img)
	defer flat.Close()
	b, err := io.ReadAll(flat)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// Sandboxes boot from root filesystems given as files (a tarball, an ext4
// image, a qcow2 image) and from an S3-compatible store.
func TestSandboxFromFileAndS3Sources(t *testing.T) {
	tarBytes := busyboxTar(t)
	dir := t.TempDir()
	tarPath := dir + "/root.tar"
	if err := os.WriteFile(tarPath, tarBytes, 0o644); err != nil {
		t.Fatal(err)
	}

	s3 := gofakes3.New(s3mem.New(), gofakes3.WithLogger(gofakes3.DiscardLog()))
	srv := httptest.NewServer(s3.Server())
	defer srv.Close()
	for k, v := range map[string]string{
		"AWS_ACCESS_KEY_ID": "AKIDSMOLVMTEST", "AWS_SECRET_ACCESS_KEY": "smolvm-test-secret",
		"AWS_REGION": "us-east-1", "AWS_CONFIG_FILE": os.DevNull, "AWS_SHARED_CREDENTIALS_FILE": os.DevNull,
		"AWS_EC2_METADATA_DISABLED": "true", "AWS_SESSION_TOKEN": "", "AWS_PROFILE": "",
		"SMOLVM_S3_ENDPOINT": srv.URL,
	} {
		t.Setenv(k, v)
	}
	put := func(bucket, key string, data []byte) {
		req, _ := http.NewRequest(http.MethodPut, srv.URL+"/"+bucket, nil)
		http.DefaultClient.Do(req)
		req, _ = http.NewRequest(http.MethodPut, srv.URL+"/"+bucket+"/"+key, bytes.NewReader(data))
		resp, err := http.DefaultClient.Do(req)
		if err != nil || resp.StatusCode != http.StatusOK {
			t.Fatalf("put s3://%s/%s: %v %v", bucket, key, err, resp)
		}
		resp.Body.Close()
	}
	put("images", "root.tar", tarBytes)

	d := testenv.DataDir(t)
	ctx := context.Background()
	m, err := sandbox.Open(ctx, sandbox.Options{DataDir: d, AgentPath: testenv.AgentPath(t), NetPath: testenv.NetPath(t), NoTemplates: true})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()

	boot := func(ref string) sandbox.Info {
		t.Helper()
		info, err := m.Create(ctx, sandbox.CreateRequest{Image: ref, MemoryMiB: 256})
		if err != nil {
			t.Fatalf("create from %s: %v", ref, err)
		}
		if got := exec(t, m, info.ID, "ls /data/dir"); got != "new.txt\n" {
			t.Errorf("%s: ls /data/dir = %q", ref, got)
		}
		return info
	}
	fromTar := boot("file://" + tarPath)
	m.Delete(ctx, fromTar.ID)

	// The ext4 image the tarball became, given back as a file, and as
	// qcow2. The images directory is shared with other tests, so ask the
	// cache which entry is this tarball's rather than look around in it.
	built, err := image.Resolve(ctx, d, image.Source{Image: "file://" + tarPath}, image.Options{})
	if err != nil {
		t.Fatalf("resolve the tarball's cached image: %v", err)
	}
	ext4 := built.Path
	if !strings.HasSuffix(ext4, ".ext4") {
		t.Fatalf("the tarball's image is %s, not an ext4 file", ext4)
	}
	qcow2 := dir + "/root.qcow2"
	if out, err := osexec.Command("qemu-img", "convert", "-O", "qcow2", ext4, qcow2).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img convert: %v %s", err, out)
	}
	for _, ref := range []string{"file://" + ext4, qcow2, "s3://images/root.tar"} {
		info := boot(ref)
		m.Delete(ctx, info.ID)
	}
}

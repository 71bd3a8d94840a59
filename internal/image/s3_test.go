package image

import (
	"bytes"
	"context"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/johannesboyne/gofakes3"
	"github.com/johannesboyne/gofakes3/backend/s3mem"
)

// fakeS3 is gofakes3 over real HTTP on loopback, counting requests.
type fakeS3 struct {
	srv      *httptest.Server
	backend  *s3mem.Backend
	requests atomic.Int64
}

func newFakeS3(t *testing.T) *fakeS3 {
	t.Helper()
	f := &fakeS3{backend: s3mem.New()}
	h := gofakes3.New(f.backend, gofakes3.WithLogger(gofakes3.DiscardLog())).Server()
	f.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		f.requests.Add(1)
		h.ServeHTTP(w, r)
	}))
	t.Cleanup(f.srv.Close)
	return f
}

func (f *fakeS3) put(t *testing.T, bucket, key string, data []byte) {
	t.Helper()
	if err := f.backend.CreateBucket(bucket); err != nil && !strings.Contains(strings.ToLower(err.Error()), "exists") {
		t.Fatal(err)
	}
	if _, err := f.backend.PutObject(bucket, key, nil, bytes.NewReader(data), int64(len(data)), nil); err != nil {
		t.Fatal(err)
	}
}

// s3Env sets fake credentials the way users do, through the standard chain.
func s3Env(t *testing.T) {
	t.Setenv("AWS_ACCESS_KEY_ID", "AKIDSMOLVMTEST")
	t.Setenv("AWS_SECRET_ACCESS_KEY", "smolvm-test-secret")
	t.Setenv("AWS_REGION", "us-east-1")
	t.Setenv("AWS_CONFIG_FILE", os.DevNull)
	t.Setenv("AWS_SHARED_CREDENTIALS_FILE", os.DevNull)
	t.Setenv("AWS_EC2_METADATA_DISABLED", "true")
	for _, v := range []string{"SMOLVM_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_SESSION_TOKEN"} {
		t.Setenv(v, "")
	}
}

func TestResolveS3Sources(t *testing.T) {
	requireRoot(t)
	s3Env(t)
	ext4, qcow2, tgz := sourceFiles(t)
	fs := newFakeS3(t)
	for key, path := range map[string]string{"root.ext4": ext4, "root.qcow2": qcow2, "images/root.tar.gz": tgz} {
		data, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		fs.put(t, "smolvm", key, data)
	}
	d := testDir(t)
	ctx := context.Background()
	o := testOptions(t)
	o.S3Endpoint = fs.srv.URL
	for _, key := range []string{"root.ext4", "root.qcow2", "images/root.tar.gz"} {
		ref := "s3://smolvm/" + key
		b, err := Resolve(ctx, d, Source{Image: ref}, o)
		if err != nil {
			t.Fatalf("%s: %v", ref, err)
		}
		if b.Ref != ref || b.Kind != KindS3 || b.SourceDigest == "" {
			t.Errorf("%s: base %+v", ref, b)
		}
		if got := strings.TrimSpace(debugfs(t, b.Path, "cat /marker.txt")); got != "from a file source" {
			t.Errorf("%s: marker.txt = %q", ref, got)
		}
		// Cached: no request to the store.
		fs.requests.Store(0)
		if again, err := Resolve(ctx, d, Source{Image: ref}, o); err != nil || again.Path != b.Path {
			t.Errorf("%s again: %v %v", ref, again, err)
		}
		if n := fs.requests.Load(); n != 0 {
			t.Errorf("%s: cached resolve made %d requests", ref, n)
		}
	}

	// The endpoint from the environment; a changed object is a new entry.
	t.Setenv("SMOLVM_S3_ENDPOINT", fs.srv.URL)
	o.S3Endpoint = ""
	fs.put(t, "smolvm", "root.ext4", mustRead(t, qcow2))
	o.Refresh = true
	b, err := Resolve(ctx, d, Source{Image: "s3://smolvm/root.ext4"}, o)
	if err != nil {
		t.Fatal(err)
	}
	if list, _ := List(d); len(list) != 4 {
		t.Errorf("%d entries after the object changed, want 4", len(list))
	}
	if b.Kind != KindS3 {
		t.Errorf("base %+v", b)
	}
}

func TestS3Errors(t *testing.T) {
	requireRoot(t)
	s3Env(t)
	fs := newFakeS3(t)
	fs.put(t, "smolvm", "junk", bytes.Repeat([]byte("junk"), 1000))
	d := testDir(t)
	o := testOptions(t)
	o.S3Endpoint = fs.srv.URL
	for _, c := range []struct{ ref, code string }{
		{"s3://smolvm/missing.ext4", CodeNotFound},
		{"s3://nobucket/x.ext4", CodeNotFound},
		{"s3://smolvm/junk", CodeUnsupported},
		{"s3://smolvm/", CodeInvalidRef},
	} {
		_, err := Resolve(context.Background(), d, Source{Image: c.ref}, o)
		e := wantCode(t, err, c.code)
		t.Logf("%s: %v", c.ref, e)
	}
	fs.srv.Close()
	_, err := Resolve(context.Background(), d, Source{Image: "s3://smolvm/junk"}, o)
	wantCode(t, err, CodeRegistryUnreachable)
	assertClean(t, d)
}

func mustRead(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

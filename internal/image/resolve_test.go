package image

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
)

func TestParseSource(t *testing.T) {
	t.Setenv("SMOLVM_REGISTRY_MIRROR", "")
	t.Setenv("SMOLVM_S3_ENDPOINT", "")
	t.Setenv("AWS_ENDPOINT_URL_S3", "")
	t.Setenv("AWS_ENDPOINT_URL", "")
	for _, c := range []struct {
		src                     Source
		o                       Options
		kind, canonical, pullAt string
	}{
		{Source{}, Options{}, kindDefault, "", ""},
		{Source{OS: "debian"}, Options{}, kindDefault, "", ""},
		{Source{OS: "Alpine"}, Options{}, KindOCI, "index.docker.io/library/alpine:3.20", "index.docker.io/library/alpine"},
		{Source{OS: "ubuntu"}, Options{Mirror: "mirror.local:5000"}, KindOCI, "index.docker.io/library/ubuntu:24.04", "mirror.local:5000/library/ubuntu"},
		{Source{OS: "alpine", Image: "python:3.12-slim"}, Options{}, KindOCI, "index.docker.io/library/python:3.12-slim", "index.docker.io/library/python"},
		{Source{Image: "ghcr.io/org/img:tag"}, Options{Mirror: "mirror.local"}, KindOCI, "ghcr.io/org/img:tag", "ghcr.io/org/img"},
		{Source{Image: "name@sha256:" + strings.Repeat("a", 64)}, Options{}, KindOCI, "index.docker.io/library/name@sha256:" + strings.Repeat("a", 64), "index.docker.io/library/name"},
		{Source{Image: "file:///srv/img.qcow2"}, Options{}, KindFile, "file:///srv/img.qcow2", ""},
		{Source{Image: "/srv/../srv/img.qcow2"}, Options{}, KindFile, "file:///srv/img.qcow2", ""},
		{Source{Image: "s3://bucket/dir/key.ext4"}, Options{S3Endpoint: "127.0.0.1:9000"}, KindS3, "s3://bucket/dir/key.ext4 http://127.0.0.1:9000", ""},
	} {
		s, err := parseSource(c.src, c.o)
		if err != nil {
			t.Errorf("%+v: %v", c.src, err)
			continue
		}
		if s.kind != c.kind || s.canonical != c.canonical {
			t.Errorf("%+v: kind %s canonical %q, want %s %q", c.src, s.kind, s.canonical, c.kind, c.canonical)
		}
		if c.pullAt != "" && s.pull.Name() != c.pullAt {
			t.Errorf("%+v: pulls from %s, want %s", c.src, s.pull.Name(), c.pullAt)
		}
	}
	for _, c := range []struct {
		src  Source
		o    Options
		code string
	}{
		{Source{OS: "windows"}, Options{}, CodeUnsupported},
		{Source{OS: "plan9"}, Options{}, CodeUnsupported},
		{Source{Image: "UPPER:case"}, Options{}, CodeInvalidRef},
		{Source{Image: "name@sha256:short"}, Options{}, CodeInvalidRef},
		{Source{Image: "https://example.com/img"}, Options{}, CodeInvalidRef},
		{Source{Image: "file://relative/x"}, Options{}, CodeInvalidRef},
		{Source{Image: "s3://bucket"}, Options{}, CodeInvalidRef},
		{Source{Image: "alpine"}, Options{Mirror: "mirror/with/path"}, CodeInvalidRef},
		{Source{Image: "s3://b/k"}, Options{S3Endpoint: "ftp://x"}, CodeInvalidRef},
	} {
		_, err := parseSource(c.src, c.o)
		if e, ok := AsError(err); !ok || e.Code != c.code {
			t.Errorf("%+v: err = %v, want code %s", c.src, err, c.code)
		}
	}
}

func TestMirrorSchemes(t *testing.T) {
	s, err := parseSource(Source{Image: "alpine:3.20"}, Options{Mirror: "http://mirror.example:5000/"})
	if err != nil {
		t.Fatal(err)
	}
	if s.pull.Registry.Scheme() != "http" || s.pull.Name() != "mirror.example:5000/library/alpine" {
		t.Errorf("pull %s over %s", s.pull.Name(), s.pull.Registry.Scheme())
	}
	s, err = parseSource(Source{Image: "alpine:3.20"}, Options{Mirror: "mirror.example"})
	if err != nil || s.pull.Registry.Scheme() != "https" {
		t.Errorf("https mirror: %v %v", s, err)
	}
	if s.display != "alpine:3.20" {
		t.Errorf("display %q", s.display)
	}
}

func TestErrorsAreOneLineAndClassified(t *testing.T) {
	e := newError(CodeBuildFailed, "x", errors.New("mkfs.ext4: exit 1:\nline one\nline two"), "building x failed")
	if strings.Contains(e.Error(), "\n") || !strings.Contains(e.Error(), "line two") {
		t.Errorf("%q", e.Error())
	}
	ctx := context.Background()
	for _, c := range []struct {
		err  error
		code string
	}{
		{&transport.Error{StatusCode: 404, Errors: []transport.Diagnostic{{Code: transport.ManifestUnknownErrorCode}}}, CodeNotFound},
		{&transport.Error{StatusCode: 401, Errors: []transport.Diagnostic{{Code: transport.UnauthorizedErrorCode}}}, CodeUnauthorized},
		{&transport.Error{StatusCode: 403}, CodeUnauthorized},
		{&transport.Error{StatusCode: 429}, CodeRegistryUnreachable},
		{&transport.Error{StatusCode: 503}, CodeRegistryUnreachable},
		{&transport.Error{StatusCode: 404, Errors: []transport.Diagnostic{{Code: transport.BlobUnknownErrorCode}}}, CodeCorrupt},
		{errors.New(`manifest digest: "sha256:aa" does not match requested digest: "sha256:bb"`), CodeCorrupt},
		{corrupt("bad layer"), CodeCorrupt},
		{context.DeadlineExceeded, CodeRegistryUnreachable},
	} {
		err := classifyRegistry(ctx, "r", "reg", c.err)
		if e, ok := AsError(err); !ok || e.Code != c.code {
			t.Errorf("%v: %v, want %s", c.err, err, c.code)
		}
	}
	cancelled, cancel := context.WithCancel(ctx)
	cancel()
	if err := classifyRegistry(cancelled, "r", "reg", errors.New("x")); !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled: %v", err)
	}
}

func TestPlainMD5(t *testing.T) {
	if m, ok := plainMD5(`"0123456789ABCDEF0123456789abcdef"`); !ok || m != "0123456789abcdef0123456789abcdef" {
		t.Errorf("%q %v", m, ok)
	}
	if _, ok := plainMD5(`"0123456789abcdef0123456789abcdef-3"`); ok {
		t.Error("multipart ETag taken for an MD5")
	}
}

func TestStalledTransferIsUnreachable(t *testing.T) {
	// Headers, half a body, then silence.
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", "1000")
		w.Write(make([]byte, 500))
		w.(http.Flusher).Flush()
		<-r.Context().Done()
	}))
	defer srv.Close()
	o := Options{stallTimeout: 500 * time.Millisecond}
	rt := httpTransport(o)
	defer closeIdle(rt)
	start := time.Now()
	resp, err := (&http.Client{Transport: rt}).Get(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	_, err = readAll(resp)
	if !isNetworkError(err) || !errors.Is(err, errStalled) {
		t.Errorf("err = %v, want a stall", err)
	}
	if took := time.Since(start); took > 5*time.Second {
		t.Errorf("took %s", took)
	}
}

func readAll(resp *http.Response) ([]byte, error) {
	defer resp.Body.Close()
	var b strings.Builder
	buf := make([]byte, 100)
	for {
		n, err := resp.Body.Read(buf)
		b.Write(buf[:n])
		if err != nil {
			return []byte(b.String()), err
		}
	}
}

func TestResolveDefaultIsTheDebianImage(t *testing.T) {
	f := sharedImage(t)
	for _, src := range []Source{{}, {OS: "debian"}} {
		b, err := Resolve(context.Background(), f.dir, src, Options{})
		if err != nil {
			t.Fatal(err)
		}
		want := *f.bases[0]
		want.Ref = src.OS
		if !reflect.DeepEqual(*b, want) {
			t.Errorf("Resolve(%+v) = %+v, want %+v", src, b, want)
		}
	}
	list, err := List(f.dir)
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, b := range list {
		if b.Path == f.bases[0].Path {
			found = b.Kind == KindDebootstrap && b.Ref == "debian"
		}
	}
	if !found {
		t.Errorf("List does not show the default image as debian: %+v", list)
	}
}

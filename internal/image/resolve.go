package image

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"

	"github.com/smolvm/smolvm/internal/datadir"
)

// Source is what a create request asks for: an OS preset, or an image
// reference. Image wins when both are set.
type Source struct {
	OS    string
	Image string
}

// Options tune how Resolve fetches images. The zero value uses the
// environment's settings.
type Options struct {
	// Mirror is a registry mirror (host[:port], or http://host[:port] for
	// one without TLS) that Docker Hub references are pulled through; ""
	// means $SMOLVM_REGISTRY_MIRROR. With a mirror set, Docker Hub itself
	// is not contacted.
	Mirror string
	// Keychain supplies registry credentials; nil means the user's Docker
	// configuration (authn.DefaultKeychain).
	Keychain authn.Keychain
	// S3Endpoint overrides the S3 endpoint (an S3-compatible store; path-
	// style addressing is used); "" means $SMOLVM_S3_ENDPOINT, then
	// $AWS_ENDPOINT_URL_S3, then $AWS_ENDPOINT_URL, then AWS itself.
	S3Endpoint string
	// Log receives progress lines (plain text); nil discards them.
	Log io.Writer
	// Progress, if set, receives structured progress.
	Progress func(Progress)
	// Refresh asks the registry or store again for a tag or S3 object that
	// was resolved before (what `smolvm image pull` does). Without it, a
	// reference resolved before is used as recorded and no network request
	// is made. Digests and files are checked by content either way.
	Refresh bool

	// Bounds on network waits; zero means the defaults. Tests shorten them.
	resolveTimeout time.Duration
	stallTimeout   time.Duration
}

const (
	// defaultResolveTimeout bounds finding out what a reference points to,
	// retries included: the wait for an unreachable registry.
	defaultResolveTimeout = 30 * time.Second
	// defaultStallTimeout bounds any single network wait during a transfer:
	// response headers, or the gap between two reads of a body.
	defaultStallTimeout = 30 * time.Second
)

func (o Options) resolveBound() time.Duration {
	if o.resolveTimeout > 0 {
		return o.resolveTimeout
	}
	return defaultResolveTimeout
}

func (o Options) stallBound() time.Duration {
	if o.stallTimeout > 0 {
		return o.stallTimeout
	}
	return defaultStallTimeout
}

// Preset returns the pinned image reference of an OS preset ("alpine",
// "ubuntu"). "debian" and "" are the default image, which has no reference.
func Preset(os string) (ref string, ok bool) {
	switch os {
	case "alpine":
		return "alpine:3.20", true
	case "ubuntu":
		return "ubuntu:24.04", true
	}
	return "", false
}

const kindDefault = "default"

// source is a parsed Source.
type source struct {
	kind      string // kindDefault, KindOCI, KindFile, KindS3
	ref       string // as given, for Base.Ref and messages
	canonical string // names the source in ref records

	// OCI
	oci      name.Reference // as named by the user (Docker Hub if no registry)
	pull     name.Repository
	registry string // the host contacted, for messages
	display  string // short familiar name

	// file
	path string

	// S3
	bucket, key, endpoint string
}

// parseSource validates src without touching the network or the disk.
func parseSource(src Source, o Options) (*source, error) {
	img := strings.TrimSpace(src.Image)
	if img == "" {
		switch osName := strings.ToLower(strings.TrimSpace(src.OS)); osName {
		case "", "debian":
			return &source{kind: kindDefault, ref: osName}, nil
		case "windows":
			return nil, newError(CodeUnsupported, "windows", nil, "os \"windows\" is not supported yet: only Linux guests can be created")
		default:
			ref, ok := Preset(osName)
			if !ok {
				return nil, newError(CodeUnsupported, osName, nil, "unknown os %q: use alpine, ubuntu or debian, or give an image", src.OS)
			}
			img = ref
		}
	}
	switch {
	case strings.HasPrefix(img, "file://"):
		u, err := url.Parse(img)
		if err != nil {
			return nil, newError(CodeInvalidRef, img, err, "invalid file URL %q: use file:///absolute/path", img)
		}
		if u.Host != "" && u.Host != "localhost" {
			return nil, newError(CodeInvalidRef, img, nil, "file URL %q names host %q: use file:///absolute/path", img, u.Host)
		}
		if !filepath.IsAbs(u.Path) {
			return nil, newError(CodeInvalidRef, img, nil, "file URL %q needs an absolute path: file:///absolute/path", img)
		}
		return fileSource(img, u.Path), nil
	case strings.HasPrefix(img, "/"):
		return fileSource(img, img), nil
	case strings.HasPrefix(img, "s3://"):
		bucket, key, _ := strings.Cut(strings.TrimPrefix(img, "s3://"), "/")
		if bucket == "" || key == "" || strings.HasSuffix(key, "/") {
			return nil, newError(CodeInvalidRef, img, nil, "invalid S3 URL %q: use s3://bucket/key", img)
		}
		endpoint, err := s3Endpoint(o.S3Endpoint)
		if err != nil {
			return nil, newError(CodeInvalidRef, img, err, "invalid S3 endpoint setting")
		}
		return &source{
			kind: KindS3, ref: img, bucket: bucket, key: key, endpoint: endpoint,
			canonical: "s3://" + bucket + "/" + key + " " + endpoint,
		}, nil
	case strings.Contains(img, "://"):
		return nil, newError(CodeInvalidRef, img, nil, "unsupported image %q: give an OCI reference (name:tag, registry/name@sha256:...), file:///path or s3://bucket/key", img)
	case strings.HasPrefix(img, "./") || strings.HasPrefix(img, "../"):
		return nil, newError(CodeInvalidRef, img, nil, "image path %q is relative: give an absolute path or file:///path", img)
	}
	return ociSource(img, o)
}

func fileSource(given, path string) *source {
	p := filepath.Clean(path)
	return &source{kind: KindFile, ref: given, path: p, canonical: "file://" + p}
}

func ociSource(img string, o Options) (*source, error) {
	ref, err := name.ParseReference(img)
	if err != nil {
		return nil, newError(CodeInvalidRef, img, err, "invalid image reference %q: use name[:tag] or name@sha256:digest", img)
	}
	s := &source{kind: KindOCI, ref: img, oci: ref, canonical: ref.Name(), display: familiar(ref)}
	s.pull = ref.Context()
	s.registry = ref.Context().RegistryStr()
	if s.registry == name.DefaultRegistry {
		mirror := o.Mirror
		if mirror == "" {
			mirror = os.Getenv("SMOLVM_REGISTRY_MIRROR")
		}
		if mirror != "" {
			reg, err := mirrorRegistry(mirror)
			if err != nil {
				return nil, newError(CodeInvalidRef, img, err, "invalid registry mirror %q: use host[:port] or http://host[:port]", mirror)
			}
			s.pull = reg.Repo(ref.Context().RepositoryStr())
			s.registry = reg.RegistryStr() + " (mirror of docker.io)"
		}
	}
	return s, nil
}

// mirrorRegistry parses a mirror setting: host[:port], optionally with a
// scheme; http:// means the mirror has no TLS.
func mirrorRegistry(m string) (name.Registry, error) {
	var opts []name.Option
	host := strings.TrimSuffix(m, "/")
	switch {
	case strings.HasPrefix(host, "http://"):
		host = strings.TrimPrefix(host, "http://")
		opts = append(opts, name.Insecure)
	case strings.HasPrefix(host, "https://"):
		host = strings.TrimPrefix(host, "https://")
	}
	if host == "" || strings.Contains(host, "/") {
		return name.Registry{}, fmt.Errorf("a mirror is a host, not a path: %q", m)
	}
	return name.NewRegistry(host, opts...)
}

// familiar shortens a reference the way docker prints it: no docker.io,
// no library/.
func familiar(ref name.Reference) string {
	repo := ref.Context().Name()
	repo = strings.TrimPrefix(repo, name.DefaultRegistry+"/")
	repo = strings.TrimPrefix(repo, "library/")
	switch r := ref.(type) {
	case name.Tag:
		return repo + ":" + r.TagStr()
	case name.Digest:
		return repo + "@" + r.DigestStr()
	}
	return ref.String()
}

// s3Endpoint picks the endpoint override and gives it a scheme.
func s3Endpoint(override string) (string, error) {
	e := override
	for _, env := range []string{"SMOLVM_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"} {
		if e != "" {
			break
		}
		e = os.Getenv(env)
	}
	if e == "" {
		return "", nil
	}
	if !strings.Contains(e, "://") {
		host := e
		if h, _, err := net.SplitHostPort(e); err == nil {
			host = h
		}
		if ip := net.ParseIP(host); host == "localhost" || (ip != nil && ip.IsLoopback()) {
			e = "http://" + e
		} else {
			e = "https://" + e
		}
	}
	u, err := url.Parse(e)
	if err != nil || u.Host == "" || (u.Scheme != "http" && u.Scheme != "https") {
		return "", fmt.Errorf("S3 endpoint %q is not an http(s) URL", e)
	}
	return strings.TrimSuffix(e, "/"), nil
}

// Resolve returns the base image for src, pulling or building it on first
// use and from the cache (without network requests) after that. Failures
// are *Error values with a stable Code, except that the caller's context
// ending returns its error.
func Resolve(ctx context.Context, d datadir.Dir, src Source, o Options) (*Base, error) {
	s, err := parseSource(src, o)
	if err != nil {
		return nil, err
	}
	rep := newReporter(o)
	var b *Base
	switch s.kind {
	case kindDefault:
		b, err = Default(ctx, d, o.Log)
		if err != nil {
			return nil, buildFailed("debian", err)
		}
	case KindOCI:
		b, err = resolveOCI(ctx, d, s, o, rep)
	case KindFile:
		b, err = resolveFile(ctx, d, s, rep)
	case KindS3:
		b, err = resolveS3(ctx, d, s, o, rep)
	}
	if err != nil {
		if e, ok := AsError(err); ok && e.Ref == "" {
			e.Ref = s.ref
		}
		return nil, err
	}
	// Name and Ref say what this request asked for; the entry may have been
	// built for another reference to the same content.
	if s.ref != "" {
		b.Ref = s.ref
	}
	switch s.kind {
	case KindOCI:
		b.Name = s.display
	case KindFile, KindS3:
		b.Name = s.ref
	}
	rep.emit(Progress{Phase: PhaseReady, Done: b.SizeBytes, Total: b.SizeBytes})
	return b, nil
}

// httpTransport is the base of every registry and S3 connection: bounded
// dial, TLS and header waits, and a stall bound on bodies.
func httpTransport(o Options) http.RoundTripper {
	return &stallTransport{
		timeout: o.stallBound(),
		base: &http.Transport{
			Proxy: http.ProxyFromEnvironment,
			DialContext: (&net.Dialer{
				Timeout:   10 * time.Second,
				KeepAlive: 30 * time.Second,
			}).DialContext,
			ForceAttemptHTTP2:     true,
			MaxIdleConnsPerHost:   8,
			IdleConnTimeout:       90 * time.Second,
			TLSHandshakeTimeout:   10 * time.Second,
			ResponseHeaderTimeout: o.stallBound(),
			ExpectContinueTimeout: time.Second,
		},
	}
}

func closeIdle(rt http.RoundTripper) {
	if st, ok := rt.(*stallTransport); ok {
		if t, ok := st.base.(*http.Transport); ok {
			t.CloseIdleConnections()
		}
	}
}

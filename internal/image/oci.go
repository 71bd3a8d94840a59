package image

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/remote/transport"

	"github.com/smolvm/smolvm/internal/datadir"
)

// The platform smolvm guests run.
const (
	guestOS   = "linux"
	guestArch = "amd64"
)

// pullJobs is how many layers download at once.
const pullJobs = 3

// resolveOCI returns the entry for an OCI reference: from the cache when
// the reference was resolved before (or names a digest already built), else
// by asking the registry for the manifest digest and building the entry for
// it once.
func resolveOCI(ctx context.Context, d datadir.Dir, s *source, o Options, rep *reporter) (*Base, error) {
	digestRef, isDigest := s.oci.(name.Digest)
	if isDigest || !o.Refresh {
		if b := cachedOCI(d, s, digestRef, isDigest); b != nil {
			return b, nil
		}
	}

	rt := httpTransport(o)
	defer closeIdle(rt)
	opts := remoteOptions(o, rt)

	rep.phase(PhaseResolve, 0)
	rep.logf("resolving %s (registry %s)...", s.display, s.registry)
	top, manifest, err := resolveDigest(ctx, s, o, opts)
	if err != nil {
		cerr := classifyRegistry(ctx, s.ref, s.registry, err)
		if e, ok := AsError(cerr); ok && e.Code == CodeRegistryUnreachable {
			// An explicit refresh of a tag that cannot reach its registry
			// still has the last answer.
			if rec, ok := readRef(d, s.canonical); ok {
				if b, lerr := loadEntry(d, rec.Entry); lerr == nil {
					rep.logf("registry %s unreachable (%v); using the cached %s resolved %s",
						s.registry, err, s.display, rec.ResolvedAt.Local().Format(time.RFC3339))
					return b, nil
				}
			}
		}
		return nil, cerr
	}

	id := "oci-" + manifest.Hex
	b, built, err := ensureEntry(ctx, d, id, rep, func(ctx context.Context, work, out string) (*entryMeta, error) {
		return buildOCI(ctx, s, top, manifest, opts, work, out, rep)
	})
	if err != nil {
		if e, ok := AsError(err); ok {
			return nil, e
		}
		var te *transport.Error
		if isCorrupt(err) || isNetworkError(err) || errors.As(err, &te) {
			return nil, classifyRegistry(ctx, s.ref, s.registry, err)
		}
		return nil, buildFailed(s.ref, err)
	}
	if err := writeRef(d, refRecord{Ref: s.canonical, Given: s.ref, Entry: id, Digest: top.String(), ResolvedAt: time.Now().UTC()}); err != nil {
		rep.logf("warning: could not record %s: %v", s.display, err)
	}
	if !built {
		rep.logf("%s is cached as %s", s.display, short(manifest.String()))
	}
	return b, nil
}

// cachedOCI finds the entry for s without the network: by the record of a
// previous resolution, or for a digest reference by the digest itself
// (manifest, or the index it was chosen from).
func cachedOCI(d datadir.Dir, s *source, dg name.Digest, isDigest bool) *Base {
	if rec, ok := readRef(d, s.canonical); ok {
		if b, err := loadEntry(d, rec.Entry); err == nil {
			return b
		}
	}
	if !isDigest {
		return nil
	}
	h, err := v1.NewHash(dg.DigestStr())
	if err != nil {
		return nil
	}
	if b, err := loadEntry(d, "oci-"+h.Hex); err == nil {
		return b
	}
	ents, _ := os.ReadDir(d.Images())
	for _, e := range ents {
		if !e.IsDir() || !strings.HasPrefix(e.Name(), "oci-") {
			continue
		}
		m, err := readMeta(d, e.Name())
		if err == nil && m.IndexDigest == h.String() {
			if b, err := loadEntry(d, e.Name()); err == nil {
				return b
			}
		}
	}
	return nil
}

// remoteOptions are the go-containerregistry options for every request: the
// keychain, our bounded transport, the guest platform and short retries.
func remoteOptions(o Options, rt http.RoundTripper) []remote.Option {
	kc := o.Keychain
	if kc == nil {
		kc = authn.DefaultKeychain
	}
	return []remote.Option{
		remote.WithAuthFromKeychain(kc),
		remote.WithTransport(rt),
		remote.WithPlatform(v1.Platform{OS: guestOS, Architecture: guestArch}),
		remote.WithUserAgent("smolvm"),
		remote.WithJobs(pullJobs),
		remote.WithRetryBackoff(remote.Backoff{Duration: 500 * time.Millisecond, Factor: 2, Jitter: 0.1, Steps: 3}),
	}
}

// resolveDigest asks the registry what s points to, within the resolve
// bound: top is the digest of what the reference names (an index or a
// manifest), manifest the linux/amd64 image manifest's.
func resolveDigest(ctx context.Context, s *source, o Options, opts []remote.Option) (top, manifest v1.Hash, err error) {
	rctx, cancel := context.WithTimeoutCause(ctx, o.resolveBound(),
		&unreachableError{err: fmt.Errorf("no answer from %s within %s", s.registry, o.resolveBound())})
	defer cancel()
	ref := pullRef(s)
	desc, err := remote.Get(ref, append(opts, remote.WithContext(rctx))...)
	if err != nil {
		return top, manifest, stageError(rctx, err)
	}
	top = desc.Digest
	switch {
	case desc.MediaType.IsIndex():
		idx, err := desc.ImageIndex()
		if err != nil {
			return top, manifest, stageError(rctx, err)
		}
		im, err := idx.IndexManifest()
		if err != nil {
			return top, manifest, stageError(rctx, err)
		}
		var seen []string
		for _, c := range im.Manifests {
			p := v1.Platform{OS: guestOS, Architecture: guestArch}
			if c.Platform != nil {
				p = *c.Platform
			}
			if p.OS == guestOS && p.Architecture == guestArch && c.MediaType.IsImage() {
				return top, c.Digest, nil
			}
			if p.OS != "unknown" {
				seen = append(seen, p.OS+"/"+p.Architecture)
			}
		}
		return top, manifest, newError(CodeUnsupported, s.ref, nil,
			"image %s has no %s/%s variant (it has %s): smolvm guests run %s/%s", s.display, guestOS, guestArch, strings.Join(seen, ", "), guestOS, guestArch)
	case desc.MediaType.IsImage():
		return top, desc.Digest, nil
	case desc.MediaType.IsSchema1():
		return top, manifest, newError(CodeUnsupported, s.ref, nil, "image %s uses the retired Docker schema 1 manifest format: rebuild or re-push it", s.display)
	}
	return top, manifest, newError(CodeUnsupported, s.ref, nil, "%s is not a container image (media type %s)", s.display, desc.MediaType)
}

// pullRef is what to fetch for s: the same tag or digest, in the registry
// (or mirror) to contact.
func pullRef(s *source) name.Reference {
	switch r := s.oci.(type) {
	case name.Digest:
		return s.pull.Digest(r.DigestStr())
	case name.Tag:
		return s.pull.Tag(r.TagStr())
	}
	return s.oci
}

// buildOCI downloads the layers of manifest, verifies them, flattens them
// into a tree and packs it.
func buildOCI(ctx context.Context, s *source, top, manifest v1.Hash, opts []remote.Option, work, out string, rep *reporter) (*entryMeta, error) {
	mkfs, err := treeTools()
	if err != nil {
		return nil, newError(CodeBuildFailed, s.ref, err, "cannot build image %s here", s.display)
	}
	start := time.Now()
	img, err := remote.Image(s.pull.Digest(manifest.String()), append(opts, remote.WithContext(ctx))...)
	if err != nil {
		return nil, err
	}
	m, err := img.Manifest()
	if err != nil {
		return nil, err
	}
	cfg, err := img.ConfigFile()
	if err != nil {
		return nil, err
	}
	if (cfg.OS != "" && cfg.OS != guestOS) || (cfg.Architecture != "" && cfg.Architecture != guestArch) {
		return nil, newError(CodeUnsupported, s.ref, nil, "image %s is for %s/%s: smolvm guests run %s/%s", s.display, cfg.OS, cfg.Architecture, guestOS, guestArch)
	}
	var total int64
	for _, l := range m.Layers {
		total += l.Size
	}
	rep.logf("pulling %s: %d layers, %.1f MiB...", s.display, len(m.Layers), float64(total)/(1<<20))
	rep.phase(PhasePull, total)
	blobs := filepath.Join(work, "blobs")
	if err := os.Mkdir(blobs, 0o700); err != nil {
		return nil, err
	}
	paths, err := downloadLayers(ctx, img, m.Layers, blobs, rep)
	if err != nil {
		return nil, err
	}
	rep.logf("pulled in %s; unpacking...", time.Since(start).Round(time.Millisecond))
	root := filepath.Join(work, "root")
	if err := unpackTo(ctx, root, paths, true, rep); err != nil {
		return nil, err
	}
	if err := os.RemoveAll(blobs); err != nil {
		return nil, err
	}
	if err := packTree(ctx, mkfs, root, out, rep); err != nil {
		return nil, err
	}
	meta := &entryMeta{
		Kind: KindOCI, Name: s.display, Ref: s.ref,
		Source:       s.oci.Context().Name() + "@" + manifest.String(),
		SourceDigest: manifest.String(),
		Platform:     guestOS + "/" + guestArch,
		Config: Config{
			Env:        cfg.Config.Env,
			WorkingDir: cfg.Config.WorkingDir,
			User:       cfg.Config.User,
		},
	}
	if top != manifest {
		meta.IndexDigest = top.String()
	}
	rep.logf("image %s built in %s", s.display, time.Since(start).Round(time.Millisecond))
	return meta, nil
}

// downloadLayers fetches the layer blobs into dir, a few at a time, each
// checked against its digest and size. It returns their paths in order.
func downloadLayers(ctx context.Context, img v1.Image, layers []v1.Descriptor, dir string, rep *reporter) ([]string, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	paths := make([]string, len(layers))
	errs := make([]error, len(layers))
	sem := make(chan struct{}, pullJobs)
	var wg sync.WaitGroup
	for i, l := range layers {
		paths[i] = filepath.Join(dir, fmt.Sprintf("%03d", i))
		wg.Add(1)
		go func() {
			defer wg.Done()
			select {
			case sem <- struct{}{}:
			case <-ctx.Done():
				errs[i] = ctx.Err()
				return
			}
			defer func() { <-sem }()
			if err := fetchBlob(img, l, paths[i], rep); err != nil {
				errs[i] = fmt.Errorf("layer %s: %w", short(l.Digest.String()), err)
				cancel() // no point fetching the rest
			}
		}()
	}
	wg.Wait()
	// Report the first real failure, not the cancellations it caused.
	for _, err := range errs {
		if err != nil && !errors.Is(err, context.Canceled) {
			return nil, err
		}
	}
	for _, err := range errs {
		if err != nil {
			return nil, err
		}
	}
	return paths, nil
}

// fetchBlob copies one layer blob to path, hashing what arrives: a blob
// whose bytes do not match its digest is reported as corrupt, whatever the
// library's own check says first.
func fetchBlob(img v1.Image, desc v1.Descriptor, path string, rep *reporter) error {
	l, err := img.LayerByDigest(desc.Digest)
	if err != nil {
		return err
	}
	rc, err := l.Compressed()
	if err != nil {
		return err
	}
	defer rc.Close()
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	defer f.Close()
	h, err := v1.Hasher(desc.Digest.Algorithm)
	if err != nil {
		return corrupt("layer digest %s: %w", desc.Digest, err)
	}
	n, err := io.Copy(io.MultiWriter(f, h, counter{rep}), rc)
	got := desc.Digest.Algorithm + ":" + hex.EncodeToString(h.Sum(nil))
	if n == desc.Size && got != desc.Digest.String() {
		return corrupt("layer content has digest %s, want %s", got, desc.Digest)
	}
	if err != nil {
		return err
	}
	if n != desc.Size {
		return corrupt("layer is %d bytes, want %d", n, desc.Size)
	}
	if got != desc.Digest.String() {
		return corrupt("layer content has digest %s, want %s", got, desc.Digest)
	}
	return f.Close()
}

// short abbreviates a digest for messages and tables.
func short(digest string) string {
	alg, h, ok := strings.Cut(digest, ":")
	if !ok {
		alg, h = "", digest
	}
	if len(h) > 12 {
		h = h[:12]
	}
	if alg == "" {
		return h
	}
	return alg + ":" + h
}

// Package image provides the read-only root filesystem images that sandboxes
// boot from. The default image is a minimal Debian built locally with
// debootstrap and packed into a raw ext4 file; Resolve also turns OCI images,
// ext4, qcow2 and tarball files and S3 objects into such files, cached by
// content under the data directory.
package image

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/smolvm/smolvm/internal/datadir"
)

// ErrNotBuilt means the requested image is not in the cache yet.
var ErrNotBuilt = errors.New("image not built")

// Base is a read-only root filesystem image that sandboxes overlay.
type Base struct {
	Name      string // e.g. "debian-bookworm", "python:3.12-slim"
	Path      string // raw ext4 file, mode 0444, never modified after it is built
	Digest    string // "sha256:<hex>" of the file's bytes
	SizeBytes int64

	Ref    string // the reference it was resolved from, as given ("" for the default)
	Config Config // how to run commands in it; zero for the default image

	Refs         []string  // references recorded as resolving to it (List only)
	ID           string    // cache entry name under the data directory's images/
	Kind         string    // KindDebootstrap, KindOCI, KindFile or KindS3
	SourceDigest string    // manifest digest (OCI), sha256 of the file, or the S3 ETag
	Created      time.Time // when the entry was built
}

// Config is what an image says about how to run commands in it.
type Config struct {
	Env        []string `json:"env,omitempty"` // KEY=VALUE, from the OCI config
	WorkingDir string   `json:"working_dir,omitempty"`
	User       string   `json:"user,omitempty"` // as in the OCI config: "name", "uid", "uid:gid", "name:group"
}

// formatVersion changes whenever the build steps after debootstrap (shrinking,
// mkfs options, metadata layout) change, so old images are not reused.
const formatVersion = 2

const (
	imageFile = "rootfs.ext4"
	metaFile  = "image.json"
)

// recipe is everything that decides an image's contents. Its hash names the
// cache directory, so a changed recipe builds a new image next to the old one.
type recipe struct {
	Name    string   `json:"name"`
	Suite   string   `json:"suite"`
	Variant string   `json:"variant"`
	Include []string `json:"include"`
	Format  int      `json:"format"`
}

func defaultRecipe() recipe {
	return recipe{
		Name:    "debian-bookworm",
		Suite:   "bookworm",
		Variant: "minbase",
		// The full python3 (http.server, venv, json...) and ps are what
		// agents reach for first.
		Include: []string{"python3", "procps"},
		Format:  formatVersion,
	}
}

// key is a short, stable hash of the recipe.
func (r recipe) key() string {
	c := r
	c.Include = slices.Clone(r.Include)
	slices.Sort(c.Include)
	b, err := json.Marshal(c)
	if err != nil {
		// A struct of strings and ints always marshals.
		return "invalid"
	}
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])[:16]
}

// id names the image's cache directory, lock file and temp directories.
func (r recipe) id() string { return r.Name + "-" + r.key() }

func (r recipe) dir(d datadir.Dir) string { return filepath.Join(d.Images(), r.id()) }

func (r recipe) lockPath(d datadir.Dir) string {
	return filepath.Join(d.Images(), r.id()+".lock")
}

// tempPrefix starts the names of build directories in d.Tmp(); a directory
// with this prefix found while holding the image's lock is a leftover from a
// build that was killed.
func (r recipe) tempPrefix() string { return "build-" + r.id() + "-" }

// metadata is written next to the image file.
type metadata struct {
	Name         string    `json:"name"`
	Digest       string    `json:"digest"`
	SizeBytes    int64     `json:"size_bytes"`
	BuiltAt      time.Time `json:"built_at"`
	BuildSeconds float64   `json:"build_seconds"`
	Mirror       string    `json:"mirror"`
	Key          string    `json:"key"`
	Recipe       recipe    `json:"recipe"`
}

// Default returns the default Linux base image, building it on first use.
// Building needs root, debootstrap and mkfs.ext4, and takes about a minute;
// concurrent callers, in this process or others, wait for one build.
func Default(ctx context.Context, d datadir.Dir, log io.Writer) (*Base, error) {
	if log == nil {
		log = io.Discard
	}
	return ensure(ctx, d, defaultRecipe(), log)
}

// Cached returns the default image if it was built already, without building
// (error wrapping ErrNotBuilt otherwise).
func Cached(d datadir.Dir) (*Base, error) {
	return load(d, defaultRecipe())
}

// load reads a finished image from the cache. A missing or damaged entry is
// reported as ErrNotBuilt so that Default rebuilds it.
func load(d datadir.Dir, r recipe) (*Base, error) {
	dir := r.dir(d)
	b, err := os.ReadFile(filepath.Join(dir, metaFile))
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("image %s: %w (run `smolvm setup`, or it is built on first use)", r.Name, ErrNotBuilt)
	}
	if err != nil {
		return nil, fmt.Errorf("read image metadata: %w", err)
	}
	var m metadata
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, fmt.Errorf("image %s: metadata %s unreadable (%v): %w", r.Name, dir, err, ErrNotBuilt)
	}
	path := filepath.Join(dir, imageFile)
	st, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("image %s: %v: %w", r.Name, err, ErrNotBuilt)
	}
	if st.Size() != m.SizeBytes || m.Digest == "" {
		return nil, fmt.Errorf("image %s: %s does not match its metadata: %w", r.Name, path, ErrNotBuilt)
	}
	return &Base{Name: m.Name, Path: path, Digest: m.Digest, SizeBytes: m.SizeBytes,
		ID: r.id(), Kind: KindDebootstrap, Created: m.BuiltAt}, nil
}

// ensure returns the image for r, building it under an exclusive lock if it
// is not cached.
func ensure(ctx context.Context, d datadir.Dir, r recipe, log io.Writer) (*Base, error) {
	if b, err := load(d, r); err == nil || !errors.Is(err, ErrNotBuilt) {
		return b, err
	}
	for _, dir := range []string{d.Images(), d.Tmp()} {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return nil, fmt.Errorf("create data directory: %w", err)
		}
	}
	unlock, err := lockExclusive(ctx, r.lockPath(d), func() {
		fmt.Fprintf(log, "waiting for another process building image %s...\n", r.Name)
	})
	if err != nil {
		return nil, fmt.Errorf("lock image %s: %w", r.Name, err)
	}
	defer unlock()

	// Whoever held the lock before may have finished the image.
	if b, err := load(d, r); err == nil || !errors.Is(err, ErrNotBuilt) {
		return b, err
	}
	if err := removeLeftovers(d, r); err != nil {
		return nil, err
	}
	return build(ctx, d, r, log)
}

// removeLeftovers deletes what a killed build left behind. Only call it while
// holding the image's lock: then no live build owns these paths.
func removeLeftovers(d datadir.Dir, r recipe) error {
	stale, err := filepath.Glob(filepath.Join(d.Tmp(), r.tempPrefix()+"*"))
	if err != nil {
		return fmt.Errorf("find leftover builds: %w", err)
	}
	stale = append(stale, r.dir(d)) // not loadable, so damaged or partial
	for _, p := range stale {
		if err := removeTree(p); err != nil {
			return fmt.Errorf("remove leftover %s: %w", p, err)
		}
	}
	return nil
}

// fileDigest hashes a file, stopping early if ctx is cancelled.
func fileDigest(ctx context.Context, path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	buf := make([]byte, 1<<20)
	for {
		if err := ctx.Err(); err != nil {
			return "", err
		}
		n, err := f.Read(buf)
		h.Write(buf[:n])
		if err == io.EOF {
			break
		}
		if err != nil {
			return "", fmt.Errorf("read %s: %w", path, err)
		}
	}
	return "sha256:" + hex.EncodeToString(h.Sum(nil)), nil
}

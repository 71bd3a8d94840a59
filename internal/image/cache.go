package image

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/smolvm/smolvm/internal/datadir"
	"github.com/smolvm/smolvm/internal/qcow2"
)

// The cache under d.Images():
//
//	<id>/rootfs.ext4   the image, mode 0444, never modified
//	<id>/image.json    its metadata (entryMeta)
//	<id>.lock          flock held while <id> is built or removed
//	refs/<hash>.json   which entry a reference resolved to (refRecord)
//
// An entry id is derived from content: "oci-<manifest digest hex>",
// "file-<sha256 of the file>", "s3-<sha256 of endpoint, bucket, key, ETag>";
// the default Debian image keeps its recipe-keyed id. Entries appear by
// renaming a finished directory from d.Tmp(), so a partial build is never
// visible. Ref records are the only mutable part: a tag may move.

// Entry kinds.
const (
	KindDebootstrap = "debootstrap"
	KindOCI         = "oci"
	KindFile        = "file"
	KindS3          = "s3"
)

// entryFormat changes when the way entries are built changes incompatibly.
const entryFormat = 1

// entryMeta is image.json of an entry built from a source. Its common fields
// share their JSON names with the default image's metadata so List reads both.
type entryMeta struct {
	Format       int       `json:"format"`
	Kind         string    `json:"kind"`
	Name         string    `json:"name"`
	Ref          string    `json:"ref"`
	Source       string    `json:"source"`
	SourceDigest string    `json:"source_digest"`
	IndexDigest  string    `json:"index_digest,omitempty"`
	Platform     string    `json:"platform,omitempty"`
	Config       Config    `json:"config"`
	Digest       string    `json:"digest"`
	SizeBytes    int64     `json:"size_bytes"`
	BuiltAt      time.Time `json:"built_at"`
	BuildSeconds float64   `json:"build_seconds"`
}

func entryDir(d datadir.Dir, id string) string { return filepath.Join(d.Images(), id) }

func entryLock(d datadir.Dir, id string) string { return filepath.Join(d.Images(), id+".lock") }

func buildPrefix(id string) string { return "build-" + id + "-" }

// validID guards paths made from ids that come from users (Remove).
func validID(id string) bool {
	return id != "" && id != "refs" && !strings.ContainsAny(id, `/\`) && id != "." && id != ".." && !strings.HasPrefix(id, ".")
}

// readMeta reads an entry's metadata; ErrNotBuilt if it is absent or
// unreadable.
func readMeta(d datadir.Dir, id string) (*entryMeta, error) {
	raw, err := os.ReadFile(filepath.Join(entryDir(d, id), metaFile))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("image %s: %w", id, ErrNotBuilt)
	}
	if err != nil {
		return nil, fmt.Errorf("read image metadata: %w", err)
	}
	var m entryMeta
	if err := json.Unmarshal(raw, &m); err != nil {
		return nil, fmt.Errorf("image %s: metadata unreadable (%v): %w", id, err, ErrNotBuilt)
	}
	return &m, nil
}

// loadEntry reads a finished entry; ErrNotBuilt if it is absent or damaged.
func loadEntry(d datadir.Dir, id string) (*Base, error) {
	m, err := readMeta(d, id)
	if err != nil {
		return nil, err
	}
	path := filepath.Join(entryDir(d, id), imageFile)
	st, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("image %s: %v: %w", id, err, ErrNotBuilt)
	}
	if st.Size() != m.SizeBytes || m.Digest == "" {
		return nil, fmt.Errorf("image %s: %s does not match its metadata: %w", id, path, ErrNotBuilt)
	}
	kind := m.Kind
	if kind == "" {
		kind = KindDebootstrap
	}
	return &Base{
		Name: m.Name, Path: path, Digest: m.Digest, SizeBytes: m.SizeBytes,
		Ref: m.Ref, Config: m.Config, ID: id, Kind: kind,
		SourceDigest: m.SourceDigest, Created: m.BuiltAt,
	}, nil
}

// buildFunc fills out (a directory in work) with imageFile and returns the
// metadata to record; ensureEntry adds the digest, size and times.
type buildFunc func(ctx context.Context, work, out string) (*entryMeta, error)

// ensureEntry returns entry id, building it with build under the entry's
// lock if it is not cached. Concurrent callers, in this process or others,
// build once; the rest wait and load the result.
func ensureEntry(ctx context.Context, d datadir.Dir, id string, rep *reporter, build buildFunc) (b *Base, built bool, err error) {
	if b, err := loadEntry(d, id); err == nil || !errors.Is(err, ErrNotBuilt) {
		return b, false, err
	}
	for _, dir := range []string{d.Images(), d.Tmp()} {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return nil, false, fmt.Errorf("create data directory: %w", err)
		}
	}
	unlock, err := lockExclusive(ctx, entryLock(d, id), func() {
		rep.logf("waiting for another process building the same image...")
	})
	if err != nil {
		return nil, false, fmt.Errorf("lock image %s: %w", id, err)
	}
	defer unlock()
	if b, err := loadEntry(d, id); err == nil || !errors.Is(err, ErrNotBuilt) {
		return b, false, err
	}
	if err := removeEntryLeftovers(d, id); err != nil {
		return nil, false, err
	}

	start := time.Now()
	work, err := os.MkdirTemp(d.Tmp(), buildPrefix(id))
	if err != nil {
		return nil, false, fmt.Errorf("create build directory: %w", err)
	}
	defer func() {
		if rerr := removeTree(work); rerr != nil {
			rep.logf("warning: could not remove build directory: %v", rerr)
		}
	}()
	out := filepath.Join(work, "out")
	if err := os.Mkdir(out, 0o755); err != nil {
		return nil, false, fmt.Errorf("create build directory: %w", err)
	}
	m, err := build(ctx, work, out)
	if err != nil {
		return nil, false, err
	}
	img := filepath.Join(out, imageFile)
	st, err := os.Stat(img)
	if err != nil {
		return nil, false, fmt.Errorf("build image %s: %w", id, err)
	}
	if m.Digest == "" {
		if m.Digest, err = fileDigest(ctx, img); err != nil {
			return nil, false, fmt.Errorf("build image %s: digest: %w", id, err)
		}
	}
	if err := os.Chmod(img, 0o444); err != nil {
		return nil, false, fmt.Errorf("build image %s: %w", id, err)
	}
	m.Format = entryFormat
	m.SizeBytes = st.Size()
	m.BuiltAt = time.Now().UTC().Truncate(time.Second)
	m.BuildSeconds = time.Since(start).Round(100 * time.Millisecond).Seconds()
	if err := writeJSONFile(filepath.Join(out, metaFile), m, 0o444); err != nil {
		return nil, false, fmt.Errorf("build image %s: %w", id, err)
	}
	if err := ctx.Err(); err != nil {
		return nil, false, fmt.Errorf("build image %s: %w", id, err)
	}
	if err := os.Rename(out, entryDir(d, id)); err != nil {
		return nil, false, fmt.Errorf("build image %s: move into cache: %w", id, err)
	}
	syncDir(d.Images())
	b, err = loadEntry(d, id)
	return b, err == nil, err
}

// removeEntryLeftovers deletes what a killed build of id left. Only call it
// while holding the entry's lock.
func removeEntryLeftovers(d datadir.Dir, id string) error {
	stale, err := filepath.Glob(filepath.Join(d.Tmp(), buildPrefix(id)+"*"))
	if err != nil {
		return fmt.Errorf("find leftover builds: %w", err)
	}
	stale = append(stale, entryDir(d, id))
	for _, p := range stale {
		if err := removeTree(p); err != nil {
			return fmt.Errorf("remove leftover %s: %w", p, err)
		}
	}
	return nil
}

// writeJSONFile writes v to path, durably, failing if path exists.
func writeJSONFile(path string, v any, mode os.FileMode) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, mode)
	if err != nil {
		return err
	}
	if _, err := f.Write(append(b, '\n')); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// refRecord remembers which entry a reference resolved to, so that using it
// again needs neither the network nor rehashing a file.
type refRecord struct {
	Ref        string    `json:"ref"`   // canonical form
	Given      string    `json:"given"` // as the user wrote it
	Entry      string    `json:"entry"` // entry id
	Digest     string    `json:"digest,omitempty"`
	ResolvedAt time.Time `json:"resolved_at"`
	// For file sources: the file's identity when it was hashed.
	FileSize  int64  `json:"file_size,omitempty"`
	FileMtime int64  `json:"file_mtime_ns,omitempty"`
	FileCtime int64  `json:"file_ctime_ns,omitempty"`
	FileIno   uint64 `json:"file_ino,omitempty"`
	FileDev   uint64 `json:"file_dev,omitempty"`
}

func refsDir(d datadir.Dir) string { return filepath.Join(d.Images(), "refs") }

func refPath(d datadir.Dir, canonical string) string {
	sum := sha256.Sum256([]byte(canonical))
	return filepath.Join(refsDir(d), hex.EncodeToString(sum[:16])+".json")
}

func readRef(d datadir.Dir, canonical string) (*refRecord, bool) {
	b, err := os.ReadFile(refPath(d, canonical))
	if err != nil {
		return nil, false
	}
	var r refRecord
	if json.Unmarshal(b, &r) != nil || r.Ref != canonical || !validID(r.Entry) {
		return nil, false
	}
	return &r, true
}

// writeRef replaces the record atomically; failure only costs a later
// lookup, so callers may ignore it after logging.
func writeRef(d datadir.Dir, r refRecord) error {
	if err := os.MkdirAll(refsDir(d), 0o755); err != nil {
		return err
	}
	final := refPath(d, r.Ref)
	f, err := os.CreateTemp(refsDir(d), ".tmp-*")
	if err != nil {
		return err
	}
	b, err := json.MarshalIndent(r, "", "  ")
	if err == nil {
		_, err = f.Write(append(b, '\n'))
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(f.Name(), final)
	}
	if err != nil {
		os.Remove(f.Name())
	}
	return err
}

func readAllRefs(d datadir.Dir) []refRecord {
	paths, _ := filepath.Glob(filepath.Join(refsDir(d), "*.json"))
	var out []refRecord
	for _, p := range paths {
		b, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		var r refRecord
		if json.Unmarshal(b, &r) == nil && r.Ref != "" {
			out = append(out, r)
		}
	}
	return out
}

// List returns the cached images, newest first. Damaged or partial entries
// are left out.
func List(d datadir.Dir) ([]*Base, error) {
	ents, err := os.ReadDir(d.Images())
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("list images: %w", err)
	}
	var out []*Base
	for _, e := range ents {
		if !e.IsDir() || !validID(e.Name()) {
			continue
		}
		b, err := loadEntry(d, e.Name())
		if err != nil {
			continue
		}
		if b.Kind == KindDebootstrap && b.Ref == "" {
			b.Ref = "debian"
		}
		out = append(out, b)
	}
	refs := map[string][]string{}
	for _, r := range readAllRefs(d) {
		if r.Given != "" {
			refs[r.Entry] = append(refs[r.Entry], r.Given)
		}
	}
	for _, b := range out {
		b.Refs = refs[b.ID]
		slices.Sort(b.Refs)
		b.Refs = slices.Compact(b.Refs)
	}
	slices.SortFunc(out, func(a, b *Base) int {
		if c := b.Created.Compare(a.Created); c != 0 {
			return c
		}
		return strings.Compare(a.ID, b.ID)
	})
	return out, nil
}

// find locates the entry ref names: an entry id, a digest or a unique
// prefix of one (of the image file or of its source), a name, or a
// reference as given to Resolve.
func find(d datadir.Dir, ref string) (*Base, error) {
	all, err := List(d)
	if err != nil {
		return nil, err
	}
	ref = strings.TrimSpace(ref)
	if ref == "" {
		return nil, newError(CodeInvalidRef, ref, nil, "no image given")
	}
	// A reference that a record maps to an entry.
	if src, err := parseSource(Source{Image: ref}, Options{}); err == nil && src.canonical != "" {
		if rec, ok := readRef(d, src.canonical); ok {
			for _, b := range all {
				if b.ID == rec.Entry {
					return b, nil
				}
			}
		}
	}
	var matches []*Base
	for _, b := range all {
		if b.ID == ref || b.Ref == ref || b.Name == ref || slices.Contains(b.Refs, ref) {
			return b, nil
		}
		for _, dg := range []string{b.Digest, b.SourceDigest} {
			hexPart := strings.TrimPrefix(dg, "sha256:")
			q := strings.TrimPrefix(ref, "sha256:")
			if len(q) >= 6 && hexPart != "" && strings.HasPrefix(hexPart, q) {
				matches = append(matches, b)
				break
			}
		}
	}
	switch len(matches) {
	case 1:
		return matches[0], nil
	case 0:
		return nil, newError(CodeNotFound, ref, nil, "no cached image %s (see `smolvm image list`)", ref)
	}
	return nil, newError(CodeInvalidRef, ref, nil, "%s matches %d cached images: give more of the digest", ref, len(matches))
}

// Remove deletes the cached image ref names (see List for the names it
// accepts: a reference, NAME, ID or digest prefix) and the references that
// point to it. It does not know which sandboxes use the image: callers
// check that first (a removed base breaks the overlays built on it).
func Remove(d datadir.Dir, ref string) error {
	b, err := find(d, ref)
	if err != nil {
		return err
	}
	return removeEntry(d, b.ID)
}

func removeEntry(d datadir.Dir, id string) error {
	if !validID(id) {
		return fmt.Errorf("invalid image id %q", id)
	}
	if err := os.MkdirAll(d.Tmp(), 0o755); err != nil {
		return fmt.Errorf("create data directory: %w", err)
	}
	// Wait for a build of the same entry rather than racing it, but not for
	// long: Remove is interactive.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	unlock, err := lockExclusive(ctx, entryLock(d, id), func() {})
	if err != nil {
		return fmt.Errorf("remove image %s: it is being built: %w", id, err)
	}
	defer unlock()
	// Make it disappear at once, then delete at leisure.
	gone, err := os.MkdirTemp(d.Tmp(), "rm-"+id+"-")
	if err != nil {
		return fmt.Errorf("remove image %s: %w", id, err)
	}
	if err := os.Rename(entryDir(d, id), filepath.Join(gone, "entry")); err != nil && !errors.Is(err, fs.ErrNotExist) {
		os.Remove(gone)
		return fmt.Errorf("remove image %s: %w", id, err)
	}
	syncDir(d.Images())
	for _, r := range readAllRefs(d) {
		if r.Entry == id {
			os.Remove(refPath(d, r.Ref))
		}
	}
	if err := removeTree(gone); err != nil {
		return fmt.Errorf("remove image %s: %w", id, err)
	}
	return nil
}

// Prune removes every cached image for which keep returns false (all of
// them when keep is nil) and returns what it removed. The caller decides
// what is in use: InUse gives the images that sandbox disks are built on.
func Prune(d datadir.Dir, keep func(*Base) bool) (removed []*Base, err error) {
	all, err := List(d)
	if err != nil {
		return nil, err
	}
	var errs []error
	for _, b := range all {
		if keep != nil && keep(b) {
			continue
		}
		if err := removeEntry(d, b.ID); err != nil {
			errs = append(errs, err)
			continue
		}
		removed = append(removed, b)
	}
	// References to entries that no longer exist are dead weight.
	for _, r := range readAllRefs(d) {
		if _, err := os.Stat(entryDir(d, r.Entry)); errors.Is(err, fs.ErrNotExist) {
			os.Remove(refPath(d, r.Ref))
		}
	}
	if err := removeStaleWork(d); err != nil {
		errs = append(errs, err)
	}
	return removed, errors.Join(errs...)
}

// removeStaleWork deletes build and removal directories in d.Tmp() that a
// killed process left, skipping those whose entry lock is held: their
// owner is still at work.
func removeStaleWork(d datadir.Dir) error {
	ents, err := os.ReadDir(d.Tmp())
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("list %s: %w", d.Tmp(), err)
	}
	for _, e := range ents {
		rest, ok := strings.CutPrefix(e.Name(), "build-")
		if !ok {
			rest, ok = strings.CutPrefix(e.Name(), "rm-")
		}
		i := strings.LastIndexByte(rest, '-')
		if !ok || i <= 0 || !validID(rest[:i]) {
			continue
		}
		// Only if the lock is free now: a done context makes this one try.
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		unlock, err := lockExclusive(ctx, entryLock(d, rest[:i]), func() {})
		if err != nil {
			continue
		}
		err = removeTree(filepath.Join(d.Tmp(), e.Name()))
		unlock()
		if err != nil {
			return fmt.Errorf("remove leftover %s: %w", e.Name(), err)
		}
	}
	return nil
}

// InUse returns a keep function for Prune that keeps the images some disk
// in the data directory is an overlay of (sandboxes, and anything else kept
// there, such as saved templates). It reads the backing file name from the
// header of each qcow2 file, so it needs no running server and sees the
// sandboxes of every process sharing d.
func InUse(d datadir.Dir) (func(*Base) bool, error) {
	used := map[string]bool{}
	skip := map[string]bool{d.Images(): true, d.Tmp(): true, d.Kernels(): true, d.Initramfs(): true}
	root := filepath.Clean(d.Path())
	err := filepath.WalkDir(root, func(p string, e fs.DirEntry, err error) error {
		if err != nil {
			if p == root && errors.Is(err, fs.ErrNotExist) {
				return filepath.SkipAll
			}
			return nil // an unreadable corner hides no disk we could use
		}
		if e.IsDir() {
			if skip[p] || strings.Count(strings.TrimPrefix(p, root), string(filepath.Separator)) > 4 {
				return filepath.SkipDir
			}
			return nil
		}
		if !e.Type().IsRegular() {
			return nil
		}
		if backing, ok := qcow2.Backing(p); ok {
			if !filepath.IsAbs(backing) {
				backing = filepath.Join(filepath.Dir(p), backing)
			}
			used[filepath.Clean(backing)] = true
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("find sandbox disks: %w", err)
	}
	return func(b *Base) bool { return used[filepath.Clean(b.Path)] }, nil
}

// SweepTmp removes what builds and removals that died part-way left in
// d.Tmp() (those whose image lock is free); a server runs it as it starts.
func SweepTmp(d datadir.Dir) error { return removeStaleWork(d) }

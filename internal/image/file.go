package image

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/smolvm/smolvm/internal/datadir"
)

// resolveFile returns the entry for a local ext4, qcow2 or tarball file,
// keyed by the sha256 of its bytes. The hash is remembered with the file's
// identity (size, times, inode), so an unchanged file is not read again.
func resolveFile(ctx context.Context, d datadir.Dir, s *source, rep *reporter) (*Base, error) {
	st, err := os.Stat(s.path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return nil, newError(CodeNotFound, s.ref, nil, "image file %s does not exist", s.path)
	case errors.Is(err, fs.ErrPermission):
		return nil, newError(CodeUnauthorized, s.ref, err, "cannot read image file %s: check its permissions", s.path)
	case err != nil:
		return nil, newError(CodeBuildFailed, s.ref, err, "cannot read image file %s", s.path)
	case !st.Mode().IsRegular():
		return nil, newError(CodeUnsupported, s.ref, nil, "%s is not a regular file: give an ext4 image, a qcow2 image or a root filesystem tarball", s.path)
	}
	ident, identOK := fileIdentity(st)
	if rec, ok := readRef(d, s.canonical); ok && identOK && rec.sameFile(ident) {
		if b, err := loadEntry(d, rec.Entry); err == nil {
			return b, nil
		}
	}

	rep.phase(PhaseResolve, st.Size())
	rep.logf("hashing %s (%.1f MiB)...", s.path, float64(st.Size())/(1<<20))
	digest, err := hashFile(ctx, s.path, rep)
	if err != nil {
		return nil, buildFailed(s.ref, err)
	}
	id := "file-" + strings.TrimPrefix(digest, "sha256:")
	b, _, err := ensureEntry(ctx, d, id, rep, func(ctx context.Context, work, out string) (*entryMeta, error) {
		start := time.Now()
		src := filepath.Join(work, "source")
		// Build from a private copy checked against the digest, so a file
		// changed meanwhile cannot end up under the wrong key.
		rep.phase(PhasePull, st.Size())
		got, err := copyHashed(ctx, s.path, src, rep)
		if err != nil {
			return nil, err
		}
		if got != digest {
			return nil, newError(CodeBuildFailed, s.ref, nil, "image file %s changed while it was read: try again once it is complete", s.path)
		}
		m, err := buildFromData(ctx, work, src, out, s.ref, rep)
		if err != nil {
			return nil, err
		}
		m.Kind, m.Name, m.Ref = KindFile, s.ref, s.ref
		m.Source, m.SourceDigest = s.path, digest
		rep.logf("image %s built in %s", s.ref, time.Since(start).Round(time.Millisecond))
		return m, nil
	})
	if err != nil {
		return nil, buildFailed(s.ref, err)
	}
	rec := refRecord{Ref: s.canonical, Given: s.ref, Entry: id, Digest: digest, ResolvedAt: time.Now().UTC()}
	if identOK {
		rec.setFile(ident)
	}
	if err := writeRef(d, rec); err != nil {
		rep.logf("warning: could not record %s: %v", s.ref, err)
	}
	return b, nil
}

// identity is what tells that a file has not changed since it was hashed.
type identity struct {
	size, mtime, ctime int64
	ino, dev           uint64
}

func (r *refRecord) sameFile(id identity) bool {
	return r.FileSize == id.size && r.FileMtime == id.mtime && r.FileCtime == id.ctime &&
		r.FileIno == id.ino && r.FileDev == id.dev
}

func (r *refRecord) setFile(id identity) {
	r.FileSize, r.FileMtime, r.FileCtime, r.FileIno, r.FileDev = id.size, id.mtime, id.ctime, id.ino, id.dev
}

// ctxReader stops a long local read when ctx ends.
type ctxReader struct {
	ctx context.Context
	r   io.Reader
}

func (c ctxReader) Read(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.r.Read(p)
}

func hashFile(ctx context.Context, path string, rep *reporter) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.CopyBuffer(io.MultiWriter(h, counter{rep}), ctxReader{ctx, f}, make([]byte, 1<<20)); err != nil {
		return "", fmt.Errorf("hash %s: %w", path, err)
	}
	return "sha256:" + hex.EncodeToString(h.Sum(nil)), nil
}

// copyHashed copies src to a new sparse file dst and returns the sha256 of
// what it copied.
func copyHashed(ctx context.Context, src, dst string, rep *reporter) (string, error) {
	in, err := os.Open(src)
	if err != nil {
		return "", err
	}
	defer in.Close()
	h := sha256.New()
	if err := writeSparseFile(dst, io.TeeReader(ctxReader{ctx, in}, h), rep); err != nil {
		return "", err
	}
	return "sha256:" + hex.EncodeToString(h.Sum(nil)), nil
}

// writeSparseFile creates dst from r, leaving zero blocks as holes.
func writeSparseFile(dst string, r io.Reader, rep *reporter) error {
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	defer out.Close()
	w := newSparseWriter(out)
	if _, err := io.CopyBuffer(io.MultiWriter(w, counter{rep}), r, make([]byte, 1<<20)); err != nil {
		return err
	}
	if err := w.Close(); err != nil {
		return err
	}
	return out.Close()
}

// buildFromData turns a downloaded or copied source file into out's ext4
// image, by what its bytes are: ext4 as is, qcow2 converted to raw, a tar
// archive (optionally compressed) unpacked and packed.
func buildFromData(ctx context.Context, work, src, out, ref string, rep *reporter) (*entryMeta, error) {
	head, err := readHead(src, 2048)
	if err != nil {
		return nil, err
	}
	img := filepath.Join(out, imageFile)
	switch {
	case isExt4(head):
		rep.logf("%s is an ext4 image", ref)
		if err := padToBlock(src); err != nil {
			return nil, err
		}
		if err := os.Rename(src, img); err != nil {
			return nil, err
		}
	case strings.HasPrefix(string(head), magicQcow2):
		if err := qcow2ToRaw(ctx, src, img, ref, rep); err != nil {
			return nil, err
		}
		if err := os.Remove(src); err != nil {
			return nil, err
		}
		if h, err := readHead(img, 2048); err != nil {
			return nil, err
		} else if !isExt4(h) {
			return nil, newError(CodeUnsupported, ref, nil, "the qcow2 image %s holds no ext4 filesystem (a partitioned disk is not supported): give a qcow2 of an ext4 filesystem", ref)
		}
	default:
		ok, err := looksLikeTar(src)
		if err != nil {
			return nil, err
		}
		if !ok {
			return nil, newError(CodeUnsupported, ref, nil, "%s is neither an ext4 image, a qcow2 image nor a tar archive (.tar, .tar.gz, .tar.zst, .tar.xz)", ref)
		}
		mkfs, err := treeTools()
		if err != nil {
			return nil, newError(CodeBuildFailed, ref, err, "cannot build image %s here", ref)
		}
		rep.logf("unpacking root filesystem archive %s...", ref)
		root := filepath.Join(work, "root")
		if err := unpackTo(ctx, root, []string{src}, false, rep); err != nil {
			return nil, err
		}
		if err := os.Remove(src); err != nil {
			return nil, err
		}
		if err := packTree(ctx, mkfs, root, out, rep); err != nil {
			return nil, err
		}
	}
	return &entryMeta{}, nil
}

func readHead(path string, n int) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b := make([]byte, n)
	m, err := io.ReadFull(f, b)
	if err != nil && err != io.ErrUnexpectedEOF && err != io.EOF {
		return nil, err
	}
	return b[:m], nil
}

// isExt4 checks the ext2/3/4 superblock magic at offset 1080.
func isExt4(head []byte) bool {
	return len(head) >= 1082 && head[1080] == 0x53 && head[1081] == 0xef
}

// padToBlock rounds a raw image up to whole 4 KiB blocks, which disk
// emulation expects; the filesystem ignores the tail.
func padToBlock(path string) error {
	st, err := os.Stat(path)
	if err != nil {
		return err
	}
	if rem := st.Size() % 4096; rem != 0 {
		return os.Truncate(path, st.Size()+4096-rem)
	}
	return nil
}

func looksLikeTar(path string) (bool, error) {
	f, err := os.Open(path)
	if err != nil {
		return false, err
	}
	defer f.Close()
	r, err := decompress(f)
	if err != nil {
		return false, err
	}
	defer r.Close()
	block := make([]byte, 512)
	if _, err := io.ReadFull(r, block); err != nil {
		head, _ := readHead(path, 6)
		if isCompressed(head) {
			return false, corrupt("damaged compressed archive: %w", err)
		}
		return false, nil // too short to be an archive
	}
	return isTar(block), nil
}

// qcow2ToRaw converts a qcow2 image to a sparse raw file. Images that
// refer to other files (a backing file, an external data file) are
// refused: qemu-img would read those host files into the image.
func qcow2ToRaw(ctx context.Context, src, dst, ref string, rep *reporter) error {
	qemuImg, err := LookTool("qemu-img", "qemu-utils")
	if err != nil {
		return err
	}
	out, err := exec.CommandContext(ctx, qemuImg, "info", "--output=json", "-f", "qcow2", src).CombinedOutput()
	if ctx.Err() != nil {
		return ctx.Err()
	}
	if err != nil {
		return corrupt("qemu-img info: %v: %s", err, lastLines(string(out), 3))
	}
	var info struct {
		VirtualSize     int64  `json:"virtual-size"`
		BackingFilename string `json:"backing-filename"`
		FormatSpecific  struct {
			Data struct {
				DataFile string `json:"data-file"`
			} `json:"data"`
		} `json:"format-specific"`
	}
	if err := json.Unmarshal(out, &info); err != nil {
		return fmt.Errorf("qemu-img info: %w", err)
	}
	if info.BackingFilename != "" || info.FormatSpecific.Data.DataFile != "" {
		return newError(CodeUnsupported, ref, nil, "the qcow2 image %s refers to another file (%s): make a standalone copy with `qemu-img convert -O qcow2 IN OUT` first",
			ref, info.BackingFilename+info.FormatSpecific.Data.DataFile)
	}
	rep.phase(PhaseExtract, info.VirtualSize)
	rep.logf("converting qcow2 to raw (%d MiB)...", info.VirtualSize>>20)
	out, err = exec.CommandContext(ctx, qemuImg, "convert", "-q", "-f", "qcow2", "-O", "raw", src, dst).CombinedOutput()
	if ctx.Err() != nil {
		return ctx.Err()
	}
	if err != nil {
		return fmt.Errorf("qemu-img convert: %w: %s", err, lastLines(string(out), 5))
	}
	return nil
}

// hashedReader hashes what is read through it.
type hashedReader struct {
	r io.Reader
	h hash.Hash
	n int64
}

func (h *hashedReader) Read(p []byte) (int, error) {
	n, err := h.r.Read(p)
	h.h.Write(p[:n])
	h.n += int64(n)
	return n, err
}

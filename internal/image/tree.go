package image

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
)

// treeTools checks, before any download, what building an ext4 from a tree
// needs: root (to give files their owners and make device nodes) and
// mkfs.ext4.
func treeTools() (mkfs string, err error) {
	if os.Geteuid() != 0 {
		return "", fmt.Errorf("unpacking image layers needs root, to keep file owners and device nodes: run as root (or use the smolvm server, which does)")
	}
	return LookTool("mkfs.ext4", "e2fsprogs")
}

// unpackTo applies tar archives (compressed or not) in order into a new
// tree root, reporting the bytes read in the extract phase. whiteouts
// selects OCI layer semantics.
func unpackTo(ctx context.Context, root string, archives []string, whiteouts bool, rep *reporter) error {
	var total int64
	for _, p := range archives {
		if st, err := os.Stat(p); err == nil {
			total += st.Size()
		}
	}
	rep.phase(PhaseExtract, total)
	if err := os.Mkdir(root, 0o755); err != nil {
		return err
	}
	a, err := newApplier(root, whiteouts, func(msg string) { rep.logf("warning: %s", msg) })
	if err != nil {
		return err
	}
	defer a.close()
	for i, p := range archives {
		if err := applyArchive(ctx, a, p, rep); err != nil {
			if len(archives) > 1 {
				return fmt.Errorf("layer %d: %w", i+1, err)
			}
			return err
		}
	}
	if err := a.finish(); err != nil {
		return err
	}
	if !a.hasShell() {
		return newError(CodeUnsupported, "", nil, "the image has no /bin/sh: smolvm runs commands through a shell, so images without one (distroless, scratch) cannot be used")
	}
	return nil
}

func applyArchive(ctx context.Context, a *applier, path string, rep *reporter) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	tr, err := decompress(io.TeeReader(f, counter{rep}))
	if err != nil {
		return err
	}
	defer tr.Close()
	return a.apply(ctx, tr)
}

// packTree writes root into out/rootfs.ext4, sized like the default image,
// and deletes the tree.
func packTree(ctx context.Context, mkfs, root, out string, rep *reporter) error {
	treeBytes, entries, err := treeSize(root)
	if err != nil {
		return fmt.Errorf("measure tree: %w", err)
	}
	size := imageSize(treeBytes)
	rep.phase(PhaseMkfs, size)
	rep.logf("writing ext4 image (%d MiB)...", size>>20)
	if err := makeExt4(ctx, mkfs, root, filepath.Join(out, imageFile), size, entries); err != nil {
		return err
	}
	if err := removeTree(root); err != nil {
		return fmt.Errorf("remove tree: %w", err)
	}
	return nil
}

package kernel

import (
	"archive/tar"
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/klauspost/compress/zstd"
	"github.com/xi2/xz"

	"github.com/smolvm/smolvm/internal/datadir"
)

// ImportDeb imports the kernel in a Debian linux-image-*.deb: its vmlinuz
// (converted to vmlinux), its config and its lib/modules/<version> tree. The
// kernel is assembled under d.Tmp() and renamed into d.Kernels()/<version>,
// replacing an earlier import of the same version.
func ImportDeb(ctx context.Context, d datadir.Dir, debPath string) (*Kernel, error) {
	k, err := importDeb(ctx, d, debPath)
	if err != nil {
		return nil, fmt.Errorf("import kernel %s: %w", debPath, err)
	}
	return k, nil
}

func importDeb(ctx context.Context, d datadir.Dir, debPath string) (_ *Kernel, err error) {
	f, err := os.Open(debPath)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	data, member, err := debData(bufio.NewReaderSize(f, 1<<20))
	if err != nil {
		return nil, err
	}
	tr, closeFn, err := openTar(data, member)
	if err != nil {
		return nil, err
	}
	defer closeFn()

	tmp, err := tempDir(d, "kernel-import-")
	if err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			_ = os.RemoveAll(tmp)
		}
	}()

	// vmlinuz comes first in the archive (boot/ sorts before lib/), so the
	// vmlinux is decompressed while the modules are still being unpacked.
	var (
		version    string
		vmlinuxErr chan error
	)
	defer func() {
		if vmlinuxErr != nil {
			if verr := <-vmlinuxErr; err == nil && verr != nil {
				err = verr
			}
		}
	}()
	modRoot := filepath.Join(tmp, "lib-modules")
	sawModules := map[string]bool{}
	for {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("read %s: %w", member, err)
		}
		name := cleanTarName(hdr.Name)
		switch {
		case strings.HasPrefix(name, "boot/vmlinuz-") && hdr.Typeflag == tar.TypeReg:
			if vmlinuxErr != nil {
				return nil, fmt.Errorf("more than one boot/vmlinuz-* in package")
			}
			version = strings.TrimPrefix(name, "boot/vmlinuz-")
			if err := validVersion(version); err != nil {
				return nil, err
			}
			vmlinuz, err := io.ReadAll(io.LimitReader(tr, 1<<30))
			if err != nil {
				return nil, fmt.Errorf("read %s: %w", name, err)
			}
			vmlinuxErr = make(chan error, 1)
			go func() { vmlinuxErr <- writeVmlinux(vmlinuz, filepath.Join(tmp, vmlinuxName)) }()
		case strings.HasPrefix(name, "boot/config-") && hdr.Typeflag == tar.TypeReg:
			if err := writeFile(filepath.Join(tmp, configName), tr, 0o644); err != nil {
				return nil, err
			}
		case strings.HasPrefix(name, "lib/modules/"):
			rel := strings.TrimPrefix(name, "lib/modules/")
			if v, _, _ := strings.Cut(rel, "/"); v != "" {
				sawModules[v] = true
			}
			if err := extractEntry(filepath.Join(modRoot, filepath.FromSlash(rel)), hdr, tr); err != nil {
				return nil, err
			}
		}
	}
	if vmlinuxErr == nil {
		return nil, errors.New("no boot/vmlinuz-* in package (not a linux-image package?)")
	}
	if err := <-vmlinuxErr; err != nil {
		vmlinuxErr = nil
		return nil, err
	}
	vmlinuxErr = nil
	if !sawModules[version] {
		return nil, fmt.Errorf("package has boot/vmlinuz-%s but no lib/modules/%s", version, version)
	}
	if err := os.Rename(filepath.Join(modRoot, version), filepath.Join(tmp, modulesName)); err != nil {
		return nil, err
	}
	if err := os.RemoveAll(modRoot); err != nil {
		return nil, err
	}
	return install(d, tmp, version)
}

func writeVmlinux(vmlinuz []byte, dst string) error {
	vmlinux, err := ExtractVmlinux(vmlinuz)
	if err != nil {
		return err
	}
	return writeFile(dst, bytes.NewReader(vmlinux), 0o644)
}

// debData finds the data.tar.* member of a .deb (an ar archive) and returns
// a reader positioned at its contents. The ar format is parsed here because
// it is tiny and the parser must not panic on a damaged file.
func debData(r io.Reader) (io.Reader, string, error) {
	magic := make([]byte, 8)
	if _, err := io.ReadFull(r, magic); err != nil || string(magic) != "!<arch>\n" {
		return nil, "", errors.New("not a Debian package (no ar archive header)")
	}
	hdr := make([]byte, 60)
	for {
		if _, err := io.ReadFull(r, hdr); err != nil {
			if errors.Is(err, io.EOF) {
				return nil, "", errors.New("no data.tar member in package")
			}
			return nil, "", fmt.Errorf("read ar header: %w", err)
		}
		if string(hdr[58:60]) != "`\n" {
			return nil, "", errors.New("corrupt ar member header")
		}
		name := strings.TrimSuffix(strings.TrimRight(string(hdr[0:16]), " "), "/")
		size, err := strconv.ParseInt(strings.TrimRight(string(hdr[48:58]), " "), 10, 64)
		if err != nil || size < 0 {
			return nil, "", fmt.Errorf("corrupt ar member size for %q", name)
		}
		if strings.HasPrefix(name, "data.tar") {
			return io.LimitReader(r, size), name, nil
		}
		if _, err := io.CopyN(io.Discard, r, size+size%2); err != nil {
			return nil, "", fmt.Errorf("skip ar member %q: %w", name, err)
		}
	}
}

// openTar decompresses a data.tar member according to its name.
func openTar(r io.Reader, member string) (*tar.Reader, func(), error) {
	switch member {
	case "data.tar":
		return tar.NewReader(r), func() {}, nil
	case "data.tar.xz":
		z, err := xz.NewReader(r, 0)
		if err != nil {
			return nil, nil, fmt.Errorf("open %s: %w", member, err)
		}
		return tar.NewReader(z), func() {}, nil
	case "data.tar.zst":
		z, err := zstd.NewReader(r)
		if err != nil {
			return nil, nil, fmt.Errorf("open %s: %w", member, err)
		}
		return tar.NewReader(z), z.Close, nil
	case "data.tar.gz":
		z, err := gzip.NewReader(r)
		if err != nil {
			return nil, nil, fmt.Errorf("open %s: %w", member, err)
		}
		return tar.NewReader(z), func() { _ = z.Close() }, nil
	}
	return nil, nil, fmt.Errorf("unsupported package member %s", member)
}

// cleanTarName turns "./lib/modules/x" into "lib/modules/x". Cleaning it as
// an absolute path drops any "..", so no name can leave the extraction
// directory.
func cleanTarName(name string) string {
	return strings.TrimPrefix(path.Clean("/"+name), "/")
}

// extractEntry writes one tar entry of the module tree. Links are skipped:
// Debian's package has none, and a host tree's build/source links point
// outside it.
func extractEntry(dst string, hdr *tar.Header, r io.Reader) error {
	switch hdr.Typeflag {
	case tar.TypeDir:
		return os.MkdirAll(dst, 0o755)
	case tar.TypeReg:
		if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
			return err
		}
		return writeFile(dst, r, os.FileMode(hdr.Mode).Perm()|0o400)
	}
	return nil
}

func writeFile(dst string, r io.Reader, mode os.FileMode) error {
	f, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, mode)
	if err != nil {
		return err
	}
	if _, err := io.Copy(f, r); err != nil {
		f.Close()
		return fmt.Errorf("write %s: %w", dst, err)
	}
	return f.Close()
}

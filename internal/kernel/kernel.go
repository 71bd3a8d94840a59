// Package kernel imports guest kernels (from a Debian linux-image package or
// the host's /boot), extracts the directly bootable vmlinux, resolves the
// modules the guest agent needs and builds the initramfs that carries them.
//
// An imported kernel lives in d.Kernels()/<version>/:
//
//	vmlinux   uncompressed ELF with a PVH entry note
//	config    the kernel's build configuration, when the source had one
//	modules/  the contents of lib/modules/<version>
package kernel

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"

	"github.com/smolvm/smolvm/internal/datadir"
)

// ErrNoKernel means no guest kernel has been imported yet.
var ErrNoKernel = errors.New("no guest kernel imported")

// Kernel is an imported guest kernel.
type Kernel struct {
	Version string `json:"version"` // e.g. "6.1.0-56-amd64"
	Dir     string `json:"dir"`     // d.Kernels()/<Version>
	Vmlinux string `json:"vmlinux"` // uncompressed ELF vmlinux with a PVH entry note, bootable by qemu -kernel
	Modules string `json:"modules"` // directory of the module tree (the contents of lib/modules/<Version>)
}

// Names inside a kernel directory.
const (
	vmlinuxName = "vmlinux"
	configName  = "config"
	modulesName = "modules"
)

// A version becomes a directory name, so it must not be able to escape
// d.Kernels() or hide as a dot file.
var versionRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._+~-]*$`)

func validVersion(v string) error {
	if len(v) > 200 || !versionRE.MatchString(v) {
		return fmt.Errorf("invalid kernel version %q", v)
	}
	return nil
}

func kernelAt(d datadir.Dir, version string) *Kernel {
	dir := filepath.Join(d.Kernels(), version)
	return &Kernel{
		Version: version,
		Dir:     dir,
		Vmlinux: filepath.Join(dir, vmlinuxName),
		Modules: filepath.Join(dir, modulesName),
	}
}

// List returns the imported kernels, oldest version first. Directories that
// are not complete kernels (no vmlinux or no modules) are ignored.
func List(d datadir.Dir) ([]*Kernel, error) {
	entries, err := os.ReadDir(d.Kernels())
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("list kernels: %w", err)
	}
	var ks []*Kernel
	for _, e := range entries {
		if !e.IsDir() || validVersion(e.Name()) != nil {
			continue
		}
		k := kernelAt(d, e.Name())
		if fi, err := os.Stat(k.Vmlinux); err != nil || !fi.Mode().IsRegular() {
			continue
		}
		if fi, err := os.Stat(k.Modules); err != nil || !fi.IsDir() {
			continue
		}
		ks = append(ks, k)
	}
	sort.Slice(ks, func(i, j int) bool { return compareVersions(ks[i].Version, ks[j].Version) < 0 })
	return ks, nil
}

// Default returns the newest imported kernel.
func Default(d datadir.Dir) (*Kernel, error) {
	ks, err := List(d)
	if err != nil {
		return nil, err
	}
	if len(ks) == 0 {
		return nil, fmt.Errorf("%w in %s: run `smolvm setup` or `smolvm kernel fetch`", ErrNoKernel, d.Kernels())
	}
	return ks[len(ks)-1], nil
}

// compareVersions orders kernel versions naturally. Versions split into
// fields at '.', '-', '+' and '~'; within a field runs of digits compare as
// numbers, so 6.1.0-56 sorts after 6.1.0-9 and 6.10 after 6.9, and a number
// outranks letters (6.1.0-10 is newer than 6.1.0-rc).
func compareVersions(a, b string) int {
	fa, fb := versionFields(a), versionFields(b)
	for i := 0; i < len(fa) && i < len(fb); i++ {
		if c := compareField(fa[i], fb[i]); c != 0 {
			return c
		}
	}
	switch {
	case len(fa) < len(fb):
		return -1
	case len(fa) > len(fb):
		return 1
	}
	return strings.Compare(a, b)
}

func versionFields(v string) []string {
	return strings.FieldsFunc(v, func(r rune) bool { return strings.ContainsRune(".-+~", r) })
}

func compareField(a, b string) int {
	for a != "" && b != "" {
		ra, resta := versionRun(a)
		rb, restb := versionRun(b)
		da, db := isDigit(ra[0]), isDigit(rb[0])
		var c int
		switch {
		case da && db:
			ta, tb := strings.TrimLeft(ra, "0"), strings.TrimLeft(rb, "0")
			if c = len(ta) - len(tb); c == 0 {
				c = strings.Compare(ta, tb)
			}
		case da:
			c = 1
		case db:
			c = -1
		default:
			c = strings.Compare(ra, rb)
		}
		if c < 0 {
			return -1
		}
		if c > 0 {
			return 1
		}
		a, b = resta, restb
	}
	switch {
	case a == b:
		return 0
	case a == "":
		return -1
	}
	return 1
}

// versionRun splits off the leading run of digits or of non-digits.
func versionRun(s string) (run, rest string) {
	d := isDigit(s[0])
	i := 1
	for i < len(s) && isDigit(s[i]) == d {
		i++
	}
	return s[:i], s[i:]
}

func isDigit(c byte) bool { return c >= '0' && c <= '9' }

// install moves the finished kernel directory tmp to d.Kernels()/<version>,
// replacing an earlier import of the same version.
func install(d datadir.Dir, tmp, version string) (*Kernel, error) {
	if err := os.MkdirAll(d.Kernels(), 0o755); err != nil {
		return nil, err
	}
	k := kernelAt(d, version)
	if err := replaceDir(tmp, k.Dir); err != nil {
		return nil, err
	}
	return k, nil
}

// replaceDir renames src to dst. When dst exists it is swapped out
// atomically where the filesystem allows (readers see the old or the new
// tree, never neither) and the old tree is removed.
func replaceDir(src, dst string) error {
	err := os.Rename(src, dst)
	if err == nil {
		return nil
	}
	if _, serr := os.Lstat(dst); serr != nil {
		return err
	}
	if exchangeDirs(src, dst) == nil {
		return os.RemoveAll(src) // src now holds the old tree
	}
	old := src + ".old"
	if err := os.Rename(dst, old); err != nil {
		return err
	}
	if err := os.Rename(src, dst); err != nil {
		_ = os.Rename(old, dst)
		return err
	}
	return os.RemoveAll(old)
}

// tempDir creates a scratch directory under d.Tmp(), on the same filesystem
// as the caches so results can be renamed into place.
func tempDir(d datadir.Dir, pattern string) (string, error) {
	if err := os.MkdirAll(d.Tmp(), 0o755); err != nil {
		return "", err
	}
	return os.MkdirTemp(d.Tmp(), pattern)
}

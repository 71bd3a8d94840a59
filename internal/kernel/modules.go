package kernel

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"debug/elf"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/klauspost/compress/zstd"
	"github.com/xi2/xz"
)

// BaseModules names the modules the guest agent needs: the virtio buses,
// console (the host channel), block (the root disk), ext4 with the crc32c
// implementation it asks for at mount time (a softdep, which nothing in the
// guest would resolve), network, vsock, entropy and the VM generation ID
// used to reseed after a snapshot clone, and the 9p filesystem over virtio
// that host directories are shared with (with netfs and fscache, which 9p
// needs where they are modules). Names that are built into a kernel are
// skipped when resolving.
func BaseModules() []string {
	return []string{
		"virtio_pci",
		"virtio_mmio",
		"virtio_console",
		"virtio_blk",
		"crc32c_generic",
		"ext4",
		"virtio_net",
		"vmw_vsock_virtio_transport",
		"virtio_rng",
		"vmgenid",
		"9pnet",
		"9pnet_virtio",
		"netfs",
		"fscache",
		"9p",
	}
}

// optionalModule reports whether a base module may be missing from a kernel
// altogether (not every kernel version or configuration has it) without
// making the kernel unusable.
func optionalModule(name string) bool {
	switch normModName(name) {
	case "virtio_mmio", "virtio_rng", "vmgenid":
		return true
	// Without 9p a kernel still boots sandboxes, only none with shared
	// directories; fscache and netfs are not separate modules everywhere.
	case "9pnet", "9pnet_virtio", "netfs", "fscache", "9p":
		return true
	}
	return false
}

// Module file suffixes, plain first.
var moduleSuffixes = []string{".ko", ".ko.xz", ".ko.zst", ".ko.gz"}

// normModName makes '-' and '_' equivalent, as the kernel does.
func normModName(s string) string { return strings.ReplaceAll(s, "-", "_") }

// moduleFileName is the plain file name of a module file: foo.ko for
// foo.ko, foo.ko.xz, foo.ko.zst.
func moduleFileName(path string) string {
	base := filepath.Base(path)
	for _, s := range moduleSuffixes[1:] {
		if strings.HasSuffix(base, s) {
			return strings.TrimSuffix(base, s) + ".ko"
		}
	}
	return base
}

// moduleName returns the module name of a file path, or "" if the path is
// not a module.
func moduleName(path string) string {
	base := filepath.Base(path)
	for _, s := range moduleSuffixes {
		if strings.HasSuffix(base, s) && len(base) > len(s) {
			return normModName(strings.TrimSuffix(base, s))
		}
	}
	return ""
}

// ResolveModules returns the files of the named modules and of everything
// they depend on, in an order where each module comes after its
// dependencies. Dependencies come from each module's .modinfo section,
// since Debian's packages ship no modules.dep. Modules listed in
// modules.builtin are part of the kernel and are skipped.
func ResolveModules(modulesDir string, names []string) ([]string, error) {
	return resolveModules(modulesDir, names, func(string) bool { return false })
}

func resolveModules(modulesDir string, names []string, optional func(string) bool) ([]string, error) {
	idx, err := indexModules(modulesDir)
	if err != nil {
		return nil, fmt.Errorf("resolve modules: %w", err)
	}
	builtin, err := readBuiltin(modulesDir)
	if err != nil {
		return nil, fmt.Errorf("resolve modules: %w", err)
	}

	const (
		visiting = 1
		done     = 2
	)
	state := map[string]int{}
	var order []string
	var visit func(name, neededBy string) error
	visit = func(name, neededBy string) error {
		n := normModName(name)
		switch state[n] {
		case done:
			return nil
		case visiting:
			return fmt.Errorf("module %s: dependency cycle", name)
		}
		if builtin[n] {
			state[n] = done
			return nil
		}
		path, ok := idx[n]
		if !ok {
			if neededBy != "" {
				return fmt.Errorf("module %s (needed by %s) is neither built in nor present in %s", name, neededBy, modulesDir)
			}
			return fmt.Errorf("module %s is neither built in nor present in %s", name, modulesDir)
		}
		state[n] = visiting
		deps, err := moduleDepends(path)
		if err != nil {
			return err
		}
		for _, dep := range deps {
			if err := visit(dep, n); err != nil {
				return err
			}
		}
		state[n] = done
		order = append(order, path)
		return nil
	}
	for _, name := range names {
		n := normModName(name)
		if state[n] == 0 && !builtin[n] && idx[n] == "" && optional(n) {
			continue
		}
		if err := visit(name, ""); err != nil {
			return nil, fmt.Errorf("resolve modules: %w", err)
		}
	}
	return order, nil
}

// indexModules maps module names to files. Where a name occurs twice, a
// copy under updates/ wins over kernel/, which wins over anything else, as
// depmod's default search order has it.
func indexModules(dir string) (map[string]string, error) {
	rank := func(rel string) int {
		switch strings.SplitN(filepath.ToSlash(rel), "/", 2)[0] {
		case "updates":
			return 0
		case "kernel":
			return 1
		}
		return 2
	}
	idx := map[string]string{}
	ranks := map[string]int{}
	err := filepath.WalkDir(dir, func(path string, e fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !e.Type().IsRegular() {
			return nil
		}
		name := moduleName(path)
		if name == "" {
			return nil
		}
		rel, _ := filepath.Rel(dir, path)
		r := rank(rel)
		if old, ok := ranks[name]; ok && old <= r {
			return nil
		}
		idx[name], ranks[name] = path, r
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("index modules in %s: %w", dir, err)
	}
	return idx, nil
}

// readBuiltin reads modules.builtin (paths like kernel/fs/ext4/ext4.ko). A
// tree without one has no built-in list to consult.
func readBuiltin(dir string) (map[string]bool, error) {
	f, err := os.Open(filepath.Join(dir, "modules.builtin"))
	if errors.Is(err, os.ErrNotExist) {
		return map[string]bool{}, nil
	}
	if err != nil {
		return nil, err
	}
	defer f.Close()
	builtin := map[string]bool{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if n := moduleName(strings.TrimSpace(sc.Text())); n != "" {
			builtin[n] = true
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read modules.builtin: %w", err)
	}
	return builtin, nil
}

// moduleDepends returns the depends= list of a module's .modinfo section.
func moduleDepends(path string) ([]string, error) {
	info, err := readModinfo(path)
	if err != nil {
		return nil, err
	}
	var deps []string
	for _, d := range strings.Split(info["depends"], ",") {
		if d = strings.TrimSpace(d); d != "" {
			deps = append(deps, d)
		}
	}
	return deps, nil
}

// readModinfo returns the key=value pairs of a module's .modinfo section
// (for a repeated key, such as alias, the last one).
func readModinfo(path string) (map[string]string, error) {
	data, err := readModule(path)
	if err != nil {
		return nil, err
	}
	f, err := elf.NewFile(bytes.NewReader(data))
	if err != nil {
		return nil, fmt.Errorf("module %s: %w", path, err)
	}
	defer f.Close()
	sec := f.Section(".modinfo")
	if sec == nil {
		return nil, fmt.Errorf("module %s: no .modinfo section", path)
	}
	raw, err := sec.Data()
	if err != nil {
		return nil, fmt.Errorf("module %s: read .modinfo: %w", path, err)
	}
	info := map[string]string{}
	for _, kv := range bytes.Split(raw, []byte{0}) {
		if k, v, ok := bytes.Cut(kv, []byte("=")); ok {
			info[string(k)] = string(v)
		}
	}
	return info, nil
}

// maxModuleSize bounds a decompressed module, so a corrupt or hostile file
// cannot exhaust memory. The largest Debian modules are a few tens of MB.
const maxModuleSize = 512 << 20

// readModule returns a module's plain ELF bytes, whatever its compression.
func readModule(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var r io.Reader = f
	switch {
	case strings.HasSuffix(path, ".ko.xz"):
		z, err := xz.NewReader(f, 0)
		if err != nil {
			return nil, fmt.Errorf("module %s: %w", path, err)
		}
		r = z
	case strings.HasSuffix(path, ".ko.zst"):
		z, err := zstd.NewReader(f, zstd.WithDecoderConcurrency(1))
		if err != nil {
			return nil, fmt.Errorf("module %s: %w", path, err)
		}
		defer z.Close()
		r = z
	case strings.HasSuffix(path, ".ko.gz"):
		z, err := gzip.NewReader(f)
		if err != nil {
			return nil, fmt.Errorf("module %s: %w", path, err)
		}
		defer z.Close()
		r = z
	}
	data, err := io.ReadAll(io.LimitReader(r, maxModuleSize+1))
	if err != nil {
		return nil, fmt.Errorf("module %s: %w", path, err)
	}
	if len(data) > maxModuleSize {
		return nil, fmt.Errorf("module %s: larger than %d bytes", path, maxModuleSize)
	}
	return data, nil
}

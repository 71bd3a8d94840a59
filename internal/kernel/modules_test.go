package kernel

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestResolveModules(t *testing.T) {
	_, k := importedKernel(t)
	paths, err := ResolveModules(k.Modules, []string{"ext4", "virtio_pci"})
	if err != nil {
		t.Fatal(err)
	}
	pos := map[string]int{}
	for i, p := range paths {
		if !strings.HasPrefix(p, k.Modules+string(filepath.Separator)) {
			t.Errorf("%s is outside %s", p, k.Modules)
		}
		pos[moduleName(p)] = i + 1
	}
	t.Logf("load order: %v", names(paths))
	before := func(a, b string) {
		t.Helper()
		if pos[a] == 0 || pos[b] == 0 || pos[a] >= pos[b] {
			t.Errorf("%s (at %d) should load before %s (at %d)", a, pos[a], b, pos[b])
		}
	}
	before("jbd2", "ext4")
	before("mbcache", "ext4")
	before("crc16", "ext4")
	before("virtio_ring", "virtio")
	before("virtio", "virtio_pci")
	before("virtio_pci_modern_dev", "virtio_pci")
	if len(paths) != len(pos) {
		t.Errorf("duplicates in %v", names(paths))
	}

	// '-' and '_' name the same module; built-in modules need no file.
	again, err := ResolveModules(k.Modules, []string{"virtio-ring", "virtio_ring"})
	if err != nil || len(again) != 1 || moduleName(again[0]) != "virtio_ring" {
		t.Errorf("virtio-ring: %v, %v", names(again), err)
	}

	_, err = ResolveModules(k.Modules, []string{"virtio_blk", "no_such_module"})
	if err == nil || !strings.Contains(err.Error(), "no_such_module") {
		t.Errorf("unknown module: err = %v", err)
	}
}

func TestResolveBaseModules(t *testing.T) {
	_, k := importedKernel(t)
	builtin, err := readBuiltin(k.Modules)
	if err != nil {
		t.Fatal(err)
	}
	paths, err := resolveModules(k.Modules, BaseModules(), optionalModule)
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]bool{}
	for _, p := range paths {
		got[moduleName(p)] = true
	}
	for _, m := range BaseModules() {
		if !got[m] && !builtin[m] {
			t.Errorf("base module %s neither resolved nor built in", m)
		}
	}
	t.Logf("base modules (%d): %v; vmgenid built in: %v", len(paths), names(paths), builtin["vmgenid"])
}

// A tree with compressed modules, '-' in file names, and a built-in list.
func TestResolveModulesCompressed(t *testing.T) {
	_, k := importedKernel(t)
	dir := t.TempDir()
	src := func(rel string) []byte {
		b, err := os.ReadFile(filepath.Join(k.Modules, rel))
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	write := func(rel string, b []byte) {
		p := filepath.Join(dir, rel)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("kernel/virtio_ring.ko.zst", zstdBytes(t, src("kernel/drivers/virtio/virtio_ring.ko")))
	write("kernel/virtio.ko.xz", xzBytes(t, src("kernel/drivers/virtio/virtio.ko")))
	write("kernel/virtio-rng.ko.gz", gzipBytes(t, src("kernel/drivers/char/hw_random/virtio-rng.ko")))
	write("modules.builtin", []byte("kernel/drivers/virt/vmgenid.ko\n"))

	paths, err := ResolveModules(dir, []string{"virtio_rng", "vmgenid"})
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(names(paths), " "); got != "virtio_ring.ko virtio.ko virtio-rng.ko" {
		t.Errorf("order = %s", got)
	}
	for _, p := range paths {
		data, err := readModule(p)
		if err != nil || !strings.HasPrefix(string(data), "\x7fELF") {
			t.Errorf("readModule(%s): %v", p, err)
		}
	}

	// A missing dependency is named together with the module needing it.
	if err := os.Remove(filepath.Join(dir, "kernel/virtio_ring.ko.zst")); err != nil {
		t.Fatal(err)
	}
	_, err = ResolveModules(dir, []string{"virtio_rng"})
	if err == nil || !strings.Contains(err.Error(), "virtio_ring") {
		t.Errorf("missing dependency: err = %v", err)
	}
}

func names(paths []string) []string {
	var n []string
	for _, p := range paths {
		n = append(n, moduleFileName(p))
	}
	return n
}

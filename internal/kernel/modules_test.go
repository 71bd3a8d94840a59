package kernel

import (
	"bytes"
	"encoding/binary"
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
	t.Logf("load order: %v", names(paths))
	for _, p := range paths {
		if !strings.HasPrefix(p, k.Modules+string(filepath.Separator)) {
			t.Errorf("%s is outside %s", p, k.Modules)
		}
	}
	builtin, err := readBuiltin(k.Modules)
	if err != nil {
		t.Fatal(err)
	}
	// Which module needs which differs between builds of one kernel
	// version, so the order is checked against each module's own
	// .modinfo, not against a list.
	checkLoadOrder(t, paths, builtin)
	got := map[string]bool{}
	for _, p := range paths {
		got[moduleName(p)] = true
	}
	for _, m := range []string{"ext4", "jbd2", "mbcache", "virtio_pci", "virtio", "virtio_ring"} {
		if !got[m] && !builtin[m] {
			t.Errorf("%s neither resolved nor built in: %v", m, names(paths))
		}
	}

	// '-' and '_' name the same module; built-in modules need no file.
	again, err := ResolveModules(k.Modules, []string{"virtio-ring", "virtio_ring"})
	if err != nil || len(again) == 0 || moduleName(again[len(again)-1]) != "virtio_ring" {
		t.Errorf("virtio-ring: %v, %v", names(again), err)
	}
	checkLoadOrder(t, again, builtin)

	_, err = ResolveModules(k.Modules, []string{"virtio_blk", "no_such_module"})
	if err == nil || !strings.Contains(err.Error(), "no_such_module") {
		t.Errorf("unknown module: err = %v", err)
	}
}

// checkLoadOrder fails t unless every module in paths comes after each
// module its .modinfo depends on, and each dependency is in paths or built
// in, with no module twice.
func checkLoadOrder(t *testing.T, paths []string, builtin map[string]bool) {
	t.Helper()
	pos := map[string]int{}
	for i, p := range paths {
		n := moduleName(p)
		if _, dup := pos[n]; dup {
			t.Errorf("%s appears twice in %v", n, names(paths))
		}
		pos[n] = i
	}
	for i, p := range paths {
		deps, err := moduleDepends(p)
		if err != nil {
			t.Fatal(err)
		}
		for _, d := range deps {
			d = normModName(d)
			j, ok := pos[d]
			switch {
			case !ok && !builtin[d]:
				t.Errorf("%s depends on %s, which is neither in %v nor built in", moduleName(p), d, names(paths))
			case ok && j > i:
				t.Errorf("%s (at %d) loads before its dependency %s (at %d): %v", moduleName(p), i, d, j, names(paths))
			}
		}
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
	checkLoadOrder(t, paths, builtin)
	got := map[string]bool{}
	for _, p := range paths {
		got[moduleName(p)] = true
	}
	for _, m := range BaseModules() {
		if !got[m] && !builtin[m] && !optionalModule(m) {
			t.Errorf("base module %s neither resolved nor built in", m)
		}
	}
	t.Logf("base modules (%d): %v; vmgenid built in: %v", len(paths), names(paths), builtin["vmgenid"])
	// Debian's kernel has 9p as modules: host directories can be shared.
	if !got["9p"] && !builtin["9p"] {
		t.Errorf("9p neither resolved nor built in: %v", names(paths))
	}
}

// A kernel without 9p (or with it built in) still makes an initramfs: the
// share modules are optional, and 9p comes after what it needs.
func TestResolveShareModules(t *testing.T) {
	dir := t.TempDir()
	write := func(name string, deps ...string) {
		if err := os.WriteFile(filepath.Join(dir, name+".ko"), fakeModule(name, deps...), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	for _, m := range []string{"virtio_pci", "virtio_console", "virtio_blk", "crc32c_generic", "ext4", "virtio_net", "vmw_vsock_virtio_transport"} {
		write(m)
	}
	paths, err := resolveModules(dir, BaseModules(), optionalModule)
	if err != nil || len(paths) != 7 {
		t.Fatalf("without 9p: %v, %v", names(paths), err)
	}

	write("9pnet")
	write("9pnet_virtio", "9pnet")
	write("netfs")
	write("9p", "9pnet", "fscache", "netfs")
	if err := os.WriteFile(filepath.Join(dir, "modules.builtin"), []byte("kernel/fs/fscache/fscache.ko\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	paths, err = resolveModules(dir, BaseModules(), optionalModule)
	if err != nil {
		t.Fatal(err)
	}
	builtin, _ := readBuiltin(dir)
	checkLoadOrder(t, paths, builtin)
	if n := names(paths); len(n) != 11 || n[len(n)-1] != "9p.ko" {
		t.Errorf("with 9p: %v, want the 7 others, 9pnet, 9pnet_virtio, netfs, then 9p", n)
	}
}

// fakeModule is a minimal relocatable ELF file with nothing but a .modinfo
// section, which is all the resolver reads.
func fakeModule(name string, depends ...string) []byte {
	modinfo := []byte("license=GPL\x00depends=" + strings.Join(depends, ",") + "\x00name=" + name + "\x00")
	shstrtab := []byte("\x00.modinfo\x00.shstrtab\x00")
	const ehsize, shentsize = 64, 64
	infoOff := uint64(ehsize)
	strOff := infoOff + uint64(len(modinfo))
	shOff := (strOff + uint64(len(shstrtab)) + 7) &^ 7
	var b bytes.Buffer
	le := binary.LittleEndian
	b.Write([]byte{0x7f, 'E', 'L', 'F', 2, 1, 1, 0})
	b.Write(make([]byte, 8))
	binary.Write(&b, le, uint16(1))  // ET_REL
	binary.Write(&b, le, uint16(62)) // EM_X86_64
	binary.Write(&b, le, uint32(1))
	binary.Write(&b, le, uint64(0)) // entry
	binary.Write(&b, le, uint64(0)) // phoff
	binary.Write(&b, le, shOff)
	binary.Write(&b, le, uint32(0))
	binary.Write(&b, le, uint16(ehsize))
	binary.Write(&b, le, uint16(0)) // phentsize
	binary.Write(&b, le, uint16(0)) // phnum
	binary.Write(&b, le, uint16(shentsize))
	binary.Write(&b, le, uint16(3)) // shnum
	binary.Write(&b, le, uint16(2)) // shstrndx
	b.Write(modinfo)
	b.Write(shstrtab)
	b.Write(make([]byte, int(shOff)-b.Len()))
	section := func(name, typ uint32, off, size uint64) {
		binary.Write(&b, le, name)
		binary.Write(&b, le, typ)
		binary.Write(&b, le, uint64(0)) // flags
		binary.Write(&b, le, uint64(0)) // addr
		binary.Write(&b, le, off)
		binary.Write(&b, le, size)
		binary.Write(&b, le, uint32(0)) // link
		binary.Write(&b, le, uint32(0)) // info
		binary.Write(&b, le, uint64(1)) // align
		binary.Write(&b, le, uint64(0)) // entsize
	}
	section(0, 0, 0, 0)
	section(1, 1, infoOff, uint64(len(modinfo)))  // .modinfo, SHT_PROGBITS
	section(10, 3, strOff, uint64(len(shstrtab))) // .shstrtab, SHT_STRTAB
	return b.Bytes()
}

// A tree with compressed modules, '-' in file names, and a built-in list,
// resolved for both directions of one dependency: kernel builds of the same
// version disagree on whether virtio needs virtio_ring or the reverse.
func TestResolveModulesCompressed(t *testing.T) {
	for _, tc := range []struct {
		name       string
		ring, virt []string // what virtio_ring and virtio depend on
	}{
		{"ring first", nil, []string{"virtio_ring"}},
		{"virtio first", []string{"virtio"}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			write := func(rel string, b []byte) {
				p := filepath.Join(dir, rel)
				if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(p, b, 0o644); err != nil {
					t.Fatal(err)
				}
			}
			write("kernel/virtio_ring.ko.zst", zstdBytes(t, fakeModule("virtio_ring", tc.ring...)))
			write("kernel/virtio.ko.xz", xzBytes(t, fakeModule("virtio", tc.virt...)))
			write("kernel/virtio-rng.ko.gz", gzipBytes(t, fakeModule("virtio_rng", "virtio", "virtio_ring", "vmgenid")))
			write("kernel/unused.ko", fakeModule("unused", "virtio_rng"))
			write("modules.builtin", []byte("kernel/drivers/virt/vmgenid.ko\n"))
			builtin, err := readBuiltin(dir)
			if err != nil {
				t.Fatal(err)
			}

			paths, err := ResolveModules(dir, []string{"virtio_rng", "vmgenid"})
			if err != nil {
				t.Fatal(err)
			}
			if len(paths) != 3 || moduleName(paths[2]) != "virtio_rng" {
				t.Errorf("resolved %v, want virtio_ring and virtio, then virtio-rng", names(paths))
			}
			checkLoadOrder(t, paths, builtin)
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
		})
	}
}

// A cycle is reported, not followed forever.
func TestResolveModulesCycle(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "a.ko"), fakeModule("a", "b"), 0o644)
	os.WriteFile(filepath.Join(dir, "b.ko"), fakeModule("b", "a"), 0o644)
	if _, err := ResolveModules(dir, []string{"a"}); err == nil || !strings.Contains(err.Error(), "cycle") {
		t.Errorf("cycle: err = %v", err)
	}
}

func names(paths []string) []string {
	var n []string
	for _, p := range paths {
		n = append(n, moduleFileName(p))
	}
	return n
}

package kernel

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/smolvm/smolvm/internal/datadir"
)

// The Debian package is imported once and shared: it takes seconds.
var shared struct {
	once sync.Once
	root string // removed by TestMain
	d    datadir.Dir
	k    *Kernel
	err  error
	skip string
}

func TestMain(m *testing.M) {
	code := m.Run()
	if shared.root != "" {
		os.RemoveAll(shared.root)
	}
	os.Exit(code)
}

// importedKernel imports the real Debian kernel package into a data
// directory shared by the tests.
func importedKernel(t *testing.T) (datadir.Dir, *Kernel) {
	t.Helper()
	if testing.Short() {
		t.Skip("imports a 70 MB kernel package; skipped in -short mode")
	}
	shared.once.Do(func() {
		shared.root, shared.err = os.MkdirTemp("", "smolvm-kernel-test-")
		if shared.err != nil {
			return
		}
		deb := os.Getenv("SMOLVM_TEST_KERNEL_DEB")
		if deb == "" {
			if _, err := exec.LookPath("apt-get"); err != nil {
				shared.skip = "apt-get not found and SMOLVM_TEST_KERNEL_DEB not set: no Debian kernel package to import"
				return
			}
			deb, shared.err = downloadDeb(shared.root)
			if shared.err != nil {
				return
			}
		}
		shared.d = datadir.Dir(filepath.Join(shared.root, "data"))
		start := time.Now()
		shared.k, shared.err = ImportDeb(context.Background(), shared.d, deb)
		if shared.err == nil {
			t.Logf("ImportDeb(%s) took %v", filepath.Base(deb), time.Since(start).Round(time.Millisecond))
		}
	})
	if shared.skip != "" {
		t.Skip(shared.skip)
	}
	if shared.err != nil {
		t.Fatal(shared.err)
	}
	return shared.d, shared.k
}

func downloadDeb(root string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	pkg, err := resolveMetaPackage(ctx, "linux-image-amd64")
	if err != nil {
		return "", err
	}
	dir := filepath.Join(root, "deb")
	if err := os.Mkdir(dir, 0o755); err != nil {
		return "", err
	}
	cmd := exec.CommandContext(ctx, "apt-get", "download", "-q", pkg)
	cmd.Dir = dir
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", errors.New("apt-get download " + pkg + ": " + err.Error() + ": " + string(out))
	}
	debs, _ := filepath.Glob(filepath.Join(dir, "*.deb"))
	if len(debs) != 1 {
		return "", errors.New("apt-get download " + pkg + ": no .deb")
	}
	return debs[0], nil
}

func TestImportDeb(t *testing.T) {
	d, k := importedKernel(t)
	if !strings.HasPrefix(k.Version, "6.") || k.Dir != filepath.Join(d.Kernels(), k.Version) {
		t.Errorf("kernel = %+v", k)
	}
	vmlinux, err := os.ReadFile(k.Vmlinux)
	if err != nil {
		t.Fatal(err)
	}
	if err := checkPVH(vmlinux); err != nil {
		t.Errorf("imported vmlinux: %v", err)
	}
	t.Logf("vmlinux: %d bytes", len(vmlinux))
	if fi, err := os.Stat(filepath.Join(k.Modules, "kernel", "fs", "ext4", "ext4.ko")); err != nil || !fi.Mode().IsRegular() {
		t.Errorf("ext4.ko missing from %s: %v", k.Modules, err)
	}
	if _, err := os.Stat(filepath.Join(k.Dir, configName)); err != nil {
		t.Errorf("config missing: %v", err)
	}
	if entries, _ := os.ReadDir(d.Tmp()); len(entries) != 0 {
		t.Errorf("temporary files left in %s: %v", d.Tmp(), entries)
	}

	def, err := Default(d)
	if err != nil {
		t.Fatal(err)
	}
	if *def != *k {
		t.Errorf("Default = %+v, want %+v", def, k)
	}
	ks, err := List(d)
	if err != nil {
		t.Fatal(err)
	}
	if len(ks) != 1 || *ks[0] != *k {
		t.Errorf("List = %v, want [%+v]", ks, k)
	}
}

func TestImportHost(t *testing.T) {
	_, k := importedKernel(t)
	// Lay the imported kernel out as a host would have it; a hard link keeps
	// the 60 MB vmlinux from being copied.
	boot := t.TempDir()
	vmlinuz := filepath.Join(boot, "vmlinuz-"+k.Version)
	if err := os.Link(k.Vmlinux, vmlinuz); err != nil {
		t.Skipf("cannot hard-link the vmlinux: %v", err)
	}
	d := datadir.Dir(t.TempDir())
	hk, err := ImportHost(context.Background(), d, vmlinuz, k.Modules)
	if err != nil {
		t.Fatal(err)
	}
	if hk.Version != k.Version {
		t.Errorf("version = %q, want %q", hk.Version, k.Version)
	}
	if _, err := os.Stat(filepath.Join(hk.Modules, "kernel", "fs", "ext4", "ext4.ko")); err != nil {
		t.Error(err)
	}
	// Importing again replaces the earlier import.
	if _, err := ImportHost(context.Background(), d, vmlinuz, k.Modules); err != nil {
		t.Fatal(err)
	}
	if ks, _ := List(d); len(ks) != 1 {
		t.Errorf("after re-import List = %v", ks)
	}
	if entries, _ := os.ReadDir(d.Tmp()); len(entries) != 0 {
		t.Errorf("temporary files left in %s: %v", d.Tmp(), entries)
	}

	other := filepath.Join(boot, "vmlinuz-9.9.9-1-amd64")
	if err := os.Link(k.Vmlinux, other); err != nil {
		t.Fatal(err)
	}
	_, err = ImportHost(context.Background(), d, other, k.Modules)
	if err == nil || !strings.Contains(err.Error(), "9.9.9-1-amd64") {
		t.Errorf("mismatched modules: err = %v", err)
	}
}

func TestDefaultNoKernel(t *testing.T) {
	d := datadir.Dir(t.TempDir())
	_, err := Default(d)
	if !errors.Is(err, ErrNoKernel) {
		t.Fatalf("err = %v, want ErrNoKernel", err)
	}
	if !strings.Contains(err.Error(), "smolvm kernel fetch") || !strings.Contains(err.Error(), "smolvm setup") {
		t.Errorf("error does not tell what to run: %v", err)
	}
	if ks, err := List(d); err != nil || len(ks) != 0 {
		t.Errorf("List = %v, %v", ks, err)
	}
}

func TestListOrdersVersions(t *testing.T) {
	d := datadir.Dir(t.TempDir())
	for _, v := range []string{"6.1.0-9-amd64", "6.1.0-56-amd64", "6.10.0-1-amd64", "incomplete"} {
		k := kernelAt(d, v)
		if err := os.MkdirAll(k.Modules, 0o755); err != nil {
			t.Fatal(err)
		}
		if v == "incomplete" {
			continue
		}
		if err := os.WriteFile(k.Vmlinux, []byte("x"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	ks, err := List(d)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, k := range ks {
		got = append(got, k.Version)
	}
	if want := "6.1.0-9-amd64 6.1.0-56-amd64 6.10.0-1-amd64"; strings.Join(got, " ") != want {
		t.Errorf("List = %v, want %s", got, want)
	}
	if k, err := Default(d); err != nil || k.Version != "6.10.0-1-amd64" {
		t.Errorf("Default = %v, %v", k, err)
	}
}

func TestCompareVersions(t *testing.T) {
	for _, c := range []struct {
		a, b string
		want int
	}{
		{"6.1.0-56-amd64", "6.1.0-56-amd64", 0},
		{"6.1.0-9-amd64", "6.1.0-56-amd64", -1},
		{"6.10.0-1-amd64", "6.9.0-1-amd64", 1},
		{"6.1.0-056-amd64", "6.1.0-57-amd64", -1},
		{"6.1.0-56-amd64", "6.1.0-56-cloud-amd64", -1},
		{"6.1", "6.1.0", -1},
		{"6.1.0-10", "6.1.0-rc", 1},
	} {
		if got := compareVersions(c.a, c.b); got != c.want {
			t.Errorf("compareVersions(%q, %q) = %d, want %d", c.a, c.b, got, c.want)
		}
		if got := compareVersions(c.b, c.a); got != -c.want {
			t.Errorf("compareVersions(%q, %q) = %d, want %d", c.b, c.a, got, -c.want)
		}
	}
}

func TestReplaceDir(t *testing.T) {
	root := t.TempDir()
	src, dst := filepath.Join(root, "new"), filepath.Join(root, "k")
	for dir, marker := range map[string]string{src: "new", dst: "old"} {
		if err := os.MkdirAll(filepath.Join(dir, "sub"), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, marker), nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := replaceDir(src, dst); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dst, "new")); err != nil {
		t.Error("new tree not in place")
	}
	if _, err := os.Stat(filepath.Join(dst, "old")); err == nil {
		t.Error("old tree still in place")
	}
	if entries, _ := os.ReadDir(root); len(entries) != 1 {
		t.Errorf("left behind: %v", entries)
	}
}

func TestImportDebRejectsNonPackages(t *testing.T) {
	d := datadir.Dir(t.TempDir())
	dir := t.TempDir()
	for name, content := range map[string]string{
		"empty.deb":   "",
		"garbage.deb": "this is not an ar archive at all",
		"nodata.deb":  "!<arch>\ndebian-binary   0           0     0     100644  4         `\n2.0\n",
		"badhdr.deb":  "!<arch>\n" + strings.Repeat(" ", 60),
	} {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
		if _, err := ImportDeb(context.Background(), d, p); err == nil {
			t.Errorf("%s: no error", name)
		}
	}
	if entries, _ := os.ReadDir(d.Tmp()); len(entries) != 0 {
		t.Errorf("temporary files left in %s: %v", d.Tmp(), entries)
	}
}

func TestParseDepends(t *testing.T) {
	out := "linux-image-amd64\n  Depends: <linux-image-virtual>\n |Depends: linux-image-6.1.0-56-amd64\n  Depends: linux-image-6.1.0-55-amd64\n"
	if got := parseDepends([]byte(out)); got != "linux-image-6.1.0-56-amd64" {
		t.Errorf("parseDepends = %q", got)
	}
	if got := parseDepends([]byte("linux-image-amd64\n")); got != "" {
		t.Errorf("parseDepends(no deps) = %q", got)
	}
}

package image

import (
	"archive/tar"
	"bytes"
	"context"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
)

// applyLayers unpacks layers into a fresh directory with OCI semantics.
func applyLayers(t *testing.T, layers ...[]entry) (string, error) {
	t.Helper()
	root := filepath.Join(t.TempDir(), "root")
	if err := os.Mkdir(root, 0o755); err != nil {
		t.Fatal(err)
	}
	a, err := newApplier(root, true, func(msg string) { t.Log(msg) })
	if err != nil {
		t.Fatal(err)
	}
	defer a.close()
	for _, l := range layers {
		if err := a.apply(context.Background(), bytes.NewReader(tarBytes(t, l))); err != nil {
			return root, err
		}
	}
	return root, a.finish()
}

func names(t *testing.T, dir string) []string {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range ents {
		out = append(out, e.Name())
	}
	return out
}

func TestApplierRefusesPathsOutsideTheRoot(t *testing.T) {
	requireRoot(t)
	for _, name := range []string{"../escape.txt", "a/../../escape.txt"} {
		_, err := applyLayers(t, []entry{file(name, 0o644, "x")})
		if !isCorrupt(err) {
			t.Errorf("%s: err = %v, want a corrupt-image error", name, err)
		}
	}
	_, err := applyLayers(t, []entry{file("x", 0o644, "x"), hardlink("y", "../../etc/passwd")})
	if !isCorrupt(err) {
		t.Errorf("hard link out of the root: err = %v", err)
	}
}

func TestApplierKeepsWritesThroughSymlinksInside(t *testing.T) {
	requireRoot(t)
	outside := t.TempDir()
	root, err := applyLayers(t,
		[]entry{
			symlink("abs", "/"),
			symlink("rel", "../../../.."),
			symlink("host", outside), // an absolute path that exists on the host
		},
		[]entry{
			file("abs/a.txt", 0o644, "a"),
			file("rel/b.txt", 0o644, "b"),
			file("host/c.txt", 0o644, "c"),
		},
	)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{"a.txt", "b.txt", filepath.Join(outside, "c.txt")} {
		if _, err := os.Stat(filepath.Join(root, p)); err != nil {
			t.Errorf("%s not inside the root: %v", p, err)
		}
	}
	if got := names(t, outside); len(got) > 0 {
		t.Errorf("written outside the root: %v", got)
	}
	// A whiteout through a symlink cannot delete host files either.
	keep := filepath.Join(outside, "keep.txt")
	os.WriteFile(keep, []byte("k"), 0o644)
	if _, err := applyLayers(t,
		[]entry{symlink("host", outside)},
		[]entry{file("host/.wh.keep.txt", 0o644, "")},
	); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(keep); err != nil {
		t.Errorf("a whiteout deleted a host file: %v", err)
	}
}

func TestApplierWhiteoutsAndOpaqueDirectories(t *testing.T) {
	requireRoot(t)
	root, err := applyLayers(t,
		[]entry{
			dir("d/", 0o755), file("d/keep.txt", 0o644, "k"), file("d/gone.txt", 0o644, "g"),
			dir("d/gonedir/", 0o755), file("d/gonedir/x", 0o644, "x"),
			dir("o/", 0o755), file("o/old.txt", 0o644, "o"), dir("o/sub/", 0o755), file("o/sub/old2.txt", 0o644, "o"),
			file("replaced", 0o644, "file first"),
		},
		[]entry{
			file("d/.wh.gone.txt", 0o644, ""),
			file("d/.wh.gonedir", 0o644, ""),
			file("d/.wh.never-existed", 0o644, ""),
			// The layer's own entries come before its opaque marker.
			dir("o/sub/", 0o750),
			file("o/sub/new.txt", 0o644, "n"),
			file("o/.wh..wh..opq", 0o644, ""),
			dir("replaced/", 0o755),
			file("replaced/inside", 0o644, "now a directory"),
		},
		[]entry{
			// A later layer adds to the opaque directory again.
			file("o/later.txt", 0o644, "l"),
		},
	)
	if err != nil {
		t.Fatal(err)
	}
	if got := names(t, filepath.Join(root, "d")); !slices.Equal(got, []string{"keep.txt"}) {
		t.Errorf("d holds %v", got)
	}
	if got := names(t, filepath.Join(root, "o")); !slices.Equal(got, []string{"later.txt", "sub"}) {
		t.Errorf("o holds %v", got)
	}
	if got := names(t, filepath.Join(root, "o/sub")); !slices.Equal(got, []string{"new.txt"}) {
		t.Errorf("o/sub holds %v", got)
	}
	if st, err := os.Stat(filepath.Join(root, "o/sub")); err != nil || st.Mode().Perm() != 0o750 {
		t.Errorf("o/sub: %v %v", st, err)
	}
	if b, err := os.ReadFile(filepath.Join(root, "replaced/inside")); err != nil || string(b) != "now a directory" {
		t.Errorf("replaced/inside: %q %v", b, err)
	}
}

func TestApplierPlainTarballKeepsWhiteoutNames(t *testing.T) {
	requireRoot(t)
	root := filepath.Join(t.TempDir(), "root")
	os.Mkdir(root, 0o755)
	a, err := newApplier(root, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer a.close()
	if err := a.apply(context.Background(), bytes.NewReader(tarBytes(t, []entry{file(".wh.x", 0o644, "literal")}))); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(root, ".wh.x")); err != nil {
		t.Errorf("plain tarball lost .wh.x: %v", err)
	}
}

func TestApplierSparseAndLinks(t *testing.T) {
	requireRoot(t)
	big := make([]byte, 8<<20)
	copy(big[4<<20:], "middle")
	root, err := applyLayers(t, []entry{
		{hdr: tar.Header{Typeflag: tar.TypeReg, Name: "sparse.bin", Mode: 0o600}, body: big},
		hardlink("hard.bin", "sparse.bin"),
		{hdr: tar.Header{Typeflag: tar.TypeFifo, Name: "fifo", Mode: 0o600}},
	})
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(root, "sparse.bin")
	got, err := os.ReadFile(p)
	if err != nil || !bytes.Equal(got, big) {
		t.Fatalf("content differs (%v)", err)
	}
	var st syscall.Stat_t
	if err := syscall.Stat(p, &st); err != nil {
		t.Fatal(err)
	}
	if used := st.Blocks * 512; used > 1<<20 {
		t.Errorf("8 MiB of mostly zeros takes %d bytes: not sparse", used)
	}
	a, _ := os.Stat(p)
	b, _ := os.Stat(filepath.Join(root, "hard.bin"))
	if !os.SameFile(a, b) {
		t.Error("hard link is a copy")
	}
	if st, err := os.Lstat(filepath.Join(root, "fifo")); err != nil || st.Mode()&os.ModeNamedPipe == 0 {
		t.Errorf("fifo: %v %v", st, err)
	}
}

func TestCleanEntryName(t *testing.T) {
	for in, want := range map[string]string{
		"./etc/passwd": "etc/passwd", "/etc/passwd": "etc/passwd", "etc//x/": "etc/x",
		"./": "", "/": "", "a/b/../c": "a/c", "/../x": "x",
	} {
		if got, err := cleanEntryName(in); err != nil || got != want {
			t.Errorf("cleanEntryName(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	for _, in := range []string{"..", "../x", "a/../../x"} {
		if _, err := cleanEntryName(in); !isCorrupt(err) {
			t.Errorf("cleanEntryName(%q) accepted", in)
		}
	}
}

func TestIsTar(t *testing.T) {
	b := tarBytes(t, []entry{file("x", 0o644, "y")})
	if !isTar(b[:512]) {
		t.Error("a tar header is not recognised")
	}
	if isTar(bytes.Repeat([]byte{0}, 512)) || isTar([]byte(strings.Repeat("x", 512))) {
		t.Error("junk taken for tar")
	}
}

package image

import (
	"bytes"
	"compress/gzip"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// sourceFiles makes the three file formats of one small root: an ext4
// image, a qcow2 of it, and a gzipped tarball.
func sourceFiles(t *testing.T) (ext4, qcow2, tgz string) {
	t.Helper()
	tmp := t.TempDir()
	entries := append(busyboxRoot(t), file("marker.txt", 0o644, "from a file source\n"))
	ext4 = filepath.Join(tmp, "root.ext4")
	makeExt4Image(t, entries, ext4)
	qcow2 = filepath.Join(tmp, "root.qcow2")
	if out, err := runTool("qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", ext4, qcow2); err != nil {
		t.Skipf("qemu-img: %v %s", err, out)
	}
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	zw.Write(tarBytes(t, append([]entry{dir("./", 0o755)}, entries...)))
	zw.Close()
	tgz = filepath.Join(tmp, "root.tar.gz")
	if err := os.WriteFile(tgz, buf.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
	return ext4, qcow2, tgz
}

func TestResolveFileSources(t *testing.T) {
	requireRoot(t)
	ext4, qcow2, tgz := sourceFiles(t)
	d := testDir(t)
	ctx := context.Background()
	for _, c := range []struct{ name, image, kind string }{
		{"ext4", "file://" + ext4, "ext4"},
		{"qcow2 by path", qcow2, "qcow2"},
		{"qcow2 by URL", "file://" + qcow2, "qcow2"},
		{"tarball", "file://" + tgz, "tar"},
	} {
		t.Run(c.name, func(t *testing.T) {
			start := time.Now()
			b, err := Resolve(ctx, d, Source{Image: c.image}, testOptions(t))
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("%s: %s", c.name, time.Since(start).Round(time.Millisecond))
			if b.Ref != c.image || b.Kind != KindFile || !strings.HasPrefix(b.SourceDigest, "sha256:") {
				t.Errorf("base %+v", b)
			}
			if got := strings.TrimSpace(debugfs(t, b.Path, "cat /marker.txt")); got != "from a file source" {
				t.Errorf("marker.txt = %q", got)
			}
			if out := debugfs(t, b.Path, "stat /bin/sh"); !strings.Contains(out, "Type: symlink") {
				t.Errorf("/bin/sh:\n%s", out)
			}
			if st, err := os.Stat(b.Path); err != nil || st.Mode().Perm() != 0o444 || st.Size()%4096 != 0 {
				t.Errorf("image file: %v %v", st, err)
			}
			// Unchanged file: from the cache without rereading it.
			var log strings.Builder
			o := testOptions(t)
			o.Log = &log
			again, err := Resolve(ctx, d, Source{Image: c.image}, o)
			if err != nil || again.Path != b.Path || log.Len() != 0 {
				t.Errorf("second resolve: %v, %v, log %q", again, err, log.String())
			}
		})
	}
	// The qcow2 by path and by URL are one entry; ext4, qcow2, tarball three.
	if list, _ := List(d); len(list) != 3 {
		t.Errorf("%d entries, want 3", len(list))
	}
	if tmp, _ := os.ReadDir(d.Tmp()); len(tmp) > 0 {
		t.Errorf("temp entries left: %v", tmp)
	}

	// A changed file is a new entry, under its new digest.
	changed := filepath.Join(t.TempDir(), "root.ext4")
	data, _ := os.ReadFile(ext4)
	os.WriteFile(changed, data, 0o644)
	first, err := Resolve(ctx, d, Source{Image: changed}, testOptions(t))
	if err != nil {
		t.Fatal(err)
	}
	f, _ := os.OpenFile(changed, os.O_WRONLY, 0)
	f.WriteAt([]byte("x"), int64(len(data)-1))
	f.Close()
	second, err := Resolve(ctx, d, Source{Image: changed}, testOptions(t))
	if err != nil {
		t.Fatal(err)
	}
	if first.SourceDigest == second.SourceDigest || first.Path == second.Path {
		t.Errorf("changed file resolved to the same entry %s", second.Path)
	}
}

func TestFileSourceErrors(t *testing.T) {
	requireRoot(t)
	d := testDir(t)
	dir := t.TempDir()
	junk := filepath.Join(dir, "junk.bin")
	os.WriteFile(junk, bytes.Repeat([]byte("not an image "), 1000), 0o644)
	badGz := filepath.Join(dir, "bad.tar.gz")
	os.WriteFile(badGz, []byte{0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff, 1, 2, 3}, 0o644)
	// A tarball cut short: its start reads fine, its end does not.
	_, _, tgz := sourceFiles(t)
	whole, _ := os.ReadFile(tgz)
	truncated := filepath.Join(dir, "truncated.tar.gz")
	os.WriteFile(truncated, whole[:len(whole)/2], 0o644)
	// A qcow2 that points at a host file must not be read through.
	backed := filepath.Join(dir, "backed.qcow2")
	if out, err := runTool("qemu-img", "create", "-q", "-f", "qcow2", "-b", junk, "-F", "raw", backed); err != nil {
		t.Skipf("qemu-img: %v %s", err, out)
	}
	for _, c := range []struct{ image, code string }{
		{filepath.Join(dir, "missing.ext4"), CodeNotFound},
		{"file://" + dir, CodeUnsupported},
		{junk, CodeUnsupported},
		{badGz, CodeCorrupt},
		{truncated, CodeCorrupt},
		{backed, CodeUnsupported},
		{"file://host/x.ext4", CodeInvalidRef},
		{"./relative.qcow2", CodeInvalidRef},
	} {
		_, err := Resolve(context.Background(), d, Source{Image: c.image}, testOptions(t))
		e := wantCode(t, err, c.code)
		t.Logf("%s: %v", c.image, e)
	}
	assertClean(t, d)
}

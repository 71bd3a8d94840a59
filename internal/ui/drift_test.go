package ui

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"testing"
)

// TestDistUpToDate rebuilds the dashboard from web/ and fails when the
// committed dist/ differs: go build embeds dist/, so a stale copy would
// ship old code. Rebuild with `cd internal/ui/web && npm ci && npm run
// build`.
func TestDistUpToDate(t *testing.T) {
	web, err := filepath.Abs("web")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := exec.LookPath("node"); err != nil {
		t.Fatal("node is not installed: the dashboard is built with Node.js and npm (scripts/test.sh installs them)")
	}
	if _, err := os.Stat(filepath.Join(web, "node_modules", "esbuild")); err != nil {
		t.Fatalf("the dashboard's build tools are not installed: run `npm ci` in %s (scripts/test.sh does)", web)
	}

	// Build a copy of the sources, which writes its own dist/ beside it,
	// leaving the committed one alone.
	tmp := t.TempDir()
	copyWeb := filepath.Join(tmp, "web")
	err = filepath.WalkDir(web, func(p string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(web, p)
		if err != nil {
			return err
		}
		dst := filepath.Join(copyWeb, rel)
		switch {
		case d.Name() == "node_modules":
			// Linked, not copied: it is large and only read.
			if err := os.Symlink(p, dst); err != nil {
				return err
			}
			return filepath.SkipDir
		case d.IsDir():
			return os.MkdirAll(dst, 0o755)
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		return os.WriteFile(dst, b, 0o644)
	})
	if err != nil {
		t.Fatalf("copy %s: %v", web, err)
	}
	cmd := exec.Command("node", "build.mjs")
	cmd.Dir = copyWeb
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build the dashboard: %v\n%s", err, out)
	}
	want := readTree(t, filepath.Join(tmp, "dist"))
	got := readTree(t, "dist")
	var names []string
	for n := range want {
		names = append(names, n)
	}
	for n := range got {
		if _, ok := want[n]; !ok {
			names = append(names, n)
		}
	}
	slices.Sort(names)
	for _, n := range names {
		if !bytes.Equal(got[n], want[n]) {
			t.Errorf("internal/ui/dist/%s is stale (committed %d bytes, built %d): run `cd internal/ui/web && npm ci && npm run build` and commit dist/", n, len(got[n]), len(want[n]))
		}
	}
}

func readTree(t *testing.T, dir string) map[string][]byte {
	t.Helper()
	out := map[string][]byte{}
	err := filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(dir, p)
		out[rel] = b
		return err
	})
	if err != nil {
		t.Fatalf("read %s: %v", dir, err)
	}
	return out
}

package image

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/smolvm/smolvm/internal/datadir"
)

const defaultMirror = "http://deb.debian.org/debian"

// build runs debootstrap into a temp directory, shrinks the tree, packs it
// into ext4 and renames the result into the cache. The caller holds the lock.
func build(ctx context.Context, d datadir.Dir, r recipe, log io.Writer) (*Base, error) {
	start := time.Now()
	debootstrap, err := LookTool("debootstrap", "debootstrap")
	if err != nil {
		return nil, err
	}
	mkfs, err := LookTool("mkfs.ext4", "e2fsprogs")
	if err != nil {
		return nil, err
	}
	if os.Geteuid() != 0 {
		return nil, fmt.Errorf("building image %s needs root (debootstrap installs packages in a chroot): run `sudo env SMOLVM_DATA_DIR=%s smolvm setup` once", r.Name, d.Path())
	}
	mirror := mirrorURL(os.Getenv("SMOLVM_DEBIAN_MIRROR"), "/etc/apt", r.Suite)

	work, err := os.MkdirTemp(d.Tmp(), r.tempPrefix())
	if err != nil {
		return nil, fmt.Errorf("create build directory: %w", err)
	}
	defer func() {
		if err := removeTree(work); err != nil {
			fmt.Fprintf(log, "warning: could not remove build directory: %v\n", err)
		}
	}()

	fmt.Fprintf(log, "building default image %s (debootstrap, about a minute)...\n", r.Name)
	root := filepath.Join(work, "root")
	if err := runDebootstrap(ctx, debootstrap, r, root, mirror, log); err != nil {
		return nil, err
	}
	if err := shrink(root); err != nil {
		return nil, fmt.Errorf("build image %s: %w", r.Name, err)
	}
	treeBytes, entries, err := treeSize(root)
	if err != nil {
		return nil, fmt.Errorf("build image %s: measure tree: %w", r.Name, err)
	}
	size := imageSize(treeBytes)
	fmt.Fprintf(log, "debootstrap done in %.0f s; writing ext4 image (%d MiB)...\n",
		time.Since(start).Seconds(), size>>20)

	out := filepath.Join(work, "out")
	if err := os.Mkdir(out, 0o755); err != nil {
		return nil, fmt.Errorf("build image %s: %w", r.Name, err)
	}
	img := filepath.Join(out, imageFile)
	if err := makeExt4(ctx, mkfs, root, img, size, entries); err != nil {
		return nil, fmt.Errorf("build image %s: %w", r.Name, err)
	}
	// The tree is no longer needed; free its space before hashing.
	if err := removeTree(root); err != nil {
		return nil, fmt.Errorf("build image %s: remove tree: %w", r.Name, err)
	}
	digest, err := fileDigest(ctx, img)
	if err != nil {
		return nil, fmt.Errorf("build image %s: digest: %w", r.Name, err)
	}
	if err := os.Chmod(img, 0o444); err != nil {
		return nil, fmt.Errorf("build image %s: %w", r.Name, err)
	}
	m := metadata{
		Name:         r.Name,
		Digest:       digest,
		SizeBytes:    size,
		BuiltAt:      time.Now().UTC().Truncate(time.Second),
		BuildSeconds: time.Since(start).Round(100 * time.Millisecond).Seconds(),
		Mirror:       mirror,
		Key:          r.key(),
		Recipe:       r,
	}
	if err := writeMetadata(filepath.Join(out, metaFile), m); err != nil {
		return nil, fmt.Errorf("build image %s: %w", r.Name, err)
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("build image %s: %w", r.Name, err)
	}
	final := r.dir(d)
	if err := os.Rename(out, final); err != nil {
		return nil, fmt.Errorf("build image %s: move into cache: %w", r.Name, err)
	}
	syncDir(d.Images())
	b := &Base{Name: r.Name, Path: filepath.Join(final, imageFile), Digest: digest, SizeBytes: size,
		ID: r.id(), Kind: KindDebootstrap, Created: m.BuiltAt}
	fmt.Fprintf(log, "image ready: %s (%d MiB) in %.0f s\n", b.Path, size>>20, time.Since(start).Seconds())
	return b, nil
}

// runDebootstrap installs the recipe's Debian into root.
func runDebootstrap(ctx context.Context, bin string, r recipe, root, mirror string, log io.Writer) error {
	args := []string{"--variant=" + r.Variant}
	if len(r.Include) > 0 {
		args = append(args, "--include="+strings.Join(r.Include, ","))
	}
	args = append(args, r.Suite, root, mirror)

	tail := &tailBuffer{max: 64 << 10}
	var out io.Writer = tail
	if verbose() {
		out = io.MultiWriter(tail, log)
	}
	err := runIsolated(func() *exec.Cmd {
		cmd := exec.CommandContext(ctx, bin, args...)
		cmd.Stdout = out
		cmd.Stderr = out
		cmd.Env = append(os.Environ(),
			// dpkg and its maintainer scripts need the sbin directories,
			// which a non-login root shell may lack.
			"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
			"LC_ALL=C",
			"DEBIAN_FRONTEND=noninteractive",
		)
		return cmd
	})
	if ctx.Err() != nil {
		return fmt.Errorf("build image %s: debootstrap: %w", r.Name, ctx.Err())
	}
	if err != nil {
		msg := lastLines(tail.String(), 15)
		// debootstrap's own log says which step failed; its console output
		// often only says to read it.
		if logTail, rerr := os.ReadFile(filepath.Join(root, "debootstrap", "debootstrap.log")); rerr == nil {
			msg += "\n--- debootstrap.log ---\n" + lastLines(string(logTail), 15)
		}
		return fmt.Errorf("build image %s: debootstrap %s from %s: %w\n%s", r.Name, r.Suite, mirror, err, msg)
	}
	return nil
}

// shrink removes what a sandbox does not need: package caches, apt lists,
// documentation and translations. It also drops the host's identity, which
// debootstrap copies in; the guest agent writes its own.
func shrink(root string) error {
	for _, dir := range []string{"var/cache/apt", "var/lib/apt/lists"} {
		// Keep the directories (apt wants its "partial" subdirectories);
		// drop the files.
		if err := removeFilesKeepDirs(filepath.Join(root, dir)); err != nil {
			return err
		}
	}
	for _, dir := range []string{"usr/share/doc", "usr/share/man", "usr/share/info"} {
		if err := removeChildren(filepath.Join(root, dir), nil); err != nil {
			return err
		}
	}
	keepLocale := func(name string) bool {
		return name == "locale.alias" || name == "C" || strings.HasPrefix(name, "C.")
	}
	if err := removeChildren(filepath.Join(root, "usr/share/locale"), keepLocale); err != nil {
		return err
	}
	etc := filepath.Join(root, "etc")
	files := map[string]string{
		"resolv.conf": "",
		"hostname":    "localhost\n",
		"hosts":       "127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n",
	}
	for name, content := range files {
		p := filepath.Join(etc, name)
		// resolv.conf may be a symlink into the host's layout; replace it.
		if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return err
		}
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			return err
		}
	}
	if err := dropMesg(filepath.Join(root, "root", ".profile")); err != nil {
		return err
	}
	for _, need := range []string{"etc/profile", "bin/bash", "usr/bin/python3"} {
		if _, err := os.Lstat(filepath.Join(root, need)); err != nil {
			return fmt.Errorf("debootstrap result lacks /%s", need)
		}
	}
	return nil
}

// dropMesg removes the `mesg n` line from root's profile. It only guards a
// terminal, which sandbox commands never have, and spawning it is a third
// of what a login shell costs under emulation.
func dropMesg(profile string) error {
	b, err := os.ReadFile(profile)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	var kept []string
	for _, line := range strings.Split(string(b), "\n") {
		if !strings.HasPrefix(strings.TrimSpace(line), "mesg ") {
			kept = append(kept, line)
		}
	}
	return os.WriteFile(profile, []byte(strings.Join(kept, "\n")), 0o644)
}

// removeFilesKeepDirs deletes every non-directory below dir.
func removeFilesKeepDirs(dir string) error {
	err := filepath.WalkDir(dir, func(p string, e fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if e.IsDir() {
			return nil
		}
		return os.Remove(p)
	})
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	return err
}

// removeChildren deletes the entries of dir for which keep is nil or false.
func removeChildren(dir string, keep func(string) bool) error {
	entries, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	for _, e := range entries {
		if keep != nil && keep(e.Name()) {
			continue
		}
		if err := os.RemoveAll(filepath.Join(dir, e.Name())); err != nil {
			return err
		}
	}
	return nil
}

// treeSize returns the bytes a tree takes in 4 KiB blocks and its number of
// entries (each needs an inode).
func treeSize(root string) (bytes int64, entries int64, err error) {
	const block = 4096
	err = filepath.WalkDir(root, func(p string, e fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		entries++
		info, err := e.Info()
		if err != nil {
			return err
		}
		switch {
		case info.Mode().IsRegular():
			bytes += (info.Size() + block - 1) / block * block
		case info.IsDir():
			bytes += block
		case info.Mode()&fs.ModeSymlink != 0 && info.Size() >= 60:
			// Short symlink targets fit in the inode.
			bytes += block
		}
		return nil
	})
	return bytes, entries, err
}

// imageSize is the tree's size plus 30% and 64 MiB for ext4's own metadata,
// the journal and a little room to write, rounded up to MiB.
func imageSize(treeBytes int64) int64 {
	const mib = 1 << 20
	size := treeBytes + treeBytes*3/10 + 64*mib
	return (size + mib - 1) / mib * mib
}

// makeExt4 creates a sparse file of the given size and fills it with root.
func makeExt4(ctx context.Context, mkfs, root, img string, size, entries int64) error {
	f, err := os.OpenFile(img, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return err
	}
	if err := f.Truncate(size); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	// Fixed block size and inode ratio: mke2fs would otherwise pick its
	// "small" profile (1 KiB blocks) for files under 512 MiB, which is slow
	// and limits how far a sandbox can grow the filesystem online.
	// No blocks reserved for root: sandboxes run as root anyway.
	inodes := max(size/16384, entries+entries/2+1024)
	cmd := exec.CommandContext(ctx, mkfs, "-q", "-F", "-m", "0",
		"-b", "4096", "-I", "256", "-N", fmt.Sprint(inodes),
		"-d", root, "-L", "rootfs", "-E", "root_owner=0:0", img)
	out, err := cmd.CombinedOutput()
	if ctx.Err() != nil {
		return ctx.Err()
	}
	if err != nil {
		return fmt.Errorf("mkfs.ext4: %w: %s", err, lastLines(string(out), 10))
	}
	f, err = os.Open(img)
	if err != nil {
		return err
	}
	defer f.Close()
	return f.Sync()
}

func writeMetadata(path string, m metadata) error {
	return writeJSONFile(path, m, 0o444)
}

// syncDir makes a rename durable; failure only weakens crash safety.
func syncDir(dir string) {
	if f, err := os.Open(dir); err == nil {
		_ = f.Sync()
		f.Close()
	}
}

// LookTool finds a host tool on $PATH or in the sbin directories, which are
// often missing from a non-root user's $PATH. The error names the Debian
// package to install.
func LookTool(name, pkg string) (string, error) {
	if p, err := exec.LookPath(name); err == nil {
		return p, nil
	}
	for _, dir := range []string{"/usr/local/sbin", "/usr/sbin", "/sbin"} {
		p := filepath.Join(dir, name)
		if st, err := os.Stat(p); err == nil && st.Mode().IsRegular() && st.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", fmt.Errorf("%s not found: install it with `apt-get install %s` or run `smolvm setup`", name, pkg)
}

// mirrorURL picks the Debian mirror: the override if set, else the first
// mirror the host's apt configuration under aptDir uses for suite, else the
// Debian archive.
func mirrorURL(override, aptDir, suite string) string {
	if override != "" {
		return override
	}
	var files []string
	if _, err := os.Stat(filepath.Join(aptDir, "sources.list")); err == nil {
		files = append(files, filepath.Join(aptDir, "sources.list"))
	}
	for _, pattern := range []string{"*.list", "*.sources"} {
		m, _ := filepath.Glob(filepath.Join(aptDir, "sources.list.d", pattern))
		files = append(files, m...)
	}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		var u string
		if strings.HasSuffix(f, ".sources") {
			u = mirrorFromDeb822(string(b), suite)
		} else {
			u = mirrorFromList(string(b), suite)
		}
		if u != "" {
			return u
		}
	}
	return defaultMirror
}

// usableMirror accepts the URI schemes debootstrap can fetch from.
func usableMirror(u string) bool {
	return strings.HasPrefix(u, "http://") || strings.HasPrefix(u, "https://") || strings.HasPrefix(u, "file:/")
}

// mirrorFromList reads one-line-style sources ("deb [opts] URI SUITE COMP...").
func mirrorFromList(text, suite string) string {
	sc := bufio.NewScanner(strings.NewReader(text))
	for sc.Scan() {
		line := sc.Text()
		if i := strings.IndexByte(line, '#'); i >= 0 {
			line = line[:i]
		}
		f := strings.Fields(line)
		if len(f) < 3 || f[0] != "deb" {
			continue
		}
		f = f[1:]
		if strings.HasPrefix(f[0], "[") {
			// Options may contain spaces: skip to the closing bracket.
			for len(f) > 0 && !strings.HasSuffix(f[0], "]") {
				f = f[1:]
			}
			if len(f) > 0 {
				f = f[1:]
			}
		}
		if len(f) >= 2 && f[1] == suite && usableMirror(f[0]) {
			return f[0]
		}
	}
	return ""
}

// mirrorFromDeb822 reads deb822-style sources (stanzas of "Field: value").
func mirrorFromDeb822(text, suite string) string {
	for _, stanza := range strings.Split(strings.ReplaceAll(text, "\r\n", "\n"), "\n\n") {
		fields := map[string]string{}
		var last string
		for _, line := range strings.Split(stanza, "\n") {
			if strings.HasPrefix(line, "#") || strings.TrimSpace(line) == "" {
				continue
			}
			if line[0] == ' ' || line[0] == '\t' {
				if last != "" {
					fields[last] += " " + strings.TrimSpace(line)
				}
				continue
			}
			k, v, ok := strings.Cut(line, ":")
			if !ok {
				continue
			}
			last = strings.ToLower(strings.TrimSpace(k))
			fields[last] = strings.TrimSpace(v)
		}
		if enabled := strings.ToLower(fields["enabled"]); enabled == "no" || enabled == "false" {
			continue
		}
		if !containsWord(fields["types"], "deb") || !containsWord(fields["suites"], suite) {
			continue
		}
		for _, u := range strings.Fields(fields["uris"]) {
			if usableMirror(u) {
				return u
			}
		}
	}
	return ""
}

func containsWord(s, w string) bool {
	for _, f := range strings.Fields(s) {
		if f == w {
			return true
		}
	}
	return false
}

func verbose() bool {
	v := os.Getenv("SMOLVM_VERBOSE")
	return v != "" && v != "0" && v != "false"
}

// tailBuffer keeps the last max bytes written to it.
type tailBuffer struct {
	mu  sync.Mutex
	max int
	buf []byte
}

func (t *tailBuffer) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.buf = append(t.buf, p...)
	if over := len(t.buf) - t.max; over > 0 {
		t.buf = append(t.buf[:0], t.buf[over:]...)
	}
	return len(p), nil
}

func (t *tailBuffer) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return string(t.buf)
}

// lastLines returns the final n non-empty lines of s.
func lastLines(s string, n int) string {
	lines := bytes.Split(bytes.TrimSpace([]byte(s)), []byte("\n"))
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return string(bytes.Join(lines, []byte("\n")))
}

package image

import (
	"archive/tar"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"slices"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

const (
	whiteoutPrefix = ".wh."
	whiteoutOpaque = ".wh..wh..opq"
	xattrPAXPrefix = "SCHILY.xattr."
)

// applier unpacks tar layers, in order, into a directory, as an overlay
// filesystem would show them stacked: later layers replace earlier entries,
// whiteouts delete them and opaque markers hide a directory's lower content.
//
// Every path is resolved inside the root with openat2(RESOLVE_IN_ROOT), so
// a symlink in the image (absolute, or climbing with "..") can never make an
// entry land outside the tree; the last component is then created or removed
// relative to its parent's descriptor without following it.
type applier struct {
	root      int  // descriptor of the tree's root directory
	whiteouts bool // interpret .wh. entries (OCI layers; not plain tarballs)
	warn      func(string)

	dirTimes map[string]time.Time // set after all layers: writing children changes them

	// Per layer: what it wrote, so that an opaque marker, wherever it sits
	// in the archive, hides only lower layers' content.
	written   map[string]bool
	ancestors map[string]bool
	opaque    []string
}

func newApplier(root string, whiteouts bool, warn func(string)) (*applier, error) {
	fd, err := unix.Open(root, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", root, err)
	}
	if warn == nil {
		warn = func(string) {}
	}
	return &applier{
		root: fd, whiteouts: whiteouts, warn: warn,
		dirTimes: map[string]time.Time{},
	}, nil
}

func (a *applier) close() { unix.Close(a.root) }

// apply unpacks one tar stream (already decompressed).
func (a *applier) apply(ctx context.Context, r io.Reader) error {
	a.written = map[string]bool{}
	a.ancestors = map[string]bool{}
	a.opaque = nil
	tr := tar.NewReader(r)
	for n := 0; ; n++ {
		if n%256 == 0 {
			if err := ctx.Err(); err != nil {
				return err
			}
		}
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return corrupt("read layer: %w", err)
		}
		if err := a.entry(h, tr); err != nil {
			return fmt.Errorf("%s: %w", h.Name, err)
		}
	}
	// Hide lower content only now: the layer's own entries in an opaque
	// directory may come before or after the marker.
	for _, dir := range a.opaque {
		if err := a.clearExcept(dir); err != nil {
			return fmt.Errorf("opaque directory %s: %w", dir, err)
		}
	}
	// Read what follows the end-of-archive marker, so a verifying reader
	// underneath sees the whole blob.
	if _, err := io.Copy(io.Discard, r); err != nil {
		return corrupt("read layer: %w", err)
	}
	return nil
}

func (a *applier) markWritten(p string) {
	a.written[p] = true
	for q := path.Dir(p); q != "." && !a.ancestors[q]; q = path.Dir(q) {
		a.ancestors[q] = true
	}
}

func splitPath(p string) (dir, base string) {
	dir, base = path.Split(p)
	return strings.TrimSuffix(dir, "/"), base
}

func (a *applier) entry(h *tar.Header, tr *tar.Reader) error {
	name, err := cleanEntryName(h.Name)
	if err != nil {
		return err
	}
	if name == "" {
		if h.Typeflag == tar.TypeDir {
			return a.metadata(a.root, -1, "", h)
		}
		return nil
	}
	dir, base := splitPath(name)
	if a.whiteouts && strings.HasPrefix(base, whiteoutPrefix) {
		if base == whiteoutOpaque {
			a.opaque = append(a.opaque, dir)
			return nil
		}
		target := strings.TrimPrefix(base, whiteoutPrefix)
		// ".wh..." would whiteout "..": the root's parent, which os.RemoveAll
		// would empty. No entry has such a name; the layer is corrupt.
		if target == "" || target == "." || target == ".." {
			return corrupt("whiteout %s names no entry", name)
		}
		return a.remove(path.Join(dir, target))
	}
	switch h.Typeflag {
	case tar.TypeReg, tar.TypeRegA, tar.TypeDir, tar.TypeSymlink, tar.TypeLink,
		tar.TypeChar, tar.TypeBlock, tar.TypeFifo:
	case tar.TypeXGlobalHeader:
		return nil
	default:
		a.warn(fmt.Sprintf("skipping %s: unsupported tar entry type %q", name, h.Typeflag))
		return nil
	}

	var target string
	if h.Typeflag == tar.TypeLink {
		if target, err = cleanEntryName(h.Linkname); err != nil {
			return err
		}
		if target == "" {
			return corrupt("hard link to the root directory")
		}
		if target == name {
			return nil
		}
	}

	parent, err := a.openDir(dir, true)
	if err != nil {
		return err
	}
	defer unix.Close(parent)
	a.markWritten(name)

	// An existing entry is replaced, except that a directory over a
	// directory merges with it.
	var st unix.Stat_t
	err = unix.Fstatat(parent, base, &st, unix.AT_SYMLINK_NOFOLLOW)
	switch {
	case err == nil:
		isDir := st.Mode&unix.S_IFMT == unix.S_IFDIR
		if !isDir || h.Typeflag != tar.TypeDir {
			if err := removeAt(parent, base); err != nil {
				return err
			}
		}
	case !errors.Is(err, unix.ENOENT):
		return fmt.Errorf("stat: %w", err)
	}

	switch h.Typeflag {
	case tar.TypeReg, tar.TypeRegA:
		return a.regular(parent, base, h, tr)
	case tar.TypeDir:
		if err := unix.Mkdirat(parent, base, 0o700); err != nil && !errors.Is(err, unix.EEXIST) {
			return fmt.Errorf("mkdir: %w", err)
		}
		fd, err := unix.Openat(parent, base, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("open directory: %w", err)
		}
		defer unix.Close(fd)
		a.dirTimes[name] = h.ModTime
		return a.metadata(fd, parent, base, h)
	case tar.TypeSymlink:
		if err := unix.Symlinkat(h.Linkname, parent, base); err != nil {
			return fmt.Errorf("symlink: %w", err)
		}
		return a.metadata(-1, parent, base, h)
	case tar.TypeLink:
		tdir, tbase := splitPath(target)
		tparent, err := a.openDir(tdir, false)
		if err != nil {
			if errors.Is(err, unix.ENOENT) {
				return corrupt("hard link to missing %s", target)
			}
			return err
		}
		defer unix.Close(tparent)
		if err := unix.Linkat(tparent, tbase, parent, base, 0); err != nil {
			if errors.Is(err, unix.ENOENT) {
				return corrupt("hard link to missing %s", target)
			}
			return fmt.Errorf("link to %s: %w", target, err)
		}
		// A hard link shares its target's inode and metadata.
		return nil
	default: // character and block devices, FIFOs
		mode := uint32(unix.S_IFIFO)
		switch h.Typeflag {
		case tar.TypeChar:
			mode = unix.S_IFCHR
		case tar.TypeBlock:
			mode = unix.S_IFBLK
		}
		dev := unix.Mkdev(uint32(h.Devmajor), uint32(h.Devminor))
		if err := unix.Mknodat(parent, base, mode|0o600, int(dev)); err != nil {
			if errors.Is(err, unix.EPERM) {
				a.warn(fmt.Sprintf("skipping device node %s: not permitted", name))
				return nil
			}
			return fmt.Errorf("mknod: %w", err)
		}
		return a.metadata(-1, parent, base, h)
	}
}

// regular writes a file's content, leaving zero blocks as holes so large
// sparse files (lastlog and the like) cost no disk.
func (a *applier) regular(parent int, base string, h *tar.Header, tr io.Reader) error {
	fd, err := unix.Openat(parent, base, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return fmt.Errorf("create: %w", err)
	}
	f := os.NewFile(uintptr(fd), base)
	defer f.Close()
	w := newSparseWriter(f)
	if _, err := io.CopyN(w, readErrors{tr}, h.Size); err != nil {
		switch {
		case err == io.EOF:
			return corrupt("file content ends early")
		case isCorrupt(err):
			return err
		}
		return fmt.Errorf("write: %w", err)
	}
	if err := w.Close(); err != nil {
		return fmt.Errorf("write: %w", err)
	}
	return a.metadata(fd, parent, base, h)
}

// readErrors marks errors reading an archive as the image's fault, so they
// are told apart from errors writing the tree.
type readErrors struct{ r io.Reader }

func (r readErrors) Read(p []byte) (int, error) {
	n, err := r.r.Read(p)
	if err != nil && err != io.EOF {
		err = corrupt("read layer: %w", err)
	}
	return n, err
}

// metadata sets owner, mode, extended attributes and times. self is the
// entry's own descriptor when it has one (files, directories), else -1 and
// the entry is base in directory parent, never followed (symlinks, device
// nodes).
func (a *applier) metadata(self, parent int, base string, h *tar.Header) error {
	symlink := h.Typeflag == tar.TypeSymlink
	var err error
	if self >= 0 {
		err = unix.Fchown(self, h.Uid, h.Gid)
	} else {
		err = unix.Fchownat(parent, base, h.Uid, h.Gid, unix.AT_SYMLINK_NOFOLLOW)
	}
	if err != nil {
		return fmt.Errorf("chown: %w", err)
	}
	// After chown, which clears set-user-ID bits. Symlinks have no mode.
	mode := uint32(h.Mode) & 0o7777
	switch {
	case self >= 0:
		err = unix.Fchmod(self, mode)
	case !symlink:
		err = unix.Fchmodat(parent, base, mode, 0)
	}
	if err != nil {
		return fmt.Errorf("chmod: %w", err)
	}
	// After chown too, which clears security.capability.
	for k, v := range h.PAXRecords {
		attr, ok := strings.CutPrefix(k, xattrPAXPrefix)
		if !ok {
			continue
		}
		if self >= 0 {
			err = unix.Fsetxattr(self, attr, []byte(v), 0)
		} else {
			// No *at form exists for xattrs on Linux 6.1; the descriptor's
			// /proc link reaches the parent without resolving any path in
			// the tree, and lsetxattr does not follow the last component.
			err = unix.Lsetxattr("/proc/self/fd/"+strconv.Itoa(parent)+"/"+base, attr, []byte(v), 0)
		}
		if err != nil {
			a.warn(fmt.Sprintf("skipping xattr %s on %s: %v", attr, h.Name, err))
		}
	}
	if h.Typeflag == tar.TypeDir {
		return nil // set in finish, once nothing more is written inside
	}
	return setTimes(parent, base, h.ModTime, unix.AT_SYMLINK_NOFOLLOW)
}

func setTimes(fd int, name string, mtime time.Time, flags int) error {
	if mtime.IsZero() {
		return nil
	}
	ts := unix.NsecToTimespec(mtime.UnixNano())
	if err := unix.UtimesNanoAt(fd, name, []unix.Timespec{ts, ts}, flags); err != nil {
		return fmt.Errorf("set times: %w", err)
	}
	return nil
}

// openDir opens directory p (relative to the root) for use as a *at base,
// resolving symlinks as the guest would see them: inside the root. With
// create, missing directories are made (0755, root), as other unpackers do
// for archives that omit parent entries, including where a dangling
// symlink points.
func (a *applier) openDir(p string, create bool) (int, error) {
	return a.openDirDepth(p, create, 0)
}

func (a *applier) openDirDepth(p string, create bool, depth int) (int, error) {
	if depth > 40 {
		return -1, corrupt("too many levels of symbolic links at %s", p)
	}
	if p == "" {
		return unix.Openat(a.root, ".", unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	}
	fd, err := openInRoot(a.root, p, unix.O_PATH|unix.O_DIRECTORY)
	if errors.Is(err, unix.ENOENT) && create {
		dir, base := splitPath(p)
		parent, perr := a.openDirDepth(dir, true, depth)
		if perr != nil {
			return -1, perr
		}
		merr := unix.Mkdirat(parent, base, 0o755)
		var target string
		if errors.Is(merr, unix.EEXIST) {
			target, _ = readlinkAt(parent, base)
		}
		unix.Close(parent)
		switch {
		case target != "":
			// A dangling symlink: make the directory it names, inside the
			// root (".." stops at the root, as in RESOLVE_IN_ROOT).
			if !strings.HasPrefix(target, "/") {
				target = path.Join(dir, target)
			}
			return a.openDirDepth(strings.TrimPrefix(path.Clean("/"+target), "/"), true, depth+1)
		case merr != nil && !errors.Is(merr, unix.EEXIST):
			return -1, fmt.Errorf("mkdir %s: %w", p, merr)
		}
		fd, err = openInRoot(a.root, p, unix.O_PATH|unix.O_DIRECTORY)
	}
	if errors.Is(err, unix.ENOTDIR) {
		return -1, corrupt("%s is not a directory", p)
	}
	if err != nil {
		return -1, fmt.Errorf("open %s: %w", p, err)
	}
	return fd, nil
}

// readlinkAt returns the target of symlink base in dirfd, or "" if it is
// not one.
func readlinkAt(dirfd int, base string) (string, error) {
	buf := make([]byte, 4096)
	n, err := unix.Readlinkat(dirfd, base, buf)
	if err != nil {
		return "", err
	}
	return string(buf[:n]), nil
}

// openInRoot opens p below root with symlinks resolved inside root.
func openInRoot(root int, p string, flags uint64) (int, error) {
	how := unix.OpenHow{
		Flags:   flags | unix.O_CLOEXEC,
		Resolve: unix.RESOLVE_IN_ROOT | unix.RESOLVE_NO_MAGICLINKS,
	}
	for range 16 {
		fd, err := unix.Openat2(root, p, &how)
		// EAGAIN: a concurrent rename; nothing renames in our tree, but the
		// kernel may still ask for a retry.
		if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR) {
			continue
		}
		return fd, err
	}
	return -1, unix.EAGAIN
}

// remove deletes p (a whiteout). A missing entry is fine.
func (a *applier) remove(p string) error {
	dir, base := splitPath(p)
	parent, err := a.openDir(dir, false)
	if err != nil {
		if errors.Is(err, unix.ENOENT) || isCorrupt(err) {
			return nil
		}
		return err
	}
	defer unix.Close(parent)
	return removeAt(parent, base)
}

// removeAt deletes base in directory dirfd, recursively, without following
// base if it is a symlink.
func removeAt(dirfd int, base string) error {
	// Only a name within dirfd: "..", "." or a path would reach beyond it.
	if base == "" || base == "." || base == ".." || strings.Contains(base, "/") {
		return corrupt("remove %q: not a name in its directory", base)
	}
	if err := os.RemoveAll("/proc/self/fd/" + strconv.Itoa(dirfd) + "/" + base); err != nil {
		return fmt.Errorf("remove %s: %w", base, err)
	}
	return nil
}

// clearExcept removes what lower layers put in dir, keeping what this layer
// wrote there.
func (a *applier) clearExcept(dir string) error {
	var fd int
	var err error
	if dir == "" {
		fd, err = unix.Openat(a.root, ".", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	} else {
		fd, err = openInRoot(a.root, dir, unix.O_RDONLY|unix.O_DIRECTORY)
	}
	if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ENOTDIR) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("open: %w", err)
	}
	f := os.NewFile(uintptr(fd), dir)
	defer f.Close()
	names, err := f.Readdirnames(-1)
	if err != nil {
		return fmt.Errorf("list: %w", err)
	}
	for _, n := range names {
		p := path.Join(dir, n)
		if a.written[p] || a.ancestors[p] {
			var st unix.Stat_t
			if err := unix.Fstatat(fd, n, &st, unix.AT_SYMLINK_NOFOLLOW); err == nil && st.Mode&unix.S_IFMT == unix.S_IFDIR {
				if err := a.clearExcept(p); err != nil {
					return err
				}
			}
			continue
		}
		if err := removeAt(fd, n); err != nil {
			return err
		}
	}
	return nil
}

// finish sets directory times, deepest first, now that nothing more is
// written into them, and makes the directories a guest expects to mount on.
func (a *applier) finish() error {
	for _, d := range []struct {
		name string
		mode uint32
	}{{"dev", 0o755}, {"proc", 0o555}, {"sys", 0o555}, {"run", 0o755}, {"tmp", 0o1777}} {
		var st unix.Stat_t
		if err := unix.Fstatat(a.root, d.name, &st, unix.AT_SYMLINK_NOFOLLOW); err == nil {
			continue
		}
		if err := unix.Mkdirat(a.root, d.name, 0o700); err != nil {
			return fmt.Errorf("mkdir /%s: %w", d.name, err)
		}
		if err := unix.Fchmodat(a.root, d.name, d.mode, 0); err != nil {
			return fmt.Errorf("chmod /%s: %w", d.name, err)
		}
	}
	dirs := make([]string, 0, len(a.dirTimes))
	for d := range a.dirTimes {
		dirs = append(dirs, d)
	}
	slices.SortFunc(dirs, func(x, y string) int { return strings.Count(y, "/") - strings.Count(x, "/") })
	for _, d := range dirs {
		fd, err := openInRoot(a.root, d, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW)
		if err != nil {
			continue // removed or replaced by a later layer
		}
		err = setTimes(fd, ".", a.dirTimes[d], 0)
		unix.Close(fd)
		if err != nil {
			return fmt.Errorf("%s: %w", d, err)
		}
	}
	return nil
}

// hasShell reports whether /bin/sh resolves, inside the root, to an
// executable file: the agent runs every command through it.
func (a *applier) hasShell() bool {
	fd, err := openInRoot(a.root, "bin/sh", unix.O_PATH)
	if err != nil {
		return false
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return false
	}
	return st.Mode&unix.S_IFMT == unix.S_IFREG && st.Mode&0o111 != 0
}

package kernel

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/cavaliergopher/cpio"

	"github.com/smolvm/smolvm/internal/datadir"
)

// initramfsFormat is part of every cache key; bump it whenever the layout
// or content of the archive changes so stale archives are not reused.
const initramfsFormat = "smolvm-initramfs-1"

// Paths inside the initramfs that the guest agent relies on.
const (
	initPath         = "init"
	modulesOrderPath = "smolvm/modules.order"
	modulesPath      = "smolvm/modules"
)

// BuildInitramfs returns the path of an uncompressed newc cpio archive with
// the agent as /init and the modules of BaseModules (with their
// dependencies) under /smolvm/modules in load order. Archives are
// content-addressed under d.Initramfs(), so a second call with the same
// agent, kernel and modules returns the cached file without rebuilding.
func BuildInitramfs(ctx context.Context, d datadir.Dir, k *Kernel, agentPath string) (string, error) {
	p, _, err := buildInitramfs(ctx, d, k, agentPath)
	if err != nil {
		return "", fmt.Errorf("build initramfs for kernel %s: %w", k.Version, err)
	}
	return p, nil
}

// buildInitramfs returns the archive's path and the module files in it.
func buildInitramfs(ctx context.Context, d datadir.Dir, k *Kernel, agentPath string) (string, []string, error) {
	agent, err := os.ReadFile(agentPath)
	if err != nil {
		return "", nil, fmt.Errorf("read agent: %w", err)
	}
	if len(agent) == 0 {
		return "", nil, fmt.Errorf("agent %s is empty", agentPath)
	}
	mods, err := resolveModules(k.Modules, BaseModules(), optionalModule)
	if err != nil {
		return "", nil, err
	}
	key, err := initramfsKey(agent, k.Version, mods)
	if err != nil {
		return "", nil, err
	}
	dst := filepath.Join(d.Initramfs(), key+".cpio")
	if fi, err := os.Stat(dst); err == nil && fi.Mode().IsRegular() {
		return dst, mods, nil
	}
	if err := ctx.Err(); err != nil {
		return "", nil, err
	}

	for _, dir := range []string{d.Initramfs(), d.Tmp()} {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return "", nil, err
		}
	}
	f, err := os.CreateTemp(d.Tmp(), "initramfs-*.cpio")
	if err != nil {
		return "", nil, err
	}
	tmp := f.Name()
	err = writeInitramfs(ctx, f, agent, mods)
	if err == nil {
		// The archive is cached forever under its key, so it must not
		// survive a crash half-written.
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Chmod(tmp, 0o644)
	}
	if err == nil {
		err = os.Rename(tmp, dst)
	}
	if err != nil {
		_ = os.Remove(tmp)
		return "", nil, err
	}
	return dst, mods, nil
}

// initramfsKey hashes everything the archive is made of. Modules are hashed
// by content, not just by the kernel version, because a kernel of the same
// version can be rebuilt and re-imported.
func initramfsKey(agent []byte, version string, mods []string) (string, error) {
	h := sha256.New()
	field := func(h hash.Hash, b []byte) {
		var n [8]byte
		binary.BigEndian.PutUint64(n[:], uint64(len(b)))
		h.Write(n[:])
		h.Write(b)
	}
	field(h, []byte(initramfsFormat))
	field(h, agent)
	field(h, []byte(version))
	for _, m := range mods {
		f, err := os.Open(m)
		if err != nil {
			return "", err
		}
		mh := sha256.New()
		_, err = io.Copy(mh, f)
		f.Close()
		if err != nil {
			return "", fmt.Errorf("hash module %s: %w", m, err)
		}
		field(h, []byte(moduleFileName(m)))
		field(h, mh.Sum(nil))
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

func writeInitramfs(ctx context.Context, out io.Writer, agent []byte, mods []string) error {
	bw := bufio.NewWriterSize(out, 1<<20)
	w := cpio.NewWriter(bw)
	ino := int64(0)
	next := func() int64 { ino++; return ino }

	for _, dir := range []string{"dev", "proc", "sys", "newroot", "smolvm", modulesPath} {
		if err := w.WriteHeader(&cpio.Header{Name: dir, Mode: cpio.TypeDir | 0o755, Links: 2, Inode: next()}); err != nil {
			return err
		}
	}
	// The kernel opens /dev/console before running /init; without it the
	// agent starts with no stdin, stdout or stderr. cavaliergopher/cpio
	// cannot record device numbers, so this one header is written directly.
	if err := w.Flush(); err != nil {
		return err
	}
	if err := writeNewcDevice(bw, "dev/console", cpio.TypeChar|0o600, 5, 1, next()); err != nil {
		return err
	}

	if err := writeCpioFile(w, initPath, 0o755, agent, next()); err != nil {
		return err
	}
	var order strings.Builder
	for _, m := range mods {
		if err := ctx.Err(); err != nil {
			return err
		}
		data, err := readModule(m)
		if err != nil {
			return err
		}
		name := moduleFileName(m)
		if err := writeCpioFile(w, modulesPath+"/"+name, 0o644, data, next()); err != nil {
			return err
		}
		order.WriteString(name + "\n")
	}
	if err := writeCpioFile(w, modulesOrderPath, 0o644, []byte(order.String()), next()); err != nil {
		return err
	}
	if err := w.Close(); err != nil {
		return err
	}
	return bw.Flush()
}

func writeCpioFile(w *cpio.Writer, name string, perm cpio.FileMode, data []byte, ino int64) error {
	if err := w.WriteHeader(&cpio.Header{Name: name, Mode: cpio.TypeReg | perm, Size: int64(len(data)), Links: 1, Inode: ino}); err != nil {
		return fmt.Errorf("write %s: %w", name, err)
	}
	if _, err := w.Write(data); err != nil {
		return fmt.Errorf("write %s: %w", name, err)
	}
	return nil
}

// writeNewcDevice writes a newc header for a device node, which has no data.
// Every newc header starts 4-byte aligned, and name padding keeps the next
// one aligned.
func writeNewcDevice(w io.Writer, name string, mode cpio.FileMode, major, minor uint32, ino int64) error {
	if len(name) == 0 || strings.ContainsRune(name, 0) {
		return errors.New("invalid cpio name")
	}
	fields := []uint64{
		uint64(ino),           // c_ino
		uint64(mode),          // c_mode
		0,                     // c_uid
		0,                     // c_gid
		1,                     // c_nlink
		0,                     // c_mtime
		0,                     // c_filesize
		0,                     // c_devmajor
		0,                     // c_devminor
		uint64(major),         // c_rdevmajor
		uint64(minor),         // c_rdevminor
		uint64(len(name) + 1), // c_namesize
		0,                     // c_check
	}
	var b strings.Builder
	b.WriteString("070701")
	for _, f := range fields {
		fmt.Fprintf(&b, "%08X", f)
	}
	b.WriteString(name)
	b.WriteByte(0)
	for b.Len()%4 != 0 {
		b.WriteByte(0)
	}
	_, err := io.WriteString(w, b.String())
	return err
}

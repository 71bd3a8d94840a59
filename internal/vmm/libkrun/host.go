package libkrun

import (
	"bufio"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
)

// Library names libkrun is installed under: the soname first, as the
// helper's own dlopen search tries them.
var libraryNames = []string{"libkrun.so.1", "libkrun.so"}

// library finds libkrun's shared library. The helper is given its path,
// so the library Identity hashes is the one that runs.
func (d *Driver) library() (string, error) {
	if p := d.opts.Library; p != "" {
		if st, err := os.Stat(p); err != nil || !st.Mode().IsRegular() {
			return "", fmt.Errorf("libkrun library %s: not a file", p)
		}
		return filepath.Abs(p)
	}
	for _, dir := range libraryDirs() {
		for _, name := range libraryNames {
			p := filepath.Join(dir, name)
			if st, err := os.Stat(p); err == nil && st.Mode().IsRegular() {
				return p, nil
			}
		}
	}
	return "", errors.New("libkrun not found (no libkrun.so.1 where the dynamic loader looks): install it (Debian and Ubuntu: libkrun1; Fedora: libkrun) or name its path")
}

// libraryDirs are where the dynamic loader looks for a library named
// without a path, as ld.so(8) orders them: $LD_LIBRARY_PATH, the
// directories /etc/ld.so.conf lists (its cache is made from them), then
// the default ones.
func libraryDirs() []string {
	var dirs []string
	for _, d := range filepath.SplitList(os.Getenv("LD_LIBRARY_PATH")) {
		if d != "" {
			dirs = append(dirs, d)
		}
	}
	dirs = append(dirs, ldSoConf("/etc/ld.so.conf", 0)...)
	return append(dirs,
		"/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu",
		"/lib64", "/usr/lib64", "/lib", "/usr/lib",
		"/usr/local/lib64", "/usr/local/lib")
}

// ldSoConf reads the directories of an ld.so.conf, following its include
// lines (globs) a few levels deep.
func ldSoConf(path string, depth int) []string {
	f, err := os.Open(path)
	if err != nil || depth > 4 {
		return nil
	}
	defer f.Close()
	var dirs []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line, _, _ := strings.Cut(sc.Text(), "#")
		line = strings.TrimSpace(line)
		if pattern, ok := strings.CutPrefix(line, "include"); ok && (pattern == "" || pattern[0] == ' ' || pattern[0] == '\t') {
			pattern = strings.TrimSpace(pattern)
			if !filepath.IsAbs(pattern) {
				pattern = filepath.Join(filepath.Dir(path), pattern)
			}
			matches, _ := filepath.Glob(pattern)
			for _, m := range matches {
				dirs = append(dirs, ldSoConf(m, depth+1)...)
			}
			continue
		}
		if filepath.IsAbs(line) {
			dirs = append(dirs, line)
		}
	}
	return dirs
}

// versionSuffix is the version a library's real file name carries,
// libkrun.so.1.15.2.
var versionSuffix = regexp.MustCompile(`\.so\.([0-9]+(\.[0-9]+)*)$`)

// libraryIdentity names the library at path by its version, from the name
// of the file its links end at, and a hash of its contents, which tells
// two builds of one version apart.
func libraryIdentity(path string) (string, error) {
	real, err := filepath.EvalSymlinks(path)
	if err != nil {
		return "", fmt.Errorf("libkrun identity: %w", err)
	}
	f, err := os.Open(real)
	if err != nil {
		return "", fmt.Errorf("libkrun identity: %w", err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", fmt.Errorf("libkrun identity: hash %s: %w", real, err)
	}
	sum := hex.EncodeToString(h.Sum(nil))[:16]
	version := real
	if m := versionSuffix.FindStringSubmatch(filepath.Base(real)); m != nil && strings.Contains(m[1], ".") {
		version = m[1]
	}
	return "libkrun " + version + " (sha256 " + sum + ")", nil
}

// KVM's ioctls and the API version every KVM since Linux 2.6.22 answers.
const (
	kvmGetAPIVersion = 0xAE00
	kvmAPIVersion    = 12
)

// kvmUsable says why libkrun could not run VMs here, if it could not:
// /dev/kvm must open read-write and answer, and the CPU must have hardware
// virtualisation (a nested guest without it has a /dev/kvm that runs
// guests a thousand times slower).
func kvmUsable() error {
	f, err := os.OpenFile("/dev/kvm", os.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("/dev/kvm is not usable (%v): libkrun needs KVM", err)
	}
	defer f.Close()
	v, err := unix.IoctlRetInt(int(f.Fd()), kvmGetAPIVersion)
	if err != nil || v != kvmAPIVersion {
		return fmt.Errorf("/dev/kvm answers API version %d (%v), not %d: libkrun needs KVM", v, err, kvmAPIVersion)
	}
	if !cpuVirt() {
		return errors.New("the CPU lists neither vmx nor svm (a nested guest without hardware virtualisation): libkrun needs KVM")
	}
	return nil
}

// cpuVirt reports whether /proc/cpuinfo lists vmx (Intel VT-x) or svm
// (AMD-V); it does not change while smolvm runs.
var cpuVirt = sync.OnceValue(func() bool {
	f, err := os.Open("/proc/cpuinfo")
	if err != nil {
		return false
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if !ok || strings.TrimSpace(k) != "flags" {
			continue
		}
		for _, flag := range strings.Fields(v) {
			if flag == "vmx" || flag == "svm" {
				return true
			}
		}
		return false // every CPU lists the same flags
	}
	return false
})

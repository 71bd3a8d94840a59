// Package doctor inspects the host for what smolvm needs (QEMU, filesystem
// tools, a guest kernel, the default image, an accelerator, a writable data
// directory) and says how to fix what is missing.
package doctor

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/smolvm/smolvm/internal/cgroup"
	"github.com/smolvm/smolvm/internal/datadir"
	"github.com/smolvm/smolvm/internal/image"
	"github.com/smolvm/smolvm/internal/kernel"
)

// Check statuses.
const (
	StatusOK      = "ok"
	StatusMissing = "missing" // smolvm cannot work until it is fixed
	StatusWarn    = "warn"    // works, but slower or built later on demand
)

// Check is the result of one inspection.
type Check struct {
	Name   string `json:"name"`
	Status string `json:"status"` // "ok" | "missing" | "warn"
	Detail string `json:"detail"`
	Fix    string `json:"fix,omitempty"` // a command to run, for anything not ok
}

// Tool is a host program smolvm runs, with the Debian package that ships it.
type Tool struct {
	Name     string
	Package  string
	Optional bool   // only used for diagnostics
	Purpose  string // why smolvm needs it
}

// Tools lists the host programs smolvm uses.
func Tools() []Tool {
	return []Tool{
		{Name: "qemu-system-x86_64", Package: "qemu-system-x86", Purpose: "runs the sandbox VMs"},
		{Name: "qemu-img", Package: "qemu-utils", Purpose: "creates per-sandbox disk overlays"},
		{Name: "mkfs.ext4", Package: "e2fsprogs", Purpose: "packs root filesystems into images"},
		{Name: "debugfs", Package: "e2fsprogs", Optional: true, Purpose: "inspects images"},
		{Name: "debootstrap", Package: "debootstrap", Purpose: "builds the default Debian image"},
	}
}

// MissingPackages returns the Debian packages providing required tools that
// are not installed, without duplicates.
func MissingPackages() []string {
	var pkgs []string
	for _, t := range Tools() {
		if t.Optional {
			continue
		}
		if _, err := image.LookTool(t.Name, t.Package); err != nil && !slices.Contains(pkgs, t.Package) {
			pkgs = append(pkgs, t.Package)
		}
	}
	return pkgs
}

// qbootPath is the minimal firmware Debian's qemu-system-data ships; it boots
// faster than SeaBIOS.
const qbootPath = "/usr/share/qemu/qboot.rom"

// Run inspects the host and the data directory d. located gives the path
// of a helper (by name) that a caller was configured with, which wins over
// the usual places.
func Run(ctx context.Context, d datadir.Dir, located ...map[string]string) []Check {
	imageCheck, imageBuilt := checkImage(d)
	var checks []Check
	for _, t := range Tools() {
		checks = append(checks, checkTool(ctx, t, imageBuilt))
	}
	for _, h := range Helpers {
		override := ""
		for _, l := range located {
			if p := l[h.Name]; p != "" {
				override = p
			}
		}
		checks = append(checks, checkHelper(h, override))
	}
	checks = append(checks, checkQboot(qbootPath))
	checks = append(checks, checkAccelerator())
	_, cgErr := cgroup.Detect(cgroup.Root)
	jail := ""
	for _, l := range located {
		if p := l[Jail.Name]; p != "" {
			jail = p
		}
	}
	checks = append(checks, jailCheck(os.Geteuid(), cgErr, Jail.Locate(jail) != ""))
	checks = append(checks, checkKernel(d))
	checks = append(checks, imageCheck)
	checks = append(checks, checkDataDir(d))
	return checks
}

// AnyMissing reports whether a check says smolvm cannot work.
func AnyMissing(checks []Check) bool {
	for _, c := range checks {
		if c.Status == StatusMissing {
			return true
		}
	}
	return false
}

func checkTool(ctx context.Context, t Tool, imageBuilt bool) Check {
	c := Check{Name: t.Name}
	path, err := image.LookTool(t.Name, t.Package)
	if err != nil {
		c.Status = StatusMissing
		c.Detail = "not found; " + t.Purpose
		c.Fix = aptInstall(t.Package)
		switch {
		case t.Optional:
			c.Status = StatusWarn
			c.Detail = "not found (optional); " + t.Purpose
		case t.Name == "debootstrap" && imageBuilt:
			// Only needed to build the image again.
			c.Status = StatusWarn
			c.Detail = "not found; only needed to rebuild the default image"
		}
		return c
	}
	c.Status = StatusOK
	c.Detail = path
	if strings.HasPrefix(t.Name, "qemu") {
		v, err := toolVersion(ctx, path)
		if err != nil {
			c.Status = StatusMissing
			c.Detail = fmt.Sprintf("%s does not run: %v", path, err)
			c.Fix = aptInstall("--reinstall " + t.Package)
			return c
		}
		c.Detail = v + " (" + path + ")"
	}
	return c
}

// toolVersion returns the first line of `path --version`.
func toolVersion(ctx context.Context, path string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, path, "--version").Output()
	if err != nil {
		return "", err
	}
	line, _, _ := strings.Cut(strings.TrimSpace(string(out)), "\n")
	return strings.TrimSpace(line), nil
}

func checkQboot(path string) Check {
	if st, err := os.Stat(path); err == nil && st.Mode().IsRegular() {
		return Check{Name: "qboot.rom", Status: StatusOK, Detail: path}
	}
	return Check{Name: "qboot.rom", Status: StatusWarn,
		Detail: path + " not found: VMs boot with SeaBIOS, about 0.5 s slower",
		Fix:    aptInstall("qemu-system-data")}
}

func checkKernel(d datadir.Dir) Check {
	c := Check{Name: "kernel"}
	k, err := kernel.Default(d)
	if err != nil {
		c.Status = StatusMissing
		c.Detail = err.Error()
		if errors.Is(err, kernel.ErrNoKernel) {
			c.Detail = "no guest kernel imported in " + d.Kernels()
		}
		c.Fix = "smolvm setup"
		return c
	}
	c.Status = StatusOK
	c.Detail = fmt.Sprintf("%s (%s)", k.Version, k.Vmlinux)
	return c
}

// checkImage also reports whether the image is built, which decides how
// much a missing debootstrap matters.
func checkImage(d datadir.Dir) (Check, bool) {
	c := Check{Name: "image"}
	b, err := image.Cached(d)
	if err != nil {
		c.Status = StatusWarn
		c.Detail = "default image not built yet; built on first use (about a minute)"
		if !errors.Is(err, image.ErrNotBuilt) {
			c.Detail = err.Error()
		}
		c.Fix = "smolvm setup"
		return c, false
	}
	c.Status = StatusOK
	c.Detail = fmt.Sprintf("%s, %d MiB, %s (%s)", b.Name, b.SizeBytes>>20, shortDigest(b.Digest), b.Path)
	return c, true
}

func shortDigest(d string) string {
	if len(d) > len("sha256:")+12 {
		return d[:len("sha256:")+12]
	}
	return d
}

// checkDataDir verifies smolvm can write its state. A directory that does
// not exist yet is fine if it can be created.
func checkDataDir(d datadir.Dir) Check {
	c := Check{Name: "data dir"}
	p := d.Path()
	if p == "" {
		return Check{Name: "data dir", Status: StatusMissing, Detail: "no data directory",
			Fix: "export SMOLVM_DATA_DIR=$HOME/.local/share/smolvm"}
	}
	probe := p
	for {
		st, err := os.Stat(probe)
		if err == nil {
			if !st.IsDir() {
				c.Status = StatusMissing
				c.Detail = probe + " is not a directory"
				c.Fix = "export SMOLVM_DATA_DIR=<a writable directory>"
				return c
			}
			break
		}
		parent := filepath.Dir(probe)
		if parent == probe {
			break
		}
		probe = parent
	}
	f, err := os.CreateTemp(probe, ".smolvm-doctor-*")
	if err != nil {
		c.Status = StatusMissing
		c.Detail = fmt.Sprintf("%s is not writable: %v", probe, err)
		c.Fix = fmt.Sprintf("sudo mkdir -p %s && sudo chown -R $(id -u):$(id -g) %s", p, p)
		return c
	}
	f.Close()
	os.Remove(f.Name())
	c.Status = StatusOK
	c.Detail = p
	if probe != p {
		c.Detail += " (will be created)"
	}
	return c
}

// Accelerator chooses how QEMU runs guests: ("kvm" or "tcg", reason). KVM
// only when /dev/kvm opens read-write and the CPU advertises vmx or svm;
// where KVM exists without them (a nested guest without hardware
// virtualisation) it runs guests about 1000 times slower than TCG.
// $SMOLVM_ACCEL=kvm|tcg overrides the choice.
func Accelerator() (string, string) {
	accel, reason, _ := chooseAccelerator(os.Getenv("SMOLVM_ACCEL"), readCPUInfo(), kvmUsable())
	return accel, reason
}

func readCPUInfo() string {
	b, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return ""
	}
	return string(b)
}

// kvmUsable opens /dev/kvm the way QEMU does; nil means it can.
func kvmUsable() error {
	f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0)
	if err != nil {
		return err
	}
	return f.Close()
}

// chooseAccelerator is the accelerator rule as a pure function of the
// override, /proc/cpuinfo's text and the result of opening /dev/kvm
// read-write. problem is set when the override is invalid or forces KVM on a
// host where it cannot work.
func chooseAccelerator(override, cpuinfo string, kvmErr error) (accel, reason, problem string) {
	hw := cpuHasVirt(cpuinfo)
	switch override {
	case "kvm":
		if kvmErr != nil {
			problem = fmt.Sprintf("SMOLVM_ACCEL=kvm but /dev/kvm is not usable (%v)", kvmErr)
		}
		return "kvm", "forced by SMOLVM_ACCEL=kvm", problem
	case "tcg":
		return "tcg", "forced by SMOLVM_ACCEL=tcg", ""
	case "":
	default:
		problem = fmt.Sprintf("SMOLVM_ACCEL=%q ignored (want kvm or tcg)", override)
	}
	switch {
	case kvmErr != nil:
		reason = fmt.Sprintf("/dev/kvm is not usable (%v)", kvmErr)
	case !hw:
		reason = "/dev/kvm opens but the CPU lists neither vmx nor svm (a nested guest: KVM would run guests about 1000x slower than TCG)"
	default:
		return "kvm", "/dev/kvm is read-write and the CPU has hardware virtualisation", problem
	}
	return "tcg", reason, problem
}

// cpuHasVirt reports whether any "flags" line of /proc/cpuinfo lists vmx
// (Intel VT-x) or svm (AMD-V).
func cpuHasVirt(cpuinfo string) bool {
	sc := bufio.NewScanner(strings.NewReader(cpuinfo))
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if !ok || strings.TrimSpace(k) != "flags" {
			continue
		}
		for _, f := range strings.Fields(v) {
			if f == "vmx" || f == "svm" {
				return true
			}
		}
	}
	return false
}

func checkAccelerator() Check {
	accel, reason, problem := chooseAccelerator(os.Getenv("SMOLVM_ACCEL"), readCPUInfo(), kvmUsable())
	return acceleratorCheck(accel, reason, problem)
}

func acceleratorCheck(accel, reason, problem string) Check {
	c := Check{Name: "accelerator", Status: StatusOK}
	if accel == "kvm" {
		c.Detail = "kvm: " + reason
	} else {
		c.Detail = "tcg (software emulation; slower): " + reason
	}
	if problem != "" {
		c.Status = StatusWarn
		c.Detail = problem + "; using " + c.Detail
		c.Fix = "unset SMOLVM_ACCEL"
	}
	return c
}

// jailCheck says how each VMM is confined for a server running as euid,
// on a host whose control groups Detect judged (cgErr), with or without
// the launcher (smolvm-net) that starts a jailed QEMU.
func jailCheck(euid int, cgErr error, launcher bool) Check {
	c := Check{Name: "jail", Status: StatusOK,
		Detail: "no QEMU runs as root: each starts as a user of its own, with no capabilities, in a root of its own holding /usr and its own files, under its seccomp filter (set*id calls refused), in a control group that bounds its memory, tasks, CPU share and disk bandwidth"}
	switch {
	case euid != 0:
		c.Status = StatusWarn
		c.Detail = "not root: each QEMU runs as this user under its seccomp filter, without a user, root or control group of its own"
		c.Fix = "run the server as root (sudo) for the full jail"
	case !launcher:
		c.Status = StatusWarn
		c.Detail = "smolvm-jail is missing: each QEMU starts as root and drops root itself (-runas, -chroot to its sandbox directory), and its filter allows set*id calls; Firecracker cannot start"
		c.Fix = "build smolvm-jail beside smolvm (scripts/setup.sh)"
	case cgErr != nil:
		c.Status = StatusWarn
		c.Detail = "each QEMU runs as a user of its own in a root of its own, under its seccomp filter, but without limits: " + cgErr.Error()
		c.Fix = "mount cgroup v2 with the memory, pids and cpu controllers (or v1 hierarchies for them)"
	}
	return c
}

// aptInstall is the command that installs pkg, with sudo for non-root users.
func aptInstall(pkg string) string {
	cmd := "apt-get install -y " + pkg
	if os.Geteuid() != 0 {
		cmd = "sudo " + cmd
	}
	return cmd
}

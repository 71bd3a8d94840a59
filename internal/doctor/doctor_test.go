package doctor

import (
	"context"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/smolvm/smolvm/internal/datadir"
)

const (
	cpuinfoNested = "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu vme de pse tsc msr hypervisor lahf_lm\n\nprocessor\t: 1\nflags\t\t: fpu vme hypervisor\n"
	cpuinfoVMX    = "processor\t: 0\nflags\t\t: fpu vme vmx ept hypervisor\n"
	cpuinfoSVM    = "processor\t: 0\nflags\t\t: fpu svm npt\n"
	// A flag whose name only contains "vmx" must not count.
	cpuinfoLookalike = "processor\t: 0\nflags\t\t: fpu vmx_like\nvmx flags\t: vnmi preemption_timer\n"
)

func TestChooseAccelerator(t *testing.T) {
	noKVM := &fs.PathError{Op: "open", Path: "/dev/kvm", Err: fs.ErrNotExist}
	denied := &fs.PathError{Op: "open", Path: "/dev/kvm", Err: fs.ErrPermission}
	cases := []struct {
		name     string
		override string
		cpuinfo  string
		kvmErr   error
		want     string
		problem  bool
	}{
		{"kvm rw and vmx", "", cpuinfoVMX, nil, "kvm", false},
		{"kvm rw and svm", "", cpuinfoSVM, nil, "kvm", false},
		{"kvm rw, nested without vmx (this CI)", "", cpuinfoNested, nil, "tcg", false},
		{"lookalike flags", "", cpuinfoLookalike, nil, "tcg", false},
		{"no /dev/kvm", "", cpuinfoVMX, noKVM, "tcg", false},
		{"/dev/kvm not writable", "", cpuinfoVMX, denied, "tcg", false},
		{"empty cpuinfo", "", "", nil, "tcg", false},
		{"forced tcg on a kvm host", "tcg", cpuinfoVMX, nil, "tcg", false},
		{"forced kvm without vmx", "kvm", cpuinfoNested, nil, "kvm", false},
		{"forced kvm without /dev/kvm", "kvm", cpuinfoVMX, noKVM, "kvm", true},
		{"bad override falls back to the rule", "fast", cpuinfoVMX, nil, "kvm", true},
		{"bad override, no kvm", "KVM", cpuinfoNested, nil, "tcg", true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			accel, reason, problem := chooseAccelerator(c.override, c.cpuinfo, c.kvmErr)
			if accel != c.want {
				t.Errorf("accel = %s (%s), want %s", accel, reason, c.want)
			}
			if reason == "" {
				t.Error("no reason given")
			}
			if (problem != "") != c.problem {
				t.Errorf("problem = %q, want problem %v", problem, c.problem)
			}
			check := acceleratorCheck(accel, reason, problem)
			if c.problem && (check.Status != StatusWarn || check.Fix == "") {
				t.Errorf("check %+v, want warn with a fix", check)
			}
			if !c.problem && check.Status != StatusOK {
				t.Errorf("check %+v, want ok", check)
			}
			if accel == "tcg" && !strings.Contains(check.Detail, "tcg (software emulation; slower)") {
				t.Errorf("detail %q", check.Detail)
			}
		})
	}
}

func TestAcceleratorOnThisHost(t *testing.T) {
	t.Setenv("SMOLVM_ACCEL", "tcg")
	if accel, _ := Accelerator(); accel != "tcg" {
		t.Errorf("SMOLVM_ACCEL=tcg gave %s", accel)
	}
	t.Setenv("SMOLVM_ACCEL", "")
	accel, reason := Accelerator()
	t.Logf("accelerator here: %s (%s)", accel, reason)
	if accel != "kvm" && accel != "tcg" {
		t.Errorf("accel = %q", accel)
	}
}

func TestRunOnEmptyDataDir(t *testing.T) {
	d := datadir.Dir(filepath.Join(t.TempDir(), "data"))
	checks := Run(context.Background(), d)
	byName := map[string]Check{}
	for _, c := range checks {
		if c.Status != StatusOK && c.Status != StatusMissing && c.Status != StatusWarn {
			t.Errorf("%s: bad status %q", c.Name, c.Status)
		}
		if c.Status != StatusOK && c.Fix == "" {
			t.Errorf("%s is %s without a fix", c.Name, c.Status)
		}
		byName[c.Name] = c
	}
	for _, name := range []string{"qemu-system-x86_64", "qemu-img", "mkfs.ext4", "debugfs", "debootstrap", "qboot.rom", "accelerator", "kernel", "image", "data dir"} {
		if _, ok := byName[name]; !ok {
			t.Errorf("no %s check", name)
		}
	}
	k := byName["kernel"]
	if k.Status != StatusMissing || !strings.Contains(k.Fix, "smolvm setup") {
		t.Errorf("kernel check %+v, want missing with fix `smolvm setup`", k)
	}
	img := byName["image"]
	if img.Status != StatusWarn || img.Fix != "smolvm setup" {
		t.Errorf("image check %+v, want warn with fix `smolvm setup`", img)
	}
	if dd := byName["data dir"]; dd.Status != StatusOK || !strings.Contains(dd.Detail, "will be created") {
		t.Errorf("data dir check %+v", dd)
	}
	if _, err := os.Stat(d.Path()); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("doctor created the data dir: %v", err)
	}
	if !AnyMissing(checks) {
		t.Error("AnyMissing = false with no kernel")
	}
	for _, c := range checks {
		t.Logf("%-20s %-8s %s | %s", c.Name, c.Status, c.Detail, c.Fix)
	}
}

func TestDataDirNotWritable(t *testing.T) {
	file := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(file, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	c := checkDataDir(datadir.Dir(filepath.Join(file, "data")))
	if c.Status != StatusMissing || c.Fix == "" {
		t.Errorf("data dir under a file: %+v", c)
	}
}

func TestMissingToolHasInstallFix(t *testing.T) {
	c := checkTool(context.Background(), Tool{Name: "smolvm-no-such-tool", Package: "some-pkg"}, false)
	if c.Status != StatusMissing || !strings.Contains(c.Fix, "apt-get install -y some-pkg") {
		t.Errorf("%+v", c)
	}
	c = checkTool(context.Background(), Tool{Name: "debootstrap-not-here", Package: "debootstrap"}, true)
	if c.Status != StatusMissing {
		t.Errorf("%+v", c)
	}
	c = checkTool(context.Background(), Tool{Name: "smolvm-no-such-tool", Package: "x", Optional: true}, false)
	if c.Status != StatusWarn || c.Fix == "" {
		t.Errorf("optional tool: %+v", c)
	}
}

func TestJailCheck(t *testing.T) {
	if c := jailCheck(0, nil, true); c.Status != StatusOK || !strings.Contains(c.Detail, "root of its own") || !strings.Contains(c.Detail, "control group") {
		t.Errorf("as root: %+v", c)
	}
	if c := jailCheck(0, nil, false); c.Status != StatusWarn || !strings.Contains(c.Detail, "smolvm-jail") || c.Fix == "" {
		t.Errorf("jail without the launcher: %+v", c)
	}
	if c := jailCheck(1000, nil, true); c.Status != StatusWarn || c.Fix == "" || !strings.Contains(c.Detail, "seccomp") {
		t.Errorf("as a user: %+v", c)
	}
	if c := jailCheck(0, errors.New("no cgroups here"), true); c.Status != StatusWarn || !strings.Contains(c.Detail, "no cgroups here") || c.Fix == "" {
		t.Errorf("as root without cgroups: %+v", c)
	}
}

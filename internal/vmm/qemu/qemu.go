// Package qemu runs sandboxes under QEMU: q35 with direct PVH boot of an
// uncompressed vmlinux, a qcow2 overlay per sandbox, and the agent on a
// virtio-serial port.
package qemu

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/smolvm/smolvm/internal/agent/wire"
	"github.com/smolvm/smolvm/internal/vmm"
)

const (
	qemuBinary = "qemu-system-x86_64"
	imgBinary  = "qemu-img"
	// qboot is a minimal firmware that skips SeaBIOS's device probing,
	// saving about half a second per boot; SeaBIOS remains the fallback.
	qbootROM = "/usr/share/qemu/qboot.rom"
	// maxSocketPath is sun_path's size less its terminating NUL.
	maxSocketPath = 107
)

// Driver is the QEMU backend.
type Driver struct{}

// New returns the QEMU driver.
func New() *Driver { return &Driver{} }

func (d *Driver) Name() string { return "qemu" }

func (d *Driver) Available() error {
	for _, bin := range []string{qemuBinary, imgBinary} {
		if _, err := exec.LookPath(bin); err != nil {
			pkg := "qemu-system-x86"
			if bin == imgBinary {
				pkg = "qemu-utils"
			}
			return fmt.Errorf("%s not found: install it with `apt-get install %s` or run `smolvm setup`", bin, pkg)
		}
	}
	return nil
}

func paths(dir string) vmm.Instance {
	return vmm.Instance{
		AgentSocket: filepath.Join(dir, "agent.sock"),
		QMPSocket:   filepath.Join(dir, "qmp.sock"),
		Console:     filepath.Join(dir, "console.log"),
		Disk:        filepath.Join(dir, "disk.qcow2"),
	}
}

func (d *Driver) CreateDisk(ctx context.Context, spec vmm.Spec) error {
	base, err := filepath.Abs(spec.BaseImage)
	if err != nil {
		return err
	}
	format := "raw"
	if strings.HasSuffix(base, ".qcow2") {
		format = "qcow2" // a template's frozen disk
	}
	disk := paths(spec.Dir).Disk
	out, err := exec.CommandContext(ctx, imgBinary, "create", "-q", "-f", "qcow2",
		"-F", format, "-b", base, disk, strconv.Itoa(spec.DiskMiB)+"M").CombinedOutput()
	if err != nil {
		return fmt.Errorf("create disk overlay: %v: %s", err, bytes.TrimSpace(out))
	}
	return nil
}

// machineArgs is the VM itself: machine, accelerator, CPU, memory, firmware
// and kernel. Args and ProbeArgs share it so the baseline boots exactly the
// VM that sandboxes do.
func machineArgs(spec vmm.Spec) []string {
	args := []string{
		"-nodefaults", "-no-user-config", "-display", "none",
		"-m", strconv.Itoa(spec.MemoryMiB),
		"-smp", strconv.Itoa(spec.VCPUs),
	}
	if spec.Accel == "kvm" {
		args = append(args, "-machine", "q35", "-accel", "kvm", "-cpu", "host")
	} else {
		tcg := "tcg"
		if spec.VCPUs > 1 {
			tcg += ",thread=multi"
		}
		args = append(args, "-machine", "q35", "-accel", tcg, "-cpu", "max")
	}
	// vmgenid would be wanted for clones, but qboot hangs with it.
	if _, err := os.Stat(qbootROM); err == nil {
		args = append(args, "-bios", qbootROM)
	}
	return append(args,
		"-kernel", spec.Kernel,
		"-initrd", spec.Initrd,
		"-append", spec.Cmdline,
		// A guest that powers off or panics ends the process, so a dead
		// guest is never mistaken for a running one.
		"-no-reboot",
	)
}

// Args builds the QEMU command line for a sandbox.
func Args(spec vmm.Spec) []string {
	p := paths(spec.Dir)
	args := append([]string{"-name", spec.ID + ",process=smolvm-" + spec.ID}, machineArgs(spec)...)
	if spec.NetSocket != "" {
		// The other end is smolvm's own network stack, not QEMU's slirp,
		// which could not keep the guest from the host's loopback. No
		// option ROM: nothing boots from the network.
		args = append(args,
			"-netdev", "stream,id=net0,server=off,addr.type=unix,addr.path="+spec.NetSocket,
			"-device", "virtio-net-pci,netdev=net0,romfile=,mac="+spec.NetMAC)
	}
	return append(args,
		"-drive", "file="+p.Disk+",if=none,id=root,format=qcow2,discard=unmap",
		"-device", "virtio-blk-pci,drive=root",
		"-device", "virtio-serial-pci,id=vser",
		"-chardev", "socket,id=agent,path="+p.AgentSocket+",server=on,wait=off",
		"-device", "virtserialport,bus=vser.0,chardev=agent,name="+wire.PortName,
		"-qmp", "unix:"+p.QMPSocket+",server=on,wait=off",
		"-serial", "file:"+p.Console,
		"-daemonize", "-pidfile", filepath.Join(spec.Dir, "qemu.pid"),
	)
}

// ProbeArgs boots spec's kernel and initramfs with no devices; with
// "smolvm.probe=poweroff" on the command line the agent powers off the
// moment it starts as /init, so the process's run time is the raw cost of
// booting this kernel to /init.
func ProbeArgs(spec vmm.Spec) []string {
	return append(machineArgs(spec), "-serial", "none")
}

// Binary is the QEMU system emulator the driver runs.
func Binary() string { return qemuBinary }

func (d *Driver) Boot(ctx context.Context, spec vmm.Spec) (vmm.Instance, error) {
	return d.start(ctx, spec)
}

func (d *Driver) start(ctx context.Context, spec vmm.Spec, extra ...string) (vmm.Instance, error) {
	inst := paths(spec.Dir)
	if len(inst.AgentSocket) > maxSocketPath {
		return vmm.Instance{}, fmt.Errorf("socket path %s is longer than %d bytes: use a shorter data directory (SMOLVM_DATA_DIR)", inst.AgentSocket, maxSocketPath)
	}
	os.Remove(inst.AgentSocket)
	os.Remove(inst.QMPSocket)
	pidfile := filepath.Join(spec.Dir, "qemu.pid")
	os.Remove(pidfile)
	// With -daemonize the command returns once QEMU has set up the VM and
	// forked; errors in the configuration come back here, on stderr.
	cmd := exec.CommandContext(ctx, qemuBinary, append(Args(spec), extra...)...)
	var stderr bytes.Buffer
	cmd.Stdout = &stderr
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		return vmm.Instance{}, fmt.Errorf("start qemu: %v: %s", err, strings.TrimSpace(stderr.String()))
	}
	b, err := os.ReadFile(pidfile)
	if err != nil {
		// QEMU removes its pid file when it exits: it failed after
		// daemonizing, as it does when a saved state will not load.
		return vmm.Instance{}, fmt.Errorf("qemu exited during start-up (%w)", err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		return vmm.Instance{}, fmt.Errorf("parse qemu pid file: %w", err)
	}
	inst.PID = pid
	return inst, nil
}

// marker identifies a sandbox's QEMU process on its command line.
func marker(inst vmm.Instance) string { return inst.AgentSocket }

func (d *Driver) Alive(inst vmm.Instance) bool { return vmm.ProcessAlive(inst.PID, marker(inst)) }

func (d *Driver) Kill(ctx context.Context, inst vmm.Instance) error {
	return vmm.KillProcess(ctx, inst.PID, marker(inst))
}

func (d *Driver) Wait(ctx context.Context, inst vmm.Instance) error {
	return vmm.WaitGone(ctx, inst.PID, marker(inst))
}

// Version is the first line of `qemu-system-x86_64 --version`.
func (d *Driver) Version(ctx context.Context) (string, error) {
	out, err := exec.CommandContext(ctx, qemuBinary, "--version").Output()
	if err != nil {
		return "", fmt.Errorf("%s --version: %w", qemuBinary, err)
	}
	line, _, _ := strings.Cut(string(out), "\n")
	return strings.TrimSpace(line), nil
}

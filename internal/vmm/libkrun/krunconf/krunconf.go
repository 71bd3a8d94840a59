// Package krunconf is what the libkrun driver tells smolvm-krun, the
// helper that runs one VM in its own process: libkrun's krun_start_enter
// takes over the process that calls it, so the driver cannot call it
// itself. It is a package of its own so the helper links no more of smolvm
// than this.
package krunconf

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
)

// Config is one VM, as the helper configures it through libkrun's C API.
// Paths are absolute.
type Config struct {
	// Kernel is an uncompressed vmlinux (ELF); Initrd may be "".
	Kernel  string `json:"kernel"`
	Initrd  string `json:"initrd,omitempty"`
	Cmdline string `json:"cmdline"`
	// Disk is the raw root disk image, attached read-write as "root".
	Disk      string `json:"disk"`
	VCPUs     int    `json:"vcpus"`
	MemoryMiB int    `json:"memory_mib"`
	// AgentSocket is the Unix socket libkrun listens on for the host and
	// connects to the guest's vsock port AgentPort.
	AgentSocket string `json:"agent_socket"`
	AgentPort   uint32 `json:"agent_port"`
	// Console is the file the guest's console is written to.
	Console string `json:"console"`
	// Net, if set, is the guest's one network interface.
	Net *Net `json:"net,omitempty"`
	// Jail, if set, has the helper, started as root in a mount namespace
	// of its own, move into a root holding only what the VM needs and
	// drop root before it loads libkrun.
	Jail *Jail `json:"jail,omitempty"`
}

// Jail is where a jailed helper runs.
type Jail struct {
	// UID is the user (and group) it runs as.
	UID int `json:"uid"`
	// Dir is the sandbox's directory, the one read-write part of its
	// root.
	Dir string `json:"dir"`
}

// Net is a virtio-net device whose frames go over a Unix stream socket,
// each after its length (4 bytes, big-endian): passt's framing, which is
// also QEMU's stream netdev's.
type Net struct {
	// Socket is where the network process listens.
	Socket string `json:"socket"`
	MAC    string `json:"mac"`
}

// MaxVCPUs is what krun_set_vm_config's uint8_t can carry.
const MaxVCPUs = 255

// Check refuses a config the helper could not pass to libkrun as it is.
func (c Config) Check() error {
	var errs []error
	for _, f := range []struct{ name, path string }{
		{"kernel", c.Kernel}, {"disk", c.Disk}, {"agent socket", c.AgentSocket}, {"console", c.Console},
	} {
		if !filepath.IsAbs(f.path) {
			errs = append(errs, fmt.Errorf("%s path %q is not absolute", f.name, f.path))
		}
	}
	if c.Initrd != "" && !filepath.IsAbs(c.Initrd) {
		errs = append(errs, fmt.Errorf("initrd path %q is not absolute", c.Initrd))
	}
	// Without one, libkrun would boot its own command line, which roots
	// the guest on virtio-fs.
	if c.Cmdline == "" {
		errs = append(errs, errors.New("no kernel command line"))
	}
	if c.VCPUs < 1 || c.VCPUs > MaxVCPUs {
		errs = append(errs, fmt.Errorf("%d vCPUs: want 1 to %d", c.VCPUs, MaxVCPUs))
	}
	if c.MemoryMiB < 1 || int64(c.MemoryMiB) > 1<<32-1 {
		errs = append(errs, fmt.Errorf("%d MiB of memory: want 1 to %d", c.MemoryMiB, uint32(1<<32-1)))
	}
	if c.AgentPort == 0 {
		errs = append(errs, errors.New("no agent vsock port"))
	}
	if j := c.Jail; j != nil {
		if j.UID <= 0 {
			errs = append(errs, fmt.Errorf("jail user %d: want one that is not root", j.UID))
		}
		if !filepath.IsAbs(j.Dir) || filepath.Clean(j.Dir) != j.Dir || j.Dir == "/" {
			errs = append(errs, fmt.Errorf("jail directory %q is not a clean absolute path", j.Dir))
		}
	}
	if c.Net != nil {
		if !filepath.IsAbs(c.Net.Socket) {
			errs = append(errs, fmt.Errorf("network socket path %q is not absolute", c.Net.Socket))
		}
		if _, err := ParseMAC(c.Net.MAC); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// ParseMAC reads a 6-byte Ethernet address, as krun_add_net_* take it.
func ParseMAC(s string) ([6]byte, error) {
	var mac [6]byte
	hw, err := net.ParseMAC(s)
	if err != nil || len(hw) != 6 {
		return mac, fmt.Errorf("MAC address %q: want six bytes, as 52:54:00:12:34:56", s)
	}
	copy(mac[:], hw)
	return mac, nil
}

// Write stores c at path, readable by its owner only, in full or not at
// all.
func (c Config) Write(path string) error {
	b, err := json.MarshalIndent(c, "", "  ")
	if err != nil {
		return err
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, append(b, '\n'), 0o600); err != nil {
		return fmt.Errorf("write libkrun config: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("write libkrun config: %w", err)
	}
	return nil
}

// Read loads and checks the config at path.
func Read(path string) (Config, error) {
	var c Config
	b, err := os.ReadFile(path)
	if err != nil {
		return c, fmt.Errorf("read config: %w", err)
	}
	if err := json.Unmarshal(b, &c); err != nil {
		return c, fmt.Errorf("config %s: %w", path, err)
	}
	if err := c.Check(); err != nil {
		return c, fmt.Errorf("config %s: %w", path, err)
	}
	return c, nil
}

// The helper's status, one line on the descriptor -status-fd names: Ready
// once every configuration call succeeded, just before krun_start_enter
// (which does not return while the VM runs), or ErrorPrefix and what
// failed.
const (
	Ready       = "ready"
	ErrorPrefix = "error: "
)

// Flags of the helper.
const (
	FlagConfig   = "config"
	FlagLibrary  = "lib"
	FlagStatusFD = "status-fd"
)

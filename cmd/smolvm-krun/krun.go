package main

import (
	"errors"
	"fmt"
	"runtime"
	"strings"
	"syscall"

	"github.com/ebitengine/purego"
	"golang.org/x/sys/unix"

	"github.com/smolvm/smolvm/internal/vmm/libkrun/krunconf"
)

// Constants of libkrun.h.
const (
	logLevelWarn    = 2 // KRUN_LOG_LEVEL_WARN
	kernelFormatELF = 1 // KRUN_KERNEL_FORMAT_ELF: an uncompressed vmlinux
	rootBlockID     = "root"
	netFeaturesNone = 0 // no NET_FEATURE_*: see configure
	netFlagsNone    = 0 // no NET_FLAG_*: the guest agent sets the address
	tsiFeaturesNone = 0 // no KRUN_TSI_HIJACK_*: see configure
	noFD            = -1
	defaultLibrary  = "libkrun.so.1"
	fallbackLibrary = "libkrun.so"
)

// libkrun holds the functions of libkrun's C API the helper calls, with
// the C signatures of libkrun.h. Strings are passed as NUL-terminated
// copies (cstr): libkrun copies what it keeps before returning.
type libkrun struct {
	path string

	setLogLevel          func(level uint32) int32
	createCtx            func() int32
	setVMConfig          func(ctx uint32, vcpus uint8, ramMiB uint32) int32
	setKernel            func(ctx uint32, path *byte, format uint32, initramfs *byte, cmdline *byte) int32
	addDisk              func(ctx uint32, blockID *byte, path *byte, readOnly bool) int32
	disableImplicitVsock func(ctx uint32) int32
	addVsock             func(ctx uint32, tsiFeatures uint32) int32
	addVsockPort2        func(ctx uint32, port uint32, path *byte, listen bool) int32
	addNetUnixstream     func(ctx uint32, path *byte, fd int32, mac *byte, features uint32, flags uint32) int32
	setConsoleOutput     func(ctx uint32, path *byte) int32
	startEnter           func(ctx uint32) int32
}

// load opens libkrun at path, or where the dynamic loader finds it, and
// binds every function the helper calls, so that a library too old to
// have one fails here, by name, before anything is configured.
func load(path string) (*libkrun, error) {
	candidates := []string{path}
	if path == "" {
		candidates = []string{defaultLibrary, fallbackLibrary}
	}
	var handle uintptr
	var errs []error
	for _, c := range candidates {
		// RTLD_NOW: a symbol libkrun lacks fails now, not in the middle
		// of a running VM.
		h, err := purego.Dlopen(c, purego.RTLD_NOW|purego.RTLD_LOCAL)
		if err == nil {
			handle, path = h, c
			break
		}
		errs = append(errs, err) // dlerror's text names the file
	}
	if handle == 0 {
		return nil, fmt.Errorf("load libkrun: %w", errors.Join(errs...))
	}
	l := &libkrun{path: path}
	for _, f := range []struct {
		name string
		fn   any
	}{
		{"krun_set_log_level", &l.setLogLevel},
		{"krun_create_ctx", &l.createCtx},
		{"krun_set_vm_config", &l.setVMConfig},
		{"krun_set_kernel", &l.setKernel},
		{"krun_add_disk", &l.addDisk},
		{"krun_disable_implicit_vsock", &l.disableImplicitVsock},
		{"krun_add_vsock", &l.addVsock},
		{"krun_add_vsock_port2", &l.addVsockPort2},
		{"krun_add_net_unixstream", &l.addNetUnixstream},
		{"krun_set_console_output", &l.setConsoleOutput},
		{"krun_start_enter", &l.startEnter},
	} {
		sym, err := purego.Dlsym(handle, f.name)
		if err != nil || sym == 0 {
			return nil, fmt.Errorf("%s has no %s: this libkrun is too old or built without it", path, f.name)
		}
		purego.RegisterFunc(f.fn, sym)
	}
	return l, nil
}

// callError turns a libkrun return code into an error naming the call:
// libkrun answers a failure with a negative error number.
func callError(name string, rc int32) error {
	if rc >= 0 {
		return nil
	}
	errno := syscall.Errno(-rc)
	code := unix.ErrnoName(errno)
	if code == "" {
		code = "errno " + fmt.Sprint(-rc)
	}
	return fmt.Errorf("%s: %v (%s, %d)", name, errno, code, rc)
}

// configure creates a libkrun context and gives it the whole VM, checking
// every call; it returns the context for krun_start_enter.
func configure(l *libkrun, c krunconf.Config) (uint32, error) {
	for _, s := range []string{c.Kernel, c.Initrd, c.Cmdline, c.Disk, c.AgentSocket, c.Console} {
		if strings.IndexByte(s, 0) >= 0 {
			return 0, fmt.Errorf("config value %q has a NUL byte", s)
		}
	}
	// Before the context: libkrun sets up its (process-wide) logger here,
	// and without one it says nothing of why a VM failed to start.
	if err := callError("krun_set_log_level", l.setLogLevel(logLevelWarn)); err != nil {
		return 0, err
	}
	id := l.createCtx()
	if err := callError("krun_create_ctx", id); err != nil {
		return 0, err
	}
	ctx := uint32(id)
	var mac [6]byte
	if c.Net != nil {
		var err error
		if mac, err = krunconf.ParseMAC(c.Net.MAC); err != nil {
			return 0, err
		}
	}
	steps := []struct {
		name string
		call func() int32
	}{
		{"krun_set_vm_config", func() int32 {
			return l.setVMConfig(ctx, uint8(c.VCPUs), uint32(c.MemoryMiB))
		}},
		{"krun_set_kernel", func() int32 {
			return l.setKernel(ctx, cstr(c.Kernel), kernelFormatELF, cstr(c.Initrd), cstr(c.Cmdline))
		}},
		{"krun_add_disk", func() int32 {
			return l.addDisk(ctx, cstr(rootBlockID), cstr(c.Disk), false)
		}},
		// Left to itself, libkrun adds a vsock device that, when the VM
		// has no network interface, turns on TSI: the guest's sockets
		// become the helper's on the host, past the network policy. The
		// agent's port needs a vsock device; it gets one with no TSI.
		{"krun_disable_implicit_vsock", func() int32 {
			return l.disableImplicitVsock(ctx)
		}},
		{"krun_add_vsock", func() int32 {
			return l.addVsock(ctx, tsiFeaturesNone)
		}},
		// listen=true: the guest agent listens on the port and libkrun
		// listens on the socket for the host, forwarding each connection
		// to the guest.
		{"krun_add_vsock_port2", func() int32 {
			return l.addVsockPort2(ctx, c.AgentPort, cstr(c.AgentSocket), true)
		}},
	}
	if c.Net != nil {
		// libkrun connects to the socket. No offload features: the guest
		// sends whole frames with their checksums made, as the network
		// process expects of QEMU's virtio-net on a stream netdev.
		steps = append(steps, struct {
			name string
			call func() int32
		}{"krun_add_net_unixstream", func() int32 {
			return l.addNetUnixstream(ctx, cstr(c.Net.Socket), noFD, &mac[0], netFeaturesNone, netFlagsNone)
		}})
	}
	steps = append(steps, struct {
		name string
		call func() int32
	}{"krun_set_console_output", func() int32 {
		return l.setConsoleOutput(ctx, cstr(c.Console))
	}})
	for _, s := range steps {
		rc := s.call()
		runtime.KeepAlive(&mac)
		if err := callError(s.name, rc); err != nil {
			return 0, err
		}
	}
	return ctx, nil
}

// cstr is s as a NUL-terminated C string, or NULL for "" (libkrun takes
// NULL for an absent initramfs).
func cstr(s string) *byte {
	if s == "" {
		return nil
	}
	b := make([]byte, len(s)+1)
	copy(b, s)
	return &b[0]
}

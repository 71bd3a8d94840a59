// Package drivers assembles the VMM drivers this build of smolvm has, so
// that the sandbox manager is handed a registry and names no backend.
package drivers

import (
	"os"

	"github.com/smolvm/smolvm/internal/doctor"
	"github.com/smolvm/smolvm/internal/vmm"
	"github.com/smolvm/smolvm/internal/vmm/firecracker"
	"github.com/smolvm/smolvm/internal/vmm/libkrun"
	"github.com/smolvm/smolvm/internal/vmm/qemu"
)

// Default is every driver, in order of preference: a sandbox that names
// no backend gets the first this host can run. accel forces QEMU's
// accelerator ("kvm" or "tcg"); "" picks KVM only where it really works
// ($SMOLVM_ACCEL overrides).
func Default(accel string) *vmm.Registry {
	if accel == "" {
		accel, _ = doctor.Accelerator()
	}
	return vmm.NewRegistry(
		// Its helper is smolvm-net's binary, found as the Manager finds
		// it: $SMOLVM_NET, beside this executable, then $PATH.
		firecracker.New(firecracker.Options{HelperPath: doctor.Net.Locate("")}),
		qemu.New(qemu.Options{Accel: accel}),
		libkrun.New(libkrun.Options{Library: os.Getenv("SMOLVM_LIBKRUN")}),
	)
}

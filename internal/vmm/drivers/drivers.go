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
// ($SMOLVM_ACCEL overrides). net is smolvm-net's binary, the helper that
// launches Firecracker and jailed QEMUs; "" finds it as the Manager does:
// $SMOLVM_NET, beside this executable, then $PATH.
func Default(accel, net string) *vmm.Registry {
	if accel == "" {
		accel, _ = doctor.Accelerator()
	}
	helper := doctor.Net.Locate(net)
	return vmm.NewRegistry(
		firecracker.New(firecracker.Options{HelperPath: helper}),
		qemu.New(qemu.Options{Accel: accel, HelperPath: helper}),
		libkrun.New(libkrun.Options{Library: os.Getenv("SMOLVM_LIBKRUN")}),
	)
}

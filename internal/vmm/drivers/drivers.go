// Package drivers assembles the VMM drivers this build of smolvm has, so
// that the sandbox manager is handed a registry and names no backend.
package drivers

import (
	"os"

	"github.com/smolvm/smolvm/internal/doctor"
	"github.com/smolvm/smolvm/internal/vmm"
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
		qemu.New(qemu.Options{Accel: accel}),
		libkrun.New(libkrun.Options{Library: os.Getenv("SMOLVM_LIBKRUN")}),
	)
}

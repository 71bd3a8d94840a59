// Package drivers assembles the VMM drivers this build of smolvm has, so
// that the sandbox manager is handed a registry and names no backend.
package drivers

import (
	"github.com/smolvm/smolvm/internal/doctor"
	"github.com/smolvm/smolvm/internal/vmm"
	"github.com/smolvm/smolvm/internal/vmm/qemu"
)

// Default is every driver, qemu first (the default backend). accel forces
// QEMU's accelerator ("kvm" or "tcg"); "" picks KVM only where it really
// works ($SMOLVM_ACCEL overrides).
func Default(accel string) *vmm.Registry {
	if accel == "" {
		accel, _ = doctor.Accelerator()
	}
	return vmm.NewRegistry(qemu.New(qemu.Options{Accel: accel}))
}

// Package drivers assembles the VMM drivers this build of smolvm has, so
// that the sandbox manager is handed a registry and names no backend.
package drivers

import (
	"os"

	"github.com/smolvm/smolvm/internal/doctor"
	"github.com/smolvm/smolvm/internal/jail"
	"github.com/smolvm/smolvm/internal/vmm"
	"github.com/smolvm/smolvm/internal/vmm/firecracker"
	"github.com/smolvm/smolvm/internal/vmm/libkrun"
	"github.com/smolvm/smolvm/internal/vmm/qemu"
)

// Default is every driver, in order of preference: a sandbox that names
// no backend gets the first this host can run. accel forces QEMU's
// accelerator ("kvm" or "tcg"); "" picks KVM only where it really works
// ($SMOLVM_ACCEL overrides). net is smolvm-net's binary ("" finds it as
// the Manager does); smolvm-jail, which launches Firecracker and jailed
// QEMUs, is found as JailPath says.
func Default(accel, net string) *vmm.Registry {
	if accel == "" {
		accel, _ = doctor.Accelerator()
	}
	helper := JailPath(net)
	// One set of jail users for every backend: no two VMs share one.
	users := jail.NewUsers(jail.VMMBase, jail.PerRange)
	return vmm.NewRegistry(
		firecracker.New(firecracker.Options{HelperPath: helper, Users: users}),
		qemu.New(qemu.Options{Accel: accel, HelperPath: helper, Users: users}),
		libkrun.New(libkrun.Options{Library: os.Getenv("SMOLVM_LIBKRUN"), Users: users}),
	)
}

// JailPath finds smolvm-jail: $SMOLVM_JAIL, beside smolvm-net (net, or
// where it is found), beside this executable, then $PATH; "" if nowhere.
func JailPath(net string) string {
	return doctor.Jail.LocateBeside("", doctor.Net.Locate(net))
}

// Command smolvm-net is a sandbox's network: a user-space TCP/IP stack on
// the host end of the guest's virtio-net link, which decides every
// connection the guest opens and carries ports exposed to the host. smolvm
// starts one per sandbox beside its VM; it ends when the VM disconnects.
package main

import (
	"fmt"
	"os"
	"slices"

	"github.com/smolvm/smolvm/internal/network"
	"github.com/smolvm/smolvm/internal/vmm/firecracker"
	"github.com/smolvm/smolvm/internal/vmm/qemu"
)

func main() {
	// The Firecracker backend's launcher and TAP relay live here too:
	// they are what stands between a Firecracker VM and this network,
	// and they must run before network.Main's system call filter, which
	// forbids the mounts and namespaces they set up.
	if len(os.Args) > 1 && slices.Contains(firecracker.Subcommands, os.Args[1]) {
		if err := firecracker.Main(os.Args[1:]); err != nil {
			fmt.Fprintln(os.Stderr, "smolvm-net:", err)
			os.Exit(1)
		}
		return
	}
	// So does the QEMU backend's launcher, which builds a jailed QEMU's
	// root and becomes that QEMU.
	if len(os.Args) > 1 && os.Args[1] == qemu.LaunchCommand {
		if err := qemu.Main(os.Args[1:]); err != nil {
			fmt.Fprintln(os.Stderr, "smolvm-net:", err)
			os.Exit(1)
		}
		return
	}
	if err := network.Main(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "smolvm-net:", err)
		os.Exit(1)
	}
}

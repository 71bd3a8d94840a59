// Command smolvm-jail starts each VMM in its jail: qemu-launch builds a
// jailed QEMU's root and becomes that QEMU, fc-launch does the same for
// Firecracker, and tap-relay carries a Firecracker VM's frames to its
// network process as the VM's user. smolvm's drivers run it, as root, for
// every VM they start.
//
// It is a binary of its own, apart from smolvm-net, because it runs
// before every VMM and little else may: the network process's libraries
// take about 30 ms to initialise on a 2-core machine, this binary a few.
package main

import (
	"fmt"
	"os"
	"slices"

	"github.com/smolvm/smolvm/internal/vmm/firecracker"
	"github.com/smolvm/smolvm/internal/vmm/qemu"
)

func main() {
	var err error
	switch {
	case len(os.Args) > 1 && slices.Contains(firecracker.Subcommands, os.Args[1]):
		err = firecracker.Main(os.Args[1:])
	case len(os.Args) > 1 && os.Args[1] == qemu.LaunchCommand:
		err = qemu.Main(os.Args[1:])
	default:
		err = fmt.Errorf("usage: smolvm-jail %s|%s ARGS (run by smolvm's drivers)", qemu.LaunchCommand, firecracker.LaunchCommand)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "smolvm-jail:", err)
		os.Exit(1)
	}
}

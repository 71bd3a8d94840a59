// Command smolvm-net is a sandbox's network: a user-space TCP/IP stack on
// the host end of the guest's virtio-net link, which decides every
// connection the guest opens and carries ports exposed to the host. smolvm
// starts one per sandbox beside its VM; it ends when the VM disconnects.
package main

import (
	"fmt"
	"os"

	"github.com/smolvm/smolvm/internal/network"
)

func main() {
	if err := network.Main(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "smolvm-net:", err)
		os.Exit(1)
	}
}

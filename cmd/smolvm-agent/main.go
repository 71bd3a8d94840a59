// Command smolvm-agent is the init process of every smolvm guest. smolvm
// places it at /init in the initramfs it builds; it is not meant to be run
// on the host.
package main

import (
	"fmt"
	"os"

	"github.com/smolvm/smolvm/internal/agent"
)

func main() {
	if os.Getpid() != 1 {
		fmt.Fprintln(os.Stderr, "smolvm-agent runs as PID 1 inside a smolvm guest; it is not meant to be started by hand")
		os.Exit(2)
	}
	agent.Main()
}

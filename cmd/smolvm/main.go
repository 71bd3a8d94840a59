// Command smolvm creates isolated Linux sandboxes, each a real virtual
// machine, and runs commands in them: from the command line, or through a
// local HTTP server.
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	root := &cobra.Command{
		Use:           "smolvm",
		Short:         "Isolated Linux sandboxes, each a real VM, for agents and tools",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.AddCommand(
		newServerCmd(),
		newSandboxCmd(),
		newSnapshotCmd(),
		newSetupCmd(),
		newDoctorCmd(),
		newKernelCmd(),
		newBenchCmd(),
		newImageCmd(),
		newTemplateCmd(),
		newMCPCmd(),
		newUICmd(),
		newNodeCmd(),
	)
	if err := root.ExecuteContext(ctx); err != nil {
		if code, ok := err.(exitCode); ok {
			os.Exit(int(code))
		}
		fmt.Fprintln(os.Stderr, "smolvm:", err)
		os.Exit(1)
	}
}

// exitCode is returned by a command that has already reported what
// happened and only needs the process to exit with this status.
type exitCode int

func (e exitCode) Error() string { return fmt.Sprintf("exit status %d", int(e)) }

package main

import (
	"fmt"
	"log/slog"
	"os"

	"github.com/spf13/cobra"

	"github.com/smolvm/smolvm/internal/kubenode"
	"github.com/smolvm/smolvm/internal/sandbox"
)

func newNodeCmd() *cobra.Command {
	var c kubenode.Config
	cmd := &cobra.Command{
		Use:   "node",
		Short: "Join a Kubernetes cluster as a node whose pods are sandboxes",
		Long: `Register this host as a Kubernetes Node and run the pods scheduled to it as
sandboxes, one VM per pod, until SIGINT or SIGTERM. The node is labelled
smolvm.dev/node=true and tainted smolvm.dev/vm-only:NoSchedule, so only pods
that ask for it (the smolvm RuntimeClass) land on it.

A pod has one container. Its image is the sandbox's image, or set the
annotation smolvm.dev/os (alpine, ubuntu, debian) to boot an OS preset. Its
memory and CPU limits (or requests) size the VM; smolvm.dev/disk-mib sizes
its disk; smolvm.dev/network (open, restricted, off) and
smolvm.dev/network-allow shape its network; containerPorts are exposed on
the node's address. The container's command, if any, runs in the VM as a
process; kubectl exec, logs and port-forward reach the VM.

Sandboxes keep running when the node stops; a node started again on the same
data directory adopts them, and deletes those whose pods are gone.`,
		Example: `  smolvm node --kubeconfig /etc/smolvm/kubeconfig --name host-a --address 10.0.0.5`,
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if c.Kubeconfig == "" {
				c.Kubeconfig = os.Getenv("KUBECONFIG")
			}
			if c.Kubeconfig == "" {
				return fmt.Errorf("--kubeconfig is required (or $KUBECONFIG)")
			}
			if c.Name == "" {
				h, err := os.Hostname()
				if err != nil {
					return fmt.Errorf("--name is required: %w", err)
				}
				c.Name = h
			}
			if c.Port < 1 || c.Port > 65535 {
				return fmt.Errorf("--port %d is not a TCP port (1 to 65535)", c.Port)
			}
			if (c.CertFile == "") != (c.KeyFile == "") {
				return fmt.Errorf("--tls-cert and --tls-key go together")
			}
			ctx := cmd.Context()
			d, err := setupDataDir(cmd)
			if err != nil {
				return err
			}
			stderr := cmd.ErrOrStderr()
			log := slog.New(slog.NewTextHandler(stderr, nil))
			m, err := sandbox.Open(ctx, sandbox.Options{DataDir: d, Progress: stderr, Logger: log})
			if err != nil {
				return fmt.Errorf("open sandboxes in %s: %w", d.Path(), err)
			}
			c.Logger = log
			c.Version = serverVersion()
			c.Ready = func() {
				fmt.Fprintf(cmd.OutOrStdout(), "smolvm node %s ready (kubelet API on %s:%d)\n", c.Name, c.Address, c.Port)
			}
			runErr := kubenode.Run(ctx, m, c)
			if err := m.Close(); err != nil && runErr == nil {
				runErr = fmt.Errorf("close sandbox manager: %w", err)
			}
			return runErr
		},
	}
	f := cmd.Flags()
	f.StringVar(&c.Kubeconfig, "kubeconfig", "", "kubeconfig to reach the API server with (default $KUBECONFIG)")
	f.StringVar(&c.Name, "name", "", "the Node's name (default the host name)")
	f.StringVar(&c.Address, "address", "127.0.0.1", "this node's IP: the kubelet API listens here and pods' ports are reached here")
	f.IntVar(&c.Port, "port", 10250, "the kubelet API's port (exec, logs, port-forward)")
	f.StringVar(&c.CertFile, "tls-cert", "", "the kubelet API's serving certificate (default: a self-signed one)")
	f.StringVar(&c.KeyFile, "tls-key", "", "the key of --tls-cert")
	f.StringVar(&c.ClientCAFile, "client-ca", "", "CA that signs the API server's kubelet client certificate")
	f.IntVar(&c.MemoryMiB, "memory-mib", 0, "memory the node offers to pods, in MiB (default the host's)")
	f.IntVar(&c.CPUs, "cpus", 0, "CPUs the node offers to pods (default the host's)")
	f.IntVar(&c.Pods, "max-pods", 110, "how many pods the node takes")
	return cmd
}

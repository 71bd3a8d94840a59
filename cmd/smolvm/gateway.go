package main

import (
	"fmt"
	"log/slog"
	"net"

	"github.com/spf13/cobra"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/smolvm/smolvm/internal/api"
	"github.com/smolvm/smolvm/internal/gateway"
)

// runGateway serves the API over a cluster's smolvm nodes: nothing runs
// or is kept on this machine, so there is no data directory and no
// server record (the CLI's local commands do not go through it).
func runGateway(cmd *cobra.Command, c serverConfig, ln net.Listener, shown string) error {
	ctx := cmd.Context()
	stdout, stderr := cmd.OutOrStdout(), cmd.ErrOrStderr()
	if c.pool != 0 || len(c.allowMounts) > 0 {
		return fmt.Errorf("--pool and --allow-mount are for a server that runs its own VMs; in a cluster, warm pools are SandboxWarmPools and mounts are not offered")
	}
	rules := &clientcmd.ClientConfigLoadingRules{ExplicitPath: c.kubeconfig}
	kc := clientcmd.NewNonInteractiveDeferredLoadingClientConfig(rules, &clientcmd.ConfigOverrides{})
	rc, err := kc.ClientConfig()
	if err != nil {
		return fmt.Errorf("reading kubeconfig %s: %w", c.kubeconfig, err)
	}
	ns := c.namespace
	if ns == "" {
		if ns, _, err = kc.Namespace(); err != nil {
			return fmt.Errorf("the kubeconfig's namespace: %w", err)
		}
	}
	logger := slog.New(slog.NewTextHandler(stderr, nil))
	g, err := gateway.New(gateway.Config{REST: rc, Namespace: ns, NodeCAFile: c.nodeCA, Logger: logger})
	if err != nil {
		return err
	}
	if c.quiet {
		logger = nil
	}
	stopStreams := make(chan struct{})
	handler := api.Wrap(g.Handler(), api.Options{Token: c.token, Addr: shown, Version: serverVersion(), Logger: logger, Stop: stopStreams})
	fmt.Fprintf(stderr, "smolvm: serving the sandboxes of namespace %s in the cluster at %s\n", ns, rc.Host)
	return serve(ctx, c, ln, shown, handler, stdout, stderr, stopStreams)
}

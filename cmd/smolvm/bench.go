package main

import (
	"context"
	"fmt"
	"os"
	"runtime"
	"time"

	"github.com/spf13/cobra"

	"github.com/smolvm/smolvm/internal/bench"
	"github.com/smolvm/smolvm/internal/datadir"
	"github.com/smolvm/smolvm/internal/sandbox"
)

func newBenchCmd() *cobra.Command {
	o := bench.Options{}
	soak := bench.SoakOptions{}
	cmd := &cobra.Command{
		Use:   "bench",
		Short: "Measure sandbox creation and command latency against a raw QEMU boot",
		Long: `Boots the guest kernel bare (the baseline), then creates sandboxes and runs
commands through the library and the HTTP API, fetches a 100 MiB file from a
guest server through an exposed port (against the same fetch over host
loopback), and prints medians and p95s
with each figure's ratio to its baseline. Machines are noisy: compare
medians from one run, not figures from different runs.

With --soak N it restores N template clones in a row instead, rebuilding the
template every --soak-per-build restores, and fails if any clone crashed.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			d, err := datadir.Default()
			if err != nil {
				return err
			}
			if soak.Restores > 0 {
				soak.Manager = func(ctx context.Context) (*sandbox.Manager, error) {
					return sandbox.Open(ctx, sandbox.Options{DataDir: d, Progress: os.Stderr})
				}
				soak.MemoryMiB = o.MemoryMiB
				r, err := bench.Soak(ctx, soak, os.Stderr)
				if r != nil {
					host, _ := os.Hostname()
					fmt.Printf("smolvm bench --soak %d, %s, %s, %d CPUs, %s/%s\n\n", soak.Restores, time.Now().UTC().Format("2006-01-02"), host, runtime.NumCPU(), runtime.GOOS, runtime.GOARCH)
					r.Print(os.Stdout)
				}
				if err != nil {
					return err
				}
				if len(r.Crashes) > 0 {
					return fmt.Errorf("%d of %d restores failed", len(r.Crashes), soak.Restores)
				}
				return nil
			}
			o.Manager = func(ctx context.Context, cold bool, pool int) (*sandbox.Manager, error) {
				return sandbox.Open(ctx, sandbox.Options{DataDir: d, Progress: os.Stderr, NoTemplates: cold, Pool: pool, PoolCleanup: true})
			}
			r, err := bench.Run(ctx, o, os.Stderr)
			if err != nil {
				return err
			}
			host, _ := os.Hostname()
			fmt.Printf("smolvm bench, %s, %s, %d CPUs, %s/%s\n\n", time.Now().UTC().Format("2006-01-02"), host, runtime.NumCPU(), runtime.GOOS, runtime.GOARCH)
			r.Print(os.Stdout)
			return nil
		},
	}
	cmd.Flags().IntVar(&o.Boots, "boots", 10, "cold boots and creates to time, of each kind")
	cmd.Flags().IntVar(&o.Density, "density", 40, "create 256 MiB sandboxes until one fails or this many run at once (0 skips)")
	cmd.Flags().IntVar(&o.RoundTrip, "round-trips", 50, "commands to time for each round-trip figure")
	cmd.Flags().IntVar(&o.MemoryMiB, "memory", 512, "guest memory in MiB")
	cmd.Flags().IntVar(&soak.Restores, "soak", 0, "instead of the figures: restore this many template clones in a row, one command each, and report every one that crashed")
	cmd.Flags().IntVar(&soak.PerBuild, "soak-per-build", 10, "with --soak: rebuild the template after this many restores (0: one template for the whole soak)")
	cmd.Flags().IntVar(&o.Transfers, "transfers", 5, "fetches of a 100 MiB file through an exposed port (0 skips)")
	return cmd
}

package main

import (
	"encoding/json"
	"fmt"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/smolvm/smolvm/internal/sandbox"
)

func newTemplateCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "template",
		Short: "List and remove the saved VMs that new sandboxes are restored from",
		Long: `The first sandbox of each machine shape (kernel, agent, image, memory, vCPUs,
disk size, QEMU version) boots a template VM cold and saves it; later
sandboxes are restored from it in a fraction of the time. Templates are
rebuilt on demand, so removing one only costs the next create a cold boot.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error { return cmd.Help() },
	}
	var asJSON bool
	cmd.PersistentFlags().BoolVar(&asJSON, "json", false, "print JSON for scripts")
	// withManager runs fn with a Manager on the data directory.
	withManager := func(fn func(cmd *cobra.Command, m *sandbox.Manager, args []string) error) func(*cobra.Command, []string) error {
		return func(cmd *cobra.Command, args []string) error {
			d, err := setupDataDir(cmd)
			if err != nil {
				return err
			}
			m, err := sandbox.Open(cmd.Context(), sandbox.Options{DataDir: d})
			if err != nil {
				return err
			}
			defer m.Close()
			return fn(cmd, m, args)
		}
	}
	list := &cobra.Command{
		Use:   "list",
		Short: "List templates, newest first",
		Args:  cobra.NoArgs,
		RunE: withManager(func(cmd *cobra.Command, m *sandbox.Manager, _ []string) error {
			ts, err := m.Templates()
			if err != nil {
				return err
			}
			if asJSON {
				return json.NewEncoder(cmd.OutOrStdout()).Encode(ts)
			}
			tw := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "KEY\tIMAGE\tMEMORY\tVCPUS\tDISK\tSIZE\tCREATED\tSTATE")
			for _, t := range ts {
				state := "ready"
				if t.Retired {
					state = "retired"
				}
				fmt.Fprintf(tw, "%s\t%s\t%d MiB\t%d\t%d MiB\t%d MiB\t%s\t%s\n", t.Key, t.Image, t.MemoryMiB, t.VCPUs, t.DiskMiB,
					t.SizeBytes>>20, t.CreatedAt.Local().Format(time.DateTime), state)
			}
			return tw.Flush()
		}),
	}
	rm := &cobra.Command{
		Use:   "rm KEY...",
		Short: "Remove templates no sandbox is using",
		Args:  cobra.MinimumNArgs(1),
		RunE: withManager(func(cmd *cobra.Command, m *sandbox.Manager, args []string) error {
			for _, key := range args {
				if err := m.RemoveTemplate(cmd.Context(), key); err != nil {
					return err
				}
				fmt.Fprintf(cmd.OutOrStdout(), "removed %s\n", key)
			}
			return nil
		}),
	}
	prune := &cobra.Command{
		Use:   "prune",
		Short: "Remove every template no sandbox is using",
		Args:  cobra.NoArgs,
		RunE: withManager(func(cmd *cobra.Command, m *sandbox.Manager, _ []string) error {
			removed, err := m.PruneTemplates(cmd.Context())
			if err != nil {
				return err
			}
			for _, t := range removed {
				fmt.Fprintf(cmd.OutOrStdout(), "removed %s (%d MiB)\n", t.Key, t.SizeBytes>>20)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "%d template(s) removed\n", len(removed))
			return nil
		}),
	}
	cmd.AddCommand(list, rm, prune)
	return cmd
}

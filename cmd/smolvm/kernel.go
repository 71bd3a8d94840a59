package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/smolvm/smolvm/internal/datadir"
	"github.com/smolvm/smolvm/internal/kernel"
)

func newKernelCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "kernel",
		Short: "Manage guest kernels",
		Long: "Manage the Linux kernels that sandboxes boot. A kernel is imported from a\n" +
			"Debian linux-image package (downloaded with apt by `kernel fetch`) or from the\n" +
			"host's /boot and /lib/modules; the newest imported kernel is the default.",
	}
	cmd.AddCommand(newKernelFetchCmd(), newKernelImportCmd(), newKernelListCmd())
	return cmd
}

func newKernelFetchCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "fetch",
		Short: "Download Debian's current kernel package with apt and import it",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cmd.SilenceUsage = true
			d, err := datadir.Default()
			if err != nil {
				return err
			}
			k, err := kernel.Fetch(cmd.Context(), d, cmd.ErrOrStderr())
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "kernel %s ready in %s\n", k.Version, k.Dir)
			return nil
		},
	}
}

func newKernelImportCmd() *cobra.Command {
	var (
		host    bool
		vmlinuz string
		modules string
	)
	cmd := &cobra.Command{
		Use:   "import {FILE.deb | --host [--vmlinuz PATH --modules DIR]}",
		Short: "Import a kernel from a Debian linux-image package or from the host",
		Example: "  smolvm kernel import linux-image-6.1.0-56-amd64_6.1.192-2_amd64.deb\n" +
			"  smolvm kernel import --host\n" +
			"  smolvm kernel import --host --vmlinuz /boot/vmlinuz-6.1.0-56-amd64 --modules /lib/modules/6.1.0-56-amd64",
		Args: func(cmd *cobra.Command, args []string) error {
			switch {
			case host && len(args) > 0:
				return errors.New("give either a .deb file or --host, not both")
			case !host && len(args) != 1:
				return errors.New("give one linux-image .deb file, or --host")
			case !host && (vmlinuz != "" || modules != ""):
				return errors.New("--vmlinuz and --modules go with --host")
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			cmd.SilenceUsage = true
			d, err := datadir.Default()
			if err != nil {
				return err
			}
			var k *kernel.Kernel
			if host {
				if vmlinuz == "" || modules == "" {
					release, err := kernelHostRelease()
					if err != nil {
						return err
					}
					if vmlinuz == "" {
						vmlinuz = filepath.Join("/boot", "vmlinuz-"+release)
						if _, err := os.Stat(vmlinuz); err != nil {
							return fmt.Errorf("the host kernel %s has no %s; pass --vmlinuz and --modules", release, vmlinuz)
						}
					}
					if modules == "" {
						modules = filepath.Join("/lib/modules", release)
					}
				}
				k, err = kernel.ImportHost(cmd.Context(), d, vmlinuz, modules)
			} else {
				k, err = kernel.ImportDeb(cmd.Context(), d, args[0])
			}
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "imported kernel %s into %s\n", k.Version, k.Dir)
			return nil
		},
	}
	f := cmd.Flags()
	f.BoolVar(&host, "host", false, "import the running host kernel (/boot/vmlinuz-RELEASE and /lib/modules/RELEASE)")
	f.StringVar(&vmlinuz, "vmlinuz", "", "with --host: the kernel image to import")
	f.StringVar(&modules, "modules", "", "with --host: the kernel's module directory")
	return cmd
}

// kernelHostRelease is the running kernel's release, as uname -r prints it.
func kernelHostRelease() (string, error) {
	b, err := os.ReadFile("/proc/sys/kernel/osrelease")
	if err != nil {
		return "", fmt.Errorf("find the host kernel release: %w (pass --vmlinuz and --modules)", err)
	}
	return strings.TrimSpace(string(b)), nil
}

func newKernelListCmd() *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "list",
		Short: "List imported kernels",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cmd.SilenceUsage = true
			d, err := datadir.Default()
			if err != nil {
				return err
			}
			ks, err := kernel.List(d)
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			if asJSON {
				if ks == nil {
					ks = []*kernel.Kernel{}
				}
				enc := json.NewEncoder(out)
				enc.SetIndent("", "  ")
				return enc.Encode(ks)
			}
			if len(ks) == 0 {
				fmt.Fprintln(cmd.ErrOrStderr(), "no kernels imported; run `smolvm kernel fetch`")
				return nil
			}
			tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "VERSION\tPATH")
			for _, k := range ks {
				fmt.Fprintf(tw, "%s\t%s\n", k.Version, k.Dir)
			}
			return tw.Flush()
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print a JSON array")
	return cmd
}

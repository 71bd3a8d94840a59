package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/smolvm/smolvm/internal/datadir"
	"github.com/smolvm/smolvm/internal/doctor"
	"github.com/smolvm/smolvm/internal/image"
	"github.com/smolvm/smolvm/internal/kernel"
)

func newSetupCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "setup",
		Short: "Prepare this host: install QEMU and tools, fetch the guest kernel, build the default image",
		Long: `Prepare this host to run sandboxes. Installs the missing Debian packages
(qemu-system-x86, qemu-utils, e2fsprogs, debootstrap) with apt-get, imports
Debian's kernel as the guest kernel, and builds the default Debian image
(about a minute). Needs root for the packages and the image build. Running it
again only checks, and returns at once.`,
		Args:         cobra.NoArgs,
		SilenceUsage: true,
		RunE: func(cmd *cobra.Command, _ []string) error {
			d, err := setupDataDir(cmd)
			if err != nil {
				return err
			}
			// cmd.Context() ends on SIGINT/SIGTERM; the build then removes
			// its temp files before returning.
			return runSetup(cmd.Context(), d, cmd.OutOrStdout())
		},
	}
}

func newDoctorCmd() *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "doctor",
		Short: "Check what this host has and lacks for running sandboxes",
		Long: `Check the host tools, firmware, accelerator, guest kernel, default image and
data directory, and print the command that fixes each problem. Exits with
status 1 if anything required is missing.`,
		Args:         cobra.NoArgs,
		SilenceUsage: true,
		RunE: func(cmd *cobra.Command, _ []string) error {
			d, err := setupDataDir(cmd)
			if err != nil {
				return err
			}
			checks := doctor.Run(cmd.Context(), d)
			missing := doctor.AnyMissing(checks)
			out := cmd.OutOrStdout()
			if asJSON {
				if err := writeDoctorJSON(out, checks, missing); err != nil {
					return err
				}
			} else {
				printDoctorTable(out, checks)
			}
			if missing {
				// The table or JSON already says what is missing.
				return exitCode(1)
			}
			return nil
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, `print {"ok", "data": {"checks": [...]}} as JSON`)
	return cmd
}

// setupDataDir honours a --data-dir flag if the root command defines one,
// else $SMOLVM_DATA_DIR and the usual default.
func setupDataDir(cmd *cobra.Command) (datadir.Dir, error) {
	if f := cmd.Flags().Lookup("data-dir"); f != nil && f.Value.String() != "" {
		return datadir.Dir(f.Value.String()), nil
	}
	return datadir.Default()
}

func runSetup(ctx context.Context, d datadir.Dir, out io.Writer) error {
	start := time.Now()
	updated := false
	defer setupReturnToSudoUser(d, out)

	if missing := doctor.MissingPackages(); len(missing) > 0 {
		var err error
		updated, err = setupInstallPackages(ctx, out, missing)
		if err != nil {
			return err
		}
		if still := doctor.MissingPackages(); len(still) > 0 {
			return fmt.Errorf("packages %s installed but their tools are still not found", strings.Join(still, " "))
		}
	} else {
		fmt.Fprintln(out, "host packages: present")
	}

	k, err := kernel.Default(d)
	if errors.Is(err, kernel.ErrNoKernel) {
		fmt.Fprintln(out, "fetching the guest kernel...")
		k, err = kernel.Fetch(ctx, d, out)
		if err != nil && !updated && ctx.Err() == nil && os.Geteuid() == 0 && setupHaveApt() {
			// A stale or empty package list is the usual cause.
			fmt.Fprintf(out, "kernel fetch failed (%v); updating package lists and retrying\n", err)
			if uerr := setupApt(ctx, out, "update"); uerr != nil {
				return fmt.Errorf("apt-get update: %w", uerr)
			}
			k, err = kernel.Fetch(ctx, d, out)
		}
	}
	if err != nil {
		return fmt.Errorf("guest kernel: %w", err)
	}
	fmt.Fprintf(out, "guest kernel: %s\n", k.Version)

	b, err := image.Default(ctx, d, out)
	if err != nil {
		return fmt.Errorf("default image: %w", err)
	}
	fmt.Fprintf(out, "default image: %s (%d MiB)\n", b.Path, b.SizeBytes>>20)

	checks := doctor.Run(ctx, d)
	fmt.Fprintln(out)
	printDoctorTable(out, checks)
	if doctor.AnyMissing(checks) {
		return errors.New("setup finished but something is still missing (see above)")
	}
	fmt.Fprintf(out, "\nsmolvm is ready (setup took %.0f s); data in %s\n", time.Since(start).Seconds(), d.Path())
	return nil
}

// setupReturnToSudoUser hands the data directory back to the user who ran
// `sudo env SMOLVM_DATA_DIR=... smolvm setup`, so that user can run sandboxes
// from it without root. Images stay read-only (0444).
func setupReturnToSudoUser(d datadir.Dir, out io.Writer) {
	if os.Geteuid() != 0 || os.Getenv("SMOLVM_DATA_DIR") == "" {
		return
	}
	uid, err1 := strconv.Atoi(os.Getenv("SUDO_UID"))
	gid, err2 := strconv.Atoi(os.Getenv("SUDO_GID"))
	if err1 != nil || err2 != nil || uid == 0 {
		return
	}
	err := filepath.WalkDir(d.Path(), func(p string, _ fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		return os.Lchown(p, uid, gid)
	})
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		fmt.Fprintf(out, "warning: could not give %s back to uid %d: %v\n", d.Path(), uid, err)
	}
}

func setupHaveApt() bool {
	_, err := exec.LookPath("apt-get")
	return err == nil
}

// setupInstallPackages installs pkgs with apt-get, updating the package
// lists first if there are none, or once if the install fails. It reports
// whether it updated them.
func setupInstallPackages(ctx context.Context, out io.Writer, pkgs []string) (updated bool, err error) {
	install := append([]string{"install", "-y", "--no-install-recommends"}, pkgs...)
	if !setupHaveApt() {
		return false, fmt.Errorf("missing host packages and no apt-get here: install the equivalents of Debian's %s with your package manager",
			strings.Join(pkgs, ", "))
	}
	if os.Geteuid() != 0 {
		fmt.Fprintf(out, "missing host packages; installing them needs root:\n  sudo apt-get %s\nthen run `smolvm setup` again\n", strings.Join(install, " "))
		return false, errors.New("host packages missing: run the sudo command above")
	}
	fmt.Fprintf(out, "installing %s...\n", strings.Join(pkgs, " "))
	if lists, _ := filepath.Glob("/var/lib/apt/lists/*_Packages*"); len(lists) == 0 {
		if err := setupApt(ctx, out, "update"); err != nil {
			return false, fmt.Errorf("apt-get update: %w", err)
		}
		updated = true
	}
	err = setupApt(ctx, out, install...)
	if err != nil && !updated && ctx.Err() == nil {
		fmt.Fprintln(out, "install failed; updating package lists and retrying")
		if uerr := setupApt(ctx, out, "update"); uerr != nil {
			return false, fmt.Errorf("apt-get update: %w", uerr)
		}
		updated = true
		err = setupApt(ctx, out, install...)
	}
	if err != nil {
		return updated, fmt.Errorf("apt-get %s: %w", strings.Join(install, " "), err)
	}
	return updated, nil
}

func setupApt(ctx context.Context, out io.Writer, args ...string) error {
	cmd := exec.CommandContext(ctx, "apt-get", args...)
	cmd.Stdout = out
	cmd.Stderr = out
	cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
	// apt-get stops its own dpkg children when interrupted; give it time.
	cmd.Cancel = func() error { return cmd.Process.Signal(os.Interrupt) }
	cmd.WaitDelay = 30 * time.Second
	return cmd.Run()
}

func printDoctorTable(w io.Writer, checks []doctor.Check) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tSTATUS\tDETAIL")
	for _, c := range checks {
		fmt.Fprintf(tw, "%s\t%s\t%s\n", c.Name, c.Status, c.Detail)
	}
	tw.Flush()
	first := true
	for _, c := range checks {
		if c.Status == doctor.StatusOK || c.Fix == "" {
			continue
		}
		if first {
			fmt.Fprintln(w, "\nto fix:")
			first = false
		}
		fmt.Fprintf(w, "  %-20s %s\n", c.Name+":", c.Fix)
	}
}

func writeDoctorJSON(w io.Writer, checks []doctor.Check, missing bool) error {
	type problem struct {
		Code    string `json:"code"`
		Message string `json:"message"`
	}
	v := struct {
		OK   bool `json:"ok"`
		Data struct {
			Accelerator string         `json:"accelerator"`
			Checks      []doctor.Check `json:"checks"`
		} `json:"data"`
		Error *problem `json:"error,omitempty"`
	}{OK: !missing}
	v.Data.Accelerator, _ = doctor.Accelerator()
	v.Data.Checks = checks
	if missing {
		var names []string
		for _, c := range checks {
			if c.Status == doctor.StatusMissing {
				names = append(names, c.Name)
			}
		}
		v.Error = &problem{Code: "host_not_ready", Message: "missing: " + strings.Join(names, ", ") + "; run `smolvm setup`"}
	}
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

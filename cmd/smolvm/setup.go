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
	"github.com/smolvm/smolvm/internal/sandbox"
	"github.com/smolvm/smolvm/internal/vmm/drivers"
)

func newSetupCmd() *cobra.Command {
	var backend, fcBin, binDir string
	cmd := &cobra.Command{
		Use:   "setup",
		Short: "Prepare this host: install QEMU and tools, fetch the guest kernel, build the default image",
		Long: `Prepare this host to run sandboxes. Installs the missing Debian packages
(qemu-system-x86, qemu-utils, e2fsprogs, debootstrap) with apt-get, imports
Debian's kernel as the guest kernel, and builds the default Debian image
(about a minute). Needs root for the packages and the image build. Running it
again only checks, and returns at once.

--backend firecracker also installs a Firecracker release binary that you
downloaded (--firecracker-bin; no Debian package serves one) as
/usr/local/bin/firecracker, after checking that it runs. Firecracker needs a
working /dev/kvm; sandboxes then use it unless they name another backend.`,
		Example: `  sudo smolvm setup
  sudo smolvm setup --backend firecracker --firecracker-bin ./release-v1.17.0-x86_64/firecracker-v1.17.0-x86_64`,
		Args:         cobra.NoArgs,
		SilenceUsage: true,
		RunE: func(cmd *cobra.Command, _ []string) error {
			switch backend {
			case "qemu", "":
				if fcBin != "" {
					return errors.New("--firecracker-bin goes with --backend firecracker")
				}
			case "firecracker":
				if fcBin == "" {
					return errors.New("--backend firecracker needs --firecracker-bin PATH: a Firecracker release binary (https://github.com/firecracker-microvm/firecracker/releases), as no package serves one")
				}
			case "libkrun":
				return errors.New("--backend libkrun: install libkrun (libkrun.so.1) from your distribution or a release, and put smolvm-krun beside smolvm; `smolvm doctor` then shows the backend available")
			default:
				return fmt.Errorf("--backend %q: want qemu, firecracker or libkrun", backend)
			}
			d, err := setupDataDir(cmd)
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			if fcBin != "" {
				// Checked first: a wrong binary should not wait for the
				// image build to be reported.
				if err := installFirecracker(cmd.Context(), fcBin, binDir, out); err != nil {
					return err
				}
			}
			// cmd.Context() ends on SIGINT/SIGTERM; the build then removes
			// its temp files before returning.
			return runSetup(cmd.Context(), d, out)
		},
	}
	f := cmd.Flags()
	f.StringVar(&backend, "backend", "qemu", "backend to prepare besides QEMU's tools, kernel and image: qemu, firecracker or libkrun")
	f.StringVar(&fcBin, "firecracker-bin", "", "a Firecracker release binary to install (with --backend firecracker)")
	f.StringVar(&binDir, "bin-dir", "/usr/local/bin", "where --firecracker-bin is installed")
	f.MarkHidden("bin-dir")
	return cmd
}

// installFirecracker copies a Firecracker binary into binDir once it has
// shown its version: a file that is not Firecracker (or not for this
// machine) fails here rather than at the first sandbox.
func installFirecracker(ctx context.Context, src, binDir string, out io.Writer) error {
	// The file checked must be the file installed: a bare name would be
	// looked up on $PATH to run, but read from here to copy.
	src, err := filepath.Abs(src)
	if err != nil {
		return fmt.Errorf("--firecracker-bin: %w", err)
	}
	vctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	b, err := exec.CommandContext(vctx, src, "--version").CombinedOutput()
	version := strings.TrimSpace(strings.SplitN(string(b), "\n", 2)[0])
	if err != nil || !strings.HasPrefix(version, "Firecracker v") {
		return fmt.Errorf("%s is not a Firecracker binary that runs here (`%s --version`: %v %q)", src, src, err, version)
	}
	data, err := os.ReadFile(src)
	if err != nil {
		return fmt.Errorf("read %s: %w", src, err)
	}
	if err := os.MkdirAll(binDir, 0o755); err != nil {
		return fmt.Errorf("make %s: %w", binDir, err)
	}
	dst := filepath.Join(binDir, "firecracker")
	tmp, err := os.CreateTemp(binDir, ".firecracker-*")
	if err != nil {
		return fmt.Errorf("install firecracker in %s: %w (run as root)", binDir, err)
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return fmt.Errorf("write %s: %w", tmp.Name(), err)
	}
	if err := tmp.Chmod(0o755); err != nil {
		tmp.Close()
		return fmt.Errorf("chmod %s: %w", tmp.Name(), err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("write %s: %w", tmp.Name(), err)
	}
	// A rename replaces a binary that running VMMs still execute safely.
	if err := os.Rename(tmp.Name(), dst); err != nil {
		return fmt.Errorf("install %s: %w", dst, err)
	}
	fmt.Fprintf(out, "firecracker: %s installed as %s\n", version, dst)
	return nil
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
			checks := hostChecks(cmd.Context(), d)
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

	checks := hostChecks(ctx, d)
	fmt.Fprintln(out)
	printDoctorTable(out, checks)
	if doctor.AnyMissing(checks) {
		return errors.New("setup finished but something is still missing (see above)")
	}
	fmt.Fprintf(out, "\nsmolvm is ready (setup took %.0f s); data in %s\n", time.Since(start).Seconds(), d.Path())
	return nil
}

// hostChecks are doctor's checks of the host and data directory, and each
// backend's state.
func hostChecks(ctx context.Context, d datadir.Dir) []doctor.Check {
	checks := doctor.Run(ctx, d)
	var backends []doctor.Backend
	for _, b := range sandbox.BackendStates(drivers.Default("", "")) {
		backends = append(backends, doctor.Backend{Name: b.Name, Reason: b.Reason, Default: b.Default})
	}
	return append(checks, doctor.BackendChecks(backends)...)
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

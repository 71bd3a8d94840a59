package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/schollz/progressbar/v3"
	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/smolvm/smolvm/internal/datadir"
	"github.com/smolvm/smolvm/internal/image"
)

func newImageCmd() *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "image",
		Short: "Pull, list and remove the root filesystem images sandboxes boot from",
		Long: `Pull, list and remove the root filesystem images sandboxes boot from.

An image is an OCI reference (python:3.12-slim, ghcr.io/org/img:tag,
name@sha256:...), file:///path or an absolute path to an ext4 image, a qcow2
image or a root filesystem tarball, or s3://bucket/key holding one of those.
Each is turned into a read-only ext4 file once and cached by content in the
data directory; sandboxes overlay it.

Settings: SMOLVM_REGISTRY_MIRROR (a mirror for Docker Hub images),
SMOLVM_S3_ENDPOINT (an S3-compatible store), the Docker config for registry
credentials and the standard AWS settings for S3.

--json prints {"ok": true, "data": ...} or {"ok": false, "error": {"code",
"message"}} for scripts.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error { return cmd.Help() },
	}
	cmd.PersistentFlags().BoolVar(&asJSON, "json", false, "print JSON for scripts instead of tables")
	cmd.AddCommand(
		newImagePullCmd(&asJSON),
		newImageListCmd(&asJSON),
		newImageRmCmd(&asJSON),
		newImagePruneCmd(&asJSON),
	)
	return cmd
}

func newImagePullCmd(asJSON *bool) *cobra.Command {
	var osName, mirror string
	cmd := &cobra.Command{
		Use:   "pull {REF | --os NAME}",
		Short: "Fetch an image and build its root filesystem (again asking the registry for tags)",
		Example: "  smolvm image pull python:3.12-slim\n" +
			"  smolvm image pull --os alpine\n" +
			"  smolvm image pull file:///srv/images/rootfs.tar.gz\n" +
			"  smolvm image pull s3://my-bucket/images/base.qcow2",
		Args: func(cmd *cobra.Command, args []string) error {
			switch {
			case osName != "" && len(args) > 0:
				return errors.New("give either an image reference or --os, not both")
			case osName == "" && len(args) != 1:
				return errors.New("give one image reference, or --os NAME")
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			cmd.SilenceUsage = true
			return imageRun(cmd, *asJSON, func(d datadir.Dir) (any, func(io.Writer), error) {
				src := image.Source{OS: osName}
				if len(args) == 1 {
					src.Image = args[0]
				}
				disp := newPullDisplay(cmd.ErrOrStderr())
				defer disp.finish()
				b, err := image.Resolve(cmd.Context(), d, src, image.Options{
					Mirror:   mirror,
					Log:      disp,
					Progress: disp.progress,
					Refresh:  true,
				})
				disp.finish()
				if err != nil {
					return nil, nil, err
				}
				v := newImageView(b, false)
				return v, func(w io.Writer) {
					fmt.Fprintf(w, "%s %s %s %s\n", imageLabel(b), imageShortDigest(b), imageSize(b.SizeBytes), b.Path)
				}, nil
			})
		},
	}
	cmd.Flags().StringVar(&osName, "os", "", "pull an OS preset: alpine, ubuntu or debian (the default image, built locally)")
	cmd.Flags().StringVar(&mirror, "mirror", "", "registry mirror for Docker Hub images (default $SMOLVM_REGISTRY_MIRROR)")
	return cmd
}

func newImageListCmd(asJSON *bool) *cobra.Command {
	return &cobra.Command{
		Use:   "list",
		Short: "List cached images",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cmd.SilenceUsage = true
			return imageRun(cmd, *asJSON, func(d datadir.Dir) (any, func(io.Writer), error) {
				list, err := image.List(d)
				if err != nil {
					return nil, nil, err
				}
				inUse, err := image.InUse(d)
				if err != nil {
					return nil, nil, err
				}
				views := make([]imageView, 0, len(list))
				for _, b := range list {
					views = append(views, newImageView(b, inUse(b)))
				}
				return views, func(w io.Writer) {
					if len(list) == 0 {
						fmt.Fprintln(cmd.ErrOrStderr(), "no images cached; `smolvm image pull REF` fetches one")
						return
					}
					tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
					fmt.Fprintln(tw, "NAME/REF\tDIGEST\tSIZE\tCREATED\tIN USE")
					for _, b := range list {
						used := ""
						if inUse(b) {
							used = "yes"
						}
						fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", imageLabel(b), imageShortDigest(b), imageSize(b.SizeBytes), ago(b.Created), used)
					}
					tw.Flush()
				}, nil
			})
		},
	}
}

func newImageRmCmd(asJSON *bool) *cobra.Command {
	var force bool
	cmd := &cobra.Command{
		Use:   "rm REF...",
		Short: "Remove cached images",
		Long: "Remove cached images, named by reference, NAME/REF as listed, ID, or a\n" +
			"digest prefix (sha256:abc123...). An image some sandbox's disk is built on\n" +
			"is refused unless --force: removing it breaks that sandbox.",
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			cmd.SilenceUsage = true
			return imageRun(cmd, *asJSON, func(d datadir.Dir) (any, func(io.Writer), error) {
				inUse, err := image.InUse(d)
				if err != nil {
					return nil, nil, err
				}
				all, err := image.List(d)
				if err != nil {
					return nil, nil, err
				}
				var removed []string
				for _, ref := range args {
					if !force {
						for _, b := range all {
							if imageMatches(b, ref) && inUse(b) {
								return nil, nil, &image.Error{Code: "image_in_use", Ref: ref,
									Message: fmt.Sprintf("image %s is used by a sandbox: delete the sandbox first, or pass --force", ref)}
							}
						}
					}
					if err := image.Remove(d, ref); err != nil {
						return nil, nil, err
					}
					removed = append(removed, ref)
				}
				return map[string]any{"removed": removed}, func(w io.Writer) {
					for _, r := range removed {
						fmt.Fprintf(w, "removed %s\n", r)
					}
				}, nil
			})
		},
	}
	cmd.Flags().BoolVar(&force, "force", false, "remove even an image a sandbox is built on")
	return cmd
}

func newImagePruneCmd(asJSON *bool) *cobra.Command {
	var all bool
	cmd := &cobra.Command{
		Use:   "prune",
		Short: "Remove every cached image no sandbox is built on",
		Long: "Remove every cached image that no sandbox disk is built on. The current\n" +
			"default Debian image is kept unless --all (it takes a minute to rebuild).\n" +
			"Use is read from the data directory itself: each sandbox disk is a qcow2\n" +
			"overlay naming its base image.",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cmd.SilenceUsage = true
			return imageRun(cmd, *asJSON, func(d datadir.Dir) (any, func(io.Writer), error) {
				inUse, err := image.InUse(d)
				if err != nil {
					return nil, nil, err
				}
				keep := inUse
				if !all {
					if def, err := image.Cached(d); err == nil {
						keep = func(b *image.Base) bool { return b.ID == def.ID || inUse(b) }
					}
				}
				removed, err := image.Prune(d, keep)
				views := make([]imageView, 0, len(removed))
				var freed int64
				for _, b := range removed {
					views = append(views, newImageView(b, false))
					freed += b.SizeBytes
				}
				if err != nil {
					return nil, nil, err
				}
				return map[string]any{"removed": views, "freed_bytes": freed}, func(w io.Writer) {
					for _, b := range removed {
						fmt.Fprintf(w, "removed %s (%s)\n", imageLabel(b), imageShortDigest(b))
					}
					fmt.Fprintf(w, "%d images removed, %s freed\n", len(removed), imageSize(freed))
				}, nil
			})
		},
	}
	cmd.Flags().BoolVar(&all, "all", false, "remove the default Debian image too")
	return cmd
}

// imageView is an image in --json output.
type imageView struct {
	ID           string       `json:"id"`
	Name         string       `json:"name"`
	Ref          string       `json:"ref,omitempty"`
	Refs         []string     `json:"refs,omitempty"`
	Kind         string       `json:"kind"`
	Digest       string       `json:"digest"`
	SourceDigest string       `json:"source_digest,omitempty"`
	SizeBytes    int64        `json:"size_bytes"`
	Path         string       `json:"path"`
	Created      time.Time    `json:"created"`
	Config       image.Config `json:"config"`
	InUse        bool         `json:"in_use"`
}

func newImageView(b *image.Base, inUse bool) imageView {
	return imageView{
		ID: b.ID, Name: b.Name, Ref: b.Ref, Refs: b.Refs, Kind: b.Kind, Digest: b.Digest,
		SourceDigest: b.SourceDigest, SizeBytes: b.SizeBytes, Path: b.Path,
		Created: b.Created, Config: b.Config, InUse: inUse,
	}
}

// imageEnvelope is the --json output shape the sandbox commands use too.
type imageEnvelope struct {
	OK    bool        `json:"ok"`
	Data  any         `json:"data,omitempty"`
	Error *imageError `json:"error,omitempty"`
}

type imageError struct {
	Code    string `json:"code"`
	Message string `json:"message"`
	Ref     string `json:"ref,omitempty"`
}

// imageRun runs fn on the data directory and prints its result as a table
// or JSON. With --json, errors are printed as JSON too and the exit status
// is 1.
func imageRun(cmd *cobra.Command, asJSON bool, fn func(datadir.Dir) (data any, human func(io.Writer), err error)) error {
	d, err := datadir.Default()
	if err == nil {
		var data any
		var human func(io.Writer)
		data, human, err = fn(d)
		if err == nil {
			if asJSON {
				return imageWriteJSON(cmd.OutOrStdout(), imageEnvelope{OK: true, Data: data})
			}
			human(cmd.OutOrStdout())
			return nil
		}
	}
	if !asJSON {
		return err
	}
	ie := &imageError{Code: "internal", Message: err.Error()}
	if e, ok := image.AsError(err); ok {
		ie.Code, ie.Ref = e.Code, e.Ref
	}
	if werr := imageWriteJSON(cmd.OutOrStdout(), imageEnvelope{Error: ie}); werr != nil {
		return werr
	}
	return exitCode(1)
}

func imageWriteJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		return fmt.Errorf("write JSON: %w", err)
	}
	return nil
}

// imageMatches mirrors the names image.Remove accepts, for the in-use check.
func imageMatches(b *image.Base, ref string) bool {
	if ref == b.ID || ref == b.Ref || ref == b.Name || ref == b.Path || slices.Contains(b.Refs, ref) {
		return true
	}
	q := strings.TrimPrefix(ref, "sha256:")
	for _, dg := range []string{b.Digest, b.SourceDigest} {
		if len(q) >= 6 && strings.HasPrefix(strings.TrimPrefix(dg, "sha256:"), q) {
			return true
		}
	}
	return false
}

// imageLabel names an image by the references that resolve to it (List
// fills them in), else by its name.
func imageLabel(b *image.Base) string {
	if len(b.Refs) > 0 {
		return strings.Join(b.Refs, ", ")
	}
	if b.Name == "" {
		return b.Ref
	}
	return b.Name
}

func imageShortDigest(b *image.Base) string {
	d := b.SourceDigest
	if d == "" || !strings.HasPrefix(d, "sha256:") {
		d = b.Digest
	}
	d = strings.TrimPrefix(d, "sha256:")
	if len(d) > 12 {
		d = d[:12]
	}
	return d
}

func imageSize(n int64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.1f GiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%d MiB", n>>20)
	}
	return fmt.Sprintf("%d KiB", n>>10)
}

// pullDisplay shows a pull: on a terminal, a progress bar for the phases
// that move bytes, with log lines printed above it; elsewhere, the log
// lines alone.
type pullDisplay struct {
	w   io.Writer
	tty bool

	mu    sync.Mutex
	bar   *progressbar.ProgressBar
	phase string
}

func newPullDisplay(w io.Writer) *pullDisplay {
	tty := false
	if f, ok := w.(*os.File); ok {
		tty = term.IsTerminal(int(f.Fd()))
	}
	return &pullDisplay{w: w, tty: tty}
}

// Write prints a log line, clearing the bar first so they do not mix.
func (p *pullDisplay) Write(b []byte) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.bar != nil {
		p.bar.Clear()
	}
	return p.w.Write(b)
}

func (p *pullDisplay) progress(pr image.Progress) {
	if !p.tty {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if pr.Phase != p.phase {
		p.closeBar()
		p.phase = pr.Phase
		label := map[string]string{image.PhasePull: "downloading", image.PhaseExtract: "unpacking"}[pr.Phase]
		if label != "" && pr.Total > 0 {
			p.bar = progressbar.NewOptions64(pr.Total,
				progressbar.OptionSetWriter(p.w),
				progressbar.OptionSetDescription(label),
				progressbar.OptionShowBytes(true),
				progressbar.OptionSetWidth(30),
				progressbar.OptionThrottle(100*time.Millisecond),
				progressbar.OptionClearOnFinish(),
			)
		}
	}
	if p.bar != nil {
		p.bar.Set64(pr.Done)
	}
}

func (p *pullDisplay) closeBar() {
	if p.bar != nil {
		p.bar.Finish()
		p.bar = nil
	}
}

func (p *pullDisplay) finish() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.closeBar()
}

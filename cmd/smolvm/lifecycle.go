package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/smolvm/smolvm/internal/api"
	"github.com/smolvm/smolvm/internal/sandbox"
)

// lifecycleClient is the part of sandboxClient behind stop, start, pause,
// resume, update, logs and the snapshot commands.
type lifecycleClient interface {
	// Stop shuts the guest down, killing it after timeout seconds (0: the
	// server's default).
	Stop(ctx context.Context, id string, timeout int) (api.Sandbox, error)
	Start(ctx context.Context, id string) (api.Sandbox, error)
	Pause(ctx context.Context, id string) (api.Sandbox, error)
	Resume(ctx context.Context, id string) (api.Sandbox, error)
	Update(ctx context.Context, id string, req api.UpdateSandboxRequest) (api.Sandbox, error)
	// Logs copies the console log to w; with follow it goes on with what
	// is printed next, until ctx ends or the sandbox goes.
	Logs(ctx context.Context, id string, follow bool, w io.Writer) error
	CreateSnapshot(ctx context.Context, id string, req api.SnapshotRequest) (api.Snapshot, error)
	Snapshots(ctx context.Context) (api.SnapshotList, error)
	GetSnapshot(ctx context.Context, ref string) (api.Snapshot, error)
	DeleteSnapshot(ctx context.Context, ref string, force bool) error
	PruneSnapshots(ctx context.Context) (api.SnapshotList, error)
}

// The commands.

func newSandboxStopCmd(sf *sandboxFlags) *cobra.Command {
	var timeout int
	cmd := &cobra.Command{
		Use:   "stop ID",
		Short: "Shut a sandbox down, keeping its disk; start boots it again",
		Long: `Shut a sandbox's guest down cleanly, killing its VM if it has not powered
off within --timeout seconds. Its disk is kept: "smolvm sandbox start" boots it
again. A paused sandbox is resumed to shut down.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if timeout < 0 || timeout > 600 {
				return fmt.Errorf("--timeout %d is out of range: 1 to 600 seconds", timeout)
			}
			return withSandboxClient(cmd, sf, func(ctx context.Context, c sandboxClient) error {
				sb, err := c.Stop(ctx, args[0], timeout)
				if err != nil {
					return err
				}
				return printResult(cmd, sf, sb, func(w io.Writer) { fmt.Fprintf(w, "stopped %s\n", sb.ID) })
			})
		},
	}
	cmd.Flags().IntVar(&timeout, "timeout", 0, fmt.Sprintf("`SECONDS` the guest gets to shut down before its VM is killed (default %d)", int(sandbox.DefaultStopTimeout.Seconds())))
	return cmd
}

// newSandboxStateCmd is start, pause or resume: one id in, the sandbox out.
func newSandboxStateCmd(sf *sandboxFlags, verb, done, short string) *cobra.Command {
	return &cobra.Command{
		Use:   verb + " ID",
		Short: short,
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return withSandboxClient(cmd, sf, func(ctx context.Context, c sandboxClient) error {
				var fn func(context.Context, string) (api.Sandbox, error)
				switch verb {
				case "start":
					fn = c.Start
				case "pause":
					fn = c.Pause
				default:
					fn = c.Resume
				}
				sb, err := fn(ctx, args[0])
				if err != nil {
					return err
				}
				return printResult(cmd, sf, sb, func(w io.Writer) { fmt.Fprintf(w, "%s %s\n", done, sb.ID) })
			})
		},
	}
}

func newSandboxUpdateCmd(sf *sandboxFlags) *cobra.Command {
	var timeout int
	cmd := &cobra.Command{
		Use:   "update --timeout SECONDS ID",
		Short: "Change a sandbox's time limit",
		Long: `Set a sandbox's time limit to --timeout seconds from now; 0 removes it.
What happens at the limit is what create's --on-timeout said.`,
		Example: `  smolvm sandbox update --timeout 3600 vm-a1b2c3d4
  smolvm sandbox update --timeout 0 build-box`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if !cmd.Flags().Changed("timeout") {
				return errors.New("nothing to change: give --timeout SECONDS (0 removes the limit)")
			}
			if timeout < 0 || timeout > 86400 {
				return fmt.Errorf("--timeout %d is out of range: 0 to 86400 seconds", timeout)
			}
			return withSandboxClient(cmd, sf, func(ctx context.Context, c sandboxClient) error {
				sb, err := c.Update(ctx, args[0], api.UpdateSandboxRequest{Timeout: &timeout})
				if err != nil {
					return err
				}
				return printResult(cmd, sf, sb, func(w io.Writer) {
					if sb.ExpiresAt == nil {
						fmt.Fprintf(w, "%s has no time limit\n", sb.ID)
						return
					}
					fmt.Fprintf(w, "%s expires at %s (%s from now, then %s)\n", sb.ID,
						sb.ExpiresAt.Local().Format(time.RFC3339), time.Until(*sb.ExpiresAt).Round(time.Second), orDefault(sb.OnTimeout, "delete"))
				})
			})
		},
	}
	cmd.Flags().IntVar(&timeout, "timeout", 0, "the new limit in `SECONDS` from now; 0 removes it")
	return cmd
}

func newSandboxLogsCmd(sf *sandboxFlags) *cobra.Command {
	var follow bool
	cmd := &cobra.Command{
		Use:   "logs ID",
		Short: "Print a sandbox's console log (guest kernel and agent)",
		Long: `Print what the guest's kernel and agent wrote to the console since its VM
last started. With -f, keep printing what comes next until interrupted or the
sandbox is deleted. --json does not apply: the log is text.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return withSandboxClient(cmd, sf, func(ctx context.Context, c sandboxClient) error {
				return c.Logs(ctx, args[0], follow, cmd.OutOrStdout())
			})
		},
	}
	cmd.Flags().BoolVarP(&follow, "follow", "f", false, "keep printing new output")
	return cmd
}

// newSnapshotCmd is the top-level "smolvm snapshot", the same commands as
// "smolvm sandbox snapshot".
func newSnapshotCmd() *cobra.Command {
	var sf sandboxFlags
	cmd := newSnapshotGroupCmd(&sf, "snapshot", "Manage sandbox snapshots (the same as smolvm sandbox snapshot)")
	pf := cmd.PersistentFlags()
	pf.StringVar(&sf.url, "url", "", "base URL of a running smolvm server (default $SMOLVM_URL; none: use the data directory directly)")
	pf.StringVar(&sf.token, "token", "", "bearer token for the server (default $SMOLVM_TOKEN)")
	pf.BoolVar(&sf.asJSON, "json", false, "print JSON for scripts instead of tables")
	return cmd
}

func newSnapshotGroupCmd(sf *sandboxFlags, use, short string) *cobra.Command {
	cmd := &cobra.Command{
		Use:     use,
		Aliases: []string{"snapshots"},
		Short:   short,
		Long: `A snapshot saves a running or paused sandbox: its memory, processes, devices
and disk. "smolvm sandbox create --from-snapshot ID|NAME" starts forks of it.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error { return cmd.Help() },
	}
	cmd.AddCommand(newSnapshotCreateCmd(sf), newSnapshotListCmd(sf), newSnapshotGetCmd(sf), newSnapshotRmCmd(sf), newSnapshotPruneCmd(sf))
	return cmd
}

func newSnapshotCreateCmd(sf *sandboxFlags) *cobra.Command {
	var req api.SnapshotRequest
	cmd := &cobra.Command{
		Use:   "create [--name NAME] [--stop] SANDBOX",
		Short: "Snapshot a running or paused sandbox",
		Long: `Save a sandbox's memory, devices and disk. The sandbox stands still while it is
saved and then goes on as it was, unless --stop.`,
		Example: `  smolvm sandbox snapshot create --name after-setup vm-a1b2c3d4
  smolvm sandbox create --from-snapshot after-setup`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return withSandboxClient(cmd, sf, func(ctx context.Context, c sandboxClient) error {
				s, err := c.CreateSnapshot(ctx, args[0], req)
				if err != nil {
					return err
				}
				return printResult(cmd, sf, s, func(w io.Writer) {
					fmt.Fprintf(w, "snapshot %s of %s (%s)\n", snapshotLabel(s), s.Sandbox, mib(s.SizeBytes))
				})
			})
		},
	}
	cmd.Flags().StringVar(&req.Name, "name", "", "a unique `NAME` (lowercase letters, digits and -), usable wherever the id is")
	cmd.Flags().BoolVar(&req.Stop, "stop", false, "stop the sandbox once it is saved")
	return cmd
}

func newSnapshotListCmd(sf *sandboxFlags) *cobra.Command {
	return &cobra.Command{
		Use:     "list",
		Aliases: []string{"ls"},
		Short:   "List snapshots, newest first",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return withSandboxClient(cmd, sf, func(ctx context.Context, c sandboxClient) error {
				list, err := c.Snapshots(ctx)
				if err != nil {
					return err
				}
				return printResult(cmd, sf, list, func(w io.Writer) { printSnapshotTable(w, list.Snapshots) })
			})
		},
	}
}

func newSnapshotGetCmd(sf *sandboxFlags) *cobra.Command {
	return &cobra.Command{
		Use:     "get ID",
		Aliases: []string{"info"},
		Short:   "Show one snapshot",
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return withSandboxClient(cmd, sf, func(ctx context.Context, c sandboxClient) error {
				s, err := c.GetSnapshot(ctx, args[0])
				if err != nil {
					return err
				}
				return printResult(cmd, sf, s, func(w io.Writer) { printSnapshotTable(w, []api.Snapshot{s}) })
			})
		},
	}
}

func newSnapshotRmCmd(sf *sandboxFlags) *cobra.Command {
	var force bool
	cmd := &cobra.Command{
		Use:     "rm [--force] ID",
		Aliases: []string{"delete"},
		Short:   "Delete a snapshot",
		Long: `Delete a snapshot. It is refused while sandboxes are forks of it, unless
--force, which deletes those sandboxes first.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return withSandboxClient(cmd, sf, func(ctx context.Context, c sandboxClient) error {
				if err := c.DeleteSnapshot(ctx, args[0], force); err != nil {
					return err
				}
				res := deleted{ID: args[0], Deleted: true}
				return printResult(cmd, sf, res, func(w io.Writer) { fmt.Fprintf(w, "deleted %s\n", args[0]) })
			})
		},
	}
	cmd.Flags().BoolVar(&force, "force", false, "delete the sandboxes forked from it too")
	return cmd
}

func newSnapshotPruneCmd(sf *sandboxFlags) *cobra.Command {
	return &cobra.Command{
		Use:   "prune",
		Short: "Delete every snapshot no sandbox or other snapshot is made from",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return withSandboxClient(cmd, sf, func(ctx context.Context, c sandboxClient) error {
				list, err := c.PruneSnapshots(ctx)
				if err != nil {
					return err
				}
				return printResult(cmd, sf, list, func(w io.Writer) {
					if len(list.Snapshots) == 0 {
						fmt.Fprintln(w, "no unused snapshots")
					}
					for _, s := range list.Snapshots {
						fmt.Fprintf(w, "deleted %s (%s)\n", snapshotLabel(s), mib(s.SizeBytes))
					}
				})
			})
		},
	}
}

// Flag parsing.

// keyValues parses repeated KEY=VALUE flags; nil when there are none.
func keyValues(flag string, kvs []string) (map[string]string, error) {
	if len(kvs) == 0 {
		return nil, nil
	}
	out := make(map[string]string, len(kvs))
	for _, kv := range kvs {
		k, v, ok := strings.Cut(kv, "=")
		if !ok || k == "" {
			return nil, fmt.Errorf("%s %q: want KEY=VALUE", flag, kv)
		}
		out[k] = v
	}
	return out, nil
}

// parseMounts parses --mount HOST:GUEST[:rw|:ro]; the host path is made
// absolute here, relative to the working directory.
func parseMounts(specs []string) ([]api.MountSpec, error) {
	var out []api.MountSpec
	for _, spec := range specs {
		parts := strings.Split(spec, ":")
		readOnly := true
		if n := len(parts); n == 3 {
			switch parts[2] {
			case "rw":
				readOnly = false
			case "ro":
			default:
				return nil, fmt.Errorf("--mount %q: the third part is rw or ro, not %q", spec, parts[2])
			}
			parts = parts[:2]
		}
		if len(parts) != 2 || parts[0] == "" || parts[1] == "" {
			return nil, fmt.Errorf("--mount %q: want HOST:GUEST or HOST:GUEST:rw", spec)
		}
		if !strings.HasPrefix(parts[1], "/") {
			return nil, fmt.Errorf("--mount %q: the guest path %q must be absolute", spec, parts[1])
		}
		host, err := filepath.Abs(parts[0])
		if err != nil {
			return nil, fmt.Errorf("--mount %q: %w", spec, err)
		}
		ro := readOnly
		out = append(out, api.MountSpec{Host: host, Guest: parts[1], ReadOnly: &ro})
	}
	return out, nil
}

func sortedKeys(m map[string]string) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

// Output.

func snapshotLabel(s api.Snapshot) string {
	if s.Name != "" {
		return s.ID + " (" + s.Name + ")"
	}
	return s.ID
}

func mib(b int64) string {
	return fmt.Sprintf("%d MiB", (b+(1<<20)-1)>>20)
}

func orDefault(s, def string) string {
	if s == "" {
		return def
	}
	return s
}

func printSnapshotTable(w io.Writer, list []api.Snapshot) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tNAME\tSANDBOX\tOS\tBACKEND\tMEMORY\tVCPUS\tSIZE\tCREATED")
	for _, s := range list {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%d MiB\t%d\t%s\t%s\n",
			s.ID, orDash(s.Name), s.Sandbox, orDash(s.OS), orDash(s.Backend), s.Memory, s.VCPUs, mib(s.SizeBytes), ago(s.CreatedAt))
	}
	tw.Flush()
}

// labelsSummary renders labels as k=v,k=v in key order.
func labelsSummary(labels map[string]string) string {
	parts := make([]string, 0, len(labels))
	for _, k := range sortedKeys(labels) {
		parts = append(parts, k+"="+labels[k])
	}
	return strings.Join(parts, ",")
}

// The Manager in this process.

func (c localSandboxClient) Stop(ctx context.Context, id string, timeout int) (api.Sandbox, error) {
	if err := c.m.Stop(ctx, id, time.Duration(timeout)*time.Second); err != nil {
		return api.Sandbox{}, err
	}
	return c.Get(ctx, id)
}

func (c localSandboxClient) Start(ctx context.Context, id string) (api.Sandbox, error) {
	return sandboxOf(c.m.Start(ctx, id))
}

func (c localSandboxClient) Pause(ctx context.Context, id string) (api.Sandbox, error) {
	return sandboxOf(c.m.Pause(ctx, id))
}

func (c localSandboxClient) Resume(ctx context.Context, id string) (api.Sandbox, error) {
	return sandboxOf(c.m.Resume(ctx, id))
}

func (c localSandboxClient) Update(ctx context.Context, id string, req api.UpdateSandboxRequest) (api.Sandbox, error) {
	var ureq sandbox.UpdateRequest
	if req.Timeout != nil {
		t := time.Duration(*req.Timeout) * time.Second
		ureq.Timeout = &t
	}
	return sandboxOf(c.m.Update(ctx, id, ureq))
}

func sandboxOf(info sandbox.Info, err error) (api.Sandbox, error) {
	if err != nil {
		return api.Sandbox{}, err
	}
	return api.SandboxFromInfo(info), nil
}

// localLogPoll is how often a followed console log is read for more.
const localLogPoll = 200 * time.Millisecond

func (c localSandboxClient) Logs(ctx context.Context, id string, follow bool, w io.Writer) error {
	path, err := c.m.ConsoleLog(ctx, id)
	if err != nil {
		return err
	}
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return &sandbox.Error{Kind: sandbox.KindNotFound, Code: "console_not_found", Message: "the sandbox has no console log yet"}
	}
	if err != nil {
		return err
	}
	defer f.Close()
	if _, err := io.Copy(w, f); err != nil || !follow {
		return err
	}
	t := time.NewTicker(localLogPoll)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		n, err := io.Copy(w, f)
		if err != nil {
			return err
		}
		if n == 0 {
			if _, err := c.m.Get(ctx, id); err != nil {
				return nil
			}
		}
	}
}

func (c localSandboxClient) CreateSnapshot(ctx context.Context, id string, req api.SnapshotRequest) (api.Snapshot, error) {
	s, err := c.m.CreateSnapshot(ctx, id, sandbox.SnapshotRequest{Name: req.Name, Stop: req.Stop})
	if err != nil {
		return api.Snapshot{}, err
	}
	return api.SnapshotFrom(s), nil
}

func (c localSandboxClient) Snapshots(ctx context.Context) (api.SnapshotList, error) {
	all, err := c.m.Snapshots()
	if err != nil {
		return api.SnapshotList{}, err
	}
	return snapshotList(all), nil
}

func (c localSandboxClient) GetSnapshot(ctx context.Context, ref string) (api.Snapshot, error) {
	s, err := c.m.GetSnapshot(ctx, ref)
	if err != nil {
		return api.Snapshot{}, err
	}
	return api.SnapshotFrom(s), nil
}

func (c localSandboxClient) DeleteSnapshot(ctx context.Context, ref string, force bool) error {
	return c.m.DeleteSnapshot(ctx, ref, force)
}

func (c localSandboxClient) PruneSnapshots(ctx context.Context) (api.SnapshotList, error) {
	removed, err := c.m.PruneSnapshots(ctx)
	if err != nil {
		return api.SnapshotList{}, err
	}
	return snapshotList(removed), nil
}

func snapshotList(all []sandbox.Snapshot) api.SnapshotList {
	out := api.SnapshotList{Snapshots: make([]api.Snapshot, 0, len(all))}
	for _, s := range all {
		out.Snapshots = append(out.Snapshots, api.SnapshotFrom(s))
	}
	return out
}

// A server over HTTP.

func sandboxPath(id string, rest ...string) string {
	return "/sandboxes/" + url.PathEscape(id) + strings.Join(rest, "")
}

func (c *httpSandboxClient) Stop(ctx context.Context, id string, timeout int) (api.Sandbox, error) {
	var in any // no body: the server's default timeout
	if timeout > 0 {
		in = api.StopRequest{Timeout: timeout}
	}
	var sb api.Sandbox
	err := c.do(ctx, http.MethodPost, sandboxPath(id, "/stop"), in, &sb)
	return sb, err
}

func (c *httpSandboxClient) Start(ctx context.Context, id string) (api.Sandbox, error) {
	var sb api.Sandbox
	err := c.do(ctx, http.MethodPost, sandboxPath(id, "/start"), nil, &sb)
	return sb, err
}

func (c *httpSandboxClient) Pause(ctx context.Context, id string) (api.Sandbox, error) {
	var sb api.Sandbox
	err := c.do(ctx, http.MethodPost, sandboxPath(id, "/pause"), nil, &sb)
	return sb, err
}

func (c *httpSandboxClient) Resume(ctx context.Context, id string) (api.Sandbox, error) {
	var sb api.Sandbox
	err := c.do(ctx, http.MethodPost, sandboxPath(id, "/resume"), nil, &sb)
	return sb, err
}

func (c *httpSandboxClient) Update(ctx context.Context, id string, req api.UpdateSandboxRequest) (api.Sandbox, error) {
	var sb api.Sandbox
	err := c.do(ctx, http.MethodPatch, sandboxPath(id), req, &sb)
	return sb, err
}

func (c *httpSandboxClient) Logs(ctx context.Context, id string, follow bool, w io.Writer) error {
	u := c.base.JoinPath(sandboxPath(id, "/logs"))
	if follow {
		u.RawQuery = "follow=true"
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	if err != nil {
		return fmt.Errorf("GET %s: %w", u.Path, err)
	}
	req.Header.Set("Accept", "text/plain, application/problem+json")
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return fmt.Errorf("reach smolvm server at %s: %w (is `smolvm server start` running?)", c.base, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode >= 300 {
		return responseError(resp, http.MethodGet, u.Path)
	}
	if _, err := io.Copy(w, resp.Body); err != nil && ctx.Err() == nil {
		return fmt.Errorf("read the console log: %w", err)
	}
	return nil
}

// responseError turns an error response into a *problemError, or a plain
// error when it is not a problem document.
func responseError(resp *http.Response, method, path string) error {
	data, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	var p api.Problem
	if err := json.Unmarshal(data, &p); err != nil || p.Code == "" {
		return fmt.Errorf("%s %s: %s: %s", method, path, resp.Status, strings.TrimSpace(string(data)))
	}
	return &problemError{p: p}
}

func (c *httpSandboxClient) CreateSnapshot(ctx context.Context, id string, req api.SnapshotRequest) (api.Snapshot, error) {
	var s api.Snapshot
	err := c.do(ctx, http.MethodPost, sandboxPath(id, "/snapshots"), req, &s)
	return s, err
}

func (c *httpSandboxClient) Snapshots(ctx context.Context) (api.SnapshotList, error) {
	var list api.SnapshotList
	err := c.do(ctx, http.MethodGet, "/snapshots", nil, &list)
	return list, err
}

func (c *httpSandboxClient) GetSnapshot(ctx context.Context, ref string) (api.Snapshot, error) {
	var s api.Snapshot
	err := c.do(ctx, http.MethodGet, "/snapshots/"+url.PathEscape(ref), nil, &s)
	return s, err
}

func (c *httpSandboxClient) DeleteSnapshot(ctx context.Context, ref string, force bool) error {
	path := "/snapshots/" + url.PathEscape(ref)
	if force {
		path += "?force=true"
	}
	return c.do(ctx, http.MethodDelete, path, nil, nil)
}

func (c *httpSandboxClient) PruneSnapshots(ctx context.Context) (api.SnapshotList, error) {
	var list api.SnapshotList
	err := c.do(ctx, http.MethodPost, "/snapshots/prune", nil, &list)
	return list, err
}

// deleted is what --json prints for a sandbox or snapshot removed: the
// API answers 204 with no body.
type deleted struct {
	ID      string `json:"id"`
	Deleted bool   `json:"deleted"`
}

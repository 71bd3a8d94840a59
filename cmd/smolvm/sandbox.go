package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/smolvm/smolvm/internal/api"
	"github.com/smolvm/smolvm/internal/network"
	"github.com/smolvm/smolvm/internal/sandbox"
)

// timeoutExitCode is what `smolvm sandbox exec` exits with when the command
// ran past its timeout, as timeout(1) does.
const timeoutExitCode = 124

// sandboxFlags are shared by every sandbox subcommand.
type sandboxFlags struct {
	url    string
	token  string
	asJSON bool
	// allowMounts are the host directories a Manager opened in this
	// process lets sandboxes mount: those create --mount names, which the
	// user running the CLI on the data directory may share anyway.
	allowMounts []string
}

func newSandboxCmd() *cobra.Command {
	var sf sandboxFlags
	cmd := &cobra.Command{
		Use:   "sandbox",
		Short: "Create, list, inspect, run commands in and delete sandboxes",
		Long: `Create, list, inspect, run commands in and delete sandboxes, and expose
their ports on the host.

With --url (or $SMOLVM_URL) the commands talk to a running "smolvm server";
without, they work directly on the data directory, which a running server may
share. --json prints {"ok": true, "data": ...} or {"ok": false, "error":
{"code", "message", "field"}} for scripts; data has the shapes of the HTTP API.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error { return cmd.Help() },
	}
	pf := cmd.PersistentFlags()
	pf.StringVar(&sf.url, "url", "", "base URL of a running smolvm server (default $SMOLVM_URL; none: use the data directory directly)")
	pf.StringVar(&sf.token, "token", "", "bearer token for the server (default $SMOLVM_TOKEN)")
	pf.BoolVar(&sf.asJSON, "json", false, "print JSON for scripts instead of tables")
	cmd.AddCommand(
		newSandboxCreateCmd(&sf),
		newSandboxListCmd(&sf),
		newSandboxGetCmd(&sf),
		newSandboxExecCmd(&sf),
		newSandboxShellCmd(&sf),
		newSandboxCpCmd(&sf),
		newSandboxDeleteCmd(&sf),
		newSandboxPortCmd(&sf),
		newSandboxStopCmd(&sf),
		newSandboxStateCmd(&sf, "start", "started", "Boot a stopped sandbox again from its own disk"),
		newSandboxStateCmd(&sf, "pause", "paused", "Freeze a sandbox's vCPUs, keeping its memory, until resume"),
		newSandboxStateCmd(&sf, "resume", "resumed", "Let a paused sandbox run on from where it was"),
		newSandboxUpdateCmd(&sf),
		newSandboxLogsCmd(&sf),
		newSnapshotGroupCmd(&sf, "snapshot", "Save sandboxes (memory, processes and disk) and manage the snapshots"),
	)
	return cmd
}

func newSandboxCreateCmd(sf *sandboxFlags) *cobra.Command {
	var req api.CreateSandboxRequest
	var nf networkFlags
	var labels, env, mounts []string
	cmd := &cobra.Command{
		Use:   "create",
		Short: "Create and boot a sandbox; returns once it runs commands",
		Example: `  smolvm sandbox create
  smolvm sandbox create --os ubuntu --memory 1024 --disk-size 2048 --json
  smolvm sandbox create -p 8080 -p 3000:3000
  smolvm sandbox create --network restricted --allow 10.0.0.0/8 --allow 1.1.1.1
  smolvm sandbox create --network off
  smolvm sandbox create --name build-box --label team=ml --env LANG=C.UTF-8 --timeout 3600 --on-timeout pause
  smolvm sandbox create --from-snapshot after-setup
  smolvm sandbox create --mount $PWD:/workspace --mount /data/cache:/cache:rw`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := nf.apply(&req, cmd.Flags().Changed("network")); err != nil {
				return err
			}
			var err error
			if req.Labels, err = keyValues("--label", labels); err != nil {
				return err
			}
			if req.Env, err = keyValues("--env", env); err != nil {
				return err
			}
			if req.Mounts, err = parseMounts(mounts); err != nil {
				return err
			}
			for _, m := range req.Mounts {
				sf.allowMounts = append(sf.allowMounts, m.Host)
			}
			return withSandboxClient(cmd, sf, func(ctx context.Context, c sandboxClient) error {
				sb, err := c.Create(ctx, req)
				if err != nil {
					return err
				}
				return printResult(cmd, sf, sb, func(w io.Writer) { printSandbox(w, sb) })
			})
		},
	}
	f := cmd.Flags()
	f.StringVar(&req.OS, "os", "", "guest OS: alpine, ubuntu, debian or windows (default: the default Linux image)")
	f.StringVar(&req.Image, "image", "", "image reference to boot (default: the OS's image)")
	f.IntVar(&req.Memory, "memory", 0, fmt.Sprintf("guest memory in MiB, %d to %d (default %d)", sandbox.MinMemoryMiB, sandbox.MaxMemoryMiB, sandbox.DefaultMemoryMiB))
	f.IntVar(&req.DiskSize, "disk-size", 0, fmt.Sprintf("guest disk size in MiB, %d to %d (default %d)", sandbox.MinDiskMiB, sandbox.MaxDiskMiB, sandbox.DefaultDiskMiB))
	f.IntVar(&req.VCPUs, "vcpus", 0, fmt.Sprintf("virtual CPUs, %d to %d (default %d)", sandbox.MinVCPUs, sandbox.MaxVCPUs, sandbox.DefaultVCPUs))
	f.StringVar(&req.Backend, "backend", "", "runtime backend: auto (the fastest this host runs), firecracker, qemu or libkrun")
	f.StringVar(&nf.mode, "network", string(network.ModeOpen), "what the guest may reach: `MODE` is open (the public Internet: not the host, link-local or private addresses), off (no network) or restricted (only --allow)")
	f.StringSliceVar(&nf.allow, "allow", nil, "an IPv4 `CIDR` or address the guest may connect to, with --network restricted (which it implies when --network is not given), or a private one it may reach with --network open; repeatable")
	f.BoolVar(&nf.hostLoopback, "allow-host-loopback", false, "let the guest reach services on the host's 127.0.0.1, as host.smolvm.internal")
	f.BoolVar(&nf.private, "allow-private", false, "with --network open: let the guest reach private ranges (10/8, 172.16/12, 192.168/16, 100.64/10), such as a LAN")
	f.StringArrayVarP(&nf.ports, "port", "p", nil, "expose a guest TCP port on the host; `PORT` is GUEST, HOST:GUEST or ADDRESS:HOST:GUEST, host side first as in docker (a free host port when HOST is left out, address 127.0.0.1 by default); repeatable")
	f.StringVar(&req.Name, "name", "", "a unique `NAME` (lowercase letters, digits and -), usable wherever the id is")
	f.StringArrayVar(&labels, "label", nil, "a `KEY=VALUE` label, to find the sandbox with list --label; repeatable")
	f.StringArrayVar(&env, "env", nil, "a `KEY=VALUE` environment variable every command in the sandbox sees; repeatable")
	f.IntVar(&req.Timeout, "timeout", 0, "end the sandbox this many `SECONDS` after it is created, as --on-timeout says (default: no limit; sandbox update changes it)")
	f.StringVar(&req.OnTimeout, "on-timeout", "", "what --timeout does: delete (the default) or pause")
	f.StringVar(&req.Snapshot, "from-snapshot", "", "start the sandbox as a fork of this snapshot (`ID` or name): memory, processes and files")
	f.StringArrayVar(&mounts, "mount", nil, "share a host directory: `HOST:GUEST[:rw]`, read-only unless :rw; the server must allow HOST (server start --allow-mount); repeatable")
	return cmd
}

func newSandboxListCmd(sf *sandboxFlags) *cobra.Command {
	var labels []string
	cmd := &cobra.Command{
		Use:     "list",
		Aliases: []string{"ls"},
		Short:   "List sandboxes, oldest first",
		Example: `  smolvm sandbox list --label team=ml --label env=dev`,
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			filter, err := keyValues("--label", labels)
			if err != nil {
				return err
			}
			return withSandboxClient(cmd, sf, func(ctx context.Context, c sandboxClient) error {
				list, err := c.List(ctx, filter)
				if err != nil {
					return err
				}
				return printResult(cmd, sf, list, func(w io.Writer) { printSandboxTable(w, list.Sandboxes) })
			})
		},
	}
	cmd.Flags().StringArrayVar(&labels, "label", nil, "only sandboxes with this `KEY=VALUE` label; repeatable (all must match)")
	return cmd
}

func newSandboxGetCmd(sf *sandboxFlags) *cobra.Command {
	return &cobra.Command{
		Use:     "get ID",
		Aliases: []string{"info"},
		Short:   "Show one sandbox",
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return withSandboxClient(cmd, sf, func(ctx context.Context, c sandboxClient) error {
				sb, err := c.Get(ctx, args[0])
				if err != nil {
					return err
				}
				return printResult(cmd, sf, sb, func(w io.Writer) { printSandbox(w, sb) })
			})
		},
	}
}

func newSandboxDeleteCmd(sf *sandboxFlags) *cobra.Command {
	return &cobra.Command{
		Use:     "delete ID",
		Aliases: []string{"rm"},
		Short:   "Stop a sandbox and remove its files and record",
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return withSandboxClient(cmd, sf, func(ctx context.Context, c sandboxClient) error {
				if err := c.Delete(ctx, args[0]); err != nil {
					return err
				}
				res := deleted{ID: args[0], Deleted: true}
				return printResult(cmd, sf, res, func(w io.Writer) { fmt.Fprintf(w, "deleted %s\n", args[0]) })
			})
		},
	}
}

func newSandboxExecCmd(sf *sandboxFlags) *cobra.Command {
	var timeout int
	var shell, cwd string
	var env []string
	var tty, interactive bool
	cmd := &cobra.Command{
		Use:   "exec ID -- COMMAND [ARG...]",
		Short: "Run a command in a sandbox; exits with the command's status",
		Long: `Run a command in a sandbox and exit with its exit status. Its stdout and
stderr are printed to this program's stdout and stderr as it writes them
(with --json, once it ends). A command that runs past --timeout is killed:
what it wrote is printed and the exit status is 124.

A single COMMAND argument is passed as written, so shell syntax works:
  smolvm sandbox exec ID -- 'ls / | wc -l'
Several arguments are quoted so that each stays one word.`,
		Example: `  smolvm sandbox exec vm-a1b2c3d4 -- python3 --version
  smolvm sandbox exec vm-a1b2c3d4 --timeout 300 -- 'apt-get update && apt-get install -y curl'`,
		Args: cobra.MinimumNArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			// "--" is needed only when the command has arguments that look
			// like flags; it must come right after the id.
			if dash := cmd.ArgsLenAtDash(); dash != -1 && dash != 1 {
				return errors.New("usage: smolvm sandbox exec ID -- COMMAND [ARG...]")
			}
			if timeout < sandbox.MinTimeoutSec || timeout > sandbox.MaxTimeoutSec {
				return fmt.Errorf("--timeout %d is out of range: %d to %d seconds", timeout, sandbox.MinTimeoutSec, sandbox.MaxTimeoutSec)
			}
			if shell != string(sandbox.ShellLogin) && shell != string(sandbox.ShellRaw) {
				return fmt.Errorf("--shell %q: use login or raw", shell)
			}
			id, command := args[0], joinCommand(args[1:])
			if tty {
				if cwd != "" || len(env) > 0 {
					return errors.New("-t runs the command through the login shell on a terminal: put cd and variables in the command instead of --cwd and --env")
				}
				return runTerminal(cmd, sf, id, command)
			}
			if interactive {
				return errors.New("-i needs -t: input goes to a command on a terminal (smolvm sandbox exec -it ID -- CMD)")
			}
			req := api.ExecRequest{Command: command, Timeout: timeout, Shell: shell, Cwd: cwd}
			for _, kv := range env {
				k, v, ok := strings.Cut(kv, "=")
				if !ok {
					return fmt.Errorf("--env %q: want KEY=VALUE", kv)
				}
				if req.Env == nil {
					req.Env = map[string]string{}
				}
				req.Env[k] = v
			}
			return withSandboxClient(cmd, sf, func(ctx context.Context, c sandboxClient) error {
				if !sf.asJSON {
					// Output is printed as the command writes it.
					res, err := c.Stream(ctx, id, req, cmd.OutOrStdout(), cmd.ErrOrStderr())
					var to *timeoutError
					if errors.As(err, &to) {
						return reportTimeout(cmd, sf, to)
					}
					if err != nil {
						return err
					}
					if res.ExitCode != 0 {
						return exitCode(res.ExitCode)
					}
					return nil
				}
				res, err := c.Exec(ctx, id, req)
				var to *timeoutError
				if errors.As(err, &to) {
					return reportTimeout(cmd, sf, to)
				}
				if err != nil {
					return err
				}
				if sf.asJSON {
					if err := writeJSON(cmd.OutOrStdout(), cliEnvelope{OK: true, Data: res}); err != nil {
						return err
					}
				} else {
					io.WriteString(cmd.OutOrStdout(), res.Stdout)
					io.WriteString(cmd.ErrOrStderr(), res.Stderr)
				}
				if res.ExitCode != 0 {
					return exitCode(res.ExitCode)
				}
				return nil
			})
		},
	}
	f := cmd.Flags()
	f.IntVar(&timeout, "timeout", int(sandbox.DefaultTimeout.Seconds()), "seconds to wait before the command is killed")
	f.StringVar(&shell, "shell", string(sandbox.ShellLogin), "login: run through the guest's login shell; raw: run with /bin/sh -c, no profile")
	f.StringVar(&cwd, "cwd", "", "absolute working directory in the guest (default: the image's, else the user's home)")
	f.StringArrayVar(&env, "env", nil, "KEY=VALUE added to the command's environment (repeatable)")
	f.BoolVarP(&tty, "tty", "t", false, "run the command on a terminal in the guest, this terminal in raw mode (as smolvm sandbox shell does)")
	f.BoolVarP(&interactive, "interactive", "i", false, "with -t: pass this program's input to the command")
	return cmd
}

func reportTimeout(cmd *cobra.Command, sf *sandboxFlags, to *timeoutError) error {
	if sf.asJSON {
		if err := writeJSON(cmd.OutOrStdout(), cliEnvelope{Error: &cliError{
			Code: api.CodeCommandTimeout, Message: to.Error(), Field: "timeout",
			Stdout: &to.stdout, Stderr: &to.stderr,
		}}); err != nil {
			return err
		}
		return exitCode(timeoutExitCode)
	}
	io.WriteString(cmd.OutOrStdout(), to.stdout)
	io.WriteString(cmd.ErrOrStderr(), to.stderr)
	if to.stderr != "" && !strings.HasSuffix(to.stderr, "\n") {
		fmt.Fprintln(cmd.ErrOrStderr())
	}
	fmt.Fprintf(cmd.ErrOrStderr(), "smolvm: %s\n", to.Error())
	return exitCode(timeoutExitCode)
}

// joinCommand makes one command string from argv: a single argument is taken
// as written (it may use shell syntax); several are each quoted as needed, so
// both shells see the same words.
func joinCommand(argv []string) string {
	if len(argv) == 1 {
		return argv[0]
	}
	quoted := make([]string, len(argv))
	for i, a := range argv {
		quoted[i] = shellQuote(a)
	}
	return strings.Join(quoted, " ")
}

func shellQuote(s string) string {
	if s == "" {
		return "''"
	}
	safe := true
	for _, r := range s {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || strings.ContainsRune("-_./=:,+@%", r)) {
			safe = false
			break
		}
	}
	if safe {
		return s
	}
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// sandboxClient is what the subcommands need, served either by a running
// server or by a Manager on the data directory.
type sandboxClient interface {
	Create(ctx context.Context, req api.CreateSandboxRequest) (api.Sandbox, error)
	// List returns the sandboxes carrying every label of labels.
	List(ctx context.Context, labels map[string]string) (api.SandboxList, error)
	Get(ctx context.Context, id string) (api.Sandbox, error)
	// Exec returns a *timeoutError when the command ran past its timeout.
	Exec(ctx context.Context, id string, req api.ExecRequest) (api.ExecResult, error)
	// Stream writes the command's output as it comes; it too returns a
	// *timeoutError (with no output: it was written) on a timeout.
	Stream(ctx context.Context, id string, req api.ExecRequest, stdout, stderr io.Writer) (api.ExecExitEvent, error)
	// Terminal runs command (the login shell when empty) on a PTY of
	// size, copying in to it and its output to out, and returns its
	// exit status.
	Terminal(ctx context.Context, id, command string, size sandbox.TerminalSize, in io.Reader, out io.Writer, resize <-chan sandbox.TerminalSize) (int, error)
	// The file operations behind cp (cp.go).
	StatPath(ctx context.Context, id, p string) (api.FileEntry, error)
	Download(ctx context.Context, id, p string, w io.Writer) error
	DownloadTar(ctx context.Context, id, p string, w io.Writer) error
	Upload(ctx context.Context, id, p string, r io.Reader, size int64, mode uint32) error
	UploadTar(ctx context.Context, id, p string, r io.Reader) error
	Delete(ctx context.Context, id string) error
	ExposePort(ctx context.Context, id string, spec api.PortSpec) (api.Port, error)
	Ports(ctx context.Context, id string) (api.PortList, error)
	ClosePort(ctx context.Context, id string, guest int) (api.ClosePortResult, error)
	// The lifecycle and snapshot operations (lifecycle.go).
	lifecycleClient
}

// withSandboxClient runs fn against the server at --url/$SMOLVM_URL, or a
// Manager on the data directory, and reports its error as text or JSON.
func withSandboxClient(cmd *cobra.Command, sf *sandboxFlags, fn func(context.Context, sandboxClient) error) error {
	ctx := cmd.Context()
	base, token := serverTarget(cmd, sf.url, sf.token)
	var err error
	if base != "" {
		var c *httpSandboxClient
		c, err = newHTTPSandboxClient(base, token)
		if err == nil {
			err = fn(ctx, c)
		}
	} else {
		err = withLocalClient(cmd, sf.allowMounts, fn)
	}
	if err == nil {
		return nil
	}
	var code exitCode
	if errors.As(err, &code) {
		return err
	}
	if sf.asJSON {
		ce := cliErrorFrom(ctx, err)
		if werr := writeJSON(cmd.OutOrStdout(), cliEnvelope{Error: ce}); werr != nil {
			return werr
		}
		return exitCode(1)
	}
	return err
}

// serverTarget is the server the CLI talks to: --url (or $SMOLVM_URL), else
// the server running on the data directory, else none (""): then the CLI
// opens the data directory itself.
func serverTarget(cmd *cobra.Command, url, token string) (string, string) {
	if url == "" {
		url = os.Getenv("SMOLVM_URL")
	}
	if token == "" {
		token = os.Getenv("SMOLVM_TOKEN")
	}
	if url == "" {
		// A server on this data directory owns its sandboxes' agent
		// connections; go through it rather than wait on them.
		if d, err := setupDataDir(cmd); err == nil {
			if r, ok := runningServer(d); ok {
				url = r.URL
				if token == "" {
					token = r.Token
				}
			}
		}
	}
	return url, token
}

func withLocalClient(cmd *cobra.Command, allowMounts []string, fn func(context.Context, sandboxClient) error) error {
	d, err := setupDataDir(cmd)
	if err != nil {
		return err
	}
	m, err := sandbox.Open(cmd.Context(), sandbox.Options{DataDir: d, Progress: cmd.ErrOrStderr(), AllowMounts: allowMounts})
	if err != nil {
		return fmt.Errorf("open sandboxes in %s: %w", d.Path(), err)
	}
	ferr := fn(cmd.Context(), localSandboxClient{m})
	if err := m.Close(); err != nil && ferr == nil {
		return fmt.Errorf("close sandbox manager: %w", err)
	}
	return ferr
}

// localSandboxClient calls the Manager in this process.
type localSandboxClient struct{ m *sandbox.Manager }

func (c localSandboxClient) Create(ctx context.Context, req api.CreateSandboxRequest) (api.Sandbox, error) {
	creq, err := api.CreateRequest(req)
	if err != nil {
		return api.Sandbox{}, err
	}
	info, err := c.m.Create(ctx, creq)
	if err != nil {
		return api.Sandbox{}, err
	}
	return api.SandboxFromInfo(info), nil
}

func (c localSandboxClient) List(ctx context.Context, labels map[string]string) (api.SandboxList, error) {
	infos, err := c.m.Find(ctx, labels)
	if err != nil {
		return api.SandboxList{}, err
	}
	out := api.SandboxList{Sandboxes: make([]api.Sandbox, 0, len(infos))}
	for _, info := range infos {
		out.Sandboxes = append(out.Sandboxes, api.SandboxFromInfo(info))
	}
	return out, nil
}

func (c localSandboxClient) Get(ctx context.Context, id string) (api.Sandbox, error) {
	info, err := c.m.Get(ctx, id)
	if err != nil {
		return api.Sandbox{}, err
	}
	return api.SandboxFromInfo(info), nil
}

func (c localSandboxClient) Exec(ctx context.Context, id string, req api.ExecRequest) (api.ExecResult, error) {
	res, err := c.m.Exec(ctx, id, req.Request())
	if err != nil {
		return api.ExecResult{}, err
	}
	if res.TimedOut {
		return api.ExecResult{}, &timeoutError{timeout: req.Timeout, stdout: string(res.Stdout), stderr: string(res.Stderr)}
	}
	return api.ExecResult{
		ExitCode: res.ExitCode, Stdout: string(res.Stdout), Stderr: string(res.Stderr),
		DurationMS: res.Duration.Milliseconds(),
	}, nil
}

func (c localSandboxClient) Stream(ctx context.Context, id string, req api.ExecRequest, stdout, stderr io.Writer) (api.ExecExitEvent, error) {
	res, err := c.m.Stream(ctx, id, req.Request(), stdout, stderr)
	if err != nil {
		return api.ExecExitEvent{}, err
	}
	if res.TimedOut {
		return api.ExecExitEvent{}, &timeoutError{timeout: req.Timeout}
	}
	return api.ExecExitEvent{ExitCode: res.ExitCode, DurationMS: res.Duration.Milliseconds()}, nil
}

func (c localSandboxClient) Delete(ctx context.Context, id string) error {
	return c.m.Delete(ctx, id)
}

// httpSandboxClient calls a running server with plain JSON requests.
type httpSandboxClient struct {
	base  *url.URL
	token string
	http  *http.Client
}

func newHTTPSandboxClient(base, token string) (*httpSandboxClient, error) {
	u, err := url.Parse(strings.TrimRight(base, "/"))
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, fmt.Errorf("server URL %q: want http://HOST:PORT (from --url or $SMOLVM_URL)", base)
	}
	// No overall client timeout: creating a sandbox and long commands take
	// as long as they take; the command's context bounds them.
	return &httpSandboxClient{base: u, token: token, http: &http.Client{}}, nil
}

// problemError is a problem response from the server.
type problemError struct{ p api.Problem }

func (e *problemError) Error() string {
	return fmt.Sprintf("%s (%s)", e.p.Detail, e.p.Code)
}

// timeoutError is a command that ran past its timeout, with its output.
type timeoutError struct {
	timeout        int
	stdout, stderr string
}

func (e *timeoutError) Error() string {
	return fmt.Sprintf("command timed out after %ds and was killed", e.timeout)
}

func (c *httpSandboxClient) do(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return fmt.Errorf("encode request: %w", err)
		}
		body = bytes.NewReader(b)
	}
	p, query, _ := strings.Cut(path, "?")
	u := c.base.JoinPath(p)
	u.RawQuery = query
	req, err := http.NewRequestWithContext(ctx, method, u.String(), body)
	if err != nil {
		return fmt.Errorf("%s %s: %w", method, u.Path, err)
	}
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	req.Header.Set("Accept", "application/json, application/problem+json")
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return fmt.Errorf("reach smolvm server at %s: %w (is `smolvm server start` running?)", c.base, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		return fmt.Errorf("%s %s: read response: %w", method, u.Path, err)
	}
	if resp.StatusCode >= 300 {
		var tp api.CommandTimeoutProblem
		if err := json.Unmarshal(data, &tp); err != nil || tp.Code == "" {
			return fmt.Errorf("%s %s: %s: %s", method, u.Path, resp.Status, strings.TrimSpace(string(data)))
		}
		if tp.Code == api.CodeCommandTimeout {
			return &timeoutError{timeout: tp.Timeout, stdout: tp.Stdout, stderr: tp.Stderr}
		}
		return &problemError{p: tp.Problem}
	}
	if out == nil || resp.StatusCode == http.StatusNoContent {
		// 204 (a delete) has no body; nor does anything the caller
		// does not read.
		return nil
	}
	if err := json.Unmarshal(data, out); err != nil {
		return fmt.Errorf("%s %s: decode response: %w", method, u.Path, err)
	}
	return nil
}

func (c *httpSandboxClient) Create(ctx context.Context, req api.CreateSandboxRequest) (api.Sandbox, error) {
	var sb api.Sandbox
	err := c.do(ctx, http.MethodPost, "/sandboxes", req, &sb)
	return sb, err
}

func (c *httpSandboxClient) List(ctx context.Context, labels map[string]string) (api.SandboxList, error) {
	var list api.SandboxList
	path := "/sandboxes"
	if len(labels) > 0 {
		q := url.Values{}
		for _, k := range sortedKeys(labels) {
			q.Add("label", k+"="+labels[k])
		}
		path += "?" + q.Encode()
	}
	err := c.do(ctx, http.MethodGet, path, nil, &list)
	return list, err
}

func (c *httpSandboxClient) Get(ctx context.Context, id string) (api.Sandbox, error) {
	var sb api.Sandbox
	err := c.do(ctx, http.MethodGet, "/sandboxes/"+url.PathEscape(id), nil, &sb)
	return sb, err
}

func (c *httpSandboxClient) Exec(ctx context.Context, id string, req api.ExecRequest) (api.ExecResult, error) {
	var res api.ExecResult
	err := c.do(ctx, http.MethodPost, "/sandboxes/"+url.PathEscape(id)+"/exec", req, &res)
	return res, err
}

// Stream asks for the exec's Server-Sent Events and writes the output as
// each event arrives.
func (c *httpSandboxClient) Stream(ctx context.Context, id string, req api.ExecRequest, stdout, stderr io.Writer) (api.ExecExitEvent, error) {
	path := "/sandboxes/" + url.PathEscape(id) + "/exec"
	b, err := json.Marshal(req)
	if err != nil {
		return api.ExecExitEvent{}, fmt.Errorf("encode request: %w", err)
	}
	u := c.base.JoinPath(path)
	hreq, err := http.NewRequestWithContext(ctx, http.MethodPost, u.String(), bytes.NewReader(b))
	if err != nil {
		return api.ExecExitEvent{}, fmt.Errorf("POST %s: %w", u.Path, err)
	}
	hreq.Header.Set("Content-Type", "application/json")
	hreq.Header.Set("Accept", "text/event-stream, application/problem+json")
	if c.token != "" {
		hreq.Header.Set("Authorization", "Bearer "+c.token)
	}
	resp, err := c.http.Do(hreq)
	if err != nil {
		return api.ExecExitEvent{}, fmt.Errorf("reach smolvm server at %s: %w (is `smolvm server start` running?)", c.base, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode >= 300 {
		data, _ := io.ReadAll(resp.Body)
		var p api.Problem
		if err := json.Unmarshal(data, &p); err != nil || p.Code == "" {
			return api.ExecExitEvent{}, fmt.Errorf("POST %s: %s: %s", u.Path, resp.Status, strings.TrimSpace(string(data)))
		}
		return api.ExecExitEvent{}, &problemError{p: p}
	}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 4<<20)
	var event string
	for sc.Scan() {
		line := sc.Text()
		switch {
		case strings.HasPrefix(line, "event: "):
			event = strings.TrimPrefix(line, "event: ")
		case strings.HasPrefix(line, "data: "):
			data := []byte(strings.TrimPrefix(line, "data: "))
			switch event {
			case "stdout", "stderr":
				var ev api.ExecOutputEvent
				if err := json.Unmarshal(data, &ev); err != nil {
					return api.ExecExitEvent{}, fmt.Errorf("the server sent a bad %s event: %w", event, err)
				}
				chunk := []byte(ev.Text)
				if ev.Base64 != "" {
					if chunk, err = base64.StdEncoding.DecodeString(ev.Base64); err != nil {
						return api.ExecExitEvent{}, fmt.Errorf("the server sent a bad %s event: %w", event, err)
					}
				}
				w := stdout
				if event == "stderr" {
					w = stderr
				}
				if _, err := w.Write(chunk); err != nil {
					return api.ExecExitEvent{}, err
				}
			case "exit":
				var ev api.ExecExitEvent
				if err := json.Unmarshal(data, &ev); err != nil {
					return api.ExecExitEvent{}, fmt.Errorf("the server sent a bad exit event: %w", err)
				}
				if ev.TimedOut {
					return ev, &timeoutError{timeout: req.Timeout}
				}
				return ev, nil
			case "error":
				var p api.Problem
				if err := json.Unmarshal(data, &p); err != nil {
					return api.ExecExitEvent{}, fmt.Errorf("the server sent a bad error event: %w", err)
				}
				return api.ExecExitEvent{}, &problemError{p: p}
			}
		}
	}
	if err := sc.Err(); err != nil {
		return api.ExecExitEvent{}, fmt.Errorf("read the exec stream: %w", err)
	}
	return api.ExecExitEvent{}, errors.New("the server ended the exec stream before the command ended")
}

func (c *httpSandboxClient) Delete(ctx context.Context, id string) error {
	return c.do(ctx, http.MethodDelete, "/sandboxes/"+url.PathEscape(id), nil, nil)
}

// cliEnvelope is the --json output: data on success, error on failure.
type cliEnvelope struct {
	OK    bool      `json:"ok"`
	Data  any       `json:"data,omitempty"`
	Error *cliError `json:"error,omitempty"`
}

type cliError struct {
	Code    string  `json:"code"`
	Message string  `json:"message"`
	Field   string  `json:"field,omitempty"`
	Stdout  *string `json:"stdout,omitempty"`
	Stderr  *string `json:"stderr,omitempty"`
}

// cliErrorFrom gives any error the code it would have over HTTP.
func cliErrorFrom(ctx context.Context, err error) *cliError {
	var pe *problemError
	if errors.As(err, &pe) {
		return &cliError{Code: pe.p.Code, Message: pe.p.Detail, Field: pe.p.Field}
	}
	if _, ok := sandbox.AsError(err); ok {
		p := api.ProblemFrom(ctx, err)
		return &cliError{Code: p.Code, Message: p.Detail, Field: p.Field}
	}
	return &cliError{Code: api.CodeInternal, Message: err.Error()}
}

func printResult(cmd *cobra.Command, sf *sandboxFlags, data any, human func(io.Writer)) error {
	if sf.asJSON {
		return writeJSON(cmd.OutOrStdout(), cliEnvelope{OK: true, Data: data})
	}
	human(cmd.OutOrStdout())
	return nil
}

func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		return fmt.Errorf("write JSON: %w", err)
	}
	return nil
}

func printSandboxTable(w io.Writer, list []api.Sandbox) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tNAME\tSTATUS\tOS\tBACKEND\tMEMORY\tDISK\tVCPUS\tNETWORK\tPORTS\tCREATED")
	for _, sb := range list {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%d MiB\t%d MiB\t%d\t%s\t%s\t%s\n",
			sb.ID, orDash(sb.Name), sb.Status, orDash(sb.OS), orDash(sb.Backend), sb.Memory, sb.DiskSize, sb.VCPUs,
			orDash(sb.Network.Mode), portsSummary(sb.Ports, "->"), ago(sb.CreatedAt))
	}
	tw.Flush()
}

func printSandbox(w io.Writer, sb api.Sandbox) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	row := func(k, v string) { fmt.Fprintf(tw, "%s:\t%s\n", k, v) }
	row("ID", sb.ID)
	if sb.Name != "" {
		row("Name", sb.Name)
	}
	row("Status", sb.Status)
	if sb.Error != "" {
		row("Error", sb.Error)
	}
	row("OS", orDash(sb.OS))
	row("Image", orDash(sb.Image))
	row("Backend", orDash(sb.Backend))
	row("Memory", fmt.Sprintf("%d MiB", sb.Memory))
	row("Disk", fmt.Sprintf("%d MiB", sb.DiskSize))
	row("vCPUs", fmt.Sprint(sb.VCPUs))
	row("Network", networkSummary(sb.Network))
	if len(sb.Ports) > 0 {
		row("Ports", portsSummary(sb.Ports, " -> "))
	}
	if len(sb.Labels) > 0 {
		row("Labels", labelsSummary(sb.Labels))
	}
	if len(sb.Env) > 0 {
		row("Env", labelsSummary(sb.Env))
	}
	for _, m := range sb.Mounts {
		mode := "ro"
		if !m.ReadOnly {
			mode = "rw"
		}
		row("Mount", fmt.Sprintf("%s -> %s (%s)", m.Host, m.Guest, mode))
	}
	if sb.Snapshot != "" {
		row("Snapshot", sb.Snapshot)
	}
	if sb.ExpiresAt != nil {
		row("Expires", fmt.Sprintf("%s (in %s, then %s)", sb.ExpiresAt.Local().Format(time.RFC3339),
			time.Until(*sb.ExpiresAt).Round(time.Second), orDefault(sb.OnTimeout, "delete")))
	} else if sb.Timeout > 0 {
		row("Timeout", fmt.Sprintf("%ds, then %s", sb.Timeout, orDefault(sb.OnTimeout, "delete")))
	}
	if sb.PID != 0 {
		row("PID", fmt.Sprint(sb.PID))
	}
	if sb.Boot != "" {
		row("Boot", sb.Boot)
	}
	for _, w := range sb.Warnings {
		row("Warning", w)
	}
	row("Created", sb.CreatedAt.Local().Format(time.RFC3339)+" ("+ago(sb.CreatedAt)+")")
	tw.Flush()
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// ago renders how long ago t was, coarsely, for tables.
func ago(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	d := time.Since(t)
	switch {
	case d < time.Minute:
		return fmt.Sprintf("%ds ago", int(d.Seconds()))
	case d < time.Hour:
		return fmt.Sprintf("%dm ago", int(d.Minutes()))
	case d < 48*time.Hour:
		return fmt.Sprintf("%dh ago", int(d.Hours()))
	default:
		return fmt.Sprintf("%dd ago", int(d.Hours()/24))
	}
}

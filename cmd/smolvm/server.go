package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"runtime/debug"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/smolvm/smolvm/internal/api"
	"github.com/smolvm/smolvm/internal/datadir"
	"github.com/smolvm/smolvm/internal/sandbox"
	"github.com/smolvm/smolvm/internal/vmm"
)

// shutdownGrace is how long requests in flight may run after a stop signal
// before they are cancelled; a second signal cancels them at once.
const shutdownGrace = 30 * time.Second

// serverVersion is the module version the binary was built from, for the
// Server header.
func serverVersion() string {
	if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" {
		return bi.Main.Version
	}
	return "devel"
}

func newServerCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "server",
		Short: "Run the local HTTP API server",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return cmd.Help()
		},
	}
	cmd.AddCommand(newServerStartCmd())
	return cmd
}

type serverConfig struct {
	host        string
	port        int
	token       string
	quiet       bool
	pool        int
	poolCleanup bool
	allowMounts []string
	diskMiBps   int
	diskIOPS    int
	// kubeconfig, namespace and nodeCA make the server a gateway over a
	// Kubernetes cluster's smolvm nodes.
	kubeconfig string
	namespace  string
	nodeCA     string
	// ready, when set, is called once the server listens, with its URL
	// and token.
	ready func(url, token string)
}

func newServerStartCmd() *cobra.Command {
	var c serverConfig
	cmd := &cobra.Command{
		Use:   "start",
		Short: "Serve the sandbox API over HTTP until interrupted",
		Long: `Serve the sandbox API over HTTP (OpenAPI document at /openapi.json, docs at
/docs) until SIGINT or SIGTERM. On a signal the server stops accepting
connections, lets requests in flight finish (cancelling them after 30 s, or at
once on a second signal) and exits 0. Sandboxes keep running; a server started
later on the same data directory picks them up again.

Keep the server on a loopback address: the API can create sandboxes and run
commands on this machine. Binding any other address requires a token
(--token or $SMOLVM_TOKEN), which clients then send as
"Authorization: Bearer TOKEN".

With --kubeconfig the server runs no VMs itself: it serves the same API over
the smolvm nodes of a Kubernetes cluster, as agent-sandbox Sandboxes and
SandboxClaims, and keeps no state, so several may serve one namespace (see
docs/kubernetes.md).`,
		Example: `  smolvm server start --host 127.0.0.1 --port 8000
  SMOLVM_TOKEN=$(openssl rand -hex 16) smolvm server start --host 0.0.0.0
  smolvm server start --kubeconfig ~/.kube/config --namespace agents`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if c.token == "" {
				c.token = os.Getenv("SMOLVM_TOKEN")
			}
			return runServer(cmd, c)
		},
	}
	f := cmd.Flags()
	f.StringVar(&c.host, "host", "127.0.0.1", "address to listen on; anything but loopback requires a token")
	f.IntVar(&c.port, "port", 8000, "TCP port to listen on")
	f.StringVar(&c.token, "token", "", "require this bearer token on API requests (default $SMOLVM_TOKEN)")
	f.BoolVar(&c.quiet, "quiet", false, "do not log each request to stderr")
	f.IntVar(&c.pool, "pool", 0, "keep this many default sandboxes booted and waiting, so creating one takes milliseconds (each uses its memory while it waits)")
	f.StringArrayVar(&c.allowMounts, "allow-mount", nil, "let sandboxes mount host directories under `DIR` (create --mount); repeatable; none by default")
	f.BoolVar(&c.poolCleanup, "pool-cleanup", false, "delete the waiting sandboxes when the server stops (otherwise the next server reuses them)")
	f.IntVar(&c.diskMiBps, "disk-mibps", vmm.DefaultDiskBPS>>20, "cap each sandbox's reads and writes on the host's disk at this many MiB/s each way, where the server runs as root (under cgroup v1, reads only); 0: no cap")
	f.IntVar(&c.diskIOPS, "disk-iops", vmm.DefaultDiskIOPS, "cap each sandbox's disk operations at this many a second each way, where the server runs as root (under cgroup v1, reads only); 0: no cap")
	f.StringVar(&c.kubeconfig, "kubeconfig", "", "serve the API over the smolvm nodes of the Kubernetes cluster this `FILE` reaches (agent-sandbox Sandboxes), keeping no state here; see docs/kubernetes.md")
	f.StringVar(&c.namespace, "namespace", "", "with --kubeconfig: the namespace the sandboxes live in (default: the kubeconfig's, else default)")
	f.StringVar(&c.nodeCA, "node-ca", "", "with --kubeconfig: verify the nodes' serving certificates with this CA `FILE` (otherwise they are not verified, as the API server does not verify kubelets' by default)")
	return cmd
}

func runServer(cmd *cobra.Command, c serverConfig) error {
	ctx := cmd.Context()
	stdout, stderr := cmd.OutOrStdout(), cmd.ErrOrStderr()

	if c.port < 0 || c.port > 65535 {
		return fmt.Errorf("--port %d is not a TCP port (0 to 65535)", c.port)
	}
	if c.kubeconfig == "" && (c.namespace != "" || c.nodeCA != "") {
		return errors.New("--namespace and --node-ca go with --kubeconfig, which serves a Kubernetes cluster's sandboxes")
	}
	if !api.IsLoopback(c.host) && c.token == "" {
		return fmt.Errorf("--host %s is reachable from other machines: set --token or $SMOLVM_TOKEN so that only holders of the token can create sandboxes and run commands, or use --host 127.0.0.1", c.host)
	}

	// Listen before anything else so a busy port fails fast, with nothing
	// opened that would need undoing.
	addr := net.JoinHostPort(c.host, strconv.Itoa(c.port))
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		if errors.Is(err, syscall.EADDRINUSE) {
			return fmt.Errorf("port %d is in use (try --port %d)", c.port, c.port+1)
		}
		return fmt.Errorf("listen on %s: %w (check --host and --port)", addr, err)
	}
	defer ln.Close()
	port := ln.Addr().(*net.TCPAddr).Port
	shown := net.JoinHostPort(c.host, strconv.Itoa(port))
	if c.kubeconfig != "" {
		return runGateway(cmd, c, ln, shown)
	}

	d, err := setupDataDir(cmd)
	if err != nil {
		return err
	}
	if c.pool < 0 || c.pool > 64 {
		return fmt.Errorf("--pool %d is out of range: 0 to 64", c.pool)
	}
	if c.diskMiBps < 0 || c.diskIOPS < 0 {
		return fmt.Errorf("--disk-mibps and --disk-iops take 0 (no cap) or more, not %d and %d", c.diskMiBps, c.diskIOPS)
	}
	diskIO := vmm.DiskIO{ReadBPS: vmm.NoCap, WriteBPS: vmm.NoCap, ReadIOPS: vmm.NoCap, WriteIOPS: vmm.NoCap}
	if c.diskMiBps > 0 {
		diskIO.ReadBPS, diskIO.WriteBPS = uint64(c.diskMiBps)<<20, uint64(c.diskMiBps)<<20
	}
	if c.diskIOPS > 0 {
		diskIO.ReadIOPS, diskIO.WriteIOPS = uint64(c.diskIOPS), uint64(c.diskIOPS)
	}
	m, err := sandbox.Open(ctx, sandbox.Options{DataDir: d, Progress: stderr, Pool: c.pool, PoolCleanup: c.poolCleanup, AllowMounts: c.allowMounts, DiskIO: diskIO})
	if err != nil {
		return fmt.Errorf("open sandboxes in %s: %w", d.Path(), err)
	}
	defer func() {
		if m != nil {
			m.Close()
		}
	}()

	var logger *slog.Logger
	if !c.quiet {
		logger = slog.New(slog.NewTextHandler(stderr, nil))
	}
	// Closed when shutdown begins, so open event streams end instead of
	// holding the shutdown for its whole grace period.
	stopStreams := make(chan struct{})
	handler := api.New(m, api.Options{
		Token:   c.token,
		Addr:    shown,
		Version: serverVersion(),
		Logger:  logger,
		Stop:    stopStreams,
	})

	if err := writeServerRecord(d, "http://"+shown, c.token); err != nil {
		fmt.Fprintf(stderr, "smolvm: %v (the CLI will not find this server by itself; use --url)\n", err)
	}
	defer os.Remove(d.Server())
	if err := serve(ctx, c, ln, shown, handler, stdout, stderr, stopStreams); err != nil {
		return err
	}
	err = m.Close()
	m = nil
	if err != nil {
		return fmt.Errorf("close sandbox manager: %w", err)
	}
	return nil
}

// serve answers on ln with handler until ctx ends, then shuts down: new
// connections are refused, requests in flight get shutdownGrace (or until
// a second signal) to finish.
func serve(ctx context.Context, c serverConfig, ln net.Listener, shown string, handler http.Handler, stdout, stderr io.Writer, stopStreams chan struct{}) error {
	// Requests get a context of their own, not the signal context: a signal
	// must let them finish, and only the grace period running out (or a
	// second signal) cancels them.
	base, cancelRequests := context.WithCancel(context.WithoutCancel(ctx))
	defer cancelRequests()
	srv := &http.Server{
		Handler:           handler,
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       2 * time.Minute,
		BaseContext:       func(net.Listener) context.Context { return base },
		ErrorLog:          slog.NewLogLogger(slog.NewTextHandler(stderr, nil).WithAttrs([]slog.Attr{slog.String("source", "http")}), slog.LevelWarn),
	}

	fmt.Fprintf(stdout, "SmolVM HTTP API listening on http://%s\n", shown)
	fmt.Fprintf(stdout, "OpenAPI spec: http://%s/openapi.json\n", shown)

	var stopOnce sync.Once // Shutdown may be called twice, and runs this each time
	srv.RegisterOnShutdown(func() { stopOnce.Do(func() { close(stopStreams) }) })
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	if c.ready != nil {
		c.ready("http://"+shown, c.token)
	}

	select {
	case err := <-served:
		return fmt.Errorf("serve on %s: %w", shown, err)
	case <-ctx.Done():
	}

	// A second signal while draining cancels the requests in flight.
	again := make(chan os.Signal, 1)
	signal.Notify(again, os.Interrupt, syscall.SIGTERM)
	defer signal.Stop(again)
	fmt.Fprintf(stderr, "smolvm: shutting down; waiting up to %s for requests in flight (interrupt again to cancel them)\n", shutdownGrace)

	grace, cancelGrace := context.WithTimeout(context.Background(), shutdownGrace)
	defer cancelGrace()
	go func() {
		select {
		case <-again:
			cancelGrace()
		case <-grace.Done():
		}
	}()
	if err := srv.Shutdown(grace); err != nil {
		// Out of patience: cancel what is still running, give handlers a
		// moment to answer, then drop the connections.
		fmt.Fprintln(stderr, "smolvm: cancelling requests still in flight")
		cancelRequests()
		drain, cancelDrain := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancelDrain()
		if err := srv.Shutdown(drain); err != nil {
			srv.Close()
		}
	}
	if err := <-served; err != nil && !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("serve on %s: %w", shown, err)
	}
	return nil
}

// serverRecord is what a running server leaves in the data directory.
type serverRecord struct {
	URL   string `json:"url"`
	PID   int    `json:"pid"`
	Token string `json:"token,omitempty"`
}

func writeServerRecord(d datadir.Dir, url, token string) error {
	b, err := json.Marshal(serverRecord{URL: url, PID: os.Getpid(), Token: token})
	if err != nil {
		return err
	}
	tmp := d.Server() + ".tmp"
	// It may hold the token: readable by this user only.
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return fmt.Errorf("record server: %w", err)
	}
	return os.Rename(tmp, d.Server())
}

// runningServer returns the server recorded in d if its process still runs.
// The VM's agent connection belongs to that server while it runs, so the
// CLI must go through it.
func runningServer(d datadir.Dir) (serverRecord, bool) {
	var r serverRecord
	b, err := os.ReadFile(d.Server())
	if err != nil || json.Unmarshal(b, &r) != nil || r.URL == "" || r.PID <= 0 {
		return r, false
	}
	if err := syscall.Kill(r.PID, 0); err != nil && !errors.Is(err, syscall.EPERM) {
		return r, false
	}
	return r, true
}

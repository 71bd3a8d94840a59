package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/smolvm/smolvm/internal/datadir"
	"github.com/smolvm/smolvm/internal/testenv"
)

// cli builds the smolvm binary once per test and runs it as a user would,
// on the test's own data directory.
type cli struct {
	t   *testing.T
	bin string
	d   datadir.Dir
	env []string
}

func newCLI(t *testing.T) *cli {
	t.Helper()
	d := testenv.DataDir(t)
	bin := filepath.Join(t.TempDir(), "smolvm")
	build := exec.Command("go", "build", "-o", bin, ".")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build smolvm: %v\n%s", err, out)
	}
	env := append(append(os.Environ(), testenv.Env(t)...), "SMOLVM_DATA_DIR="+d.Path(), "SMOLVM_URL=", "SMOLVM_TOKEN=")
	return &cli{t: t, bin: bin, d: d, env: env}
}

func (c *cli) cmd(args ...string) *exec.Cmd {
	cmd := exec.Command(c.bin, args...)
	cmd.Env = c.env
	return cmd
}

// run returns stdout, stderr and the exit status.
func (c *cli) run(args ...string) (string, string, int) {
	c.t.Helper()
	cmd := c.cmd(args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		c.t.Fatalf("run smolvm %v: %v", args, err)
	}
	return stdout.String(), stderr.String(), code
}

func TestCLI(t *testing.T) {
	t.Parallel()
	c := newCLI(t)

	out, errOut, code := c.run("sandbox", "create", "--memory", "256", "--json")
	if code != 0 {
		t.Fatalf("create: exit %d: %s", code, errOut)
	}
	var created struct {
		OK   bool `json:"ok"`
		Data struct {
			ID       string   `json:"id"`
			Status   string   `json:"status"`
			Boot     string   `json:"boot"`
			Warnings []string `json:"warnings"`
		} `json:"data"`
	}
	if err := json.Unmarshal([]byte(out), &created); err != nil || !created.OK || created.Data.Status != "running" {
		t.Fatalf("create --json printed %q (%v)", out, err)
	}
	id := created.Data.ID
	t.Cleanup(func() { c.run("sandbox", "delete", id) })
	// The first create of a shape builds its template and restores from it.
	if created.Data.Boot != "template" || len(created.Data.Warnings) > 0 {
		t.Errorf("create booted %q, warnings %q; stderr:\n%s", created.Data.Boot, created.Data.Warnings, errOut)
	}

	t.Run("exec passes output and exit status", func(t *testing.T) {
		out, errOut, code := c.run("sandbox", "exec", id, "--", "echo out; echo err >&2; exit 3")
		if code != 3 || out != "out\n" || errOut != "err\n" {
			t.Errorf("exit %d stdout %q stderr %q", code, out, errOut)
		}
	})
	t.Run("exec timeout exits 124", func(t *testing.T) {
		// The timeout leaves the login shell time to start on a loaded host.
		out, _, code := c.run("sandbox", "exec", id, "--timeout", "5", "--", "echo before; sleep 60")
		if code != 124 || out != "before\n" {
			t.Errorf("exit %d stdout %q", code, out)
		}
	})
	t.Run("list and get", func(t *testing.T) {
		out, _, code := c.run("sandbox", "list")
		if code != 0 || !strings.Contains(out, id) || !strings.Contains(out, "running") {
			t.Errorf("list: exit %d\n%s", code, out)
		}
		out, _, code = c.run("sandbox", "get", id)
		if code != 0 || !strings.Contains(out, id) {
			t.Errorf("get: exit %d\n%s", code, out)
		}
		_, errOut, code := c.run("sandbox", "get", "vm-00000000")
		if code == 0 || !strings.Contains(errOut, "vm-00000000") {
			t.Errorf("get of an unknown id: exit %d stderr %q", code, errOut)
		}
	})

	t.Run("lifecycle and snapshots on the data directory", func(t *testing.T) {
		for _, step := range []struct {
			args []string
			want string
		}{
			{[]string{"sandbox", "pause", id}, "paused " + id + "\n"},
			{[]string{"sandbox", "resume", id}, "resumed " + id + "\n"},
			{[]string{"sandbox", "update", "--timeout", "600", id}, id + " expires at "},
			{[]string{"sandbox", "update", "--timeout", "0", id}, id + " has no time limit\n"},
			{[]string{"sandbox", "snapshot", "create", "--name", "cli-snap", id}, " (cli-snap) of " + id + " ("},
			{[]string{"snapshot", "list"}, "cli-snap"},
			{[]string{"snapshot", "rm", "cli-snap"}, "deleted cli-snap\n"},
			{[]string{"snapshot", "prune"}, "no unused snapshots\n"},
			{[]string{"sandbox", "logs", id}, ""},
		} {
			out, errOut, code := c.run(step.args...)
			if code != 0 || !strings.Contains(out, step.want) {
				t.Errorf("%v: exit %d stdout %q (want %q) stderr %q", step.args, code, out, step.want, errOut)
			}
		}
		if out, _, code := c.run("sandbox", "list", "--label", "none=here"); code != 0 || strings.Contains(out, id) {
			t.Errorf("list --label none=here: exit %d\n%s", code, out)
		}
		if _, errOut, code := c.run("sandbox", "resume", id); code == 0 || !strings.Contains(errOut, "running") {
			t.Errorf("resume of a running sandbox: exit %d stderr %q", code, errOut)
		}
	})

	t.Run("server", func(t *testing.T) {
		// Port 0: the server picks a free port and prints it, so no other
		// test can take it between choosing and listening.
		srv := c.cmd("server", "start", "--host", "127.0.0.1", "--port", "0", "--quiet")
		stdout, err := srv.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		var stderr bytes.Buffer
		srv.Stderr = &stderr
		if err := srv.Start(); err != nil {
			t.Fatal(err)
		}
		defer srv.Process.Kill()
		lines := make(chan string, 2)
		go func() {
			sc := bufio.NewScanner(stdout)
			for sc.Scan() {
				lines <- sc.Text()
			}
			close(lines)
		}()
		var port int
		next := func() string {
			select {
			case got := <-lines:
				return got
			case <-time.After(60 * time.Second):
				t.Fatalf("server printed nothing; stderr: %s", stderr.String())
			}
			return ""
		}
		first := next()
		if _, err := fmt.Sscanf(first, "SmolVM HTTP API listening on http://127.0.0.1:%d", &port); err != nil || port == 0 {
			t.Fatalf("server printed %q, want its address", first)
		}
		if got, want := next(), "OpenAPI spec: http://127.0.0.1:"+strconv.Itoa(port)+"/openapi.json"; got != want {
			t.Fatalf("server printed %q, want %q", got, want)
		}

		// A second server on the same port fails at once, naming --port.
		_, errOut, code := c.run("server", "start", "--port", strconv.Itoa(port))
		if code == 0 || !strings.Contains(errOut, "--port") || strings.Count(strings.TrimSpace(errOut), "\n") != 0 {
			t.Errorf("busy port: exit %d stderr %q", code, errOut)
		}

		// A negative cap is refused before anything starts.
		_, errOut, code = c.run("server", "start", "--port", "0", "--disk-mibps", "-1")
		if code == 0 || !strings.Contains(errOut, "--disk-mibps") {
			t.Errorf("--disk-mibps -1: exit %d stderr %q", code, errOut)
		}

		// Gateway flags without --kubeconfig, and a kubeconfig that is
		// not there, are refused before anything starts.
		_, errOut, code = c.run("server", "start", "--port", "0", "--namespace", "agents")
		if code == 0 || !strings.Contains(errOut, "--kubeconfig") {
			t.Errorf("--namespace alone: exit %d stderr %q", code, errOut)
		}
		_, errOut, code = c.run("server", "start", "--port", "0", "--kubeconfig", "/nonexistent/kubeconfig")
		if code == 0 || !strings.Contains(errOut, "/nonexistent/kubeconfig") {
			t.Errorf("a missing kubeconfig: exit %d stderr %q", code, errOut)
		}

		// The CLI finds the running server and goes through it, rather
		// than waiting on the agent connection the server holds.
		start := time.Now()
		out, errOut, code := c.run("sandbox", "exec", id, "--", "echo via-server")
		if code != 0 || out != "via-server\n" {
			t.Errorf("exec while the server runs: exit %d stdout %q stderr %q after %s", code, out, errOut, time.Since(start))
		}

		// An open event stream does not hold the shutdown: it is ended,
		// not waited for until the grace period runs out.
		events, err := http.Get("http://127.0.0.1:" + strconv.Itoa(port) + "/events")
		if err != nil || events.StatusCode != http.StatusOK {
			t.Fatalf("GET /events: %v %v", err, events)
		}
		defer events.Body.Close()
		go io.Copy(io.Discard, events.Body)

		if err := srv.Process.Signal(syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		go func() { done <- srv.Wait() }()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("server exit after SIGTERM: %v; stderr: %s", err, stderr.String())
			}
		case <-time.After(60 * time.Second):
			t.Fatal("server did not exit after SIGTERM")
		}
		if strings.Contains(stderr.String(), "cancelling requests") {
			t.Errorf("the open event stream held the shutdown until its grace ran out: %s", stderr.String())
		}
		// Sandboxes are the user's data: they outlive the server.
		out, _, code = c.run("sandbox", "exec", id, "--", "echo still-here")
		if code != 0 || out != "still-here\n" {
			t.Errorf("after the server stopped: exit %d stdout %q", code, out)
		}
	})

	t.Run("templates", func(t *testing.T) {
		out, errOut, code := c.run("template", "list", "--json")
		var ts []struct {
			Key     string `json:"key"`
			Retired bool   `json:"retired"`
		}
		if code != 0 || json.Unmarshal([]byte(out), &ts) != nil || len(ts) != 1 || ts[0].Retired {
			t.Fatalf("template list: exit %d %q %q", code, out, errOut)
		}
		// The sandbox's disk overlays the template's: removing it would
		// break the sandbox, so it is refused.
		if _, errOut, code := c.run("template", "rm", ts[0].Key); code == 0 || !strings.Contains(errOut, "delete them first") {
			t.Errorf("template rm in use: exit %d %q", code, errOut)
		}
	})

	t.Run("delete", func(t *testing.T) {
		_, errOut, code := c.run("sandbox", "delete", id)
		if code != 0 {
			t.Fatalf("delete: exit %d: %s", code, errOut)
		}
		if _, err := os.Stat(c.d.Sandbox(id)); !os.IsNotExist(err) {
			t.Errorf("sandbox directory remains after delete")
		}
		out, _, code := c.run("template", "prune")
		if code != 0 || !strings.Contains(out, "1 template(s) removed") {
			t.Errorf("template prune: exit %d %q", code, out)
		}
	})
}

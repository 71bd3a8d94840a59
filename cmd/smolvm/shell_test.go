package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// tmux drives a program on a real terminal of a fixed size: keys in,
// screen out.
type tmux struct {
	t       *testing.T
	socket  string
	session string
}

func newTmux(t *testing.T, cols, rows int, env []string, command string) *tmux {
	t.Helper()
	if _, err := exec.LookPath("tmux"); err != nil {
		t.Fatal("tmux is needed to drive a terminal: install it (scripts/test.sh does)")
	}
	// A socket of the test's own, so no other tmux server is touched.
	tm := &tmux{t: t, socket: filepath.Join(t.TempDir(), "tmux.sock"), session: "smolvm-test"}
	args := []string{"new-session", "-d", "-s", tm.session, "-x", fmt.Sprint(cols), "-y", fmt.Sprint(rows)}
	for _, kv := range env {
		args = append(args, "-e", kv)
	}
	tm.run(append(args, command)...)
	t.Cleanup(func() { exec.Command("tmux", "-S", tm.socket, "kill-server").Run() })
	return tm
}

func (tm *tmux) run(args ...string) string {
	tm.t.Helper()
	cmd := exec.Command("tmux", append([]string{"-S", tm.socket}, args...)...)
	cmd.Env = append(os.Environ(), "TERM=xterm-256color")
	out, err := cmd.CombinedOutput()
	if err != nil {
		tm.t.Fatalf("tmux %v: %v\n%s", args, err, out)
	}
	return string(out)
}

func (tm *tmux) keys(text string) { tm.run("send-keys", "-t", tm.session, text, "Enter") }

// waitFor captures the screen until it contains want.
func (tm *tmux) waitFor(want string, timeout time.Duration) string {
	tm.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		screen := tm.run("capture-pane", "-p", "-t", tm.session)
		if strings.Contains(screen, want) {
			return screen
		}
		if time.Now().After(deadline) {
			tm.t.Fatalf("the screen never showed %q:\n%s", want, screen)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestShell opens `smolvm sandbox shell` on a 100x30 tmux terminal through
// a running server's WebSocket: the guest sees the size and its changes,
// and the shell's exit status is the command's.
func TestShell(t *testing.T) {
	t.Parallel()
	c := newCLI(t)
	url := c.startServer(t)
	var created struct {
		ID string `json:"id"`
	}
	if code, _ := c.runJSON(&created, "sandbox", "create", "--memory", "256", "--url", url); code != "" {
		t.Fatalf("create: %s", code)
	}
	t.Cleanup(func() { c.run("sandbox", "delete", created.ID, "--url", url) })

	env := append(c.env[:len(c.env):len(c.env)], "SMOLVM_URL="+url)
	// The pane outlives the shell so its last words can be read.
	line := fmt.Sprintf("%s sandbox shell %s; echo SHELL-EXIT-$?; sleep 600", c.bin, created.ID)
	tm := newTmux(t, 100, 30, envOnly(env, "SMOLVM_", "PATH="), line)
	tm.keys("stty size; tty")
	screen := tm.waitFor("/dev/pts/", time.Minute)
	if !strings.Contains(screen, "30 100") {
		t.Errorf("stty size did not see the 100x30 window:\n%s", screen)
	}
	// A resize of the window reaches the guest's terminal.
	tm.run("resize-window", "-t", tm.session, "-x", "120", "-y", "40")
	// The resize travels on its own; ask until the guest has it.
	deadline := time.Now().Add(30 * time.Second)
	for {
		tm.keys("clear; stty size")
		time.Sleep(time.Second)
		if strings.Contains(tm.run("capture-pane", "-p", "-t", tm.session), "40 120") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the guest never saw the 120x40 window:\n%s", tm.run("capture-pane", "-p", "-t", tm.session))
		}
	}
	tm.keys("exit 3")
	tm.waitFor("SHELL-EXIT-3", 30*time.Second)

	// exec -it runs one command on a terminal and returns its status.
	out, _, code := c.run("sandbox", "exec", "-t", created.ID, "--url", url, "--", "test -t 1 && echo on-a-tty; exit 5")
	if code != 5 || !strings.Contains(out, "on-a-tty") {
		t.Errorf("exec -t: exit %d, output %q", code, out)
	}
}

// envOnly keeps the entries of env that start with one of prefixes.
func envOnly(env []string, prefixes ...string) []string {
	var out []string
	for _, kv := range env {
		for _, p := range prefixes {
			if strings.HasPrefix(kv, p) {
				out = append(out, kv)
				break
			}
		}
	}
	return out
}

package agent_test

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/smolvm/smolvm/internal/agent"
	"github.com/smolvm/smolvm/internal/agent/agentpb"
	"github.com/smolvm/smolvm/internal/guest"
)

// serveSpare serves the agent API on a Unix socket and returns the server
// itself too, whose spare shells the test watches.
func serveSpare(t *testing.T) (*guest.Client, *agent.Server) {
	t.Helper()
	if _, err := exec.LookPath("bash"); err != nil {
		t.Skip("spare login shells need bash, which this host lacks")
	}
	srv, dial, _ := serveServer(t)
	return dialClient(t, dial), srv
}

func sparesFor(key string, env []string) bool {
	if key == "" {
		return false
	}
	fields := strings.Split(key, "\x00")
	for _, kv := range env {
		if !slices.Contains(fields, kv) {
			return false
		}
	}
	return true
}

type run struct {
	out, err string
	exit     guest.Exit
}

func login(t *testing.T, c *guest.Client, script string, env ...string) run {
	t.Helper()
	var out, errb bytes.Buffer
	exit, err := c.Exec(testCtx(t), &agentpb.StartRequest{Process: &agentpb.ProcessConfig{Script: script, Env: env}}, &out, &errb)
	if err != nil {
		t.Fatalf("run %q: %v", script, err)
	}
	return run{out.String(), errb.String(), exit}
}

// waitSpare waits until a spare shell is ready for a command with env, as
// it is once the last command has ended and the shell has been started.
func waitSpare(t *testing.T, srv *agent.Server, env ...string) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !sparesFor(agent.SpareKey(srv), env) {
		if time.Now().After(deadline) {
			t.Fatal("no spare login shell was started after a login-shell command ended")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestSpareLoginShellRunsAsAColdOneWould(t *testing.T) {
	t.Parallel()
	c, srv := serveSpare(t)
	home := t.TempDir()
	if err := os.WriteFile(filepath.Join(home, ".profile"), []byte("export FOO=one\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	env := []string{"HOME=" + home}
	const probe = `echo "$FOO $LINENO ${__smolvm_script-unset} $#"; shopt -q login_shell && echo login; echo $0; [ -e /proc/$$/fd/3 ] || echo no-fd-3`
	cold := login(t, c, probe, env...)
	if !strings.HasPrefix(cold.out, "one 1 unset 0\nlogin\n") || cold.exit.ExitCode != 0 {
		t.Fatalf("cold login shell: %+v", cold)
	}
	waitSpare(t, srv, env...)
	warm := login(t, c, probe, env...)
	if agent.SpareUsed(srv) != 1 {
		t.Fatalf("spare shells used = %d, want 1", agent.SpareUsed(srv))
	}
	if warm != cold {
		t.Errorf("through the spare shell: %+v\ncold: %+v", warm, cold)
	}

	// Exit codes, stderr and a script longer than a pipe holds at once.
	waitSpare(t, srv, env...)
	long := "x=" + strings.Repeat("a", 100000) + "\necho ${#x} >&2\nexit 3"
	r := login(t, c, long, env...)
	if r.exit.ExitCode != 3 || r.err != "100000\n" || agent.SpareUsed(srv) != 2 {
		t.Errorf("long script: %+v, spare used %d", r, agent.SpareUsed(srv))
	}

	// A timeout reaches the script run by a spare shell.
	waitSpare(t, srv, env...)
	start := time.Now()
	var out bytes.Buffer
	exit, err := c.Exec(testCtx(t), &agentpb.StartRequest{Process: &agentpb.ProcessConfig{Script: "sleep 30", Env: env}, TimeoutMs: 500}, &out, &out)
	if err != nil || !exit.TimedOut || time.Since(start) > 20*time.Second {
		t.Errorf("timeout through a spare shell: %+v, %v after %s", exit, err, time.Since(start))
	}
}

func TestSpareLoginShellIsNotUsedOnceStale(t *testing.T) {
	t.Parallel()
	c, srv := serveSpare(t)
	home := t.TempDir()
	profile := filepath.Join(home, ".profile")
	if err := os.WriteFile(profile, []byte("export FOO=one\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	env := []string{"HOME=" + home}
	if r := login(t, c, "echo $FOO", env...); r.out != "one\n" {
		t.Fatalf("first run: %+v", r)
	}

	// The profile changes behind the agent's back.
	waitSpare(t, srv, env...)
	if err := os.WriteFile(profile, []byte("export FOO=two\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if r := login(t, c, "echo $FOO", env...); r.out != "two\n" {
		t.Errorf("after the profile changed: %q, want two", r.out)
	}

	// A directory the profile tests appears.
	waitSpare(t, srv, env...)
	if err := os.WriteFile(profile, []byte(`[ -d "$HOME/bin" ] && echo has-bin; true`+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	login(t, c, "true", env...)
	waitSpare(t, srv, env...)
	if err := os.Mkdir(filepath.Join(home, "bin"), 0o755); err != nil {
		t.Fatal(err)
	}
	if r := login(t, c, "echo cmd", env...); r.out != "has-bin\ncmd\n" {
		t.Errorf("after ~/bin appeared: %q", r.out)
	}

	// Another command ran meanwhile, which might have changed anything.
	waitSpare(t, srv, env...)
	var sink bytes.Buffer
	if _, err := c.Exec(testCtx(t), &agentpb.StartRequest{Process: &agentpb.ProcessConfig{Argv: []string{"true"}}}, &sink, &sink); err != nil {
		t.Fatal(err)
	}
	// A new environment or user needs its own shell.
	waitSpare(t, srv, env...)
	if r := login(t, c, "echo $BAR", append(env, "BAR=bar")...); r.out != "has-bin\nbar\n" {
		t.Errorf("with another environment: %q", r.out)
	}
	// A new identity drops the spare.
	waitSpare(t, srv, "BAR=bar")
	if _, err := c.Identity(testCtx(t), &agentpb.SetIdentityRequest{Hostname: "renamed", Seed: []byte{1}}); err != nil {
		t.Fatal(err)
	}
	if agent.SpareKey(srv) != "" {
		t.Error("a spare shell survived a new identity")
	}
	if n := agent.SpareUsed(srv); n != 0 {
		t.Errorf("spare shells used = %d, want 0: every spare here was stale", n)
	}
}

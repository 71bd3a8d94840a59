package main

import (
	"bufio"
	"bytes"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// `smolvm ui` runs a server when none does and opens its dashboard; with a
// server running it opens that one and exits.
// The browser is a stand-in xdg-open that records the address it was given.
func TestUICommand(t *testing.T) {
	t.Parallel()
	c := newCLI(t)
	bin := t.TempDir()
	opened := filepath.Join(t.TempDir(), "opened")
	script := "#!/bin/sh\nprintf '%s\\n' \"$1\" >> " + opened + "\n"
	if err := os.WriteFile(filepath.Join(bin, "xdg-open"), []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	c.env = append(c.env, "PATH="+bin+":"+os.Getenv("PATH"), "DISPLAY=:0", "SMOLVM_TOKEN=ui-token")

	ui := c.cmd("ui", "--port", "0", "--quiet")
	stdout, err := ui.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr bytes.Buffer
	ui.Stderr = &stderr
	if err := ui.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- ui.Wait() }()
	defer func() {
		ui.Process.Signal(syscall.SIGTERM)
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("smolvm ui after SIGTERM: %v\n%s", err, stderr.String())
			}
			if !strings.Contains(stderr.String(), "asks for the server's token") {
				t.Errorf("smolvm ui did not say the page asks for the token: %s", stderr.String())
			}
		case <-time.After(60 * time.Second):
			ui.Process.Kill()
			t.Errorf("smolvm ui did not exit after SIGTERM")
		}
	}()
	lines := make(chan string, 8)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
		io.Copy(io.Discard, stdout)
	}()
	var dashboard string
	for dashboard == "" {
		select {
		case l, ok := <-lines:
			if !ok {
				t.Fatalf("smolvm ui ended without printing the dashboard's address: %s", stderr.String())
			}
			if v, found := strings.CutPrefix(l, "Dashboard: "); found {
				dashboard = v
			}
		case <-time.After(60 * time.Second):
			t.Fatalf("smolvm ui printed no address in 60 s: %s", stderr.String())
		}
	}
	if !strings.HasPrefix(dashboard, "http://127.0.0.1:") || !strings.HasSuffix(dashboard, "/ui/") {
		t.Fatalf("dashboard at %q", dashboard)
	}
	resp, err := http.Get(dashboard)
	if err != nil {
		t.Fatal(err)
	}
	page, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || !strings.Contains(string(page), "app.js") {
		t.Fatalf("GET %s: %s %.200s", dashboard, resp.Status, page)
	}
	// The API itself wants the token the page was given.
	if resp, err := http.Get(strings.TrimSuffix(dashboard, "ui/") + "sandboxes"); err != nil || resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("GET /sandboxes without the token: %v %v", resp, err)
	}
	// The token stays out of the browser's command line, which every
	// user of the machine can read.
	waitFor(t, func() bool { b, _ := os.ReadFile(opened); return strings.TrimSpace(string(b)) == dashboard }, "the browser opened "+dashboard)

	// A second `smolvm ui` finds the running server, opens it and exits.
	out, errOut, code := c.run("ui", "--no-open")
	if code != 0 || strings.TrimSpace(out) != "Dashboard: "+dashboard {
		t.Fatalf("smolvm ui with a server running: exit %d: %s %s", code, out, errOut)
	}
}

func waitFor(t *testing.T, ok func() bool, what string) {
	t.Helper()
	for deadline := time.Now().Add(30 * time.Second); !ok(); {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting until %s", what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

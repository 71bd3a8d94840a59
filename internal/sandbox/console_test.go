package sandbox

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// The watch finds a crash line however the console grows: in pieces, with
// the marker split between two reads, after a lot of other output.
func TestConsoleWatchFindsCrashes(t *testing.T) {
	path := filepath.Join(t.TempDir(), "console.log")
	w := &consoleWatch{path: path}
	if got := w.crash(); got != "" {
		t.Fatalf("no console yet: %q", got)
	}
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	appendLog := func(s string) {
		if _, err := f.WriteString(s); err != nil {
			t.Fatal(err)
		}
	}
	appendLog(strings.Repeat("[    0.1] an ordinary boot line\n", 2000))
	if got := w.crash(); got != "" {
		t.Fatalf("ordinary output reported as %q", got)
	}
	appendLog("[    1.2] BUG: unable to ha")
	if got := w.crash(); got != "" {
		t.Fatalf("half a marker reported as %q", got)
	}
	appendLog("ndle page fault for address: 000000000048a800\n[    1.3] #PF: supervisor instruction fetch\n")
	if got := w.crash(); got != "BUG: unable to handle page fault for address: 000000000048a800" {
		t.Errorf("crash = %q", got)
	}
}

func TestConsoleWatchPanic(t *testing.T) {
	path := filepath.Join(t.TempDir(), "console.log")
	os.WriteFile(path, []byte("[   3.0] sysrq: Trigger a crash\n[   3.1] Kernel panic - not syncing: sysrq triggered crash\n"), 0o644)
	w := &consoleWatch{path: path}
	if got := w.crash(); got != "Kernel panic - not syncing: sysrq triggered crash" {
		t.Errorf("crash = %q", got)
	}
	if tail := consoleTail(path); !strings.Contains(tail, "sysrq triggered crash") {
		t.Errorf("tail = %q", tail)
	}
	if tail := consoleTail(filepath.Join(t.TempDir(), "none")); tail != "(no console output)" {
		t.Errorf("missing console: %q", tail)
	}
}

// A failure that carries a console reads as one line in summaries, however
// it was wrapped.
func TestSummaryLeavesTheConsoleOut(t *testing.T) {
	ce := &consoleError{err: errors.New("the guest did not answer within 30s"), console: "[ 1.0] line one\n[ 1.1] line two\n"}
	wrapped := fmt.Errorf("%w (%q): %w", errGuestCrashed, "Kernel panic", ce)
	if got := summary(wrapped); got != `the guest crashed ("Kernel panic"): the guest did not answer within 30s` {
		t.Errorf("summary = %q", got)
	}
	if !strings.Contains(wrapped.Error(), "line two") {
		t.Errorf("the error lost its console: %q", wrapped.Error())
	}
	if got := summary(errors.New("plain")); got != "plain" {
		t.Errorf("summary of a plain error = %q", got)
	}
}

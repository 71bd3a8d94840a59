package image

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/smolvm/smolvm/internal/datadir"
)

func TestCancelledBuildLeavesNothing(t *testing.T) {
	requireBuildable(t)
	d := datadir.Dir(filepath.Join(scratch, "cancel"))
	ctx, cancel := context.WithCancel(context.Background())
	// Cancel while debootstrap is downloading or unpacking.
	timer := time.AfterFunc(8*time.Second, cancel)
	defer timer.Stop()
	start := time.Now()
	_, err := Default(ctx, d, io.Discard)
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("err = %v, want context.Canceled", err)
	}
	if took := time.Since(start); took > 30*time.Second {
		t.Errorf("cancelled build took %s to return", took)
	}
	entries, err := os.ReadDir(d.Tmp())
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) > 0 {
		t.Errorf("temp entries left: %v", entries)
	}
	if _, err := Cached(d); !errors.Is(err, ErrNotBuilt) {
		t.Errorf("Cached after cancel: %v", err)
	}
	mounts, err := mountsBelow(string(d))
	if err != nil || len(mounts) > 0 {
		t.Errorf("mounts left: %v %v", mounts, err)
	}
	if procs := processesMentioning(string(d)); len(procs) > 0 {
		t.Errorf("processes left: %v", procs)
	}
}

func TestWaitForLockRespectsContext(t *testing.T) {
	d := datadir.Dir(t.TempDir())
	r := defaultRecipe()
	if err := os.MkdirAll(d.Images(), 0o755); err != nil {
		t.Fatal(err)
	}
	unlock, err := lockExclusive(context.Background(), r.lockPath(d), func() {})
	if err != nil {
		t.Fatal(err)
	}
	defer unlock()
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	var log bytes.Buffer
	_, err = ensure(ctx, d, r, &log)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("err = %v, want deadline exceeded", err)
	}
	if !strings.Contains(log.String(), "waiting for another process") {
		t.Errorf("log %q does not say it waits", log.String())
	}
}

// processesMentioning lists processes whose command line or working
// directory refers to path.
func processesMentioning(path string) []string {
	var found []string
	dirs, _ := filepath.Glob("/proc/[0-9]*")
	for _, p := range dirs {
		cmdline, _ := os.ReadFile(filepath.Join(p, "cmdline"))
		cwd, _ := os.Readlink(filepath.Join(p, "cwd"))
		if bytes.Contains(cmdline, []byte(path)) || strings.HasPrefix(cwd, path) {
			found = append(found, fmt.Sprintf("%s: %s", filepath.Base(p), bytes.ReplaceAll(cmdline, []byte{0}, []byte{' '})))
		}
	}
	return found
}

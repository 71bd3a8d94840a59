package doctor

import (
	"os"
	"path/filepath"
	"testing"
)

func TestHelperLocate(t *testing.T) {
	h := Helper{Name: "smolvm-test-helper-absent", Env: "SMOLVM_TEST_HELPER", Purpose: "a test"}
	t.Setenv(h.Env, "")
	if c := checkHelper(h, ""); c.Status != StatusMissing || c.Fix == "" {
		t.Fatalf("absent helper: %+v", c)
	}
	p := filepath.Join(t.TempDir(), "helper")
	if err := os.WriteFile(p, []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Setenv(h.Env, p)
	if c := checkHelper(h, ""); c.Status != StatusOK || c.Detail != p {
		t.Fatalf("helper named by $%s: %+v", h.Env, c)
	}
	other := filepath.Join(t.TempDir(), "other")
	os.WriteFile(other, nil, 0o755)
	if got := h.Locate(other); got != other {
		t.Fatalf("an explicit path must win: %q", got)
	}
	if got := h.Locate(filepath.Join(t.TempDir(), "missing")); got != p {
		t.Fatalf("a missing explicit path falls back to $%s: %q", h.Env, got)
	}
}

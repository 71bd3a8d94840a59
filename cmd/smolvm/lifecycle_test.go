package main

import (
	"path/filepath"
	"testing"
)

func TestParseMounts(t *testing.T) {
	t.Parallel()
	abs, _ := filepath.Abs("rel")
	got, err := parseMounts([]string{"/src:/workspace", "/data:/cache:rw", "rel:/r:ro"})
	if err != nil {
		t.Fatal(err)
	}
	want := []struct {
		host, guest string
		ro          bool
	}{{"/src", "/workspace", true}, {"/data", "/cache", false}, {abs, "/r", true}}
	if len(got) != len(want) {
		t.Fatalf("got %d mounts, want %d", len(got), len(want))
	}
	for i, w := range want {
		if got[i].Host != w.host || got[i].Guest != w.guest || got[i].ReadOnly == nil || *got[i].ReadOnly != w.ro {
			t.Errorf("mount %d: %+v, want %+v", i, got[i], w)
		}
	}
	for _, bad := range []string{"/src", "/src:", ":/g", "/src:rel", "/src:/g:rx", "/a:/b:rw:x"} {
		if _, err := parseMounts([]string{bad}); err == nil {
			t.Errorf("--mount %q was accepted", bad)
		}
	}
}

func TestKeyValues(t *testing.T) {
	t.Parallel()
	got, err := keyValues("--label", []string{"a=1", "b=x=y", "c="})
	if err != nil || len(got) != 3 || got["a"] != "1" || got["b"] != "x=y" || got["c"] != "" {
		t.Errorf("keyValues: %v %v", got, err)
	}
	if m, err := keyValues("--label", nil); m != nil || err != nil {
		t.Errorf("no flags: %v %v", m, err)
	}
	for _, bad := range []string{"a", "=1"} {
		if _, err := keyValues("--label", []string{bad}); err == nil {
			t.Errorf("%q was accepted", bad)
		}
	}
}

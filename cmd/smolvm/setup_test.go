package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// setup --backend firecracker installs the binary it is given once it has
// shown a Firecracker version, and refuses anything else before it starts
// the rest of the setup. The "release" here is a stand-in script: no
// Firecracker release can run on a host without KVM.
func TestSetupFirecracker(t *testing.T) {
	t.Parallel()
	c := newCLI(t)
	dir := t.TempDir()
	fake := filepath.Join(dir, "firecracker-v1.17.0-x86_64")
	if err := os.WriteFile(fake, []byte("#!/bin/sh\n[ \"$1\" = --version ] && echo 'Firecracker v1.17.0' && echo && echo 'Supported snapshot data format versions: v8.0.0'\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	binDir := filepath.Join(dir, "bin")

	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--backend", "firecracker"}, "needs --firecracker-bin"},
		{[]string{"--backend", "firecracker", "--firecracker-bin", "/bin/true"}, "is not a Firecracker binary"},
		{[]string{"--backend", "firecracker", "--firecracker-bin", filepath.Join(dir, "nope")}, "is not a Firecracker binary"},
		{[]string{"--firecracker-bin", fake}, "goes with --backend firecracker"},
		{[]string{"--backend", "bhyve"}, `--backend "bhyve"`},
	} {
		_, errOut, code := c.run(append([]string{"setup", "--bin-dir", binDir}, tc.args...)...)
		if code == 0 || !strings.Contains(errOut, tc.want) {
			t.Errorf("setup %v: exit %d, %q; want an error saying %q", tc.args, code, errOut, tc.want)
		}
		if _, err := os.Stat(binDir); err == nil {
			t.Fatalf("setup %v installed something", tc.args)
		}
	}

	out, errOut, code := c.run("setup", "--bin-dir", binDir, "--backend", "firecracker", "--firecracker-bin", fake)
	if !strings.Contains(out, "firecracker: Firecracker v1.17.0 installed as "+filepath.Join(binDir, "firecracker")) {
		t.Fatalf("setup --backend firecracker: exit %d\n%s\n%s", code, out, errOut)
	}
	got, err := os.ReadFile(filepath.Join(binDir, "firecracker"))
	want, _ := os.ReadFile(fake)
	if err != nil || string(got) != string(want) {
		t.Fatalf("installed binary: %v", err)
	}
	if st, err := os.Stat(filepath.Join(binDir, "firecracker")); err != nil || st.Mode().Perm() != 0o755 {
		t.Fatalf("installed binary mode: %v %v", st.Mode(), err)
	}
	// The rest of setup ran: the doctor table it ends with lists every
	// backend with its state.
	for _, b := range []string{"backend qemu", "backend firecracker", "backend libkrun"} {
		if !strings.Contains(out, b) {
			t.Errorf("setup's checks do not list %s:\n%s", b, out)
		}
	}
}

package agentpb_test

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestGeneratedCodeIsCurrent regenerates the code from agent.proto and
// fails when it differs from what is committed.
func TestGeneratedCodeIsCurrent(t *testing.T) {
	if _, err := exec.LookPath("protoc"); err != nil {
		t.Fatal("protoc is needed to check the generated code: install Debian's protobuf-compiler (scripts/test.sh does)")
	}
	plugin := func(name string) string {
		out, err := exec.Command("go", "tool", "-n", name).Output()
		if err != nil {
			t.Fatalf("go tool -n %s: %v", name, err)
		}
		return strings.TrimSpace(string(out))
	}
	dir := t.TempDir()
	cmd := exec.Command("protoc",
		"--plugin=protoc-gen-go="+plugin("protoc-gen-go"),
		"--plugin=protoc-gen-connect-go="+plugin("protoc-gen-connect-go"),
		"--go_out="+dir, "--go_opt=paths=source_relative",
		"--connect-go_out="+dir, "--connect-go_opt=paths=source_relative",
		"agent.proto")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("protoc: %v\n%s", err, out)
	}
	for _, f := range []string{"agent.pb.go", filepath.Join("agentpbconnect", "agent.connect.go")} {
		want, err := os.ReadFile(filepath.Join(dir, f))
		if err != nil {
			t.Fatal(err)
		}
		got, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Errorf("%s is stale: run go generate ./internal/agent/agentpb and commit the result", f)
		}
	}
}

package main

import (
	"archive/tar"
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"
)

// TestCLICopy copies files and trees both ways with `smolvm sandbox cp`:
// on the data directory directly, then through a running server, and as a
// tar on stdin and stdout.
func TestCLICopy(t *testing.T) {
	t.Parallel()
	c := newCLI(t)
	var created struct {
		ID string `json:"id"`
	}
	if code, _ := c.runJSON(&created, "sandbox", "create", "--memory", "256"); code != "" {
		t.Fatalf("create: %s", code)
	}
	id := created.ID
	t.Cleanup(func() { c.run("sandbox", "delete", id) })

	host := t.TempDir()
	data := bytes.Repeat([]byte{0, 1, 2, 254, 255, '\n'}, 1000)
	os.WriteFile(filepath.Join(host, "data.bin"), data, 0o640)
	// A file into an existing guest directory keeps its name.
	if _, errOut, code := c.run("sandbox", "cp", filepath.Join(host, "data.bin"), id+":/tmp"); code != 0 {
		t.Fatalf("cp to the sandbox: %s", errOut)
	}
	// And back to a new name.
	if _, errOut, code := c.run("sandbox", "cp", id+":/tmp/data.bin", filepath.Join(host, "copy.bin")); code != 0 {
		t.Fatalf("cp from the sandbox: %s", errOut)
	}
	if got, _ := os.ReadFile(filepath.Join(host, "copy.bin")); !bytes.Equal(got, data) {
		t.Errorf("the file came back as %d bytes", len(got))
	}
	if fi, err := os.Stat(filepath.Join(host, "copy.bin")); err != nil || fi.Mode().Perm() != 0o640 {
		t.Errorf("mode came back as %v (%v)", fi.Mode(), err)
	}

	url := c.startServer(t)
	tree := filepath.Join(host, "proj")
	os.MkdirAll(filepath.Join(tree, "src"), 0o755)
	os.Mkdir(filepath.Join(tree, "empty"), 0o755)
	os.WriteFile(filepath.Join(tree, "src", "main.py"), []byte("print('hi')\n"), 0o644)
	os.Symlink("src/main.py", filepath.Join(tree, "main"))
	// A directory into an existing guest directory lands inside it.
	if _, errOut, code := c.run("sandbox", "cp", "--url", url, tree, id+":/root"); code != 0 {
		t.Fatalf("cp a tree to the sandbox: %s", errOut)
	}
	out, errOut, code := c.run("sandbox", "exec", "--url", url, id, "--", "cd /root/proj && python3 main && ls -A | sort | tr '\\n' ' '")
	if code != 0 || out != "hi\nempty main src " {
		t.Errorf("the tree in the sandbox: %q %s", out, errOut)
	}
	// Out as a tar with the directory's name on top.
	cmd := c.cmd("sandbox", "cp", "--url", url, id+":/root/proj", "-")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	tarball, err := cmd.Output()
	if err != nil {
		t.Fatalf("cp to stdout: %v %s", err, stderr.String())
	}
	var names []string
	tr := tar.NewReader(bytes.NewReader(tarball))
	for h, err := tr.Next(); err == nil; h, err = tr.Next() {
		names = append(names, h.Name)
	}
	sort.Strings(names)
	if strings.Join(names, " ") != "proj/ proj/empty/ proj/main proj/src/ proj/src/main.py" {
		t.Errorf("tar entries %v", names)
	}
	// And back in from stdin, somewhere else.
	cmd = c.cmd("sandbox", "cp", "--url", url, "-", id+":/opt/in")
	cmd.Stdin = bytes.NewReader(tarball)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("cp from stdin: %v %s", err, out)
	}
	if out, _, code := c.run("sandbox", "exec", "--url", url, id, "--", "cat /opt/in/proj/main"); code != 0 || out != "print('hi')\n" {
		t.Errorf("unpacked from stdin: %q", out)
	}
	// A tree back to a new host directory.
	back := filepath.Join(host, "back")
	if _, errOut, code := c.run("sandbox", "cp", "--url", url, id+":/root/proj", back); code != 0 {
		t.Fatalf("cp a tree from the sandbox: %s", errOut)
	}
	if diff, err := exec.Command("diff", "-r", "--no-dereference", tree, back).CombinedOutput(); err != nil {
		t.Errorf("the tree came back different: %v\n%s", err, diff)
	}
	if _, errOut, code := c.run("sandbox", "cp", "--url", url, id+":relative", host); code == 0 || !strings.Contains(errOut, "invalid_path") {
		t.Errorf("a relative guest path: exit %d, %s", code, errOut)
	}
}

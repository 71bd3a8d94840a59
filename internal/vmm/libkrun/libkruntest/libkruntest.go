// Package libkruntest builds what the libkrun tests run against on a host
// with neither KVM nor libkrun: smolvm-krun, built as smolvm ships it
// (CGO_ENABLED=0), and a stub libkrun.so (testdata/stub.c) compiled with the
// host's C compiler, which records every call the helper makes.
package libkruntest

import (
	"bytes"
	_ "embed"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
)

//go:embed testdata/stub.c
var stubSource []byte

// Environment variables the stub reads.
const (
	// EnvLog names the file the stub appends its calls to.
	EnvLog = "KRUN_STUB_LOG"
	// EnvFail names the one function that returns -EINVAL.
	EnvFail = "KRUN_STUB_FAIL"
	// EnvHeader names a libkrun.h to check the stub's signatures against;
	// without it, /usr/include/libkrun.h is used if there is one.
	EnvHeader = "SMOLVM_LIBKRUN_H"
)

// StubCtx is the context id the stub's krun_create_ctx hands out: not 0,
// so a helper that passed a constant instead would be caught.
const StubCtx = 7

// StubVersion is in the stub library's file name, as a distribution's
// libkrun.so.1.x.y has it.
const StubVersion = "1.99.0"

// RepoRoot is the module's root directory.
func RepoRoot() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "..", "..", "..", "..")
}

// Header is the libkrun.h the stub is checked against, or "".
func Header() string {
	for _, h := range []string{os.Getenv(EnvHeader), "/usr/include/libkrun.h"} {
		if h == "" {
			continue
		}
		if _, err := os.Stat(h); err == nil {
			return h
		}
	}
	return ""
}

// BuildStub compiles the stub into dir as libkrun.so.<StubVersion> and
// returns its path. Functions named in omit are left out, as an older
// libkrun would lack them. The test fails rather than skips without a C
// compiler: the stub is the only way this code is tested here.
func BuildStub(dir string, omit ...string) (string, error) {
	cc, err := exec.LookPath("cc")
	if err != nil {
		return "", fmt.Errorf("no C compiler (cc) to build the stub libkrun.so: install gcc (apt-get install gcc): %w", err)
	}
	src := filepath.Join(dir, "stub.c")
	if err := os.WriteFile(src, stubSource, 0o644); err != nil {
		return "", err
	}
	lib := filepath.Join(dir, "libkrun.so."+StubVersion)
	args := []string{"-shared", "-fPIC", "-O1", "-Wall", "-Wno-comment", "-o", lib}
	if h := Header(); h != "" {
		// The real declarations first: a definition whose types differ
		// from libkrun.h's is then a compile error.
		args = append(args, "-include", h)
	}
	for _, name := range omit {
		args = append(args, "-DOMIT_"+name)
	}
	out, err := exec.Command(cc, append(args, src)...).CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("compile the stub libkrun.so: %v: %s", err, out)
	}
	return lib, nil
}

var helper struct {
	once sync.Once
	dir  string
	path string
	err  error
}

// Helper builds cmd/smolvm-krun once per test process, with CGO_ENABLED=0
// as smolvm ships it; Cleanup removes it.
func Helper() (string, error) {
	helper.once.Do(func() {
		helper.dir, helper.err = os.MkdirTemp("", "smolvm-krun-test-")
		if helper.err != nil {
			return
		}
		helper.path = filepath.Join(helper.dir, "smolvm-krun")
		cmd := exec.Command("go", "build", "-o", helper.path, "./cmd/smolvm-krun")
		cmd.Dir = RepoRoot()
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			helper.err = fmt.Errorf("build smolvm-krun with CGO_ENABLED=0: %v: %s", err, out)
		}
	})
	return helper.path, helper.err
}

// Cleanup removes what Helper built.
func Cleanup() {
	if helper.dir != "" {
		os.RemoveAll(helper.dir)
	}
}

// Call is one call the stub recorded: the function's name and its
// arguments as JSON values (strings, numbers, booleans, null).
type Call struct {
	Name string
	Args []json.RawMessage
}

// String is the call as C would read it: krun_add_disk(7, "root", "/d", false).
func (c Call) String() string {
	args := make([]string, len(c.Args))
	for i, a := range c.Args {
		// Re-encoded, so it reads as Quote writes what a test expects.
		d := json.NewDecoder(bytes.NewReader(a))
		d.UseNumber()
		var v any
		if err := d.Decode(&v); err != nil {
			args[i] = string(a)
			continue
		}
		args[i] = encode(v)
	}
	return c.Name + "(" + strings.Join(args, ", ") + ")"
}

// Calls reads the stub's record at path, oldest first.
func Calls(path string) ([]Call, error) {
	b, err := os.ReadFile(path)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	var calls []Call
	for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		if line == "" {
			continue
		}
		var fields []json.RawMessage
		if err := json.Unmarshal([]byte(line), &fields); err != nil || len(fields) == 0 {
			return nil, fmt.Errorf("stub record line %q: %v", line, err)
		}
		var c Call
		if err := json.Unmarshal(fields[0], &c.Name); err != nil {
			return nil, fmt.Errorf("stub record line %q: %v", line, err)
		}
		c.Args = fields[1:]
		calls = append(calls, c)
	}
	return calls, nil
}

// Quote is s as the stub records a string, for expected calls.
func Quote(s string) string { return encode(s) }

func encode(v any) string {
	var b bytes.Buffer
	e := json.NewEncoder(&b)
	e.SetEscapeHTML(false)
	e.Encode(v)
	return strings.TrimSuffix(b.String(), "\n")
}

package kernel

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"

	"github.com/smolvm/smolvm/internal/datadir"
)

// Fetch downloads Debian's current generic kernel with apt and imports it.
// linux-image-<arch> is a meta package, so the real package is resolved
// first; apt-get download fetches it without installing anything.
func Fetch(ctx context.Context, d datadir.Dir, log io.Writer) (*Kernel, error) {
	if log == nil {
		log = io.Discard
	}
	k, err := fetch(ctx, d, log)
	if err != nil {
		return nil, fmt.Errorf("fetch kernel: %w", err)
	}
	return k, nil
}

func fetch(ctx context.Context, d datadir.Dir, log io.Writer) (*Kernel, error) {
	for _, tool := range []string{"apt-cache", "apt-get"} {
		if _, err := exec.LookPath(tool); err != nil {
			return nil, fmt.Errorf("%s not found: fetching needs Debian's apt; on other systems download a linux-image-*.deb and run `smolvm kernel import FILE.deb`", tool)
		}
	}
	meta := "linux-image-" + runtime.GOARCH
	fmt.Fprintf(log, "resolving %s\n", meta)
	pkg, err := resolveMetaPackage(ctx, meta)
	if err != nil {
		return nil, err
	}

	tmp, err := tempDir(d, "kernel-fetch-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(tmp)

	fmt.Fprintf(log, "downloading %s\n", pkg)
	var stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, "apt-get", "download", "-q", pkg)
	cmd.Dir = tmp
	cmd.Stdout = log
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		return nil, fmt.Errorf("apt-get download %s: %w: %s (an `apt-get update` may help)", pkg, err, lastLine(stderr.String()))
	}
	debs, err := filepath.Glob(filepath.Join(tmp, "*.deb"))
	if err != nil || len(debs) != 1 {
		return nil, fmt.Errorf("apt-get download %s: expected one .deb in %s, found %d", pkg, tmp, len(debs))
	}

	fmt.Fprintf(log, "importing %s\n", filepath.Base(debs[0]))
	k, err := ImportDeb(ctx, d, debs[0])
	if err != nil {
		return nil, err
	}
	fmt.Fprintf(log, "imported kernel %s into %s\n", k.Version, k.Dir)
	return k, nil
}

var kernelPackageRE = regexp.MustCompile(`^linux-image-[0-9][A-Za-z0-9.+~-]*$`)

// resolveMetaPackage reads `apt-cache depends META` and returns the first
// dependency that is a versioned kernel package.
func resolveMetaPackage(ctx context.Context, meta string) (string, error) {
	var stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, "apt-cache", "depends", meta)
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("apt-cache depends %s: %w: %s", meta, err, lastLine(stderr.String()))
	}
	if pkg := parseDepends(out); pkg != "" {
		return pkg, nil
	}
	return "", fmt.Errorf("apt-cache depends %s names no linux-image-<version> package (is the Debian archive in apt's sources, and has `apt-get update` run?)", meta)
}

// parseDepends picks the kernel package out of apt-cache depends output:
//
//	linux-image-amd64
//	  Depends: linux-image-6.1.0-56-amd64
func parseDepends(out []byte) string {
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		line := strings.TrimLeft(strings.TrimSpace(sc.Text()), "|")
		dep, ok := strings.CutPrefix(line, "Depends:")
		if !ok {
			continue
		}
		dep = strings.TrimSpace(dep)
		if kernelPackageRE.MatchString(dep) {
			return dep
		}
	}
	return ""
}

func lastLine(s string) string {
	s = strings.TrimSpace(s)
	if i := strings.LastIndexByte(s, '\n'); i >= 0 {
		s = s[i+1:]
	}
	if s == "" {
		return "no error output"
	}
	return s
}

//go:build !linux

package image

import (
	"context"
	"errors"
	"os"
	"os/exec"
)

var errLinuxOnly = errors.New("building images is supported on Linux only")

func lockExclusive(ctx context.Context, path string, waiting func()) (func(), error) {
	return nil, errLinuxOnly
}

func runIsolated(newCmd func() *exec.Cmd) error { return errLinuxOnly }

func removeTree(dir string) error { return os.RemoveAll(dir) }

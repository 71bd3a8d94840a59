//go:build !linux

package image

import (
	"context"
	"io"
	"io/fs"
)

// applier needs openat2; building images is Linux-only (see sys_other.go).
type applier struct{}

func newApplier(root string, whiteouts bool, warn func(string)) (*applier, error) {
	return nil, errLinuxOnly
}

func (a *applier) close()                                       {}
func (a *applier) apply(ctx context.Context, r io.Reader) error { return errLinuxOnly }
func (a *applier) finish() error                                { return errLinuxOnly }
func (a *applier) hasShell() bool                               { return false }

func fileIdentity(fs.FileInfo) (identity, bool) { return identity{}, false }

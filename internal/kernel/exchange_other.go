//go:build !linux

package kernel

import "errors"

// exchangeDirs is Linux-only; callers fall back to rename-aside.
func exchangeDirs(a, b string) error {
	return errors.New("atomic exchange not supported")
}

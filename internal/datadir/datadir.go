// Package datadir resolves where smolvm keeps its state on the host and how
// that directory is laid out, so every part agrees on one set of paths.
package datadir

import (
	"fmt"
	"os"
	"path/filepath"
)

// Dir is the root of smolvm's host state.
type Dir string

// Default returns $SMOLVM_DATA_DIR, else $XDG_DATA_HOME/smolvm, else
// ~/.local/share/smolvm.
func Default() (Dir, error) {
	if d := os.Getenv("SMOLVM_DATA_DIR"); d != "" {
		return Dir(d), nil
	}
	if d := os.Getenv("XDG_DATA_HOME"); d != "" {
		return Dir(filepath.Join(d, "smolvm")), nil
	}
	home, err := os.UserHomeDir()
	if err != nil {
		return "", fmt.Errorf("locate data directory: %w (set SMOLVM_DATA_DIR)", err)
	}
	return Dir(filepath.Join(home, ".local", "share", "smolvm")), nil
}

// Path returns the root as a string.
func (d Dir) Path() string { return string(d) }

// Kernels holds imported guest kernels, one directory per kernel version.
func (d Dir) Kernels() string { return filepath.Join(string(d), "kernels") }

// Images holds read-only base images keyed by content.
func (d Dir) Images() string { return filepath.Join(string(d), "images") }

// Initramfs holds built initramfs archives keyed by content.
func (d Dir) Initramfs() string { return filepath.Join(string(d), "initramfs") }

// Sandboxes holds one directory per sandbox (disk overlay, sockets, logs).
func (d Dir) Sandboxes() string { return filepath.Join(string(d), "sandboxes") }

// Sandbox is the directory of one sandbox.
func (d Dir) Sandbox(id string) string { return filepath.Join(string(d), "sandboxes", id) }

// Database is the SQLite file recording sandboxes.
func (d Dir) Database() string { return filepath.Join(string(d), "smolvm.db") }

// Tmp is scratch space on the same filesystem as the caches, so finished
// files can be renamed into place atomically.
func (d Dir) Tmp() string { return filepath.Join(string(d), "tmp") }

// Server records the running API server (its URL), so the CLI can go through
// it instead of competing for the sandboxes' agent connections.
func (d Dir) Server() string { return filepath.Join(string(d), "server.json") }

// Templates holds saved, booted VMs that new sandboxes are restored from.
func (d Dir) Templates() string { return filepath.Join(string(d), "templates") }

// Snapshots holds the snapshots users take of their sandboxes.
func (d Dir) Snapshots() string { return filepath.Join(string(d), "snapshots") }

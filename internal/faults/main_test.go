//go:build faults

package faults

import (
	"os"
	"path/filepath"
	"testing"
)

// TestMain removes the smolvm binary the cases built.
func TestMain(m *testing.M) {
	code := m.Run()
	if built.bin != "" {
		os.RemoveAll(filepath.Dir(built.bin))
	}
	os.Exit(code)
}

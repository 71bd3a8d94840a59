//go:build faults

package faults

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/smolvm/smolvm/internal/testenv"
)

// TestMain removes the binaries the cases built.
func TestMain(m *testing.M) {
	code := testenv.Main(m)
	if built.bin != "" {
		if err := os.RemoveAll(filepath.Dir(built.bin)); err != nil {
			fmt.Fprintln(os.Stderr, "remove the built smolvm:", err)
		}
	}
	os.Exit(code)
}

package ui_test

import (
	"os"
	"testing"

	"github.com/smolvm/smolvm/internal/testenv"
)

// TestMain removes the binaries the tests built.
func TestMain(m *testing.M) { os.Exit(testenv.Main(m)) }

package kernel

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cavaliergopher/cpio"

	"github.com/smolvm/smolvm/internal/datadir"
)

// newcEntry is one entry of a newc archive, with the device numbers that
// cavaliergopher/cpio's reader does not report.
type newcEntry struct {
	name      string
	mode      uint32
	rdevMajor uint32
	rdevMinor uint32
	data      []byte
}

// readNewc parses a newc archive independently of the code that wrote it.
func readNewc(b []byte) ([]newcEntry, error) {
	var out []newcEntry
	off := 0
	for {
		if off+110 > len(b) {
			return nil, errors.New("truncated header")
		}
		h := b[off : off+110]
		if string(h[:6]) != "070701" {
			return nil, fmt.Errorf("bad magic at %d", off)
		}
		field := func(i int) uint32 {
			v, _ := strconv.ParseUint(string(h[6+8*i:14+8*i]), 16, 32)
			return uint32(v)
		}
		size, namesize := int(field(6)), int(field(11))
		nameEnd := off + 110 + namesize
		if nameEnd > len(b) {
			return nil, errors.New("truncated name")
		}
		name := strings.TrimRight(string(b[off+110:nameEnd]), "\x00")
		dataOff := (nameEnd + 3) &^ 3
		if dataOff+size > len(b) {
			return nil, errors.New("truncated data")
		}
		if name == "TRAILER!!!" {
			return out, nil
		}
		out = append(out, newcEntry{name, field(1), field(9), field(10), b[dataOff : dataOff+size]})
		off = (dataOff + size + 3) &^ 3
	}
}

func TestBuildInitramfs(t *testing.T) {
	_, k := importedKernel(t)
	d := testDataDir(t)
	agentDir := t.TempDir()
	agent := filepath.Join(agentDir, "agent")
	agentBytes := []byte("\x7fELF pretend agent binary\n")
	if err := os.WriteFile(agent, agentBytes, 0o755); err != nil {
		t.Fatal(err)
	}

	start := time.Now()
	p, err := BuildInitramfs(context.Background(), d, k, agent)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("first build: %v", time.Since(start).Round(time.Millisecond))
	if filepath.Dir(p) != d.Initramfs() || !strings.HasSuffix(p, ".cpio") {
		t.Errorf("path %s not under %s", p, d.Initramfs())
	}
	raw, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("initramfs: %d bytes", len(raw))
	entries, err := readNewc(raw)
	if err != nil {
		t.Fatal(err)
	}
	byName := map[string]newcEntry{}
	for _, e := range entries {
		if _, dup := byName[e.name]; dup {
			t.Errorf("duplicate entry %s", e.name)
		}
		byName[e.name] = e
	}

	if e := byName["init"]; !bytes.Equal(e.data, agentBytes) || e.mode != cpio.TypeReg|0o755 {
		t.Errorf("/init: mode %o, %d bytes", e.mode, len(e.data))
	}
	for _, dir := range []string{"dev", "proc", "sys", "newroot", "smolvm", "smolvm/modules"} {
		if e, ok := byName[dir]; !ok || e.mode&cpio.ModeType != cpio.TypeDir {
			t.Errorf("directory /%s missing", dir)
		}
	}
	if e := byName["dev/console"]; e.mode != cpio.TypeChar|0o600 || e.rdevMajor != 5 || e.rdevMinor != 1 {
		t.Errorf("/dev/console: mode %o, device %d:%d", e.mode, e.rdevMajor, e.rdevMinor)
	}

	order := strings.Fields(string(byName["smolvm/modules.order"].data))
	var files []string
	for _, e := range entries {
		if rest, ok := strings.CutPrefix(e.name, "smolvm/modules/"); ok {
			files = append(files, rest)
			if !bytes.HasPrefix(e.data, elfMagic) {
				t.Errorf("%s is not a plain ELF module", e.name)
			}
		}
	}
	if strings.Join(order, " ") != strings.Join(files, " ") {
		t.Errorf("modules.order %v does not match the module files %v", order, files)
	}
	want, err := resolveModules(k.Modules, BaseModules(), optionalModule)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Join(order, " ") != strings.Join(names(want), " ") {
		t.Errorf("modules.order %v, want %v", order, names(want))
	}
	t.Logf("modules.order: %v", order)

	// The archive must read back with the library too, and with the cpio
	// tool when it is installed.
	r := cpio.NewReader(bytes.NewReader(raw))
	n := 0
	for {
		_, err := r.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("cavaliergopher/cpio cannot read the archive: %v", err)
		}
		n++
	}
	if n != len(entries) {
		t.Errorf("library read %d entries, want %d", n, len(entries))
	}
	if _, err := exec.LookPath("cpio"); err == nil {
		cmd := exec.Command("cpio", "-itv", "--quiet")
		cmd.Stdin = bytes.NewReader(raw)
		out, err := cmd.Output()
		if err != nil {
			t.Errorf("cpio -it: %v", err)
		} else if !strings.Contains(string(out), "5,   1") && !strings.Contains(string(out), "5, 1") {
			t.Errorf("cpio -itv does not show /dev/console as 5,1:\n%s", out)
		}
	}

	// Same inputs: the cached file, untouched.
	old := time.Now().Add(-time.Hour).Truncate(time.Second)
	if err := os.Chtimes(p, old, old); err != nil {
		t.Fatal(err)
	}
	start = time.Now()
	p2, err := BuildInitramfs(context.Background(), d, k, agent)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("cached build: %v", time.Since(start).Round(time.Millisecond))
	if p2 != p {
		t.Errorf("second build gave %s, want %s", p2, p)
	}
	if fi, err := os.Stat(p); err != nil || !fi.ModTime().Equal(old) {
		t.Errorf("cached archive was rewritten")
	}

	// A different agent: a different archive.
	if err := os.WriteFile(agent, append(agentBytes, '!'), 0o755); err != nil {
		t.Fatal(err)
	}
	p3, err := BuildInitramfs(context.Background(), d, k, agent)
	if err != nil {
		t.Fatal(err)
	}
	if p3 == p {
		t.Error("a different agent gave the same archive")
	}
	if entries, _ := os.ReadDir(d.Tmp()); len(entries) != 0 {
		t.Errorf("temporary files left in %s: %v", d.Tmp(), entries)
	}

	if _, err := BuildInitramfs(context.Background(), d, k, filepath.Join(agentDir, "missing")); err == nil {
		t.Error("missing agent: no error")
	}
}

// testDataDir gives a test its own data directory, so its caches start
// empty.
func testDataDir(t *testing.T) datadir.Dir {
	return datadir.Dir(t.TempDir())
}

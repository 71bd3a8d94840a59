package kernel

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/smolvm/smolvm/internal/datadir"
)

func TestInitramfsesRemembersUntilAnInputChanges(t *testing.T) {
	_, k := importedKernel(t)
	d := testDataDir(t)
	agent := filepath.Join(t.TempDir(), "agent")
	if err := os.WriteFile(agent, []byte("\x7fELF pretend agent, first\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	builds := 0
	c := &Initramfses{build: func(ctx context.Context, d datadir.Dir, k *Kernel, agent string) (string, []string, error) {
		builds++
		return buildInitramfs(ctx, d, k, agent)
	}}
	build := func(want int) string {
		t.Helper()
		p, err := c.Build(context.Background(), d, k, agent)
		if err != nil {
			t.Fatal(err)
		}
		if builds != want {
			t.Fatalf("%d builds, want %d", builds, want)
		}
		if _, err := os.Stat(p); err != nil {
			t.Fatalf("the archive returned is not there: %v", err)
		}
		return p
	}
	first := build(1)
	if p := build(1); p != first {
		t.Fatalf("the same inputs gave %s, then %s", first, p)
	}
	// What it returns is what BuildInitramfs returns.
	if p, err := BuildInitramfs(context.Background(), d, k, agent); err != nil || p != first {
		t.Fatalf("BuildInitramfs gave %s (%v), the cache %s", p, err, first)
	}

	// An agent of the same size but other bytes: another archive.
	if err := os.WriteFile(agent, []byte("\x7fELF pretend agent, other\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	second := build(2)
	if second == first {
		t.Fatal("a changed agent gave the same archive")
	}
	build(2)

	// A module file touched: looked at again (its content, and so the
	// archive, is the same).
	mods, err := resolveModules(k.Modules, BaseModules(), optionalModule)
	if err != nil || len(mods) == 0 {
		t.Fatalf("modules: %v %v", mods, err)
	}
	later := time.Now().Add(time.Minute)
	if err := os.Chtimes(mods[0], later, later); err != nil {
		t.Fatal(err)
	}
	if p := build(3); p != second {
		t.Fatalf("a touched module gave %s, want %s", p, second)
	}

	// The archive removed: made again.
	if err := os.Remove(second); err != nil {
		t.Fatal(err)
	}
	if p := build(4); p != second {
		t.Fatalf("a removed archive came back as %s, want %s", p, second)
	}
	build(4)

	// The agent replaced by a copy of itself (another inode): looked at
	// again.
	b, err := os.ReadFile(agent)
	if err != nil {
		t.Fatal(err)
	}
	tmp := agent + ".new"
	if err := os.WriteFile(tmp, b, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, agent); err != nil {
		t.Fatal(err)
	}
	if p := build(5); p != second {
		t.Fatalf("a replaced agent gave %s, want %s", p, second)
	}

	if _, err := c.Build(context.Background(), d, k, agent+".missing"); err == nil {
		t.Fatal("a missing agent built an archive")
	}
}

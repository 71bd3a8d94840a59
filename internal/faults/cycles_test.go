//go:build faults

package faults

import (
	"context"
	"fmt"
	"io/fs"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/smolvm/smolvm/internal/api"
	sbx "github.com/smolvm/smolvm/internal/sandbox"
	"github.com/smolvm/smolvm/internal/testenv"
)

// usage is what a server holds that must not grow with the sandboxes it
// has made and deleted.
type usage struct {
	goroutines int
	fds        int
	children   int   // child processes, zombies included
	diskBytes  int64 // allocated under the data directory, shared images and the database's log aside
	files      map[string]int64
}

func (u usage) String() string {
	return fmt.Sprintf("%d goroutines, %d open files, %d child processes, %d KiB on disk", u.goroutines, u.fds, u.children, u.diskBytes>>10)
}

func measure(dir string) usage {
	u := usage{files: map[string]int64{}}
	u.goroutines = runtime.NumGoroutine()
	fds, _ := os.ReadDir("/proc/self/fd")
	u.fds = len(fds)
	stats, _ := filepath.Glob("/proc/[0-9]*/stat")
	self := strconv.Itoa(os.Getpid())
	for _, p := range stats {
		b, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		// pid (comm) state ppid ...
		if i := strings.LastIndexByte(string(b), ')'); i > 0 {
			if f := strings.Fields(string(b[i+1:])); len(f) > 1 && f[1] == self {
				u.children++
			}
		}
	}
	filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		// SQLite's write-ahead log is reused in place and checkpointed
		// at a few MiB: bounded, but not back to its size of before.
		if err != nil || d.Type()&fs.ModeSymlink != 0 || strings.HasSuffix(p, "-wal") || strings.HasSuffix(p, "-shm") {
			return nil
		}
		if info, err := d.Info(); err == nil {
			u.diskBytes += allocatedBytes(info)
			u.files[p] = allocatedBytes(info)
		}
		return nil
	})
	return u
}

// 300 sandboxes made, used and deleted through the HTTP API leave the
// server (here, this process) holding what it held before them.
func TestCyclesLeakNothing(t *testing.T) {
	t.Parallel()
	const cycles = 300
	h := newHost(t, "")
	// What the Manager logs (a template clone that failed, and why) is
	// in the test's output.
	m, err := sbx.Open(context.Background(), sbx.Options{
		DataDir: h.d, AgentPath: testenv.AgentPath(t), NetPath: testenv.NetPath(t),
		Progress: t.Output(),
	})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	hs := httptest.NewServer(api.New(m, api.Options{}))
	defer hs.Close()
	s := &server{t: t, url: hs.URL}
	h.srv = s

	var cold atomic.Int32
	cycle := func(s *server) {
		sb := s.create()
		if len(sb.Warnings) > 0 {
			cold.Add(1)
			s.t.Logf("%s: %s", sb.ID, strings.Join(sb.Warnings, "; "))
		}
		if got := s.exec(sb.ID, "echo $((6*7))"); got != "42\n" {
			s.t.Fatalf("exec in %s: %q", sb.ID, got)
		}
		s.delete(sb.ID)
	}
	// The first cycles build the template and fill the pools of
	// connections and buffers that are meant to stay.
	for range 3 {
		cycle(s)
	}
	http.DefaultClient.CloseIdleConnections()
	// Measured after a pause, so the last cycle's processes are gone.
	time.Sleep(2 * time.Second)
	before := settle(h.d.Path(), usage{})
	start := time.Now()
	// A few clients at once, as a server has them: the cycles take less
	// time, and what they leak is the same.
	const clients = 3
	t.Run("cycles", func(t *testing.T) {
		for c := range clients {
			t.Run(strconv.Itoa(c), func(t *testing.T) {
				t.Parallel()
				s := &server{t: t, url: hs.URL}
				for i := range cycles / clients {
					cycle(s)
					if t.Failed() {
						t.Fatalf("cycle %d failed", i)
					}
				}
			})
		}
	})
	if t.Failed() {
		return
	}
	http.DefaultClient.CloseIdleConnections()
	after := settle(h.d.Path(), before)
	t.Logf("%d cycles in %s, %d of them booted cold; before: %s; after: %s", cycles, time.Since(start).Round(time.Second), cold.Load(), before, after)
	if after.goroutines > before.goroutines+3 {
		t.Errorf("goroutines grew from %d to %d", before.goroutines, after.goroutines)
	}
	if after.fds > before.fds+2 {
		t.Errorf("open files grew from %d to %d", before.fds, after.fds)
	}
	if after.children > before.children {
		t.Errorf("child processes grew from %d to %d", before.children, after.children)
	}
	// The database may keep pages it freed for reuse.
	if after.diskBytes > before.diskBytes+1<<20 {
		t.Errorf("disk use grew from %d to %d KiB", before.diskBytes>>10, after.diskBytes>>10)
		for p, n := range after.files {
			if n > before.files[p] {
				t.Logf("  %s: %d -> %d KiB", p, before.files[p]>>10, n>>10)
			}
		}
	}
	h.consistent()
	if p := h.procs(); len(p) > 0 {
		t.Errorf("processes left:\n%s", procList(p))
	}
}

// settle measures until the figures stop falling toward base (processes
// and goroutines end a moment after the call that ends them returns).
func settle(dir string, base usage) usage {
	u := measure(dir)
	for try := 0; try < 50; try++ {
		if base.files != nil && u.goroutines <= base.goroutines && u.fds <= base.fds && u.children <= base.children {
			break
		}
		time.Sleep(100 * time.Millisecond)
		next := measure(dir)
		if base.files == nil && next.goroutines == u.goroutines && next.fds == u.fds && next.children == u.children {
			break
		}
		u = next
	}
	return u
}

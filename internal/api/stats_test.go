package api

import (
	"encoding/json"
	"net/http"
	"slices"
	"testing"
	"time"

	"github.com/prometheus/procfs"

	"github.com/smolvm/smolvm/internal/testenv"
)

// Stats show the VM process as the host sees it and the guest as ps, free
// and df would: its memory, its disk and a process started through the
// API, with its user.
func TestStatsHTTP(t *testing.T) {
	t.Parallel()
	m := testenv.Manager(t)
	base := testServer(t, m, Options{}).URL

	r := do(t, http.MethodPost, base+"/sandboxes", `{"memory":256,"disk_size":1024}`, nil)
	var sb Sandbox
	if r.Status != http.StatusCreated || json.Unmarshal(r.Body, &sb) != nil {
		t.Fatalf("create: %d %s", r.Status, r.Body)
	}
	if r := do(t, http.MethodPost, base+"/sandboxes/"+sb.ID+"/processes", `{"command":"exec setpriv --reuid=65534 --regid=65534 --clear-groups sleep 600","shell":"raw"}`, nil); r.Status != http.StatusCreated {
		t.Fatalf("start sleep: %d %s", r.Status, r.Body)
	}
	stats := func() SandboxStats {
		t.Helper()
		r := do(t, http.MethodGet, base+"/sandboxes/"+sb.ID+"/stats", nil, nil)
		var st SandboxStats
		if r.Status != http.StatusOK || json.Unmarshal(r.Body, &st) != nil {
			t.Fatalf("stats: %d %s", r.Status, r.Body)
		}
		return st
	}
	// The process may not have become sleep yet, and an emulated guest
	// takes a while to load it (it shows as running meanwhile): look until
	// it sleeps.
	var st SandboxStats
	var sleep, init *GuestProcess
	for deadline := time.Now().Add(30 * time.Second); (sleep == nil || sleep.State != "S") && time.Now().Before(deadline); {
		st = stats()
		if st.Guest == nil {
			t.Fatal("a running sandbox's stats have no guest part")
		}
		sleep, init = nil, nil
		for i, gp := range st.Guest.Processes {
			switch {
			case gp.Command == "sleep 600":
				sleep = &st.Guest.Processes[i]
			case gp.PID == 1:
				init = &st.Guest.Processes[i]
			}
		}
		if sleep == nil || sleep.State != "S" {
			time.Sleep(100 * time.Millisecond)
		}
	}
	if st.SandboxID != sb.ID || st.Time.IsZero() {
		t.Errorf("stats of %s: %+v", sb.ID, st)
	}
	// The pid is the VM's: its command line names the sandbox.
	p, err := procfs.NewProc(st.Host.PID)
	if err != nil {
		t.Fatalf("host pid %d: %v", st.Host.PID, err)
	}
	if cmdline, _ := p.CmdLine(); !slices.Contains(cmdline, sb.ID+",process=smolvm-"+sb.ID) {
		t.Errorf("host pid %d is not the VM: %q", st.Host.PID, cmdline)
	}
	if st.Host.CPUSeconds <= 0 || st.Host.RSSBytes < 16<<20 || st.Host.PSSBytes == 0 || st.Host.PSSBytes > st.Host.RSSBytes {
		t.Errorf("host = %+v", st.Host)
	}
	g := st.Guest
	if g.MemoryTotalBytes < 150<<20 || g.MemoryTotalBytes > 256<<20 || g.MemoryAvailableBytes == 0 || g.MemoryAvailableBytes > g.MemoryTotalBytes {
		t.Errorf("guest memory %d of %d", g.MemoryAvailableBytes, g.MemoryTotalBytes)
	}
	if g.DiskTotalBytes < 800<<20 || g.DiskTotalBytes > 1024<<20 || g.DiskFreeBytes == 0 || g.DiskFreeBytes > g.DiskTotalBytes {
		t.Errorf("guest disk %d free of %d", g.DiskFreeBytes, g.DiskTotalBytes)
	}
	if g.UptimeMS <= 0 {
		t.Errorf("uptime %d", g.UptimeMS)
	}
	for _, gp := range g.Processes {
		if gp.Command == "" || gp.State == "" {
			t.Errorf("process without command or state: %+v", gp)
		}
	}
	if sleep == nil || sleep.User != "nobody" || sleep.State != "S" || sleep.RSSBytes == 0 {
		t.Errorf("sleep 600 as nobody: %+v in %+v", sleep, g.Processes)
	}
	if init == nil || init.User != "root" {
		t.Errorf("pid 1: %+v", init)
	}

	// A look a second later measures CPU since the first: a share of the
	// one vCPU's host thread (and QEMU's own), not of milliseconds.
	time.Sleep(1100 * time.Millisecond)
	if again := stats(); again.Host.CPUSeconds < st.Host.CPUSeconds || again.Host.PID != st.Host.PID || again.Host.CPUPercent < 0 || again.Host.CPUPercent > 200 {
		t.Errorf("second stats: %+v after %+v", again.Host, st.Host)
	}

	// Paused: the host side only.
	if r := do(t, http.MethodPost, base+"/sandboxes/"+sb.ID+"/pause", nil, nil); r.Status != http.StatusOK {
		t.Fatalf("pause: %d %s", r.Status, r.Body)
	}
	if st := stats(); st.Guest != nil || st.Host.RSSBytes == 0 {
		t.Errorf("paused stats: %+v", st)
	}
	if r := do(t, http.MethodPost, base+"/sandboxes/"+sb.ID+"/stop", nil, nil); r.Status != http.StatusOK {
		t.Fatalf("stop: %d %s", r.Status, r.Body)
	}
	for path, want := range map[string]string{
		"/sandboxes/" + sb.ID + "/stats": "sandbox_not_running",
		"/sandboxes/vm-00000000/stats":   "sandbox_not_found",
	} {
		r := do(t, http.MethodGet, base+path, nil, nil)
		if p := r.problem(t); p.Code != want {
			t.Errorf("GET %s: %d %s, want %s", path, r.Status, r.Body, want)
		}
	}
}

package sandbox

import (
	"context"
	"fmt"
	"time"

	"connectrpc.com/connect"
	"github.com/prometheus/procfs"
)

// Stats is a sandbox's resource use: its VM process on the host and, while
// it runs, the guest as its agent sees it.
type Stats struct {
	Time  time.Time
	Host  HostStats
	Guest *GuestStats // nil while paused
}

// HostStats is the VM process's use of the host.
type HostStats struct {
	PID int
	// CPUPercent is the share of one host CPU used since an earlier call
	// for this sandbox (at least cpuMinSpan and at most cpuWindow ago),
	// else over its lifetime.
	CPUPercent float64
	CPUSeconds float64
	RSSBytes   uint64
	// PSSBytes counts pages shared with other processes (clones of one
	// template) by their share: the fair measure of what it costs.
	PSSBytes uint64
}

// GuestStats is the guest's own view of its resources.
type GuestStats struct {
	MemoryTotalBytes     uint64
	MemoryAvailableBytes uint64
	DiskTotalBytes       uint64
	DiskFreeBytes        uint64
	Load1                float64
	UptimeMS             int64
	Processes            []GuestProcess
}

// GuestProcess is one process in the guest.
type GuestProcess struct {
	PID, PPID  int
	User       string
	State      string
	RSSBytes   uint64
	CPUSeconds float64
	Command    string
}

// cpuWindow is how old a previous CPU sample may be to measure against:
// a dashboard polls every few seconds, and an average over a longer span
// says little about now.
const cpuWindow = time.Minute

// cpuMinSpan is the shortest span a CPU share is measured over: two
// callers polling the same sandbox must not measure milliseconds.
const cpuMinSpan = time.Second

// statsTimeout bounds the agent's answer to a stats call.
const statsTimeout = 5 * time.Second

type cpuSample struct {
	pid     int
	at      time.Time
	seconds float64
}

// Stats measures a running or paused sandbox.
func (m *Manager) Stats(ctx context.Context, id string) (Stats, error) {
	rec, err := m.get(ctx, id)
	if err != nil {
		return Stats{}, err
	}
	if (rec.Status != StatusRunning && rec.Status != StatusPaused) || rec.PID <= 0 {
		return Stats{}, &Error{Kind: KindConflict, Code: "sandbox_not_running",
			Message: fmt.Sprintf("sandbox %s is %s: only a running or paused sandbox has resource use to show", id, rec.Status)}
	}
	now := time.Now()
	host, err := m.hostStats(rec.ID, rec.PID, now)
	if err != nil {
		return Stats{}, err
	}
	st := Stats{Time: now, Host: host}
	if rec.Status != StatusRunning {
		return st, nil
	}
	c, err := m.l.client(ctx, rec)
	if err != nil {
		return Stats{}, m.processErr(ctx, rec, nil, err)
	}
	// A guest that cannot answer in time (paused meanwhile, or stalled)
	// must not hold a dashboard's poll.
	sctx, cancel := context.WithTimeout(ctx, statsTimeout)
	defer cancel()
	g, err := c.Stats(sctx)
	if connect.CodeOf(err) == connect.CodeUnimplemented {
		// An agent older than the call (a VM started before an
		// upgrade): the host side is still worth showing.
		return st, nil
	}
	if err != nil {
		return Stats{}, m.processErr(ctx, rec, nil, err)
	}
	gs := &GuestStats{
		MemoryTotalBytes:     g.GetMemoryTotalBytes(),
		MemoryAvailableBytes: g.GetMemoryAvailableBytes(),
		DiskTotalBytes:       g.GetDiskTotalBytes(),
		DiskFreeBytes:        g.GetDiskFreeBytes(),
		Load1:                g.GetLoad1(),
		UptimeMS:             g.GetUptimeMs(),
		Processes:            make([]GuestProcess, 0, len(g.GetProcesses())),
	}
	for _, p := range g.GetProcesses() {
		gs.Processes = append(gs.Processes, GuestProcess{
			PID: int(p.GetPid()), PPID: int(p.GetPpid()), User: p.GetUser(), State: p.GetState(),
			RSSBytes: p.GetRssBytes(), CPUSeconds: p.GetCpuSeconds(), Command: p.GetCommand(),
		})
	}
	st.Guest = gs
	return st, nil
}

// hostStats reads the VM process's CPU time and memory from /proc.
func (m *Manager) hostStats(id string, pid int, now time.Time) (HostStats, error) {
	gone := func(err error) error {
		return &Error{Kind: KindConflict, Code: "sandbox_not_running",
			Message: fmt.Sprintf("sandbox %s: its VM process %d cannot be read: %v", id, pid, err)}
	}
	p, err := procfs.NewProc(pid)
	if err != nil {
		return HostStats{}, gone(err)
	}
	stat, err := p.Stat()
	if err != nil {
		return HostStats{}, gone(err)
	}
	hs := HostStats{PID: pid, CPUSeconds: stat.CPUTime(), RSSBytes: uint64(stat.ResidentMemory())}
	if r, err := p.ProcSMapsRollup(); err == nil {
		hs.PSSBytes = r.Pss
	}

	m.mu.Lock()
	if m.cpu == nil {
		m.cpu = map[string][]cpuSample{}
	}
	for k, hist := range m.cpu {
		if len(hist) == 0 || now.Sub(hist[len(hist)-1].at) > cpuWindow {
			delete(m.cpu, k)
		}
	}
	// Measure from the newest sample at least cpuMinSpan old, and keep a
	// new sample only that often: several callers polling one sandbox
	// then all measure over a second or more.
	hist := m.cpu[id]
	var base *cpuSample
	for i := len(hist) - 1; i >= 0; i-- {
		if age := now.Sub(hist[i].at); hist[i].pid == pid && age >= cpuMinSpan && age <= cpuWindow {
			base = &hist[i]
			break
		}
	}
	if n := len(hist); n == 0 || hist[n-1].pid != pid || now.Sub(hist[n-1].at) >= cpuMinSpan {
		hist = append(hist, cpuSample{pid: pid, at: now, seconds: hs.CPUSeconds})
		if len(hist) > 2 {
			hist = hist[len(hist)-2:]
		}
		m.cpu[id] = hist
	}
	var since *cpuSample
	if base != nil {
		b := *base
		since = &b
	}
	m.mu.Unlock()

	if since != nil {
		hs.CPUPercent = 100 * (hs.CPUSeconds - since.seconds) / now.Sub(since.at).Seconds()
	} else if start, err := stat.StartTime(); err == nil {
		if age := float64(now.Unix()) - start; age > 0 {
			hs.CPUPercent = 100 * hs.CPUSeconds / age
		}
	}
	if hs.CPUPercent < 0 {
		hs.CPUPercent = 0
	}
	return hs, nil
}

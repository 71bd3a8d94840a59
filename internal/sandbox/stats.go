package sandbox

import (
	"context"
	"fmt"
	"time"

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
	// CPUPercent is the share of one host CPU used since the previous
	// call for this sandbox (within cpuWindow), else over its lifetime.
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
		return Stats{}, err
	}
	g, err := c.Stats(ctx)
	if err != nil {
		return Stats{}, err
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
	prev, ok := m.cpu[id]
	if m.cpu == nil {
		m.cpu = map[string]cpuSample{}
	}
	for k, s := range m.cpu {
		if now.Sub(s.at) > cpuWindow {
			delete(m.cpu, k)
		}
	}
	m.cpu[id] = cpuSample{pid: pid, at: now, seconds: hs.CPUSeconds}
	m.mu.Unlock()

	if ok && prev.pid == pid && now.Sub(prev.at) <= cpuWindow && now.After(prev.at) {
		hs.CPUPercent = 100 * (hs.CPUSeconds - prev.seconds) / now.Sub(prev.at).Seconds()
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

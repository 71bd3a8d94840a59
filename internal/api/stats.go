package api

import (
	"context"
	"net/http"
	"time"

	"github.com/danielgtaylor/huma/v2"

	"github.com/smolvm/smolvm/internal/sandbox"
)

// SandboxStats is a sandbox's resource use.
type SandboxStats struct {
	SandboxID string      `json:"sandbox_id" example:"vm-a1b2c3d4" doc:"The sandbox measured."`
	Time      time.Time   `json:"time" example:"2026-06-24T10:00:00Z" doc:"When it was measured (RFC 3339)."`
	Host      HostStats   `json:"host" doc:"The sandbox's VM process on the host."`
	Guest     *GuestStats `json:"guest,omitempty" doc:"The guest's own view, from its agent; absent while the sandbox is paused."`
}

// HostStats is what a sandbox's VM process uses of the host.
type HostStats struct {
	PID        int     `json:"pid" example:"4242" doc:"The VM process's id on the host."`
	CPUPercent float64 `json:"cpu_percent" minimum:"0" example:"12.5" doc:"Share of one host CPU used since an earlier stats call for this sandbox (at least a second and at most a minute before), else since the VM started. Above 100 with several busy vCPUs."`
	CPUSeconds float64 `json:"cpu_seconds" minimum:"0" example:"3.21" doc:"CPU time used since the VM started, user and system."`
	RSSBytes   uint64  `json:"rss_bytes" example:"98566144" doc:"Resident memory."`
	PSSBytes   uint64  `json:"pss_bytes" example:"67108864" doc:"Proportional set size: resident memory with pages shared with other processes (clones of one template) counted by their share."`
}

// GuestStats is the guest's view of its resources.
type GuestStats struct {
	MemoryTotalBytes     uint64         `json:"memory_total_bytes" example:"503316480" doc:"Memory the guest kernel manages."`
	MemoryAvailableBytes uint64         `json:"memory_available_bytes" example:"402653184" doc:"Memory available for new work without swapping (MemAvailable)."`
	DiskTotalBytes       uint64         `json:"disk_total_bytes" example:"1073741824" doc:"Size of the root filesystem."`
	DiskFreeBytes        uint64         `json:"disk_free_bytes" example:"805306368" doc:"Space free on the root filesystem for ordinary users."`
	Load1                float64        `json:"load1" minimum:"0" example:"0.08" doc:"One-minute load average."`
	UptimeMS             int64          `json:"uptime_ms" minimum:"0" example:"5230" doc:"Time since the guest booted (its clock; a fork counts from its snapshot's boot)."`
	Processes            []GuestProcess `json:"processes" doc:"The guest's processes, kernel threads left out, at most 512."`
}

// GuestProcess is one process in the guest, as ps shows it.
type GuestProcess struct {
	PID        int     `json:"pid" example:"1"`
	PPID       int     `json:"ppid" example:"0"`
	User       string  `json:"user" example:"root"`
	State      string  `json:"state" example:"S" doc:"As in ps: R running, S sleeping, D waiting on I/O, T stopped, Z zombie."`
	RSSBytes   uint64  `json:"rss_bytes" example:"8388608"`
	CPUSeconds float64 `json:"cpu_seconds" minimum:"0" example:"0.12"`
	Command    string  `json:"command" example:"/init"`
}

type statsOutput struct {
	Body SandboxStats
}

func registerStats(hapi huma.API, h *handlers, common []int) {
	huma.Register(hapi, huma.Operation{
		OperationID: "getSandboxStats",
		Method:      http.MethodGet,
		Path:        "/sandboxes/{id}/stats",
		Summary:     "Measure a sandbox's resource use",
		Description: "The VM process's CPU and memory on the host and, while the sandbox runs, the guest's memory, disk, load and process list from its agent. A stopped sandbox answers 409 sandbox_not_running.",
		Tags:        []string{"sandboxes"},
		Errors:      append([]int{http.StatusNotFound, http.StatusConflict, http.StatusUnprocessableEntity}, common...),
	}, h.stats)
}

func (h *handlers) stats(ctx context.Context, in *sandboxID) (*statsOutput, error) {
	m, err := h.manager(in.ID)
	if err != nil {
		return nil, err
	}
	st, err := m.Stats(ctx, in.ID)
	if err != nil {
		return nil, ProblemFrom(ctx, err)
	}
	return &statsOutput{Body: statsFrom(in.ID, st)}, nil
}

func statsFrom(id string, st sandbox.Stats) SandboxStats {
	out := SandboxStats{
		SandboxID: id,
		Time:      st.Time.UTC().Round(time.Millisecond),
		Host:      HostStats(st.Host),
	}
	if g := st.Guest; g != nil {
		gs := &GuestStats{
			MemoryTotalBytes: g.MemoryTotalBytes, MemoryAvailableBytes: g.MemoryAvailableBytes,
			DiskTotalBytes: g.DiskTotalBytes, DiskFreeBytes: g.DiskFreeBytes,
			Load1: g.Load1, UptimeMS: g.UptimeMS,
			Processes: make([]GuestProcess, 0, len(g.Processes)),
		}
		for _, p := range g.Processes {
			gs.Processes = append(gs.Processes, GuestProcess(p))
		}
		out.Guest = gs
	}
	return out
}

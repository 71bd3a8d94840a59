package agent

import (
	"context"
	"fmt"
	"strconv"
	"strings"

	"connectrpc.com/connect"
	"github.com/prometheus/procfs"
	"golang.org/x/sys/unix"

	"github.com/smolvm/smolvm/internal/agent/agentpb"
)

// maxStatsProcesses bounds the process list: a fork bomb must not make the
// answer huge.
const maxStatsProcesses = 512

// Stats reads /proc: memory, load, the root filesystem and the processes,
// as free, df and ps would show them.
func (v *systemService) Stats(context.Context, *connect.Request[agentpb.StatsRequest]) (*connect.Response[agentpb.StatsResponse], error) {
	fs, err := procfs.NewDefaultFS()
	if err != nil {
		return nil, connect.NewError(connect.CodeUnavailable, fmt.Errorf("open /proc: %w", err))
	}
	out := &agentpb.StatsResponse{}
	if mi, err := fs.Meminfo(); err == nil {
		if mi.MemTotalBytes != nil {
			out.MemoryTotalBytes = *mi.MemTotalBytes
		}
		if mi.MemAvailableBytes != nil {
			out.MemoryAvailableBytes = *mi.MemAvailableBytes
		}
	}
	if la, err := fs.LoadAvg(); err == nil {
		out.Load1 = la.Load1
	}
	var st unix.Statfs_t
	if unix.Statfs("/", &st) == nil {
		out.DiskTotalBytes = st.Blocks * uint64(st.Bsize)
		out.DiskFreeBytes = st.Bavail * uint64(st.Bsize)
	}
	var si unix.Sysinfo_t
	if unix.Sysinfo(&si) == nil {
		out.UptimeMs = int64(si.Uptime) * 1000
	}
	procs, err := fs.AllProcs()
	if err != nil {
		return nil, connect.NewError(connect.CodeInternal, fmt.Errorf("list processes: %w", err))
	}
	users := map[uint64]string{}
	for _, p := range procs {
		if len(out.Processes) == maxStatsProcesses {
			break
		}
		gp, ok := guestProcess(p, users)
		if ok {
			out.Processes = append(out.Processes, gp)
		}
	}
	return connect.NewResponse(out), nil
}

// guestProcess describes one process; kernel threads (no command line,
// parent kthreadd or none) and processes that ended meanwhile are left out.
func guestProcess(p procfs.Proc, users map[uint64]string) (*agentpb.GuestProcess, bool) {
	stat, err := p.Stat()
	if err != nil || stat.PPID == 2 || (stat.PID == 2 && stat.PPID == 0) {
		return nil, false
	}
	args, err := p.CmdLine()
	if err != nil || len(args) == 0 {
		return nil, false
	}
	gp := &agentpb.GuestProcess{
		Pid:        int32(stat.PID),
		Ppid:       int32(stat.PPID),
		State:      stat.State,
		RssBytes:   uint64(stat.ResidentMemory()),
		CpuSeconds: stat.CPUTime(),
		Command:    strings.Join(args, " "),
	}
	if status, err := p.NewStatus(); err == nil {
		uid := status.UIDs[0]
		name, ok := users[uid]
		if !ok {
			name = strconv.FormatUint(uid, 10)
			if e, found := findEntry("/etc/passwd", "", int(uid)); found {
				name = e[0]
			}
			users[uid] = name
		}
		gp.User = name
	}
	return gp, true
}

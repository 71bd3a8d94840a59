// Package cgroup bounds what one VMM process may take of the host: its
// memory, its number of tasks, its share of CPU time and its disk
// bandwidth, in a control
// group of its own under "smolvm". It uses cgroup v2 where the host has
// it (one unified hierarchy with controllers) and v1 where it has only
// that (a hierarchy per controller, as these test machines do).
//
// A small hand-written package rather than a library: what smolvm needs
// is a directory and a few files per controller, and the libraries that
// manage cgroups (containerd's, runc's) bring systemd and D-Bus clients
// with them.
package cgroup

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Limits are what one group may use; a zero field is no limit.
type Limits struct {
	MemoryBytes int64
	Tasks       int64
	// CPUWeight is the group's share of CPU time against its siblings,
	// 1 to 10000 (cgroup v2's scale; 100 is the default).
	CPUWeight int
	// IO caps the group's reads and writes on block devices.
	IO []DeviceIO
}

// DeviceIO caps I/O on one block device (a whole disk, not a partition:
// the kernel throttles where requests queue); a zero field is no cap.
type DeviceIO struct {
	Major, Minor        uint32
	ReadBPS, WriteBPS   uint64 // bytes a second
	ReadIOPS, WriteIOPS uint64
}

func (d DeviceIO) dev() string { return fmt.Sprintf("%d:%d", d.Major, d.Minor) }

// Root is where the host's cgroups are mounted.
const Root = "/sys/fs/cgroup"

// parent is the group every VMM's group is made in.
const parent = "smolvm"

// controllers are the ones a group is made in, by their v2 names.
var controllers = []string{"memory", "pids", "cpu", "io"}

// v1Names are their hierarchies' names under cgroup v1.
var v1Names = map[string]string{"memory": "memory", "pids": "pids", "cpu": "cpu", "io": "blkio"}

// Hierarchy is one way the host has of grouping processes.
type Hierarchy struct {
	// V2 is the unified hierarchy; otherwise each controller has its own.
	V2 bool
	// Mounts are the directories the groups are made in, by controller
	// (memory, pids, cpu, io): the one root for v2, a hierarchy each for
	// v1 (where io is blkio).
	Mounts map[string]string
}

// Detect finds the host's hierarchy under root, or says why it cannot be
// used.
func Detect(root string) (Hierarchy, error) {
	if b, err := os.ReadFile(filepath.Join(root, "cgroup.controllers")); err == nil {
		have := strings.Fields(string(b))
		h := Hierarchy{V2: true, Mounts: map[string]string{}}
		for _, c := range controllers {
			for _, x := range have {
				if x == c {
					h.Mounts[c] = root
				}
			}
		}
		if len(h.Mounts) == 0 {
			return h, fmt.Errorf("cgroup v2 at %s has none of the memory, pids and cpu controllers", root)
		}
		return h, nil
	}
	h := Hierarchy{Mounts: map[string]string{}}
	for _, c := range controllers {
		dir := filepath.Join(root, v1Names[c])
		if _, err := os.Stat(filepath.Join(dir, "cgroup.procs")); err == nil {
			h.Mounts[c] = dir
		}
	}
	if len(h.Mounts) == 0 {
		return h, fmt.Errorf("no cgroup v2 and no v1 memory, pids or cpu controller under %s", root)
	}
	return h, nil
}

// Group is one process's control group, in every controller the host has.
type Group struct {
	h    Hierarchy
	name string
}

// dirs are the group's directories, one per distinct mount.
func (g Group) dirs() []string {
	seen := map[string]bool{}
	var out []string
	for _, c := range controllers {
		m := g.h.Mounts[c]
		if m == "" || seen[m] {
			continue
		}
		seen[m] = true
		out = append(out, filepath.Join(m, parent, g.name))
	}
	return out
}

// Dir is the group's directory for controller ("memory", "pids", "cpu",
// "io").
func (g Group) Dir(controller string) string {
	m := g.h.Mounts[controller]
	if m == "" {
		return ""
	}
	return filepath.Join(m, parent, g.name)
}

// Open names an existing group, as New made it, to add to or remove.
func Open(h Hierarchy, name string) Group { return Group{h: h, name: name} }

// New makes the group name with limits l.
func New(h Hierarchy, name string, l Limits) (Group, error) {
	g := Group{h: h, name: name}
	if name == "" || strings.ContainsAny(name, "/\x00") || name == "." || name == ".." {
		return g, fmt.Errorf("cgroup name %q", name)
	}
	if h.V2 {
		// Controllers reach a group only when its parents enable them for
		// their children.
		var ctrls []string
		for _, c := range controllers {
			if h.Mounts[c] != "" {
				ctrls = append(ctrls, "+"+c)
			}
		}
		enable := strings.Join(ctrls, " ")
		root := firstNonEmpty(h.Mounts["memory"], h.Mounts["pids"], h.Mounts["cpu"], h.Mounts["io"])
		if err := os.MkdirAll(filepath.Join(root, parent), 0o755); err != nil {
			return g, fmt.Errorf("cgroup: %w", err)
		}
		for _, d := range []string{root, filepath.Join(root, parent)} {
			if err := write(filepath.Join(d, "cgroup.subtree_control"), enable); err != nil {
				return g, err
			}
		}
	}
	for _, d := range g.dirs() {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return g, fmt.Errorf("cgroup: %w", err)
		}
	}
	if err := g.set(l); err != nil {
		return g, errors.Join(err, g.Remove())
	}
	return g, nil
}

func firstNonEmpty(ss ...string) string {
	for _, s := range ss {
		if s != "" {
			return s
		}
	}
	return ""
}

func (g Group) set(l Limits) error {
	type setting struct{ controller, v1, v2, value string }
	var ss []setting
	if l.MemoryBytes > 0 {
		v := strconv.FormatInt(l.MemoryBytes, 10)
		ss = append(ss, setting{"memory", "memory.limit_in_bytes", "memory.max", v})
	}
	if l.Tasks > 0 {
		v := strconv.FormatInt(l.Tasks, 10)
		ss = append(ss, setting{"pids", "pids.max", "pids.max", v})
	}
	if l.CPUWeight > 0 {
		w := min(max(l.CPUWeight, 1), 10000)
		if g.h.V2 {
			ss = append(ss, setting{"cpu", "", "cpu.weight", strconv.Itoa(w)})
		} else {
			// v1 shares: 1024 is the default, as 100 is v2's weight.
			ss = append(ss, setting{"cpu", "cpu.shares", "", strconv.Itoa(max(2, w*1024/100))})
		}
	}
	if dir := g.Dir("io"); dir != "" {
		// Where the host allows: a device the kernel does not throttle
		// (no request queue of its own) leaves the group without a cap
		// rather than the VM without a start.
		if err := g.setIO(dir, l.IO); err != nil {
			slog.Warn("disk I/O left uncapped", "group", g.name, "err", err)
		}
	}
	for _, s := range ss {
		dir := g.Dir(s.controller)
		if dir == "" {
			continue // the host lacks the controller
		}
		file := s.v1
		if g.h.V2 {
			file = s.v2
		}
		if err := write(filepath.Join(dir, file), s.value); err != nil {
			return err
		}
	}
	return nil
}

// setIO writes the I/O caps: one io.max line per device under v2, and
// under v1 the read caps alone, in the blkio.throttle files. v2 throttles
// a group's writeback and, with it, how fast the group may dirty pages;
// v1 throttles only I/O the group's own tasks issue, and holding back
// their flushes while they go on dirtying the page cache runs the group
// out of memory.
func (g Group) setIO(dir string, ios []DeviceIO) error {
	var errs []error
	for _, d := range ios {
		if g.h.V2 {
			var kv []string
			for _, f := range []struct {
				key string
				v   uint64
			}{{"rbps", d.ReadBPS}, {"wbps", d.WriteBPS}, {"riops", d.ReadIOPS}, {"wiops", d.WriteIOPS}} {
				if f.v > 0 {
					kv = append(kv, f.key+"="+strconv.FormatUint(f.v, 10))
				}
			}
			if len(kv) > 0 {
				errs = append(errs, write(filepath.Join(dir, "io.max"), d.dev()+" "+strings.Join(kv, " ")))
			}
			continue
		}
		// Reads only: v1 does not bound a group's dirty page cache, so a
		// group whose flushes are held back keeps dirtying pages until
		// its memory limit kills it (seen: a VMM taking in 1 GiB).
		for _, f := range []struct {
			file string
			v    uint64
		}{{"read_bps_device", d.ReadBPS}, {"read_iops_device", d.ReadIOPS}} {
			if f.v > 0 {
				errs = append(errs, write(filepath.Join(dir, "blkio.throttle."+f.file), d.dev()+" "+strconv.FormatUint(f.v, 10)))
			}
		}
	}
	return errors.Join(errs...)
}

// DiskOf finds the whole disk that holds path's filesystem, the device an
// I/O cap for files under path names. ok is false for a filesystem with
// no block device of its own (tmpfs, overlay, NFS).
func DiskOf(path string) (major, minor uint32, ok bool) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return 0, 0, false
	}
	major, minor = unix.Major(st.Dev), unix.Minor(st.Dev)
	if major == 0 {
		return 0, 0, false
	}
	sys := fmt.Sprintf("/sys/dev/block/%d:%d", major, minor)
	if _, err := os.Stat(sys); err != nil {
		return 0, 0, false
	}
	// A partition's parent directory in sysfs is its disk.
	if _, err := os.Stat(filepath.Join(sys, "partition")); err == nil {
		real, err := filepath.EvalSymlinks(sys)
		if err != nil {
			return 0, 0, false
		}
		b, err := os.ReadFile(filepath.Join(filepath.Dir(real), "dev"))
		if err != nil {
			return 0, 0, false
		}
		if _, err := fmt.Sscanf(strings.TrimSpace(string(b)), "%d:%d", &major, &minor); err != nil {
			return 0, 0, false
		}
	}
	return major, minor, true
}

// Add moves pid, with the threads it starts from then on, into the group.
func (g Group) Add(pid int) error {
	for _, d := range g.dirs() {
		if err := write(filepath.Join(d, "cgroup.procs"), strconv.Itoa(pid)); err != nil {
			return err
		}
	}
	return nil
}

// Remove deletes the group, which must have no processes left; one that
// is already gone is no error.
func (g Group) Remove() error {
	var errs []error
	for _, d := range g.dirs() {
		if err := os.Remove(d); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("cgroup: %w", err))
		}
	}
	return errors.Join(errs...)
}

// OOMKills is how many times the kernel killed a process of the group for
// going over its memory limit (v2: memory.events; v1: memory.oom_control).
func (g Group) OOMKills() (int64, error) {
	dir := g.Dir("memory")
	if dir == "" {
		return 0, errors.New("cgroup: no memory controller")
	}
	file := "memory.oom_control"
	if g.h.V2 {
		file = "memory.events"
	}
	b, err := os.ReadFile(filepath.Join(dir, file))
	if err != nil {
		return 0, fmt.Errorf("cgroup: %w", err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "oom_kill "); ok {
			return strconv.ParseInt(strings.TrimSpace(v), 10, 64)
		}
	}
	return 0, fmt.Errorf("cgroup: %s has no oom_kill count", file)
}

// Sweep removes the groups under smolvm whose names start with prefix
// ("" for all) that have no processes and were made longer than grace
// ago: those of VMMs that ended on their own. A younger empty group may
// be one whose process is about to be added.
func Sweep(h Hierarchy, grace time.Duration, prefix string) error {
	var errs []error
	seen := map[string]bool{}
	for _, m := range h.Mounts {
		if seen[m] {
			continue
		}
		seen[m] = true
		dir := filepath.Join(m, parent)
		ents, err := os.ReadDir(dir)
		if err != nil {
			continue
		}
		for _, e := range ents {
			if !e.IsDir() || !strings.HasPrefix(e.Name(), prefix) {
				continue
			}
			p := filepath.Join(dir, e.Name())
			st, err := os.Stat(p)
			if err != nil || time.Since(st.ModTime()) < grace {
				continue
			}
			b, err := os.ReadFile(filepath.Join(p, "cgroup.procs"))
			if err != nil || len(strings.TrimSpace(string(b))) > 0 {
				continue
			}
			if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}

func write(path, value string) error {
	if err := os.WriteFile(path, []byte(value), 0o644); err != nil {
		return fmt.Errorf("cgroup: write %s to %s: %w", value, path, err)
	}
	return nil
}

// Of names the group under smolvm that process pid is in, as New was
// given it, or "" if it is in none (or has ended).
func Of(pid int) string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", pid))
	if err != nil {
		return ""
	}
	// Lines are "id:controllers:path", one per hierarchy.
	for _, line := range strings.Split(string(b), "\n") {
		parts := strings.SplitN(line, ":", 3)
		if len(parts) != 3 {
			continue
		}
		dir, name := filepath.Split(parts[2])
		if filepath.Base(filepath.Clean(dir)) == parent && name != "" {
			return name
		}
	}
	return ""
}

// Package cgroup bounds what one VMM process may take of the host: its
// memory, its number of tasks and its share of CPU time, in a control
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
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// Limits are what one group may use; a zero field is no limit.
type Limits struct {
	MemoryBytes int64
	Tasks       int64
	// CPUWeight is the group's share of CPU time against its siblings,
	// 1 to 10000 (cgroup v2's scale; 100 is the default).
	CPUWeight int
}

// Root is where the host's cgroups are mounted.
const Root = "/sys/fs/cgroup"

// parent is the group every VMM's group is made in.
const parent = "smolvm"

// Hierarchy is one way the host has of grouping processes.
type Hierarchy struct {
	// V2 is the unified hierarchy; otherwise each controller has its own.
	V2 bool
	// Mounts are the directories the groups are made in: one for v2, one
	// per controller for v1 (memory, pids, cpu).
	Mounts map[string]string
}

// Detect finds the host's hierarchy under root, or says why it cannot be
// used.
func Detect(root string) (Hierarchy, error) {
	if b, err := os.ReadFile(filepath.Join(root, "cgroup.controllers")); err == nil {
		have := strings.Fields(string(b))
		h := Hierarchy{V2: true, Mounts: map[string]string{}}
		for _, c := range []string{"memory", "pids", "cpu"} {
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
	for _, c := range []string{"memory", "pids", "cpu"} {
		dir := filepath.Join(root, c)
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
	for _, m := range []string{g.h.Mounts["memory"], g.h.Mounts["pids"], g.h.Mounts["cpu"]} {
		if m == "" || seen[m] {
			continue
		}
		seen[m] = true
		out = append(out, filepath.Join(m, parent, g.name))
	}
	return out
}

// Dir is the group's directory for controller ("memory", "pids", "cpu").
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
		for c := range h.Mounts {
			ctrls = append(ctrls, "+"+c)
		}
		enable := strings.Join(ctrls, " ")
		root := firstNonEmpty(h.Mounts["memory"], h.Mounts["pids"], h.Mounts["cpu"])
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

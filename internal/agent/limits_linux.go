package agent

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// The agent starts every command in one control group (cgroup v2) whose
// limits leave the agent, outside it, room to work: a fork bomb stops at
// the group's task limit while the agent can still start threads, and a
// command that allocates without end is killed by the group's OOM killer
// before the agent's own allocations fail. PID 1 cannot be OOM-killed,
// but a Go runtime that cannot get memory or a thread aborts, and the
// guest with it. The cpu controller makes the whole group weigh as much
// as one of the agent's threads, so a command that keeps every CPU busy
// (a fork bomb, at the latest) cannot keep the agent from answering.
const (
	cgroupRoot   = "/sys/fs/cgroup"
	commandGroup = "commands"
	// reservedTasks are the kernel's threads and the agent's.
	reservedTasks = 256
	// The memory kept from commands: an eighth of the guest's, within
	// these bounds. A fork bomb's hundreds of processes also use kernel
	// memory no group is charged for: with 32 MiB kept, a 256 MiB guest
	// ran out of memory as a whole before the group reached its limit
	// (the kernel's OOM killer woke 15 times, the group's never), and an
	// agent that then fails to get memory takes the guest down. With 64
	// MiB the group stops at its limit first.
	minReservedMemory = 64 << 20
	maxReservedMemory = 256 << 20
)

// setupCommandGroup makes the command group under root (a cgroup v2
// mount) with limits from the guest's size, and returns its directory.
func setupCommandGroup(root string) (string, error) {
	if err := os.WriteFile(filepath.Join(root, "cgroup.subtree_control"), []byte("+pids +memory"), 0); err != nil {
		return "", fmt.Errorf("enable the pids and memory controllers: %w", err)
	}
	// Without group scheduling in the kernel the group still limits.
	_ = os.WriteFile(filepath.Join(root, "cgroup.subtree_control"), []byte("+cpu"), 0)
	dir := filepath.Join(root, commandGroup)
	if err := os.Mkdir(dir, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
		return "", fmt.Errorf("make the command group: %w", err)
	}
	threads, err := readInt("/proc/sys/kernel/threads-max")
	if err != nil {
		return "", err
	}
	total, err := memTotal()
	if err != nil {
		return "", err
	}
	reserve := min(max(total/8, minReservedMemory), maxReservedMemory)
	limits := map[string]int64{
		"pids.max":   max(threads-reservedTasks, 64),
		"memory.max": max(total-reserve, 32<<20),
	}
	for file, v := range limits {
		if err := os.WriteFile(filepath.Join(dir, file), []byte(strconv.FormatInt(v, 10)), 0); err != nil {
			return "", fmt.Errorf("limit the command group (%s): %w", file, err)
		}
	}
	return dir, nil
}

// openGroup opens a cgroup directory for starting processes in it
// (CLONE_INTO_CGROUP), or returns -1 when dir is "".
func openGroup(dir string) (int, error) {
	if dir == "" {
		return -1, nil
	}
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("open control group %s: %w", dir, err)
	}
	return fd, nil
}

func readInt(path string) (int64, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	v, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("%s: %w", path, err)
	}
	return v, nil
}

// memTotal is the guest's usable memory in bytes.
func memTotal() (int64, error) {
	f, err := os.Open("/proc/meminfo")
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "MemTotal:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			if err != nil {
				return 0, fmt.Errorf("MemTotal: %w", err)
			}
			return kb << 10, nil
		}
	}
	return 0, errors.New("no MemTotal in /proc/meminfo")
}

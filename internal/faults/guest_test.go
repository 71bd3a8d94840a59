//go:build faults

package faults

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// run runs a command and returns its result, whatever it is.
func (s *server) run(id, command string, timeout int) (execResult, int, problem) {
	s.t.Helper()
	var res execResult
	code, err := s.try(context.Background(), "POST", "/sandboxes/"+id+"/exec", map[string]any{"command": command, "timeout": timeout}, &res)
	var p problem
	if se := (*statusError)(nil); errors.As(err, &se) {
		p.raw = se.body
	} else if err != nil {
		s.t.Fatalf("exec %q: %v", command, err)
	}
	return res, code, p
}

// Code in a guest does its worst; the host, the server and the other
// sandboxes carry on, and the guest itself recovers once the command
// has ended.
func TestGuestAbuse(t *testing.T) {
	t.Parallel()
	h := newHost(t, "")
	h.start()
	bystander := h.srv.create()
	victim := h.srv.create()

	// abuse runs command in the victim while the bystander runs commands
	// without a failure, and returns the victim's result.
	abuse := func(t *testing.T, command string, timeout int) (execResult, int) {
		t.Helper()
		stop := runCommands(h.srv, bystander.ID)
		res, code, p := h.srv.run(victim.ID, command, timeout)
		if code != http.StatusOK {
			t.Logf("%s: %d %s", command, code, p.raw)
		}
		if n, errs := stop(); errs > 0 || n == 0 {
			t.Errorf("the bystander failed %d of %d commands meanwhile", errs, n)
		}
		h.srv.answers(victim.ID, bystander.ID)
		return res, code
	}

	t.Run("fork bomb", func(t *testing.T) {
		defer h.in(t)()
		res, code := abuse(t, "bomb() { bomb | bomb & }; bomb; sleep 60", 15)
		if code != http.StatusRequestTimeout {
			t.Errorf("fork bomb: %d %+v, want 408: killed at its timeout", code, res)
		}
		// Everything it forked goes with it: what is left is the shell
		// counting and perhaps the agent's spare login shell. Thousands
		// of processes take a loaded guest a while to end and be reaped.
		var out string
		for deadline := time.Now().Add(time.Minute); ; time.Sleep(time.Second) {
			out = strings.TrimSpace(h.srv.exec(victim.ID, "cat /proc/[0-9]*/comm | grep -c '^bash$' || true"))
			if n, err := strconv.Atoi(out); (err == nil && n <= 2) || time.Now().After(deadline) {
				break
			}
		}
		if n, err := strconv.Atoi(out); err != nil || n > 2 {
			t.Errorf("%s bash processes a minute after the fork bomb", out)
		}
		// It stopped at its group's limits: the guest as a whole never ran
		// out of memory (the group's own OOM kills say "Memory cgroup").
		if n := strings.TrimSpace(h.srv.exec(victim.ID, "dmesg | grep -c '] Out of memory: Killed' || true")); n != "0" {
			t.Errorf("the guest ran out of memory as a whole %s times during the fork bomb", n)
		}
	})

	t.Run("memory exhaustion", func(t *testing.T) {
		defer h.in(t)()
		// tail keeps all of an endless line in memory.
		res, code := abuse(t, "tail /dev/zero", 120)
		if code != http.StatusOK || res.TimedOut || res.ExitCode == 0 {
			t.Errorf("memory exhaustion: %d %+v, want the command killed", code, res)
		}
		if out := h.srv.exec(victim.ID, "dmesg | grep -ci 'out of memory' || true"); strings.TrimSpace(out) == "0" {
			t.Errorf("the guest's OOM killer did not act: %q", out)
		}
		if !alive(victim.PID) {
			t.Errorf("the victim's VMM is gone")
		}
	})

	t.Run("full disk", func(t *testing.T) {
		defer h.in(t)()
		res, code := abuse(t, "dd if=/dev/zero of=/fill bs=1M 2>&1; sync; df -k / | tail -1", 300)
		if code != http.StatusOK || !strings.Contains(res.Stdout, "No space left on device") {
			t.Errorf("filling the disk: %d %+v", code, res)
		}
		// The disk file on the host is bounded by the disk size.
		var st syscall.Stat_t
		if err := syscall.Stat(filepath.Join(h.d.Sandbox(victim.ID), "disk.qcow2"), &st); err != nil {
			t.Fatal(err)
		}
		if used := st.Blocks * 512; used > 1200<<20 {
			t.Errorf("the victim's disk holds %d MiB on the host, more than its 1024 MiB", used>>20)
		}
		// Writing into a full disk through the API is a 507.
		req, _ := http.NewRequest("PUT", h.srv.url+"/sandboxes/"+victim.ID+"/files?path=/root/more", strings.NewReader(strings.Repeat("x", 1<<20)))
		req.Header.Set("Content-Type", "application/octet-stream")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusInsufficientStorage || !strings.Contains(string(body), `"disk_full"`) {
			t.Errorf("writing a file into a full disk: %d %s", resp.StatusCode, body)
		}
		h.srv.exec(victim.ID, "rm /fill && echo again > /root/again && cat /root/again")
	})

	t.Run("stdout closed, command runs on", func(t *testing.T) {
		defer h.in(t)()
		start := time.Now()
		res, code := abuse(t, "exec >&- 2>&-; sleep 3; touch /tmp/slept", 60)
		if code != http.StatusOK || res.TimedOut || res.ExitCode != 0 || time.Since(start) < 3*time.Second {
			t.Errorf("a command that closed its output: %d %+v after %s, want its exit after 3 s", code, res, time.Since(start))
		}
		h.srv.exec(victim.ID, "test -e /tmp/slept")
		// The reverse: the command ends and leaves a child holding its
		// output; the exec answers when the command ends.
		res, code = abuse(t, "sleep 600 & echo started", 20)
		if code != http.StatusOK || res.TimedOut || res.Stdout != "started\n" {
			t.Errorf("a command that left a child holding its output: %d %+v", code, res)
		}
		h.srv.exec(victim.ID, "pkill sleep || true")
	})

	t.Run("100 MB on stderr", func(t *testing.T) {
		defer h.in(t)()
		const command = "head -c 100000000 /dev/zero | tr '\\0' x >&2; echo done"
		base := rssMiB(h.srv.cmd.Process.Pid)
		for range 2 {
			res, code := abuse(t, command, 300)
			if code != http.StatusOK || res.TimedOut || len(res.Stderr) != 100000000 || res.Stdout != "done\n" {
				t.Errorf("100 MB on stderr: %d, exit %d, timed out %v, %d bytes of stderr, stdout %q", code, res.ExitCode, res.TimedOut, len(res.Stderr), res.Stdout)
			}
			// The memory that built the answer goes back once it is sent.
			rss := rssMiB(h.srv.cmd.Process.Pid)
			for deadline := time.Now().Add(10 * time.Second); rss > base+64 && time.Now().Before(deadline); {
				time.Sleep(100 * time.Millisecond)
				rss = rssMiB(h.srv.cmd.Process.Pid)
			}
			t.Logf("server RSS before: %d MiB, after a 100 MB answer: %d MiB", base, rss)
			if rss > base+64 {
				t.Errorf("the server holds %d MiB after a 100 MB answer, %d before", rss, base)
			}
		}
	})

	h.consistent()
	h.clean()
}

// rssMiB is a process's resident memory.
func rssMiB(pid int) int {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			var kb int
			fmt.Sscan(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), &kb)
			return kb >> 10
		}
	}
	return 0
}

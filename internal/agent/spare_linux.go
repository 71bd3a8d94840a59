package agent

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/smolvm/smolvm/internal/agent/agentpb"
)

// A login-shell command spends most of its time before its script runs:
// in an emulated guest, bash -l starting and reading the profile (which
// runs id, tty and mesg on Debian) costs three times the command `true`.
// So after a login-shell command ends the agent starts the next one's
// shell ahead: bash -l with exactly that command's user, working directory
// and environment, which reads the profile and then waits on fd 3 for a
// script to eval. The next login-shell command with the same user,
// directory and environment is handed to it.
//
// The spare shell is used only while what its profile saw is still true:
// no process started and no file changed through the agent since it was
// started, and the profile files and home directory unchanged (the stamps
// below), so a command cannot tell it from a shell started for it, bar
// the word "eval" in place of "-c" in a syntax error's message and $?
// at the script's start (0, not the profile's last status).

// spareBootstrap is what the spare shell runs after its profile: read the
// script from fd 3 until EOF, close fd 3, restart $SECONDS, and eval the
// script with the variable that held it already gone. One line, so
// $LINENO in the script counts as it does under -c.
const spareBootstrap = `IFS= read -r -d '' -u 3 __smolvm_script; exec 3<&-; SECONDS=0; eval "unset -v __smolvm_script; $__smolvm_script"`

// spareShell is a login shell started ahead, waiting for its script.
type spareShell struct {
	key        string
	dir        string
	stamps     string
	gen        uint64
	pid        int
	waitc      <-chan unix.WaitStatus
	outR, errR *os.File
	script     *os.File // the write end of the shell's fd 3
}

// spareRecipe is how to start a spare shell: the command the last login
// shell ran, less its script.
type spareRecipe struct {
	epoch uint64
	key   string
	path  string
	env   []string
	dir   string
	cred  *syscall.Credential
	shell string
}

// spares holds at most one spare shell.
type spares struct {
	// mu is held while a spare shell starts, so a command that arrives
	// meanwhile waits for it instead of starting a second shell.
	mu    sync.Mutex
	shell *spareShell
	// epoch counts drops; a recipe from an older epoch is not refilled.
	epoch uint64
	// gen counts processes started and files changed through the agent;
	// a spare shell started at another count may have read a profile
	// that a command has since changed.
	gen atomic.Uint64
	// used counts commands handed to a spare shell (for tests).
	used atomic.Int64
	// last is the recipe of the last login-shell command, refilled after
	// any command ends.
	last *spareRecipe
}

// currentEpoch is the epoch a recipe made now belongs to.
func (sp *spares) currentEpoch() uint64 {
	sp.mu.Lock()
	defer sp.mu.Unlock()
	return sp.epoch
}

// changed records that a process started or a file changed.
func (sp *spares) changed() { sp.gen.Add(1) }

// take returns the spare shell for key if there is one still valid; the
// caller owns it.
func (sp *spares) take(key string, home string) *spareShell {
	sp.mu.Lock()
	sh := sp.shell
	if sh == nil || sh.key != key {
		sp.mu.Unlock()
		return nil
	}
	sp.shell = nil
	sp.mu.Unlock()
	valid := sh.gen == sp.gen.Load() && sh.stamps == profileStamps(home, sh.dir)
	select {
	case <-sh.waitc:
		// It ended (a profile that exits): the command starts anew.
		sh.closeFiles()
		return nil
	default:
	}
	if !valid {
		sh.discard()
		return nil
	}
	sp.used.Add(1)
	return sh
}

// hand gives the shell its script. It fails if the shell died meanwhile.
func (sh *spareShell) hand(script string) error {
	if len(script) < pipeAtomic {
		_, err := sh.script.WriteString(script)
		sh.script.Close()
		return err
	}
	// A long script fills the pipe before the shell reads it.
	go func() {
		sh.script.WriteString(script)
		sh.script.Close()
	}()
	return nil
}

// pipeAtomic is a size every Linux pipe buffers whole, so writing less
// never blocks on a reader (PIPE_BUF is 4096; a pipe holds 64 KiB).
const pipeAtomic = 4096

func (sh *spareShell) closeFiles() {
	sh.outR.Close()
	sh.errR.Close()
	sh.script.Close()
}

// discard ends a spare shell nobody will use. The reaper collects it.
func (sh *spareShell) discard() {
	unix.Kill(-sh.pid, unix.SIGKILL)
	sh.closeFiles()
}

// drop discards the spare shell, if any, and the recipe for the next.
func (sp *spares) drop() {
	sp.mu.Lock()
	sh := sp.shell
	sp.shell, sp.last = nil, nil
	sp.epoch++
	sp.mu.Unlock()
	if sh != nil {
		sh.discard()
	}
}

// refillSpare is called when a command ends; r is its recipe, nil if it
// was not a login-shell script. It starts a spare shell for the last
// login-shell command unless one is ready for it, or other commands are
// running (what they change, its profile would not see).
func (s *Server) refillSpare(r *spareRecipe) {
	sp := &s.spares
	sp.mu.Lock()
	defer sp.mu.Unlock()
	if r != nil && r.epoch == sp.epoch {
		sp.last = r
	}
	r = sp.last
	if r == nil || (sp.shell != nil && sp.shell.key == r.key) || s.procs.running() > 0 {
		return
	}
	gen := sp.gen.Load()
	sh, err := s.startSpare(r)
	if err != nil {
		s.opts.Logf("start a spare login shell: %v", err)
		return
	}
	sh.gen = gen
	if sp.shell != nil {
		sp.shell.discard()
	}
	sp.shell = sh
}

// startSpare starts a login shell as r describes, stdin /dev/null, its
// script to come on fd 3.
func (s *Server) startSpare(r *spareRecipe) (*spareShell, error) {
	home := envValue(r.env, "HOME")
	sh := &spareShell{key: r.key, dir: r.dir, stamps: profileStamps(home, r.dir)}
	null, err := os.Open(os.DevNull)
	if err != nil {
		return nil, err
	}
	var outW, errW, scriptR *os.File
	var perr error
	if sh.outR, outW, perr = os.Pipe(); perr == nil {
		if sh.errR, errW, perr = os.Pipe(); perr == nil {
			scriptR, sh.script, perr = os.Pipe()
		}
	}
	child := []*os.File{null, outW, errW, scriptR}
	defer func() {
		for _, f := range child {
			if f != nil {
				f.Close()
			}
		}
	}()
	if perr != nil {
		for _, f := range []*os.File{sh.outR, sh.errR, sh.script} {
			if f != nil {
				f.Close()
			}
		}
		return nil, fmt.Errorf("pipe: %w", perr)
	}
	attr := &syscall.ProcAttr{
		Dir:   r.dir,
		Env:   r.env,
		Files: []uintptr{null.Fd(), outW.Fd(), errW.Fd(), scriptR.Fd()},
		Sys:   &syscall.SysProcAttr{Setsid: true, Credential: r.cred},
	}
	pid, waitc, err := s.reaper.start(r.path, []string{r.shell, "-lc", spareBootstrap}, attr)
	if err != nil {
		sh.closeFiles()
		return nil, err
	}
	sh.pid, sh.waitc = pid, waitc
	return sh, nil
}

// spareRecipeFor returns how to start a spare shell for a command, or nil
// when the command is not one a spare shell can run: a script for the
// login shell, when that is bash, with no terminal and no stdin.
func spareRecipeFor(epoch uint64, m *agentpb.StartRequest, argv []string, path string, env []string, dir string, cred *syscall.Credential) *spareRecipe {
	cfg := m.GetProcess()
	if m.Pty != nil || m.Stdin || len(m.StdinData) > 0 || cfg.GetScript() == "" ||
		len(argv) != 3 || argv[1] != "-lc" || filepath.Base(argv[0]) != "bash" {
		return nil
	}
	var uid, gid uint32
	if cred != nil {
		uid, gid = cred.Uid, cred.Gid
	}
	key := strings.Join(append([]string{strconv.Itoa(int(uid)) + ":" + strconv.Itoa(int(gid)), dir, path}, env...), "\x00")
	return &spareRecipe{epoch: epoch, key: key, path: path, env: slices.Clone(env), dir: dir, cred: cred, shell: argv[0]}
}

// profileStamps identifies the state of what a login shell's profile
// reads, and of the directories whose contents Debian's and others'
// profiles test (~/bin, ~/.local/bin).
func profileStamps(home, dir string) string {
	paths := []string{"/etc/profile", "/etc/profile.d", "/etc/bash.bashrc", "/etc/bashrc",
		"/etc/passwd", "/etc/group", "/etc/environment", dir}
	if ents, err := os.ReadDir("/etc/profile.d"); err == nil {
		for _, e := range ents {
			paths = append(paths, filepath.Join("/etc/profile.d", e.Name()))
		}
	}
	if home != "" {
		for _, f := range []string{"", ".bash_profile", ".bash_login", ".profile", ".bashrc", ".local", "bin", ".local/bin"} {
			paths = append(paths, filepath.Join(home, f))
		}
	}
	var b strings.Builder
	for _, p := range paths {
		var st unix.Stat_t
		if err := unix.Stat(p, &st); err != nil {
			b.WriteString("-\n")
			continue
		}
		fmt.Fprintf(&b, "%d %d %d.%d %d.%d %o\n", st.Ino, st.Size, st.Mtim.Sec, st.Mtim.Nsec, st.Ctim.Sec, st.Ctim.Nsec, st.Mode)
	}
	return b.String()
}

// envValue is the value of key in env, "" if unset.
func envValue(env []string, key string) string {
	for _, kv := range slices.Backward(env) {
		if k, v, ok := strings.Cut(kv, "="); ok && k == key {
			return v
		}
	}
	return ""
}

package sandbox

import (
	"bytes"
	"errors"
	"path"
	"regexp"
	"sort"
	"strings"

	"github.com/smolvm/smolvm/internal/agent/agentpb"
)

// envName is what a shell accepts as a variable name.
var envName = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)

// maxArgBytes bounds a command line, its argv and its environment, as
// Linux's ARG_MAX does.
const maxArgBytes = 128 << 10

// ValidateExec checks req as Exec would before running it.
func ValidateExec(req ExecRequest) error {
	_, err := execRequest(req)
	return err
}

// execRequest validates req and turns it into the agent's request.
func execRequest(req ExecRequest) (*agentpb.StartRequest, error) {
	if req.Timeout == 0 {
		req.Timeout = DefaultTimeout
	}
	if req.Shell == "" {
		req.Shell = ShellLogin
	}
	if secs := req.Timeout.Seconds(); secs < MinTimeoutSec || secs > MaxTimeoutSec {
		return nil, invalid("invalid_timeout", "timeout", "timeout must be between %d and %d seconds, got %g", MinTimeoutSec, MaxTimeoutSec, secs)
	}
	w := &agentpb.StartRequest{Process: &agentpb.ProcessConfig{}, TimeoutMs: req.Timeout.Milliseconds()}
	size := 0
	switch {
	case req.Command != "" && len(req.Argv) > 0:
		return nil, invalid("invalid_command", "argv", "command and argv are exclusive: give a command line or an argv array, not both")
	case len(req.Argv) > 0:
		if req.Argv[0] == "" {
			return nil, invalid("invalid_command", "argv", "argv[0], the program to run, must not be empty")
		}
		for i, a := range req.Argv {
			if strings.IndexByte(a, 0) >= 0 {
				return nil, invalid("invalid_command", "argv", "argv[%d] contains a NUL byte", i)
			}
			size += len(a) + 1
		}
		w.Process.Argv = req.Argv
	default:
		if strings.TrimSpace(req.Command) == "" {
			return nil, invalid("invalid_command", "command", "command must not be empty")
		}
		if strings.IndexByte(req.Command, 0) >= 0 {
			return nil, invalid("invalid_command", "command", "command contains a NUL byte")
		}
		size += len(req.Command)
		w.Process.Script = req.Command
		switch req.Shell {
		case ShellLogin:
			w.Process.Shell = agentpb.Shell_SHELL_LOGIN
		case ShellRaw:
			w.Process.Shell = agentpb.Shell_SHELL_RAW
		default:
			return nil, invalid("invalid_shell", "shell", "shell must be %q or %q, got %q", ShellLogin, ShellRaw, req.Shell)
		}
	}
	if req.Cwd != "" {
		if !path.IsAbs(req.Cwd) || strings.IndexByte(req.Cwd, 0) >= 0 {
			return nil, invalid("invalid_cwd", "cwd", "cwd must be an absolute path in the sandbox, got %q", req.Cwd)
		}
		w.Process.Cwd = path.Clean(req.Cwd)
	}
	keys := make([]string, 0, len(req.Env))
	for k, v := range req.Env {
		if !envName.MatchString(k) {
			return nil, invalid("invalid_env", "env", "environment variable name %q is not a letter or underscore followed by letters, digits and underscores", k)
		}
		if strings.IndexByte(v, 0) >= 0 {
			return nil, invalid("invalid_env", "env", "the value of %s contains a NUL byte", k)
		}
		size += len(k) + len(v) + 2
		keys = append(keys, k)
	}
	if size > maxArgBytes {
		return nil, invalid("invalid_command", "command", "the command and its environment are %d bytes, over the %d a process can take", size, maxArgBytes)
	}
	sort.Strings(keys)
	for _, k := range keys {
		w.Process.Env = append(w.Process.Env, k+"="+req.Env[k])
	}
	w.StdinData = req.Stdin
	return w, nil
}

// limitedBuffer collects a command's output for callers that want it whole.
type limitedBuffer struct{ bytes.Buffer }

// maxCollected bounds what Exec holds in memory; Stream has no limit.
const maxCollected = 256 << 20

// errOutputTooLarge stops a command whose output would not fit.
var errOutputTooLarge = errors.New("command output exceeds the limit")

func (b *limitedBuffer) Write(p []byte) (int, error) {
	if b.Len()+len(p) > maxCollected {
		return 0, errOutputTooLarge
	}
	return b.Buffer.Write(p)
}

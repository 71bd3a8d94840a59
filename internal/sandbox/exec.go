package sandbox

import (
	"bytes"
	"errors"
	"strings"

	"github.com/google/shlex"

	"github.com/smolvm/smolvm/internal/agent/wire"
)

// execRequest validates req and turns it into the agent's request.
func execRequest(req ExecRequest) (wire.Request, error) {
	if req.Timeout == 0 {
		req.Timeout = DefaultTimeout
	}
	if req.Shell == "" {
		req.Shell = ShellLogin
	}
	if secs := req.Timeout.Seconds(); secs < MinTimeoutSec || secs > MaxTimeoutSec {
		return wire.Request{}, invalid("invalid_timeout", "timeout", "timeout must be between %d and %d seconds, got %g", MinTimeoutSec, MaxTimeoutSec, secs)
	}
	if strings.TrimSpace(req.Command) == "" {
		return wire.Request{}, invalid("invalid_command", "command", "command must not be empty")
	}
	w := wire.Request{Op: wire.OpExec, TimeoutMS: req.Timeout.Milliseconds()}
	switch req.Shell {
	case ShellLogin:
		w.Login = req.Command
	case ShellRaw:
		argv, err := shlex.Split(req.Command)
		if err != nil {
			return wire.Request{}, invalid("invalid_command", "command", "cannot split command into arguments: %v", err)
		}
		if len(argv) == 0 {
			return wire.Request{}, invalid("invalid_command", "command", "command must not be empty")
		}
		w.Argv = argv
	default:
		return wire.Request{}, invalid("invalid_shell", "shell", "shell must be %q or %q, got %q", ShellLogin, ShellRaw, req.Shell)
	}
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

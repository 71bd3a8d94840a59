package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"

	"github.com/coder/websocket"
	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/smolvm/smolvm/internal/api"
	"github.com/smolvm/smolvm/internal/sandbox"
)

func newSandboxShellCmd(sf *sandboxFlags) *cobra.Command {
	return &cobra.Command{
		Use:   "shell ID [-- COMMAND]",
		Short: "Open an interactive shell (or run COMMAND) on a terminal in a sandbox",
		Long: `Open the sandbox user's login shell on a real terminal in the guest, with
this terminal in raw mode and its size (and every change of it) passed on.
The exit status is the shell's. With COMMAND, run that through the login
shell on the terminal instead.`,
		Example: `  smolvm sandbox shell vm-a1b2c3d4
  smolvm sandbox shell vm-a1b2c3d4 -- top`,
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			command := ""
			if len(args) > 1 {
				command = joinCommand(args[1:])
			}
			return runTerminal(cmd, sf, args[0], command)
		},
	}
}

// runTerminal connects this program's terminal to a PTY in the sandbox
// and returns the remote exit status.
func runTerminal(cmd *cobra.Command, sf *sandboxFlags, id, command string) error {
	in, out := os.Stdin, os.Stdout
	cols, rows := 80, 24
	if w, h, err := term.GetSize(int(out.Fd())); err == nil {
		cols, rows = w, h
	}
	if term.IsTerminal(int(in.Fd())) {
		old, err := term.MakeRaw(int(in.Fd()))
		if err != nil {
			return fmt.Errorf("put the terminal in raw mode: %w", err)
		}
		defer term.Restore(int(in.Fd()), old)
	}
	resize := make(chan sandbox.TerminalSize, 1)
	winch := make(chan os.Signal, 1)
	signal.Notify(winch, syscall.SIGWINCH)
	defer signal.Stop(winch)
	go func() {
		for range winch {
			if w, h, err := term.GetSize(int(out.Fd())); err == nil {
				select {
				case resize <- sandbox.TerminalSize{Cols: w, Rows: h}:
				default:
				}
			}
		}
	}()
	var code int
	err := withSandboxClient(cmd, sf, func(ctx context.Context, c sandboxClient) error {
		var err error
		code, err = c.Terminal(ctx, id, command, sandbox.TerminalSize{Cols: cols, Rows: rows}, in, out, resize)
		return err
	})
	if err != nil {
		return err
	}
	if code != 0 {
		return exitCode(code)
	}
	return nil
}

// pumpInput sends what is read from in until either fails. A blocked
// read of a terminal cannot be cancelled; the program exits after the
// session anyway.
func pumpInput(in io.Reader, send func([]byte) error) {
	buf := make([]byte, 32<<10)
	for {
		n, err := in.Read(buf)
		if n > 0 && send(buf[:n]) != nil {
			return
		}
		if err != nil {
			return
		}
	}
}

// Terminal runs a terminal session through the server's WebSocket.
func (c *httpSandboxClient) Terminal(ctx context.Context, id, command string, size sandbox.TerminalSize, in io.Reader, out io.Writer, resize <-chan sandbox.TerminalSize) (int, error) {
	u := c.base.JoinPath("/sandboxes/" + url.PathEscape(id) + "/pty")
	q := url.Values{"cols": {strconv.Itoa(size.Cols)}, "rows": {strconv.Itoa(size.Rows)}}
	if command != "" {
		q.Set("command", command)
	}
	u.RawQuery = q.Encode()
	h := http.Header{}
	if c.token != "" {
		h.Set("Authorization", "Bearer "+c.token)
	}
	conn, resp, err := websocket.Dial(ctx, u.String(), &websocket.DialOptions{HTTPHeader: h})
	if err != nil {
		if resp != nil && resp.StatusCode >= 300 {
			var p api.Problem
			if json.NewDecoder(resp.Body).Decode(&p) == nil && p.Code != "" {
				return 0, &problemError{p: p}
			}
		}
		return 0, fmt.Errorf("open a terminal on %s: %w", id, err)
	}
	defer conn.CloseNow()
	conn.SetReadLimit(1 << 20)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go pumpInput(in, func(b []byte) error { return conn.Write(ctx, websocket.MessageBinary, b) })
	go func() {
		for {
			select {
			case <-ctx.Done():
				return
			case s := <-resize:
				b, _ := json.Marshal(api.TerminalMessage{Resize: &api.TerminalSize{Cols: s.Cols, Rows: s.Rows}})
				if conn.Write(ctx, websocket.MessageText, b) != nil {
					return
				}
			}
		}
	}()
	for {
		typ, data, err := conn.Read(ctx)
		if err != nil {
			var ce websocket.CloseError
			if errors.As(err, &ce) && ce.Code != websocket.StatusNormalClosure {
				return 0, fmt.Errorf("the terminal on %s ended: %s", id, ce.Reason)
			}
			return 0, fmt.Errorf("the terminal on %s ended without an exit status: %w", id, err)
		}
		if typ == websocket.MessageBinary {
			if _, err := out.Write(data); err != nil {
				return 0, err
			}
			continue
		}
		var msg api.TerminalMessage
		if json.Unmarshal(data, &msg) == nil && msg.ExitCode != nil {
			conn.Close(websocket.StatusNormalClosure, "")
			return *msg.ExitCode, nil
		}
	}
}

// Terminal runs a terminal session on the Manager directly.
func (c localSandboxClient) Terminal(ctx context.Context, id, command string, size sandbox.TerminalSize, in io.Reader, out io.Writer, resize <-chan sandbox.TerminalSize) (int, error) {
	req := sandbox.ProcessRequest{ExecRequest: sandbox.ExecRequest{Command: sandbox.LoginShell, Shell: sandbox.ShellRaw}, PTY: &size}
	if command != "" {
		req.Command, req.Shell = command, sandbox.ShellLogin
	}
	p, err := c.m.StartProcess(ctx, id, req)
	if err != nil {
		return 0, err
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	defer func() {
		kctx, kcancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer kcancel()
		c.m.Signal(kctx, id, p.PID, 9)
	}()
	go pumpInput(in, func(b []byte) error { return c.m.SendInput(ctx, id, p.PID, b, false) })
	go func() {
		for {
			select {
			case <-ctx.Done():
				return
			case s := <-resize:
				c.m.ResizeTerminal(ctx, id, p.PID, s)
			}
		}
	}()
	info, err := c.m.FollowProcess(ctx, id, p.PID, true, nil, func(ch sandbox.OutputChunk) error {
		_, err := out.Write(ch.Data)
		return err
	})
	if err != nil {
		return 0, err
	}
	if info.ExitCode == nil {
		return 0, fmt.Errorf("the terminal on %s ended without an exit status", id)
	}
	return *info.ExitCode, nil
}

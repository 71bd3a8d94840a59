package api

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"reflect"
	"strconv"
	"time"

	"github.com/coder/websocket"
	"github.com/danielgtaylor/huma/v2"

	"github.com/smolvm/smolvm/internal/sandbox"
)

// TerminalMessage is a JSON text frame on the terminal WebSocket: from the
// client a resize, from the server the exit that ends the session.
type TerminalMessage struct {
	Resize   *TerminalSize `json:"resize,omitempty" doc:"Client to server: the terminal's new size."`
	ExitCode *int          `json:"exit_code,omitempty" doc:"Server to client, last: the shell's exit status (128 plus the signal that killed it)."`
}

func documentTerminal(hapi huma.API) {
	reg := hapi.OpenAPI().Components.Schemas
	msg := reg.Schema(reflect.TypeOf(TerminalMessage{}), true, "")
	intParam := func(name, desc string, def int) *huma.Param {
		return &huma.Param{Name: name, In: "query", Description: desc, Schema: &huma.Schema{Type: "integer", Minimum: ptr(1.0), Maximum: ptr(1000.0), Default: def}}
	}
	hapi.OpenAPI().AddOperation(&huma.Operation{
		OperationID: "openTerminal",
		Method:      http.MethodGet,
		Path:        "/sandboxes/{id}/pty",
		Summary:     "Open a terminal",
		Tags:        []string{"processes"},
		Description: "Upgrades to a WebSocket carrying a real terminal in the guest: a login shell (or `command`, through the login shell) on a PTY. Binary frames are terminal bytes both ways; a JSON text frame `{\"resize\": {\"cols\", \"rows\"}}` from the client resizes it; the server's last frame is a JSON text frame `{\"exit_code\": N}`, then it closes the socket. Closing the socket ends the shell. The same token, Host and Origin checks apply to the upgrade as to every request; a browser, which cannot set the Authorization header on a WebSocket, offers the subprotocols `terminal.smolvm.dev` and `bearer.token.smolvm.dev.` followed by the token in base64url.",
		Parameters: []*huma.Param{
			{Name: "id", In: "path", Required: true, Description: "Sandbox id.", Schema: &huma.Schema{Type: "string"}},
			intParam("cols", "Columns.", 80),
			intParam("rows", "Rows.", 24),
			{Name: "command", In: "query", Description: "A command to run instead of the login shell.", Schema: &huma.Schema{Type: "string", MaxLength: ptr(4096)}},
		},
		Responses: map[string]*huma.Response{
			"101": {Description: "Switching to the WebSocket protocol. Text frames carry this object.", Content: map[string]*huma.MediaType{"application/json": {Schema: msg}}},
			"404": {Description: "No such sandbox.", Content: map[string]*huma.MediaType{"application/problem+json": {Schema: reg.Schema(reflect.TypeOf(Problem{}), true, "")}}},
			"409": {Description: "The sandbox is not running.", Content: map[string]*huma.MediaType{"application/problem+json": {Schema: reg.Schema(reflect.TypeOf(Problem{}), true, "")}}},
			"422": {Description: "A bad size or command.", Content: map[string]*huma.MediaType{"application/problem+json": {Schema: reg.Schema(reflect.TypeOf(Problem{}), true, "")}}},
		},
	})
}

func ptr[T any](v T) *T { return &v }

// terminalProtocol is the WebSocket subprotocol of a terminal; a client
// that cannot send an Authorization header (a browser) offers it with the
// token as a second one, "bearer.token.smolvm.dev." + base64url(token).
const terminalProtocol = "terminal.smolvm.dev"

// terminal serves GET /sandboxes/{id}/pty.
func (h *handlers) terminal(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	size := sandbox.TerminalSize{Cols: 80, Rows: 24}
	for name, dst := range map[string]*int{"cols": &size.Cols, "rows": &size.Rows} {
		if v := r.URL.Query().Get(name); v != "" {
			n, err := strconv.Atoi(v)
			if err != nil || n < 1 || n > 1000 {
				p := newProblem(http.StatusUnprocessableEntity, CodeValidationFailed, fmt.Sprintf("%s must be a whole number from 1 to 1000, got %q", name, v))
				p.Field = name
				writeProblem(w, r, p)
				return
			}
			*dst = n
		}
	}
	req := sandbox.ProcessRequest{ExecRequest: sandbox.ExecRequest{Command: sandbox.LoginShell, Shell: sandbox.ShellRaw}, PTY: &size}
	if c := r.URL.Query().Get("command"); c != "" {
		req.Command, req.Shell = c, sandbox.ShellLogin
	}
	// Refusals get their status before the upgrade.
	m, ok := h.runningFor(w, r, id, req.ExecRequest)
	if !ok {
		return
	}
	// The guard has checked Origin and Host already; the library's own
	// same-origin check would refuse allowed tools that send none.
	conn, err := websocket.Accept(w, r, &websocket.AcceptOptions{InsecureSkipVerify: true, Subprotocols: []string{terminalProtocol}})
	if err != nil {
		return // Accept has answered
	}
	defer conn.CloseNow()
	ctx, cancel := context.WithCancel(r.Context())
	defer cancel()
	proc, err := m.StartProcess(ctx, id, req)
	if err != nil {
		conn.Close(websocket.StatusInternalError, truncate(ProblemFrom(ctx, err).Detail, 120))
		return
	}
	// The shell goes with the socket, however the socket ends.
	defer func() {
		kctx, kcancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer kcancel()
		m.Signal(kctx, id, proc.PID, 9)
	}()

	// Client to guest: keystrokes and resizes.
	go func() {
		defer cancel()
		for {
			typ, data, err := conn.Read(ctx)
			if err != nil {
				return
			}
			switch typ {
			case websocket.MessageBinary:
				if err := m.SendInput(ctx, id, proc.PID, data, false); err != nil {
					return
				}
			case websocket.MessageText:
				var msg TerminalMessage
				if json.Unmarshal(data, &msg) != nil || msg.Resize == nil {
					conn.Close(websocket.StatusUnsupportedData, `text frames carry {"resize": {"cols", "rows"}}`)
					return
				}
				if err := m.ResizeTerminal(ctx, id, proc.PID, sandbox.TerminalSize{Cols: msg.Resize.Cols, Rows: msg.Resize.Rows}); err != nil {
					var se *sandbox.Error
					if errors.As(err, &se) && se.Kind == sandbox.KindInvalid {
						continue // a bad size is ignored, as a terminal would
					}
					return
				}
			}
		}
	}()

	// Guest to client: the terminal's output, then how it ended.
	info, err := m.FollowProcess(ctx, id, proc.PID, true, nil, func(c sandbox.OutputChunk) error {
		return conn.Write(ctx, websocket.MessageBinary, c.Data)
	})
	if err != nil {
		if ctx.Err() == nil {
			conn.Close(websocket.StatusInternalError, truncate(ProblemFrom(ctx, err).Detail, 120))
		}
		return
	}
	code := 0
	if info.ExitCode != nil {
		code = *info.ExitCode
	}
	b, _ := json.Marshal(TerminalMessage{ExitCode: &code})
	if conn.Write(ctx, websocket.MessageText, b) == nil {
		conn.Close(websocket.StatusNormalClosure, "")
	}
}

// truncate keeps a close reason within what a WebSocket close frame holds.
func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n]
}

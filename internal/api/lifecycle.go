package api

import (
	"context"
	"errors"
	"io"
	"net/http"
	"os"
	"time"

	"github.com/danielgtaylor/huma/v2"

	"github.com/smolvm/smolvm/internal/sandbox"
)

// StopRequest is the optional body of POST /sandboxes/{id}/stop.
type StopRequest struct {
	_       struct{} `json:"-" additionalProperties:"false"`
	Timeout int      `json:"timeout,omitempty" minimum:"1" maximum:"600" default:"10" example:"10" doc:"Seconds the guest gets to shut down cleanly before its VM is killed."`
}

// UpdateSandboxRequest is the body of PATCH /sandboxes/{id}.
type UpdateSandboxRequest struct {
	_       struct{} `json:"-" additionalProperties:"false"`
	Timeout *int     `json:"timeout,omitempty" minimum:"0" maximum:"86400" example:"600" doc:"A new time limit, in seconds from now; 0 removes the limit."`
}

type stopInput struct {
	ID   string `path:"id" example:"vm-a1b2c3d4" doc:"Sandbox id or name."`
	Body *StopRequest
}

type updateInput struct {
	ID   string `path:"id" example:"vm-a1b2c3d4" doc:"Sandbox id or name."`
	Body UpdateSandboxRequest
}

type logsInput struct {
	ID     string `path:"id" example:"vm-a1b2c3d4" doc:"Sandbox id or name."`
	Follow bool   `query:"follow" example:"true" doc:"Keep the response open and send what the console prints next, until the client leaves or the sandbox goes."`
}

func registerLifecycle(hapi huma.API, h *handlers, common, withBody []int) {
	conflict := append([]int{http.StatusNotFound, http.StatusConflict, http.StatusUnprocessableEntity}, common...)
	huma.Register(hapi, huma.Operation{
		OperationID: "stopSandbox",
		Method:      http.MethodPost,
		Path:        "/sandboxes/{id}/stop",
		Summary:     "Stop a sandbox",
		Description: "Shuts the guest down cleanly, killing the VM if it has not powered off within timeout, and keeps its disk; start boots it again. A sandbox that is not running or paused is 409 invalid_state with its status in sandbox_status.",
		Tags:        []string{"lifecycle"},
		Errors:      append(conflict, withBody...),
	}, h.stopSandbox)
	for _, op := range []struct {
		id, verb, summary, desc string
		fn                      func(*sandbox.Manager, context.Context, string) (sandbox.Info, error)
	}{
		{"startSandbox", "start", "Start a stopped sandbox", "Boots a stopped (or failed) sandbox again from its own disk.", (*sandbox.Manager).Start},
		{"pauseSandbox", "pause", "Pause a sandbox", "Stops the VM's vCPUs and keeps its memory: its processes stand still until resume. Commands and files are refused (409) while it is paused.", (*sandbox.Manager).Pause},
		{"resumeSandbox", "resume", "Resume a paused sandbox", "Lets a paused sandbox run on from where it was. One paused by its time limit gets that limit again from now.", (*sandbox.Manager).Resume},
	} {
		fn := op.fn
		huma.Register(hapi, huma.Operation{
			OperationID: op.id,
			Method:      http.MethodPost,
			Path:        "/sandboxes/{id}/" + op.verb,
			Summary:     op.summary,
			Description: op.desc + " A call in a state it cannot act on is 409 invalid_state with the current status in sandbox_status.",
			Tags:        []string{"lifecycle"},
			Errors:      conflict,
		}, func(ctx context.Context, in *sandboxID) (*sandboxOutput, error) {
			m, err := h.manager(in.ID)
			if err != nil {
				return nil, err
			}
			info, err := fn(m, ctx, in.ID)
			if err != nil {
				return nil, ProblemFrom(ctx, err)
			}
			return &sandboxOutput{Body: SandboxFromInfo(info)}, nil
		})
	}
	huma.Register(hapi, huma.Operation{
		OperationID: "updateSandbox",
		Method:      http.MethodPatch,
		Path:        "/sandboxes/{id}",
		Summary:     "Change a sandbox's time limit",
		Description: "Sets the sandbox's time limit to timeout seconds from now (0 removes it); expires_at shows the new deadline.",
		Tags:        []string{"lifecycle"},
		Errors:      append(conflict, withBody...),
	}, h.update)
	huma.Register(hapi, huma.Operation{
		OperationID: "getSandboxLogs",
		Method:      http.MethodGet,
		Path:        "/sandboxes/{id}/logs",
		Summary:     "Read a sandbox's console log",
		Description: "The guest kernel's and agent's console output since the VM last started, as text. With follow=true the response stays open and carries what is printed next.",
		Tags:        []string{"lifecycle"},
		Errors:      append([]int{http.StatusNotFound}, common...),
		Responses: map[string]*huma.Response{
			"200": {Description: "The console log.", Content: map[string]*huma.MediaType{"text/plain": {Schema: &huma.Schema{Type: "string"}}}},
		},
	}, h.logs)
}

func (h *handlers) stopSandbox(ctx context.Context, in *stopInput) (*sandboxOutput, error) {
	m, err := h.manager(in.ID)
	if err != nil {
		return nil, err
	}
	var timeout time.Duration
	if in.Body != nil {
		timeout = time.Duration(in.Body.Timeout) * time.Second
	}
	if err := m.Stop(ctx, in.ID, timeout); err != nil {
		return nil, ProblemFrom(ctx, err)
	}
	info, err := m.Get(ctx, in.ID)
	if err != nil {
		return nil, ProblemFrom(ctx, err)
	}
	return &sandboxOutput{Body: SandboxFromInfo(info)}, nil
}

func (h *handlers) update(ctx context.Context, in *updateInput) (*sandboxOutput, error) {
	m, err := h.manager(in.ID)
	if err != nil {
		return nil, err
	}
	var req sandbox.UpdateRequest
	if in.Body.Timeout != nil {
		t := time.Duration(*in.Body.Timeout) * time.Second
		req.Timeout = &t
	}
	info, err := m.Update(ctx, in.ID, req)
	if err != nil {
		return nil, ProblemFrom(ctx, err)
	}
	return &sandboxOutput{Body: SandboxFromInfo(info)}, nil
}

// logPoll is how often a followed console log is read for more.
const logPoll = 200 * time.Millisecond

func (h *handlers) logs(ctx context.Context, in *logsInput) (*huma.StreamResponse, error) {
	m, err := h.manager(in.ID)
	if err != nil {
		return nil, err
	}
	path, err := m.ConsoleLog(ctx, in.ID)
	if err != nil {
		return nil, ProblemFrom(ctx, err)
	}
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, ProblemFrom(ctx, &sandbox.Error{Kind: sandbox.KindNotFound, Code: "console_not_found", Message: "the sandbox has no console log yet"})
	}
	if err != nil {
		return nil, ProblemFrom(ctx, err)
	}
	id := in.ID
	return &huma.StreamResponse{Body: func(hctx huma.Context) {
		defer f.Close()
		hctx.SetHeader("Content-Type", "text/plain; charset=utf-8")
		hctx.SetHeader("Cache-Control", "no-store")
		w := hctx.BodyWriter()
		flush := func() {
			if fl, ok := w.(http.Flusher); ok {
				fl.Flush()
			}
		}
		if _, err := io.Copy(w, f); err != nil || !in.Follow {
			return
		}
		flush()
		rctx := hctx.Context()
		t := time.NewTicker(logPoll)
		defer t.Stop()
		for {
			select {
			case <-rctx.Done():
				return
			case <-h.stop:
				return
			case <-t.C:
			}
			n, err := io.Copy(w, f)
			if err != nil {
				return
			}
			if n > 0 {
				flush()
				continue
			}
			// Nothing new: end when the sandbox is gone.
			if _, err := m.Get(rctx, id); err != nil {
				return
			}
		}
	}}, nil
}

package api

import (
	"context"
	"fmt"
	"net/http"
	"reflect"
	"regexp"
	"strings"
	"time"

	"github.com/danielgtaylor/huma/v2"

	"github.com/smolvm/smolvm/internal/sandbox"
)

// CreateSandboxRequest is the body of POST /sandboxes. It mirrors the
// library's auto-configuration options; every field is optional.
type CreateSandboxRequest struct {
	_         struct{}          `json:"-" additionalProperties:"false"`
	OS        string            `json:"os,omitempty" enum:"alpine,ubuntu,debian,windows" example:"ubuntu" doc:"Guest operating system. Omit it for the default Linux sandbox. windows needs a local qcow2 image and is refused (unsupported_os) where it cannot run."`
	Image     string            `json:"image,omitempty" maxLength:"4096" example:"docker.io/library/python:3.11-slim" doc:"Image reference to boot: an OCI image reference, an S3 image URI, a file:// URI, or a local Windows qcow2 path. Omit it for the OS's default image."`
	Memory    int               `json:"memory,omitempty" minimum:"128" maximum:"16384" default:"512" example:"512" doc:"Guest memory in MiB."`
	DiskSize  int               `json:"disk_size,omitempty" minimum:"128" maximum:"1048576" default:"1024" example:"1024" doc:"Guest disk size in MiB. The disk is sparse: only what the guest writes takes space on the host."`
	Backend   string            `json:"backend,omitempty" enum:"auto,firecracker,qemu,libkrun" default:"auto" example:"qemu" doc:"Runtime backend. auto (or omitted) picks Firecracker where KVM works and it is installed, else QEMU (with KVM, else emulation), else libkrun; the answer's backend says which. A named backend that this host cannot run is refused with backend_unavailable, naming what is missing."`
	VCPUs     int               `json:"vcpus,omitempty" minimum:"1" maximum:"32" default:"1" example:"2" doc:"Number of virtual CPUs."`
	Network   *NetworkSpec      `json:"network,omitempty" example:"{\"mode\":\"open\",\"allow_host_loopback\":false}" doc:"What the guest may reach. Omit it for mode open without access to the host's loopback."`
	Ports     []PortSpec        `json:"ports,omitempty" maxItems:"64" doc:"Guest TCP ports to expose on the host once the sandbox runs; the response names the host ports."`
	Name      string            `json:"name,omitempty" pattern:"^[a-z0-9][a-z0-9-]{0,62}$" example:"build-box" doc:"A unique name, usable wherever the id is."`
	Labels    map[string]string `json:"labels,omitempty" example:"{\"team\": \"ml\"}" doc:"Your own key/value pairs; GET /sandboxes?label=key=value filters by them."`
	Env       map[string]string `json:"env,omitempty" example:"{\"LANG\": \"C.UTF-8\"}" doc:"Environment variables every command in the sandbox sees, over the image's; a command's own env wins."`
	Timeout   int               `json:"timeout,omitempty" minimum:"1" maximum:"86400" example:"3600" doc:"Seconds until the server ends the sandbox as on_timeout says; PATCH /sandboxes/{id} extends it. No limit when omitted."`
	OnTimeout string            `json:"on_timeout,omitempty" enum:"delete,pause" default:"delete" example:"delete" doc:"What happens when timeout is reached: delete the sandbox, or pause it (resuming starts the timeout again)."`
	Snapshot  string            `json:"snapshot,omitempty" maxLength:"128" example:"snap-1a2b3c4d" doc:"Start the sandbox as a fork of this snapshot (id or name): its memory, processes and files, with its own hostname, machine id, random state, clock, network and ports. Memory, vcpus, backend and image come from the snapshot."`
	Mounts    []MountSpec       `json:"mounts,omitempty" maxItems:"8" doc:"Host directories to share with the guest (qemu only). Each host path must be under a directory the server was started with (--allow-mount), after symlinks are resolved; anything else is 403 mount_not_allowed."`
}

// MountSpec shares a host directory with the guest.
type MountSpec struct {
	_        struct{} `json:"-" additionalProperties:"false"`
	Host     string   `json:"host" minLength:"1" maxLength:"4096" example:"/home/me/project" doc:"Absolute host directory."`
	Guest    string   `json:"guest" minLength:"2" maxLength:"4096" example:"/workspace" doc:"Absolute guest path it appears at; made if missing."`
	ReadOnly *bool    `json:"readonly,omitempty" default:"true" example:"true" doc:"Whether the guest may only read it. Read-only unless set to false."`
}

// Mount is a host directory a sandbox shares.
type Mount struct {
	Host     string `json:"host" example:"/home/me/project" doc:"Host directory, symlinks resolved."`
	Guest    string `json:"guest" example:"/workspace" doc:"Where the guest sees it."`
	ReadOnly bool   `json:"readonly" example:"true" doc:"Whether the guest may only read it."`
}

// Sandbox is one sandbox's state.
type Sandbox struct {
	ID        string            `json:"id" example:"vm-a1b2c3d4" doc:"Sandbox id, used in the other routes."`
	Status    string            `json:"status" enum:"creating,running,paused,stopped,error" example:"running" doc:"Lifecycle state. paused keeps the VM's memory with its vCPUs stopped. A sandbox whose VM died is reported as stopped or error, never running."`
	OS        string            `json:"os" example:"ubuntu" doc:"Guest operating system."`
	Image     string            `json:"image" example:"docker.io/library/ubuntu:24.04" doc:"Image the sandbox booted from."`
	Backend   string            `json:"backend" example:"qemu" doc:"Runtime backend running the VM."`
	Memory    int               `json:"memory" minimum:"0" example:"512" doc:"Guest memory in MiB."`
	DiskSize  int               `json:"disk_size" minimum:"0" example:"1024" doc:"Guest disk size in MiB."`
	VCPUs     int               `json:"vcpus" minimum:"0" example:"1" doc:"Number of virtual CPUs."`
	PID       int               `json:"pid,omitempty" minimum:"0" example:"12345" doc:"Host process id of the VM, while it runs."`
	CreatedAt time.Time         `json:"created_at" example:"2026-06-24T10:00:00Z" doc:"When the sandbox was created (RFC 3339)."`
	Error     string            `json:"error,omitempty" example:"VM process exited unexpectedly" doc:"Why the sandbox is in the error state."`
	Network   SandboxNetwork    `json:"network" example:"{\"mode\":\"open\",\"allow_host_loopback\":false}" doc:"What the guest may reach."`
	Ports     []Port            `json:"ports" nullable:"false" doc:"Guest ports exposed on the host."`
	Progress  *SandboxProgress  `json:"progress,omitempty" example:"{\"phase\":\"pull\",\"done_bytes\":1048576,\"total_bytes\":31457280}" doc:"While status is creating: how far preparing the image has come."`
	Boot      string            `json:"boot,omitempty" enum:"cold,template,pool" example:"template" doc:"In the answer to a create: how the VM came up. cold booted the kernel; template restored a saved, booted VM; pool handed out one restored ahead of time."`
	Warnings  []string          `json:"warnings,omitempty" example:"[\"booted cold: the clone of template 1f2e3d4c5b6a798807f6e5d4 failed (the guest crashed); the template is retired\"]" doc:"In the answer to a create: what was worked around on the way, such as a template whose clone failed and a cold boot instead."`
	Name      string            `json:"name,omitempty" example:"build-box" doc:"The sandbox's unique name, if it has one."`
	Labels    map[string]string `json:"labels,omitempty" example:"{\"team\": \"ml\"}" doc:"The labels it was created with."`
	Env       map[string]string `json:"env,omitempty" example:"{\"LANG\": \"C.UTF-8\"}" doc:"The environment every command in it sees."`
	Timeout   int               `json:"timeout,omitempty" minimum:"0" example:"3600" doc:"Its time limit in seconds, if it has one."`
	OnTimeout string            `json:"on_timeout,omitempty" enum:"delete,pause" example:"delete" doc:"What happens at its deadline."`
	ExpiresAt *time.Time        `json:"expires_at,omitempty" example:"2026-06-24T11:00:00Z" doc:"When the server ends it (RFC 3339), while a time limit runs."`
	Snapshot  string            `json:"snapshot,omitempty" example:"snap-1a2b3c4d" doc:"The snapshot it was forked from."`
	Mounts    []Mount           `json:"mounts,omitempty" doc:"Host directories it shares."`
}

// SandboxProgress is the image preparation of a sandbox being created.
type SandboxProgress struct {
	Phase      string `json:"phase" enum:"resolve,pull,extract,mkfs,ready" example:"pull" doc:"What is being done: resolving the reference, pulling layers, extracting them, making the filesystem."`
	DoneBytes  int64  `json:"done_bytes" minimum:"0" example:"1048576" doc:"Bytes done in this phase, where it counts bytes."`
	TotalBytes int64  `json:"total_bytes" minimum:"0" example:"31457280" doc:"Bytes expected in this phase; 0 when unknown."`
}

// SandboxList is the body of GET /sandboxes. An object rather than a bare
// array so fields can be added without breaking clients.
type SandboxList struct {
	Sandboxes []Sandbox `json:"sandboxes" nullable:"false" doc:"Every sandbox on the host, oldest first."`
}

// ExecRequest is the body of POST /sandboxes/{id}/exec.
type ExecRequest struct {
	_       struct{}          `json:"-" additionalProperties:"false"`
	Command string            `json:"command,omitempty" maxLength:"131072" example:"python3 --version" doc:"Command line to run inside the sandbox, through the shell named by shell. Exclusive with argv; one of them is required."`
	Argv    []string          `json:"argv,omitempty" minItems:"1" maxItems:"4096" example:"[\"python3\", \"-c\", \"print('hi')\"]" doc:"Program and arguments, run exactly as given with no shell. Exclusive with command."`
	Timeout int               `json:"timeout,omitempty" minimum:"1" maximum:"3600" default:"30" example:"30" doc:"Maximum seconds to wait for the command. Past it the command is killed and the response is 408 command_timeout with the output so far."`
	Shell   string            `json:"shell,omitempty" enum:"login,raw" default:"login" example:"login" doc:"How command is run: login through the guest's login shell (bash, else sh, with -l so profiles apply), raw with /bin/sh -c and no profile. Ignored with argv."`
	Cwd     string            `json:"cwd,omitempty" maxLength:"4096" example:"/root" doc:"Absolute working directory in the guest; it must exist. Defaults to the image's working directory, else the user's home."`
	Env     map[string]string `json:"env,omitempty" example:"{\"DEBUG\": \"1\"}" doc:"Environment variables added for this command, over the image's. Names are a letter or underscore, then letters, digits and underscores."`
	Stdin   *string           `json:"stdin,omitempty" maxLength:"8388608" example:"hello\n" doc:"Text fed to the command's standard input, which is then closed. Without it the command reads end of file."`
}

// ExecResult is the 200 body of exec, whatever the command's exit code.
type ExecResult struct {
	ExitCode   int    `json:"exit_code" example:"0" doc:"The command's exit status; non-zero is still a 200 response."`
	Stdout     string `json:"stdout" example:"Python 3.12.3\n" doc:"Everything the command wrote to standard output (invalid UTF-8 is replaced with U+FFFD)."`
	Stderr     string `json:"stderr" example:"" doc:"Everything the command wrote to standard error (invalid UTF-8 is replaced with U+FFFD)."`
	DurationMS int64  `json:"duration_ms" minimum:"0" example:"12" doc:"How long the command ran, in milliseconds."`
}

type sandboxID struct {
	ID string `path:"id" example:"vm-a1b2c3d4" doc:"Sandbox id, as returned by create."`
}

type createInput struct {
	Prefer string `header:"Prefer" example:"respond-async" doc:"respond-async answers 202 at once and creates the sandbox in the background (RFC 7240)."`
	Body   *CreateSandboxRequest
}

type execInput struct {
	ID   string `path:"id" example:"vm-a1b2c3d4" doc:"Sandbox id, as returned by create."`
	Body ExecRequest
}

type sandboxOutput struct{ Body Sandbox }

// createOutput lets create answer 201, or 202 when asked to respond async.
type createOutput struct {
	Status   int
	Location string `header:"Location" doc:"The new sandbox's URL."`
	Body     Sandbox
}
type listOutput struct{ Body SandboxList }
type deleteOutput struct{}
type execOutput struct{ Body ExecResult }

type handlers struct {
	m *sandbox.Manager
	// routes are the operations served, for GET /capabilities; set once
	// every operation is registered.
	routes []string
	// stop ends event streams; keepalive paces their comments.
	stop      <-chan struct{}
	keepalive time.Duration
}

func registerSandboxes(hapi huma.API, h *handlers) {
	common := []int{http.StatusUnauthorized, http.StatusForbidden, http.StatusInternalServerError, http.StatusServiceUnavailable}
	withBody := []int{http.StatusBadRequest, http.StatusUnsupportedMediaType, http.StatusRequestEntityTooLarge, http.StatusUnprocessableEntity}
	errs := func(codes ...[]int) []int {
		var out []int
		for _, c := range codes {
			out = append(out, c...)
		}
		return out
	}
	notFound := []int{http.StatusNotFound}

	sandboxRef := hapi.OpenAPI().Components.Schemas.Schema(reflect.TypeOf(Sandbox{}), true, "")
	huma.Register(hapi, huma.Operation{
		OperationID: "createSandbox",
		Method:      http.MethodPost,
		Path:        "/sandboxes",
		Summary:     "Create a sandbox",
		Description: "Creates, boots and registers a sandbox, and answers 201 with a Location header once the sandbox runs commands. Omitted fields take their defaults. " +
			"With the header `Prefer: respond-async` it answers 202 at once with the sandbox in status creating; GET /sandboxes/{id} then shows the image preparation's progress until the status is running, or error with the reason. " +
			"When the host's data directory has less than 32 MiB free, or runs out of space during the create, it answers 507 host_disk_full, and nothing of the sandbox or the image is kept.",
		Tags:          []string{"sandboxes"},
		DefaultStatus: http.StatusCreated,
		Errors:        errs(withBody, common, []int{http.StatusNotFound, http.StatusConflict, http.StatusBadGateway, http.StatusInsufficientStorage}),
		Responses: map[string]*huma.Response{
			"202": {
				Description: "Accepted (with Prefer: respond-async): the sandbox is being created.",
				Content:     map[string]*huma.MediaType{"application/json": {Schema: sandboxRef}},
			},
		},
	}, h.create)

	huma.Register(hapi, huma.Operation{
		OperationID: "listSandboxes",
		Method:      http.MethodGet,
		Path:        "/sandboxes",
		Summary:     "List sandboxes",
		Description: "Lists every sandbox on the host, oldest first, including those created by other processes; label filters keep those carrying every label given.",
		Tags:        []string{"sandboxes"},
		Errors:      errs([]int{http.StatusUnprocessableEntity}, common),
	}, h.list)

	huma.Register(hapi, huma.Operation{
		OperationID: "getSandbox",
		Method:      http.MethodGet,
		Path:        "/sandboxes/{id}",
		Summary:     "Get a sandbox",
		Description: "Returns one sandbox's state.",
		Tags:        []string{"sandboxes"},
		Errors:      errs(notFound, common),
	}, h.get)

	registry := hapi.OpenAPI().Components.Schemas
	timeoutSchema := registry.Schema(reflect.TypeFor[CommandTimeoutProblem](), true, "CommandTimeoutProblem")
	huma.Register(hapi, huma.Operation{
		OperationID: "execSandbox",
		Method:      http.MethodPost,
		Path:        "/sandboxes/{id}/exec",
		Summary:     "Run a command in a sandbox",
		Description: "Runs a command to completion and returns its exit code and output. A non-zero exit code is a 200 response. A command that runs past its timeout is killed and answered with 408 (code command_timeout) carrying its partial output; the sandbox keeps running.",
		Tags:        []string{"sandboxes"},
		Errors:      errs(withBody, notFound, []int{http.StatusConflict}, common),
		Responses: map[string]*huma.Response{
			"408": {
				Description: "The command ran past its timeout and was killed. The body carries what it wrote before that; the sandbox keeps running.",
				Content: map[string]*huma.MediaType{
					"application/problem+json": {Schema: timeoutSchema},
				},
			},
		},
	}, h.exec)

	huma.Register(hapi, huma.Operation{
		OperationID:   "deleteSandbox",
		Method:        http.MethodDelete,
		Path:          "/sandboxes/{id}",
		Summary:       "Delete a sandbox",
		Description:   "Stops the sandbox's VM and removes its disk, files and record, and answers 204 with no body. Works on stopped, paused and failed sandboxes too.",
		DefaultStatus: http.StatusNoContent,
		Tags:          []string{"sandboxes"},
		Errors:        errs(notFound, []int{http.StatusConflict}, common),
	}, h.delete)

	registerLifecycle(hapi, h, common, withBody)
	registerSnapshots(hapi, h, common, withBody)
	registerPorts(hapi, h, common, withBody)
	registerProcesses(hapi, h, common, withBody)
	registerFiles(hapi, h, common, withBody)
	registerHost(hapi, h, common)
	registerStats(hapi, h, common)
}

// plausibleID rejects ids that no sandbox can have before they reach the
// Manager (which builds paths from ids), without assuming the exact id
// format.
var plausibleID = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$`)

func (h *handlers) manager(id string) (*sandbox.Manager, error) {
	if id != "" && !plausibleID.MatchString(id) {
		p := newProblem(http.StatusNotFound, CodeSandboxNotFound, "no sandbox with id "+quoteID(id))
		p.Field = "id"
		return nil, p
	}
	if h.m == nil {
		return nil, newProblem(http.StatusServiceUnavailable, CodeInternal, "no sandbox manager is configured")
	}
	return h.m, nil
}

func quoteID(id string) string {
	if len(id) > 80 {
		id = id[:80] + "..."
	}
	return `"` + id + `"`
}

func (h *handlers) create(ctx context.Context, in *createInput) (*createOutput, error) {
	m, err := h.manager("")
	if err != nil {
		return nil, err
	}
	var body CreateSandboxRequest
	if in.Body != nil {
		body = *in.Body
	}
	req, err := CreateRequest(body)
	if err != nil {
		return nil, ProblemFrom(ctx, err)
	}
	create, status := m.Create, http.StatusCreated
	if preferAsync(in.Prefer) {
		create, status = m.CreateAsync, http.StatusAccepted
	}
	info, err := create(ctx, req)
	if err != nil {
		return nil, ProblemFrom(ctx, err)
	}
	if info.Status == sandbox.StatusRunning {
		status = http.StatusCreated // the pool had one ready
	}
	return &createOutput{Status: status, Location: "/sandboxes/" + info.ID, Body: SandboxFromInfo(info)}, nil
}

type listInput struct {
	Label []string `query:"label,explode" nullable:"false" example:"team=ml" doc:"Only sandboxes with this label (key=value); repeat it to require several."`
}

func (h *handlers) list(ctx context.Context, in *listInput) (*listOutput, error) {
	m, err := h.manager("")
	if err != nil {
		return nil, err
	}
	var want map[string]string
	for _, l := range in.Label {
		k, v, err := sandbox.ParseLabelFilter(l)
		if err != nil {
			return nil, ProblemFrom(ctx, err)
		}
		if want == nil {
			want = map[string]string{}
		}
		want[k] = v
	}
	infos, err := m.Find(ctx, want)
	if err != nil {
		return nil, ProblemFrom(ctx, err)
	}
	out := SandboxList{Sandboxes: make([]Sandbox, 0, len(infos))}
	for _, info := range infos {
		out.Sandboxes = append(out.Sandboxes, SandboxFromInfo(info))
	}
	return &listOutput{Body: out}, nil
}

func (h *handlers) get(ctx context.Context, in *sandboxID) (*sandboxOutput, error) {
	m, err := h.manager(in.ID)
	if err != nil {
		return nil, err
	}
	info, err := m.Get(ctx, in.ID)
	if err != nil {
		return nil, ProblemFrom(ctx, err)
	}
	return &sandboxOutput{Body: SandboxFromInfo(info)}, nil
}

func (h *handlers) delete(ctx context.Context, in *sandboxID) (*deleteOutput, error) {
	m, err := h.manager(in.ID)
	if err != nil {
		return nil, err
	}
	if err := m.Delete(ctx, in.ID); err != nil {
		return nil, ProblemFrom(ctx, err)
	}
	return &deleteOutput{}, nil
}

func (h *handlers) exec(ctx context.Context, in *execInput) (*execOutput, error) {
	if p := in.Body.validate(); p != nil {
		return nil, p
	}
	m, err := h.manager(in.ID)
	if err != nil {
		return nil, err
	}
	res, err := m.Exec(ctx, in.ID, in.Body.Request())
	if err != nil {
		return nil, ProblemFrom(ctx, err)
	}
	if ctx.Err() != nil && !res.TimedOut {
		// The command was killed because this request was cancelled (the
		// server is shutting down, or the client left): its exit status
		// is not the command's own.
		return nil, newProblem(http.StatusServiceUnavailable, CodeShuttingDown,
			"the command was killed because the request was cancelled before it finished (the server is shutting down)")
	}
	if res.TimedOut {
		p := &CommandTimeoutProblem{
			Problem: *newProblem(http.StatusRequestTimeout, CodeCommandTimeout,
				fmt.Sprintf("the command did not finish within its timeout of %ds and was killed; stdout and stderr hold its output until then. Raise timeout (up to 3600) for longer commands.", in.Body.Timeout)),
			Timeout:    in.Body.Timeout,
			Stdout:     string(res.Stdout),
			Stderr:     string(res.Stderr),
			DurationMS: res.Duration.Milliseconds(),
		}
		p.Field = "timeout"
		return nil, p
	}
	return &execOutput{Body: ExecResult{
		ExitCode:   res.ExitCode,
		Stdout:     string(res.Stdout),
		Stderr:     string(res.Stderr),
		DurationMS: res.Duration.Milliseconds(),
	}}, nil
}

// validate refuses what the schema cannot say: one of command and argv,
// not both, and a command that is more than blanks.
func (b ExecRequest) validate() *Problem {
	field, msg := "", ""
	switch {
	case b.Command != "" && len(b.Argv) > 0:
		field, msg = "argv", "command and argv are exclusive: give a command line or an argv array, not both"
	case len(b.Argv) > 0:
		return nil
	case strings.TrimSpace(b.Command) == "":
		field, msg = "command", "command (or argv) is required and must not be blank"
	default:
		return nil
	}
	p := newProblem(http.StatusUnprocessableEntity, CodeValidationFailed, msg)
	p.Field = field
	p.Errors = []*huma.ErrorDetail{{Message: msg, Location: "body." + field}}
	return p
}

// Request is what the Manager runs for an exec body; the CLI's local path
// shares it.
func (b ExecRequest) Request() sandbox.ExecRequest {
	r := sandbox.ExecRequest{
		Command: b.Command,
		Argv:    b.Argv,
		Timeout: time.Duration(b.Timeout) * time.Second,
		Shell:   sandbox.Shell(b.Shell),
		Cwd:     b.Cwd,
		Env:     b.Env,
	}
	if b.Stdin != nil {
		r.Stdin = []byte(*b.Stdin)
	}
	return r
}

// SandboxFromInfo is the API representation of a sandbox, shared with the
// CLI so that both print the same JSON.
// preferAsync reports whether a Prefer header (RFC 7240) asks for
// respond-async.
func preferAsync(h string) bool {
	for _, p := range strings.Split(h, ",") {
		if name, _, _ := strings.Cut(strings.TrimSpace(p), ";"); strings.EqualFold(strings.TrimSpace(name), "respond-async") {
			return true
		}
	}
	return false
}

func SandboxFromInfo(info sandbox.Info) Sandbox {
	var progress *SandboxProgress
	if p := info.Progress; p != nil {
		progress = &SandboxProgress{Phase: p.Phase, DoneBytes: p.Done, TotalBytes: p.Total}
	}
	sb := Sandbox{
		Progress:  progress,
		ID:        info.ID,
		Status:    string(info.Status),
		OS:        info.OS,
		Image:     info.Image,
		Backend:   info.Backend,
		Memory:    info.MemoryMiB,
		DiskSize:  info.DiskSizeMiB,
		VCPUs:     info.VCPUs,
		PID:       info.PID,
		CreatedAt: info.CreatedAt.UTC(),
		Error:     info.Error,
		Network:   networkFrom(info.Network),
		Ports:     portsFrom(info.Ports),
		Boot:      string(info.Boot),
		Warnings:  info.Warnings,
		Name:      info.Name,
		Labels:    info.Labels,
		Env:       info.Env,
		Timeout:   int(info.Timeout.Seconds()),
		OnTimeout: info.OnTimeout,
		Snapshot:  info.Snapshot,
	}
	if !info.Deadline.IsZero() {
		t := info.Deadline.UTC()
		sb.ExpiresAt = &t
	}
	for _, mt := range info.Mounts {
		sb.Mounts = append(sb.Mounts, Mount{Host: mt.Host, Guest: mt.Guest, ReadOnly: mt.ReadOnly})
	}
	return sb
}

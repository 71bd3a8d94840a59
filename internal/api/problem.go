package api

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"regexp"
	"strings"

	"github.com/danielgtaylor/huma/v2"
	"github.com/danielgtaylor/huma/v2/validation"

	"github.com/smolvm/smolvm/internal/sandbox"
)

// Stable problem codes this layer produces itself. The Manager may add its
// own (e.g. "invalid_image"); they pass through unchanged.
const (
	CodeValidationFailed     = "validation_failed"
	CodeMalformedJSON        = "malformed_json"
	CodeBodyRequired         = "body_required"
	CodeBodyTooLarge         = "body_too_large"
	CodeUnsupportedMediaType = "unsupported_media_type"
	CodeNotAcceptable        = "not_acceptable"
	CodeUnauthorized         = "unauthorized"
	CodeForbiddenOrigin      = "forbidden_origin"
	CodeForbiddenHost        = "forbidden_host"
	CodeNotFound             = "not_found"
	CodeMethodNotAllowed     = "method_not_allowed"
	CodeRequestTimeout       = "request_timeout"
	CodeSandboxNotFound      = "sandbox_not_found"
	CodeSandboxNotRunning    = "sandbox_not_running"
	CodeConflict             = "conflict"
	CodeCommandTimeout       = "command_timeout"
	CodeBackendUnavailable   = "backend_unavailable"
	CodeUnsupportedOS        = "unsupported_os"
	CodeShuttingDown         = "shutting_down"
	CodeInternal             = "internal_error"
)

// title is the fixed, per-type summary RFC 9457 asks for; an unknown code
// falls back to the HTTP status text.
func title(status int, code string) string {
	switch code {
	case CodeValidationFailed:
		return "Invalid request"
	case CodeMalformedJSON:
		return "Malformed JSON body"
	case CodeBodyRequired:
		return "Request body required"
	case CodeBodyTooLarge:
		return "Request body too large"
	case CodeUnsupportedMediaType:
		return "Unsupported media type"
	case CodeNotAcceptable:
		return "Not acceptable"
	case CodeUnauthorized:
		return "Unauthorized"
	case CodeForbiddenOrigin:
		return "Cross-origin request refused"
	case CodeForbiddenHost:
		return "Host not allowed"
	case CodeNotFound:
		return "Not found"
	case CodeMethodNotAllowed:
		return "Method not allowed"
	case CodeRequestTimeout:
		return "Request timeout"
	case CodeSandboxNotFound:
		return "Sandbox not found"
	case CodeSandboxNotRunning:
		return "Sandbox not running"
	case CodeConflict:
		return "Conflict"
	case CodeCommandTimeout:
		return "Command timed out"
	case CodeBackendUnavailable:
		return "Backend unavailable"
	case CodeUnsupportedOS:
		return "Unsupported operating system"
	case CodeShuttingDown:
		return "Server shutting down"
	case CodeInternal:
		return "Internal error"
	// The Kubernetes gateway's own (`smolvm server start --kubeconfig`).
	case "not_supported_in_cluster":
		return "Not supported in a cluster"
	case "node_unreachable":
		return "Node unreachable"
	case "create_timeout":
		return "Sandbox not running in time"
	case "kubernetes_error":
		return "Kubernetes API error"
	}
	return http.StatusText(status)
}

// problemTypePrefix makes each code a distinct RFC 9457 problem type. A URN
// rather than a URL: nothing is served there and clients should not fetch it.
const problemTypePrefix = "urn:smolvm:problem:"

// Problem is an RFC 9457 problem details object, served as
// application/problem+json, with a stable machine-readable code.
type Problem struct {
	Type     string              `json:"type" format:"uri" example:"urn:smolvm:problem:sandbox_not_found" doc:"A URI identifying the problem type: urn:smolvm:problem: followed by the code."`
	Title    string              `json:"title" example:"Sandbox not found" doc:"A short summary of the problem type; the same for every occurrence of a code."`
	Status   int                 `json:"status" minimum:"400" maximum:"599" example:"404" doc:"The HTTP status code of this response."`
	Detail   string              `json:"detail" example:"no sandbox with id vm-a1b2c3d4" doc:"What happened in this occurrence and, where possible, what to do about it."`
	Code     string              `json:"code" pattern:"^[a-z][a-z0-9_]*$" example:"sandbox_not_found" doc:"Stable snake_case error code for programs to branch on. Codes produced by the server: validation_failed, malformed_json, body_required, body_too_large, unsupported_media_type, not_acceptable, unauthorized, forbidden_origin, forbidden_host, not_found, method_not_allowed, request_timeout, sandbox_not_found, sandbox_not_running, conflict, command_timeout, backend_unavailable, unsupported_os, shutting_down, internal_error; the sandbox manager adds more specific ones (e.g. invalid_disk_size, unsupported_image, kernel_missing, agent_unreachable, agent_incompatible, invalid_network, invalid_port, port_in_use, port_already_exposed, port_not_exposed, network_off, network_down, disk_full, host_disk_full). A server over a Kubernetes cluster adds not_supported_in_cluster, node_unreachable, create_timeout and kubernetes_error. New codes may be added."`
	Field    string              `json:"field,omitempty" example:"memory" doc:"The request field at fault (a body property such as memory, or a path parameter such as id), when one is."`
	Instance string              `json:"instance,omitempty" format:"uri-reference" example:"/sandboxes/vm-a1b2c3d4" doc:"The request path this problem occurred on."`
	Errors   []*huma.ErrorDetail `json:"errors,omitempty" nullable:"false" doc:"Every individual validation failure, when there are several."`
	// SandboxStatus is the sandbox's status when a lifecycle call came in
	// a state it cannot act on (code invalid_state).
	SandboxStatus string `json:"sandbox_status,omitempty" example:"stopped" doc:"With code invalid_state: the sandbox's current status."`
}

// Error makes a Problem usable as an error returned from a handler.
func (p *Problem) Error() string { return p.Detail }

// GetStatus implements huma.StatusError.
func (p *Problem) GetStatus() int { return p.Status }

// ContentType implements huma.ContentTypeFilter so problems are served as
// application/problem+json.
func (p *Problem) ContentType(ct string) string {
	if ct == "application/json" {
		return "application/problem+json"
	}
	return ct
}

// CommandTimeoutProblem is the 408 response of exec: the command ran past its
// timeout and was killed; the sandbox keeps running. It carries what the
// command wrote before that.
type CommandTimeoutProblem struct {
	Problem
	Timeout    int    `json:"timeout" minimum:"1" maximum:"3600" example:"2" doc:"The timeout, in seconds, that the command exceeded."`
	Stdout     string `json:"stdout" example:"partial output\n" doc:"What the command wrote to standard output before it was killed."`
	Stderr     string `json:"stderr" example:"" doc:"What the command wrote to standard error before it was killed."`
	DurationMS int64  `json:"duration_ms" minimum:"0" example:"2003" doc:"How long the command ran, in milliseconds."`
}

func newProblem(status int, code, detail string) *Problem {
	return &Problem{
		Type:   problemTypePrefix + code,
		Title:  title(status, code),
		Status: status,
		Detail: detail,
		Code:   code,
	}
}

// newHumaError replaces huma.NewError so that every error huma itself
// produces (validation, body parsing, content negotiation) has the Problem
// shape, a code and the field at fault.
func newHumaError(status int, msg string, errs ...error) huma.StatusError {
	var details []*huma.ErrorDetail
	for _, err := range errs {
		if err == nil {
			continue
		}
		if se, ok := sandbox.AsError(err); ok {
			return fromSandboxError(se)
		}
		var p *Problem
		if errors.As(err, &p) {
			return p
		}
		if d, ok := err.(huma.ErrorDetailer); ok {
			details = append(details, trimDetail(d.ErrorDetail()))
		} else {
			details = append(details, &huma.ErrorDetail{Message: err.Error()})
		}
	}

	switch status {
	case 0:
		// huma builds one error with status 0 at registration to learn the
		// schema of error responses.
		return &Problem{}
	case http.StatusBadRequest:
		if msg == "request body is required" {
			p := newProblem(status, CodeBodyRequired, "this operation needs a JSON request body")
			p.Errors = details
			return p
		}
		p := newProblem(status, CodeMalformedJSON, "the request body is not valid JSON")
		if len(details) > 0 {
			p.Detail += ": " + details[0].Message
		}
		p.Errors = details
		return p
	case http.StatusUnprocessableEntity:
		return validationProblem(details)
	case http.StatusRequestEntityTooLarge:
		return newProblem(status, CodeBodyTooLarge, msg)
	case http.StatusUnsupportedMediaType:
		return newProblem(status, CodeUnsupportedMediaType, "send the request body as application/json")
	case http.StatusNotAcceptable:
		return newProblem(status, CodeNotAcceptable, "responses are only available as application/json; check the Accept header")
	case http.StatusRequestTimeout:
		return newProblem(status, CodeRequestTimeout, msg)
	}
	code := CodeInternal
	if status < 500 {
		code = snake(http.StatusText(status))
	}
	detail := msg
	if len(details) > 0 {
		detail += ": " + details[0].Message
	}
	p := newProblem(status, code, detail)
	p.Errors = details
	return p
}

var requiredProperty = regexp.MustCompile(`^expected required property (\S+) to be present$`)

// validationProblem turns huma's schema validation failures into one problem
// naming the first field at fault; all failures stay in Errors.
func validationProblem(details []*huma.ErrorDetail) *Problem {
	p := newProblem(http.StatusUnprocessableEntity, CodeValidationFailed, "the request is invalid")
	p.Errors = details
	if len(details) == 0 {
		return p
	}
	first := details[0]
	field := fieldOf(first.Location)
	msg := first.Message
	if m := requiredProperty.FindStringSubmatch(msg); m != nil {
		field = joinField(field, m[1])
		msg = "is required"
	} else if msg == validation.MsgUnexpectedProperty {
		msg = "is not a known field"
	} else if msg == fmt.Sprintf(validation.MsgExpectedMatchPattern, `\S`) {
		msg = "must not be empty or blank"
	} else if v, ok := scalar(first.Value); ok {
		msg = fmt.Sprintf("%s, got %s", msg, v)
	}
	p.Field = field
	if field != "" {
		p.Detail = field + ": " + msg
	} else {
		p.Detail = "request body: " + msg
	}
	if n := len(details) - 1; n > 0 {
		p.Detail += fmt.Sprintf(" (and %d more problem(s), see errors)", n)
	}
	return p
}

// fieldOf maps a huma location ("body.memory", "path.id", "body") to the
// request field it names ("memory", "id", "").
func fieldOf(location string) string {
	for _, prefix := range []string{"body", "path", "query", "header"} {
		if location == prefix {
			return ""
		}
		if rest, ok := strings.CutPrefix(location, prefix+"."); ok {
			return rest
		}
	}
	return location
}

func joinField(parent, child string) string {
	if parent == "" {
		return child
	}
	return parent + "." + child
}

// scalar renders v as JSON if it is a short scalar worth echoing in a
// message.
func scalar(v any) (string, bool) {
	switch v.(type) {
	case string, float64, int, int64, bool:
		b, err := json.Marshal(v)
		if err != nil || len(b) > 80 {
			return "", false
		}
		return string(b), true
	}
	return "", false
}

// trimDetail drops echoed values that are large (huma echoes the whole body
// on a parse error), so an error response stays small.
func trimDetail(d *huma.ErrorDetail) *huma.ErrorDetail {
	if d == nil {
		return &huma.ErrorDetail{}
	}
	c := *d
	switch v := c.Value.(type) {
	case string:
		if len(v) > 200 {
			c.Value = nil
		}
	case map[string]any, []any:
		c.Value = nil
	}
	return &c
}

// fromSandboxError maps the Manager's error kinds to HTTP statuses. An
// unavailable backend or OS is the request's problem to fix on this host, so
// it is a 422 like other unprocessable input, told apart by its code.
func fromSandboxError(e *sandbox.Error) *Problem {
	status, code := http.StatusInternalServerError, CodeInternal
	switch e.Kind {
	case sandbox.KindInvalid:
		status, code = http.StatusUnprocessableEntity, CodeValidationFailed
	case sandbox.KindNotFound:
		status, code = http.StatusNotFound, CodeSandboxNotFound
	case sandbox.KindConflict:
		status, code = http.StatusConflict, CodeConflict
	case sandbox.KindUnavailable:
		status, code = http.StatusUnprocessableEntity, CodeBackendUnavailable
	case sandbox.KindUpstream:
		status, code = http.StatusBadGateway, CodeInternal
	case sandbox.KindInsufficientStorage:
		status, code = http.StatusInsufficientStorage, "disk_full"
	case sandbox.KindForbidden:
		status, code = http.StatusForbidden, "forbidden"
	}
	if e.Code != "" {
		code = e.Code
	}
	detail := e.Message
	if status >= 500 && status != http.StatusBadGateway && status != http.StatusInsufficientStorage {
		// The cause is what a person needs to debug a server-side failure.
		detail = e.Error()
	}
	if detail == "" {
		detail = http.StatusText(status)
	}
	p := newProblem(status, code, detail)
	p.Field = e.Field
	p.SandboxStatus = string(e.Status)
	return p
}

// problemFrom converts any error from the Manager into a Problem.
func ProblemFrom(ctx context.Context, err error) *Problem {
	if se, ok := sandbox.AsError(err); ok {
		return fromSandboxError(se)
	}
	var p *Problem
	if errors.As(err, &p) {
		return p
	}
	if errors.Is(err, context.Canceled) && ctx.Err() != nil {
		return newProblem(http.StatusServiceUnavailable, CodeShuttingDown, "the request was cancelled before it finished: "+err.Error())
	}
	if sandbox.HostFull(err) {
		return newProblem(http.StatusInsufficientStorage, "host_disk_full", "the host is out of disk space: "+err.Error())
	}
	return newProblem(http.StatusInternalServerError, CodeInternal, err.Error())
}

// snake turns an HTTP status text into a code: "Not Found" -> "not_found".
func snake(s string) string {
	var b strings.Builder
	for _, r := range strings.ToLower(s) {
		switch {
		case r >= 'a' && r <= 'z', r >= '0' && r <= '9':
			b.WriteRune(r)
		case b.Len() > 0 && !strings.HasSuffix(b.String(), "_"):
			b.WriteByte('_')
		}
	}
	return strings.TrimSuffix(b.String(), "_")
}

// WriteProblem answers r with a problem of its own code, for handlers
// outside this package that serve the same API.
func WriteProblem(w http.ResponseWriter, r *http.Request, status int, code, detail string) {
	writeProblem(w, r, newProblem(status, code, detail))
}

// Write answers r with p, for handlers outside this package.
func (p *Problem) Write(w http.ResponseWriter, r *http.Request) { writeProblem(w, r, p) }

// writeProblem writes p outside huma (from the request guards and the
// fallback routes).
func writeProblem(w http.ResponseWriter, r *http.Request, p *Problem) {
	if p.Instance == "" && r != nil {
		p.Instance = r.URL.Path
	}
	b, err := json.Marshal(p)
	if err != nil {
		http.Error(w, p.Detail, p.Status)
		return
	}
	h := w.Header()
	h.Set("Content-Type", "application/problem+json")
	h.Set("Content-Length", fmt.Sprint(len(b)+1))
	h.Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(p.Status)
	w.Write(append(b, '\n'))
}

// Package mcp offers the HTTP API's main operations as Model Context
// Protocol tools, for AI agents that reach their tools over MCP.
//
// Every tool is one HTTP API operation: its input schema is that
// operation's path and query parameters and request body, taken from the
// OpenAPI document, and a call is that request, served by the same handler
// as HTTP clients get (in-process for `smolvm mcp` and /mcp, or over HTTP to
// a running server). Validation, defaults and errors are therefore exactly
// the API's, with nothing to keep in step by hand.
package mcp

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strconv"
	"strings"
	"unicode/utf8"

	sdk "github.com/modelcontextprotocol/go-sdk/mcp"
)

// Caller sends one API request and returns its response. The response's
// body must be read and closed by the caller.
type Caller func(r *http.Request) (*http.Response, error)

// HandlerCaller serves requests with h in this process. h is the API
// without its Host/token guard: the request that reached the MCP server
// (or the local user running `smolvm mcp`) was already let in. An answer
// is held in memory, so one larger than maxAnswer is cut off and the call
// fails with ErrAnswerTooLarge rather than fill the server's memory.
func HandlerCaller(h http.Handler) Caller {
	return func(r *http.Request) (*http.Response, error) {
		w := &cappedRecorder{ResponseRecorder: httptest.NewRecorder()}
		h.ServeHTTP(w, r)
		if w.over {
			return nil, ErrAnswerTooLarge
		}
		return w.Result(), nil
	}
}

// maxAnswer bounds an answer a tool call holds: more than a model reads.
const maxAnswer = 64 << 20

// ErrAnswerTooLarge is an API answer past maxAnswer.
var ErrAnswerTooLarge = fmt.Errorf("the answer is larger than %d MiB: ask for less (a file's part, a command's output into a file)", maxAnswer>>20)

// cappedRecorder records an answer up to maxAnswer; past that its writes
// fail, which ends the handler's copy.
type cappedRecorder struct {
	*httptest.ResponseRecorder
	over bool
}

func (c *cappedRecorder) Write(b []byte) (int, error) {
	if c.over || c.Body.Len()+len(b) > maxAnswer {
		c.over = true
		return 0, ErrAnswerTooLarge
	}
	return c.ResponseRecorder.Write(b)
}

func (c *cappedRecorder) WriteString(s string) (int, error) { return c.Write([]byte(s)) }

// ClientCaller sends requests to the server at base, with token when set.
func ClientCaller(c *http.Client, base *url.URL, token string) Caller {
	return func(r *http.Request) (*http.Response, error) {
		u := *base
		u.Path = strings.TrimSuffix(base.Path, "/") + r.URL.Path
		u.RawQuery = r.URL.RawQuery
		r.URL = &u
		r.Host = u.Host
		if token != "" {
			r.Header.Set("Authorization", "Bearer "+token)
		}
		return c.Do(r)
	}
}

// maxRead bounds what read_file returns in one call: a model's context is
// the limit, not the file.
const maxRead = 1 << 20

// tool names one tool and the operation it calls.
type tool struct {
	name        string
	op          string
	title       string
	description string
	readOnly    bool
	destructive bool
	idempotent  bool
}

// tools are the tools offered (clients list them by name).
func tools() []tool {
	return []tool{
		{name: "create_sandbox", op: "createSandbox", title: "Create a sandbox",
			description: "Create a Linux sandbox (a real virtual machine) and wait until it runs. Give os (alpine, ubuntu, debian) or image (an OCI reference); memory, disk_size, network and ports are optional. Returns the sandbox, whose id the other tools take."},
		{name: "list_sandboxes", op: "listSandboxes", title: "List sandboxes", readOnly: true, idempotent: true,
			description: "List this host's sandboxes with their status, image and ports."},
		{name: "get_sandbox", op: "getSandbox", title: "Describe a sandbox", readOnly: true, idempotent: true,
			description: "Describe one sandbox: status, image, resources, ports."},
		{name: "exec", op: "execSandbox", title: "Run a command",
			description: "Run a command in a sandbox and return its exit_code, stdout and stderr. A non-zero exit code is still a result, not an error. A command past its timeout is killed and reported as an error carrying the output it wrote."},
		{name: "read_file", op: "downloadFile", title: "Read a file", readOnly: true, idempotent: true,
			description: "Read a file from a sandbox. Text comes back as it is; other content as base64 (encoding says which). At most 1 MiB is returned; truncated says when there was more."},
		{name: "write_file", op: "uploadFile", title: "Write a file", idempotent: true,
			description: "Write a file in a sandbox, creating its parent directories and replacing what was there. content is the text to write; with encoding base64 it is decoded first."},
		{name: "list_files", op: "listFiles", title: "List a directory", readOnly: true, idempotent: true,
			description: "List a directory in a sandbox: each entry's name, type, size, mode and modification time."},
		{name: "expose_port", op: "exposePort", title: "Expose a port",
			description: "Forward a host port (on 127.0.0.1 by default) to a TCP port in the sandbox, for a server running in it. Returns the host port to connect to."},
		{name: "create_snapshot", op: "createSnapshot", title: "Snapshot a sandbox",
			description: "Save a running sandbox (memory, processes and disk). Create a sandbox with snapshot set to its id or name to fork it."},
		{name: "delete_sandbox", op: "deleteSandbox", title: "Delete a sandbox", destructive: true, idempotent: true,
			description: "Stop a sandbox and delete it with its disk."},
	}
}

// New returns an MCP server whose tools call the API through call. spec is
// the API's OpenAPI document (JSON), from which the tools take their input
// schemas; version is the program's.
func New(spec []byte, call Caller, version string) (*sdk.Server, error) {
	var doc openAPI
	if err := json.Unmarshal(spec, &doc); err != nil {
		return nil, fmt.Errorf("read the OpenAPI document: %w", err)
	}
	srv := sdk.NewServer(&sdk.Implementation{Name: "smolvm", Title: "smolvm sandboxes", Version: version}, &sdk.ServerOptions{
		Instructions: "smolvm runs commands in isolated Linux sandboxes, each a real virtual machine. Create a sandbox, then exec commands and read or write files in it by its id; delete it when done.",
	})
	for _, t := range tools() {
		o, err := doc.operation(t.op)
		if err != nil {
			return nil, err
		}
		schema, err := doc.inputSchema(o, t)
		if err != nil {
			return nil, fmt.Errorf("tool %s: %w", t.name, err)
		}
		destructive := t.destructive
		srv.AddTool(&sdk.Tool{
			Name:        t.name,
			Title:       t.title,
			Description: t.description,
			InputSchema: schema,
			Annotations: &sdk.ToolAnnotations{
				Title:           t.title,
				ReadOnlyHint:    t.readOnly,
				DestructiveHint: &destructive,
				IdempotentHint:  t.idempotent,
			},
		}, handler(t, o, call))
	}
	return srv, nil
}

func handler(t tool, o *operation, call Caller) sdk.ToolHandler {
	return func(ctx context.Context, req *sdk.CallToolRequest) (*sdk.CallToolResult, error) {
		args := map[string]json.RawMessage{}
		if raw := req.Params.Arguments; len(raw) > 0 && string(raw) != "null" {
			if err := json.Unmarshal(raw, &args); err != nil {
				return failure(fmt.Sprintf("the arguments are not a JSON object: %v", err)), nil
			}
		}
		r, err := o.request(ctx, t, args)
		if err != nil {
			return failure(err.Error()), nil
		}
		resp, err := call(r)
		if errors.Is(err, ErrAnswerTooLarge) {
			return failure(err.Error()), nil
		}
		if err != nil {
			return failure(fmt.Sprintf("the smolvm server did not answer: %v", err)), nil
		}
		defer resp.Body.Close()
		return result(t, resp)
	}
}

// request builds the HTTP request for a call: path parameters into the
// path, query parameters into the query, the rest into the body.
func (o *operation) request(ctx context.Context, t tool, args map[string]json.RawMessage) (*http.Request, error) {
	p := o.path
	q := url.Values{}
	body := map[string]json.RawMessage{}
	for k, v := range args {
		body[k] = v
	}
	header := http.Header{}
	for _, prm := range o.params {
		v, ok := args[prm.Name]
		delete(body, prm.Name)
		if !ok {
			continue
		}
		vals, err := paramValues(v)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", prm.Name, err)
		}
		switch prm.In {
		case "path":
			if len(vals) != 1 || vals[0] == "" {
				return nil, fmt.Errorf("%s must be one non-empty value", prm.Name)
			}
			p = strings.ReplaceAll(p, "{"+prm.Name+"}", url.PathEscape(vals[0]))
		case "query":
			q[prm.Name] = vals
		case "header":
			header[http.CanonicalHeaderKey(prm.Name)] = vals
		}
	}
	if _, rest, found := strings.Cut(p, "{"); found {
		name, _, _ := strings.Cut(rest, "}")
		return nil, fmt.Errorf("missing argument %q", name)
	}
	if t.name == "write_file" || !o.hasBody {
		// With no JSON body to carry them (where the API would refuse
		// unknown fields), arguments left over are mistakes to report,
		// not to drop.
		for k := range body {
			if t.name == "write_file" && (k == "content" || k == "encoding") {
				continue
			}
			return nil, fmt.Errorf("unknown argument %q", k)
		}
	}
	var rd io.Reader
	switch {
	case t.name == "write_file":
		data, err := writeContent(body)
		if err != nil {
			return nil, err
		}
		rd = bytes.NewReader(data)
		header.Set("Content-Type", "application/octet-stream")
	case t.name == "read_file":
		// A path ending in / downloads a directory as tar, whole: not
		// something to read into a model's context.
		if p, _ := q["path"]; len(p) == 1 && strings.HasSuffix(p[0], "/") {
			return nil, fmt.Errorf("path %q is a directory: list it with list_files, and read its files one by one", p[0])
		}
		header.Set("Range", "bytes=0-"+strconv.Itoa(maxRead-1))
	case o.hasBody:
		b, err := json.Marshal(body)
		if err != nil {
			return nil, fmt.Errorf("encode the request body: %w", err)
		}
		rd = bytes.NewReader(b)
		header.Set("Content-Type", "application/json")
	}
	u := &url.URL{Path: p, RawQuery: q.Encode()}
	r, err := http.NewRequestWithContext(ctx, o.method, u.String(), rd)
	if err != nil {
		return nil, fmt.Errorf("build the request: %w", err)
	}
	for k, v := range header {
		r.Header[k] = v
	}
	r.Host = "localhost"
	return r, nil
}

// paramValues turns a JSON argument into query or path values: a string,
// number or boolean is one value, an array of them several.
func paramValues(v json.RawMessage) ([]string, error) {
	var list []json.RawMessage
	if err := json.Unmarshal(v, &list); err != nil {
		list = []json.RawMessage{v}
	}
	out := make([]string, 0, len(list))
	for _, item := range list {
		var s string
		if err := json.Unmarshal(item, &s); err == nil {
			out = append(out, s)
			continue
		}
		var x any
		if err := json.Unmarshal(item, &x); err != nil {
			return nil, fmt.Errorf("not JSON: %w", err)
		}
		switch x.(type) {
		case float64, bool:
			out = append(out, string(bytes.TrimSpace(item)))
		default:
			return nil, fmt.Errorf("must be a string, number or boolean, or an array of them")
		}
	}
	return out, nil
}

// writeContent decodes write_file's content argument.
func writeContent(body map[string]json.RawMessage) ([]byte, error) {
	var content, encoding string
	raw, ok := body["content"]
	if !ok {
		return nil, fmt.Errorf("content is required: the text to write")
	}
	if err := json.Unmarshal(raw, &content); err != nil {
		return nil, fmt.Errorf("content must be a string")
	}
	if e, ok := body["encoding"]; ok {
		if err := json.Unmarshal(e, &encoding); err != nil {
			return nil, fmt.Errorf("encoding must be a string")
		}
	}
	switch encoding {
	case "", "utf-8":
		return []byte(content), nil
	case "base64":
		b, err := base64.StdEncoding.DecodeString(content)
		if err != nil {
			return nil, fmt.Errorf("content is not base64: %w", err)
		}
		return b, nil
	}
	return nil, fmt.Errorf("encoding must be utf-8 or base64, not %q", encoding)
}

// result turns an API response into a tool result: a problem is a tool
// error carrying its text; success carries the JSON answer both as text
// and as structured content.
func result(t tool, resp *http.Response) (*sdk.CallToolResult, error) {
	b, err := io.ReadAll(io.LimitReader(resp.Body, maxAnswer+1))
	if err != nil {
		return failure(fmt.Sprintf("read the answer: %v", err)), nil
	}
	if len(b) > maxAnswer {
		return failure(ErrAnswerTooLarge.Error()), nil
	}
	if resp.StatusCode >= 300 {
		return problem(resp.StatusCode, b), nil
	}
	if t.name == "read_file" {
		return fileResult(resp, b), nil
	}
	if len(bytes.TrimSpace(b)) == 0 {
		return &sdk.CallToolResult{Content: []sdk.Content{&sdk.TextContent{Text: "done"}}}, nil
	}
	res := &sdk.CallToolResult{Content: []sdk.Content{&sdk.TextContent{Text: string(b)}}}
	var obj map[string]any
	if json.Unmarshal(b, &obj) == nil {
		res.StructuredContent = obj
	}
	return res, nil
}

func fileResult(resp *http.Response, b []byte) *sdk.CallToolResult {
	out := map[string]any{"size": len(b), "truncated": false}
	if cr := resp.Header.Get("Content-Range"); cr != "" {
		// "bytes 0-N/TOTAL": more than was sent exists when TOTAL is larger.
		if i := strings.LastIndexByte(cr, '/'); i >= 0 {
			if total, err := strconv.ParseInt(cr[i+1:], 10, 64); err == nil {
				out["size"] = total
				out["truncated"] = total > int64(len(b))
			}
		}
	}
	if len(b) > maxRead {
		b = b[:maxRead]
	}
	if utf8.Valid(b) {
		out["encoding"], out["content"] = "utf-8", string(b)
	} else {
		out["encoding"], out["content"] = "base64", base64.StdEncoding.EncodeToString(b)
	}
	text := out["content"].(string)
	if out["encoding"] == "base64" || out["truncated"] == true {
		j, _ := json.Marshal(out)
		text = string(j)
	}
	return &sdk.CallToolResult{Content: []sdk.Content{&sdk.TextContent{Text: text}}, StructuredContent: out}
}

// problem reports an API error (RFC 9457 problem details) as a tool error:
// the model reads the text, a program the structured copy.
func problem(status int, b []byte) *sdk.CallToolResult {
	var p struct {
		Title  string `json:"title"`
		Detail string `json:"detail"`
		Code   string `json:"code"`
		Field  string `json:"field"`
	}
	text := strings.TrimSpace(string(b))
	if json.Unmarshal(b, &p) == nil && (p.Detail != "" || p.Code != "") {
		line := fmt.Sprintf("%d %s: %s", status, p.Code, p.Detail)
		if p.Field != "" {
			line += " (field " + p.Field + ")"
		}
		// The whole problem follows: some carry more (a timed-out
		// command's output).
		text = line + "\n" + text
	}
	res := &sdk.CallToolResult{IsError: true, Content: []sdk.Content{&sdk.TextContent{Text: text}}}
	var obj map[string]any
	if json.Unmarshal(b, &obj) == nil {
		res.StructuredContent = obj
	}
	return res
}

func failure(msg string) *sdk.CallToolResult {
	return &sdk.CallToolResult{IsError: true, Content: []sdk.Content{&sdk.TextContent{Text: msg}}}
}

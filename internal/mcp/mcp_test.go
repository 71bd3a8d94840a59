package mcp_test

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"
	"time"

	sdk "github.com/modelcontextprotocol/go-sdk/mcp"

	"github.com/smolvm/smolvm/internal/api"
	"github.com/smolvm/smolvm/internal/sandbox"
	"github.com/smolvm/smolvm/internal/testenv"
)

// bearer adds the server's token to every request of the MCP client.
type bearer struct {
	token string
	next  http.RoundTripper
}

func (b bearer) RoundTrip(r *http.Request) (*http.Response, error) {
	r = r.Clone(r.Context())
	r.Header.Set("Authorization", "Bearer "+b.token)
	return b.next.RoundTrip(r)
}

// serve serves m's API, with the token "sekrit", on a loopback port.
func serve(t *testing.T, m *sandbox.Manager) *httptest.Server {
	srv := httptest.NewUnstartedServer(nil)
	srv.Config.Handler = api.New(m, api.Options{Addr: srv.Listener.Addr().String(), Token: "sekrit"})
	srv.Start()
	t.Cleanup(srv.Close)
	return srv
}

// session connects the SDK's own client to the server's /mcp.
func session(t *testing.T, ctx context.Context, base, token string) *sdk.ClientSession {
	t.Helper()
	client := sdk.NewClient(&sdk.Implementation{Name: "smolvm-test", Version: "1"}, nil)
	cs, err := client.Connect(ctx, &sdk.StreamableClientTransport{
		Endpoint:             base + "/mcp",
		HTTPClient:           &http.Client{Transport: bearer{token, http.DefaultTransport}},
		DisableStandaloneSSE: true,
		MaxRetries:           -1,
	}, nil)
	if err != nil {
		t.Fatalf("connect to %s/mcp: %v", base, err)
	}
	t.Cleanup(func() { cs.Close() })
	return cs
}

// call calls a tool and returns its result, failing on a protocol error.
func call(t *testing.T, ctx context.Context, cs *sdk.ClientSession, name string, args map[string]any) *sdk.CallToolResult {
	t.Helper()
	res, err := cs.CallTool(ctx, &sdk.CallToolParams{Name: name, Arguments: args})
	if err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	return res
}

func text(res *sdk.CallToolResult) string {
	var b strings.Builder
	for _, c := range res.Content {
		if tc, ok := c.(*sdk.TextContent); ok {
			b.WriteString(tc.Text)
		}
	}
	return b.String()
}

// ok calls a tool that must succeed and decodes its structured answer.
func ok(t *testing.T, ctx context.Context, cs *sdk.ClientSession, name string, args map[string]any, out any) {
	t.Helper()
	res := call(t, ctx, cs, name, args)
	if res.IsError {
		t.Fatalf("%s %v: tool error: %s", name, args, text(res))
	}
	b, err := json.Marshal(res.StructuredContent)
	if err != nil {
		t.Fatal(err)
	}
	if out != nil {
		if err := json.Unmarshal(b, out); err != nil {
			t.Fatalf("%s: decode %s: %v", name, b, err)
		}
	}
}

// failsWith calls a tool that must fail and checks its text names code.
func failsWith(t *testing.T, ctx context.Context, cs *sdk.ClientSession, name string, args map[string]any, code string) {
	t.Helper()
	res := call(t, ctx, cs, name, args)
	if !res.IsError || !strings.Contains(text(res), code) {
		t.Fatalf("%s %v: want a tool error naming %s, got error=%v %q", name, args, code, res.IsError, text(res))
	}
}

func TestToolsMatchTheAPI(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	m := testenv.Manager(t)
	srv := serve(t, m)

	cs := session(t, ctx, srv.URL, "sekrit")
	var names []string
	schemas := map[string]map[string]any{}
	for tool, err := range cs.Tools(ctx, nil) {
		if err != nil {
			t.Fatal(err)
		}
		names = append(names, tool.Name)
		s, _ := tool.InputSchema.(map[string]any)
		schemas[tool.Name] = s
	}
	want := []string{"create_sandbox", "create_snapshot", "delete_sandbox", "exec", "expose_port", "get_sandbox", "list_files", "list_sandboxes", "read_file", "write_file"}
	if slices.Sort(names); !slices.Equal(names, want) {
		t.Fatalf("tools %v, want %v", names, want)
	}

	// Each tool's properties are its operation's parameters and body
	// properties, with the document's own descriptions and limits.
	doc, err := api.OpenAPIDocument()
	if err != nil {
		t.Fatal(err)
	}
	var spec struct {
		Components struct {
			Schemas map[string]map[string]any `json:"schemas"`
		} `json:"components"`
	}
	if err := json.Unmarshal(doc, &spec); err != nil {
		t.Fatal(err)
	}
	for tool, body := range map[string]string{"create_sandbox": "CreateSandboxRequest", "exec": "ExecRequest", "expose_port": "PortSpec", "create_snapshot": "SnapshotRequest"} {
		props := schemas[tool]["properties"].(map[string]any)
		for name, p := range spec.Components.Schemas[body]["properties"].(map[string]any) {
			got, _ := json.Marshal(props[name])
			wantJSON, _ := json.Marshal(p)
			if strings.Contains(string(wantJSON), "$ref") {
				// Inlined in the tool; present is what matters.
				if props[name] == nil {
					t.Errorf("%s: property %s missing", tool, name)
				}
				continue
			}
			if string(got) != string(wantJSON) {
				t.Errorf("%s.%s = %s, want the API's %s", tool, name, got, wantJSON)
			}
		}
		if len(props) != len(spec.Components.Schemas[body]["properties"].(map[string]any))+boolInt(tool != "create_sandbox") {
			t.Errorf("%s has properties %v", tool, keys(props))
		}
	}
	if r := schemas["exec"]["required"]; !slices.Contains(toStrings(r), "id") {
		t.Errorf("exec requires %v, want id among them", r)
	}
	if r := toStrings(schemas["write_file"]["required"]); !slices.Equal(r, []string{"content", "id", "path"}) {
		t.Errorf("write_file requires %v", r)
	}
	if strings.Contains(mustJSON(t, schemas), "$ref") {
		t.Error("a tool schema still refers to components; MCP clients need them inline")
	}

	// Bad input is the API's own 4xx, as a tool error, and leaves nothing.
	failsWith(t, ctx, cs, "get_sandbox", map[string]any{"id": "vm-00000000"}, "404 sandbox_not_found")
	failsWith(t, ctx, cs, "create_sandbox", map[string]any{"memory": 1}, "422")
	failsWith(t, ctx, cs, "create_sandbox", map[string]any{"no_such_field": 1}, "422")
	failsWith(t, ctx, cs, "exec", map[string]any{"command": "true"}, `missing argument "id"`)
	failsWith(t, ctx, cs, "get_sandbox", map[string]any{"id": "vm-00000000", "verbose": true}, `unknown argument "verbose"`)
	failsWith(t, ctx, cs, "write_file", map[string]any{"id": "vm-00000000", "path": "/x", "content": "", "mode": "0644", "append": true}, `unknown argument "append"`)
	failsWith(t, ctx, cs, "write_file", map[string]any{"id": "vm-00000000", "path": "/x"}, "content is required")
	failsWith(t, ctx, cs, "write_file", map[string]any{"id": "vm-00000000", "path": "/x", "content": "!", "encoding": "base64"}, "not base64")
	var list struct {
		Sandboxes []any `json:"sandboxes"`
	}
	ok(t, ctx, cs, "list_sandboxes", nil, &list)
	if len(list.Sandboxes) != 0 {
		t.Errorf("failed calls left sandboxes: %v", list.Sandboxes)
	}

	// /mcp sits behind the same guard as every other route.
	for _, c := range []struct {
		header map[string]string
		status int
	}{
		{nil, http.StatusUnauthorized},
		{map[string]string{"Authorization": "Bearer sekrit", "Origin": "http://evil.example"}, http.StatusForbidden},
	} {
		req, _ := http.NewRequestWithContext(ctx, http.MethodPost, srv.URL+"/mcp", strings.NewReader(`{"jsonrpc":"2.0","id":1,"method":"tools/list"}`))
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("Accept", "application/json, text/event-stream")
		for k, v := range c.header {
			req.Header.Set(k, v)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != c.status {
			t.Errorf("POST /mcp with %v: %s, want %d", c.header, resp.Status, c.status)
		}
	}
}

// TestAgentWorkflow is what an AI agent does through MCP, on a real VM:
// create a sandbox, write a Python program, run it, read the file it wrote,
// and delete the sandbox.
func TestAgentWorkflow(t *testing.T) {
	testenv.Require(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	m := testenv.Manager(t)
	srv := serve(t, m)
	cs := session(t, ctx, srv.URL, "sekrit")

	var sb struct {
		ID     string `json:"id"`
		Status string `json:"status"`
	}
	ok(t, ctx, cs, "create_sandbox", map[string]any{"memory": 256}, &sb)
	if sb.ID == "" || sb.Status != "running" {
		t.Fatalf("created %+v, want a running sandbox", sb)
	}

	prog := "import os, sys\nwith open('result.txt', 'w') as f:\n    f.write('hello from ' + os.environ['WHO'] + ' in ' + os.getcwd() + '\\n')\nprint('wrote', file=sys.stderr)\n"
	ok(t, ctx, cs, "write_file", map[string]any{"id": sb.ID, "path": "/srv/app/main.py", "content": prog}, nil)
	var run struct {
		ExitCode int    `json:"exit_code"`
		Stdout   string `json:"stdout"`
		Stderr   string `json:"stderr"`
	}
	ok(t, ctx, cs, "exec", map[string]any{"id": sb.ID, "command": "python3 main.py", "cwd": "/srv/app", "env": map[string]any{"WHO": "mcp"}, "timeout": 60}, &run)
	if run.ExitCode != 0 || run.Stderr != "wrote\n" {
		t.Fatalf("python3 main.py: %+v", run)
	}
	var file struct {
		Content   string `json:"content"`
		Encoding  string `json:"encoding"`
		Truncated bool   `json:"truncated"`
	}
	ok(t, ctx, cs, "read_file", map[string]any{"id": sb.ID, "path": "/srv/app/result.txt"}, &file)
	if file.Content != "hello from mcp in /srv/app\n" || file.Encoding != "utf-8" || file.Truncated {
		t.Fatalf("read_file: %+v", file)
	}
	if res := call(t, ctx, cs, "read_file", map[string]any{"id": sb.ID, "path": "/srv/app/result.txt"}); text(res) != file.Content {
		t.Errorf("read_file's text is %q, want the file itself", text(res))
	}

	// A non-zero exit is a result; a timeout is an error that carries the
	// output; binary content comes back as base64.
	ok(t, ctx, cs, "exec", map[string]any{"id": sb.ID, "command": "echo no >&2; exit 3"}, &run)
	if run.ExitCode != 3 || run.Stderr != "no\n" {
		t.Errorf("exit 3: %+v", run)
	}
	failsWith(t, ctx, cs, "exec", map[string]any{"id": sb.ID, "command": "echo started; sleep 30", "timeout": 1}, "408 command_timeout")
	ok(t, ctx, cs, "write_file", map[string]any{"id": sb.ID, "path": "/tmp/bin", "content": "AP8Q", "encoding": "base64"}, nil)
	ok(t, ctx, cs, "read_file", map[string]any{"id": sb.ID, "path": "/tmp/bin"}, &file)
	if file.Encoding != "base64" || file.Content != "AP8Q" {
		t.Errorf("binary read_file: %+v", file)
	}
	failsWith(t, ctx, cs, "read_file", map[string]any{"id": sb.ID, "path": "/usr/"}, "is a directory")
	ok(t, ctx, cs, "write_file", map[string]any{"id": sb.ID, "path": "/tmp/empty", "content": ""}, nil)
	ok(t, ctx, cs, "read_file", map[string]any{"id": sb.ID, "path": "/tmp/empty"}, &file)
	if file.Content != "" || file.Truncated {
		t.Errorf("empty read_file: %+v", file)
	}
	var dir struct {
		Entries []struct {
			Name string `json:"name"`
		} `json:"entries"`
	}
	ok(t, ctx, cs, "list_files", map[string]any{"id": sb.ID, "path": "/srv/app"}, &dir)
	var got []string
	for _, e := range dir.Entries {
		got = append(got, e.Name)
	}
	if slices.Sort(got); !slices.Equal(got, []string{"main.py", "result.txt"}) {
		t.Errorf("list_files /srv/app: %v", got)
	}

	var port struct {
		Guest int `json:"guest"`
		Host  int `json:"host"`
	}
	ok(t, ctx, cs, "expose_port", map[string]any{"id": sb.ID, "guest": 8080}, &port)
	if port.Guest != 8080 || port.Host <= 0 {
		t.Errorf("expose_port: %+v", port)
	}
	var snap struct {
		ID   string `json:"id"`
		Name string `json:"name"`
	}
	ok(t, ctx, cs, "create_snapshot", map[string]any{"id": sb.ID, "name": "mcp-done"}, &snap)
	if snap.ID == "" || snap.Name != "mcp-done" {
		t.Errorf("create_snapshot: %+v", snap)
	}

	ok(t, ctx, cs, "delete_sandbox", map[string]any{"id": sb.ID}, nil)
	failsWith(t, ctx, cs, "get_sandbox", map[string]any{"id": sb.ID}, "404 sandbox_not_found")
	if err := m.DeleteSnapshot(ctx, snap.ID, false); err != nil {
		t.Errorf("delete the snapshot: %v", err)
	}
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}

func keys(m map[string]any) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

func toStrings(v any) []string {
	var out []string
	switch x := v.(type) {
	case []any:
		for _, e := range x {
			if s, ok := e.(string); ok {
				out = append(out, s)
			}
		}
	case []string:
		out = x
	}
	return out
}

func mustJSON(t *testing.T, v any) string {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

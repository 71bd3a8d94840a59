package main

import (
	"context"
	"encoding/json"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	sdk "github.com/modelcontextprotocol/go-sdk/mcp"

	"github.com/smolvm/smolvm/internal/api"
	"github.com/smolvm/smolvm/internal/testenv"
)

// mcpSession starts `smolvm mcp` as an MCP client would, over its stdin and
// stdout.
func (c *cli) mcpSession(ctx context.Context, args ...string) *sdk.ClientSession {
	c.t.Helper()
	client := sdk.NewClient(&sdk.Implementation{Name: "smolvm-test", Version: "1"}, nil)
	cs, err := client.Connect(ctx, &sdk.CommandTransport{Command: c.cmd(append([]string{"mcp"}, args...)...)}, nil)
	if err != nil {
		c.t.Fatalf("start smolvm mcp %v: %v", args, err)
	}
	c.t.Cleanup(func() { cs.Close() })
	return cs
}

func toolText(t *testing.T, ctx context.Context, cs *sdk.ClientSession, name string, args map[string]any) (string, bool) {
	t.Helper()
	res, err := cs.CallTool(ctx, &sdk.CallToolParams{Name: name, Arguments: args})
	if err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	var b strings.Builder
	for _, ct := range res.Content {
		if tc, ok := ct.(*sdk.TextContent); ok {
			b.WriteString(tc.Text)
		}
	}
	return b.String(), res.IsError
}

func TestMCPStdio(t *testing.T) {
	t.Parallel()
	c := newCLI(t)
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()

	// On the data directory itself: a real VM, started and used by the
	// mcp process.
	cs := c.mcpSession(ctx)
	out, isErr := toolText(t, ctx, cs, "create_sandbox", map[string]any{"memory": 256, "labels": map[string]any{"via": "mcp"}})
	if isErr {
		t.Fatalf("create_sandbox: %s", out)
	}
	id := jsonField(t, out, "id")
	out, isErr = toolText(t, ctx, cs, "exec", map[string]any{"id": id, "argv": []any{"uname", "-s"}})
	if isErr || jsonField(t, out, "stdout") != "Linux\n" {
		t.Fatalf("exec uname: error=%v %s", isErr, out)
	}
	// The CLI, a second door to the same data directory, sees it.
	if list, _, code := c.run("sandbox", "list", "--json"); code != 0 || !strings.Contains(list, id) {
		t.Fatalf("sandbox list after create through mcp: exit %d: %s", code, list)
	}
	if out, isErr = toolText(t, ctx, cs, "delete_sandbox", map[string]any{"id": id}); isErr {
		t.Fatalf("delete_sandbox: %s", out)
	}
	if out, isErr = toolText(t, ctx, cs, "get_sandbox", map[string]any{"id": id}); !isErr || !strings.Contains(out, "404 sandbox_not_found") {
		t.Fatalf("get_sandbox after delete: error=%v %s", isErr, out)
	}
	cs.Close()

	// Through a running server (--url): the tools come from its document
	// and the calls carry the token.
	m := testenv.Manager(t)
	srv := httptest.NewUnstartedServer(nil)
	srv.Config.Handler = api.New(m, api.Options{Addr: srv.Listener.Addr().String(), Token: "sekrit"})
	srv.Start()
	defer srv.Close()
	remote := c.mcpSession(ctx, "--url", srv.URL, "--token", "sekrit")
	if out, isErr = toolText(t, ctx, remote, "list_sandboxes", nil); isErr || !strings.Contains(out, `"sandboxes"`) {
		t.Fatalf("list_sandboxes through --url: error=%v %s", isErr, out)
	}
	if out, isErr = toolText(t, ctx, remote, "exec", map[string]any{"id": "vm-00000000", "command": "true"}); !isErr || !strings.Contains(out, "404 sandbox_not_found") {
		t.Fatalf("exec on no sandbox through --url: error=%v %s", isErr, out)
	}
	bad := c.mcpSession(ctx, "--url", srv.URL, "--token", "wrong")
	if out, isErr = toolText(t, ctx, bad, "list_sandboxes", nil); !isErr || !strings.Contains(out, "401 unauthorized") {
		t.Fatalf("list_sandboxes with a wrong token: error=%v %s", isErr, out)
	}
}

// jsonField is one string field of a JSON object.
func jsonField(t *testing.T, doc, name string) string {
	t.Helper()
	var m map[string]any
	if err := json.Unmarshal([]byte(doc), &m); err != nil {
		t.Fatalf("not a JSON object: %v: %s", err, doc)
	}
	s, _ := m[name].(string)
	return s
}

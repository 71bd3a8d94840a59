package main

import (
	"fmt"
	"io"
	"net/http"

	sdk "github.com/modelcontextprotocol/go-sdk/mcp"
	"github.com/spf13/cobra"

	"github.com/smolvm/smolvm/internal/api"
	"github.com/smolvm/smolvm/internal/mcp"
	"github.com/smolvm/smolvm/internal/sandbox"
)

func newMCPCmd() *cobra.Command {
	var url, token string
	cmd := &cobra.Command{
		Use:   "mcp",
		Short: "Serve sandboxes as MCP tools on stdin and stdout",
		Long: `Serve the sandbox tools over the Model Context Protocol on stdin and stdout,
for an MCP client (a desktop assistant, an agent framework) that starts
this command itself: create_sandbox, list_sandboxes, get_sandbox, exec,
read_file, write_file, list_files, expose_port, create_snapshot and
delete_sandbox. Each takes the parameters of the HTTP API operation it
calls, with the same defaults and errors.

Like the sandbox commands, it talks to the server at --url (or $SMOLVM_URL),
else to the server running on the data directory, else it opens the data
directory itself. A running server offers the same tools at /mcp
(streamable HTTP).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			base, tok := serverTarget(cmd, url, token)
			var srv *sdk.Server
			if base != "" {
				c, err := newHTTPSandboxClient(base, tok)
				if err != nil {
					return err
				}
				spec, err := fetchSpec(cmd, c)
				if err != nil {
					return err
				}
				srv, err = mcp.New(spec, mcp.ClientCaller(c.http, c.base, c.token), serverVersion())
				if err != nil {
					return fmt.Errorf("build the tools from %s/openapi.json: %w", base, err)
				}
			} else {
				d, err := setupDataDir(cmd)
				if err != nil {
					return err
				}
				// Progress goes to stderr: stdout carries the protocol.
				m, err := sandbox.Open(ctx, sandbox.Options{DataDir: d, Progress: cmd.ErrOrStderr()})
				if err != nil {
					return fmt.Errorf("open sandboxes in %s: %w", d.Path(), err)
				}
				defer m.Close()
				srv, err = api.MCPServer(m, serverVersion())
				if err != nil {
					return err
				}
			}
			if err := srv.Run(ctx, &sdk.StdioTransport{}); err != nil && ctx.Err() == nil {
				return fmt.Errorf("serve MCP on stdio: %w", err)
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&url, "url", "", "base URL of a running smolvm server (default $SMOLVM_URL, else the server on the data directory; none: use the data directory directly)")
	cmd.Flags().StringVar(&token, "token", "", "bearer token for the server (default $SMOLVM_TOKEN)")
	return cmd
}

// fetchSpec reads the server's OpenAPI document, from which the tools take
// their schemas: they then match that server exactly.
func fetchSpec(cmd *cobra.Command, c *httpSandboxClient) ([]byte, error) {
	u := *c.base
	u.Path += "/openapi.json"
	req, err := http.NewRequestWithContext(cmd.Context(), http.MethodGet, u.String(), nil)
	if err != nil {
		return nil, fmt.Errorf("build request: %w", err)
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return nil, fmt.Errorf("reach the smolvm server: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s: %s", u.String(), resp.Status)
	}
	b, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", u.String(), err)
	}
	return b, nil
}

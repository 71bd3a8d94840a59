package main

import (
	"fmt"
	"os"

	"github.com/cli/browser"
	"github.com/spf13/cobra"
)

func newUICmd() *cobra.Command {
	var c serverConfig
	var noOpen bool
	cmd := &cobra.Command{
		Use:   "ui",
		Short: "Open the web dashboard, starting a server if none runs",
		Long: `Open the web dashboard in a browser. When a server already runs on the
data directory, its dashboard opens and this command exits; otherwise this
command runs one (as "smolvm server start" would, on --host and --port)
until interrupted.

A server with a token keeps it out of the browser's command line, where
other users of this machine could read it: the page asks for it once, and
keeps it for the tab only.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			open := func(base, token string) {
				u := base + "/ui/"
				fmt.Fprintf(cmd.OutOrStdout(), "Dashboard: %s\n", u)
				if token != "" {
					fmt.Fprintln(cmd.ErrOrStderr(), "smolvm: the dashboard asks for the server's token ($SMOLVM_TOKEN, or --token when it was started)")
				}
				if noOpen {
					return
				}
				// No browser (a server over SSH) is no failure: the
				// address is printed above.
				browser.Stdout, browser.Stderr = cmd.ErrOrStderr(), cmd.ErrOrStderr()
				if err := browser.OpenURL(u); err != nil {
					fmt.Fprintf(cmd.ErrOrStderr(), "smolvm: could not open a browser (%v); open the address above\n", err)
				}
			}
			d, err := setupDataDir(cmd)
			if err != nil {
				return err
			}
			if r, ok := runningServer(d); ok {
				open(r.URL, r.Token)
				return nil
			}
			if c.token == "" {
				c.token = os.Getenv("SMOLVM_TOKEN")
			}
			c.ready = open
			return runServer(cmd, c)
		},
	}
	f := cmd.Flags()
	f.StringVar(&c.host, "host", "127.0.0.1", "address to listen on when starting a server; anything but loopback requires a token")
	f.IntVar(&c.port, "port", 8000, "TCP port to listen on when starting a server")
	f.StringVar(&c.token, "token", "", "require this bearer token on API requests when starting a server (default $SMOLVM_TOKEN)")
	f.BoolVar(&c.quiet, "quiet", false, "do not log each request to stderr")
	f.BoolVar(&noOpen, "no-open", false, "print the dashboard's address without opening a browser")
	return cmd
}

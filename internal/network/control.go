package network

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"time"
)

// The control API is plain HTTP with JSON bodies on a unix socket in the
// sandbox's directory, so only the user who owns the data directory can
// reach it; the guest never can.

type problem struct {
	Code    string `json:"code"`
	Field   string `json:"field,omitempty"`
	Message string `json:"message"`
}

// Status is what a network process reports about itself.
type Status struct {
	PID      int       `json:"pid"`
	Policy   Policy    `json:"policy"`
	Forwards []Forward `json:"forwards"`
	// Refused counts the guest's connections and UDP flows the policy
	// turned away.
	Refused int64 `json:"refused"`
}

// Handler serves the control API for n.
func (n *Network) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /status", func(w http.ResponseWriter, r *http.Request) {
		reply(w, http.StatusOK, n.status())
	})
	mux.HandleFunc("GET /forwards", func(w http.ResponseWriter, r *http.Request) {
		reply(w, http.StatusOK, n.Forwards())
	})
	mux.HandleFunc("POST /forwards", func(w http.ResponseWriter, r *http.Request) {
		var f Forward
		if err := json.NewDecoder(io.LimitReader(r.Body, 1<<16)).Decode(&f); err != nil {
			fail(w, &FieldError{Message: "bad forward: " + err.Error()})
			return
		}
		f, err := n.Expose(f)
		if err != nil {
			fail(w, err)
			return
		}
		reply(w, http.StatusOK, f)
	})
	mux.HandleFunc("DELETE /forwards/{guest}", func(w http.ResponseWriter, r *http.Request) {
		g, _ := strconv.Atoi(r.PathValue("guest"))
		f, err := n.Unexpose(g)
		if err != nil {
			fail(w, err)
			return
		}
		reply(w, http.StatusOK, f)
	})
	mux.HandleFunc("PUT /policy", func(w http.ResponseWriter, r *http.Request) {
		var p Policy
		if err := json.NewDecoder(io.LimitReader(r.Body, 1<<20)).Decode(&p); err != nil {
			fail(w, &FieldError{Field: "network", Message: "bad policy: " + err.Error()})
			return
		}
		if err := n.SetPolicy(p); err != nil {
			fail(w, err)
			return
		}
		reply(w, http.StatusOK, n.Policy())
	})
	return mux
}

func (n *Network) status() Status {
	return Status{PID: os.Getpid(), Policy: n.Policy(), Forwards: n.Forwards(), Refused: n.refused.Load()}
}

func reply(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	json.NewEncoder(w).Encode(v)
}

func fail(w http.ResponseWriter, err error) {
	var fe *FieldError
	var pe *PortError
	switch {
	case errors.As(err, &fe):
		reply(w, http.StatusUnprocessableEntity, problem{Code: "invalid", Field: fe.Field, Message: fe.Message})
	case errors.As(err, &pe):
		reply(w, http.StatusConflict, problem{Code: pe.Code.Error(), Message: pe.Message})
	default:
		reply(w, http.StatusInternalServerError, problem{Code: "internal", Message: err.Error()})
	}
}

// Client talks to one sandbox's network process.
type Client struct {
	socket string
	http   *http.Client
}

// Dial returns a client for the control socket at path. It connects on
// each call, so it stays usable across restarts of the network process.
func Dial(path string) *Client {
	return &Client{socket: path, http: &http.Client{
		Timeout: 10 * time.Second,
		Transport: &http.Transport{
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				var d net.Dialer
				return d.DialContext(ctx, "unix", path)
			},
			DisableKeepAlives: true,
		},
	}}
}

func (c *Client) do(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://network"+path, body)
	if err != nil {
		return err
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return fmt.Errorf("network process (%s): %w", c.socket, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return fmt.Errorf("network process: %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		var p problem
		if json.Unmarshal(b, &p) != nil {
			return fmt.Errorf("network process: %s: %s", resp.Status, bytes.TrimSpace(b))
		}
		if p.Code == "invalid" {
			return &FieldError{Field: p.Field, Message: p.Message}
		}
		for _, e := range []error{ErrPortInUse, ErrAlreadyExposed, ErrNotExposed, ErrBadHostAddress, ErrPortNeedsRights} {
			if e.Error() == p.Code {
				return &PortError{Code: e, Message: p.Message}
			}
		}
		return fmt.Errorf("network process: %s", p.Message)
	}
	if out != nil {
		return json.Unmarshal(b, out)
	}
	return nil
}

// Status asks the process what it runs with.
func (c *Client) Status(ctx context.Context) (Status, error) {
	var s Status
	return s, c.do(ctx, http.MethodGet, "/status", nil, &s)
}

// Expose adds a forward and returns it as in effect (with the host port
// picked, when f.Host was 0).
func (c *Client) Expose(ctx context.Context, f Forward) (Forward, error) {
	var out Forward
	return out, c.do(ctx, http.MethodPost, "/forwards", f, &out)
}

// Unexpose removes the forward of a guest port.
func (c *Client) Unexpose(ctx context.Context, guest int) (Forward, error) {
	var out Forward
	return out, c.do(ctx, http.MethodDelete, "/forwards/"+strconv.Itoa(guest), nil, &out)
}

// SetPolicy replaces the policy in force.
func (c *Client) SetPolicy(ctx context.Context, p Policy) error {
	return c.do(ctx, http.MethodPut, "/policy", p, nil)
}

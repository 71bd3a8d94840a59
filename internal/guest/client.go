// Package guest is the host side of the agent protocol: it connects to a
// sandbox's agent over whatever stream its machine's DialAgent gives,
// checks what the agent said of itself, and calls the agent API (package
// agentpb) over one HTTP/2 connection.
package guest

import (
	"bufio"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"net"
	"net/http"
	"sync/atomic"
	"time"

	"connectrpc.com/connect"
	"golang.org/x/net/http2"

	"github.com/smolvm/smolvm/internal/agent/agentpb/agentpbconnect"
	"github.com/smolvm/smolvm/internal/agent/wire"
)

// Client is one session with a guest agent. It is safe for concurrent use;
// every call runs on its own HTTP/2 stream.
type Client struct {
	conn   net.Conn
	cc     *http2.ClientConn
	peer   wire.Peer
	broken atomic.Bool

	system  agentpbconnect.SystemClient
	process agentpbconnect.ProcessClient
	files   agentpbconnect.FilesystemClient
}

// Peer is what the agent said of itself on connect.
func (c *Client) Peer() wire.Peer { return c.peer }

// VersionError is an agent speaking a protocol version this host does not
// serve: one from an older smolvm that VMs outlived, or a newer one.
type VersionError struct{ Agent int }

func (e *VersionError) Error() string {
	if e.Agent < wire.MinVersion {
		return fmt.Sprintf("the guest agent speaks protocol version %d, older than this smolvm serves (%d to %d); stop and start the sandbox to boot it with this smolvm's agent", e.Agent, wire.MinVersion, wire.Version)
	}
	return fmt.Sprintf("the guest agent speaks protocol version %d, newer than this smolvm serves (%d to %d); use the smolvm that created the sandbox, or a newer one", e.Agent, wire.MinVersion, wire.Version)
}

// Dialer opens a byte stream to a guest's agent port, as
// vmm.Machine.DialAgent does.
type Dialer func(ctx context.Context) (net.Conn, error)

// Dial connects to the agent and completes the handshake. It keeps trying
// until ctx ends, so it doubles as "wait until the guest has booted".
//
// An attempt that gets no answer reconnects rather than waiting on: when a
// previous host has only just gone, the agent's old session can swallow the
// new hello before it notices the disconnect, and only a fresh connection
// makes the agent start listening again.
func Dial(ctx context.Context, dial Dialer) (*Client, error) {
	wait := time.Second
	for {
		conn, err := dial(ctx)
		if err != nil {
			select {
			case <-ctx.Done():
				return nil, fmt.Errorf("connect to the agent: %w", err)
			case <-time.After(10 * time.Millisecond):
			}
			continue
		}
		actx, cancel := context.WithTimeout(ctx, wait)
		c, err := handshake(actx, conn)
		cancel()
		if err == nil {
			return c, nil
		}
		conn.Close()
		var ve *VersionError
		if errors.As(err, &ve) {
			return nil, err // asking again gets the same answer
		}
		if ctx.Err() != nil {
			return nil, fmt.Errorf("agent did not answer: %w", ctx.Err())
		}
		// Each try waits longer: a guest under heavy load may need
		// several seconds to answer once, and a try cut short only costs
		// it more work.
		wait = min(wait*2, 10*time.Second)
	}
}

// newTransport's limits suit an emulated guest, which can stall for
// seconds under load: a peer is given up only after a minute of silence.
func newTransport() *http2.Transport {
	return &http2.Transport{
		AllowHTTP:        true,
		ReadIdleTimeout:  15 * time.Second,
		PingTimeout:      60 * time.Second,
		WriteByteTimeout: 60 * time.Second,
		// Few large frames, as the agent's server asks too.
		MaxReadFrameSize: 1 << 20,
	}
}

func handshake(ctx context.Context, conn net.Conn) (*Client, error) {
	// A blocked read cannot see ctx; closing the deadline in is what ends it.
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Now()) })
	defer stop()
	random := make([]byte, 16)
	rand.Read(random)
	nonce := wire.NewNonce(random)
	if _, err := conn.Write(wire.HelloLine(nonce)); err != nil {
		return nil, fmt.Errorf("agent handshake: %w", err)
	}
	br := bufio.NewReaderSize(conn, 64<<10)
	peer, err := wire.AwaitReady(br, nonce)
	if err != nil {
		if ctx.Err() != nil {
			return nil, fmt.Errorf("agent did not answer: %w", ctx.Err())
		}
		return nil, fmt.Errorf("agent handshake: %w", err)
	}
	if !stop() {
		return nil, fmt.Errorf("agent did not answer: %w", ctx.Err())
	}
	conn.SetDeadline(time.Time{})
	if peer.Version < wire.MinVersion || peer.Version > wire.Version {
		return nil, &VersionError{Agent: peer.Version}
	}
	cc, err := newTransport().NewClientConn(&readerConn{Conn: conn, r: br})
	if err != nil {
		return nil, fmt.Errorf("agent session: %w", err)
	}
	c := &Client{conn: conn, cc: cc, peer: peer}
	opts := []connect.ClientOption{
		connect.WithAcceptCompression("gzip", nil, nil),
		connect.WithReadMaxBytes(wire.MaxMessage),
	}
	hc := &connClient{c: c}
	c.system = agentpbconnect.NewSystemClient(hc, baseURL, opts...)
	c.process = agentpbconnect.NewProcessClient(hc, baseURL, opts...)
	c.files = agentpbconnect.NewFilesystemClient(hc, baseURL, opts...)
	return c, nil
}

// baseURL names the agent in requests; the connection is already chosen.
const baseURL = "http://agent"

// connClient sends every request on the session's one connection.
type connClient struct{ c *Client }

func (h *connClient) Do(req *http.Request) (*http.Response, error) {
	resp, err := h.c.cc.RoundTrip(req)
	if err != nil && req.Context().Err() == nil {
		if st := h.c.cc.State(); st.Closed || st.Closing {
			h.c.broken.Store(true)
		}
	}
	return resp, err
}

// readerConn reads through the handshake's buffer so no byte after the
// ready line is lost.
type readerConn struct {
	net.Conn
	r *bufio.Reader
}

func (c *readerConn) Read(p []byte) (int, error) { return c.r.Read(p) }

// Close ends the session. Commands still running in the guest that were
// not started detached are killed.
func (c *Client) Close() error {
	c.broken.Store(true)
	err := c.cc.Close()
	if cerr := c.conn.Close(); err == nil && !errors.Is(cerr, net.ErrClosed) {
		err = cerr
	}
	return err
}

// Closed reports whether the session has ended (the VM stopped, or the
// agent restarted its side).
func (c *Client) Closed() bool {
	if c.broken.Load() {
		return true
	}
	st := c.cc.State()
	return st.Closed || st.Closing
}

// ErrSessionClosed means the connection to the agent was lost mid-request.
var ErrSessionClosed = errors.New("connection to the guest agent was lost")

// callErr turns a failed call into what the caller acts on: its own
// cancellation, a lost session, or the agent's answer as an *Error.
func (c *Client) callErr(ctx context.Context, err error) error {
	if err == nil {
		return nil
	}
	if ctx.Err() != nil {
		return ctx.Err()
	}
	var ce *connect.Error
	if errors.As(err, &ce) && ce.Code() == connect.CodeUnavailable || c.Closed() {
		c.broken.Store(true)
		return fmt.Errorf("%w: %v", ErrSessionClosed, err)
	}
	if errors.As(err, &ce) {
		return &Error{Code: codeOf(ce.Code()), Message: ce.Message()}
	}
	return fmt.Errorf("agent: %w", err)
}

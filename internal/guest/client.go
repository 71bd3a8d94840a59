// Package guest is the host side of the agent protocol: it connects to a
// sandbox's agent and runs requests over the multiplexed session.
package guest

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"time"

	"github.com/hashicorp/yamux"

	"github.com/smolvm/smolvm/internal/agent/wire"
)

// Client is one session with a guest agent. It is safe for concurrent use;
// every request runs on its own stream.
type Client struct {
	conn net.Conn
	sess *yamux.Session
	peer wire.Peer
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
		wait = min(wait*3/2, 5*time.Second)
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
	sess, err := yamux.Client(&readerConn{Conn: conn, r: br}, wire.YamuxConfig())
	if err != nil {
		return nil, fmt.Errorf("agent session: %w", err)
	}
	return &Client{conn: conn, sess: sess, peer: peer}, nil
}

// readerConn reads through the handshake's buffer so no byte after the
// ready line is lost.
type readerConn struct {
	net.Conn
	r *bufio.Reader
}

func (c *readerConn) Read(p []byte) (int, error) { return c.r.Read(p) }

// Close ends the session. Commands still running in the guest are killed.
func (c *Client) Close() error { return c.sess.Close() }

// Closed reports whether the session has ended (the VM stopped, or the
// agent restarted its side).
func (c *Client) Closed() bool { return c.sess.IsClosed() }

// ErrSessionClosed means the connection to the agent was lost mid-request.
var ErrSessionClosed = errors.New("connection to the guest agent was lost")

// Do sends req and copies output frames to stdout and stderr until the exit
// frame. Cancelling ctx closes the stream, which makes the agent kill the
// command.
func (c *Client) Do(ctx context.Context, req wire.Request, stdout, stderr io.Writer) (wire.Exit, error) {
	st, err := c.sess.OpenStream()
	if err != nil {
		return wire.Exit{}, fmt.Errorf("%w: %v", ErrSessionClosed, err)
	}
	defer st.Close()
	stop := context.AfterFunc(ctx, func() { st.Close() })
	defer stop()
	line, err := json.Marshal(req)
	if err != nil {
		return wire.Exit{}, err
	}
	if _, err := st.Write(append(line, '\n')); err != nil {
		return wire.Exit{}, c.streamErr(ctx, err)
	}
	br := bufio.NewReaderSize(st, 64<<10)
	buf := make([]byte, 64<<10)
	for {
		typ, p, err := wire.ReadFrame(br, buf)
		if err != nil {
			return wire.Exit{}, c.streamErr(ctx, err)
		}
		switch typ {
		case wire.FrameStdout:
			if stdout != nil {
				if _, err := stdout.Write(p); err != nil {
					return wire.Exit{}, fmt.Errorf("write stdout: %w", err)
				}
			}
		case wire.FrameStderr:
			if stderr != nil {
				if _, err := stderr.Write(p); err != nil {
					return wire.Exit{}, fmt.Errorf("write stderr: %w", err)
				}
			}
		case wire.FrameExit:
			var e wire.Exit
			if err := json.Unmarshal(p, &e); err != nil {
				return wire.Exit{}, fmt.Errorf("agent sent a bad exit frame: %w", err)
			}
			if e.Error != "" {
				return e, fmt.Errorf("agent: %s", e.Error)
			}
			return e, nil
		default:
			return wire.Exit{}, fmt.Errorf("agent sent unknown frame type %d", typ)
		}
	}
}

func (c *Client) streamErr(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return ctx.Err()
	}
	if c.sess.IsClosed() {
		return fmt.Errorf("%w: %v", ErrSessionClosed, err)
	}
	return fmt.Errorf("agent stream: %w", err)
}

// Ping asks the agent for facts about the guest; it is also the cheapest
// round trip.
func (c *Client) Ping(ctx context.Context) (*wire.Info, error) {
	e, err := c.Do(ctx, wire.Request{Op: wire.OpPing}, nil, nil)
	if err != nil {
		return nil, err
	}
	return e.Info, nil
}

// Shutdown asks the guest to sync its disks and power off.
func (c *Client) Shutdown(ctx context.Context) error {
	_, err := c.Do(ctx, wire.Request{Op: wire.OpShutdown}, nil, nil)
	return err
}

// Identity gives the guest its own name, machine id, clock, random state
// and disk size.
func (c *Client) Identity(ctx context.Context, id wire.Identity) (*wire.Info, error) {
	e, err := c.Do(ctx, wire.Request{Op: wire.OpIdentity, Identity: &id}, nil, nil)
	if err != nil {
		return nil, err
	}
	return e.Info, nil
}

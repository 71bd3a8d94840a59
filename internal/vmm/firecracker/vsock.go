package firecracker

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"time"
)

// Firecracker's vsock device is "hybrid": the host end is a Unix socket
// (uds_path). A host-initiated connection connects to it, writes
// "CONNECT <port>\n" and reads "OK <host port>\n"; from the next byte the
// stream is the guest's port. While the guest has no listener on the
// port (it is still booting), Firecracker closes the connection instead.

// maxAckLine bounds the "OK <port>\n" line: a port is at most 10 digits.
const maxAckLine = 32

// ackTimeout bounds the wait for the answer to a CONNECT, when the caller
// gives a longer deadline: a guest that is up answers at once.
const ackTimeout = 2 * time.Second

// retryEvery is the pause between tries while the guest does not listen.
const retryEvery = 20 * time.Millisecond

// errNotListening means Firecracker closed the connection without an
// answer: nothing in the guest listens on the port yet.
var errNotListening = errors.New("the guest does not listen on the port yet")

// dialVsock connects to port in the guest behind Firecracker's vsock
// socket at path, trying again while the guest is not listening (or the
// socket is not there yet) until ctx ends. An answer that is not
// Firecracker's ends it at once: trying again would not change it.
func dialVsock(ctx context.Context, path string, port uint32) (net.Conn, error) {
	var last error
	for {
		c, err := tryVsock(ctx, path, port)
		if err == nil {
			return c, nil
		}
		var bad *badAnswerError
		if errors.As(err, &bad) {
			return nil, err
		}
		// A try the deadline cut short says only that time ran out;
		// the one before it says why the guest did not answer. The
		// deadline can end a dial a moment before ctx says so.
		if last == nil || !expired(ctx) {
			last = err
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("vsock %s port %d: %w (last try: %v)", path, port, ctx.Err(), last)
		case <-time.After(retryEvery):
		}
	}
}

// expired reports whether ctx has ended or its deadline has passed.
func expired(ctx context.Context) bool {
	dl, ok := ctx.Deadline()
	return ctx.Err() != nil || ok && !time.Now().Before(dl)
}

// badAnswerError is an answer to CONNECT that is not "OK <port>".
type badAnswerError struct {
	path string
	line string
}

func (e *badAnswerError) Error() string {
	return fmt.Sprintf("vsock %s: answer %q to CONNECT is not Firecracker's \"OK <port>\"", e.path, e.line)
}

func tryVsock(ctx context.Context, path string, port uint32) (net.Conn, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, err
	}
	deadline := time.Now().Add(ackTimeout)
	if dl, ok := ctx.Deadline(); ok && dl.Before(deadline) {
		deadline = dl
	}
	c.SetDeadline(deadline)
	// One write: Firecracker reads the command as soon as the socket is
	// readable and takes a short read for a malformed one.
	if _, err := c.Write([]byte("CONNECT " + strconv.FormatUint(uint64(port), 10) + "\n")); err != nil {
		c.Close()
		return nil, err
	}
	// Byte by byte, so that nothing past the line (the guest's first
	// bytes) is consumed here.
	var line []byte
	b := make([]byte, 1)
	for {
		n, err := c.Read(b)
		if n == 1 {
			if b[0] == '\n' {
				break
			}
			line = append(line, b[0])
			if len(line) > maxAckLine {
				c.Close()
				return nil, &badAnswerError{path: path, line: string(line)}
			}
			continue
		}
		c.Close()
		if errors.Is(err, io.EOF) && len(line) == 0 {
			return nil, errNotListening
		}
		if len(line) > 0 && !strings.HasPrefix("OK ", string(line[:min(len(line), 3)])) {
			return nil, &badAnswerError{path: path, line: string(line)}
		}
		return nil, fmt.Errorf("read the answer to CONNECT: %w", err)
	}
	hostPort, found := strings.CutPrefix(string(line), "OK ")
	if _, err := strconv.ParseUint(hostPort, 10, 32); !found || err != nil {
		c.Close()
		return nil, &badAnswerError{path: path, line: string(line)}
	}
	c.SetDeadline(time.Time{})
	return c, nil
}

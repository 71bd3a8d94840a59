package agent

import (
	"bytes"
	"errors"
	"net"
)

// http2Preface is what a client sends first on an HTTP/2 connection.
const http2Preface = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

// errNotHTTP2 ends a session whose input stopped being HTTP/2.
var errNotHTTP2 = errors.New("the host's input is not HTTP/2 (a new host's hello)")

// frameGuard follows the HTTP/2 frame boundaries of what a session reads
// and fails the read where something that is not a frame arrives. That is
// what a VM restored from a snapshot sees: its session was live when it was
// saved, and the next host's first bytes are a hello line. The HTTP/2
// server would refuse it too, but only after a second's grace for its
// GOAWAY to be read, which every restore would pay; failing the read ends
// the session at once, and the hello is replayed to the next one.
type frameGuard struct {
	net.Conn
	max      int // the largest frame payload the server accepts
	preface  int // preface bytes checked so far
	hdr      [9]byte
	hdrN     int
	skip     int // payload bytes of the current frame still to come
	poisoned bool
}

func (g *frameGuard) Read(p []byte) (int, error) {
	if g.poisoned {
		return 0, errNotHTTP2
	}
	n, err := g.Conn.Read(p)
	if n > 0 && !g.check(p[:n]) {
		g.poisoned = true
		return 0, errNotHTTP2
	}
	return n, err
}

// check consumes b and reports whether it is still a valid frame stream.
func (g *frameGuard) check(b []byte) bool {
	if g.preface < len(http2Preface) {
		k := min(len(b), len(http2Preface)-g.preface)
		if !bytes.Equal(b[:k], []byte(http2Preface[g.preface:g.preface+k])) {
			return false
		}
		g.preface += k
		b = b[k:]
	}
	for len(b) > 0 {
		if g.skip > 0 {
			k := min(len(b), g.skip)
			g.skip -= k
			b = b[k:]
			continue
		}
		k := copy(g.hdr[g.hdrN:], b)
		g.hdrN += k
		b = b[k:]
		if g.hdrN < len(g.hdr) {
			return true
		}
		g.hdrN = 0
		length := int(g.hdr[0])<<16 | int(g.hdr[1])<<8 | int(g.hdr[2])
		// Frame types 0 to 9 are HTTP/2's own; the server knows no
		// extensions.
		if length > g.max || g.hdr[3] > 9 {
			return false
		}
		g.skip = length
	}
	return true
}

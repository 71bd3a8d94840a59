// Package wire is the protocol between the host and the guest agent.
//
// One byte stream joins them: a virtio-serial port under QEMU, a vsock
// port under Firecracker and libkrun. Either side may have been restarted
// since the stream last carried traffic, so a session opens with a line
// handshake carrying a fresh nonce: each side discards bytes until it sees
// the other's line for this nonce, which drops anything stale left in the
// pipe by an earlier session. The agent's line also carries its protocol
// version and capabilities, so a host can refuse an agent it cannot serve
// before sending it anything.
//
// After the handshake the stream carries HTTP/2, and on it the agent API of
// package agentpb (Connect protocol, binary protobuf): every call is its own
// HTTP/2 stream, so many commands run at once and a slow one never blocks
// the rest.
package wire

import (
	"bufio"
	"bytes"
	"encoding/hex"
	"errors"
	"slices"
	"strconv"
	"strings"
)

// Version is bumped whenever the protocol changes incompatibly. The agent
// announces its version on connect; a host serves agents from MinVersion
// to Version, since VMs outlive the smolvm that started them.
const (
	Version    = 2
	MinVersion = 2
)

// Capabilities an agent announces on connect; a host asks only for what an
// agent named.
const (
	CapProcess  = "process"  // the Process service, streams and signals
	CapPTY      = "pty"      // processes on a terminal
	CapFiles    = "files"    // the Filesystem service
	CapIdentity = "identity" // System.SetIdentity
	CapShutdown = "shutdown" // System.Shutdown
)

// Capabilities are what this agent serves.
func Capabilities() []string {
	return []string{CapProcess, CapPTY, CapFiles, CapIdentity, CapShutdown}
}

// MaxMessage bounds one message of the agent API either way; file and
// output streams are cut into chunks far below it.
const MaxMessage = 16 << 20

// VsockPort is the vsock port the agent listens on where the backend gives
// the guest a vsock device instead of a virtio-serial port.
const VsockPort = 1024

// Peer is what an agent said of itself on connect.
type Peer struct {
	Version int
	Caps    []string
}

// Has reports whether the agent named capability c.
func (p Peer) Has(c string) bool { return slices.Contains(p.Caps, c) }

// PortName is the virtio-serial port name the agent looks for.
const PortName = "org.smolvm.agent"

const (
	helloPrefix = "SMOLVM1 HELLO "
	readyPrefix = "SMOLVM1 READY "
	nonceLen    = 32 // hex characters
)

// NewNonce encodes 16 random bytes for a handshake.
func NewNonce(random []byte) string { return hex.EncodeToString(random) }

// HelloLine is what the host sends to open a session.
func HelloLine(nonce string) []byte { return []byte(helloPrefix + nonce + "\n") }

// ReadyLine is the agent's answer: the nonce, then its version and
// capabilities.
func ReadyLine(nonce string) []byte {
	return []byte(readyPrefix + nonce + " v=" + strconv.Itoa(Version) + " caps=" + strings.Join(Capabilities(), ",") + "\n")
}

// LastHello returns b from the start of its last hello line, or nil.
func LastHello(b []byte) []byte {
	i := bytes.LastIndex(b, []byte(helloPrefix))
	if i < 0 {
		return nil
	}
	return b[i:]
}

// AwaitHello discards input until a hello line and returns its nonce.
func AwaitHello(r *bufio.Reader) (string, error) {
	var nonce string
	err := awaitLine(r, func(line []byte) bool {
		// The last hello on the line: one before it was cut off (by a
		// host that died mid-write) and the line goes on with the next.
		i := bytes.LastIndex(line, []byte(helloPrefix))
		if i < 0 {
			return false
		}
		n := bytes.TrimSpace(line[i+len(helloPrefix):])
		if len(n) != nonceLen {
			return false
		}
		nonce = string(n)
		return true
	})
	return nonce, err
}

// AwaitReady discards input until the ready line for nonce and returns what
// the agent said of itself. The first agents sent the nonce alone: they
// are version 1 with exec, identity and shutdown.
func AwaitReady(r *bufio.Reader, nonce string) (Peer, error) {
	want := []byte(readyPrefix + nonce)
	var peer Peer
	err := awaitLine(r, func(line []byte) bool {
		i := bytes.Index(line, want)
		if i < 0 {
			return false
		}
		rest := line[i+len(want):]
		if len(rest) > 0 && rest[0] != ' ' && rest[0] != '\r' && rest[0] != '\n' {
			return false // a longer nonce: not ours
		}
		peer = Peer{Version: 1, Caps: []string{"exec", CapIdentity, CapShutdown}}
		for _, f := range strings.Fields(string(rest)) {
			switch k, v, _ := strings.Cut(f, "="); k {
			case "v":
				if n, err := strconv.Atoi(v); err == nil {
					peer.Version = n
				}
			case "caps":
				peer.Caps = strings.Split(v, ",")
			}
		}
		return true
	})
	return peer, err
}

// handshakeLineMax is longer than any handshake line.
const handshakeLineMax = 512

// awaitLine reads lines until match accepts one. A run of stale bytes
// longer than r's buffer is discarded but for its end, which may be the
// start of the line waited for.
func awaitLine(r *bufio.Reader, match func(line []byte) bool) error {
	var carry []byte
	for {
		chunk, err := r.ReadSlice('\n')
		if errors.Is(err, bufio.ErrBufferFull) {
			carry = append(carry[:0], chunk[max(0, len(chunk)-handshakeLineMax):]...)
			continue
		}
		if err != nil {
			return err
		}
		line := chunk
		if len(carry) > 0 {
			line = append(carry, chunk...)
			carry = line[:0]
		}
		if match(line) {
			return nil
		}
	}
}

// Package wire is the protocol between the host and the guest agent.
//
// One byte stream joins them (a virtio-serial port under QEMU). Either side
// may have been restarted since the stream last carried traffic, so a session
// opens with a line handshake carrying a fresh nonce: each side discards
// bytes until it sees the other's line for this nonce, which drops anything
// stale left in the pipe by an earlier session. After the handshake the stream
// carries yamux; every request is its own yamux stream, so many commands run
// at once and a slow one never blocks the rest.
//
// On a request stream the host writes one JSON Request line; the agent
// answers with frames: a type byte, a big-endian uint32 length, the payload.
package wire

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/hashicorp/yamux"
)

// Version is bumped whenever the protocol changes incompatibly. The agent
// announces its version on connect; a host serves agents from MinVersion
// to Version, since VMs outlive the smolvm that started them.
const (
	Version    = 1
	MinVersion = 1
)

// Capabilities an agent announces on connect; a host asks only for what an
// agent named.
const (
	CapExec     = "exec"
	CapIdentity = "identity"
	CapShutdown = "shutdown"
)

// Capabilities are what this agent serves.
func Capabilities() []string { return []string{CapExec, CapIdentity, CapShutdown} }

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

// Ops a Request may carry.
const (
	OpExec     = "exec"
	OpPing     = "ping"
	OpShutdown = "shutdown"
	// OpIdentity gives a VM restored from a template its own identity.
	OpIdentity = "identity"
)

// Identity is what makes a clone distinct from its template and siblings.
type Identity struct {
	Hostname  string `json:"hostname"`
	MachineID string `json:"machine_id"` // 32 lower-case hex digits
	// UnixNano is the host's wall clock when sent; the restored guest's
	// clock is the template's until set.
	UnixNano int64 `json:"unix_nano"`
	// Seed is mixed into the guest's random pool, which is then reseeded,
	// so clones never share random output.
	Seed []byte `json:"seed"`
	// DiskBytes is the root disk's new size; the agent waits for the
	// device to report it and grows the filesystem.
	DiskBytes int64 `json:"disk_bytes,omitempty"`
}

// Request opens a stream.
type Request struct {
	Op string `json:"op"`
	// Argv is run directly (raw mode) when Login is empty.
	Argv []string `json:"argv,omitempty"`
	// Login is a command string run through the image's login shell.
	Login string `json:"login,omitempty"`
	// Env entries (KEY=VALUE) added to the agent's default environment.
	Env []string `json:"env,omitempty"`
	// Dir is the working directory; "" means the user's home.
	Dir string `json:"dir,omitempty"`
	// Identity is set on OpIdentity.
	Identity *Identity `json:"identity,omitempty"`
	// User runs the command as this user, in the forms an OCI image config
	// uses: "name", "uid", "uid:gid", "name:group"; "" means root.
	User string `json:"user,omitempty"`
	// TimeoutMS kills the command's process group after this long; 0 means never.
	TimeoutMS int64 `json:"timeout_ms,omitempty"`
}

// Frame types sent by the agent on a request stream.
const (
	FrameStdout byte = 1
	FrameStderr byte = 2
	FrameExit   byte = 3 // payload: JSON Exit; always the last frame
)

// MaxFrame bounds a frame's payload so a corrupt length cannot make a reader
// allocate without limit.
const MaxFrame = 1 << 20

// Exit ends a request stream.
type Exit struct {
	ExitCode int  `json:"exit_code"`
	TimedOut bool `json:"timed_out,omitempty"`
	// Signal is the signal that killed the process, if one did.
	Signal int `json:"signal,omitempty"`
	// Error is set when the request itself failed (not the command).
	Error string `json:"error,omitempty"`
	// Info answers a ping: facts about the guest.
	Info *Info `json:"info,omitempty"`
}

// Info describes the running guest.
type Info struct {
	Kernel   string `json:"kernel"`
	Hostname string `json:"hostname"`
	Version  int    `json:"version"`
	UptimeMS int64  `json:"uptime_ms"`
}

// WriteFrame writes one frame; a payload over MaxFrame is refused, since
// the reader would refuse it.
func WriteFrame(w io.Writer, typ byte, payload []byte) error {
	if len(payload) > MaxFrame {
		return fmt.Errorf("frame of %d bytes exceeds the %d limit", len(payload), MaxFrame)
	}
	var hdr [5]byte
	hdr[0] = typ
	binary.BigEndian.PutUint32(hdr[1:], uint32(len(payload)))
	if _, err := w.Write(hdr[:]); err != nil {
		return err
	}
	if len(payload) == 0 {
		return nil
	}
	_, err := w.Write(payload)
	return err
}

// ReadFrame reads one frame into buf (grown as needed) and returns its type
// and payload.
func ReadFrame(r io.Reader, buf []byte) (byte, []byte, error) {
	var hdr [5]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return 0, nil, err
	}
	n := binary.BigEndian.Uint32(hdr[1:])
	if n > MaxFrame {
		return 0, nil, fmt.Errorf("frame of %d bytes exceeds the %d limit", n, MaxFrame)
	}
	if cap(buf) < int(n) {
		buf = make([]byte, n)
	}
	buf = buf[:n]
	if _, err := io.ReadFull(r, buf); err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF // a header was read: the stream was cut
		}
		return 0, nil, fmt.Errorf("read frame payload: %w", err)
	}
	return hdr[0], buf, nil
}

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
		i := bytes.Index(line, []byte(helloPrefix))
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
		peer = Peer{Version: 1, Caps: []string{CapExec, CapIdentity, CapShutdown}}
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

// YamuxConfig is shared by both ends so their limits agree.
func YamuxConfig() *yamux.Config {
	c := yamux.DefaultConfig()
	c.AcceptBacklog = 1024
	c.LogOutput = io.Discard
	// Emulated guests can stall for seconds under load; a short write
	// timeout would tear down every stream in the session.
	c.ConnectionWriteTimeout = 60 * time.Second
	c.KeepAliveInterval = 15 * time.Second
	c.MaxStreamWindowSize = 1 << 20
	return c
}

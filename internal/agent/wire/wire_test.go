package wire

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"testing/iotest"
	"time"
)

// portBuf is the bufio size both callers (guest.handshake and the agent's
// session) wrap the byte stream in.
const portBuf = 64 << 10

// nonceOf returns a well-formed nonce made from 16 copies of b.
func nonceOf(b byte) string { return NewNonce(bytes.Repeat([]byte{b}, 16)) }

// h2frame encodes payload as an HTTP/2 DATA frame on stream 1, the kind
// of bytes a session leaves in the pipe.
func h2frame(payload []byte) []byte {
	h := []byte{0, 0, 0, 0, 0, 0, 0, 0, 1}
	h[0], h[1], h[2] = byte(len(payload)>>16), byte(len(payload)>>8), byte(len(payload))
	return append(h, payload...)
}

func cat(parts ...[]byte) []byte { return bytes.Join(parts, nil) }

// pipe returns both ends of an in-memory connection, closed and bounded by
// a deadline so a broken test fails instead of hanging.
func pipe(t *testing.T) (net.Conn, net.Conn) {
	t.Helper()
	a, b := net.Pipe()
	deadline := time.Now().Add(5 * time.Second)
	a.SetDeadline(deadline)
	b.SetDeadline(deadline)
	t.Cleanup(func() { a.Close(); b.Close() })
	return a, b
}

func TestConstants(t *testing.T) {
	t.Parallel()
	// These values are on the wire between a host and an agent that may
	// have been built at different times; changing them breaks both.
	if Version != 2 || MinVersion != 2 {
		t.Errorf("Version, MinVersion = %d, %d; want 2, 2", Version, MinVersion)
	}
	if VsockPort != 1024 {
		t.Errorf("VsockPort = %d, want 1024", VsockPort)
	}
	if PortName != "org.smolvm.agent" {
		t.Errorf("PortName = %q", PortName)
	}
	if got := strings.Join(Capabilities(), ","); got != "process,pty,files,identity,shutdown" {
		t.Errorf("Capabilities() = %s", got)
	}
}

func TestNonceAndLines(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name   string
		random []byte
		want   string
	}{
		{"zeros", make([]byte, 16), strings.Repeat("0", 32)},
		{"ff", bytes.Repeat([]byte{0xff}, 16), strings.Repeat("f", 32)},
		{"counting", []byte{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
			"000102030405060708090a0b0c0d0e0f"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			n := NewNonce(tt.random)
			if n != tt.want {
				t.Fatalf("NewNonce = %q, want %q", n, tt.want)
			}
			if got, want := string(HelloLine(n)), "SMOLVM1 HELLO "+n+"\n"; got != want {
				t.Errorf("HelloLine = %q, want %q", got, want)
			}
			if got, want := string(ReadyLine(n)), "SMOLVM1 READY "+n+" v=2 caps=process,pty,files,identity,shutdown\n"; got != want {
				t.Errorf("ReadyLine = %q, want %q", got, want)
			}
			// A nonce made the way the host makes it is accepted by
			// the agent's side of the handshake.
			got, err := AwaitHello(bufio.NewReader(bytes.NewReader(HelloLine(n))))
			if err != nil || got != n {
				t.Errorf("AwaitHello(HelloLine(n)) = %q, %v; want %q", got, err, n)
			}
		})
	}
	if !regexp.MustCompile(`^[0-9a-f]{32}$`).MatchString(NewNonce([]byte("0123456789abcdef"))) {
		t.Errorf("nonce is not 32 lower-case hex digits")
	}
}

func TestAwaitHello(t *testing.T) {
	t.Parallel()
	n, old := nonceOf(0xa1), nonceOf(0x0b)
	binaryJunk := []byte{0x00, 0x01, 0xff, 0xfe, 0x80, 0x7f, 0x00, 0x02}
	oldSession := cat(
		ReadyLine(old),
		h2frame([]byte("old output\n")),
		h2frame([]byte(`{"exit_code":0}`)),
		binaryJunk,
	)
	tests := []struct {
		name    string
		in      []byte
		want    string
		wantErr error
		rest    string // what the reader still yields after the hello
	}{
		{name: "bare hello", in: HelloLine(n), want: n},
		{name: "hello then session bytes", in: cat(HelloLine(n), []byte("\x00\x00yamux")), want: n, rest: "\x00\x00yamux"},
		{name: "after garbage lines", in: cat([]byte("garbage\nmore garbage\n\n"), HelloLine(n)), want: n},
		{name: "after garbage on the same line", in: cat([]byte("\x00\xff junk"), HelloLine(n)), want: n},
		{name: "after binary junk", in: cat(binaryJunk, []byte("\n"), binaryJunk, HelloLine(n)), want: n},
		{name: "after an old session's bytes", in: cat(oldSession, HelloLine(n)), want: n},
		{name: "after an old ready line", in: cat(ReadyLine(old), HelloLine(n)), want: n},
		{name: "CRLF line ending", in: []byte("SMOLVM1 HELLO " + n + "\r\n"), want: n},
		{name: "after a hello with a short nonce", in: cat([]byte("SMOLVM1 HELLO abc\n"), HelloLine(n)), want: n},
		{name: "after a hello with a long nonce", in: cat(HelloLine(n+"00"), HelloLine(n)), want: n},
		{name: "after a hello with an empty nonce", in: cat([]byte("SMOLVM1 HELLO \n"), HelloLine(n)), want: n},
		{name: "after an older protocol's hello", in: cat([]byte("SMOLVM0 HELLO "+old+"\n"), HelloLine(n)), want: n},
		{name: "after a hello cut off on the same line", in: cat([]byte("SMOLVM1 HELLO 12345"), HelloLine(n)), want: n},
		// Two complete hellos: the first is answered; the agent recovers
		// from a stale one by replaying the later hello (see LastHello).
		{name: "two hellos answers the first", in: cat(HelloLine(old), HelloLine(n)), want: old, rest: string(HelloLine(n))},
		{name: "long run without newline", in: cat(bytes.Repeat([]byte{'x'}, 3*portBuf), []byte("\n"), HelloLine(n)), want: n},

		{name: "empty input", in: nil, wantErr: io.EOF},
		{name: "only garbage", in: []byte("garbage\nmore\n"), wantErr: io.EOF},
		{name: "only an old session", in: oldSession, wantErr: io.EOF},
		{name: "hello cut off before its newline", in: HelloLine(n)[:len(HelloLine(n))-1], wantErr: io.EOF},
		{name: "hello cut off in the nonce", in: HelloLine(n)[:20], wantErr: io.EOF},
		{name: "hello cut off in the prefix", in: []byte("SMOLVM1 HEL"), wantErr: io.EOF},
		{name: "ready is not a hello", in: ReadyLine(n), wantErr: io.EOF},
		{name: "lower-case prefix", in: []byte("smolvm1 hello " + n + "\n"), wantErr: io.EOF},
		{name: "long run without newline then EOF", in: bytes.Repeat([]byte{'x'}, 3*portBuf), wantErr: io.EOF},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			br := bufio.NewReaderSize(bytes.NewReader(tt.in), portBuf)
			got, err := AwaitHello(br)
			if tt.wantErr != nil {
				if !errors.Is(err, tt.wantErr) {
					t.Fatalf("AwaitHello = %q, %v; want error %v", got, err, tt.wantErr)
				}
				if got != "" {
					t.Errorf("AwaitHello returned nonce %q with an error", got)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Fatalf("AwaitHello = %q, %v; want %q", got, err, tt.want)
			}
			rest, _ := io.ReadAll(br)
			if string(rest) != tt.rest {
				t.Errorf("bytes after the hello = %q, want %q", rest, tt.rest)
			}
		})
	}
}

func TestAwaitHelloReadError(t *testing.T) {
	t.Parallel()
	boom := errors.New("boom")
	r := io.MultiReader(strings.NewReader("garbage\n"), iotest.ErrReader(boom))
	if _, err := AwaitHello(bufio.NewReader(r)); !errors.Is(err, boom) {
		t.Fatalf("AwaitHello error = %v, want %v", err, boom)
	}
	if _, err := AwaitReady(bufio.NewReader(iotest.ErrReader(boom)), nonceOf(1)); !errors.Is(err, boom) {
		t.Fatalf("AwaitReady error = %v, want %v", err, boom)
	}
}

func TestAwaitReady(t *testing.T) {
	t.Parallel()
	n, other := nonceOf(0xc3), nonceOf(0x3c)
	tests := []struct {
		name    string
		in      []byte
		wantErr error // nil means accepted
		rest    string
	}{
		{name: "ready", in: ReadyLine(n)},
		{name: "ready then session bytes", in: cat(ReadyLine(n), []byte("\x00\x01yamux")), rest: "\x00\x01yamux"},
		{name: "after garbage", in: cat([]byte("boot log line\n\x00\xff\n"), ReadyLine(n))},
		{name: "after garbage on the same line", in: cat([]byte("\x00junk"), ReadyLine(n))},
		{name: "wrong nonce skipped", in: cat(ReadyLine(other), ReadyLine(n))},
		{name: "old session skipped", in: cat(ReadyLine(other), h2frame([]byte("stale\n")), h2frame([]byte("{}")), ReadyLine(n))},
		{name: "long run without newline", in: cat(bytes.Repeat([]byte{0}, 3*portBuf), []byte("\n"), ReadyLine(n))},

		{name: "empty", in: nil, wantErr: io.EOF},
		{name: "wrong nonce only", in: ReadyLine(other), wantErr: io.EOF},
		{name: "hello with the nonce is not ready", in: HelloLine(n), wantErr: io.EOF},
		{name: "ready cut off in the nonce", in: ReadyLine(n)[:30], wantErr: io.EOF},
		{name: "ready without newline", in: ReadyLine(n)[:len(ReadyLine(n))-1], wantErr: io.EOF},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			br := bufio.NewReaderSize(bytes.NewReader(tt.in), portBuf)
			_, err := AwaitReady(br, n)
			if tt.wantErr != nil {
				if !errors.Is(err, tt.wantErr) {
					t.Fatalf("AwaitReady = %v, want %v", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("AwaitReady = %v, want nil", err)
			}
			rest, _ := io.ReadAll(br)
			if string(rest) != tt.rest {
				t.Errorf("bytes after the ready line = %q, want %q", rest, tt.rest)
			}
		})
	}
}

// TestAwaitReadyWrongNonceKeepsWaiting: on a live connection a READY for
// another nonce is not taken as an answer; the host keeps waiting, and only
// its deadline ends the wait.
func TestAwaitReadyWrongNonceKeepsWaiting(t *testing.T) {
	t.Parallel()
	host, agent := pipe(t)
	go agent.Write(ReadyLine(nonceOf(0x99)))
	host.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
	_, err := AwaitReady(bufio.NewReaderSize(host, portBuf), nonceOf(0x11))
	if !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("AwaitReady = %v, want the deadline to end the wait", err)
	}
}

// TestAwaitLineAcrossBufferBoundary: a hello or ready line that begins just
// before the end of a full bufio buffer (a long newline-free run of stale
// bytes, as an old session's binary output can be) must still be found.
func TestAwaitLineAcrossBufferBoundary(t *testing.T) {
	t.Parallel()
	n := nonceOf(0x5a)
	lineLen := len(HelloLine(n))
	var missed []string
	for _, straddle := range []int{0, 1, 14, 20, lineLen - 1, lineLen, lineLen + 1} {
		junk := bytes.Repeat([]byte{'x'}, portBuf-straddle)
		got, err := AwaitHello(bufio.NewReaderSize(bytes.NewReader(cat(junk, HelloLine(n))), portBuf))
		if err != nil || got != n {
			missed = append(missed, "hello with "+strconv.Itoa(straddle)+" bytes in the full buffer: "+errString(err))
		}
		_, err = AwaitReady(bufio.NewReaderSize(bytes.NewReader(cat(junk, ReadyLine(n))), portBuf), n)
		if err != nil {
			missed = append(missed, "ready with "+strconv.Itoa(straddle)+" bytes in the full buffer: "+errString(err))
		}
	}
	if len(missed) > 0 {
		t.Errorf("a line straddling a full %d-byte buffer is lost:\n%s", portBuf, strings.Join(missed, "\n"))
	}
}

func errString(err error) string {
	if err == nil {
		return "no error but wrong nonce"
	}
	return err.Error()
}

func TestLastHello(t *testing.T) {
	t.Parallel()
	n, old := nonceOf(0x42), nonceOf(0x24)
	hello := HelloLine(n)
	session := cat([]byte{0, 1, 2, 0, 0, 0, 12}, h2frame([]byte("yamux data")))
	tests := []struct {
		name string
		in   []byte
		want []byte // nil means none
	}{
		{name: "nil", in: nil},
		{name: "empty", in: []byte{}},
		{name: "no hello", in: session},
		{name: "only a ready line", in: ReadyLine(n)},
		{name: "only a hello", in: hello, want: hello},
		{name: "hello after session bytes", in: cat(session, hello), want: hello},
		{name: "hello followed by more", in: cat(session, hello, []byte("tail")), want: cat(hello, []byte("tail"))},
		{name: "the last of two hellos", in: cat(HelloLine(old), session, hello), want: hello},
		// The hello arrived only in part; the rest is still in the port
		// and will follow the replayed bytes.
		{name: "hello cut off in its nonce", in: cat(session, hello[:20]), want: hello[:20]},
		{name: "hello with the prefix only", in: cat(session, []byte("SMOLVM1 HELLO ")), want: []byte("SMOLVM1 HELLO ")},
		{name: "prefix cut off at the end", in: cat(session, []byte("SMOLVM1 HELL"))},
		{name: "prefix cut off at the start", in: cat([]byte("OLVM1 HELLO "+n+"\n"), session)},
		{name: "earlier hello kept when the later one is cut", in: cat(HelloLine(old), session, []byte("SMOLVM1 HEL")),
			want: cat(HelloLine(old), session, []byte("SMOLVM1 HEL"))},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			got := LastHello(tt.in)
			if tt.want == nil {
				if got != nil {
					t.Fatalf("LastHello = %q, want nil", got)
				}
				return
			}
			if !bytes.Equal(got, tt.want) {
				t.Fatalf("LastHello = %q, want %q", got, tt.want)
			}
		})
	}
}

// TestLastHelloReplay follows the agent's use: a session swallowed part or
// all of a new host's hello; the next session reads the replayed bytes and
// then the port, and must find that host's nonce.
func TestLastHelloReplay(t *testing.T) {
	t.Parallel()
	n, old := nonceOf(0x77), nonceOf(0x17)
	hello := HelloLine(n)
	for cut := 14; cut <= len(hello); cut++ {
		recorded := cat(HelloLine(old), []byte{0, 0, 0, 1, '\n', 0xff}, hello[:cut])
		replay := LastHello(recorded)
		if replay == nil {
			t.Fatalf("cut %d: LastHello found nothing", cut)
		}
		port := cat(hello[cut:], []byte("\x00\x00yamux"))
		br := bufio.NewReaderSize(io.MultiReader(bytes.NewReader(replay), bytes.NewReader(port)), portBuf)
		got, err := AwaitHello(br)
		if err != nil || got != n {
			t.Fatalf("cut %d: AwaitHello = %q, %v; want %q", cut, got, err, n)
		}
		if rest, _ := io.ReadAll(br); string(rest) != "\x00\x00yamux" {
			t.Fatalf("cut %d: bytes after the hello = %q", cut, rest)
		}
	}
}

// TestHandshake runs both sides of the handshake over an in-memory pipe,
// with stale bytes in each direction, then checks the bytes after it.
func TestHandshake(t *testing.T) {
	t.Parallel()
	old := nonceOf(0xee)
	tests := []struct {
		name      string
		toAgent   []byte // stale bytes the agent reads before the hello
		toHost    []byte // stale bytes the host reads before the ready
		wantAgree bool
	}{
		{name: "clean", wantAgree: true},
		{name: "garbage both ways", toAgent: []byte("noise\n\x00\xff"), toHost: []byte("[    0.1] boot\n\x01"), wantAgree: true},
		{name: "old ready to host", toHost: ReadyLine(old), wantAgree: true},
		{name: "old frames to host", toHost: cat(h2frame([]byte("x")), h2frame([]byte("{}"))), wantAgree: true},
		{name: "broken old hello to agent", toAgent: []byte("SMOLVM1 HELLO 1234\n"), wantAgree: true},
		{name: "old yamux bytes to agent", toAgent: []byte{0, 1, 0, 2, 0, 0, 0, 1, 0, 0, 0, 0}, wantAgree: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			host, agent := pipe(t)
			n := nonceOf(0x3d)

			type result struct {
				nonce string
				rest  string
				err   error
			}
			agentDone := make(chan result, 1)
			go func() {
				br := bufio.NewReaderSize(agent, portBuf)
				got, err := AwaitHello(br)
				if err != nil {
					agentDone <- result{err: err}
					return
				}
				if _, err := agent.Write(cat(tt.toHost, ReadyLine(got), []byte("to-host\n"))); err != nil {
					agentDone <- result{err: err}
					return
				}
				rest, err := br.ReadString('\n')
				agentDone <- result{nonce: got, rest: rest, err: err}
			}()

			if _, err := host.Write(cat(tt.toAgent, HelloLine(n))); err != nil {
				t.Fatalf("host write hello: %v", err)
			}
			br := bufio.NewReaderSize(host, portBuf)
			if _, err := AwaitReady(br, n); err != nil {
				t.Fatalf("AwaitReady: %v", err)
			}
			if rest, err := br.ReadString('\n'); err != nil || rest != "to-host\n" {
				t.Fatalf("host read after handshake = %q, %v", rest, err)
			}
			if _, err := host.Write([]byte("to-agent\n")); err != nil {
				t.Fatalf("host write after handshake: %v", err)
			}
			r := <-agentDone
			if r.err != nil {
				t.Fatalf("agent: %v", r.err)
			}
			if r.nonce != n {
				t.Fatalf("agent saw nonce %q, host sent %q", r.nonce, n)
			}
			if r.rest != "to-agent\n" {
				t.Fatalf("agent read after handshake = %q", r.rest)
			}
		})
	}
}

// TestGarbage feeds random and hostile bytes to every reader in the package:
// each must return (no panic, no hang) and stay within its contract.
func TestGarbage(t *testing.T) {
	t.Parallel()
	rng := rand.New(rand.NewPCG(1, 2))
	inputs := [][]byte{
		nil,
		bytes.Repeat([]byte{0xff}, 1000),
		bytes.Repeat([]byte{'\n'}, 1000),
		bytes.Repeat([]byte("SMOLVM1 HELLO "), 100),
		bytes.Repeat([]byte("SMOLVM1 READY \n"), 100),
		bytes.Repeat([]byte{0, 0, 0, 4, 0, 0, 0, 0, 0}, 100), // HTTP/2 frame headers
	}
	for range 300 {
		b := make([]byte, rng.IntN(600))
		for i := range b {
			b[i] = byte(rng.UintN(256))
		}
		inputs = append(inputs, b)
	}
	n := nonceOf(0x12)
	for i, in := range inputs {
		if got, err := AwaitHello(bufio.NewReaderSize(bytes.NewReader(in), portBuf)); err == nil && len(got) != 32 {
			t.Fatalf("input %d: AwaitHello returned a %d-byte nonce", i, len(got))
		}
		if _, err := AwaitReady(bufio.NewReaderSize(bytes.NewReader(in), portBuf), n); err == nil {
			t.Fatalf("input %d: AwaitReady accepted garbage", i)
		}
		if h := LastHello(in); h != nil && !bytes.HasPrefix(h, []byte("SMOLVM1 HELLO ")) {
			t.Fatalf("input %d: LastHello = %q", i, h)
		}
	}
}

func TestAwaitReadyPeer(t *testing.T) {
	t.Parallel()
	n := nonceOf(0x42)
	for _, tt := range []struct {
		name string
		line string
		want Peer
		ok   bool
	}{
		{"this agent", string(ReadyLine(n)), Peer{Version: Version, Caps: Capabilities()}, true},
		{"the first agents", "SMOLVM1 READY " + n + "\n", Peer{Version: 1, Caps: []string{"exec", CapIdentity, CapShutdown}}, true},
		{"a newer agent", "SMOLVM1 READY " + n + " v=7 caps=exec,files,pty x=unknown\r\n", Peer{Version: 7, Caps: []string{"exec", "files", "pty"}}, true},
		{"a longer nonce is another's", "SMOLVM1 READY " + n + "ff v=1\n", Peer{}, false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			got, err := AwaitReady(bufio.NewReader(strings.NewReader(tt.line)), n)
			if !tt.ok {
				if err == nil {
					t.Fatalf("accepted %q as %+v", tt.line, got)
				}
				return
			}
			if err != nil || got.Version != tt.want.Version || strings.Join(got.Caps, ",") != strings.Join(tt.want.Caps, ",") {
				t.Errorf("AwaitReady(%q) = %+v, %v; want %+v", tt.line, got, err, tt.want)
			}
			if tt.ok && !got.Has(tt.want.Caps[0]) {
				t.Errorf("Has(%q) is false", tt.want.Caps[0])
			}
		})
	}
}

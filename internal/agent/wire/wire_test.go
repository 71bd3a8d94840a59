package wire

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"reflect"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"testing/iotest"
	"time"

	"github.com/hashicorp/yamux"
)

// portBuf is the bufio size both callers (guest.handshake and the agent's
// session) wrap the byte stream in.
const portBuf = 64 << 10

// nonceOf returns a well-formed nonce made from 16 copies of b.
func nonceOf(b byte) string { return NewNonce(bytes.Repeat([]byte{b}, 16)) }

// frame encodes one frame with WriteFrame, failing the test on error.
func frame(t testing.TB, typ byte, payload []byte) []byte {
	t.Helper()
	var b bytes.Buffer
	if err := WriteFrame(&b, typ, payload); err != nil {
		t.Fatalf("WriteFrame: %v", err)
	}
	return b.Bytes()
}

// header builds a frame header by hand, so tests can claim any length.
func header(typ byte, n uint32) []byte {
	h := []byte{typ, 0, 0, 0, 0}
	binary.BigEndian.PutUint32(h[1:], n)
	return h
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
	if Version != 1 {
		t.Errorf("Version = %d, want 1", Version)
	}
	if PortName != "org.smolvm.agent" {
		t.Errorf("PortName = %q", PortName)
	}
	if FrameStdout != 1 || FrameStderr != 2 || FrameExit != 3 {
		t.Errorf("frame types = %d %d %d, want 1 2 3", FrameStdout, FrameStderr, FrameExit)
	}
	if MaxFrame != 1<<20 {
		t.Errorf("MaxFrame = %d, want %d", MaxFrame, 1<<20)
	}
	for _, op := range []string{OpExec, OpPing, OpShutdown, OpIdentity} {
		if op == "" {
			t.Errorf("empty op constant")
		}
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
			if got, want := string(ReadyLine(n)), "SMOLVM1 READY "+n+" v=1 caps=exec,identity,shutdown\n"; got != want {
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
		frame(t, FrameStdout, []byte("old output\n")),
		frame(t, FrameExit, []byte(`{"exit_code":0}`)),
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
		{name: "old session skipped", in: cat(ReadyLine(other), frame(t, FrameStdout, []byte("stale\n")), frame(t, FrameExit, []byte("{}")), ReadyLine(n))},
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
	session := cat([]byte{0, 1, 2, 0, 0, 0, 12}, frame(t, FrameStdout, []byte("yamux data")))
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
		{name: "old frames to host", toHost: cat(frame(t, FrameStdout, []byte("x")), frame(t, FrameExit, []byte("{}"))), wantAgree: true},
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

func TestRequestRoundTrip(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		req  Request
		json string // exact encoding, when it matters for compatibility
	}{
		{name: "ping", req: Request{Op: OpPing}, json: `{"op":"ping"}`},
		{name: "shutdown", req: Request{Op: OpShutdown}, json: `{"op":"shutdown"}`},
		{name: "exec raw", req: Request{Op: OpExec, Argv: []string{"/bin/echo", "hi there"}, Env: []string{"A=1", "B="}, Dir: "/tmp", User: "1000:1000", TimeoutMS: 1500},
			json: `{"op":"exec","argv":["/bin/echo","hi there"],"env":["A=1","B="],"dir":"/tmp","user":"1000:1000","timeout_ms":1500}`},
		{name: "exec login", req: Request{Op: OpExec, Login: "echo $HOME; ls -l\nexit 3", User: "nobody"}},
		{name: "awkward strings", req: Request{Op: OpExec, Argv: []string{"a\nb", "\x00", "\"quoted\"", "üñí©ødé", "\r\n\t", `\`}}},
		{name: "empty argument", req: Request{Op: OpExec, Argv: []string{""}}},
		{name: "identity", req: Request{Op: OpIdentity, Identity: &Identity{
			Hostname: "clone-1", MachineID: strings.Repeat("ab", 16), UnixNano: 1700000000123456789,
			Seed: []byte{0, 1, 2, 0xff, '\n'}, DiskBytes: 8 << 30}},
			json: `{"op":"identity","identity":{"hostname":"clone-1","machine_id":"abababababababababababababababab","unix_nano":1700000000123456789,"seed":"AAEC/wo=","disk_bytes":8589934592}}`},
		{name: "identity minimal", req: Request{Op: OpIdentity, Identity: &Identity{}},
			json: `{"op":"identity","identity":{"hostname":"","machine_id":"","unix_nano":0,"seed":null}}`},
		{name: "unknown op", req: Request{Op: "frobnicate"}},
		{name: "zero", req: Request{}, json: `{"op":""}`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			// Encode as guest.Client.Do does.
			line, err := json.Marshal(tt.req)
			if err != nil {
				t.Fatalf("marshal: %v", err)
			}
			if bytes.IndexByte(line, '\n') >= 0 {
				t.Fatalf("encoded request contains a raw newline: %q", line)
			}
			if tt.json != "" && string(line) != tt.json {
				t.Errorf("encoding = %s\nwant       %s", line, tt.json)
			}
			stream := cat(line, []byte("\n"), []byte("after"))
			// Decode as the agent's handle does.
			br := bufio.NewReader(bytes.NewReader(stream))
			got, err := br.ReadBytes('\n')
			if err != nil {
				t.Fatalf("read request line: %v", err)
			}
			var req Request
			if err := json.Unmarshal(got, &req); err != nil {
				t.Fatalf("unmarshal: %v", err)
			}
			if !reflect.DeepEqual(req, tt.req) {
				t.Fatalf("round trip = %+v\nwant         %+v", req, tt.req)
			}
			if rest, _ := io.ReadAll(br); string(rest) != "after" {
				t.Errorf("bytes after the request = %q", rest)
			}
		})
	}
}

func TestRequestIgnoresUnknownFields(t *testing.T) {
	t.Parallel()
	// A newer host may send fields this agent does not know.
	var req Request
	if err := json.Unmarshal([]byte(`{"op":"exec","argv":["true"],"future":{"x":1}}`), &req); err != nil {
		t.Fatalf("unmarshal: %v", err)
	}
	if req.Op != OpExec || !reflect.DeepEqual(req.Argv, []string{"true"}) {
		t.Fatalf("got %+v", req)
	}
}

func TestWriteFrameEncoding(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		typ     byte
		payload []byte
		want    []byte
	}{
		{"nil payload", FrameStdout, nil, []byte{1, 0, 0, 0, 0}},
		{"empty payload", FrameStderr, []byte{}, []byte{2, 0, 0, 0, 0}},
		{"short", FrameExit, []byte("abc"), []byte{3, 0, 0, 0, 3, 'a', 'b', 'c'}},
		{"length is big-endian", FrameStdout, make([]byte, 0x0102), cat([]byte{1, 0, 0, 1, 2}, make([]byte, 0x0102))},
		{"any type byte", 0xff, []byte{9}, []byte{0xff, 0, 0, 0, 1, 9}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			if got := frame(t, tt.typ, tt.payload); !bytes.Equal(got, tt.want) {
				t.Fatalf("WriteFrame wrote %v, want %v", got, tt.want)
			}
		})
	}
}

// failWriter fails once it has accepted ok bytes.
type failWriter struct {
	ok  int
	err error
}

func (w *failWriter) Write(p []byte) (int, error) {
	if len(p) > w.ok {
		n := w.ok
		w.ok = 0
		return n, w.err
	}
	w.ok -= len(p)
	return len(p), nil
}

func TestWriteFrameErrors(t *testing.T) {
	t.Parallel()
	boom := errors.New("boom")
	tests := []struct {
		name    string
		ok      int
		payload []byte
		wantErr bool
	}{
		{"header fails", 0, []byte("x"), true},
		{"header fails, empty payload", 0, nil, true},
		{"payload fails", 5, []byte("xyz"), true},
		{"empty payload needs only the header", 5, nil, false},
		{"everything fits", 8, []byte("xyz"), false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			err := WriteFrame(&failWriter{ok: tt.ok, err: boom}, FrameStdout, tt.payload)
			if tt.wantErr != errors.Is(err, boom) || (!tt.wantErr && err != nil) {
				t.Fatalf("WriteFrame = %v, wantErr %v", err, tt.wantErr)
			}
		})
	}
	// A closed stream refuses the frame.
	a, b := net.Pipe()
	a.Close()
	b.Close()
	if err := WriteFrame(a, FrameExit, []byte("{}")); err == nil {
		t.Fatalf("WriteFrame on a closed pipe succeeded")
	}
}

func TestFrameRoundTrip(t *testing.T) {
	t.Parallel()
	binaryPayload := make([]byte, 4096)
	for i := range binaryPayload {
		binaryPayload[i] = byte(i * 7)
	}
	max := bytes.Repeat([]byte{0xa5}, MaxFrame)
	max[0], max[MaxFrame-1] = 1, 2
	payloads := []struct {
		name string
		p    []byte
	}{
		{"nil", nil},
		{"empty", []byte{}},
		{"one byte", []byte{0}},
		{"text", []byte("hello, world\n")},
		{"looks like a header", header(FrameExit, 0xffffffff)},
		{"looks like a hello", HelloLine(nonceOf(1))},
		{"binary", binaryPayload},
		{"64KiB", bytes.Repeat([]byte("z"), 64<<10)},
		{"MaxFrame", max},
	}
	types := []struct {
		name string
		typ  byte
	}{{"stdout", FrameStdout}, {"stderr", FrameStderr}, {"exit", FrameExit}, {"type0", 0}, {"type255", 255}}
	for _, ty := range types {
		for _, pl := range payloads {
			t.Run(ty.name+"/"+pl.name, func(t *testing.T) {
				t.Parallel()
				enc := frame(t, ty.typ, pl.p)
				if len(enc) != 5+len(pl.p) {
					t.Fatalf("encoded %d bytes, want %d", len(enc), 5+len(pl.p))
				}
				readers := []struct {
					name string
					r    io.Reader
					buf  []byte
				}{
					{"bytes/nil buf", bytes.NewReader(enc), nil},
					{"bytes/big buf", bytes.NewReader(enc), make([]byte, 64<<10)},
					{"one byte at a time", iotest.OneByteReader(bytes.NewReader(enc)), make([]byte, 3)},
					{"half reads", iotest.HalfReader(bytes.NewReader(enc)), nil},
					{"data with EOF", iotest.DataErrReader(bytes.NewReader(enc)), nil},
				}
				if len(pl.p) > 64<<10 {
					readers = readers[:2] // byte-at-a-time readers are slow for 1MiB
				}
				for _, rd := range readers {
					typ, p, err := ReadFrame(rd.r, rd.buf)
					if err != nil {
						t.Fatalf("%s: ReadFrame: %v", rd.name, err)
					}
					if typ != ty.typ || !bytes.Equal(p, pl.p) {
						t.Fatalf("%s: ReadFrame = %d, %d bytes; want %d, %d bytes", rd.name, typ, len(p), ty.typ, len(pl.p))
					}
					// The frame ends the stream cleanly.
					if _, _, err := ReadFrame(rd.r, rd.buf); err != io.EOF {
						t.Fatalf("%s: ReadFrame after the last frame = %v, want io.EOF", rd.name, err)
					}
				}
			})
		}
	}
}

// TestFrameStream reads a stream of frames the way guest.Client.Do does:
// one reused buffer, each payload used before the next read.
func TestFrameStream(t *testing.T) {
	t.Parallel()
	exit := Exit{ExitCode: 137, Signal: 9, TimedOut: true}
	exitJSON, _ := json.Marshal(exit)
	frames := []struct {
		typ byte
		p   []byte
	}{
		{FrameStdout, []byte("line 1\n")},
		{FrameStderr, []byte{}},
		{FrameStdout, bytes.Repeat([]byte("b"), 100<<10)}, // grows the buffer
		{FrameStderr, []byte("warning\n")},
		{FrameStdout, nil},
		{FrameExit, exitJSON},
	}
	host, agent := pipe(t)
	go func() {
		for _, f := range frames {
			if err := WriteFrame(agent, f.typ, f.p); err != nil {
				return
			}
		}
		agent.Close()
	}()
	br := bufio.NewReaderSize(host, 64<<10)
	buf := make([]byte, 16)
	var stdout, stderr bytes.Buffer
	for i, want := range frames {
		typ, p, err := ReadFrame(br, buf)
		if err != nil {
			t.Fatalf("frame %d: %v", i, err)
		}
		if typ != want.typ || !bytes.Equal(p, want.p) {
			t.Fatalf("frame %d = type %d, %d bytes; want type %d, %d bytes", i, typ, len(p), want.typ, len(want.p))
		}
		switch typ {
		case FrameStdout:
			stdout.Write(p)
		case FrameStderr:
			stderr.Write(p)
		case FrameExit:
			var e Exit
			if err := json.Unmarshal(p, &e); err != nil || !reflect.DeepEqual(e, exit) {
				t.Fatalf("exit frame = %+v, %v; want %+v", e, err, exit)
			}
		}
	}
	if want := "line 1\n" + strings.Repeat("b", 100<<10); stdout.String() != want {
		t.Errorf("stdout has %d bytes, want %d", stdout.Len(), len(want))
	}
	if stderr.String() != "warning\n" {
		t.Errorf("stderr = %q", stderr.String())
	}
	if _, _, err := ReadFrame(br, buf); err != io.EOF {
		t.Fatalf("after the exit frame: %v, want io.EOF", err)
	}
}

// TestReadFrameUsesBuffer: a buffer with room is filled in place (so a
// reader that reuses one buffer does not allocate per frame); a short one
// is left alone.
func TestReadFrameUsesBuffer(t *testing.T) {
	t.Parallel()
	big := make([]byte, 0, 64)
	_, p, err := ReadFrame(bytes.NewReader(frame(t, FrameStdout, []byte("payload"))), big)
	if err != nil || string(p) != "payload" {
		t.Fatalf("ReadFrame = %q, %v", p, err)
	}
	if &p[0] != &big[:1][0] {
		t.Errorf("payload not read into the caller's buffer")
	}
	small := []byte("ab")
	_, p, err = ReadFrame(bytes.NewReader(frame(t, FrameStdout, []byte("longer payload"))), small)
	if err != nil || string(p) != "longer payload" {
		t.Fatalf("ReadFrame = %q, %v", p, err)
	}
	if string(small) != "ab" {
		t.Errorf("short caller buffer was overwritten: %q", small)
	}
}

func TestExitRoundTrip(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		e    Exit
		json string
	}{
		{name: "success", e: Exit{}, json: `{"exit_code":0}`},
		{name: "failure", e: Exit{ExitCode: 3}, json: `{"exit_code":3}`},
		{name: "killed", e: Exit{ExitCode: 137, Signal: 9, TimedOut: true}, json: `{"exit_code":137,"timed_out":true,"signal":9}`},
		{name: "request error", e: Exit{Error: "unknown op \"x\"\nsecond line"}},
		{name: "ping info", e: Exit{Info: &Info{Kernel: "6.6.0", Hostname: "vm", Version: Version, UptimeMS: 1234}},
			json: `{"exit_code":0,"info":{"kernel":"6.6.0","hostname":"vm","version":1,"uptime_ms":1234}}`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			b, err := json.Marshal(tt.e)
			if err != nil {
				t.Fatal(err)
			}
			if tt.json != "" && string(b) != tt.json {
				t.Errorf("encoding = %s, want %s", b, tt.json)
			}
			typ, p, err := ReadFrame(bytes.NewReader(frame(t, FrameExit, b)), nil)
			if err != nil || typ != FrameExit {
				t.Fatalf("ReadFrame = %d, %v", typ, err)
			}
			var got Exit
			if err := json.Unmarshal(p, &got); err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, tt.e) {
				t.Fatalf("round trip = %+v, want %+v", got, tt.e)
			}
		})
	}
}

func TestReadFrameOversize(t *testing.T) {
	t.Parallel()
	for _, n := range []uint32{MaxFrame + 1, MaxFrame * 2, 1 << 31, 0xffffffff} {
		t.Run(strconv.Itoa(int(n)), func(t *testing.T) {
			t.Parallel()
			// The length is refused from the header alone: the
			// payload that follows is not read.
			r := bytes.NewReader(cat(header(FrameStdout, n), []byte("rest")))
			typ, p, err := ReadFrame(r, nil)
			if err == nil {
				t.Fatalf("ReadFrame accepted a %d-byte frame", n)
			}
			if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
				t.Fatalf("oversize frame reported as end of stream: %v", err)
			}
			if !strings.Contains(err.Error(), "exceeds") {
				t.Errorf("error %q does not say the frame is too big", err)
			}
			if typ != 0 || p != nil {
				t.Errorf("ReadFrame returned %d, %d bytes with an error", typ, len(p))
			}
			if r.Len() != len("rest") {
				t.Errorf("ReadFrame consumed %d bytes past the header", len("rest")-r.Len())
			}
		})
	}
}

// TestReadFrameOversizeDoesNotAllocate is not parallel, so the allocation
// count is this test's own.
func TestReadFrameOversizeDoesNotAllocate(t *testing.T) {
	inputs := [][]byte{header(FrameStdout, MaxFrame+1), header(FrameStdout, 0xffffffff)}
	const rounds = 50
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	for i := 0; i < rounds; i++ {
		for _, in := range inputs {
			if _, _, err := ReadFrame(bytes.NewReader(in), nil); err == nil {
				t.Fatal("oversize frame accepted")
			}
		}
	}
	runtime.ReadMemStats(&after)
	if got := after.TotalAlloc - before.TotalAlloc; got > 1<<20 {
		t.Fatalf("refusing %d oversize frames allocated %d bytes", rounds*len(inputs), got)
	}
}

// TestWriteFrameOversize: a payload the reader would refuse is refused by
// the writer, and nothing is written.
func TestWriteFrameOversize(t *testing.T) {
	t.Parallel()
	var b bytes.Buffer
	if err := WriteFrame(&b, FrameStdout, make([]byte, MaxFrame+1)); err == nil {
		t.Fatal("WriteFrame wrote a payload of MaxFrame+1 bytes")
	}
	if b.Len() != 0 {
		t.Errorf("a refused frame wrote %d bytes", b.Len())
	}
}

func TestReadFrameTruncated(t *testing.T) {
	t.Parallel()
	full := frame(t, FrameStdout, []byte("0123456789"))
	maxHeader := header(FrameStderr, MaxFrame)
	tests := []struct {
		name string
		in   []byte
		// wantErr must match with errors.Is.
		wantErr error
	}{
		{"empty stream", nil, io.EOF},
		{"1 header byte", full[:1], io.ErrUnexpectedEOF},
		{"4 header bytes", full[:4], io.ErrUnexpectedEOF},
		{"payload cut after 1 byte", full[:6], io.ErrUnexpectedEOF},
		{"payload cut before the last byte", full[:len(full)-1], io.ErrUnexpectedEOF},
		{"max-size payload cut", cat(maxHeader, make([]byte, 1000)), io.ErrUnexpectedEOF},
		// A header whose payload never starts is a cut frame too.
		{"header without payload", full[:5], io.ErrUnexpectedEOF},
		{"max-size header without payload", maxHeader, io.ErrUnexpectedEOF},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			typ, p, err := ReadFrame(bytes.NewReader(tt.in), nil)
			if !errors.Is(err, tt.wantErr) {
				t.Fatalf("ReadFrame = %v, want %v", err, tt.wantErr)
			}
			if typ != 0 || p != nil {
				t.Errorf("ReadFrame returned %d, %d bytes with an error", typ, len(p))
			}
			// Only a stream that ends between frames is a clean end: a
			// caller comparing with io.EOF must not mistake a cut frame
			// for one.
			if len(tt.in) > 0 && err == io.EOF {
				t.Errorf("a cut frame returned a bare io.EOF")
			}
		})
	}
}

// TestReadFrameTruncatedPipe: when the writer goes away mid-frame on a live
// connection, the reader gets an error at once rather than hanging.
func TestReadFrameTruncatedPipe(t *testing.T) {
	t.Parallel()
	full := frame(t, FrameStdout, []byte("0123456789"))
	for _, cut := range []int{0, 3, 5, 9} {
		t.Run(strconv.Itoa(cut), func(t *testing.T) {
			t.Parallel()
			host, agent := pipe(t)
			go func() {
				agent.Write(full[:cut])
				agent.Close()
			}()
			_, _, err := ReadFrame(host, nil)
			if err == nil {
				t.Fatal("ReadFrame succeeded on a cut frame")
			}
			if errors.Is(err, os.ErrDeadlineExceeded) {
				t.Fatalf("ReadFrame hung until the deadline: %v", err)
			}
		})
	}
}

func TestReadFrameReadError(t *testing.T) {
	t.Parallel()
	boom := errors.New("boom")
	tests := []struct {
		name string
		r    io.Reader
	}{
		{"in the header", iotest.ErrReader(boom)},
		{"in the payload", io.MultiReader(bytes.NewReader(header(FrameStdout, 10)), iotest.ErrReader(boom))},
		{"mid payload", io.MultiReader(bytes.NewReader(cat(header(FrameStdout, 10), []byte("abc"))), iotest.ErrReader(boom))},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			if _, _, err := ReadFrame(tt.r, nil); !errors.Is(err, boom) {
				t.Fatalf("ReadFrame = %v, want %v", err, boom)
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
		bytes.Repeat(header(FrameStdout, 0), 100),
		bytes.Repeat(header(0, 0xffffffff), 3),
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
		r := bytes.NewReader(in)
		buf := make([]byte, 0, 32)
		for frames := 0; ; frames++ {
			if frames > len(in)/5 {
				t.Fatalf("input %d: ReadFrame returned more frames than the input can hold", i)
			}
			_, p, err := ReadFrame(r, buf)
			if err != nil {
				break
			}
			if len(p) > MaxFrame {
				t.Fatalf("input %d: payload of %d bytes", i, len(p))
			}
			buf = p
		}
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

func TestYamuxConfig(t *testing.T) {
	t.Parallel()
	c := YamuxConfig()
	if err := yamux.VerifyConfig(c); err != nil {
		t.Fatalf("YamuxConfig is invalid: %v", err)
	}
	if c.LogOutput != io.Discard {
		t.Errorf("LogOutput is not io.Discard")
	}
	if c.ConnectionWriteTimeout < 10*time.Second {
		t.Errorf("ConnectionWriteTimeout %v is short for a stalled emulated guest", c.ConnectionWriteTimeout)
	}
	// Each call returns its own copy: one side's changes cannot reach
	// the other's.
	c.AcceptBacklog = 1
	if YamuxConfig().AcceptBacklog == 1 {
		t.Errorf("YamuxConfig returned a shared config")
	}
}

// TestSession runs the whole protocol in memory: the handshake through
// stale bytes, yamux on the handshake's buffered readers, and requests
// answered with frames on concurrent streams.
func TestSession(t *testing.T) {
	t.Parallel()
	hostConn, agentConn := pipe(t)
	type agentEnd struct {
		r *bufio.Reader
		net.Conn
	}
	serverErr := make(chan error, 1)
	go func() {
		br := bufio.NewReaderSize(agentConn, portBuf)
		nonce, err := AwaitHello(br)
		if err != nil {
			serverErr <- err
			return
		}
		if _, err := agentConn.Write(cat(ReadyLine(nonceOf(0)), ReadyLine(nonce))); err != nil {
			serverErr <- err
			return
		}
		sess, err := yamux.Server(readerConn{br, agentConn}, YamuxConfig())
		if err != nil {
			serverErr <- err
			return
		}
		defer sess.Close()
		serverErr <- nil
		for {
			st, err := sess.Accept()
			if err != nil {
				return
			}
			go func() {
				defer st.Close()
				line, err := bufio.NewReader(st).ReadBytes('\n')
				if err != nil {
					return
				}
				var req Request
				if err := json.Unmarshal(line, &req); err != nil {
					b, _ := json.Marshal(Exit{Error: "bad request: " + err.Error()})
					WriteFrame(st, FrameExit, b)
					return
				}
				for _, a := range req.Argv {
					WriteFrame(st, FrameStdout, []byte(a))
				}
				WriteFrame(st, FrameStderr, []byte(req.Op))
				b, _ := json.Marshal(Exit{ExitCode: len(req.Argv)})
				WriteFrame(st, FrameExit, b)
			}()
		}
	}()

	n := nonceOf(0x61)
	if _, err := hostConn.Write(cat([]byte("stale\x00bytes\n"), HelloLine(n))); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReaderSize(hostConn, portBuf)
	if _, err := AwaitReady(br, n); err != nil {
		t.Fatalf("AwaitReady: %v", err)
	}
	if err := <-serverErr; err != nil {
		t.Fatalf("agent: %v", err)
	}
	sess, err := yamux.Client(readerConn{br, hostConn}, YamuxConfig())
	if err != nil {
		t.Fatal(err)
	}
	defer sess.Close()

	do := func(req Request) (stdout, stderr string, e Exit, err error) {
		st, err := sess.OpenStream()
		if err != nil {
			return "", "", Exit{}, err
		}
		defer st.Close()
		line, _ := json.Marshal(req)
		if _, err := st.Write(append(line, '\n')); err != nil {
			return "", "", Exit{}, err
		}
		sr := bufio.NewReader(st)
		var out, errb strings.Builder
		buf := make([]byte, 64)
		for {
			typ, p, err := ReadFrame(sr, buf)
			if err != nil {
				return "", "", Exit{}, err
			}
			switch typ {
			case FrameStdout:
				out.Write(p)
			case FrameStderr:
				errb.Write(p)
			case FrameExit:
				err := json.Unmarshal(p, &e)
				return out.String(), errb.String(), e, err
			}
		}
	}
	type result struct {
		i              int
		stdout, stderr string
		e              Exit
		err            error
	}
	const streams = 8
	results := make(chan result, streams)
	for i := range streams {
		go func() {
			argv := strings.Split(strings.Repeat("x,", i)+"end", ",")
			out, errs, e, err := do(Request{Op: OpExec, Argv: argv})
			results <- result{i, out, errs, e, err}
		}()
	}
	for range streams {
		r := <-results
		if r.err != nil {
			t.Fatalf("stream %d: %v", r.i, r.err)
		}
		if want := strings.Repeat("x", r.i) + "end"; r.stdout != want || r.stderr != OpExec || r.e.ExitCode != r.i+1 {
			t.Fatalf("stream %d: stdout %q stderr %q exit %+v; want %q %q %d", r.i, r.stdout, r.stderr, r.e, want, OpExec, r.i+1)
		}
	}
}

// readerConn reads through the handshake's buffer, as both callers do.
type readerConn struct {
	r *bufio.Reader
	net.Conn
}

func (c readerConn) Read(p []byte) (int, error) { return c.r.Read(p) }

func FuzzReadFrame(f *testing.F) {
	f.Add([]byte{})
	f.Add(frame(f, FrameStdout, []byte("hello\n")))
	f.Add(cat(frame(f, FrameStderr, nil), frame(f, FrameExit, []byte(`{"exit_code":1}`))))
	f.Add(header(FrameStdout, 10))
	f.Add(cat(header(FrameStdout, 10), []byte("abc")))
	f.Add(header(FrameExit, MaxFrame+1))
	f.Add(header(0xff, 0xffffffff))
	f.Add([]byte{1, 0, 0})
	f.Add(HelloLine(nonceOf(3)))
	f.Fuzz(func(t *testing.T, data []byte) {
		r := bytes.NewReader(data)
		var out bytes.Buffer
		buf := make([]byte, 0, 4)
		consumed := 0
		for {
			typ, p, err := ReadFrame(r, buf)
			if err != nil {
				rest := data[consumed:]
				switch {
				case len(rest) == 0:
					if err != io.EOF {
						t.Fatalf("at a frame boundary: %v, want io.EOF", err)
					}
				case len(rest) < 5:
					if !errors.Is(err, io.ErrUnexpectedEOF) {
						t.Fatalf("cut header: %v, want io.ErrUnexpectedEOF", err)
					}
				default:
					n := binary.BigEndian.Uint32(rest[1:5])
					if n <= MaxFrame && uint32(len(rest)-5) >= n {
						t.Fatalf("complete %d-byte frame refused: %v", n, err)
					}
					if n > MaxFrame && (errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF)) {
						t.Fatalf("oversize frame reported as end of stream: %v", err)
					}
					if n <= MaxFrame && !errors.Is(err, io.EOF) && !errors.Is(err, io.ErrUnexpectedEOF) {
						t.Fatalf("cut payload: %v", err)
					}
				}
				break
			}
			if len(p) > MaxFrame {
				t.Fatalf("payload of %d bytes exceeds MaxFrame", len(p))
			}
			if err := WriteFrame(&out, typ, p); err != nil {
				t.Fatal(err)
			}
			consumed += 5 + len(p)
			buf = p // reuse, as callers do
		}
		// Every frame read re-encodes to exactly the bytes it came from.
		if !bytes.Equal(out.Bytes(), data[:consumed]) {
			t.Fatalf("re-encoded frames differ from the input")
		}
	})
}

// The ready line carries the agent's version and capabilities; the first
// agents sent the nonce alone and are version 1 with the first three.
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
		{"the first agents", "SMOLVM1 READY " + n + "\n", Peer{Version: 1, Caps: []string{CapExec, CapIdentity, CapShutdown}}, true},
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

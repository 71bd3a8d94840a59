package wire

import (
	"bufio"
	"bytes"
	"path"
	"slices"
	"strings"
	"testing"
	"unicode"
)

// handshakeSeeds are the inputs of both handshake targets: the lines as
// sent, and the stale bytes a restarted peer finds in the pipe.
func handshakeSeeds() [][]byte {
	n, old := nonceOf(0xa1), nonceOf(0x0b)
	return [][]byte{
		HelloLine(n),
		ReadyLine(n),
		cat([]byte("garbage\n\x00\xff junk"), HelloLine(n)),
		cat(ReadyLine(old), h2frame([]byte("old output\n")), HelloLine(n)),
		cat([]byte("SMOLVM1 HELLO abc\n"), HelloLine(n)),
		[]byte("SMOLVM1 HELLO " + n + "\r\n"),
		[]byte("SMOLVM1 HELLO " + n),
		[]byte("SMOLVM1 HELLO SMOLVM1 HELLO " + n + "\n"),
		[]byte("SMOLVM1 READY " + n + "\n"),
		[]byte("SMOLVM1 READY " + n + " v=7 caps=exec,files,pty x=unknown\r\n"),
		[]byte("SMOLVM1 READY " + n + " v=-1 caps= v=99999999999999999999\n"),
		[]byte("SMOLVM1 READY " + n + "ff v=1\n"),
		cat(bytes.Repeat([]byte{'x'}, 700), HelloLine(n)),
		bytes.Repeat([]byte{0, 0, 0, 4, 0, 0, 0, 0, 0}, 20),
	}
}

// FuzzAwaitHello: the agent's side of the handshake never panics, accepts
// the first complete hello line of its input and nothing else, and what it
// accepts survives the encoder: HelloLine and ReadyLine of that nonce parse
// back to it. LastHello, which replays a cut hello, finds the last one.
func FuzzAwaitHello(f *testing.F) {
	for _, s := range handshakeSeeds() {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		if h := LastHello(in); h != nil {
			if !bytes.HasPrefix(h, []byte(helloPrefix)) || !bytes.HasSuffix(in, h) {
				t.Fatalf("LastHello(%q) = %q: not a suffix starting with a hello", in, h)
			}
			if bytes.Contains(h[1:], []byte(helloPrefix)) {
				t.Fatalf("LastHello(%q) = %q: not the last hello", in, h)
			}
		} else if bytes.Contains(in, []byte(helloPrefix)) {
			t.Fatalf("LastHello(%q) = nil, but the input holds a hello", in)
		}

		// The buffer the real callers use: inputs this small never fill
		// it, so the result is exactly the line-by-line reading below.
		got, err := AwaitHello(bufio.NewReaderSize(bytes.NewReader(in), portBuf))
		want, ok := firstHello(in)
		if len(in) < portBuf {
			if ok != (err == nil) || got != want {
				t.Fatalf("AwaitHello(%q) = %q, %v; want %q (found %v)", in, got, err, want, ok)
			}
		}
		if err != nil {
			if got != "" {
				t.Fatalf("AwaitHello(%q) returned nonce %q with error %v", in, got, err)
			}
			return
		}
		// The nonce follows a hello prefix, after any blanks the agent
		// skips as it trims the line.
		if len(got) != nonceLen || strings.TrimSpace(got) != got || !helloBefore(in, got) {
			t.Fatalf("AwaitHello(%q) = %q: not a nonce from a hello line of the input", in, got)
		}
		if again, err := AwaitHello(bufio.NewReader(bytes.NewReader(HelloLine(got)))); err != nil || again != got {
			t.Fatalf("AwaitHello(HelloLine(%q)) = %q, %v", got, again, err)
		}
		peer, err := AwaitReady(bufio.NewReader(bytes.NewReader(ReadyLine(got))), got)
		if err != nil || peer.Version != Version || !slices.Equal(peer.Caps, Capabilities()) {
			t.Fatalf("AwaitReady(ReadyLine(%q)) = %+v, %v", got, peer, err)
		}
	})
}

// helloBefore reports whether in holds a hello prefix followed, after
// blanks, by nonce.
func helloBefore(in []byte, nonce string) bool {
	for rest := in; ; {
		i := bytes.Index(rest, []byte(helloPrefix))
		if i < 0 {
			return false
		}
		rest = rest[i+len(helloPrefix):]
		if bytes.HasPrefix(bytes.TrimLeftFunc(rest, unicode.IsSpace), []byte(nonce)) {
			return true
		}
	}
}

// firstHello is AwaitHello's contract read literally: the first complete
// line whose text after its last hello prefix is a nonce once trimmed.
func firstHello(in []byte) (string, bool) {
	for {
		i := bytes.IndexByte(in, '\n')
		if i < 0 {
			return "", false
		}
		line := in[:i+1]
		in = in[i+1:]
		if j := bytes.LastIndex(line, []byte(helloPrefix)); j >= 0 {
			if n := bytes.TrimSpace(line[j+len(helloPrefix):]); len(n) == nonceLen {
				return string(n), true
			}
		}
	}
}

// FuzzAwaitReady: the host's side of the handshake never panics, accepts
// only a ready line for its own nonce, and reads back what ReadyLine wrote.
func FuzzAwaitReady(f *testing.F) {
	for _, s := range handshakeSeeds() {
		f.Add(s, nonceOf(0xa1))
	}
	f.Add([]byte("SMOLVM1 READY \n"), "")
	f.Add([]byte("SMOLVM1 READY  v=2\n"), " ")
	f.Fuzz(func(t *testing.T, in []byte, nonce string) {
		peer, err := AwaitReady(bufio.NewReaderSize(bytes.NewReader(in), portBuf), nonce)
		if err == nil && !bytes.Contains(in, []byte(readyPrefix+nonce)) {
			t.Fatalf("AwaitReady(%q, %q) = %+v: accepted input without the ready line", in, nonce, peer)
		}
		// Every nonce AwaitHello can return makes a ready line that parses
		// back to this agent.
		if len(nonce) != nonceLen || strings.TrimSpace(nonce) != nonce || strings.ContainsRune(nonce, '\n') {
			return
		}
		peer, err = AwaitReady(bufio.NewReader(bytes.NewReader(cat(in, []byte("\n"), ReadyLine(nonce)))), nonce)
		if err != nil {
			t.Fatalf("AwaitReady after %q: %v", in, err)
		}
		if !strings.Contains(string(in), readyPrefix+nonce) && (peer.Version != Version || !slices.Equal(peer.Caps, Capabilities())) {
			t.Fatalf("AwaitReady(ReadyLine(%q)) = %+v", nonce, peer)
		}
	})
}

// FuzzParseMount: a smolvm.mount value never panics the agent, and one it
// accepts is a tag and a clean absolute path below / that Param writes back
// to a value parsing the same.
func FuzzParseMount(f *testing.F) {
	for _, s := range []string{
		"m0:/mnt/data:ro",
		"m1:/work:rw",
		"m2:/home/user/my%20files%3Av2/100%25/%C3%A9%22q'%09%5Cx:rw",
		"m0:/mnt//x/../y/:rw",
		"m0:/x/..:ro",
		"m0:/:ro",
		"m0:/x/../..:ro",
		"m0:%2F..%2F..%2Fetc:rw",
		"m0:/x%00y:ro",
		"m0:/x%zz:ro",
		"m0:%2E%2E:ro",
		":/x:rw",
		"m0:/x:rw:extra",
		"m0:/x:RW",
		"a b:/x:ro",
		"",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, v string) {
		m, err := ParseMount(v)
		if err != nil {
			return
		}
		if m.Tag == "" || strings.Contains(m.Tag, ":") {
			t.Fatalf("ParseMount(%q) = %+v: bad tag", v, m)
		}
		if !path.IsAbs(m.Path) || path.Clean(m.Path) != m.Path || m.Path == "/" || strings.ContainsRune(m.Path, 0) {
			t.Fatalf("ParseMount(%q) = %+v: path is not clean, absolute and below /", v, m)
		}
		checkParam(t, m)
	})
}

// FuzzMountParam: every mount the host can describe (a plain tag, a clean
// absolute path with any bytes) is one kernel command line word that the
// agent parses back to the same mount.
func FuzzMountParam(f *testing.F) {
	for _, s := range []struct {
		tag, path string
		ro        bool
	}{
		{"m0", "/mnt/data", true},
		{"m1", "/work", false},
		{"m2", "/home/user/my files:v2/100%/é\"q'\t\\x", false},
		{"m3", "/a=b,c+d@e~f_g-h.i", true},
		{"m4", "/%2e%2e/%00/%zz", true},
		{"m5", "/new\nline smolvm.mount=evil:/etc:rw", false},
		{"m6", "/\x00nul", false},
		{"m7", "/" + strings.Repeat("x", 300), true},
	} {
		f.Add(s.tag, s.path, s.ro)
	}
	f.Fuzz(func(t *testing.T, tag, p string, ro bool) {
		if !plainTag(tag) || !path.IsAbs(p) || path.Clean(p) != p || p == "/" || strings.ContainsRune(p, 0) {
			return
		}
		checkParam(t, Mount{Tag: tag, Path: p, ReadOnly: ro})
	})
}

// plainTag is a tag the kernel keeps as one word and ParseMount splits
// right: what Param expects of its caller.
func plainTag(tag string) bool {
	return tag != "" && !strings.ContainsFunc(tag, func(r rune) bool {
		return r == ':' || r == '"' || r == 0 || r == unicode.ReplacementChar || unicode.IsSpace(r) || unicode.IsControl(r)
	})
}

// checkParam writes m as a parameter, splits it as the kernel and the agent
// do, and parses it again.
func checkParam(t *testing.T, m Mount) {
	t.Helper()
	p := m.Param()
	if plainTag(m.Tag) {
		if len(strings.Fields(p)) != 1 || strings.ContainsAny(p, "\"\x00") || strings.Count(p, ":") != 2 {
			t.Fatalf("Param(%+v) = %q: not one word of three fields", m, p)
		}
	}
	k, v, ok := strings.Cut(p, "=")
	if !ok || k != MountKey {
		t.Fatalf("Param(%+v) = %q: want %s=...", m, p, MountKey)
	}
	got, err := ParseMount(v)
	if err != nil {
		t.Fatalf("ParseMount(Param(%+v) = %q): %v", m, p, err)
	}
	if got != m {
		t.Fatalf("round trip of %+v gave %+v (via %q)", m, got, p)
	}
}

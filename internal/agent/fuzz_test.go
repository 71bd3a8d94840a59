package agent

import (
	"bytes"
	"io"
	"net"
	"testing"

	"golang.org/x/net/http2"

	"github.com/smolvm/smolvm/internal/agent/wire"
)

// h2Stream is what an HTTP/2 client sends: the preface, then frames of
// several types and sizes.
func h2Stream(tb testing.TB) []byte {
	var b bytes.Buffer
	b.WriteString(http2Preface)
	fr := http2.NewFramer(&b, nil)
	for _, err := range []error{
		fr.WriteSettings(http2.Setting{ID: http2.SettingMaxFrameSize, Val: 1 << 20}),
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: []byte{0x82, 0x86}, EndHeaders: true}),
		fr.WriteData(1, false, make([]byte, 100)),
		fr.WriteData(1, true, nil),
		fr.WriteWindowUpdate(0, 1<<16),
		fr.WritePing(false, [8]byte{1}),
		fr.WriteRSTStream(1, http2.ErrCodeCancel),
		fr.WriteGoAway(1, http2.ErrCodeNo, []byte("bye")),
	} {
		if err != nil {
			tb.Fatal(err)
		}
	}
	return b.Bytes()
}

// framesValid is the guard's contract read literally: the input so far is
// a prefix of the preface followed by frames of known types no larger than
// max; a frame may still be arriving.
func framesValid(b []byte, max int) bool {
	k := min(len(b), len(http2Preface))
	if string(b[:k]) != http2Preface[:k] {
		return false
	}
	b = b[k:]
	for len(b) >= 9 {
		length := int(b[0])<<16 | int(b[1])<<8 | int(b[2])
		if length > max || b[3] > 9 {
			return false
		}
		b = b[9+min(length, len(b)-9):]
	}
	return true
}

// chunkConn is a connection whose reads return the chunks given, one each.
type chunkConn struct {
	net.Conn
	chunks [][]byte
}

func (c *chunkConn) Read(p []byte) (int, error) {
	if len(c.chunks) == 0 {
		return 0, io.EOF
	}
	n := copy(p, c.chunks[0])
	c.chunks[0] = c.chunks[0][n:]
	if len(c.chunks[0]) == 0 {
		c.chunks = c.chunks[1:]
	}
	return n, nil
}

// FuzzFrameGuard: whatever the host sends, the guard never panics, its
// verdict is the frame grammar's and does not depend on how the stream was
// cut into reads, and once it refused it refuses every later read.
func FuzzFrameGuard(f *testing.F) {
	valid := h2Stream(f)
	hello := wire.HelloLine(wire.NewNonce(make([]byte, 16)))
	f.Add(valid, uint32(1<<20), uint16(0))
	f.Add(valid, uint32(1<<20), uint16(7))
	f.Add(valid, uint32(16), uint16(9))
	f.Add(append(append([]byte{}, valid...), hello...), uint32(1<<20), uint16(1))
	f.Add(hello, uint32(1<<20), uint16(3))
	f.Add([]byte(http2Preface[:10]), uint32(1<<14), uint16(2))
	f.Add(append([]byte(http2Preface), 0, 0, 0, 42, 0, 0, 0, 0, 0), uint32(1<<20), uint16(4))
	f.Add(append([]byte(http2Preface), 0xff, 0xff, 0xff, 0, 0, 0, 0, 0, 1), uint32(0xffffff), uint16(5))
	f.Add(append([]byte(http2Preface), 0, 0, 8, 6, 0, 0, 0), uint32(8), uint16(1))
	f.Fuzz(func(t *testing.T, in []byte, maxFrame uint32, step uint16) {
		limit := int(maxFrame & 0xffffff)
		want := framesValid(in, limit)

		// Fed whole, a byte at a time and in the fuzzed step, the guard
		// says what the grammar says.
		for _, n := range []int{len(in), 1, 1 + int(step)%(len(in)+1)} {
			g := &frameGuard{max: limit}
			ok := true
			for i := 0; i < len(in) && ok; i += max(n, 1) {
				ok = g.check(in[i:min(i+max(n, 1), len(in))])
			}
			if ok != want {
				t.Fatalf("in steps of %d with max %d: valid = %v, want %v", n, limit, ok, want)
			}
		}

		// Through Read, the read that brings the first bad byte fails, and
		// so does every read after it.
		var chunks [][]byte
		n := 1 + int(step)%16
		for i := 0; i < len(in); i += n {
			chunks = append(chunks, in[i:min(i+n, len(in))])
		}
		g := &frameGuard{Conn: &chunkConn{chunks: chunks}, max: limit}
		buf := make([]byte, n)
		var got []byte
		for {
			k, err := g.Read(buf)
			got = append(got, buf[:k]...)
			if err == io.EOF {
				if !want || !bytes.Equal(got, in) {
					t.Fatalf("read to the end: %d of %d bytes, valid %v", len(got), len(in), want)
				}
				return
			}
			if err != nil {
				if err != errNotHTTP2 || want {
					t.Fatalf("read failed with %v after %d bytes; input valid %v", err, len(got), want)
				}
				if k != 0 || !framesValid(got, limit) || framesValid(in[:min(len(got)+n, len(in))], limit) {
					t.Fatalf("refused at %d bytes (read of %d): not where the stream went bad", len(got), k)
				}
				if k, err := g.Read(buf); k != 0 || err != errNotHTTP2 {
					t.Fatalf("a read after the refusal: %d, %v", k, err)
				}
				return
			}
		}
	})
}

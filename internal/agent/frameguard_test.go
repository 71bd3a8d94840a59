package agent

import (
	"bytes"
	"net"
	"testing"

	"golang.org/x/net/http2"

	"github.com/smolvm/smolvm/internal/agent/wire"
)

// frames writes a client preface and frames the way an HTTP/2 client does.
func frames(t *testing.T, payloads ...int) []byte {
	var b bytes.Buffer
	b.WriteString(http2Preface)
	fr := http2.NewFramer(&b, nil)
	fr.WriteSettings()
	for i, n := range payloads {
		if err := fr.WriteData(uint32(2*i+1), false, make([]byte, n)); err != nil {
			t.Fatal(err)
		}
	}
	fr.WritePing(false, [8]byte{1})
	return b.Bytes()
}

func TestFrameGuard(t *testing.T) {
	valid := frames(t, 0, 1, 100, 16384, 70000)
	for _, tt := range []struct {
		name string
		in   []byte
		max  int
		ok   bool
	}{
		{"frames", valid, 1 << 20, true},
		{"frames cut anywhere", valid, 1 << 20, true},
		{"a hello after frames", append(append([]byte{}, valid...), wire.HelloLine(wire.NewNonce(make([]byte, 16)))...), 1 << 20, false},
		{"a hello instead of the preface", wire.HelloLine(wire.NewNonce(make([]byte, 16))), 1 << 20, false},
		{"a frame over the limit", valid, 1 << 10, false},
		{"an unknown frame type", append(append([]byte{}, valid...), 0, 0, 0, 42, 0, 0, 0, 0, 0), 1 << 20, false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			// Fed in every split, the verdict is the same.
			for _, step := range []int{1, 7, 9, 1000, len(tt.in)} {
				g := &frameGuard{max: tt.max}
				ok := true
				for i := 0; i < len(tt.in) && ok; i += step {
					ok = g.check(tt.in[i:min(i+step, len(tt.in))])
				}
				if ok != tt.ok {
					t.Errorf("in steps of %d: valid = %v, want %v", step, ok, tt.ok)
				}
			}
		})
	}
}

// TestFrameGuardRead: the read that brings a non-frame fails, and so does
// every read after it.
func TestFrameGuardRead(t *testing.T) {
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	g := &frameGuard{Conn: a, max: 1 << 20}
	go func() {
		b.Write(frames(t, 10))
		b.Write([]byte("SMOLVM1 HELLO 00\n"))
	}()
	buf := make([]byte, 4096)
	var err error
	for err == nil {
		_, err = g.Read(buf)
	}
	if err != errNotHTTP2 {
		t.Fatalf("read error %v", err)
	}
	if _, err := g.Read(buf); err != errNotHTTP2 {
		t.Errorf("a later read: %v", err)
	}
}

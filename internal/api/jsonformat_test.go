package api

import (
	"bytes"
	"io"
	"runtime"
	"strings"
	"testing"

	"github.com/danielgtaylor/huma/v2"
)

// stringCases are strings whose encoding depends on where they are cut:
// characters of every width, broken and truncated sequences, what JSON
// must escape, and what encoding/json escapes by choice.
var stringCases = []string{
	"",
	"plain ascii output\n",
	"héllo wörld €uro 𝄞 clef 日本語",
	"\xff\xfe broken \xe2\x82 truncated \xf0\x9f\x98 and \xe2\x82\xac whole",
	"\xed\xa0\x80 surrogate, \xc0\xaf overlong, \xf4\x90\x80\x80 past U+10FFFF",
	"quotes \" back\\slash \t tab \x00 nul \x1f unit <script>&amp;</script>",
	"line\u2028separator\u2029paragraph \ufffd replacement",
	strings.Repeat("€", 40) + strings.Repeat("\xe2\x82", 9) + strings.Repeat("𝄞x", 13),
}

func wantJSON(t testing.TB, v any) string {
	t.Helper()
	var b bytes.Buffer
	if err := huma.DefaultJSONFormat.Marshal(&b, v); err != nil {
		t.Fatal(err)
	}
	return b.String()
}

// Written a piece at a time, a string reads exactly as encoding/json
// writes it whole, wherever the pieces are cut.
func TestWriteJSONStringMatchesWhole(t *testing.T) {
	for _, s := range stringCases {
		want := strings.TrimSuffix(wantJSON(t, s), "\n")
		for chunk := 1; chunk <= 19; chunk++ {
			var b bytes.Buffer
			if err := writeJSONString(&b, s, chunk); err != nil {
				t.Fatal(err)
			}
			if b.String() != want {
				t.Errorf("%q in pieces of %d:\n got %s\nwant %s", s, chunk, b.String(), want)
			}
		}
	}
}

func FuzzWriteJSONString(f *testing.F) {
	for _, s := range stringCases {
		f.Add(s, 5)
	}
	f.Fuzz(func(t *testing.T, s string, chunk int) {
		chunk = 1 + (chunk&0xff)%64
		var b bytes.Buffer
		if err := writeJSONString(&b, s, chunk); err != nil {
			t.Fatal(err)
		}
		if want := strings.TrimSuffix(wantJSON(t, s), "\n"); b.String() != want {
			t.Fatalf("%q in pieces of %d:\n got %s\nwant %s", s, chunk, b.String(), want)
		}
	})
}

// Exec answers, large or not, read exactly as huma's own format writes
// them, and so does every other body.
func TestMarshalJSONMatchesHuma(t *testing.T) {
	big := strings.Repeat(strings.Join(stringCases, "|"), 3000)
	timeout := &CommandTimeoutProblem{Problem: *newProblem(408, CodeCommandTimeout, "too slow <&>"), Timeout: 2, Stdout: big, Stderr: "short", DurationMS: 2003}
	bodies := []any{
		ExecResult{ExitCode: 1, Stdout: big, Stderr: big[:bulkyMin+3], DurationMS: 12},
		&ExecResult{Stdout: "small", Stderr: big},
		ExecResult{Stdout: "smolvm-bulky-x"},
		timeout,
		newProblem(404, CodeSandboxNotFound, "no sandbox vm-1"),
		map[string]any{"a": []int{1, 2}},
	}
	for i, v := range bodies {
		want := wantJSON(t, v)
		var b bytes.Buffer
		if err := marshalJSON(&b, v); err != nil {
			t.Fatal(err)
		}
		if b.String() != want {
			t.Errorf("body %d (%T): %d bytes differ from huma's %d", i, v, b.Len(), len(want))
		}
	}
	if timeout.Stdout != big {
		t.Errorf("marshalJSON changed the value it was given")
	}
}

// A large answer never passes whole through encoding/json, whose buffer
// pool would keep it alive.
func TestMarshalJSONLargeInPieces(t *testing.T) {
	out := strings.Repeat("x", 32<<20)
	v := ExecResult{Stdout: out, Stderr: out}
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	if err := marshalJSON(io.Discard, v); err != nil {
		t.Fatal(err)
	}
	runtime.ReadMemStats(&after)
	if n := after.TotalAlloc - before.TotalAlloc; n > 8<<20 {
		t.Errorf("writing a 64 MiB answer allocated %d MiB", n>>20)
	}
}

// Small answers encoded after a large one, each between two collections,
// do not keep the large one's memory alive: encoding/json would hand its
// pooled buffer on from one to the next. On one P the pool hands it on
// every time; on several, only sometimes.
func TestMarshalJSONLeavesNoPooledBuffer(t *testing.T) {
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(1))
	if err := marshalJSON(io.Discard, ExecResult{Stderr: strings.Repeat("x", 64<<20)}); err != nil {
		t.Fatal(err)
	}
	var m runtime.MemStats
	for range 4 {
		runtime.GC()
		if err := marshalJSON(io.Discard, ExecResult{Stdout: "small"}); err != nil {
			t.Fatal(err)
		}
	}
	runtime.GC()
	runtime.ReadMemStats(&m)
	if m.HeapAlloc > 32<<20 {
		t.Errorf("%d MiB of heap still live after a 64 MiB answer", m.HeapAlloc>>20)
	}
}

package api

import (
	"bytes"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"io"
	"unicode/utf8"

	"github.com/danielgtaylor/huma/v2"
)

// jsonFormat is huma's JSON format (no HTML escaping, a newline after the
// value), except that a command's collected output, up to 256 MiB in one
// string, is written in pieces instead of whole.
//
// encoding/json builds every value whole in a buffer that it keeps in a
// sync.Pool whatever its size. The buffer of a 100 MB answer then waits in
// the pool, and any small answer encoded before the next two collections
// takes it out and puts it back: on a busy server it stays alive for good.
var jsonFormat = huma.Format{Marshal: marshalJSON, Unmarshal: json.Unmarshal}

// bulkyMin is the length from which a string is written in pieces.
const bulkyMin = 64 << 10

// bulkyChunk is the size of each piece.
const bulkyChunk = 64 << 10

func marshalJSON(w io.Writer, v any) error {
	var bulky []*string
	switch b := v.(type) {
	case ExecResult:
		v, bulky = &b, []*string{&b.Stdout, &b.Stderr}
	case *ExecResult:
		c := *b
		v, bulky = &c, []*string{&c.Stdout, &c.Stderr}
	case *CommandTimeoutProblem:
		c := *b
		v, bulky = &c, []*string{&c.Stdout, &c.Stderr}
	}
	// Each large string is swapped for a placeholder that JSON writes as
	// itself; the encoded value is then written with each placeholder
	// replaced by its string, encoded a piece at a time.
	var marks []string
	var values []string
	for _, s := range bulky {
		if len(*s) < bulkyMin {
			continue
		}
		// Random, so that no other value can be the same string.
		mark := "smolvm-bulky-" + rand.Text()
		marks, values = append(marks, `"`+mark+`"`), append(values, *s)
		*s = mark
	}
	var out bytes.Buffer
	enc := json.NewEncoder(&out)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		return err
	}
	rest := out.Bytes()
	for i, mark := range marks {
		at := bytes.Index(rest, []byte(mark))
		if at < 0 {
			return fmt.Errorf("encoding a large string: its placeholder is missing")
		}
		if _, err := w.Write(rest[:at]); err != nil {
			return err
		}
		if err := writeJSONString(w, values[i], bulkyChunk); err != nil {
			return err
		}
		rest = rest[at+len(mark):]
	}
	_, err := w.Write(rest)
	return err
}

// writeJSONString writes s as a JSON string exactly as encoding/json does
// (without HTML escaping), encoding at most about chunk bytes at a time.
// Pieces end only where no character spans the cut, so each invalid byte
// is replaced and each valid character escaped as in the whole string.
func writeJSONString(w io.Writer, s string, chunk int) error {
	chunk = max(chunk, utf8.UTFMax)
	var piece bytes.Buffer
	enc := json.NewEncoder(&piece)
	enc.SetEscapeHTML(false)
	if _, err := io.WriteString(w, `"`); err != nil {
		return err
	}
	for len(s) > 0 {
		n := cutAt(s, chunk)
		piece.Reset()
		if err := enc.Encode(s[:n]); err != nil {
			return err
		}
		// Encode wrote the piece quoted and with a newline.
		b := piece.Bytes()
		if _, err := w.Write(b[1 : len(b)-2]); err != nil {
			return err
		}
		s = s[n:]
	}
	_, err := io.WriteString(w, `"`)
	return err
}

// cutAt is where to cut s near n: n itself unless a valid UTF-8 character
// spans it, else that character's start.
func cutAt(s string, n int) int {
	if n >= len(s) {
		return len(s)
	}
	// A character spanning n starts at most UTFMax-1 bytes before it.
	for i := n; i > n-utf8.UTFMax && i > 0; i-- {
		if !utf8.RuneStart(s[i]) {
			continue
		}
		if r, size := utf8.DecodeRuneInString(s[i:]); i < n && i+size > n && (r != utf8.RuneError || size > 1) {
			return i
		}
		return n
	}
	return n
}

package mcp

import (
	"bytes"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"testing"
)

// An answer past maxAnswer is cut off while it is written, not held whole
// and then truncated; a smaller one arrives intact.
func TestHandlerCallerCapsAnswers(t *testing.T) {
	chunk := bytes.Repeat([]byte("x"), 1<<20)
	var wrote int
	var writeErr error
	big := HandlerCaller(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		for range 2 * maxAnswer / len(chunk) {
			n, err := w.Write(chunk)
			wrote += n
			if err != nil {
				writeErr = err
				return
			}
		}
	}))
	if _, err := big(httptest.NewRequest(http.MethodGet, "/x", nil)); !errors.Is(err, ErrAnswerTooLarge) {
		t.Fatalf("an answer of twice the cap: %v, want ErrAnswerTooLarge", err)
	}
	if wrote > maxAnswer || !errors.Is(writeErr, ErrAnswerTooLarge) {
		t.Errorf("the handler wrote %d bytes and saw %v; the cap is %d", wrote, writeErr, maxAnswer)
	}

	small := HandlerCaller(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusTeapot)
		io.WriteString(w, "short")
	}))
	resp, err := small(httptest.NewRequest(http.MethodGet, "/x", nil))
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusTeapot || string(b) != "short" {
		t.Errorf("small answer: %d %q", resp.StatusCode, b)
	}
}

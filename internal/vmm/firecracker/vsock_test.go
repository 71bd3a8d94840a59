package firecracker

import (
	"context"
	"errors"
	"io"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/smolvm/smolvm/internal/agent/wire"
)

// hybridVsock serves Firecracker's side of a hybrid vsock socket with
// answer deciding what each connection gets after its command line.
func hybridVsock(t *testing.T, answer func(cmd string, c net.Conn)) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "vsock.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				// Firecracker reads the command in one go; it must arrive
				// whole.
				b := make([]byte, 64)
				n, err := c.Read(b)
				if err != nil {
					return
				}
				answer(string(b[:n]), c)
			}()
		}
	}()
	return path
}

func TestDialVsock(t *testing.T) {
	t.Run("connect", func(t *testing.T) {
		var tries int
		path := hybridVsock(t, func(cmd string, c net.Conn) {
			if cmd != "CONNECT 1024\n" {
				c.Write([]byte("bad command " + cmd))
				return
			}
			// The guest is booting for the first two tries.
			if tries++; tries < 3 {
				return
			}
			// The guest's first bytes follow the answer at once: none of
			// them may be lost to the dialler.
			c.Write([]byte("OK 1073741825\nSMOLVM1 hello"))
			io.Copy(c, c)
		})
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		c, err := dialVsock(ctx, path, wire.VsockPort)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		b := make([]byte, len("SMOLVM1 hello"))
		if _, err := io.ReadFull(c, b); err != nil || string(b) != "SMOLVM1 hello" {
			t.Fatalf("first bytes: %q, %v", b, err)
		}
		c.Write([]byte("echo"))
		if _, err := io.ReadFull(c, b[:4]); err != nil || string(b[:4]) != "echo" {
			t.Fatalf("stream: %q, %v", b[:4], err)
		}
		if tries != 3 {
			t.Errorf("%d tries, want 3", tries)
		}
	})
	t.Run("refused until the end", func(t *testing.T) {
		path := hybridVsock(t, func(string, net.Conn) {})
		// Long enough for a loaded machine to finish one try before the
		// deadline: the error names the last try that ended on its own.
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		defer cancel()
		_, err := dialVsock(ctx, path, wire.VsockPort)
		if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "does not listen on the port yet") || !strings.Contains(err.Error(), "port 1024") {
			t.Fatalf("dial = %v", err)
		}
	})
	t.Run("garbage", func(t *testing.T) {
		for _, answer := range []string{"HELLO THERE\n", "OK\n", "OK port\n", "KO 12\n", strings.Repeat("x", 100)} {
			path := hybridVsock(t, func(_ string, c net.Conn) { c.Write([]byte(answer)) })
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			start := time.Now()
			_, err := dialVsock(ctx, path, wire.VsockPort)
			cancel()
			var bad *badAnswerError
			if !errors.As(err, &bad) || !strings.Contains(err.Error(), "is not Firecracker's") {
				t.Errorf("answer %q: dial = %v", answer, err)
			}
			if time.Since(start) > 2*time.Second {
				t.Errorf("answer %q: tried again for %s", answer, time.Since(start))
			}
		}
	})
	t.Run("no socket", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		defer cancel()
		_, err := dialVsock(ctx, filepath.Join(t.TempDir(), "absent.sock"), wire.VsockPort)
		if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "no such file") {
			t.Fatalf("dial = %v", err)
		}
	})
	t.Run("silent", func(t *testing.T) {
		// A Firecracker that never answers: the caller's deadline holds.
		// It holds the connection until the test ends, far past the
		// deadline: only the deadline can end the dial.
		hold := make(chan struct{})
		defer close(hold)
		path := hybridVsock(t, func(_ string, c net.Conn) { <-hold })
		ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
		defer cancel()
		start := time.Now()
		_, err := dialVsock(ctx, path, wire.VsockPort)
		if err == nil || time.Since(start) > 10*time.Second {
			t.Fatalf("dial = %v after %s", err, time.Since(start))
		}
	})
}

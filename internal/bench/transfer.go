package bench

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"time"

	"github.com/smolvm/smolvm/internal/network"
	"github.com/smolvm/smolvm/internal/sandbox"
)

// guestServer serves /dev/shm/big over HTTP/1.0 on port 8000, forever, in
// the background. The default image has python3 but not its http.server
// module, so this is a socket loop with sendfile.
const guestServer = `setsid -f python3 -c '
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8000))
s.listen(8)
f = open("/dev/shm/big", "rb")
n = f.seek(0, 2)
while True:
    c, _ = s.accept()
    c.recv(4096)
    c.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % n)
    f.seek(0)
    c.sendfile(f)
    c.close()
' </dev/null >/dev/null 2>&1`

// Transfer times n fetches of a mib MiB file from a server in sandbox id
// through an exposed port, and, as the baseline, the same fetches from a
// server on the host's loopback.
func Transfer(ctx context.Context, m *sandbox.Manager, id string, mib, n int, through, baseline *Figure) error {
	size := int64(mib) << 20
	if _, err := m.Exec(ctx, id, sandbox.ExecRequest{Command: fmt.Sprintf("head -c %d /dev/zero > /dev/shm/big && %s", size, guestServer)}); err != nil {
		return fmt.Errorf("start the guest server: %w", err)
	}
	f, err := m.ExposePort(ctx, id, network.Forward{Guest: 8000})
	if err != nil {
		return err
	}
	defer m.ClosePort(context.WithoutCancel(ctx), id, 8000)
	url := fmt.Sprintf("http://127.0.0.1:%d/big", f.Host)
	// The server may need a moment to bind after the command returns.
	deadline := time.Now().Add(30 * time.Second)
	for {
		if _, err := fetch(ctx, url, size); err == nil {
			break
		} else if time.Now().After(deadline) {
			return fmt.Errorf("fetch through the exposed port: %w", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	for range n {
		d, err := fetch(ctx, url, size)
		if err != nil {
			return err
		}
		through.Samples = append(through.Samples, d)
	}

	body := bytes.Repeat([]byte{0}, int(size))
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.Write(body) })}
	go srv.Serve(ln)
	defer srv.Close()
	for range n {
		d, err := fetch(ctx, "http://"+ln.Addr().String()+"/big", size)
		if err != nil {
			return err
		}
		baseline.Samples = append(baseline.Samples, d)
	}
	return nil
}

func fetch(ctx context.Context, url string, size int64) (time.Duration, error) {
	start := time.Now()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return 0, err
	}
	// A fresh connection each time, as a curl would make.
	c := &http.Client{Timeout: 5 * time.Minute, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := c.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	got, err := io.Copy(io.Discard, resp.Body)
	if err != nil {
		return 0, err
	}
	if got != size {
		return 0, fmt.Errorf("GET %s: %d bytes, want %d", url, got, size)
	}
	return time.Since(start), nil
}

// MiBps is the throughput of moving mib MiB in d.
func MiBps(mib int, d time.Duration) float64 {
	if d <= 0 {
		return 0
	}
	return float64(mib) / d.Seconds()
}

package api

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/smolvm/smolvm/internal/testenv"
)

func fileURL(base, id, path string, extra ...string) string {
	u := fmt.Sprintf("%s/sandboxes/%s/files?path=%s", base, id, path)
	for _, e := range extra {
		u += "&" + e
	}
	return u
}

func put(t *testing.T, url, contentType string, body io.Reader) *http.Response {
	t.Helper()
	req, err := http.NewRequest(http.MethodPut, url, body)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", contentType)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	return resp
}

func problemOf(t *testing.T, resp *http.Response) Problem {
	t.Helper()
	defer resp.Body.Close()
	var p Problem
	json.NewDecoder(resp.Body).Decode(&p)
	return p
}

// TestFiles moves files in and out of a real VM over HTTP, through a
// server in a process of its own so that its memory can be watched.
func TestFiles(t *testing.T) {
	t.Parallel()
	server, base := startChild(t, testenv.DataDir(t))
	r := do(t, http.MethodPost, base+"/sandboxes", `{"memory":512,"disk_size":2048}`, nil)
	var sb Sandbox
	if r.Status != http.StatusCreated || json.Unmarshal(r.Body, &sb) != nil {
		t.Fatalf("create: %d %s", r.Status, r.Body)
	}
	id := sb.ID
	t.Cleanup(func() { do(t, http.MethodDelete, base+"/sandboxes/"+id, nil, nil) })

	t.Run("every byte value round trips", func(t *testing.T) {
		data := make([]byte, 256*1024+7)
		for i := range data {
			data[i] = byte(i * 7)
		}
		before := time.Now().Add(-time.Minute)
		resp := put(t, fileURL(base, id, "/root/new/dir/bin.dat", "mode=0640"), "application/octet-stream", bytes.NewReader(data))
		resp.Body.Close()
		if resp.StatusCode != http.StatusNoContent {
			t.Fatalf("put: %d", resp.StatusCode)
		}
		resp, err := http.Get(fileURL(base, id, "/root/new/dir/bin.dat"))
		if err != nil {
			t.Fatal(err)
		}
		got, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		lm, _ := http.ParseTime(resp.Header.Get("Last-Modified"))
		if resp.StatusCode != 200 || !bytes.Equal(got, data) || resp.Header.Get("Content-Length") != strconv.Itoa(len(data)) || lm.Before(before) {
			t.Errorf("get: %d, %d bytes, headers %v", resp.StatusCode, len(got), resp.Header)
		}
		req, _ := http.NewRequest(http.MethodGet, fileURL(base, id, "/root/new/dir/bin.dat"), nil)
		req.Header.Set("Range", "bytes=1000-1999")
		resp, err = http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		got, _ = io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusPartialContent || !bytes.Equal(got, data[1000:2000]) ||
			resp.Header.Get("Content-Range") != fmt.Sprintf("bytes 1000-1999/%d", len(data)) {
			t.Errorf("range: %d %d bytes %v", resp.StatusCode, len(got), resp.Header)
		}
		r := do(t, http.MethodGet, base+"/sandboxes/"+id+"/fs/stat?path=/root/new/dir/bin.dat", nil, nil)
		var e FileEntry
		if r.Status != 200 || json.Unmarshal(r.Body, &e) != nil || e.Type != "file" || e.Mode != "0640" || e.Size != int64(len(data)) {
			t.Errorf("stat: %d %s", r.Status, r.Body)
		}
	})

	t.Run("tar both ways", func(t *testing.T) {
		var b bytes.Buffer
		tw := tar.NewWriter(&b)
		for _, h := range []*tar.Header{
			{Name: "src/", Typeflag: tar.TypeDir, Mode: 0o755},
			{Name: "src/main.py", Typeflag: tar.TypeReg, Mode: 0o644, Size: 12},
			{Name: "empty/", Typeflag: tar.TypeDir, Mode: 0o700},
			{Name: "link", Typeflag: tar.TypeSymlink, Linkname: "src/main.py"},
		} {
			tw.WriteHeader(h)
			if h.Size > 0 {
				io.WriteString(tw, "print('hi')\n")
			}
		}
		tw.Close()
		resp := put(t, fileURL(base, id, "/srv/app"), mediaTar, &b)
		resp.Body.Close()
		if resp.StatusCode != http.StatusNoContent {
			t.Fatalf("put tar: %d", resp.StatusCode)
		}
		res, r := execHTTP(t, base, id, map[string]any{"command": "cd /srv/app && python3 link && stat -c '%n %a %F' empty src | sort"})
		if r.Status != 200 || res.Stdout != "hi\nempty 700 directory\nsrc 755 directory\n" {
			t.Errorf("unpacked tree: %s", r.Body)
		}
		resp, err := http.Get(fileURL(base, id, "/srv/app/"))
		if err != nil || resp.StatusCode != 200 || resp.Header.Get("Content-Type") != mediaTar {
			t.Fatalf("get tar: %v %v", resp, err)
		}
		tr := tar.NewReader(resp.Body)
		var names []string
		for {
			h, err := tr.Next()
			if err != nil {
				break
			}
			names = append(names, fmt.Sprintf("%s:%c:%s", h.Name, h.Typeflag, h.Linkname))
		}
		resp.Body.Close()
		sort.Strings(names)
		if strings.Join(names, " ") != "empty/:5: link:2:src/main.py src/:5: src/main.py:0:" {
			t.Errorf("tar entries %v", names)
		}
		r = do(t, http.MethodGet, base+"/sandboxes/"+id+"/fs/list?path=/srv/app", nil, nil)
		var list FileList
		if r.Status != 200 || json.Unmarshal(r.Body, &list) != nil || len(list.Entries) != 3 || list.Entries[1].LinkTarget != "src/main.py" {
			t.Errorf("list: %s", r.Body)
		}
	})

	t.Run("mkdir move delete", func(t *testing.T) {
		r := do(t, http.MethodPost, base+"/sandboxes/"+id+"/fs/mkdir", `{"path":"/tmp/a/b","parents":true,"mode":"0750"}`, nil)
		if r.Status != http.StatusCreated || !strings.Contains(string(r.Body), `"mode":"0750"`) {
			t.Errorf("mkdir: %d %s", r.Status, r.Body)
		}
		if r := do(t, http.MethodPost, base+"/sandboxes/"+id+"/fs/mkdir", `{"path":"/tmp/a/b"}`, nil); r.Status != 409 || r.problem(t).Code != "file_exists" {
			t.Errorf("mkdir again: %d %s", r.Status, r.Body)
		}
		if r := do(t, http.MethodPost, base+"/sandboxes/"+id+"/fs/move", `{"source":"/tmp/a/b","destination":"/tmp/c"}`, nil); r.Status != 200 {
			t.Errorf("move: %d %s", r.Status, r.Body)
		}
		if r := do(t, http.MethodDelete, fileURL(base, id, "/tmp/a"), nil, nil); r.Status != http.StatusNoContent {
			t.Errorf("delete an empty directory: %d %s", r.Status, r.Body)
		}
		if r := do(t, http.MethodDelete, fileURL(base, id, "/srv"), nil, nil); r.Status != 409 || r.problem(t).Code != "wrong_file_type" {
			t.Errorf("delete a full directory: %d %s", r.Status, r.Body)
		}
		if r := do(t, http.MethodDelete, fileURL(base, id, "/srv", "recursive=true"), nil, nil); r.Status != http.StatusNoContent {
			t.Errorf("delete recursively: %d %s", r.Status, r.Body)
		}
	})

	t.Run("refusals", func(t *testing.T) {
		for _, tt := range []struct {
			method, url, body string
			status            int
			code              string
		}{
			{http.MethodGet, fileURL(base, id, "root/x"), "", 422, "invalid_path"},
			{http.MethodGet, fileURL(base, id, "/root/../etc/passwd"), "", 422, "invalid_path"},
			{http.MethodGet, fileURL(base, id, "/no/such/file"), "", 404, "file_not_found"},
			{http.MethodGet, fileURL(base, id, "/etc"), "", 409, "wrong_file_type"},
			{http.MethodPut, fileURL(base, id, "/etc"), "x", 409, "wrong_file_type"},
			{http.MethodPut, fileURL(base, id, "/etc/x", "mode=999"), "x", 422, "invalid_mode"},
			{http.MethodGet, base + "/sandboxes/" + id + "/fs/list?path=/etc/hostname", "", 409, "wrong_file_type"},
			{http.MethodGet, fileURL(base, "vm-00000000", "/etc/hostname"), "", 404, "sandbox_not_found"},
		} {
			var resp *http.Response
			if tt.method == http.MethodPut {
				resp = put(t, tt.url, "application/octet-stream", strings.NewReader(tt.body))
			} else {
				var err error
				if resp, err = http.Get(tt.url); err != nil {
					t.Fatal(err)
				}
			}
			if p := problemOf(t, resp); resp.StatusCode != tt.status || p.Code != tt.code {
				t.Errorf("%s %s: %d %+v, want %d %s", tt.method, tt.url, resp.StatusCode, p, tt.status, tt.code)
			}
		}
	})

	t.Run("a full disk keeps nothing", func(t *testing.T) {
		if _, r := execHTTP(t, base, id, map[string]any{"command": "mkdir -p /mnt/small && mount -t tmpfs -o size=1m tmpfs /mnt/small && echo old > /mnt/small/f"}); r.Status != 200 {
			t.Fatalf("mount: %s", r.Body)
		}
		resp := put(t, fileURL(base, id, "/mnt/small/f"), "application/octet-stream", bytes.NewReader(make([]byte, 4<<20)))
		if p := problemOf(t, resp); resp.StatusCode != http.StatusInsufficientStorage || p.Code != "disk_full" {
			t.Errorf("upload to a full disk: %d %+v", resp.StatusCode, p)
		}
		res, r := execHTTP(t, base, id, map[string]any{"command": "ls -A /mnt/small; cat /mnt/small/f"})
		if r.Status != 200 || res.Stdout != "f\nold\n" {
			t.Errorf("after the failed upload: %s", r.Body)
		}
	})

	t.Run("a GiB both ways in bounded memory", func(t *testing.T) {
		const size = 1 << 30
		peak := watchRSS(t, server.Process.Pid)
		start := time.Now()
		h := sha256.New()
		resp := put(t, fileURL(base, id, "/root/big"), "application/octet-stream", io.TeeReader(io.LimitReader(pattern{}, size), h))
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusNoContent {
			t.Fatalf("put: %d %s", resp.StatusCode, body)
		}
		up := time.Since(start)
		want := h.Sum(nil)
		res, r := execHTTP(t, base, id, map[string]any{"command": "sha256sum /root/big | cut -c1-64", "timeout": 300})
		if r.Status != 200 || strings.TrimSpace(res.Stdout) != fmt.Sprintf("%x", want) {
			t.Errorf("in the guest: %s, want %x", r.Body, want)
		}
		start = time.Now()
		resp, err := http.Get(fileURL(base, id, "/root/big"))
		if err != nil {
			t.Fatal(err)
		}
		h.Reset()
		n, _ := io.Copy(h, resp.Body)
		resp.Body.Close()
		down := time.Since(start)
		if n != size || !bytes.Equal(h.Sum(nil), want) {
			t.Errorf("downloaded %d bytes, sum %x", n, h.Sum(nil))
		}
		growth := peak()
		t.Logf("1 GiB up in %v, down in %v; peak RSS growth %d MiB", up.Round(time.Millisecond), down.Round(time.Millisecond), growth>>20)
		if growth > 32<<20 {
			t.Errorf("the server grew by %d MiB moving 1 GiB: something holds the file", growth>>20)
		}
	})
}

// pattern yields bytes that are not all the same, cheaply.
type pattern struct{ n byte }

func (p pattern) Read(b []byte) (int, error) {
	for i := range b {
		b[i] = byte(i*31) ^ 0x5a
	}
	return len(b), nil
}

// watchRSS samples a process's resident memory until the returned
// function is called, which answers the peak's growth over the start. The
// sampling also stops when the test ends, however it ends.
func watchRSS(t *testing.T, pid int) func() int64 {
	start, err := rssBytes(pid)
	if err != nil {
		t.Fatal(err)
	}
	var peak atomic.Int64
	peak.Store(start)
	done, stopped := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(stopped)
		tick := time.NewTicker(20 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-done:
				return
			case <-tick.C:
				if v, err := rssBytes(pid); err == nil && v > peak.Load() {
					peak.Store(v)
				}
			}
		}
	}()
	var once sync.Once
	stop := func() {
		once.Do(func() { close(done) })
		<-stopped
	}
	t.Cleanup(stop)
	return func() int64 {
		stop()
		return peak.Load() - start
	}
}

func rssBytes(pid int) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			return kb << 10, err
		}
	}
	return 0, errors.New("no VmRSS in the process's status")
}

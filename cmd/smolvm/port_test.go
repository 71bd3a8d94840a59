package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// envelope is the --json output of every sandbox command.
type envelope struct {
	OK    bool            `json:"ok"`
	Data  json.RawMessage `json:"data"`
	Error *struct {
		Code    string `json:"code"`
		Message string `json:"message"`
	} `json:"error"`
}

type portJSON struct {
	Guest       int    `json:"guest"`
	Host        int    `json:"host"`
	HostAddress string `json:"host_address"`
	Closed      bool   `json:"closed"`
}

type sandboxJSON struct {
	ID      string `json:"id"`
	Status  string `json:"status"`
	Network struct {
		Mode              string   `json:"mode"`
		Allow             []string `json:"allow"`
		AllowHostLoopback bool     `json:"allow_host_loopback"`
	} `json:"network"`
	Ports []portJSON `json:"ports"`
}

// runJSON runs a sandbox command with --json and decodes its data into
// data, if the command succeeded. It returns the error code, if it failed.
func (c *cli) runJSON(data any, args ...string) (errCode string, exit int) {
	c.t.Helper()
	out, errOut, code := c.run(append(args, "--json")...)
	var env envelope
	if err := json.Unmarshal([]byte(out), &env); err != nil {
		c.t.Fatalf("smolvm %v --json: exit %d, stdout %q, stderr %q: %v", args, code, out, errOut, err)
	}
	if env.OK != (code == 0) {
		c.t.Fatalf("smolvm %v --json: exit %d but ok %v: %s", args, code, env.OK, out)
	}
	if !env.OK {
		if env.Error == nil || env.Error.Code == "" || env.Error.Message == "" {
			c.t.Fatalf("smolvm %v --json: failed without an error code and message: %s", args, out)
		}
		return env.Error.Code, code
	}
	if data != nil {
		if err := json.Unmarshal(env.Data, data); err != nil {
			c.t.Fatalf("smolvm %v --json: decode data: %v\n%s", args, err, out)
		}
	}
	return "", code
}

// startServer runs `smolvm server start` on the test's data directory until
// the test ends and returns its URL.
func (c *cli) startServer(t *testing.T) string {
	t.Helper()
	srv := c.cmd("server", "start", "--host", "127.0.0.1", "--port", "0", "--quiet")
	stdout, err := srv.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr bytes.Buffer
	srv.Stderr = &stderr
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		srv.Wait()
		close(done)
	}()
	t.Cleanup(func() {
		srv.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(60 * time.Second):
			srv.Process.Kill()
			t.Errorf("server did not exit after SIGTERM")
		}
	})
	// The server picks a free port and prints the URL it listens on.
	listening := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stdout)
		url := ""
		if sc.Scan() {
			if _, after, ok := strings.Cut(sc.Text(), "listening on "); ok {
				url = after
			}
		}
		listening <- url
		io.Copy(io.Discard, stdout)
	}()
	select {
	case url := <-listening:
		if !strings.HasPrefix(url, "http://127.0.0.1:") {
			t.Fatalf("server did not start (printed %q); stderr: %s", url, stderr.String())
		}
		return url
	case <-time.After(60 * time.Second):
		t.Fatalf("server printed nothing; stderr: %s", stderr.String())
	}
	return ""
}

// guestServer answers every connection to the guest's port with a minimal
// HTTP response. It forks once listening, so exec returns when the port is
// ready and the server keeps running (the image has no http.server).
func guestServer(port int) string {
	return fmt.Sprintf(`python3 -c 'import socket, os
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", %d))
s.listen()
if os.fork(): os._exit(0)
while True:
    c, _ = s.accept()
    c.recv(65536)
    c.sendall(b"HTTP/1.0 200 OK\r\n\r\nhi\n")
    c.close()' </dev/null >/dev/null 2>&1`, port)
}

// fetch GETs / on the host port, retrying briefly: the guest's server may
// take a moment to be reachable through a port just opened.
func fetch(t *testing.T, addr string, port int) (string, error) {
	t.Helper()
	client := &http.Client{Timeout: 5 * time.Second}
	url := fmt.Sprintf("http://%s:%d/", addr, port)
	deadline := time.Now().Add(15 * time.Second)
	for {
		resp, err := client.Get(url)
		if err == nil {
			body, rerr := io.ReadAll(resp.Body)
			resp.Body.Close()
			if rerr == nil && resp.StatusCode == http.StatusOK {
				return string(body), nil
			}
			err = fmt.Errorf("status %s, body %q, read error %v", resp.Status, body, rerr)
		}
		if time.Now().After(deadline) {
			return "", err
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func TestCLIPorts(t *testing.T) {
	t.Parallel()
	c := newCLI(t)

	t.Run("bad flags fail before anything is contacted", func(t *testing.T) {
		// A server that is not there: reaching for it would fail differently.
		unreachable := "--url=http://127.0.0.1:1"
		for _, tc := range []struct {
			args []string
			want string
		}{
			{[]string{"sandbox", "create", "-p", "abc"}, `--port "abc"`},
			{[]string{"sandbox", "create", "-p", "0"}, "1 to 65535"},
			{[]string{"sandbox", "create", "--port", "8080:70000"}, "1 to 65535"},
			{[]string{"sandbox", "create", "-p", "80000:80"}, "host port"},
			{[]string{"sandbox", "create", "-p", "localhost:8080:80"}, "not an IP address"},
			{[]string{"sandbox", "create", "-p", "80/udp"}, "only TCP"},
			{[]string{"sandbox", "create", "-p", "80", "-p", "8080:80"}, "guest port 80"},
			{[]string{"sandbox", "create", "--network", "closed"}, `--network "closed"`},
			{[]string{"sandbox", "create", "--network", "off", "--allow", "10.0.0.0/8"}, "--allow needs a network"},
			{[]string{"sandbox", "create", "--network", "restricted", "--allow-private"}, "--allow-private applies only"},
			{[]string{"sandbox", "create", "--allow", "10.0.0.0/33"}, `--allow "10.0.0.0/33"`},
			{[]string{"sandbox", "create", "--network", "off", "--allow-host-loopback"}, "--allow-host-loopback"},
			{[]string{"sandbox", "create", "--network", "off", "-p", "80"}, "--network off"},
			{[]string{"sandbox", "port", "expose", "vm-00000000", "0"}, "1 to 65535"},
			{[]string{"sandbox", "port", "expose", "vm-00000000", "70000"}, "1 to 65535"},
			{[]string{"sandbox", "port", "expose", "vm-00000000", "80", "--host", "-1"}, "--host"},
			{[]string{"sandbox", "port", "expose", "vm-00000000", "80", "--address", "any"}, "--address"},
			{[]string{"sandbox", "port", "close", "vm-00000000", "http"}, `"http"`},
		} {
			_, errOut, code := c.run(append(tc.args, unreachable)...)
			if code == 0 || !strings.Contains(errOut, tc.want) || strings.Contains(errOut, "reach smolvm server") {
				t.Errorf("smolvm %s: exit %d, stderr %q; want an error with %q", strings.Join(tc.args, " "), code, errOut, tc.want)
			}
		}
	})

	// A sandbox without a network has no ports to expose. It is created
	// through a server, so that both ways of creating one carry the network.
	var off sandboxJSON
	t.Run("network off via the server", func(st *testing.T) {
		url := c.startServer(st)
		if code, _ := c.runJSON(&off, "sandbox", "create", "--memory", "256", "--network", "off", "--url", url); code != "" {
			st.Fatalf("create --network off: %s", code)
		}
		t.Cleanup(func() { c.run("sandbox", "delete", off.ID) })
		if off.Network.Mode != "off" || off.Ports == nil || len(off.Ports) != 0 {
			st.Errorf("create --network off: network %+v, ports %v", off.Network, off.Ports)
		}
		if code, exit := c.runJSON(nil, "sandbox", "port", "expose", off.ID, "8080", "--url", url); code != "network_off" || exit != 1 {
			st.Errorf("port expose: code %q, exit %d", code, exit)
		}
	})
	if off.ID == "" {
		t.FailNow()
	}
	if code, exit := c.runJSON(nil, "sandbox", "port", "expose", off.ID, "8080"); code != "network_off" || exit != 1 {
		t.Errorf("port expose on a sandbox with network off: code %q, exit %d", code, exit)
	}
	if _, errOut, code := c.run("sandbox", "port", "expose", off.ID, "8080"); code != 1 || !strings.Contains(errOut, `network mode "off"`) {
		t.Errorf("port expose on a sandbox with network off: exit %d, stderr %q", code, errOut)
	}
	if out, _, code := c.run("sandbox", "get", off.ID); code != 0 || !regexp.MustCompile(`(?m)^Network:\s+off$`).MatchString(out) || strings.Contains(out, "Ports:") {
		t.Errorf("get of a sandbox with network off: exit %d\n%s", code, out)
	}

	var sb sandboxJSON
	if code, _ := c.runJSON(&sb, "sandbox", "create", "--memory", "256",
		"--allow", "10.0.0.0/8", "-p", "8080", "-p", "127.0.0.1::9000"); code != "" {
		t.Fatalf("create -p: %s", code)
	}
	id := sb.ID
	t.Cleanup(func() { c.run("sandbox", "delete", id) })
	if sb.Status != "running" || sb.Network.Mode != "restricted" || len(sb.Network.Allow) != 1 || sb.Network.Allow[0] != "10.0.0.0/8" {
		t.Errorf("create --allow: status %q, network %+v", sb.Status, sb.Network)
	}
	ports := map[int]portJSON{}
	for _, p := range sb.Ports {
		ports[p.Guest] = p
	}
	web := ports[8080]
	if len(sb.Ports) != 2 || web.Host == 0 || web.HostAddress != "127.0.0.1" || ports[9000].Host == 0 {
		t.Fatalf("create -p 8080 -p 127.0.0.1::9000: ports %+v", sb.Ports)
	}

	if out, errOut, code := c.run("sandbox", "exec", id, "--", guestServer(8080)); code != 0 {
		t.Fatalf("start the guest's server: exit %d: %s%s", code, out, errOut)
	}
	if body, err := fetch(t, "127.0.0.1", web.Host); err != nil || body != "hi\n" {
		t.Fatalf("GET through the port given at create: %q, %v", body, err)
	}

	t.Run("list and get", func(t *testing.T) {
		out, _, code := c.run("sandbox", "port", "list", id)
		row := regexp.MustCompile(`(?m)^8080\s+127\.0\.0\.1\s+` + strconv.Itoa(web.Host) + `\s`)
		if code != 0 || !strings.HasPrefix(out, "GUEST") || !row.MatchString(out) {
			t.Errorf("port list: exit %d\n%s", code, out)
		}
		var list struct {
			Ports []portJSON `json:"ports"`
		}
		if code, _ := c.runJSON(&list, "sandbox", "port", "list", id); code != "" || len(list.Ports) != 2 {
			t.Errorf("port list --json: %s %+v", code, list)
		}
		mapping := fmt.Sprintf("8080 -> 127.0.0.1:%d", web.Host)
		out, _, code = c.run("sandbox", "get", id)
		if code != 0 || !strings.Contains(out, mapping) || !strings.Contains(out, "restricted (allow 10.0.0.0/8)") {
			t.Errorf("get: exit %d; want %q and the network\n%s", code, mapping, out)
		}
		out, _, code = c.run("sandbox", "list")
		if code != 0 || !strings.Contains(out, fmt.Sprintf("8080->127.0.0.1:%d", web.Host)) || !strings.Contains(out, "restricted") {
			t.Errorf("list: exit %d\n%s", code, out)
		}
	})

	t.Run("refusals", func(t *testing.T) {
		for _, tc := range []struct {
			args []string
			code string
		}{
			{[]string{"expose", id, "8080"}, "port_already_exposed"},
			{[]string{"expose", id, "8081", "--host", strconv.Itoa(web.Host)}, "port_in_use"},
			{[]string{"close", id, "8081"}, "port_not_exposed"},
			{[]string{"list", "vm-00000000"}, "sandbox_not_found"},
		} {
			if code, exit := c.runJSON(nil, append([]string{"sandbox", "port"}, tc.args...)...); code != tc.code || exit != 1 {
				t.Errorf("port %s: code %q, exit %d; want %s", strings.Join(tc.args, " "), code, exit, tc.code)
			}
		}
		_, errOut, code := c.run("sandbox", "port", "expose", id, "8080")
		if code != 1 || !strings.Contains(errOut, "already exposed") {
			t.Errorf("port expose of an exposed port: exit %d, stderr %q", code, errOut)
		}
	})

	t.Run("close and expose again", func(t *testing.T) {
		out, errOut, code := c.run("sandbox", "port", "close", id, "8080")
		if want := fmt.Sprintf("closed 8080 (127.0.0.1:%d)\n", web.Host); code != 0 || out != want {
			t.Fatalf("port close: exit %d, stdout %q, want %q; stderr %q", code, out, want, errOut)
		}
		if _, err := (&http.Client{Timeout: 5 * time.Second}).Get(fmt.Sprintf("http://127.0.0.1:%d/", web.Host)); err == nil {
			t.Errorf("the closed port still answers")
		}
		out, errOut, code = c.run("sandbox", "port", "expose", id, "8080")
		m := regexp.MustCompile(`^8080 -> 127\.0\.0\.1:(\d+) \(http://127\.0\.0\.1:(\d+)\)\n$`).FindStringSubmatch(out)
		if code != 0 || m == nil || m[1] != m[2] {
			t.Fatalf("port expose: exit %d, stdout %q, stderr %q", code, out, errOut)
		}
		host, _ := strconv.Atoi(m[1])
		if body, err := fetch(t, "127.0.0.1", host); err != nil || body != "hi\n" {
			t.Errorf("GET through the port exposed at run time: %q, %v", body, err)
		}
	})

	t.Run("through the server", func(t *testing.T) {
		url := c.startServer(t)
		var p portJSON
		if code, _ := c.runJSON(&p, "sandbox", "port", "expose", id, "8080", "--url", url); code != "port_already_exposed" {
			t.Errorf("port expose of an exposed port via the server: %q", code)
		}
		if code, _ := c.runJSON(&p, "sandbox", "port", "expose", id, "7000", "--url", url); code != "" || p.Guest != 7000 || p.Host == 0 || p.HostAddress != "127.0.0.1" {
			t.Errorf("port expose via the server: %q %+v", code, p)
		}
		var list struct {
			Ports []portJSON `json:"ports"`
		}
		if code, _ := c.runJSON(&list, "sandbox", "port", "list", id, "--url", url); code != "" || len(list.Ports) != 3 {
			t.Errorf("port list via the server: %q %+v", code, list)
		}
		var closed portJSON
		if code, _ := c.runJSON(&closed, "sandbox", "port", "close", id, "7000", "--url", url); code != "" || !closed.Closed || closed != (portJSON{Guest: 7000, Host: p.Host, HostAddress: "127.0.0.1", Closed: true}) {
			t.Errorf("port close via the server: %q %+v", code, closed)
		}
		var got sandboxJSON
		if code, _ := c.runJSON(&got, "sandbox", "get", id, "--url", url); code != "" || got.Network.Mode != "restricted" || len(got.Ports) != 2 {
			t.Errorf("get via the server: %q %+v", code, got)
		}
	})
}

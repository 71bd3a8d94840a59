package api

import (
	"bufio"
	"context"
	"encoding/base64"
	"encoding/json"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/smolvm/smolvm/internal/testenv"
)

// execEvent is one Server-Sent Event of an exec stream, stamped on arrival.
type execEvent struct {
	Type string
	Data string
	At   time.Time
}

// openExecStream posts an exec asking for accept and returns the response.
func openExecStream(t *testing.T, ctx context.Context, base, id, accept, body string) *http.Response {
	t.Helper()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, base+"/sandboxes/"+id+"/exec", strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept", accept)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	return resp
}

// readSSE reads events until the stream ends, stamping each on arrival.
func readSSE(t *testing.T, resp *http.Response) []execEvent {
	t.Helper()
	defer resp.Body.Close()
	var evs []execEvent
	var cur execEvent
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		line := sc.Text()
		switch {
		case line == "":
			if cur.Type != "" {
				evs = append(evs, cur)
			}
			cur = execEvent{}
		case strings.HasPrefix(line, "event: "):
			cur.Type, cur.At = strings.TrimPrefix(line, "event: "), time.Now()
		case strings.HasPrefix(line, "data: "):
			cur.Data = strings.TrimPrefix(line, "data: ")
		}
	}
	return evs
}

func TestExecStream(t *testing.T) {
	t.Parallel()
	m := testenv.Manager(t)
	srv := testServer(t, m, Options{})
	base := srv.URL
	sb := createSandbox(t, base, true)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	t.Run("sse delivers output as it is written", func(t *testing.T) {
		resp := openExecStream(t, ctx, base, sb.ID, "text/event-stream",
			`{"command":"echo first; sleep 3; echo second; printf '\\377' >&2; exit 4"}`)
		if resp.StatusCode != http.StatusOK || resp.Header.Get("Content-Type") != "text/event-stream" {
			t.Fatalf("status %d, %s", resp.StatusCode, resp.Header.Get("Content-Type"))
		}
		evs := readSSE(t, resp)
		// stdout and stderr are separate pipes, read side by side: only
		// each stream's own order, and the exit coming last, are promised.
		var stdout, stderr []execEvent
		for _, e := range evs {
			switch e.Type {
			case "stdout":
				stdout = append(stdout, e)
			case "stderr":
				stderr = append(stderr, e)
			}
		}
		if len(evs) != 4 || len(stdout) != 2 || len(stderr) != 1 || evs[3].Type != "exit" {
			t.Fatalf("events %v", evs)
		}
		if stdout[0].Data != `{"text":"first\n"}` || stdout[1].Data != `{"text":"second\n"}` {
			t.Errorf("output events %v", stdout)
		}
		// The first line arrived while the command still slept.
		if gap := stdout[1].At.Sub(stdout[0].At); gap < time.Second {
			t.Errorf("first line arrived only %v before the second: it was held back", gap)
		}
		var bin ExecOutputEvent
		json.Unmarshal([]byte(stderr[0].Data), &bin)
		if b, _ := base64.StdEncoding.DecodeString(bin.Base64); string(b) != "\xff" || bin.Text != "" {
			t.Errorf("invalid UTF-8 as %s", stderr[0].Data)
		}
		var exit ExecExitEvent
		if err := json.Unmarshal([]byte(evs[3].Data), &exit); err != nil || exit.ExitCode != 4 || exit.TimedOut || exit.DurationMS < 3000 {
			t.Errorf("exit %s", evs[3].Data)
		}
	})

	t.Run("ndjson with cwd env stdin and argv", func(t *testing.T) {
		resp := openExecStream(t, ctx, base, sb.ID, "application/x-ndjson",
			`{"command":"pwd; echo \"$A-$B\"; cat; echo a | wc -c","shell":"raw","cwd":"/usr","env":{"A":"x y","B":"2"},"stdin":"fed\n"}`)
		defer resp.Body.Close()
		if resp.StatusCode != http.StatusOK || resp.Header.Get("Content-Type") != "application/x-ndjson" {
			t.Fatalf("status %d, %s", resp.StatusCode, resp.Header.Get("Content-Type"))
		}
		var out strings.Builder
		var last map[string]any
		sc := bufio.NewScanner(resp.Body)
		for sc.Scan() {
			var ev map[string]any
			if err := json.Unmarshal(sc.Bytes(), &ev); err != nil {
				t.Fatalf("line %q: %v", sc.Text(), err)
			}
			if ev["type"] == "stdout" {
				out.WriteString(ev["text"].(string))
			}
			last = ev
		}
		if out.String() != "/usr\nx y-2\nfed\n2\n" {
			t.Errorf("stdout %q", out.String())
		}
		if last["type"] != "exit" || last["exit_code"] != 0.0 {
			t.Errorf("last line %v", last)
		}
		res, r := execHTTP(t, base, sb.ID, map[string]any{"argv": []string{"printf", "[%s]", `a "b" c`, "$HOME"}})
		if r.Status != http.StatusOK || res.Stdout != `[a "b" c][$HOME]` {
			t.Errorf("argv: %d %s", r.Status, r.Body)
		}
	})

	t.Run("refusals come before the stream", func(t *testing.T) {
		for _, tt := range []struct{ body, code, field string }{
			{`{"command":"true","cwd":"relative"}`, "invalid_cwd", "cwd"},
			{`{"command":"true","cwd":"/no/such/dir"}`, "invalid_cwd", "cwd"},
			{`{"command":"true","env":{"1X":"y"}}`, "invalid_env", "env"},
			{`{"command":"true","argv":["true"]}`, CodeValidationFailed, "argv"},
			{`{}`, CodeValidationFailed, "command"},
			{`{"command":"true","bogus":1}`, CodeValidationFailed, ""},
		} {
			for _, accept := range []string{"text/event-stream", "application/json"} {
				resp := openExecStream(t, ctx, base, sb.ID, accept, tt.body)
				var p Problem
				json.NewDecoder(resp.Body).Decode(&p)
				resp.Body.Close()
				if resp.StatusCode/100 != 4 || p.Code != tt.code || (tt.field != "" && p.Field != tt.field) {
					t.Errorf("%s with %s: %d %+v, want %s on %s", tt.body, accept, resp.StatusCode, p, tt.code, tt.field)
				}
			}
		}
		resp := openExecStream(t, ctx, base, "vm-00000000", "text/event-stream", `{"command":"true"}`)
		resp.Body.Close()
		if resp.StatusCode != http.StatusNotFound {
			t.Errorf("unknown sandbox: %d", resp.StatusCode)
		}
	})

	t.Run("a client that leaves kills the command", func(t *testing.T) {
		sctx, stop := context.WithCancel(ctx)
		resp := openExecStream(t, sctx, base, sb.ID, "text/event-stream",
			`{"command":"echo $$ > /tmp/streamed.pid; echo up; sleep 600"}`)
		br := bufio.NewReader(resp.Body)
		for {
			line, err := br.ReadString('\n')
			if err != nil {
				t.Fatal(err)
			}
			if strings.Contains(line, `"up\n"`) {
				break
			}
		}
		stop()
		resp.Body.Close()
		deadline := time.Now().Add(20 * time.Second)
		for {
			res, r := execHTTP(t, base, sb.ID, map[string]any{"command": "kill -0 $(cat /tmp/streamed.pid) 2>/dev/null && echo alive || echo gone"})
			if r.Status == http.StatusOK && res.Stdout == "gone\n" {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("the command still runs after its client left: %s", r.Body)
			}
			time.Sleep(200 * time.Millisecond)
		}
	})

	t.Run("timeout ends the stream with timed_out", func(t *testing.T) {
		evs := readSSE(t, openExecStream(t, ctx, base, sb.ID, "text/event-stream", `{"command":"echo a; exec sleep 30","shell":"raw","timeout":3}`))
		if len(evs) != 2 || evs[1].Type != "exit" || !strings.Contains(evs[1].Data, `"timed_out":true`) || !strings.Contains(evs[1].Data, `"exit_code":137`) {
			t.Errorf("events %v", evs)
		}
	})
}

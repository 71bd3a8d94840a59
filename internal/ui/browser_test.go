package ui_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
	"unicode/utf8"

	cdpbrowser "github.com/chromedp/cdproto/browser"
	"github.com/chromedp/cdproto/cdp"
	"github.com/chromedp/cdproto/emulation"
	"github.com/chromedp/cdproto/input"
	"github.com/chromedp/cdproto/page"
	"github.com/chromedp/cdproto/runtime"
	"github.com/chromedp/chromedp"
	"github.com/chromedp/chromedp/kb"

	"github.com/smolvm/smolvm/internal/api"
	"github.com/smolvm/smolvm/internal/sandbox"
	"github.com/smolvm/smolvm/internal/testenv"
)

var screenshots = flag.Bool("screenshots", false, "write the dashboard's screenshots to docs/images instead of a temporary directory")

// chromium is Debian's browser, which the test command installs.
const chromium = "/usr/bin/chromium"

// watchPage runs in every document before the page's own script: it keeps
// what the test must not see, a refused CSP directive or an uncaught error,
// where the test can read it.
const watchPage = `
window.__problems = [];
addEventListener("securitypolicyviolation", (e) => __problems.push("CSP refused " + e.violatedDirective + " " + e.blockedURI));
addEventListener("error", (e) => __problems.push("error: " + e.message));
addEventListener("unhandledrejection", (e) => __problems.push("unhandled rejection: " + String(e.reason && e.reason.stack || e.reason)));
`

// TestDashboard drives the dashboard in a real browser against a server
// with real VMs: a sandbox created through the API shows up live, its
// terminal runs a command, a file is uploaded through the page, and the
// page deletes it.
func TestDashboard(t *testing.T) {
	requireChromium(t)
	const token = "dashboard-test-token"
	base := serve(t, testenv.Manager(t), token)
	shots := t.TempDir()
	if *screenshots {
		shots = filepath.Join(testenv.RepoRoot(), "docs", "images")
		if err := os.MkdirAll(shots, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	b := openBrowser(t, ctx)

	// Without a token the page asks for one.
	b.do(chromedp.Navigate(base + "/ui/"))
	b.waitFor("the token form", `!!document.querySelector('[data-testid="token-form"]')`, 20*time.Second)
	b.do(chromedp.SendKeys(chromedp.CSS(`[data-testid="token-input"]`), token+"\n"))
	listed := `document.querySelector('[data-testid="stream-state"]')?.dataset.state === "live" && document.querySelector('[data-testid="sandbox-list"]')?.dataset.loaded === "true"`
	b.waitFor("the sandbox list after entering the token", listed+` && !document.querySelector('[data-testid="token-form"]')`, 20*time.Second)

	// A token in the fragment is taken and removed from the address.
	b.do(chromedp.Evaluate[chromedp.Void](`sessionStorage.clear()`))
	b.do(chromedp.Navigate(base + "/ui/#token=" + token))
	b.waitFor("the live sandbox list", listed, 20*time.Second)
	if hash := b.eval(`location.hash`); strings.Contains(hash, token) {
		t.Errorf("the token stays in the address: %q", hash)
	}
	if b.exists(`[data-testid="token-form"]`) {
		t.Error("the token form shows although the address carried the token")
	}

	// A sandbox created through the API appears without a reload and
	// reaches running.
	b.do(chromedp.Evaluate[chromedp.Void](`window.__sameDocument = true`))
	// Asynchronously, so the page sees it being created.
	status, created, err := apiCall(ctx, base, token, http.MethodPost, "/sandboxes", `{"name":"demo","ports":[{"guest":8080}]}`, http.Header{"Prefer": {"respond-async"}})
	if err != nil || status != http.StatusAccepted {
		t.Fatalf("create: %d %s (%v), want 202", status, created, err)
	}
	var sb struct {
		ID string `json:"id"`
	}
	if err := json.Unmarshal(created, &sb); err != nil || sb.ID == "" {
		t.Fatalf("create answered %s (%v)", created, err)
	}
	row := fmt.Sprintf(`[data-testid="sandbox-row"][data-id=%q]`, sb.ID)
	b.waitFor("the new sandbox's row", fmt.Sprintf(`!!document.querySelector(%q)`, row), 20*time.Second)
	b.waitFor("its row to say running", fmt.Sprintf(`document.querySelector(%q)?.dataset.status === "running"`, row), 2*time.Minute)
	if b.eval(`String(window.__sameDocument)`) != "true" {
		t.Fatal("the page was reloaded to show the sandbox")
	}
	if text := b.eval(fmt.Sprintf(`document.querySelector(%q).textContent`, row)); !strings.Contains(text, "http://127.0.0.1:") {
		t.Errorf("the row shows no port link: %q", text)
	}
	b.screenshot(shots, "list")

	// Its page: a terminal that runs a command.
	b.do(chromedp.Click(chromedp.CSS(row + " a")))
	b.waitFor("the sandbox's page", fmt.Sprintf(`document.querySelector('[data-testid="sandbox-detail"]')?.dataset.id === %q`, sb.ID), 10*time.Second)
	b.waitFor("the terminal to connect", `document.querySelector('[data-testid="terminal-status"]')?.textContent === "connected" && !!document.querySelector('[data-testid="terminal"] .xterm-rows')`, 30*time.Second)
	// The prompt first, so the keys reach a shell that reads them.
	b.waitFor("the shell's prompt", `/[#$] *$/m.test(document.querySelector('[data-testid="terminal"] .xterm-rows').innerText)`, 30*time.Second)
	b.do(chromedp.Focus(chromedp.CSS(`[data-testid="terminal"] .xterm-helper-textarea`)), typeKeys("echo hi\n"))
	b.waitFor("hi in the terminal", `[...document.querySelectorAll('[data-testid="terminal"] .xterm-rows > div')].some((r) => r.textContent.trim() === "hi")`, 30*time.Second)

	// A file uploaded through the page lands in the guest and is listed.
	b.waitFor("the file browser at /root", `document.querySelector('[data-testid="file-path"]')?.value === "/root" && !!document.querySelector('[data-testid="file-browser"] .file-list > *')`, 30*time.Second)
	upload := filepath.Join(t.TempDir(), "hello-dashboard.txt")
	content := "uploaded from the dashboard\n"
	if err := os.WriteFile(upload, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	b.do(chromedp.SetUploadFiles(chromedp.CSS(`[data-testid="file-upload"]`), []string{upload}))
	b.waitFor("the uploaded file's row", `!!document.querySelector('[data-testid="file-row"][data-name="hello-dashboard.txt"]')`, 30*time.Second)
	if status, got, err := apiCall(ctx, base, token, http.MethodGet, "/sandboxes/"+sb.ID+"/files?path=/root/hello-dashboard.txt", "", nil); status != http.StatusOK || string(got) != content {
		t.Errorf("the uploaded file: %d %q (%v), want 200 %q", status, got, err, content)
	}
	// And downloaded again through the page (a fetch with the token, saved
	// from a blob URL).
	downloads := t.TempDir()
	if _, err := chromedp.CallBrowser(b.ctx, cdpbrowser.SetDownloadBehavior, cdpbrowser.SetDownloadBehaviorParams{Behavior: cdpbrowser.SetDownloadBehaviorBehaviorAllow, DownloadPath: downloads}); err != nil {
		t.Fatalf("allow downloads: %v", err)
	}
	b.do(chromedp.Click(chromedp.CSS(`[data-testid="file-row"][data-name="hello-dashboard.txt"] button`)))
	waitForFile(t, filepath.Join(downloads, "hello-dashboard.txt"), content, 20*time.Second)

	// Resource use and the guest's processes, where the server reports them.
	if status, _, _ := apiCall(ctx, base, token, http.MethodGet, "/sandboxes/"+sb.ID+"/stats", "", nil); status == http.StatusOK {
		b.waitFor("the resource panel", `document.querySelector('[data-testid="stats"]')?.dataset.state === "ok"`, 20*time.Second)
		b.waitFor("the guest's process list", `document.querySelectorAll('[data-testid="guest-processes"] tbody tr').length > 0`, 20*time.Second)
	} else {
		t.Logf("GET /sandboxes/{id}/stats answers %d: the resource panel is not checked", status)
	}
	b.waitFor("the console log to be read", `["following", "read"].includes(document.querySelector('[data-testid="console-log"]')?.dataset.state)`, 20*time.Second)
	// A VM restored from a template printed nothing of a boot: what the
	// console has, if anything, is on the page.
	if status, console, err := apiCall(ctx, base, token, http.MethodGet, "/sandboxes/"+sb.ID+"/logs", "", nil); status != http.StatusOK {
		t.Errorf("GET /sandboxes/%s/logs: %d %s (%v)", sb.ID, status, console, err)
	} else if line := firstLine(string(console)); line != "" {
		b.waitFor("the console's first line", fmt.Sprintf(`document.querySelector('[data-testid="console-log"]').textContent.includes(%q)`, line), 10*time.Second)
	} else {
		t.Logf("the console printed nothing since the VM started")
	}
	b.screenshot(shots, "detail")

	// The dark theme, chosen with the toggle and kept.
	for i := 0; i < 2 && b.eval(`document.documentElement.dataset.theme || ""`) != "dark"; i++ {
		b.do(chromedp.Click(chromedp.CSS(`[data-testid="theme-toggle"]`)))
	}
	if got := b.eval(`localStorage.getItem("smolvm.theme")`); got != "dark" {
		t.Errorf("the theme toggle kept %q, want dark", got)
	}
	b.screenshot(shots, "dark")
	b.do(chromedp.Click(chromedp.CSS(`[data-testid="theme-toggle"]`)))

	// A phone-sized window: the list becomes cards.
	b.do(chromedp.EmulateViewport(390, 844, chromedp.EmulateMobile))
	b.do(chromedp.Navigate(base + "/ui/#/"))
	b.waitFor("the list in a narrow window", fmt.Sprintf(`document.querySelector(%q)?.dataset.status === "running"`, row), 20*time.Second)
	if disp := b.eval(fmt.Sprintf(`getComputedStyle(document.querySelector(%q)).display`, row)); disp != "block" {
		t.Errorf("in a 390 px window a row is display %q, want block (a card)", disp)
	}
	b.screenshot(shots, "narrow")
	b.do(chromedp.Func(func(ctx context.Context, tg *chromedp.Target) error {
		_, err := cdp.Call(ctx, tg, emulation.ClearDeviceMetricsOverride, cdp.Empty{})
		return err
	}))

	// Deleted from its page, after an in-page confirmation.
	b.do(chromedp.Navigate(base + "/ui/#/sandboxes/" + sb.ID))
	b.waitFor("the sandbox's page", `document.querySelector('[data-testid="sandbox-detail"]')?.dataset.status === "running"`, 20*time.Second)
	b.do(chromedp.Click(chromedp.CSS(`[data-testid="action-delete"]`)))
	b.waitFor("the confirmation", `!!document.querySelector('[data-testid="confirm-ok"]')`, 10*time.Second)
	b.do(chromedp.Click(chromedp.CSS(`[data-testid="confirm-ok"]`)))
	b.waitFor("the row to go", fmt.Sprintf(`!!document.querySelector('[data-testid="sandbox-list"]') && !document.querySelector(%q)`, row), time.Minute)
	if status, body, err := apiCall(ctx, base, token, http.MethodGet, "/sandboxes/"+sb.ID, "", nil); status != http.StatusNotFound {
		t.Errorf("GET /sandboxes/%s after the delete: %d %s (%v), want 404", sb.ID, status, body, err)
	}

	if msg := b.eval(`document.querySelector('[data-testid="error-banner"]')?.textContent || ""`); msg != "" {
		t.Errorf("the page shows an error: %s", msg)
	}
	if p := b.eval(`__problems.join("\n")`); p != "" {
		t.Errorf("the page ran into problems:\n%s", p)
	}
}

// waitForFile waits until path holds want, as a finished download does.
func waitForFile(t *testing.T, path, want string, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		got, err := os.ReadFile(path)
		if err == nil && string(got) == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("waited %s for %s to hold %q: %q, %v", timeout, path, want, got, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// firstLine is the first line of s with text, as a browser keeps it.
func firstLine(s string) string {
	for _, l := range strings.Split(s, "\n") {
		if l = strings.TrimSpace(l); l != "" && utf8.ValidString(l) {
			return l[:min(len(l), 60)]
		}
	}
	return ""
}

// requireChromium fails the test, rather than skipping it, when the
// browser is missing: the dashboard would otherwise go untested unnoticed.
func requireChromium(t *testing.T) {
	t.Helper()
	if _, err := os.Stat(chromium); err != nil {
		t.Fatalf("%s is missing (%v): install Debian's chromium package (apt-get install chromium); scripts/test.sh does", chromium, err)
	}
}

// serve serves the API and the dashboard over m on a loopback port, with a
// token, and answers the base URL.
func serve(t *testing.T, m *sandbox.Manager, token string) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	stop := make(chan struct{})
	srv := &http.Server{Handler: api.New(m, api.Options{Addr: ln.Addr().String(), Token: token, Stop: stop})}
	go srv.Serve(ln)
	t.Cleanup(func() {
		close(stop) // ends the page's event stream, which Close would wait for
		srv.Close()
	})
	return "http://" + ln.Addr().String()
}

// openBrowser starts a headless Chromium that lives as long as ctx and the
// test, whichever ends first, and opens a tab in it.
func openBrowser(t *testing.T, ctx context.Context) *browser {
	t.Helper()
	// Chromium keeps its profile and, in $TMPDIR, its singleton's socket:
	// both in the test's directory, which goes with the test, since a
	// browser ended at the test's end does not always remove them.
	dir := t.TempDir()
	tmp := filepath.Join(dir, "tmp")
	if err := os.Mkdir(tmp, 0o700); err != nil {
		t.Fatal(err)
	}
	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(chromium),
		chromedp.Headless,
		chromedp.NoSandbox, // the test runs as root
		chromedp.DisableGPU,
		chromedp.NoFirstRun,
		chromedp.Flag("disable-quic", true),
		chromedp.Flag("disable-background-networking", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true),
		chromedp.Flag("disable-domain-reliability", true),
		chromedp.Flag("no-pings", true),
		// Whatever Chromium might still fetch from elsewhere goes to a
		// port nothing listens on; loopback bypasses any proxy.
		chromedp.ProxyServer("http://127.0.0.1:9"),
		chromedp.UserDataDir(filepath.Join(dir, "chromium")),
		chromedp.Env("TMPDIR="+tmp),
		chromedp.WindowSize(1280, 900),
	)
	allocCtx, cancelAlloc := chromedp.NewExecAllocator(ctx, opts...)
	bctx, cancelBrowser := chromedp.NewContext(allocCtx)
	var logging sync.WaitGroup
	// Chromium ends on every path out of the test, a failure included.
	t.Cleanup(func() {
		if err := chromedp.Cancel(bctx); err != nil && !errors.Is(err, context.Canceled) {
			t.Logf("close chromium: %v", err)
		}
		cancelBrowser()
		cancelAlloc()
		logging.Wait()
	})
	if err := chromedp.Do(bctx); err != nil {
		t.Fatalf("start %s: %v", chromium, err)
	}
	logConsole(t, bctx, &logging)
	if _, err := chromedp.Call(bctx, page.AddScriptToEvaluateOnNewDocument, page.AddScriptToEvaluateOnNewDocumentParams{Source: watchPage}); err != nil {
		t.Fatal(err)
	}
	return &browser{t: t, ctx: bctx}
}

// browser runs actions in the test's tab and fails the test when one fails.
type browser struct {
	t   *testing.T
	ctx context.Context
}

func (b *browser) do(actions ...chromedp.Action[chromedp.Void]) {
	b.t.Helper()
	ctx, cancel := context.WithTimeout(b.ctx, 30*time.Second)
	defer cancel()
	if err := chromedp.Do(ctx, actions...); err != nil {
		b.t.Fatalf("browser: %v\n%s", err, b.describe())
	}
}

// eval evaluates a JavaScript expression and answers it as a string.
func (b *browser) eval(expr string) string {
	b.t.Helper()
	ctx, cancel := context.WithTimeout(b.ctx, 10*time.Second)
	defer cancel()
	v, err := chromedp.Run(ctx, chromedp.Evaluate[string](`String(`+expr+`)`))
	if err != nil {
		b.t.Fatalf("evaluate %s: %v", expr, err)
	}
	return v
}

func (b *browser) exists(sel string) bool {
	return b.eval(fmt.Sprintf(`!!document.querySelector(%q)`, sel)) == "true"
}

// waitFor polls a JavaScript predicate until it holds. Chromedp's Poll
// builds its predicate with new Function, which the page's CSP refuses.
func (b *browser) waitFor(what, predicate string, timeout time.Duration) {
	b.t.Helper()
	ctx, cancel := context.WithTimeout(b.ctx, timeout)
	defer cancel()
	var lastErr error
	for {
		ok, err := chromedp.Run(ctx, chromedp.Evaluate[bool](`Boolean(`+predicate+`)`))
		if err == nil && ok {
			return
		}
		if err != nil {
			lastErr = err
		}
		select {
		case <-ctx.Done():
			b.t.Fatalf("waited %s for %s (last error: %v)\n%s", timeout, what, lastErr, b.describe())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// typeKeys types text into the focused element as a keyboard does, a
// keyDown carrying each key's text and a keyUp. chromedp's SendKeys sends
// the text again in a separate char event, which xterm.js takes as a second
// key.
func typeKeys(text string) chromedp.Action[chromedp.Void] {
	return chromedp.Func(func(ctx context.Context, t *chromedp.Target) error {
		for _, r := range text {
			if r == '\n' {
				r = '\r'
			}
			k, ok := kb.Keys[r]
			if !ok {
				return fmt.Errorf("no key types %q", r)
			}
			down := input.DispatchKeyEventParams{
				Type: input.DispatchKeyEventTypeKeyDown, Key: k.Key, Code: k.Code, Text: k.Text, UnmodifiedText: k.Unmodified,
				WindowsVirtualKeyCode: k.Windows, NativeVirtualKeyCode: k.Native,
			}
			if k.Shift {
				down.Modifiers = 8
			}
			up := down
			up.Type, up.Text, up.UnmodifiedText = input.DispatchKeyEventTypeKeyUp, "", ""
			for _, ev := range []input.DispatchKeyEventParams{down, up} {
				if _, err := cdp.Call(ctx, t, input.DispatchKeyEvent, ev); err != nil {
					return fmt.Errorf("type %q: %w", r, err)
				}
			}
		}
		return nil
	})
}

// describe says what the page shows, for a failure's message.
func (b *browser) describe() string {
	ctx, cancel := context.WithTimeout(b.ctx, 5*time.Second)
	defer cancel()
	text, err := chromedp.Run(ctx, chromedp.Evaluate[string](`location.href + "\n" + (window.__problems || []).join("\n") + "\n" + document.body.innerText.slice(0, 3000) + "\n" + performance.getEntriesByType("resource").slice(-30).map((e) => e.name + " " + e.responseStatus).join("\n")`))
	if err != nil {
		return fmt.Sprintf("(the page cannot be read: %v)", err)
	}
	return "the page:\n" + text
}

func (b *browser) screenshot(dir, name string) {
	b.t.Helper()
	// Animations and the caret settle first.
	time.Sleep(300 * time.Millisecond)
	ctx, cancel := context.WithTimeout(b.ctx, 20*time.Second)
	defer cancel()
	png, err := chromedp.Run(ctx, chromedp.CaptureScreenshot())
	if err != nil {
		b.t.Fatalf("screenshot %s: %v", name, err)
	}
	if len(png) == 0 || !bytes.HasPrefix(png, []byte("\x89PNG")) {
		b.t.Fatalf("screenshot %s: %d bytes, not a PNG", name, len(png))
	}
	path := filepath.Join(dir, "dashboard-"+name+".png")
	if err := os.WriteFile(path, png, 0o644); err != nil {
		b.t.Fatal(err)
	}
	b.t.Logf("screenshot %s (%d bytes)", path, len(png))
}

// logConsole copies the page's console and uncaught exceptions into the
// test's log, for a failure's story, until ctx ends.
func logConsole(t *testing.T, ctx context.Context, wg *sync.WaitGroup) {
	exceptions := chromedp.Events(ctx, runtime.ExceptionThrown)
	console := chromedp.Events(ctx, runtime.ConsoleAPICalled)
	wg.Go(func() {
		for ev, err := range exceptions {
			if err != nil {
				return
			}
			t.Logf("page exception: %s", ev.ExceptionDetails.Text)
		}
	})
	wg.Go(func() {
		for ev, err := range console {
			if err != nil {
				return
			}
			var parts []string
			for _, a := range ev.Args {
				if len(a.Value) > 0 {
					parts = append(parts, string(a.Value))
				} else {
					parts = append(parts, a.Description)
				}
			}
			t.Logf("page console.%s: %s", ev.Type, strings.Join(parts, " "))
		}
	})
}

// apiCall sends one request with the token and answers its status and
// body.
func apiCall(ctx context.Context, base, token, method, path, body string, header http.Header) (int, []byte, error) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, method, base+path, strings.NewReader(body))
	if err != nil {
		return 0, nil, err
	}
	for k, v := range header {
		req.Header[k] = v
	}
	req.Header.Set("Authorization", "Bearer "+token)
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, nil, fmt.Errorf("%s %s: %w", method, path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return 0, nil, fmt.Errorf("%s %s: read the answer: %w", method, path, err)
	}
	return resp.StatusCode, b, nil
}

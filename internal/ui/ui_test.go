package ui_test

import (
	"net/http"
	"net/http/httptest"
	"regexp"
	"strings"
	"testing"

	"github.com/smolvm/smolvm/internal/api"
	"github.com/smolvm/smolvm/internal/ui"
)

var inlineHandler = regexp.MustCompile(`\son[a-z]+=`)

func get(t *testing.T, h http.Handler, path string, header http.Header) *httptest.ResponseRecorder {
	t.Helper()
	r := httptest.NewRequest(http.MethodGet, "http://127.0.0.1:8000"+path, nil)
	for k, v := range header {
		r.Header[k] = v
	}
	w := httptest.NewRecorder()
	h.ServeHTTP(w, r)
	return w
}

// TestHandler checks what the browser relies on: the page at every path
// under /ui/ with its CSP, the script with a JavaScript type (nosniff
// refuses it otherwise), and cheap revalidation.
func TestHandler(t *testing.T) {
	h := ui.Handler()
	var page string
	for _, path := range []string{"/ui/", "/ui/sandboxes/x"} {
		w := get(t, h, path, nil)
		if w.Code != http.StatusOK {
			t.Fatalf("GET %s: %d", path, w.Code)
		}
		if ct := w.Header().Get("Content-Type"); !strings.HasPrefix(ct, "text/html") {
			t.Errorf("GET %s: Content-Type %q, want text/html", path, ct)
		}
		csp := w.Header().Get("Content-Security-Policy")
		for _, want := range []string{"default-src 'none'", "script-src 'self'", "connect-src 'self'"} {
			if !strings.Contains(csp, want) {
				t.Errorf("GET %s: CSP %q lacks %q", path, csp, want)
			}
		}
		if strings.Contains(csp, "unsafe-eval") || strings.Contains(csp, "script-src 'self' 'unsafe-inline'") {
			t.Errorf("GET %s: CSP %q allows inline or eval'd scripts", path, csp)
		}
		body := w.Body.String()
		if !strings.Contains(body, `<script src="/ui/app.js">`) || !strings.Contains(body, `href="/ui/app.css"`) {
			t.Errorf("GET %s: the page does not load /ui/app.js and /ui/app.css by absolute path:\n%s", path, body)
		}
		if page == "" {
			page = body
		} else if body != page {
			t.Errorf("GET %s answered another page than /ui/", path)
		}
	}
	// The page has no inline script: the CSP would refuse it.
	if strings.Contains(page, "<script>") || inlineHandler.MatchString(page) {
		t.Errorf("the page has inline script:\n%s", page)
	}

	w := get(t, h, "/ui/app.js", nil)
	if w.Code != http.StatusOK || w.Body.Len() == 0 {
		t.Fatalf("GET /ui/app.js: %d, %d bytes", w.Code, w.Body.Len())
	}
	if ct := w.Header().Get("Content-Type"); !strings.HasPrefix(ct, "text/javascript") {
		t.Errorf("GET /ui/app.js: Content-Type %q, want text/javascript", ct)
	}
	if w.Header().Get("X-Content-Type-Options") != "nosniff" {
		t.Errorf("GET /ui/app.js: no X-Content-Type-Options: nosniff")
	}
	etag := w.Header().Get("ETag")
	if etag == "" {
		t.Fatal("GET /ui/app.js: no ETag")
	}
	w = get(t, h, "/ui/app.js", http.Header{"If-None-Match": {etag}})
	if w.Code != http.StatusNotModified || w.Body.Len() != 0 {
		t.Errorf("GET /ui/app.js with If-None-Match: %d, %d bytes; want 304 and no body", w.Code, w.Body.Len())
	}
	if w := get(t, h, "/ui/app.js", http.Header{"If-None-Match": {`"other"`}}); w.Code != http.StatusOK {
		t.Errorf("GET /ui/app.js with a stale ETag: %d, want 200", w.Code)
	}

	if ct := get(t, h, "/ui/app.css", nil).Header().Get("Content-Type"); !strings.HasPrefix(ct, "text/css") {
		t.Errorf("GET /ui/app.css: Content-Type %q, want text/css", ct)
	}
}

// TestServedWithoutToken checks that the server hands out the dashboard to
// a browser that has no token yet (the page asks for it), while the API
// behind it still wants one.
func TestServedWithoutToken(t *testing.T) {
	h := api.New(nil, api.Options{Token: "s3cret", Addr: "127.0.0.1:8000"})
	for _, path := range []string{"/ui/", "/ui/app.js", "/ui/sandboxes/vm-12345678"} {
		if w := get(t, h, path, nil); w.Code != http.StatusOK {
			t.Errorf("GET %s without a token: %d, want 200", path, w.Code)
		}
	}
	if w := get(t, h, "/sandboxes", nil); w.Code != http.StatusUnauthorized {
		t.Errorf("GET /sandboxes without a token: %d, want 401", w.Code)
	}
}

// Package ui is the web dashboard: TypeScript sources in web/, built with
// esbuild through npm into dist/, which is committed and embedded so that
// `go build` alone gives a working dashboard. A test rebuilds dist/ and
// fails when the committed copy is stale.
package ui

import (
	"crypto/sha256"
	"embed"
	"encoding/hex"
	"io/fs"
	"mime"
	"net/http"
	"path"
	"strings"
)

//go:embed dist
var dist embed.FS

// Prefix is where the server mounts the dashboard.
const Prefix = "/ui/"

// csp lets the page load only its own files and talk only to its own
// server. Styles may be inline: the terminal (xterm.js) sets its colours
// and cell sizes through style elements it creates.
var csp = strings.Join([]string{
	"default-src 'none'",
	"base-uri 'none'",
	"connect-src 'self'",
	"font-src 'self'",
	"form-action 'none'",
	"frame-ancestors 'none'",
	"img-src 'self' data:",
	"script-src 'self'",
	"style-src 'self' 'unsafe-inline'",
}, "; ")

type file struct {
	body        []byte
	etag        string
	contentType string
}

// Handler serves the dashboard's files under Prefix. Any other path under
// it answers the page itself, so a reload of any view works.
func Handler() http.Handler {
	files := map[string]file{}
	// dist is embedded at build time; reading it cannot fail at run time,
	// and a dashboard missing from the build answers 404 below.
	_ = fs.WalkDir(dist, "dist", func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		b, err := dist.ReadFile(p)
		if err != nil {
			return err
		}
		sum := sha256.Sum256(b)
		ct := mime.TypeByExtension(path.Ext(p))
		if ct == "" {
			ct = "application/octet-stream"
		}
		files[strings.TrimPrefix(p, "dist/")] = file{body: b, etag: `"` + hex.EncodeToString(sum[:12]) + `"`, contentType: ct}
		return nil
	})
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		h.Set("Content-Security-Policy", csp)
		h.Set("X-Content-Type-Options", "nosniff")
		h.Set("Referrer-Policy", "no-referrer")
		name := strings.TrimPrefix(r.URL.Path, Prefix)
		f, ok := files[name]
		if !ok {
			f, ok = files["index.html"]
		}
		if !ok {
			http.Error(w, "this binary was built without the dashboard", http.StatusNotFound)
			return
		}
		// The names are fixed (no content hashes), so a browser must
		// revalidate; the ETag makes that cheap.
		h.Set("Cache-Control", "no-cache")
		h.Set("ETag", f.etag)
		h.Set("Content-Type", f.contentType)
		if r.Header.Get("If-None-Match") == f.etag {
			w.WriteHeader(http.StatusNotModified)
			return
		}
		w.Write(f.body)
	})
}

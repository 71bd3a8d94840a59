package image

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"io"
	"io/fs"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// Placeholders in a layer spec's link field: the absolute paths of a
// directory outside the root, and of the root itself.
const (
	outsideToken = "@OUT@"
	rootToken    = "@ROOT@"
)

// layerSpecs are the seeds of FuzzApplyLayer, each an attempt to reach
// outside the root or to break the applier. A spec has one entry a line,
// fields separated by tabs (type, name, link, number), and layers
// separated by "-" lines. Types: f file (w the same, for whiteouts), d
// directory, l symlink, h hard link, c and b devices (number major:minor),
// p FIFO, x file with an xattr named by link, P and g file and global
// header with the PAX record link=number, G GNU sparse, L long name, s
// file claiming size number (ending the layer); any other byte is taken as
// the type flag.
var layerSpecs = []string{
	// Climbing out by name.
	"f\t../escape.txt", "f\ta/../../escape.txt", "f\t/../../escape.txt", "d\t..", "f\t./../x",
	// Symlinks out, then a file, a directory, a link and a whiteout
	// written through them, in the same layer and in the next.
	"l\tout\t" + outsideToken + "\nf\tout/new.txt",
	"l\tout\t" + outsideToken + "\n-\nf\tout/new.txt\nd\tout/newdir/\nf\tout/newdir/x",
	"l\tup\t../../..\nf\tup/new.txt\nl\tup2\t../outside\nf\tup2/keep",
	"l\tabs\t/\nf\tabs/etc/passwd", "l\tself\t" + rootToken + "/..\nf\tself/x",
	"l\tout\t" + outsideToken + "\n-\nf\tout/.wh.keep",
	"l\tout\t" + outsideToken + "\n-\nf\tout/.wh..wh..opq\nf\tout/x",
	"l\tout\t" + outsideToken + "/keep\n-\nf\tout",
	"l\tout\t" + outsideToken + "/keep\nh\thard\tout",
	"l\tdangling\t" + outsideToken + "/made/here\nf\tdangling/x",
	"l\tloop\tloop\nf\tloop/x", "l\ta\tb\nl\tb\ta\nf\ta/x",
	// Hard links out of the root, or to what a symlink names.
	"h\thard\t" + outsideToken + "/keep", "h\thard\t../outside/keep", "h\thard\t/etc/passwd",
	"f\tx\nh\ty\t../../etc/passwd", "h\tself\tself", "h\troot\t/",
	// Whiteouts of odd names.
	"w\tsub/.wh...", "w\t.wh..", "w\t.wh..wh..opq", "w\t.wh.", "d\tsub/\nw\tsub/.wh..wh..opq\nw\tsub/.wh...",
	// Device nodes, FIFOs and an entry replacing the root's own mode.
	"c\tnull\t\t1:3", "b\tsda\t\t8:0", "c\tbig\t\t4294967295:4294967295", "p\tfifo", "d\t/\t\t0",
	// Huge and wrong sizes, long names, PAX records and global headers.
	"s\tbig.bin\t\t1099511627776", "s\tshort\t\t-1", "L\tlong-name", "f\t" + strings.Repeat("n", 300),
	"x\tattr\tuser.smolvm", "x\tattr\tsecurity.capability", "P\tpax\tpath\t../../escape",
	"P\tpax\tlinkpath\t" + outsideToken, "g\tglobal\tpath\t../escape", "G\tgnu-sparse",
	// A directory replacing a file and the other way round.
	"f\tx\nd\tx/\nf\tx/y", "d\tx/\nf\tx/y\n-\nf\tx",
}

// FuzzApplyLayer: whatever a layer holds, unpacking it never panics and
// never creates, changes or removes anything outside the root. The layers
// are built with archive/tar from a fuzzed spec, or (raw) are the fuzzed
// bytes themselves, compressed or not.
func FuzzApplyLayer(f *testing.F) {
	if runtime.GOOS != "linux" {
		f.Skip("unpacking layers is Linux-only")
	}
	for i, spec := range layerSpecs {
		f.Add(spec, []byte("content"), false, true)
		if i%8 == 0 {
			f.Add(spec, []byte{}, false, false)
		}
	}
	f.Add("", tarBytes(f, []entry{symlink("out", "/"), file("out/etc/x", 0o644, "x")}), true, true)
	f.Add("", tarBytes(f, []entry{{hdr: tar.Header{Typeflag: tar.TypeReg, Name: "sparse", Mode: 0o644,
		PAXRecords: map[string]string{"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": "../sparse", "GNU.sparse.realsize": "1099511627776"}}}}), true, true)
	f.Add("", []byte("\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03"), true, true)
	f.Add("", bytes.Repeat([]byte{0}, 1024), true, false)

	// The tree around the roots is made once per process: creating files
	// costs more than unpacking most inputs. Inputs run one at a time in
	// a process, each in a root of its own that is removed after it, and
	// the tree must look the same after every one; one an input changed is
	// replaced, so the next inputs are judged on their own.
	fx, err := newLayerFixture()
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { fx.remove() })

	f.Fuzz(func(t *testing.T, spec string, body []byte, raw, whiteouts bool) {
		var layers [][]byte
		root, err := os.MkdirTemp(fx.roots, "root-")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			// Entries may have taken away the owner's permissions.
			makeRemovable(root)
			if err := os.RemoveAll(root); err != nil {
				t.Errorf("remove the root: %v", err)
			}
		})
		if raw {
			l, ok := rawLayer(body)
			if !ok {
				return
			}
			layers = [][]byte{l}
		} else {
			layers = specLayers(spec, body, fx.outside, root)
		}

		a, err := newApplier(root, whiteouts, func(string) {})
		if err != nil {
			t.Fatal(err)
		}
		defer a.close()
		for _, l := range layers {
			if err = a.apply(context.Background(), bytes.NewReader(l)); err != nil {
				break
			}
		}
		if err == nil {
			err = a.finish()
		}
		_ = a.hasShell()

		after, serr := snapshotOutside(fx.top, fx.roots, root)
		if serr != nil {
			t.Fatal(serr)
		}
		if before := fx.before; !slices.Equal(after, before) {
			changed := fx
			fresh, ferr := newLayerFixture()
			if ferr != nil {
				t.Fatal(ferr)
			}
			fx = fresh
			changed.remove()
			var diff []string
			for _, l := range before {
				if !slices.Contains(after, l) {
					diff = append(diff, "- "+l)
				}
			}
			for _, l := range after {
				if !slices.Contains(before, l) {
					diff = append(diff, "+ "+l)
				}
			}
			t.Fatalf("unpacking changed what is outside the root %s (apply error: %v):\n%s", root, err, strings.Join(diff, "\n"))
		}
		if st, err := os.Lstat(root); err != nil || !st.IsDir() {
			t.Fatalf("the root is no longer a directory: %v, %v", st, err)
		}
	})
}

// layerFixture is the tree the roots are made in:
//
//	top/a/b/roots/keep            the roots' parent holds a file too
//	top/a/b/outside/keep          what symlinks in the layers point at
//	top/a/b/outside/keepdir/inner
type layerFixture struct {
	top, roots, outside string
	before              []string // snapshotOutside with no root
}

func newLayerFixture() (*layerFixture, error) {
	top, err := os.MkdirTemp("", "FuzzApplyLayer")
	if err != nil {
		return nil, err
	}
	fx := &layerFixture{top: top, roots: filepath.Join(top, "a", "b", "roots"), outside: filepath.Join(top, "a", "b", "outside")}
	for _, d := range []string{fx.roots, filepath.Join(fx.outside, "keepdir")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return nil, err
		}
	}
	for _, p := range []string{filepath.Join(fx.roots, "keep"), filepath.Join(fx.outside, "keep"), filepath.Join(fx.outside, "keepdir", "inner")} {
		if err := os.WriteFile(p, []byte("keep"), 0o644); err != nil {
			return nil, err
		}
	}
	fx.before, err = snapshotOutside(fx.top, fx.roots, "")
	return fx, err
}

func (fx *layerFixture) remove() {
	makeRemovable(fx.top)
	os.RemoveAll(fx.top)
}

// snapshotOutside describes everything below top but the root's contents:
// names, types, inodes, link counts, modes, sizes and times, which any
// write there would change. Of roots, the directory the roots are made in,
// only the name and mode count; root is left out ("" when there is none).
func snapshotOutside(top, roots, root string) ([]string, error) {
	var out []string
	err := filepath.WalkDir(top, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			out = append(out, p+": "+err.Error())
			return nil
		}
		if p == root {
			return filepath.SkipDir
		}
		fi, err := d.Info()
		if err != nil {
			out = append(out, p+": "+err.Error())
			return nil
		}
		if p == roots {
			out = append(out, p+" "+fi.Mode().String())
			return nil
		}
		st := fi.Sys().(*syscall.Stat_t)
		line := p + " " + fi.Mode().String() + " ino=" + strconv.FormatUint(st.Ino, 10) +
			" nlink=" + strconv.FormatUint(uint64(st.Nlink), 10) + " size=" + strconv.FormatInt(fi.Size(), 10) +
			" mtime=" + fi.ModTime().Format(time.RFC3339Nano)
		if fi.Mode().IsRegular() {
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			line += " content=" + strconv.Quote(string(b))
		}
		out = append(out, line)
		return nil
	})
	return out, err
}

// makeRemovable gives the owner full access to every directory below top.
func makeRemovable(top string) {
	filepath.WalkDir(top, func(p string, d fs.DirEntry, err error) error {
		if err == nil && d.IsDir() {
			os.Chmod(p, 0o700)
		}
		return nil
	})
}

// rawLayer decompresses b as a layer blob would be. It refuses what would
// make a slow input rather than a finding: more than 4 MiB of tar, or an
// entry with more than 1 MiB of content (a sparse file can claim a
// terabyte in a few bytes).
func rawLayer(b []byte) ([]byte, bool) {
	r, err := decompress(bytes.NewReader(b))
	if err != nil {
		return b, true // apply sees the same bytes and must refuse them too
	}
	defer r.Close()
	l, err := io.ReadAll(io.LimitReader(r, 4<<20+1))
	if len(l) > 4<<20 {
		return nil, false
	}
	if err != nil {
		return l, true // a stream cut short: apply must refuse it
	}
	tr := tar.NewReader(bytes.NewReader(l))
	for {
		if _, err := tr.Next(); err != nil {
			return l, true
		}
		if n, _ := io.Copy(io.Discard, io.LimitReader(tr, 1<<20+1)); n > 1<<20 {
			return nil, false
		}
	}
}

// specLayers builds tar layers from spec (see layerSpecs); every regular
// file holds body.
func specLayers(spec string, body []byte, outside, root string) [][]byte {
	var layers [][]byte
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	done := false
	flush := func() {
		if !done {
			tw.Close()
		}
		layers = append(layers, slices.Clone(buf.Bytes()))
		buf.Reset()
		tw = tar.NewWriter(&buf)
		done = false
	}
	mtime := time.Date(2024, 5, 1, 12, 0, 0, 0, time.UTC)
	lines := strings.Split(spec, "\n")
	for _, line := range lines[:min(len(lines), 64)] {
		if line == "-" {
			flush()
			continue
		}
		if done || line == "" {
			continue
		}
		f := append(strings.SplitN(line, "\t", 4), "", "", "")
		typ, name, link, num := f[0], f[1], f[2], f[3]
		link = strings.ReplaceAll(strings.ReplaceAll(link, outsideToken, outside), rootToken, root)
		n, _ := strconv.ParseInt(num, 0, 64)
		h := &tar.Header{Name: name, Linkname: link, Mode: 0o644, ModTime: mtime, Typeflag: tar.TypeReg}
		if num != "" {
			h.Mode = n & 0o7777
		}
		content := body
		switch typ {
		case "f", "w":
		case "d":
			h.Typeflag = tar.TypeDir
			content = nil
		case "l":
			h.Typeflag = tar.TypeSymlink
			content = nil
		case "h":
			h.Typeflag = tar.TypeLink
			content = nil
		case "c", "b":
			h.Typeflag = tar.TypeChar
			if typ == "b" {
				h.Typeflag = tar.TypeBlock
			}
			major, minor, _ := strings.Cut(num, ":")
			h.Devmajor, _ = strconv.ParseInt(major, 10, 64)
			h.Devminor, _ = strconv.ParseInt(minor, 10, 64)
			h.Mode = 0o600
			content = nil
		case "p":
			h.Typeflag = tar.TypeFifo
			content = nil
		case "x":
			h.PAXRecords = map[string]string{xattrPAXPrefix + link: string(body)}
			h.Linkname = ""
		case "P", "g":
			// A PAX record the writer may refuse; then the entry is left out.
			h.PAXRecords = map[string]string{link: num}
			h.Linkname = ""
			h.Mode = 0o644
			if typ == "g" {
				h.Typeflag = tar.TypeXGlobalHeader
				content = nil
			}
		case "G":
			h.Typeflag = tar.TypeGNUSparse
		case "L":
			h.Name = strings.Repeat("deep/", 60) + name
		case "s":
			// A size the content does not have: the layer ends inside the
			// entry.
			h.Size = n
			h.Mode = 0o644
			if tw.WriteHeader(h) == nil {
				tw.Flush()
			}
			buf.Write(body)
			done = true
			continue
		default:
			if typ != "" {
				h.Typeflag = typ[0]
			}
		}
		h.Size = int64(len(content))
		if h.Typeflag != tar.TypeReg {
			h.Size = 0
			content = nil
		}
		if err := tw.WriteHeader(h); err != nil {
			continue
		}
		tw.Write(content)
	}
	flush()
	return layers
}

// fakeRegistry answers the registry API from memory: manifests by tag or
// digest with the media type given, blobs by digest, nothing else.
type fakeRegistry struct {
	manifests map[string]fakeManifest
	blobs     map[string][]byte
}

type fakeManifest struct {
	mediaType string
	body      []byte
}

func (r *fakeRegistry) RoundTrip(req *http.Request) (*http.Response, error) {
	if req.Body != nil {
		req.Body.Close()
	}
	resp := func(status int, contentType string, body []byte) *http.Response {
		h := http.Header{}
		if contentType != "" {
			h.Set("Content-Type", contentType)
		}
		h.Set("Content-Length", strconv.Itoa(len(body)))
		if req.Method == http.MethodHead {
			body = nil
		}
		return &http.Response{StatusCode: status, Status: http.StatusText(status), Header: h, Request: req,
			ContentLength: int64(len(body)), Body: io.NopCloser(bytes.NewReader(body)), ProtoMajor: 1, ProtoMinor: 1}
	}
	unknown := resp(http.StatusNotFound, "application/json", []byte(`{"errors":[{"code":"NAME_UNKNOWN","message":"unknown"}]}`))
	p := req.URL.Path
	last := p[strings.LastIndex(p, "/")+1:]
	switch {
	case p == "/v2/":
		return resp(http.StatusOK, "application/json", []byte("{}")), nil
	case strings.Contains(p, "/manifests/"):
		if m, ok := r.manifests[last]; ok {
			return resp(http.StatusOK, m.mediaType, m.body), nil
		}
	case strings.Contains(p, "/blobs/"):
		if b, ok := r.blobs[last]; ok {
			return resp(http.StatusOK, "application/octet-stream", b), nil
		}
	}
	return unknown, nil
}

func sha256Digest(b []byte) string {
	sum := sha256.Sum256(b)
	return "sha256:" + hex.EncodeToString(sum[:])
}

// fuzzSource is the reference the registry targets serve, on a host that
// is never contacted.
func fuzzSource(t *testing.T, ref string) *source {
	s, err := ociSource(ref, Options{})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func fuzzOptions(reg *fakeRegistry) []remote.Option {
	return remoteOptions(Options{Keychain: authn.NewMultiKeychain()}, reg)
}

// indexJSON is an index of the given platforms ("" for none given).
func indexJSON(mediaType types.MediaType, platforms ...string) []byte {
	idx := v1.IndexManifest{SchemaVersion: 2, MediaType: types.OCIImageIndex}
	for i, p := range platforms {
		d := v1.Descriptor{MediaType: mediaType, Size: 100, Digest: v1.Hash{Algorithm: "sha256", Hex: strings.Repeat(strconv.Itoa(i%10), 64)}}
		if p != "" {
			osName, arch, _ := strings.Cut(p, "/")
			d.Platform = &v1.Platform{OS: osName, Architecture: arch}
		}
		idx.Manifests = append(idx.Manifests, d)
	}
	b, _ := json.Marshal(idx)
	return b
}

// FuzzResolveManifest: whatever a registry answers for a reference (an
// index, a manifest, anything else, under any media type), resolving it
// never panics; it names the digest of what was served, picks the first
// linux/amd64 image manifest of an index, and refuses anything else with
// an error rather than a guess.
func FuzzResolveManifest(f *testing.F) {
	manifest, _ := json.Marshal(v1.Manifest{SchemaVersion: 2, MediaType: types.OCIManifestSchema1,
		Config: v1.Descriptor{MediaType: types.OCIConfigJSON, Size: 2, Digest: v1.Hash{Algorithm: "sha256", Hex: strings.Repeat("a", 64)}}})
	for _, s := range []struct {
		mediaType types.MediaType
		body      []byte
	}{
		{types.OCIImageIndex, indexJSON(types.OCIManifestSchema1, "linux/arm64", "linux/amd64", "linux/amd64")},
		{types.DockerManifestList, indexJSON(types.DockerManifestSchema2, "unknown/unknown", "")},
		{types.OCIImageIndex, indexJSON(types.OCIManifestSchema1, "windows/amd64", "linux/arm64")},
		{types.OCIImageIndex, indexJSON(types.OCIImageIndex, "linux/amd64")},
		{types.OCIImageIndex, indexJSON(types.OCIManifestSchema1)},
		{types.OCIImageIndex, []byte(`{"manifests":[{"platform":null,"digest":"sha256:zz","mediaType":"application/vnd.oci.image.manifest.v1+json"}]}`)},
		{types.OCIImageIndex, []byte(`{"manifests":"nope"}`)},
		{types.OCIImageIndex, []byte(`null`)},
		{types.OCIManifestSchema1, manifest},
		{types.DockerManifestSchema2, []byte("not json")},
		{types.DockerManifestSchema1Signed, []byte(`{"schemaVersion":1}`)},
		{types.OCIConfigJSON, []byte(`{}`)},
		{"text/html", []byte("<html>")},
		{"", nil},
	} {
		f.Add(string(s.mediaType), s.body, false)
		f.Add(string(s.mediaType), s.body, true)
	}
	f.Fuzz(func(t *testing.T, mediaType string, body []byte, byDigest bool) {
		digest := sha256Digest(body)
		reg := &fakeRegistry{manifests: map[string]fakeManifest{
			"latest": {mediaType, body},
			digest:   {mediaType, body},
		}}
		ref := "fuzz.invalid/fuzz:latest"
		if byDigest {
			ref = "fuzz.invalid/fuzz@" + digest
		}
		top, chosen, err := resolveDigest(context.Background(), fuzzSource(t, ref), Options{}, fuzzOptions(reg))

		mt := types.MediaType(mediaType)
		var want string
		switch {
		case mt.IsIndex():
			if idx, perr := v1.ParseIndexManifest(bytes.NewReader(body)); perr == nil {
				for _, c := range idx.Manifests {
					p := v1.Platform{OS: guestOS, Architecture: guestArch}
					if c.Platform != nil {
						p = *c.Platform
					}
					if p.OS == guestOS && p.Architecture == guestArch && c.MediaType.IsImage() {
						want = c.Digest.String()
						break
					}
				}
			}
		case mt.IsImage():
			want = digest
		}
		if want == "" {
			if err == nil {
				t.Fatalf("resolved %s %q to %s without a linux/amd64 image manifest", mediaType, body, chosen)
			}
			if e, ok := AsError(err); ok && strings.Contains(e.Error(), "\n") {
				t.Fatalf("error is not one line: %q", e.Error())
			}
			return
		}
		if err != nil {
			t.Fatalf("resolve %s %q: %v; want %s", mediaType, body, err, want)
		}
		if top.String() != digest || chosen.String() != want {
			t.Fatalf("resolve %s %q = %s, %s; want %s, %s", mediaType, body, top, chosen, digest, want)
		}
	})
}

// FuzzOCIConfig: an image whose config is anything at all (wrong JSON,
// wrong types, another platform, a size or digest that does not match its
// descriptor) and whose layers cannot be had never panics a build: it is
// refused with an error, a foreign platform as unsupported.
func FuzzOCIConfig(f *testing.F) {
	if _, err := treeTools(); err != nil {
		f.Skip(err)
	}
	for _, s := range []struct {
		config string
		layers uint8
	}{
		{`{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/bin","A=b=c"],"WorkingDir":"/data","User":"1000:1000","Cmd":["sh"],"Entrypoint":["/bin/sh","-c"]}}`, 0},
		{`{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/bin"]}}`, 2},
		{`{"architecture":"arm64","os":"linux"}`, 0},
		{`{"architecture":"amd64","os":"windows","os.version":"10.0.17763.1"}`, 0},
		{`{"architecture":"","os":""}`, 0},
		{`{"config":{"Env":"PATH=/bin","WorkingDir":7,"User":null}}`, 0},
		{`{"config":{"Env":[null,"\u0000=x"],"WorkingDir":"../../..","User":"root:root:extra"}}`, 0},
		{`{"rootfs":{"type":"layers","diff_ids":["sha256:zz"]},"history":[{"created":"not a time"}]}`, 1},
		{`{"created":"0001-01-01T00:00:00Z","config":{"Healthcheck":{"Interval":-1}}}`, 0},
		{`[]`, 0},
		{`null`, 0},
		{``, 0},
		{`{"architecture":"amd64","os":"linux"` + strings.Repeat(`,"x":{}`, 1000) + `}`, 0},
	} {
		f.Add([]byte(s.config), string(types.OCIConfigJSON), int8(0), s.layers, int64(100))
	}
	f.Add([]byte(`{"architecture":"amd64","os":"linux"}`), string(types.OCIConfigJSON), int8(1), uint8(0), int64(0))
	f.Add([]byte(`{"architecture":"amd64","os":"linux"}`), string(types.DockerConfigJSON), int8(-1), uint8(1), int64(-1))
	f.Add([]byte(`{"architecture":"amd64","os":"linux"}`), "application/octet-stream", int8(0), uint8(3), int64(1<<62))

	f.Fuzz(func(t *testing.T, config []byte, configType string, sizeDelta int8, layers uint8, layerSize int64) {
		reg := &fakeRegistry{blobs: map[string][]byte{sha256Digest(config): config}}
		m := v1.Manifest{SchemaVersion: 2, MediaType: types.OCIManifestSchema1, Config: v1.Descriptor{
			MediaType: types.MediaType(configType), Size: int64(len(config)) + int64(sizeDelta),
			Digest: v1.Hash{Algorithm: "sha256", Hex: sha256Digest(config)[len("sha256:"):]},
		}}
		for i := range int(layers % 8) {
			// Layers the registry does not have.
			m.Layers = append(m.Layers, v1.Descriptor{MediaType: types.OCILayer, Size: layerSize,
				Digest: v1.Hash{Algorithm: "sha256", Hex: sha256Digest([]byte{byte(i)})[len("sha256:"):]}})
		}
		mb, err := json.Marshal(m)
		if err != nil {
			t.Fatal(err)
		}
		digest := sha256Digest(mb)
		reg.manifests = map[string]fakeManifest{digest: {string(types.OCIManifestSchema1), mb}}
		h, err := v1.NewHash(digest)
		if err != nil {
			t.Fatal(err)
		}
		work := t.TempDir()
		out := filepath.Join(work, "out")
		if err := os.Mkdir(out, 0o755); err != nil {
			t.Fatal(err)
		}
		rep := newReporter(Options{})
		meta, err := buildOCI(context.Background(), fuzzSource(t, "fuzz.invalid/fuzz:latest"), h, h, fuzzOptions(reg), work, out, rep)
		if err == nil {
			t.Fatalf("built an image without layers or a shell: %+v", meta)
		}
		if sizeDelta != 0 {
			return // the config blob does not match its descriptor
		}
		cfg, perr := v1.ParseConfigFile(bytes.NewReader(config))
		if perr != nil {
			return
		}
		e, isErr := AsError(err)
		if (cfg.OS != "" && cfg.OS != guestOS) || (cfg.Architecture != "" && cfg.Architecture != guestArch) {
			if !isErr || e.Code != CodeUnsupported {
				t.Fatalf("config for %s/%s: error %v, want %s", cfg.OS, cfg.Architecture, err, CodeUnsupported)
			}
			return
		}
		if len(m.Layers) == 0 && (!isErr || e.Code != CodeUnsupported || !strings.Contains(e.Message, "/bin/sh")) {
			t.Fatalf("an image without layers: error %v, want one about /bin/sh", err)
		}
		if len(m.Layers) > 0 && !strings.Contains(err.Error(), "layer") {
			t.Fatalf("an image whose layers are missing: error %v", err)
		}
	})
}

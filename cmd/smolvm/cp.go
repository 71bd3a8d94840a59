package main

import (
	"archive/tar"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"strings"
	"time"

	"github.com/schollz/progressbar/v3"
	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/smolvm/smolvm"
	"github.com/smolvm/smolvm/internal/api"
	"github.com/smolvm/smolvm/internal/sandbox"
)

// progressMin is the size from which a copy to a terminal shows a bar.
const progressMin = 4 << 20

func newSandboxCpCmd(sf *sandboxFlags) *cobra.Command {
	return &cobra.Command{
		Use:   "cp SRC DST",
		Short: "Copy files and directories between a sandbox and this host",
		Long: `Copy a file or a directory tree between a sandbox and this host, as docker
cp does. One side is ID:PATH (an absolute path in the sandbox), the other a
host path, or - for a tar on stdin or stdout.

A directory is copied whole: into DST when DST is an existing directory,
else as DST. A file goes into DST when DST is an existing directory, else
becomes DST. "cp ID:PATH -" writes a tar of PATH (its name as the top
entry); "cp - ID:DIR" unpacks a tar from stdin into DIR.`,
		Example: `  smolvm sandbox cp ./project vm-a1b2c3d4:/root/
  smolvm sandbox cp vm-a1b2c3d4:/root/project/out.json .
  smolvm sandbox cp vm-a1b2c3d4:/var/log - | tar -tv`,
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			srcID, src := splitRemote(args[0])
			dstID, dst := splitRemote(args[1])
			switch {
			case srcID != "" && dstID != "":
				return errors.New("copy between two sandboxes through this host: cp ID:PATH - | smolvm sandbox cp - ID2:DIR")
			case srcID == "" && dstID == "":
				return errors.New("one side must be ID:PATH, a path in a sandbox")
			}
			return withSandboxClient(cmd, sf, func(ctx context.Context, c sandboxClient) error {
				if srcID != "" {
					return copyFrom(ctx, cmd, c, srcID, src, dst)
				}
				return copyTo(ctx, cmd, c, src, dstID, dst)
			})
		},
	}
}

var remoteID = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]*$`)

// splitRemote reads ID:PATH; anything else (with a / before any colon, or
// no colon) is a host path. A host path with a colon can be written ./a:b.
func splitRemote(s string) (id, p string) {
	if before, after, ok := strings.Cut(s, ":"); ok && remoteID.MatchString(before) {
		return before, after
	}
	return "", s
}

// progress wraps r in a bar on stderr when stderr is a terminal and the
// copy is big enough (size -1: unknown).
func progress(cmd *cobra.Command, r io.Reader, size int64, label string) (io.Reader, func()) {
	f, ok := cmd.ErrOrStderr().(*os.File)
	if !ok || !term.IsTerminal(int(f.Fd())) || (size >= 0 && size < progressMin) {
		return r, func() {}
	}
	bar := progressbar.NewOptions64(size,
		progressbar.OptionSetWriter(f),
		progressbar.OptionSetDescription(label),
		progressbar.OptionShowBytes(true),
		progressbar.OptionThrottle(100*time.Millisecond),
		progressbar.OptionClearOnFinish())
	pr := progressbar.NewReader(r, bar)
	return &pr, func() { bar.Finish() }
}

func copyFrom(ctx context.Context, cmd *cobra.Command, c sandboxClient, id, src, dst string) error {
	info, err := c.StatPath(ctx, id, src)
	if err != nil {
		return err
	}
	base := path.Base(path.Clean(src))
	if dst == "-" {
		return tarTo(ctx, c, id, src, base, info, cmd.OutOrStdout())
	}
	target := dst
	if fi, err := os.Stat(dst); err == nil && fi.IsDir() {
		target = filepath.Join(dst, base)
	} else if err == nil && info.Type == "directory" {
		return fmt.Errorf("%s is a file; a directory cannot be copied over it", dst)
	}
	if info.Type == "directory" {
		pr, pw := io.Pipe()
		go func() { pw.CloseWithError(c.DownloadTar(ctx, id, src, pw)) }()
		r, done := progress(cmd, pr, -1, "copying "+base)
		defer done()
		err := smolvm.ReadTar(r, target)
		pr.CloseWithError(errors.New("copy ended"))
		return err
	}
	tmp, err := os.CreateTemp(filepath.Dir(target), "."+filepath.Base(target)+".smolvm-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	pr, pw := io.Pipe()
	go func() { pw.CloseWithError(c.Download(ctx, id, src, pw)) }()
	r, done := progress(cmd, pr, info.Size, "copying "+base)
	_, err = io.Copy(tmp, r)
	done()
	pr.CloseWithError(errors.New("copy ended"))
	if err == nil {
		var mode uint64
		fmt.Sscanf(info.Mode, "%o", &mode)
		err = tmp.Chmod(os.FileMode(mode & 0o777))
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	return os.Rename(tmp.Name(), target)
}

// tarTo writes a tar of a guest path to w with base as its top entry, as
// docker cp does.
func tarTo(ctx context.Context, c sandboxClient, id, src, base string, info api.FileEntry, w io.Writer) error {
	tw := tar.NewWriter(w)
	var mode int64
	fmt.Sscanf(info.Mode, "%o", &mode)
	if info.Type != "directory" {
		if err := tw.WriteHeader(&tar.Header{Name: base, Typeflag: tar.TypeReg, Mode: mode, Size: info.Size, ModTime: info.ModTime}); err != nil {
			return err
		}
		if err := c.Download(ctx, id, src, tw); err != nil {
			return err
		}
		return tw.Close()
	}
	if err := tw.WriteHeader(&tar.Header{Name: base + "/", Typeflag: tar.TypeDir, Mode: mode, ModTime: info.ModTime}); err != nil {
		return err
	}
	pr, pw := io.Pipe()
	go func() { pw.CloseWithError(c.DownloadTar(ctx, id, src, pw)) }()
	defer pr.CloseWithError(errors.New("copy ended"))
	tr := tar.NewReader(pr)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return tw.Close()
		}
		if err != nil {
			return err
		}
		h.Name = base + "/" + h.Name
		if err := tw.WriteHeader(h); err != nil {
			return err
		}
		if _, err := io.Copy(tw, tr); err != nil {
			return err
		}
	}
}

func copyTo(ctx context.Context, cmd *cobra.Command, c sandboxClient, src, id, dst string) error {
	if src == "-" {
		return c.UploadTar(ctx, id, dst, cmd.InOrStdin())
	}
	fi, err := os.Stat(src)
	if err != nil {
		return err
	}
	base := filepath.Base(filepath.Clean(src))
	target := dst
	info, err := c.StatPath(ctx, id, dst)
	switch {
	case err != nil && !fileNotFound(err):
		return err
	case err == nil && info.Type == "directory":
		target = path.Join(dst, base)
	case err == nil && fi.IsDir():
		return fmt.Errorf("%s:%s is a file; a directory cannot be copied over it", id, dst)
	}
	if fi.IsDir() {
		pr, pw := io.Pipe()
		go func() { pw.CloseWithError(smolvm.WriteTar(pw, src)) }()
		r, done := progress(cmd, pr, -1, "copying "+base)
		defer done()
		err := c.UploadTar(ctx, id, target, r)
		pr.CloseWithError(errors.New("copy ended"))
		return err
	}
	f, err := os.Open(src)
	if err != nil {
		return err
	}
	defer f.Close()
	r, done := progress(cmd, f, fi.Size(), "copying "+base)
	defer done()
	return c.Upload(ctx, id, target, r, fi.Size(), uint32(fi.Mode().Perm()))
}

// fileNotFound reports a refusal because the path does not exist.
func fileNotFound(err error) bool {
	var pe *problemError
	if errors.As(err, &pe) {
		return pe.p.Code == "file_not_found"
	}
	e, ok := sandbox.AsError(err)
	return ok && e.Code == "file_not_found"
}

// The file operations of sandboxClient, on the Manager.

func (c localSandboxClient) StatPath(ctx context.Context, id, p string) (api.FileEntry, error) {
	f, err := c.m.StatPath(ctx, id, p)
	if err != nil {
		return api.FileEntry{}, err
	}
	return api.FileEntryFrom(f), nil
}

func (c localSandboxClient) Download(ctx context.Context, id, p string, w io.Writer) error {
	f, err := c.m.OpenFile(ctx, id, p, 0, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	_, err = io.Copy(w, f)
	return err
}

func (c localSandboxClient) DownloadTar(ctx context.Context, id, p string, w io.Writer) error {
	r, err := c.m.ReadTar(ctx, id, p)
	if err != nil {
		return err
	}
	defer r.Close()
	_, err = io.Copy(w, r)
	return err
}

func (c localSandboxClient) Upload(ctx context.Context, id, p string, r io.Reader, size int64, mode uint32) error {
	_, err := c.m.WriteFile(ctx, id, p, r, sandbox.WriteOptions{Size: size, Mode: mode})
	return err
}

func (c localSandboxClient) UploadTar(ctx context.Context, id, p string, r io.Reader) error {
	_, err := c.m.WriteTar(ctx, id, p, r)
	return err
}

// The file operations of sandboxClient, over HTTP.

func (c *httpSandboxClient) StatPath(ctx context.Context, id, p string) (api.FileEntry, error) {
	var e api.FileEntry
	err := c.do(ctx, http.MethodGet, "/sandboxes/"+url.PathEscape(id)+"/fs/stat?path="+url.QueryEscape(p), nil, &e)
	return e, err
}

// raw sends a request whose body, or answer, is not JSON.
func (c *httpSandboxClient) raw(ctx context.Context, method, id, p string, query url.Values, body io.Reader, size int64, header http.Header) (*http.Response, error) {
	u := c.base.JoinPath("/sandboxes/" + url.PathEscape(id) + "/files")
	if query == nil {
		query = url.Values{}
	}
	query.Set("path", p)
	u.RawQuery = query.Encode()
	req, err := http.NewRequestWithContext(ctx, method, u.String(), body)
	if err != nil {
		return nil, err
	}
	for k, v := range header {
		req.Header[k] = v
	}
	if size >= 0 && body != nil {
		req.ContentLength = size
	}
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return nil, fmt.Errorf("reach smolvm server at %s: %w (is `smolvm server start` running?)", c.base, err)
	}
	if resp.StatusCode >= 300 {
		defer resp.Body.Close()
		var pr api.Problem
		if json.NewDecoder(resp.Body).Decode(&pr) == nil && pr.Code != "" {
			return nil, &problemError{p: pr}
		}
		return nil, fmt.Errorf("%s %s: %s", method, u.Path, resp.Status)
	}
	return resp, nil
}

func (c *httpSandboxClient) Download(ctx context.Context, id, p string, w io.Writer) error {
	resp, err := c.raw(ctx, http.MethodGet, id, p, nil, nil, -1, http.Header{"Accept": {"application/octet-stream"}})
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	n, err := io.Copy(w, resp.Body)
	if err == nil && resp.ContentLength >= 0 && n != resp.ContentLength {
		err = fmt.Errorf("the download of %s ended after %d of %d bytes", p, n, resp.ContentLength)
	}
	return err
}

func (c *httpSandboxClient) DownloadTar(ctx context.Context, id, p string, w io.Writer) error {
	resp, err := c.raw(ctx, http.MethodGet, id, p, nil, nil, -1, http.Header{"Accept": {"application/x-tar"}})
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	_, err = io.Copy(w, resp.Body)
	return err
}

func (c *httpSandboxClient) Upload(ctx context.Context, id, p string, r io.Reader, size int64, mode uint32) error {
	q := url.Values{"mode": {fmt.Sprintf("%04o", mode)}}
	resp, err := c.raw(ctx, http.MethodPut, id, p, q, r, size, http.Header{"Content-Type": {"application/octet-stream"}})
	if err != nil {
		return err
	}
	return resp.Body.Close()
}

func (c *httpSandboxClient) UploadTar(ctx context.Context, id, p string, r io.Reader) error {
	resp, err := c.raw(ctx, http.MethodPut, id, p, nil, r, -1, http.Header{"Content-Type": {"application/x-tar"}})
	if err != nil {
		return err
	}
	return resp.Body.Close()
}

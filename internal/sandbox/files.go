package sandbox

import (
	"context"
	"errors"
	"fmt"
	"io"
	"path"
	"strings"
	"time"

	"github.com/smolvm/smolvm/internal/agent/agentpb"
	"github.com/smolvm/smolvm/internal/guest"
	"github.com/smolvm/smolvm/internal/store"
)

// FileInfo describes a path in a sandbox.
type FileInfo struct {
	Name       string
	Path       string
	Type       string // "file", "directory", "symlink" or "other"
	Size       int64
	Mode       uint32 // permission bits with setuid, setgid and sticky, as chmod takes them
	ModTime    time.Time
	LinkTarget string // a symlink's target
	UID, GID   uint32
}

func fileInfo(e *agentpb.EntryInfo) FileInfo {
	t := "other"
	switch e.GetType() {
	case agentpb.FileType_FILE_TYPE_FILE:
		t = "file"
	case agentpb.FileType_FILE_TYPE_DIRECTORY:
		t = "directory"
	case agentpb.FileType_FILE_TYPE_SYMLINK:
		t = "symlink"
	}
	return FileInfo{Name: e.GetName(), Path: e.GetPath(), Type: t, Size: e.GetSize(), Mode: e.GetMode(),
		ModTime: time.Unix(0, e.GetMtimeUnixNano()).UTC(), LinkTarget: e.GetSymlinkTarget(), UID: e.GetUid(), GID: e.GetGid()}
}

// CheckPath accepts an absolute guest path with no ".." in it.
func CheckPath(field, p string) (string, error) {
	switch {
	case p == "":
		return "", invalid("invalid_path", field, "%s is required: an absolute path in the sandbox", field)
	case !path.IsAbs(p):
		return "", invalid("invalid_path", field, "%s %q is not absolute", field, p)
	case strings.IndexByte(p, 0) >= 0:
		return "", invalid("invalid_path", field, "%s contains a NUL byte", field)
	case len(p) > 4096:
		return "", invalid("invalid_path", field, "%s is longer than 4096 bytes", field)
	}
	for _, part := range strings.Split(p, "/") {
		if part == ".." {
			return "", invalid("invalid_path", field, "%s %q contains \"..\"", field, p)
		}
	}
	return path.Clean(p), nil
}

// fileErr maps the agent's refusal of a file call.
func (m *Manager) fileErr(ctx context.Context, rec store.Record, p string, err error) error {
	var ge *guest.Error
	if errors.As(err, &ge) {
		msg := fmt.Sprintf("%s: %s", p, ge.Message)
		switch ge.Code {
		case guest.CodeNotFound:
			return &Error{Kind: KindNotFound, Code: "file_not_found", Field: "path", Message: msg, Err: err}
		case guest.CodeExists:
			return &Error{Kind: KindConflict, Code: "file_exists", Field: "path", Message: msg, Err: err}
		case guest.CodeWrongState:
			return &Error{Kind: KindConflict, Code: "wrong_file_type", Field: "path", Message: msg, Err: err}
		case guest.CodeNoSpace:
			return &Error{Kind: KindInsufficientStorage, Code: "disk_full", Field: "path",
				Message: msg + "; nothing of it was kept. Create the sandbox with a larger disk_size", Err: err}
		case guest.CodeDenied:
			return &Error{Kind: KindConflict, Code: "permission_denied", Field: "path", Message: msg, Err: err}
		case guest.CodeInvalid:
			return &Error{Kind: KindInvalid, Code: "invalid_path", Field: "path", Message: msg, Err: err}
		}
	}
	return m.processErr(ctx, rec, nil, err)
}

// StatPath describes a path without following a final symlink.
func (m *Manager) StatPath(ctx context.Context, id, p string) (FileInfo, error) {
	p, err := CheckPath("path", p)
	if err != nil {
		return FileInfo{}, err
	}
	rec, c, err := m.runningClient(ctx, id)
	if err != nil {
		return FileInfo{}, err
	}
	e, err := c.Stat(ctx, p)
	if err != nil {
		return FileInfo{}, m.fileErr(ctx, rec, p, err)
	}
	return fileInfo(e), nil
}

// ListDir lists a directory, sorted by name.
func (m *Manager) ListDir(ctx context.Context, id, p string) ([]FileInfo, error) {
	p, err := CheckPath("path", p)
	if err != nil {
		return nil, err
	}
	rec, c, err := m.runningClient(ctx, id)
	if err != nil {
		return nil, err
	}
	es, err := c.ListDir(ctx, p)
	if err != nil {
		return nil, m.fileErr(ctx, rec, p, err)
	}
	out := make([]FileInfo, 0, len(es))
	for _, e := range es {
		out = append(out, fileInfo(e))
	}
	return out, nil
}

// MakeDir creates a directory, and its parents when asked; mode 0 means
// 0755.
func (m *Manager) MakeDir(ctx context.Context, id, p string, parents bool, mode uint32) (FileInfo, error) {
	p, err := CheckPath("path", p)
	if err != nil {
		return FileInfo{}, err
	}
	if mode > 0o7777 {
		return FileInfo{}, invalid("invalid_mode", "mode", "mode %o is not a permission mode (at most 7777)", mode)
	}
	rec, c, err := m.runningClient(ctx, id)
	if err != nil {
		return FileInfo{}, err
	}
	e, err := c.MakeDir(ctx, p, parents, mode)
	if err != nil {
		return FileInfo{}, m.fileErr(ctx, rec, p, err)
	}
	return fileInfo(e), nil
}

// MovePath renames a path (within the guest's filesystem).
func (m *Manager) MovePath(ctx context.Context, id, src, dst string) (FileInfo, error) {
	src, err := CheckPath("source", src)
	if err != nil {
		return FileInfo{}, err
	}
	dst, err = CheckPath("destination", dst)
	if err != nil {
		return FileInfo{}, err
	}
	rec, c, err := m.runningClient(ctx, id)
	if err != nil {
		return FileInfo{}, err
	}
	e, err := c.Move(ctx, src, dst)
	if err != nil {
		return FileInfo{}, m.fileErr(ctx, rec, src, err)
	}
	return fileInfo(e), nil
}

// RemovePath deletes a path; a directory with what is in it only when
// recursive.
func (m *Manager) RemovePath(ctx context.Context, id, p string, recursive bool) error {
	p, err := CheckPath("path", p)
	if err != nil {
		return err
	}
	if p == "/" {
		return invalid("invalid_path", "path", "refusing to remove /")
	}
	rec, c, err := m.runningClient(ctx, id)
	if err != nil {
		return err
	}
	if err := c.Remove(ctx, p, recursive); err != nil {
		return m.fileErr(ctx, rec, p, err)
	}
	return nil
}

// FileReader is a guest file being read.
type FileReader struct {
	io.ReadCloser
	Info FileInfo
}

// OpenFile reads a regular file from offset; length 0 means to its end.
func (m *Manager) OpenFile(ctx context.Context, id, p string, offset, length int64) (*FileReader, error) {
	p, err := CheckPath("path", p)
	if err != nil {
		return nil, err
	}
	rec, c, err := m.runningClient(ctx, id)
	if err != nil {
		return nil, err
	}
	r, err := c.OpenFile(ctx, p, offset, length)
	if err != nil {
		return nil, m.fileErr(ctx, rec, p, err)
	}
	return &FileReader{ReadCloser: r, Info: fileInfo(r.Entry)}, nil
}

// WriteOptions tune WriteFile.
type WriteOptions struct {
	Mode  uint32 // 0 means 0644
	Owner string // "user", "uid", "uid:gid" or "user:group"; "" keeps root
	// Size, when set, is the exact number of bytes r yields; anything else
	// fails the write.
	Size int64
}

// WriteFile streams r into a guest file, creating parent directories. The
// file appears under its name only once every byte arrived: a failed or
// cut upload leaves what was there before.
func (m *Manager) WriteFile(ctx context.Context, id, p string, r io.Reader, o WriteOptions) (FileInfo, error) {
	p, err := CheckPath("path", p)
	if err != nil {
		return FileInfo{}, err
	}
	if o.Mode > 0o7777 {
		return FileInfo{}, invalid("invalid_mode", "mode", "mode %o is not a permission mode (at most 7777)", o.Mode)
	}
	rec, c, err := m.runningClient(ctx, id)
	if err != nil {
		return FileInfo{}, err
	}
	e, err := c.WriteFile(ctx, &agentpb.WriteHeader{Path: p, Mode: o.Mode, Owner: o.Owner, Parents: true, Size: o.Size}, r)
	if err != nil {
		return FileInfo{}, m.fileErr(ctx, rec, p, err)
	}
	return fileInfo(e), nil
}

// ReadTar streams a tar of a guest directory's contents.
func (m *Manager) ReadTar(ctx context.Context, id, p string) (io.ReadCloser, error) {
	p, err := CheckPath("path", p)
	if err != nil {
		return nil, err
	}
	rec, c, err := m.runningClient(ctx, id)
	if err != nil {
		return nil, err
	}
	r, err := c.OpenTar(ctx, p)
	if err != nil {
		return nil, m.fileErr(ctx, rec, p, err)
	}
	return r, nil
}

// WriteTar unpacks a tar into a guest directory, made when missing.
func (m *Manager) WriteTar(ctx context.Context, id, p string, r io.Reader) (int64, error) {
	p, err := CheckPath("path", p)
	if err != nil {
		return 0, err
	}
	rec, c, err := m.runningClient(ctx, id)
	if err != nil {
		return 0, err
	}
	n, err := c.WriteTar(ctx, p, r)
	if err != nil {
		return n, m.fileErr(ctx, rec, p, err)
	}
	return n, nil
}

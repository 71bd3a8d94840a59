package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"syscall"

	"connectrpc.com/connect"
	"golang.org/x/sys/unix"

	"github.com/smolvm/smolvm/internal/agent/agentpb"
)

// fileChunk is the most one Read message carries.
const fileChunk = 256 << 10

// filesystemService is the Filesystem API.
type filesystemService struct{ s *Server }

// cleanPath accepts absolute paths only; the host resolves anything else.
func cleanPath(p string) (string, error) {
	if p == "" || !path.IsAbs(p) {
		return "", connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("path %q is not absolute", p))
	}
	if strings.IndexByte(p, 0) >= 0 {
		return "", connect.NewError(connect.CodeInvalidArgument, errors.New("path contains a NUL byte"))
	}
	return path.Clean(p), nil
}

// fsError gives an error the code the host maps to its answer: not
// found, exists, wrong kind of file, no space, no permission.
func fsError(err error) error {
	if err == nil {
		return nil
	}
	var ce *connect.Error
	if errors.As(err, &ce) {
		return err
	}
	var errno unix.Errno
	if errors.As(err, &errno) {
		switch errno {
		case unix.ENOENT:
			return connect.NewError(connect.CodeNotFound, err)
		case unix.EEXIST:
			return connect.NewError(connect.CodeAlreadyExists, err)
		case unix.EISDIR, unix.ENOTDIR, unix.ENOTEMPTY, unix.EXDEV, unix.ELOOP, unix.EINVAL:
			return connect.NewError(connect.CodeFailedPrecondition, err)
		case unix.ENOSPC, unix.EDQUOT, unix.EFBIG:
			return connect.NewError(connect.CodeResourceExhausted, err)
		case unix.EACCES, unix.EPERM, unix.EROFS:
			return connect.NewError(connect.CodePermissionDenied, err)
		case unix.ENAMETOOLONG:
			return connect.NewError(connect.CodeInvalidArgument, err)
		}
	}
	return connect.NewError(connect.CodeInternal, err)
}

// fileMode turns chmod's bits into Go's, def when none are set.
func fileMode(m uint32, def fs.FileMode) fs.FileMode {
	if m&0o7777 == 0 {
		return def
	}
	mode := fs.FileMode(m & 0o777)
	if m&unix.S_ISUID != 0 {
		mode |= fs.ModeSetuid
	}
	if m&unix.S_ISGID != 0 {
		mode |= fs.ModeSetgid
	}
	if m&unix.S_ISVTX != 0 {
		mode |= fs.ModeSticky
	}
	return mode
}

func entryInfo(p string, fi fs.FileInfo) *agentpb.EntryInfo {
	e := &agentpb.EntryInfo{
		Name:          fi.Name(),
		Path:          p,
		Size:          fi.Size(),
		Mode:          uint32(fi.Mode().Perm()),
		MtimeUnixNano: fi.ModTime().UnixNano(),
	}
	if fi.Mode()&fs.ModeSetuid != 0 {
		e.Mode |= unix.S_ISUID
	}
	if fi.Mode()&fs.ModeSetgid != 0 {
		e.Mode |= unix.S_ISGID
	}
	if fi.Mode()&fs.ModeSticky != 0 {
		e.Mode |= unix.S_ISVTX
	}
	switch {
	case fi.Mode().IsRegular():
		e.Type = agentpb.FileType_FILE_TYPE_FILE
	case fi.IsDir():
		e.Type = agentpb.FileType_FILE_TYPE_DIRECTORY
	case fi.Mode()&fs.ModeSymlink != 0:
		e.Type = agentpb.FileType_FILE_TYPE_SYMLINK
		e.SymlinkTarget, _ = os.Readlink(p)
	default:
		e.Type = agentpb.FileType_FILE_TYPE_OTHER
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		e.Uid, e.Gid = st.Uid, st.Gid
	}
	return e
}

func lstat(p string) (*agentpb.EntryInfo, error) {
	fi, err := os.Lstat(p)
	if err != nil {
		return nil, fsError(err)
	}
	return entryInfo(p, fi), nil
}

func (v *filesystemService) Stat(_ context.Context, req *connect.Request[agentpb.StatRequest]) (*connect.Response[agentpb.StatResponse], error) {
	p, err := cleanPath(req.Msg.Path)
	if err != nil {
		return nil, err
	}
	e, err := lstat(p)
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(&agentpb.StatResponse{Entry: e}), nil
}

func (v *filesystemService) ListDir(_ context.Context, req *connect.Request[agentpb.ListDirRequest]) (*connect.Response[agentpb.ListDirResponse], error) {
	p, err := cleanPath(req.Msg.Path)
	if err != nil {
		return nil, err
	}
	des, err := os.ReadDir(p)
	if err != nil {
		return nil, fsError(err)
	}
	out := make([]*agentpb.EntryInfo, 0, len(des))
	for _, de := range des {
		fi, err := de.Info()
		if err != nil {
			continue // removed since the directory was read
		}
		out = append(out, entryInfo(filepath.Join(p, de.Name()), fi))
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return connect.NewResponse(&agentpb.ListDirResponse{Entries: out}), nil
}

func (v *filesystemService) MakeDir(_ context.Context, req *connect.Request[agentpb.MakeDirRequest]) (*connect.Response[agentpb.MakeDirResponse], error) {
	// A spare login shell may have read what this changes.
	v.s.spares.changed()
	defer v.s.spares.changed()
	p, err := cleanPath(req.Msg.Path)
	if err != nil {
		return nil, err
	}
	mode := fileMode(req.Msg.Mode, 0o755)
	if req.Msg.Parents {
		err = os.MkdirAll(p, mode)
		if err != nil {
			if fi, serr := os.Stat(p); serr == nil && !fi.IsDir() {
				err = &fs.PathError{Op: "mkdir", Path: p, Err: unix.ENOTDIR}
			}
		}
	} else {
		err = os.Mkdir(p, mode)
	}
	if err != nil {
		return nil, fsError(err)
	}
	e, err := lstat(p)
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(&agentpb.MakeDirResponse{Entry: e}), nil
}

func (v *filesystemService) Move(_ context.Context, req *connect.Request[agentpb.MoveRequest]) (*connect.Response[agentpb.MoveResponse], error) {
	// A spare login shell may have read what this changes.
	v.s.spares.changed()
	defer v.s.spares.changed()
	src, err := cleanPath(req.Msg.Source)
	if err != nil {
		return nil, err
	}
	dst, err := cleanPath(req.Msg.Destination)
	if err != nil {
		return nil, err
	}
	if err := os.Rename(src, dst); err != nil {
		return nil, fsError(err)
	}
	e, err := lstat(dst)
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(&agentpb.MoveResponse{Entry: e}), nil
}

func (v *filesystemService) Remove(_ context.Context, req *connect.Request[agentpb.RemoveRequest]) (*connect.Response[agentpb.RemoveResponse], error) {
	// A spare login shell may have read what this changes.
	v.s.spares.changed()
	defer v.s.spares.changed()
	p, err := cleanPath(req.Msg.Path)
	if err != nil {
		return nil, err
	}
	if p == "/" {
		return nil, connect.NewError(connect.CodeInvalidArgument, errors.New("refusing to remove /"))
	}
	fi, err := os.Lstat(p)
	if err != nil {
		return nil, fsError(err)
	}
	if fi.IsDir() && req.Msg.Recursive {
		err = os.RemoveAll(p)
	} else {
		err = os.Remove(p)
	}
	if err != nil {
		return nil, fsError(err)
	}
	return connect.NewResponse(&agentpb.RemoveResponse{}), nil
}

func (v *filesystemService) Read(ctx context.Context, req *connect.Request[agentpb.ReadRequest], stream *connect.ServerStream[agentpb.ReadResponse]) error {
	p, err := cleanPath(req.Msg.Path)
	if err != nil {
		return err
	}
	if req.Msg.Offset < 0 || req.Msg.Length < 0 {
		return connect.NewError(connect.CodeInvalidArgument, errors.New("offset and length must not be negative"))
	}
	f, err := os.Open(p)
	if err != nil {
		return fsError(err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return fsError(err)
	}
	if fi.IsDir() {
		return connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("%s is a directory", p))
	}
	if err := stream.Send(&agentpb.ReadResponse{Event: &agentpb.ReadResponse_Entry{Entry: entryInfo(p, fi)}}); err != nil {
		return err
	}
	var r io.Reader = io.NewSectionReader(f, req.Msg.Offset, 1<<62)
	if req.Msg.Length > 0 {
		r = io.LimitReader(r, req.Msg.Length)
	}
	buf := make([]byte, fileChunk)
	for {
		n, err := io.ReadFull(r, buf)
		if n > 0 {
			if err := stream.Send(&agentpb.ReadResponse{Event: &agentpb.ReadResponse_Data{Data: buf[:n]}}); err != nil {
				return err
			}
		}
		if err == io.EOF || err == io.ErrUnexpectedEOF {
			return nil
		}
		if err != nil {
			return fsError(err)
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
	}
}

func (v *filesystemService) Write(ctx context.Context, stream *connect.ClientStream[agentpb.WriteRequest]) (*connect.Response[agentpb.WriteResponse], error) {
	// A spare login shell may have read what this changes.
	v.s.spares.changed()
	defer v.s.spares.changed()
	if !stream.Receive() {
		if err := stream.Err(); err != nil {
			return nil, err
		}
		return nil, connect.NewError(connect.CodeInvalidArgument, errors.New("a write opens with its header"))
	}
	h := stream.Msg().GetHeader()
	if h == nil {
		return nil, connect.NewError(connect.CodeInvalidArgument, errors.New("a write opens with its header"))
	}
	p, err := cleanPath(h.Path)
	if err != nil {
		return nil, err
	}
	if p == "/" {
		return nil, connect.NewError(connect.CodeFailedPrecondition, errors.New("/ is a directory"))
	}
	if fi, err := os.Stat(p); err == nil && fi.IsDir() {
		return nil, connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("%s is a directory", p))
	}
	var uid, gid = -1, -1
	if h.Owner != "" {
		acc, err := lookupUser(h.Owner)
		if err != nil {
			return nil, connect.NewError(connect.CodeInvalidArgument, err)
		}
		uid, gid = int(acc.uid), int(acc.gid)
	}
	dir := filepath.Dir(p)
	if h.Parents {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return nil, fsError(err)
		}
	}
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(p)+".smolvm-*")
	if err != nil {
		return nil, fsError(err)
	}
	// Until the rename, a failure on any path removes what was written.
	committed := false
	defer func() {
		if !committed {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	var n int64
	for stream.Receive() {
		data := stream.Msg().GetData()
		if h.Size > 0 && n+int64(len(data)) > h.Size {
			return nil, connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("more than the %d bytes announced", h.Size))
		}
		if _, err := tmp.Write(data); err != nil {
			return nil, fsError(err)
		}
		n += int64(len(data))
	}
	if err := stream.Err(); err != nil {
		return nil, err // cut or cancelled: nothing lands
	}
	if h.Size > 0 && n != h.Size {
		return nil, connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("%d bytes arrived of the %d announced", n, h.Size))
	}
	mode := fileMode(h.Mode, 0o644)
	if uid >= 0 {
		if err := tmp.Chown(uid, gid); err != nil {
			return nil, fsError(err)
		}
	}
	// After chown, which clears setuid and setgid.
	if err := tmp.Chmod(mode); err != nil {
		return nil, fsError(err)
	}
	if err := tmp.Close(); err != nil {
		return nil, fsError(err)
	}
	if err := os.Rename(tmp.Name(), p); err != nil {
		return nil, fsError(err)
	}
	committed = true
	e, err := lstat(p)
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(&agentpb.WriteResponse{Entry: e}), nil
}

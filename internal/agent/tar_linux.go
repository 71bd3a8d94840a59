package agent

import (
	"archive/tar"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"connectrpc.com/connect"
	"golang.org/x/sys/unix"

	"github.com/smolvm/smolvm/internal/agent/agentpb"
	"github.com/smolvm/smolvm/internal/tarfs"
)

// chunkWriter cuts a byte stream into messages of at most fileChunk.
type chunkWriter struct {
	buf  []byte
	send func([]byte) error
}

func (w *chunkWriter) Write(p []byte) (int, error) {
	n := len(p)
	for len(p) > 0 {
		room := fileChunk - len(w.buf)
		take := min(room, len(p))
		w.buf = append(w.buf, p[:take]...)
		p = p[take:]
		if len(w.buf) == fileChunk {
			if err := w.flush(); err != nil {
				return 0, err
			}
		}
	}
	return n, nil
}

func (w *chunkWriter) flush() error {
	if len(w.buf) == 0 {
		return nil
	}
	err := w.send(w.buf)
	w.buf = w.buf[:0]
	return err
}

func (v *filesystemService) ReadTar(ctx context.Context, req *connect.Request[agentpb.ReadTarRequest], stream *connect.ServerStream[agentpb.ReadTarResponse]) error {
	root, err := cleanPath(req.Msg.Path)
	if err != nil {
		return err
	}
	st, err := os.Stat(root)
	if err != nil {
		return fsError(err)
	}
	if !st.IsDir() {
		return connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("%s is not a directory", root))
	}
	cw := &chunkWriter{buf: make([]byte, 0, fileChunk), send: func(b []byte) error {
		return stream.Send(&agentpb.ReadTarResponse{Data: b})
	}}
	err = tarfs.WriteDir(ctx, cw, root)
	if err == nil {
		err = cw.flush()
	}
	return fsError(err)
}

// streamReader reads the data messages of a client stream.
type streamReader struct {
	stream *connect.ClientStream[agentpb.WriteTarRequest]
	rest   []byte
}

func (r *streamReader) Read(p []byte) (int, error) {
	for len(r.rest) == 0 {
		if !r.stream.Receive() {
			if err := r.stream.Err(); err != nil {
				return 0, err
			}
			return 0, io.EOF
		}
		r.rest = r.stream.Msg().GetData()
	}
	n := copy(p, r.rest)
	r.rest = r.rest[n:]
	return n, nil
}

func (v *filesystemService) WriteTar(ctx context.Context, stream *connect.ClientStream[agentpb.WriteTarRequest]) (*connect.Response[agentpb.WriteTarResponse], error) {
	// A spare login shell may have read what this changes.
	v.s.spares.changed()
	defer v.s.spares.changed()
	if !stream.Receive() || stream.Msg().GetHeader() == nil {
		if err := stream.Err(); err != nil {
			return nil, err
		}
		return nil, connect.NewError(connect.CodeInvalidArgument, errors.New("a tar upload opens with its header"))
	}
	root, err := cleanPath(stream.Msg().GetHeader().Path)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(root, 0o755); err != nil {
		return nil, fsError(err)
	}
	tr := tar.NewReader(&streamReader{stream: stream})
	var n int64
	type dirTime struct {
		path string
		mt   time.Time
	}
	var dirs []dirTime
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			var ce *connect.Error
			if errors.As(err, &ce) {
				return nil, err
			}
			return nil, connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("read the tar: %w", err))
		}
		target, err := tarTarget(root, hdr.Name)
		if err != nil {
			return nil, err
		}
		if target == root {
			continue
		}
		if err := extract(tr, hdr, root, target); err != nil {
			return nil, fsError(fmt.Errorf("%s: %w", hdr.Name, err))
		}
		if hdr.Typeflag == tar.TypeDir {
			dirs = append(dirs, dirTime{target, hdr.ModTime})
		}
		n++
	}
	// Directories last: writing into one changes its time.
	for i := len(dirs) - 1; i >= 0; i-- {
		os.Chtimes(dirs[i].path, dirs[i].mt, dirs[i].mt)
	}
	return connect.NewResponse(&agentpb.WriteTarResponse{Entries: n}), nil
}

// tarTarget places a tar entry under root, refusing names that would land
// outside it or pass through a symlink.
func tarTarget(root, name string) (string, error) {
	clean := filepath.Clean("/" + name)
	for _, part := range strings.Split(name, "/") {
		if part == ".." {
			return "", connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("tar entry %q leaves the directory", name))
		}
	}
	if filepath.IsAbs(name) {
		return "", connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("tar entry %q is absolute", name))
	}
	target := filepath.Join(root, clean)
	// Every directory between root and the entry must be a real one.
	for dir := filepath.Dir(target); dir != root && strings.HasPrefix(dir, root+"/"); dir = filepath.Dir(dir) {
		if fi, err := os.Lstat(dir); err == nil && fi.Mode()&fs.ModeSymlink != 0 {
			return "", connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("tar entry %q goes through the symlink %s", name, dir))
		}
	}
	return target, nil
}

func extract(tr *tar.Reader, hdr *tar.Header, root, target string) error {
	if err := os.MkdirAll(filepath.Dir(target), 0o755); err != nil {
		return err
	}
	mode := fileMode(uint32(hdr.Mode), 0o644)
	switch hdr.Typeflag {
	case tar.TypeDir:
		if err := os.Mkdir(target, mode); err != nil && !errors.Is(err, fs.ErrExist) {
			return err
		}
	case tar.TypeReg:
		os.Remove(target) // a symlink in the way is replaced, not followed
		f, err := os.OpenFile(target, os.O_WRONLY|os.O_CREATE|os.O_TRUNC|syscall.O_NOFOLLOW, 0o600)
		if err != nil {
			return err
		}
		if _, err := io.Copy(f, tr); err != nil {
			f.Close()
			os.Remove(target)
			return err
		}
		if err := f.Close(); err != nil {
			return err
		}
	case tar.TypeSymlink:
		os.Remove(target)
		return os.Symlink(hdr.Linkname, target)
	case tar.TypeLink:
		// A hard link must point inside the tree too.
		src, err := tarTarget(root, hdr.Linkname)
		if err != nil {
			return err
		}
		os.Remove(target)
		return os.Link(src, target)
	default:
		return nil // devices, fifos: skipped
	}
	if err := os.Lchown(target, hdr.Uid, hdr.Gid); err != nil && !errors.Is(err, unix.EPERM) {
		return err
	}
	if hdr.Typeflag != tar.TypeSymlink {
		// After chown, which clears setuid and setgid.
		if err := os.Chmod(target, mode); err != nil {
			return err
		}
		return os.Chtimes(target, hdr.ModTime, hdr.ModTime)
	}
	return nil
}

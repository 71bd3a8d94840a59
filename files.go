package smolvm

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"strings"

	"github.com/smolvm/smolvm/internal/sandbox"
	"github.com/smolvm/smolvm/internal/tarfs"
)

// FileInfo describes a path in a sandbox.
type FileInfo = sandbox.FileInfo

// Stat describes a guest path without following a final symlink.
func (s *Sandbox) Stat(ctx context.Context, name string) (FileInfo, error) {
	return s.m.StatPath(ctx, s.id, name)
}

// ReadDir lists a guest directory, sorted by name.
func (s *Sandbox) ReadDir(ctx context.Context, name string) ([]FileInfo, error) {
	return s.m.ListDir(ctx, s.id, name)
}

// Remove deletes a guest path; a directory with its contents when
// recursive.
func (s *Sandbox) Remove(ctx context.Context, name string, recursive bool) error {
	return s.m.RemovePath(ctx, s.id, name, recursive)
}

// ReadFile reads a whole guest file.
func (s *Sandbox) ReadFile(ctx context.Context, name string) ([]byte, error) {
	f, err := s.Open(ctx, name)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return io.ReadAll(f)
}

// WriteFile writes data to a guest file (parents made) with mode (0 means
// 0644). The file appears whole or not at all.
func (s *Sandbox) WriteFile(ctx context.Context, name string, data []byte, mode fs.FileMode) error {
	_, err := s.m.WriteFile(ctx, s.id, name, bytes.NewReader(data), sandbox.WriteOptions{Mode: chmodBits(mode), Size: int64(len(data))})
	return err
}

// Open streams a guest file; close it when done.
func (s *Sandbox) Open(ctx context.Context, name string) (io.ReadCloser, error) {
	f, err := s.m.OpenFile(ctx, s.id, name, 0, 0)
	if err != nil {
		return nil, err
	}
	return f, nil
}

// Create streams what is written into a guest file with mode (0 means
// 0644). The file appears under its name only when Close succeeds; until
// then (and if anything fails) the guest keeps what was there.
func (s *Sandbox) Create(ctx context.Context, name string, mode fs.FileMode) (io.WriteCloser, error) {
	if _, err := sandbox.CheckPath("path", name); err != nil {
		return nil, err
	}
	pr, pw := io.Pipe()
	w := &fileWriter{pw: pw, done: make(chan error, 1)}
	go func() {
		_, err := s.m.WriteFile(ctx, s.id, name, pr, sandbox.WriteOptions{Mode: chmodBits(mode)})
		pr.CloseWithError(errors.Join(err, errors.New("the upload ended")))
		w.done <- err
	}()
	return w, nil
}

type fileWriter struct {
	pw   *io.PipeWriter
	done chan error
}

func (w *fileWriter) Write(p []byte) (int, error) { return w.pw.Write(p) }

func (w *fileWriter) Close() error {
	w.pw.Close()
	return <-w.done
}

func chmodBits(m fs.FileMode) uint32 {
	b := uint32(m.Perm())
	if m&fs.ModeSetuid != 0 {
		b |= 0o4000
	}
	if m&fs.ModeSetgid != 0 {
		b |= 0o2000
	}
	if m&fs.ModeSticky != 0 {
		b |= 0o1000
	}
	return b
}

// CopyTo copies a host file or directory tree to guestPath, which it
// becomes (parents made); a directory goes as a tar and keeps modes and
// symlinks.
func (s *Sandbox) CopyTo(ctx context.Context, hostPath, guestPath string) error {
	fi, err := os.Stat(hostPath)
	if err != nil {
		return err
	}
	if !fi.IsDir() {
		f, err := os.Open(hostPath)
		if err != nil {
			return err
		}
		defer f.Close()
		_, err = s.m.WriteFile(ctx, s.id, guestPath, f, sandbox.WriteOptions{Mode: chmodBits(fi.Mode()), Size: fi.Size()})
		return err
	}
	pr, pw := io.Pipe()
	go func() { pw.CloseWithError(WriteTar(pw, hostPath)) }()
	_, err = s.m.WriteTar(ctx, s.id, guestPath, pr)
	pr.CloseWithError(errors.New("the upload ended"))
	return err
}

// CopyFrom copies a guest file or directory tree to hostPath, which it
// becomes.
func (s *Sandbox) CopyFrom(ctx context.Context, guestPath, hostPath string) error {
	fi, err := s.Stat(ctx, guestPath)
	if err != nil {
		return err
	}
	if fi.Type != "directory" {
		f, err := s.m.OpenFile(ctx, s.id, guestPath, 0, 0)
		if err != nil {
			return err
		}
		defer f.Close()
		return writeHostFile(hostPath, f, fs.FileMode(f.Info.Mode&0o777))
	}
	tr, err := s.m.ReadTar(ctx, s.id, guestPath)
	if err != nil {
		return err
	}
	defer tr.Close()
	return ReadTar(tr, hostPath)
}

// writeHostFile writes r to name through a temporary file renamed into
// place.
func writeHostFile(name string, r io.Reader, mode fs.FileMode) error {
	tmp, err := os.CreateTemp(filepath.Dir(name), "."+filepath.Base(name)+".smolvm-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if _, err := io.Copy(tmp, r); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Chmod(mode); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), name)
}

// WriteTar writes a tar of dir's contents (names relative to it) to w, as
// the guest's directory downloads are.
func WriteTar(w io.Writer, dir string) error {
	return tarfs.WriteDir(context.Background(), w, dir)
}

// ReadTar unpacks a tar into dir (made when missing) through an os.Root,
// so no entry of a tar made in a guest can write outside dir, whatever
// names or symlinks it holds. Devices and fifos are skipped; owners are
// not set.
func ReadTar(r io.Reader, dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	root, err := os.OpenRoot(dir)
	if err != nil {
		return err
	}
	defer root.Close()
	tr := tar.NewReader(r)
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return fmt.Errorf("read the tar: %w", err)
		}
		name := path.Clean(strings.TrimPrefix(hdr.Name, "/"))
		if name == "." {
			continue
		}
		mode := fs.FileMode(hdr.Mode).Perm()
		switch hdr.Typeflag {
		case tar.TypeDir:
			if err := root.MkdirAll(name, 0o755); err != nil {
				return fmt.Errorf("%s: %w", hdr.Name, err)
			}
			if err := root.Chmod(name, mode); err != nil {
				return fmt.Errorf("%s: %w", hdr.Name, err)
			}
		case tar.TypeReg:
			if d := path.Dir(name); d != "." {
				if err := root.MkdirAll(d, 0o755); err != nil {
					return fmt.Errorf("%s: %w", hdr.Name, err)
				}
			}
			root.Remove(name) // a symlink in the way is replaced, not followed
			f, err := root.OpenFile(name, os.O_WRONLY|os.O_CREATE|os.O_EXCL, mode)
			if err != nil {
				return fmt.Errorf("%s: %w", hdr.Name, err)
			}
			_, err = io.Copy(f, tr)
			if cerr := f.Close(); err == nil {
				err = cerr
			}
			if err != nil {
				return fmt.Errorf("%s: %w", hdr.Name, err)
			}
			if err := root.Chmod(name, mode); err != nil {
				return fmt.Errorf("%s: %w", hdr.Name, err)
			}
		case tar.TypeSymlink:
			if d := path.Dir(name); d != "." {
				if err := root.MkdirAll(d, 0o755); err != nil {
					return fmt.Errorf("%s: %w", hdr.Name, err)
				}
			}
			root.Remove(name)
			if err := root.Symlink(hdr.Linkname, name); err != nil {
				return fmt.Errorf("%s: %w", hdr.Name, err)
			}
		}
	}
}

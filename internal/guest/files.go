package guest

import (
	"context"
	"errors"
	"fmt"
	"io"

	"connectrpc.com/connect"

	"github.com/smolvm/smolvm/internal/agent/agentpb"
)

// writeChunk is the most one Write message carries.
const writeChunk = 256 << 10

// Stat describes a path without following a final symlink.
func (c *Client) Stat(ctx context.Context, path string) (*agentpb.EntryInfo, error) {
	resp, err := c.files.Stat(ctx, connect.NewRequest(&agentpb.StatRequest{Path: path}))
	if err != nil {
		return nil, c.callErr(ctx, err)
	}
	return resp.Msg.Entry, nil
}

// ListDir lists a directory, sorted by name.
func (c *Client) ListDir(ctx context.Context, path string) ([]*agentpb.EntryInfo, error) {
	resp, err := c.files.ListDir(ctx, connect.NewRequest(&agentpb.ListDirRequest{Path: path}))
	if err != nil {
		return nil, c.callErr(ctx, err)
	}
	return resp.Msg.Entries, nil
}

// MakeDir creates a directory (and its parents, when asked).
func (c *Client) MakeDir(ctx context.Context, path string, parents bool, mode uint32) (*agentpb.EntryInfo, error) {
	resp, err := c.files.MakeDir(ctx, connect.NewRequest(&agentpb.MakeDirRequest{Path: path, Parents: parents, Mode: mode}))
	if err != nil {
		return nil, c.callErr(ctx, err)
	}
	return resp.Msg.Entry, nil
}

// Move renames a path.
func (c *Client) Move(ctx context.Context, src, dst string) (*agentpb.EntryInfo, error) {
	resp, err := c.files.Move(ctx, connect.NewRequest(&agentpb.MoveRequest{Source: src, Destination: dst}))
	if err != nil {
		return nil, c.callErr(ctx, err)
	}
	return resp.Msg.Entry, nil
}

// Remove deletes a path; a directory with its contents when recursive.
func (c *Client) Remove(ctx context.Context, path string, recursive bool) error {
	_, err := c.files.Remove(ctx, connect.NewRequest(&agentpb.RemoveRequest{Path: path, Recursive: recursive}))
	return c.callErr(ctx, err)
}

// FileReader is a file being read from the guest.
type FileReader struct {
	c      *Client
	ctx    context.Context
	cancel context.CancelFunc
	stream *connect.ServerStreamForClient[agentpb.ReadResponse]
	// Entry describes the file.
	Entry *agentpb.EntryInfo
	rest  []byte
}

// OpenFile starts reading a regular file from offset; length 0 means to
// its end. The caller reads the bytes from the FileReader and closes it.
func (c *Client) OpenFile(ctx context.Context, path string, offset, length int64) (*FileReader, error) {
	sctx, cancel := context.WithCancel(ctx)
	stream, err := c.files.Read(sctx, connect.NewRequest(&agentpb.ReadRequest{Path: path, Offset: offset, Length: length}))
	if err != nil {
		cancel()
		return nil, c.callErr(ctx, err)
	}
	r := &FileReader{c: c, ctx: ctx, cancel: cancel, stream: stream}
	if !stream.Receive() {
		err := stream.Err()
		r.Close()
		if err == nil {
			err = errors.New("the agent answered a read with nothing")
		}
		return nil, c.callErr(ctx, err)
	}
	r.Entry = stream.Msg().GetEntry()
	if r.Entry == nil {
		r.Close()
		return nil, fmt.Errorf("the agent's read did not open with the file's entry")
	}
	return r, nil
}

func (r *FileReader) Read(p []byte) (int, error) {
	return readChunks(p, &r.rest, r.c, r.ctx, r.stream, (*agentpb.ReadResponse).GetData)
}

// readChunks reads a server stream's data messages as one byte stream,
// rest holding what the last message left over.
func readChunks[T any](p []byte, rest *[]byte, c *Client, ctx context.Context, stream *connect.ServerStreamForClient[T], data func(*T) []byte) (int, error) {
	for len(*rest) == 0 {
		if !stream.Receive() {
			if err := stream.Err(); err != nil {
				return 0, c.callErr(ctx, err)
			}
			return 0, io.EOF
		}
		*rest = data(stream.Msg())
	}
	n := copy(p, *rest)
	*rest = (*rest)[n:]
	return n, nil
}

// Close stops the read.
func (r *FileReader) Close() error {
	r.cancel()
	return r.stream.Close()
}

// WriteFile streams r into a file in the guest. The file appears under
// its name only once every byte arrived; on any failure (or ctx ending)
// the guest keeps what was there before.
func (c *Client) WriteFile(ctx context.Context, h *agentpb.WriteHeader, r io.Reader) (*agentpb.EntryInfo, error) {
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream := c.files.Write(sctx)
	if err := stream.Send(&agentpb.WriteRequest{Event: &agentpb.WriteRequest_Header{Header: h}}); err != nil {
		return nil, c.writeErr(ctx, stream, err)
	}
	err := sendChunks(r, func(b []byte) error {
		if err := stream.Send(&agentpb.WriteRequest{Event: &agentpb.WriteRequest_Data{Data: b}}); err != nil {
			return &sendError{c.writeErr(ctx, stream, err)}
		}
		return nil
	})
	if err != nil {
		return nil, abandon(cancel, stream.CloseAndReceive, "file", err)
	}
	resp, err := stream.CloseAndReceive()
	if err != nil {
		return nil, c.callErr(ctx, err)
	}
	return resp.Msg.Entry, nil
}

// sendError is a send that failed, already explained by the agent's
// answer.
type sendError struct{ err error }

func (e *sendError) Error() string { return e.err.Error() }
func (e *sendError) Unwrap() error { return e.err }

// sendChunks sends what r yields in messages of at most writeChunk.
func sendChunks(r io.Reader, send func([]byte) error) error {
	buf := make([]byte, writeChunk)
	for {
		n, err := io.ReadFull(r, buf)
		if n > 0 {
			if serr := send(buf[:n]); serr != nil {
				return serr
			}
		}
		if err == io.EOF || err == io.ErrUnexpectedEOF {
			return nil
		}
		if err != nil {
			return err
		}
	}
}

// abandon ends an upload that failed. A failed send already carries the
// agent's answer; a failed read of the source cancels before closing,
// which makes the agent drop what it has.
func abandon[T any](cancel context.CancelFunc, closeAndReceive func() (*connect.Response[T], error), what string, err error) error {
	var se *sendError
	if errors.As(err, &se) {
		return se.err
	}
	cancel()
	closeAndReceive()
	return fmt.Errorf("read the %s to send: %w", what, err)
}

// writeErr finds out why a send failed: the agent's answer is on the
// response side.
func (c *Client) writeErr(ctx context.Context, stream *connect.ClientStreamForClient[agentpb.WriteRequest, agentpb.WriteResponse], err error) error {
	if errors.Is(err, io.EOF) {
		if _, rerr := stream.CloseAndReceive(); rerr != nil {
			return c.callErr(ctx, rerr)
		}
	}
	return c.callErr(ctx, err)
}

// TarReader is a tar of a guest directory being read.
type TarReader struct {
	c      *Client
	ctx    context.Context
	cancel context.CancelFunc
	stream *connect.ServerStreamForClient[agentpb.ReadTarResponse]
	rest   []byte
	first  bool
}

// OpenTar starts reading a tar of a directory's contents, names relative
// to it. A missing directory, or a path that is not one, is refused here
// rather than on the first read.
func (c *Client) OpenTar(ctx context.Context, path string) (*TarReader, error) {
	sctx, cancel := context.WithCancel(ctx)
	stream, err := c.files.ReadTar(sctx, connect.NewRequest(&agentpb.ReadTarRequest{Path: path}))
	if err != nil {
		cancel()
		return nil, c.callErr(ctx, err)
	}
	r := &TarReader{c: c, ctx: ctx, cancel: cancel, stream: stream}
	// The agent checks the path before it sends anything; the first
	// message (or the refusal) settles it.
	if !stream.Receive() {
		err := stream.Err()
		r.Close()
		if err == nil {
			return nil, errors.New("the agent answered a tar read with nothing")
		}
		return nil, c.callErr(ctx, err)
	}
	r.rest = stream.Msg().GetData()
	return r, nil
}

func (r *TarReader) Read(p []byte) (int, error) {
	return readChunks(p, &r.rest, r.c, r.ctx, r.stream, (*agentpb.ReadTarResponse).GetData)
}

// Close stops the read.
func (r *TarReader) Close() error {
	r.cancel()
	return r.stream.Close()
}

// WriteTar unpacks the tar read from r into a guest directory, made when
// missing, and returns how many entries it held.
func (c *Client) WriteTar(ctx context.Context, path string, r io.Reader) (int64, error) {
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream := c.files.WriteTar(sctx)
	send := func(m *agentpb.WriteTarRequest) error {
		if err := stream.Send(m); err != nil {
			if errors.Is(err, io.EOF) {
				if _, rerr := stream.CloseAndReceive(); rerr != nil {
					return c.callErr(ctx, rerr)
				}
			}
			return c.callErr(ctx, err)
		}
		return nil
	}
	if err := send(&agentpb.WriteTarRequest{Event: &agentpb.WriteTarRequest_Header{Header: &agentpb.WriteTarHeader{Path: path}}}); err != nil {
		return 0, err
	}
	err := sendChunks(r, func(b []byte) error {
		if err := send(&agentpb.WriteTarRequest{Event: &agentpb.WriteTarRequest_Data{Data: b}}); err != nil {
			return &sendError{err}
		}
		return nil
	})
	if err != nil {
		return 0, abandon(cancel, stream.CloseAndReceive, "tar", err)
	}
	resp, err := stream.CloseAndReceive()
	if err != nil {
		return 0, c.callErr(ctx, err)
	}
	return resp.Msg.Entries, nil
}

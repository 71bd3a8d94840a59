package image

import (
	"bytes"
	"os"
)

// sparseWriter writes a stream to a file, seeking over whole zero blocks
// instead of writing them, so they stay holes. Close sets the final size.
type sparseWriter struct {
	f    *os.File
	off  int64
	zero [4096]byte
}

func newSparseWriter(f *os.File) *sparseWriter { return &sparseWriter{f: f} }

func (w *sparseWriter) Write(p []byte) (int, error) {
	n := len(p)
	for len(p) > 0 {
		blk := len(w.zero)
		if len(p) < blk {
			blk = len(p)
		}
		if bytes.Equal(p[:blk], w.zero[:blk]) {
			w.off += int64(blk)
			p = p[blk:]
			continue
		}
		// Write the run of data blocks starting here in one call.
		end := blk
		for end < len(p) {
			next := min(len(p)-end, len(w.zero))
			if bytes.Equal(p[end:end+next], w.zero[:next]) {
				break
			}
			end += next
		}
		if _, err := w.f.WriteAt(p[:end], w.off); err != nil {
			return n - len(p), err
		}
		w.off += int64(end)
		p = p[end:]
	}
	return n, nil
}

// Close extends the file over a trailing hole; it does not close the file.
func (w *sparseWriter) Close() error { return w.f.Truncate(w.off) }

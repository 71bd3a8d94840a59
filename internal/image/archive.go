package image

import (
	"bufio"
	"bytes"
	"compress/bzip2"
	"compress/gzip"
	"fmt"
	"io"
	"path"
	"strings"

	"github.com/klauspost/compress/zstd"
	"github.com/ulikunitz/xz"

	"github.com/smolvm/smolvm/internal/qcow2"
)

// Magic numbers of the formats a file or S3 source may hold.
const (
	magicGzip  = "\x1f\x8b"
	magicZstd  = "\x28\xb5\x2f\xfd"
	magicXz    = "\xfd7zXZ\x00"
	magicBzip2 = "BZh"
	magicQcow2 = qcow2.Magic
)

// decompress returns the tar stream inside r, recognising gzip, zstd, xz and
// bzip2 by their magic numbers rather than by media type or file name, which
// are often wrong. Anything else is taken as an uncompressed tar.
func decompress(r io.Reader) (io.ReadCloser, error) {
	br := bufio.NewReaderSize(r, 64<<10)
	head, err := br.Peek(6)
	if err != nil && err != io.EOF {
		return nil, corrupt("read archive: %w", err)
	}
	switch {
	case strings.HasPrefix(string(head), magicGzip):
		zr, err := gzip.NewReader(br)
		if err != nil {
			return nil, corrupt("gzip: %w", err)
		}
		return zr, nil
	case strings.HasPrefix(string(head), magicZstd):
		zr, err := zstd.NewReader(br, zstd.WithDecoderConcurrency(1))
		if err != nil {
			return nil, corrupt("zstd: %w", err)
		}
		return zr.IOReadCloser(), nil
	case strings.HasPrefix(string(head), magicXz):
		xr, err := xz.NewReader(br)
		if err != nil {
			return nil, corrupt("xz: %w", err)
		}
		return io.NopCloser(xr), nil
	case strings.HasPrefix(string(head), magicBzip2):
		return io.NopCloser(bzip2.NewReader(br)), nil
	}
	return io.NopCloser(br), nil
}

// isCompressed reports whether head starts with a compression format's magic.
func isCompressed(head []byte) bool {
	for _, m := range []string{magicGzip, magicZstd, magicXz, magicBzip2} {
		if strings.HasPrefix(string(head), m) {
			return true
		}
	}
	return false
}

// isTar reports whether the 512-byte block b looks like a tar header: the
// ustar magic, or (old v7 archives) a valid header checksum.
func isTar(b []byte) bool {
	if len(b) < 512 {
		return false
	}
	if bytes.Equal(b[257:262], []byte("ustar")) {
		return true
	}
	var sum int64
	for i, c := range b[:512] {
		if i >= 148 && i < 156 {
			c = ' '
		}
		sum += int64(c)
	}
	field := strings.TrimRight(strings.TrimSpace(string(b[148:156])), "\x00 ")
	var want int64
	if _, err := fmt.Sscanf(field, "%o", &want); err != nil {
		return false
	}
	return sum == want && sum != 8*' '
}

// cleanEntryName turns an archive member name into a path relative to the
// root ("" for the root itself). Leading slashes are dropped; a name that
// climbs out of the root with ".." is refused.
func cleanEntryName(name string) (string, error) {
	p := path.Clean(name)
	if p == ".." || strings.HasPrefix(p, "../") {
		return "", corrupt("archive entry %q points outside the root", name)
	}
	p = strings.TrimLeft(p, "/")
	if p == "." {
		return "", nil
	}
	return p, nil
}

package kernel

import (
	"bytes"
	"compress/gzip"
	"debug/elf"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"sort"

	"github.com/klauspost/compress/zstd"
	"github.com/xi2/xz"
)

// xenElfnotePhys32Entry is XEN_ELFNOTE_PHYS32_ENTRY: the 32-bit PVH entry
// point that QEMU's -kernel looks for in an ELF kernel.
const xenElfnotePhys32Entry = 18

var elfMagic = []byte{0x7f, 'E', 'L', 'F'}

// A compression format the kernel build uses for its payload, found by its
// magic bytes.
type payloadFormat struct {
	name  string
	magic []byte
	open  func(r io.Reader) (io.Reader, func(), error)
	// endOK reports whether an error after the first stream is just the
	// data that follows it (the kernel appends the decompressed size).
	endOK func(error) bool
}

func payloadFormats() []payloadFormat {
	return []payloadFormat{
		{
			name:  "xz",
			magic: []byte{0xfd, '7', 'z', 'X', 'Z', 0x00},
			open: func(r io.Reader) (io.Reader, func(), error) {
				// xi2/xz implements the x86 BCJ filter that Debian's
				// vmlinuz uses; ulikunitz/xz does not.
				z, err := xz.NewReader(r, 0)
				if err != nil {
					return nil, nil, err
				}
				z.Multistream(false)
				return z, func() {}, nil
			},
		},
		{
			name:  "zstd",
			magic: []byte{0x28, 0xb5, 0x2f, 0xfd},
			open: func(r io.Reader) (io.Reader, func(), error) {
				z, err := zstd.NewReader(r, zstd.WithDecoderConcurrency(1))
				if err != nil {
					return nil, nil, err
				}
				return z, z.Close, nil
			},
			// The decoder reads on into the next "frame", which is the
			// size trailer.
			endOK: func(err error) bool { return errors.Is(err, zstd.ErrMagicMismatch) },
		},
		{
			name:  "gzip",
			magic: []byte{0x1f, 0x8b, 0x08},
			open: func(r io.Reader) (io.Reader, func(), error) {
				z, err := gzip.NewReader(r)
				if err != nil {
					return nil, nil, err
				}
				z.Multistream(false)
				return z, func() { _ = z.Close() }, nil
			},
		},
	}
}

// ExtractVmlinux returns the uncompressed ELF kernel inside a compressed
// kernel image (bzImage/vmlinuz). The payload is found by its compression
// magic; the first candidate that decompresses to an ELF file wins. An input
// that is already ELF is returned as is. The result must carry a PVH entry
// note, since that is what lets QEMU boot it directly with -kernel.
func ExtractVmlinux(vmlinuz []byte) ([]byte, error) {
	if bytes.HasPrefix(vmlinuz, elfMagic) {
		if err := checkPVH(vmlinuz); err != nil {
			return nil, err
		}
		return vmlinuz, nil
	}

	type candidate struct {
		off int
		f   payloadFormat
	}
	var cands []candidate
	for _, f := range payloadFormats() {
		for off := 0; ; {
			i := bytes.Index(vmlinuz[off:], f.magic)
			if i < 0 {
				break
			}
			cands = append(cands, candidate{off + i, f})
			off += i + 1
		}
	}
	sort.SliceStable(cands, func(i, j int) bool { return cands[i].off < cands[j].off })

	var lastErr error
	for _, c := range cands {
		out, err := decompressELF(vmlinuz[c.off:], c.f)
		if err != nil {
			lastErr = fmt.Errorf("%s payload at offset %d: %w", c.f.name, c.off, err)
			continue
		}
		if err := checkPVH(out); err != nil {
			return nil, err
		}
		return out, nil
	}
	if lastErr != nil {
		return nil, fmt.Errorf("extract vmlinux: no compressed payload decompresses to an ELF kernel (last tried: %w)", lastErr)
	}
	return nil, errors.New("extract vmlinux: not an ELF kernel and no xz, zstd or gzip payload found")
}

// errNotELF stops a decompression early: most magic matches are accidental,
// and decoding megabytes of them would be wasted.
var errNotELF = errors.New("does not decompress to an ELF file")

func decompressELF(data []byte, f payloadFormat) (out []byte, err error) {
	r, closeFn, err := f.open(bytes.NewReader(data))
	if err != nil {
		return nil, err
	}
	defer closeFn()
	head := make([]byte, len(elfMagic))
	if _, err := io.ReadFull(r, head); err != nil {
		return nil, err
	}
	if !bytes.Equal(head, elfMagic) {
		return nil, errNotELF
	}
	var buf bytes.Buffer
	buf.Grow(4 * len(data))
	buf.Write(head)
	_, err = io.Copy(&buf, r)
	if err != nil && !(f.endOK != nil && f.endOK(err)) {
		return nil, err
	}
	out = buf.Bytes()
	if err := elfComplete(out); err != nil {
		return nil, err
	}
	return out, nil
}

// elfComplete checks that every segment lies inside the file, so a
// truncated decompression is not mistaken for a kernel.
func elfComplete(b []byte) error {
	f, err := elf.NewFile(bytes.NewReader(b))
	if err != nil {
		return fmt.Errorf("decompressed data is not a valid ELF file: %w", err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Off > uint64(len(b)) || p.Filesz > uint64(len(b))-p.Off {
			return fmt.Errorf("decompressed ELF is truncated (segment at %#x+%#x beyond %d bytes)", p.Off, p.Filesz, len(b))
		}
	}
	return nil
}

// checkPVH looks for XEN_ELFNOTE_PHYS32_ENTRY in the PT_NOTE segments, where
// QEMU's ELF loader looks for it.
func checkPVH(b []byte) error {
	f, err := elf.NewFile(bytes.NewReader(b))
	if err != nil {
		return fmt.Errorf("vmlinux is not a valid ELF file: %w", err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type != elf.PT_NOTE {
			continue
		}
		data, err := io.ReadAll(p.Open())
		if err != nil {
			return fmt.Errorf("read vmlinux note segment: %w", err)
		}
		if hasNote(data, f.ByteOrder, "Xen", xenElfnotePhys32Entry) {
			return nil
		}
	}
	return errors.New("vmlinux has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY): QEMU cannot boot it directly with -kernel; use a kernel built with CONFIG_PVH=y")
}

// hasNote walks ELF notes (namesz, descsz, type, name, desc; 4-byte aligned).
func hasNote(data []byte, bo binary.ByteOrder, name string, typ uint32) bool {
	align := func(n uint64) uint64 { return (n + 3) &^ 3 }
	for len(data) >= 12 {
		namesz := uint64(bo.Uint32(data[0:4]))
		descsz := uint64(bo.Uint32(data[4:8]))
		t := bo.Uint32(data[8:12])
		rest := uint64(len(data) - 12)
		if namesz > rest || descsz > rest-namesz {
			return false
		}
		n := data[12 : 12+namesz]
		if t == typ && string(bytes.TrimRight(n, "\x00")) == name {
			return true
		}
		next := 12 + align(namesz) + align(descsz)
		if next >= uint64(len(data)) {
			return false
		}
		data = data[next:]
	}
	return false
}

package kernel

import (
	"bytes"
	"compress/gzip"
	"encoding/binary"
	"math/rand"
	"strings"
	"testing"

	"github.com/klauspost/compress/zstd"
	"github.com/ulikunitz/xz"
)

// tinyELF builds a minimal x86-64 ELF whose only segment is a PT_NOTE with
// one note of the given type from "Xen", followed by filler.
func tinyELF(noteType uint32) []byte {
	le := binary.LittleEndian
	note := make([]byte, 20)
	le.PutUint32(note[0:], 4) // namesz
	le.PutUint32(note[4:], 4) // descsz
	le.PutUint32(note[8:], noteType)
	copy(note[12:], "Xen\x00")
	le.PutUint32(note[16:], 0x1000000) // entry address

	const ehsize, phsize = 64, 56
	b := make([]byte, ehsize+phsize)
	copy(b, []byte{0x7f, 'E', 'L', 'F', 2, 1, 1})
	le.PutUint16(b[16:], 2)  // ET_EXEC
	le.PutUint16(b[18:], 62) // EM_X86_64
	le.PutUint32(b[20:], 1)
	le.PutUint64(b[32:], ehsize) // e_phoff
	le.PutUint16(b[52:], ehsize)
	le.PutUint16(b[54:], phsize)
	le.PutUint16(b[56:], 1) // e_phnum
	ph := b[ehsize:]
	le.PutUint32(ph[0:], 4) // PT_NOTE
	le.PutUint32(ph[4:], 4)
	le.PutUint64(ph[8:], uint64(len(b))) // p_offset
	le.PutUint64(ph[32:], uint64(len(note)))
	le.PutUint64(ph[40:], uint64(len(note)))
	le.PutUint64(ph[48:], 4)
	b = append(b, note...)
	return append(b, bytes.Repeat([]byte("kernel text "), 5000)...)
}

func gzipBytes(t testing.TB, b []byte) []byte {
	var buf bytes.Buffer
	w := gzip.NewWriter(&buf)
	if _, err := w.Write(b); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func zstdBytes(t testing.TB, b []byte) []byte {
	w, err := zstd.NewWriter(nil)
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	return w.EncodeAll(b, nil)
}

func xzBytes(t testing.TB, b []byte) []byte {
	var buf bytes.Buffer
	w, err := xz.WriterConfig{CheckSum: xz.CRC32}.NewWriter(&buf)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.Write(b); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// bzImageLike wraps a compressed payload the way a kernel image does:
// setup code before it (here including a stray gzip magic), the
// decompressed size after it.
func bzImageLike(payload []byte) []byte {
	b := append([]byte("MZ setup code \x1f\x8b\x08 not really gzip "), bytes.Repeat([]byte{0x90}, 4096)...)
	b = append(b, payload...)
	return append(b, 0x11, 0x22, 0x33, 0x44)
}

func TestExtractVmlinuxFormats(t *testing.T) {
	elfPVH := tinyELF(xenElfnotePhys32Entry)
	if got, err := ExtractVmlinux(elfPVH); err != nil || !bytes.Equal(got, elfPVH) {
		t.Errorf("plain ELF: %v", err)
	}
	for name, compress := range map[string]func(testing.TB, []byte) []byte{
		"xz": xzBytes, "zstd": zstdBytes, "gzip": gzipBytes,
	} {
		got, err := ExtractVmlinux(bzImageLike(compress(t, elfPVH)))
		if err != nil {
			t.Errorf("%s: %v", name, err)
			continue
		}
		if !bytes.Equal(got, elfPVH) {
			t.Errorf("%s: extracted %d bytes, want the %d-byte ELF", name, len(got), len(elfPVH))
		}
	}
}

func TestExtractVmlinuxNoPVH(t *testing.T) {
	noPVH := tinyELF(17)
	for _, in := range [][]byte{noPVH, bzImageLike(zstdBytes(t, noPVH))} {
		_, err := ExtractVmlinux(in)
		if err == nil || !strings.Contains(err.Error(), "PVH") {
			t.Errorf("err = %v, want one about the missing PVH note", err)
		}
	}
}

func TestExtractVmlinuxGarbage(t *testing.T) {
	rnd := make([]byte, 1<<20)
	rand.New(rand.NewSource(1)).Read(rnd)
	elfPVH := tinyELF(xenElfnotePhys32Entry)
	xzPayload := xzBytes(t, elfPVH)
	zstdPayload := zstdBytes(t, elfPVH)
	cases := map[string][]byte{
		"nil":             nil,
		"random":          rnd,
		"elf magic only":  []byte("\x7fELF"),
		"xz magic only":   {0xfd, '7', 'z', 'X', 'Z', 0x00},
		"zstd then junk":  append([]byte{0x28, 0xb5, 0x2f, 0xfd}, rnd[:4096]...),
		"gzip then junk":  append([]byte{0x1f, 0x8b, 0x08, 0, 0, 0, 0, 0, 0, 3}, rnd[:4096]...),
		"truncated xz":    bzImageLike(xzPayload[:len(xzPayload)/2]),
		"truncated zstd":  zstdPayload[:len(zstdPayload)/2],
		"compressed text": gzipBytes(t, []byte("hello, not a kernel")),
		"truncated elf":   elfPVH[:100],
	}
	for name, in := range cases {
		if out, err := ExtractVmlinux(in); err == nil {
			t.Errorf("%s: no error (got %d bytes)", name, len(out))
		}
	}
}

func FuzzExtractVmlinux(f *testing.F) {
	elfPVH := tinyELF(xenElfnotePhys32Entry)
	f.Add(elfPVH)
	f.Add(bzImageLike(gzipBytes(f, elfPVH)))
	f.Add(bzImageLike(zstdBytes(f, elfPVH)))
	f.Add(bzImageLike(xzBytes(f, elfPVH)))
	f.Fuzz(func(t *testing.T, b []byte) {
		_, _ = ExtractVmlinux(b)
	})
}

package firecracker

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// vnetHdr is struct virtio_net_hdr as a packet socket gives it: in the
// host's byte order, which is little-endian on every host Firecracker
// runs on (x86_64, aarch64).
type vnetHdr struct {
	Flags      uint8
	GSOType    uint8
	HdrLen     uint16
	GSOSize    uint16
	CsumStart  uint16
	CsumOffset uint16
}

const (
	vnetNeedsCsum = 1 // VIRTIO_NET_HDR_F_NEEDS_CSUM

	gsoNone  = 0 // VIRTIO_NET_HDR_GSO_NONE
	gsoTCPv4 = 1
	gsoTCPv6 = 4
	gsoECN   = 0x80
)

func parseVnetHdr(b []byte) vnetHdr {
	return vnetHdr{
		Flags:      b[0],
		GSOType:    b[1],
		HdrLen:     binary.LittleEndian.Uint16(b[2:]),
		GSOSize:    binary.LittleEndian.Uint16(b[4:]),
		CsumStart:  binary.LittleEndian.Uint16(b[6:]),
		CsumOffset: binary.LittleEndian.Uint16(b[8:]),
	}
}

func (h vnetHdr) put(b []byte) {
	b[0], b[1] = h.Flags, h.GSOType
	binary.LittleEndian.PutUint16(b[2:], h.HdrLen)
	binary.LittleEndian.PutUint16(b[4:], h.GSOSize)
	binary.LittleEndian.PutUint16(b[6:], h.CsumStart)
	binary.LittleEndian.PutUint16(b[8:], h.CsumOffset)
}

// fromGuest finishes what a guest left to its NIC and emits the frames
// that go on the wire: a TCP segment larger than the MSS (TSO) is cut into
// MSS-sized segments, each with its checksums, and a checksum left
// partial is computed. The network process expects complete frames, as
// QEMU's stream backend, which offers no offloads, gives it. frame may be
// changed.
func fromGuest(h vnetHdr, frame []byte, emit func([]byte) error) error {
	switch h.GSOType &^ gsoECN {
	case gsoNone:
	case gsoTCPv4, gsoTCPv6:
		return segmentTCP(frame, int(h.GSOSize), emit)
	default:
		// UDP fragmentation offload (UFO) and UDP segmentation (USO):
		// Firecracker offers UFO, which current guest kernels no longer
		// use, and not USO.
		return fmt.Errorf("segmentation offload type %d is not supported", h.GSOType)
	}
	if h.Flags&vnetNeedsCsum != 0 {
		start, field := int(h.CsumStart), int(h.CsumStart)+int(h.CsumOffset)
		if start >= len(frame) || field+2 > len(frame) {
			return fmt.Errorf("checksum at %d+%d past a %d-byte frame", h.CsumStart, h.CsumOffset, len(frame))
		}
		// The field holds the pseudo-header's sum; the sum over the rest
		// includes it.
		binary.BigEndian.PutUint16(frame[field:], finish(sum(frame[start:], 0)))
	}
	return emit(frame)
}

// sum adds b to the ones' complement sum acc, as 16-bit big-endian words.
func sum(b []byte, acc uint32) uint32 {
	for len(b) >= 2 {
		acc += uint32(b[0])<<8 | uint32(b[1])
		b = b[2:]
	}
	if len(b) == 1 {
		acc += uint32(b[0]) << 8
	}
	return acc
}

// finish folds a sum and complements it: the checksum to store. A zero
// result is stored as 0xffff, its equal in ones' complement, since a
// zero UDP checksum means none.
func finish(acc uint32) uint16 {
	for acc>>16 != 0 {
		acc = acc&0xffff + acc>>16
	}
	c := ^uint16(acc)
	if c == 0 {
		c = 0xffff
	}
	return c
}

var errNotTCP = errors.New("a segmentation offload of something other than plain TCP")

// segmentTCP cuts a TCP/IP frame whose payload exceeds mss into frames of
// at most mss bytes of payload, as a NIC does for TSO: the headers are
// copied, the IP length (and IPv4 identification) and the TCP sequence
// number follow each segment, FIN and PSH stay on the last one and CWR on
// the first, and every checksum is computed afresh.
func segmentTCP(frame []byte, mss int, emit func([]byte) error) error {
	l3 := 14
	etype := binary.BigEndian.Uint16(frame[12:])
	if etype == 0x8100 && len(frame) >= 18 { // one VLAN tag
		l3 += 4
		etype = binary.BigEndian.Uint16(frame[16:])
	}
	var l4 int
	var v4 bool
	switch etype {
	case 0x0800:
		if len(frame) < l3+20 || frame[l3+9] != 6 {
			return errNotTCP
		}
		// The guest writes the header length: one shorter than the
		// fixed header would send the slicing below out of bounds.
		ihl := int(frame[l3]&0x0f) * 4
		if ihl < 20 || len(frame) < l3+ihl {
			return errNotTCP
		}
		v4, l4 = true, l3+ihl
	case 0x86dd:
		if len(frame) < l3+40 || frame[l3+6] != 6 { // no extension headers
			return errNotTCP
		}
		l4 = l3 + 40
	default:
		return errNotTCP
	}
	if len(frame) < l4+20 {
		return errNotTCP
	}
	thl := int(frame[l4+12]>>4) * 4
	hdrs := l4 + thl
	if thl < 20 || len(frame) < hdrs || mss <= 0 {
		return fmt.Errorf("a TCP segmentation offload with a bad header or MSS %d", mss)
	}
	payload := frame[hdrs:]
	seq := binary.BigEndian.Uint32(frame[l4+4:])
	flags := frame[l4+13]
	var id uint16
	if v4 {
		id = binary.BigEndian.Uint16(frame[l3+4:])
	}
	seg := make([]byte, hdrs+mss)
	for i, off := 0, 0; off < len(payload) || i == 0; i, off = i+1, off+mss {
		n := min(mss, len(payload)-off)
		copy(seg, frame[:hdrs])
		copy(seg[hdrs:], payload[off:off+n])
		pkt := seg[:hdrs+n]
		tcp := pkt[l4:]
		binary.BigEndian.PutUint32(tcp[4:], seq+uint32(off))
		f := flags
		if off+n < len(payload) {
			f &^= 0x01 | 0x08 // FIN, PSH: the last segment's
		}
		if i > 0 {
			f &^= 0x80 // CWR: the first segment's
		}
		tcp[13] = f
		var pseudo uint32
		if v4 {
			ip := pkt[l3:l4]
			binary.BigEndian.PutUint16(ip[2:], uint16(len(pkt)-l3))
			binary.BigEndian.PutUint16(ip[4:], id+uint16(i))
			ip[10], ip[11] = 0, 0
			binary.BigEndian.PutUint16(ip[10:], finish(sum(ip, 0)))
			pseudo = sum(ip[12:20], uint32(6)+uint32(len(tcp)))
		} else {
			ip := pkt[l3:l4]
			binary.BigEndian.PutUint16(ip[4:], uint16(len(tcp)))
			pseudo = sum(ip[8:40], uint32(6)+uint32(len(tcp)))
		}
		tcp[16], tcp[17] = 0, 0
		binary.BigEndian.PutUint16(tcp[16:], finish(sum(tcp, pseudo)))
		if err := emit(pkt); err != nil {
			return err
		}
		if n == 0 {
			break
		}
	}
	return nil
}

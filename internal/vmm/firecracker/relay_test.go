package firecracker

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// netns is a network namespace of the test's own, held by a locked
// thread until the test ends.
type netns struct {
	path string
	do   func(func() error) error
}

func newNetns(t *testing.T) *netns {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("a network namespace and a TAP device need root")
	}
	type job struct {
		f    func() error
		done chan error
	}
	jobs := make(chan job)
	ready := make(chan error, 1)
	var path string
	go func() {
		// The thread stays in the namespace and dies with the goroutine.
		runtime.LockOSThread()
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			ready <- err
			return
		}
		path = "/proc/" + strconv.Itoa(os.Getpid()) + "/task/" + strconv.Itoa(unix.Gettid()) + "/ns/net"
		ready <- nil
		for j := range jobs {
			j.done <- j.f()
		}
	}()
	if err := <-ready; err != nil {
		t.Fatalf("new network namespace: %v", err)
	}
	t.Cleanup(func() { close(jobs) })
	return &netns{path: path, do: func(f func() error) error {
		j := job{f: f, done: make(chan error)}
		jobs <- j
		return <-j.done
	}}
}

// openTap attaches to the TAP device as Firecracker does, with the
// virtio-net header (10 bytes here), non-blocking so reads can time out.
func openTap(t *testing.T, ns *netns, name string) *os.File {
	t.Helper()
	var f *os.File
	err := ns.do(func() error {
		fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC|unix.O_NONBLOCK, 0)
		if err != nil {
			return err
		}
		ifr, _ := unix.NewIfreq(name)
		ifr.SetUint16(unix.IFF_TAP | unix.IFF_NO_PI | unix.IFF_VNET_HDR)
		if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
			unix.Close(fd)
			return err
		}
		f = os.NewFile(uintptr(fd), name)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

// relayRig is a TAP device in a namespace, held by "Firecracker" (the
// test), a relay, and the network process's end of the stream (the test).
type relayRig struct {
	tap  *os.File
	conn net.Conn
	done chan error
}

func newRelayRig(t *testing.T, pid int) *relayRig {
	ns := newNetns(t)
	if err := ns.do(func() error { return makeTap(tapName, 0) }); err != nil {
		t.Fatal(err)
	}
	r := &relayRig{tap: openTap(t, ns, tapName), done: make(chan error, 1)}
	fl := listenFrames(t, filepath.Join(t.TempDir(), "net.sock"))
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer pr.Close()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	go func() {
		r.done <- Relay(ctx, RelayConfig{NetNS: ns.path, Tap: tapName, Socket: fl.path, PID: pid, Ready: pw})
	}()
	b := make([]byte, 16)
	if n, err := pr.Read(b); err != nil || string(b[:n]) != "ready\n" {
		t.Fatalf("the relay said %q, %v", b[:n], err)
	}
	r.conn = fl.conn(t)
	return r
}

// fromGuest writes a frame as the guest's NIC would, with hdr.
func (r *relayRig) fromGuest(t *testing.T, hdr vnetHdr, frame []byte) {
	t.Helper()
	b := make([]byte, vnetHdrLen, vnetHdrLen+len(frame))
	hdr.put(b)
	if _, err := r.tap.Write(append(b, frame...)); err != nil {
		t.Fatalf("write to the TAP: %v", err)
	}
}

// toGuest reads frames reaching the guest until one has payload in it.
func (r *relayRig) toGuest(t *testing.T, payload []byte) []byte {
	t.Helper()
	r.tap.SetReadDeadline(time.Now().Add(5 * time.Second))
	b := make([]byte, vnetHdrLen+maxFrame)
	for {
		n, err := r.tap.Read(b)
		if err != nil {
			t.Fatalf("nothing reached the guest: %v", err)
		}
		if bytes.Contains(b[vnetHdrLen:n], payload) {
			if h := parseVnetHdr(b); h != (vnetHdr{}) {
				t.Errorf("a frame reached the guest with header %+v", h)
			}
			return b[vnetHdrLen:n]
		}
	}
}

var (
	guestMAC = []byte{2, 0xfc, 0, 0, 0, 9}
	gwMAC    = []byte{2, 0, 0, 0, 0, 1}
	guestIP4 = []byte{192, 168, 127, 2}
	gwIP4    = []byte{192, 168, 127, 1}
)

func ether(etype uint16, payload []byte) []byte {
	f := append(append(append([]byte{}, gwMAC...), guestMAC...), byte(etype>>8), byte(etype))
	return append(f, payload...)
}

// ipv4 builds an IPv4 packet of proto around l4, with a valid header
// checksum.
func ipv4(proto byte, l4 []byte) []byte {
	h := make([]byte, 20)
	h[0], h[8], h[9] = 0x45, 64, proto
	binary.BigEndian.PutUint16(h[2:], uint16(20+len(l4)))
	binary.BigEndian.PutUint16(h[4:], 0x1234)
	copy(h[12:], guestIP4)
	copy(h[16:], gwIP4)
	binary.BigEndian.PutUint16(h[10:], finish(sum(h, 0)))
	return append(h, l4...)
}

// pseudo4 is the IPv4 pseudo-header's sum for an l4 segment.
func pseudo4(ip []byte, proto byte, l4len int) uint32 {
	return sum(ip[12:20], uint32(proto)+uint32(l4len))
}

// valid checks a TCP or UDP checksum over an IPv4 packet.
func validL4(ip []byte) bool {
	l4 := ip[20:]
	v := sum(l4, pseudo4(ip, ip[9], len(l4)))
	for v>>16 != 0 {
		v = v&0xffff + v>>16
	}
	return v == 0xffff
}

func validIP4Header(ip []byte) bool {
	v := sum(ip[:20], 0)
	for v>>16 != 0 {
		v = v&0xffff + v>>16
	}
	return v == 0xffff
}

func TestRelayCarriesFrames(t *testing.T) {
	r := newRelayRig(t, 0)

	// A frame from the guest, complete: as it was.
	plain := ether(0x88b5, []byte("plain frame from the guest"))
	r.fromGuest(t, vnetHdr{}, plain)
	if got := readFrame(t, r.conn); !bytes.Equal(got, plain) {
		t.Fatalf("got %x, want %x", got, plain)
	}

	// A UDP datagram whose checksum the guest left to its NIC: the field
	// holds the pseudo-header's sum, and the relay finishes it.
	udp := make([]byte, 8, 8+13)
	binary.BigEndian.PutUint16(udp[0:], 40000)
	binary.BigEndian.PutUint16(udp[2:], 53)
	udp = append(udp, "a DNS query!!"...)
	binary.BigEndian.PutUint16(udp[4:], uint16(len(udp)))
	ip := ipv4(17, udp)
	acc := pseudo4(ip, 17, len(udp))
	for acc>>16 != 0 {
		acc = acc&0xffff + acc>>16
	}
	binary.BigEndian.PutUint16(ip[20+6:], uint16(acc))
	frame := ether(0x0800, ip)
	r.fromGuest(t, vnetHdr{Flags: vnetNeedsCsum, CsumStart: 14 + 20, CsumOffset: 6}, frame)
	got := readFrame(t, r.conn)
	if len(got) != len(frame) || !validL4(got[14:]) || !bytes.Equal(got[14+28:], []byte("a DNS query!!")) {
		t.Fatalf("UDP frame with its checksum left to the NIC came out as %x", got)
	}

	// A TCP segment three times the MSS (TSO): three segments, each with
	// its checksums, sequence number and flags.
	payload := bytes.Repeat([]byte("0123456789"), 250) // 2500 bytes
	tcp := make([]byte, 20, 20+len(payload))
	binary.BigEndian.PutUint16(tcp[0:], 40001)
	binary.BigEndian.PutUint16(tcp[2:], 80)
	binary.BigEndian.PutUint32(tcp[4:], 1000)
	tcp[12] = 5 << 4
	tcp[13] = 0x80 | 0x10 | 0x08 | 0x01 // CWR ACK PSH FIN
	binary.BigEndian.PutUint16(tcp[14:], 65535)
	tcp = append(tcp, payload...)
	ip = ipv4(6, tcp)
	acc = pseudo4(ip, 6, len(tcp))
	for acc>>16 != 0 {
		acc = acc&0xffff + acc>>16
	}
	binary.BigEndian.PutUint16(ip[20+16:], uint16(acc))
	r.fromGuest(t, vnetHdr{Flags: vnetNeedsCsum, GSOType: gsoTCPv4, HdrLen: 54, GSOSize: 1000, CsumStart: 34, CsumOffset: 16}, ether(0x0800, ip))
	var seen []byte
	for i := range 3 {
		seg := readFrame(t, r.conn)[14:]
		n := min(1000, 2500-i*1000)
		if len(seg) != 40+n || int(binary.BigEndian.Uint16(seg[2:])) != 40+n {
			t.Fatalf("segment %d: %d bytes, IP length %d; want %d", i, len(seg), binary.BigEndian.Uint16(seg[2:]), 40+n)
		}
		if !validIP4Header(seg) || !validL4(seg) {
			t.Errorf("segment %d has a bad checksum", i)
		}
		if id := binary.BigEndian.Uint16(seg[4:]); id != 0x1234+uint16(i) {
			t.Errorf("segment %d has IP id %#x", i, id)
		}
		if s := binary.BigEndian.Uint32(seg[24:]); s != 1000+uint32(i*1000) {
			t.Errorf("segment %d has sequence %d", i, s)
		}
		wantFlags := byte(0x10)
		if i == 0 {
			wantFlags |= 0x80
		}
		if i == 2 {
			wantFlags |= 0x08 | 0x01
		}
		if seg[33] != wantFlags {
			t.Errorf("segment %d has flags %#x, want %#x", i, seg[33], wantFlags)
		}
		seen = append(seen, seg[40:]...)
	}
	if !bytes.Equal(seen, payload) {
		t.Error("the segments do not carry the payload in order")
	}

	// From the network process to the guest, and the largest frame the
	// link carries (65520 bytes of IP).
	for _, size := range []int{60, 14 + 65520} {
		f := ether(0x88b5, bytes.Repeat([]byte{'n'}, size-14))
		copy(f[14:], "to the guest "+strconv.Itoa(size))
		writeFrame(t, r.conn, f)
		if got := r.toGuest(t, []byte("to the guest "+strconv.Itoa(size))); !bytes.Equal(got, f) {
			t.Fatalf("a %d-byte frame reached the guest as %d bytes", size, len(got))
		}
	}

	// The network process closes the link: the relay ends, cleanly.
	r.conn.Close()
	select {
	case err := <-r.done:
		if err != nil {
			t.Fatalf("relay: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the relay outlived its link")
	}
}

func TestRelayEndsWithTheVM(t *testing.T) {
	vm := exec.Command("sleep", "60")
	if err := vm.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { vm.Process.Kill(); vm.Wait() })
	r := newRelayRig(t, vm.Process.Pid)
	vm.Process.Kill()
	vm.Wait()
	select {
	case err := <-r.done:
		if err != nil {
			t.Fatalf("relay: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the relay outlived its VM")
	}
	r.conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := r.conn.Read(make([]byte, 1)); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Errorf("the link stayed open: %v", err)
	}
}

func TestRelayRefusesABadFrame(t *testing.T) {
	r := newRelayRig(t, 0)
	r.conn.Write([]byte{0, 1, 0, 0}) // 65536 bytes: more than any frame
	select {
	case err := <-r.done:
		if err == nil {
			t.Fatal("the relay took a frame larger than the link")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the relay took a frame larger than the link")
	}
}

func TestSegmentTCPv6(t *testing.T) {
	payload := bytes.Repeat([]byte("abcdefgh"), 300) // 2400 bytes
	tcp := make([]byte, 32, 32+len(payload))         // with 12 bytes of options
	binary.BigEndian.PutUint32(tcp[4:], 7)
	tcp[12] = 8 << 4
	tcp[13] = 0x18                      // ACK PSH
	tcp[20], tcp[21], tcp[22] = 1, 1, 8 // NOP NOP timestamps
	tcp = append(tcp, payload...)
	ip := make([]byte, 40)
	ip[0], ip[6], ip[7] = 0x60, 6, 64
	binary.BigEndian.PutUint16(ip[4:], uint16(len(tcp)))
	ip[23], ip[39] = 2, 1
	frame := ether(0x86dd, append(ip, tcp...))
	var segs [][]byte
	err := fromGuest(vnetHdr{Flags: vnetNeedsCsum, GSOType: gsoTCPv6, GSOSize: 1000, CsumStart: 54, CsumOffset: 16}, frame, func(f []byte) error {
		segs = append(segs, bytes.Clone(f))
		return nil
	})
	if err != nil || len(segs) != 3 {
		t.Fatalf("%d segments, %v", len(segs), err)
	}
	var got []byte
	for i, s := range segs {
		ip, tcp := s[14:54], s[54:]
		if int(binary.BigEndian.Uint16(ip[4:])) != len(tcp) {
			t.Errorf("segment %d: payload length %d for %d bytes", i, binary.BigEndian.Uint16(ip[4:]), len(tcp))
		}
		v := sum(tcp, sum(ip[8:40], 6+uint32(len(tcp))))
		for v>>16 != 0 {
			v = v&0xffff + v>>16
		}
		if v != 0xffff {
			t.Errorf("segment %d: bad TCP checksum", i)
		}
		if push := tcp[13]&0x08 != 0; push != (i == 2) {
			t.Errorf("segment %d: PSH %v", i, push)
		}
		if !bytes.Equal(tcp[20:32], frame[54+20:54+32]) {
			t.Errorf("segment %d lost its options", i)
		}
		got = append(got, tcp[32:]...)
	}
	if !bytes.Equal(got, payload) {
		t.Error("the segments do not carry the payload")
	}
	// UDP segmentation is not done: the frame is refused.
	if err := fromGuest(vnetHdr{GSOType: 5, GSOSize: 1000}, frame, func([]byte) error { return nil }); err == nil {
		t.Error("a UDP segmentation offload went through")
	}
}

// A guest's frame with an IPv4 header length shorter than the header
// itself is refused, not a panic of its relay.
func TestSegmentTCPBadHeaderLength(t *testing.T) {
	for _, ihl := range []byte{0, 1, 4} {
		ip := make([]byte, 20)
		ip[0], ip[9] = 0x40|ihl, 6
		frame := ether(0x0800, append(ip, make([]byte, 2000)...))
		err := fromGuest(vnetHdr{Flags: vnetNeedsCsum, GSOType: gsoTCPv4, GSOSize: 1000, CsumStart: 34, CsumOffset: 16}, frame, func([]byte) error { return nil })
		if !errors.Is(err, errNotTCP) {
			t.Errorf("IHL %d: %v, want errNotTCP", ihl, err)
		}
	}
}

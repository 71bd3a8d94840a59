package network_test

import (
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"

	"github.com/smolvm/smolvm/internal/network"
)

// framed is frame in QEMU's stream framing, its length before it.
func framed(frame []byte) []byte {
	var size [4]byte
	binary.BigEndian.PutUint32(size[:], uint32(len(frame)))
	return append(size[:], frame...)
}

// readFrame reads one frame in QEMU's stream framing.
func readFrame(r io.Reader) ([]byte, error) {
	var size [4]byte
	if _, err := io.ReadFull(r, size[:]); err != nil {
		return nil, err
	}
	frame := make([]byte, binary.BigEndian.Uint32(size[:]))
	_, err := io.ReadFull(r, frame)
	return frame, err
}

// rawGuest is the VM's end of a network's link, spoken frame by frame.
type rawGuest struct {
	t      *testing.T
	conn   net.Conn
	mac    tcpip.LinkAddress
	frames chan []byte // what the network sent, in order
}

func attachRaw(t *testing.T) (*rawGuest, <-chan error) {
	t.Helper()
	n, err := network.New(network.Policy{Mode: network.ModeOpen}, network.Options{Dial: (&recorder{}).dial})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(n.Close)
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	hostEnd, guestEnd := net.Pipe()
	t.Cleanup(func() { guestEnd.Close() })
	done := make(chan error, 1)
	go func() { done <- n.ServeQEMU(ctx, hostEnd) }()
	hw, _ := net.ParseMAC(network.GuestMAC)
	g := &rawGuest{t: t, conn: guestEnd, mac: tcpip.LinkAddress(hw), frames: make(chan []byte, 64)}
	// Read all the time, as a VM does: the pipe holds nothing unread.
	go func() {
		defer close(g.frames)
		for {
			frame, err := readFrame(guestEnd)
			if err != nil {
				return
			}
			g.frames <- frame
		}
	}()
	return g, done
}

func (g *rawGuest) send(frame []byte) {
	g.t.Helper()
	g.conn.SetWriteDeadline(time.Now().Add(10 * time.Second))
	if _, err := g.conn.Write(framed(frame)); err != nil {
		g.t.Fatalf("send a frame: %v", err)
	}
}

func (g *rawGuest) receive() []byte {
	g.t.Helper()
	select {
	case f, ok := <-g.frames:
		if !ok {
			g.t.Fatal("the link closed")
		}
		return f
	case <-time.After(10 * time.Second):
		g.t.Fatal("no frame within 10 s")
		return nil
	}
}

// arpRequest asks, from the guest, who has ip.
func (g *rawGuest) arpRequest(ip string) []byte {
	frame := make([]byte, header.EthernetMinimumSize+header.ARPSize)
	header.Ethernet(frame).Encode(&header.EthernetFields{
		SrcAddr: g.mac, DstAddr: header.EthernetBroadcastAddress, Type: header.ARPProtocolNumber,
	})
	a := header.ARP(frame[header.EthernetMinimumSize:])
	a.SetIPv4OverEthernet()
	a.SetOp(header.ARPRequest)
	copy(a.HardwareAddressSender(), g.mac)
	copy(a.ProtocolAddressSender(), network.GuestIP.AsSlice())
	copy(a.ProtocolAddressTarget(), net.ParseIP(ip).To4())
	return frame
}

// The gateway answers ARP for itself and the host's address only. Its
// stack takes every address as its own (so that it sees every flow) and
// would claim any address the guest asks about.
func TestLinkAnswersARPForItsOwnAddressesOnly(t *testing.T) {
	g, _ := attachRaw(t)
	for _, tc := range []struct{ ip, claimed string }{
		{network.GatewayIP.String(), network.GatewayIP.String()},
		{network.HostIP.String(), network.HostIP.String()},
	} {
		// Asked first about addresses no one there has: the first
		// reply must be the one about tc.ip.
		g.send(g.arpRequest("10.1.2.3"))
		g.send(g.arpRequest("192.168.127.77"))
		g.send(g.arpRequest(tc.ip))
		frame := g.receive()
		eth := header.Ethernet(frame)
		if eth.Type() != header.ARPProtocolNumber || eth.DestinationAddress() != g.mac {
			t.Fatalf("asked for %s: a frame of type %#x to %s", tc.ip, eth.Type(), eth.DestinationAddress())
		}
		a := header.ARP(frame[header.EthernetMinimumSize:])
		if !a.IsValid() || a.Op() != header.ARPReply {
			t.Fatalf("asked for %s: not an ARP reply: % x", tc.ip, frame)
		}
		if got := net.IP(a.ProtocolAddressSender()).String(); got != tc.claimed {
			t.Errorf("asked for %s: the first reply claims %s", tc.ip, got)
		}
		if got := tcpip.LinkAddress(a.HardwareAddressSender()).String(); got != network.GatewayMAC {
			t.Errorf("asked for %s: answered with %s, want the gateway's %s", tc.ip, got, network.GatewayMAC)
		}
	}
}

// A length that no frame has ends the link with an error, not a panic or
// an allocation of gigabytes.
func TestLinkRefusesImpossibleFrames(t *testing.T) {
	for _, size := range []uint32{0, 13, 128<<10 + 1, 1 << 31} {
		g, done := attachRaw(t)
		var b [4]byte
		binary.BigEndian.PutUint32(b[:], size)
		g.conn.Write(b[:])
		select {
		case err := <-done:
			if err == nil || !strings.Contains(err.Error(), "frame") {
				t.Errorf("a frame of %d bytes: ServeQEMU returned %v", size, err)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("a frame of %d bytes: the link still runs", size)
		}
	}
}

// FuzzLinkFrames: whatever the VM writes on its link, the network never
// panics and never hangs, and a length no frame has ends the link with an
// error. The guest is not trusted; nothing it sends may reach past the
// injected dialer, which refuses every destination.
func FuzzLinkFrames(f *testing.F) {
	frame := framed
	g := &rawGuest{mac: tcpip.LinkAddress("\x5a\x94\xef\xe4\x0c\xee")}
	arp := g.arpRequest(network.GatewayIP.String())
	f.Add(frame(arp))
	f.Add(append(frame(arp), frame(g.arpRequest("10.0.0.1"))...))
	f.Add(frame(arp[:14]))
	f.Add(frame(arp)[:20])
	f.Add([]byte{0, 0, 0, 3, 1, 2, 3})
	f.Add([]byte{0xff, 0xff, 0xff, 0xff})
	ipv4 := append(append([]byte{}, arp[:12]...), 0x08, 0x00, 0x45, 0, 0, 28, 0, 0, 0x40, 0, 64, 1, 0, 0, 192, 168, 127, 2, 192, 168, 127, 1, 8, 0, 0, 0, 0, 0, 0, 0)
	copy(ipv4[0:6], []byte("\x5a\x94\xef\xe4\x0c\xdd"))
	f.Add(frame(ipv4))
	f.Fuzz(func(t *testing.T, stream []byte) {
		refuse := func(context.Context, string, string) (net.Conn, error) {
			return nil, &net.OpError{Op: "dial", Err: errors.New("refused by the test")}
		}
		n, err := network.New(network.Policy{Mode: network.ModeOpen}, network.Options{Dial: refuse})
		if err != nil {
			t.Fatal(err)
		}
		defer n.Close()
		hostEnd, guestEnd := net.Pipe()
		done := make(chan error, 1)
		go func() { done <- n.ServeQEMU(context.Background(), hostEnd) }()
		go io.Copy(io.Discard, guestEnd)
		guestEnd.SetWriteDeadline(time.Now().Add(10 * time.Second))
		_, werr := guestEnd.Write(stream)
		guestEnd.Close()
		select {
		case err := <-done:
			if err == nil {
				t.Fatal("the link ended without saying why")
			}
			if werr == nil && !strings.Contains(err.Error(), "frame") {
				t.Fatalf("the link ended with %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("the link still runs 10 s after the VM hung up")
		}
	})
}

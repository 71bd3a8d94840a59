package network

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"

	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// link is the gateway's Ethernet port, cabled straight to the one VM of
// its network: frames travel over a stream in QEMU's netdev framing, a
// 32-bit big-endian length before each.
//
// It stands in for gvisor-tap-vsock's switch and link endpoint, which serve
// any number of VMs through a learning switch. With one VM there is nothing
// to switch, and their package costs every network process about 25 ms of
// start-up on a 2-core machine: it imports gopacket, whose tables are
// built before main (GODEBUG=inittrace=1), beside a VM that is starting too.
type link struct {
	mac tcpip.LinkAddress
	// own are the addresses the gateway may claim in ARP replies. The
	// stack runs promiscuous and spoofing (it takes every destination as
	// its own, so the forwarders see every flow) and would otherwise
	// answer ARP for any address the guest asks about.
	own map[tcpip.Address]bool

	mu         sync.Mutex
	dispatcher stack.NetworkDispatcher
	vm         net.Conn // nil while no VM is attached
	// wmu keeps frames whole on the stream. The reader never takes it: a
	// write blocked on a slow VM holds up other writes only.
	wmu sync.Mutex
}

func newLink(mac string, own ...tcpip.Address) (*link, error) {
	hw, err := net.ParseMAC(mac)
	if err != nil {
		return nil, err
	}
	l := &link{mac: tcpip.LinkAddress(hw), own: map[tcpip.Address]bool{}}
	for _, a := range own {
		l.own[a] = true
	}
	return l, nil
}

// serve carries frames between conn and the stack until conn fails or
// ctx ends, and closes conn.
func (l *link) serve(ctx context.Context, conn net.Conn) error {
	l.mu.Lock()
	if l.vm != nil {
		l.mu.Unlock()
		conn.Close()
		return errors.New("a VM is already attached")
	}
	l.vm = conn
	l.mu.Unlock()
	defer func() {
		l.mu.Lock()
		l.vm = nil
		l.mu.Unlock()
		conn.Close()
	}()
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	r := bufio.NewReaderSize(conn, 256<<10)
	var size [4]byte
	for {
		if _, err := io.ReadFull(r, size[:]); err != nil {
			return fmt.Errorf("read frame length: %w", err)
		}
		// A length no frame has means the stream is not QEMU's framing
		// (or is out of step with it): nothing after it can be trusted.
		n := binary.BigEndian.Uint32(size[:])
		if n < header.EthernetMinimumSize || n > maxFrame {
			return fmt.Errorf("a frame of %d bytes from the VM", n)
		}
		frame := make([]byte, n)
		if _, err := io.ReadFull(r, frame); err != nil {
			return fmt.Errorf("read frame: %w", err)
		}
		l.receive(frame)
	}
}

// maxFrame bounds a frame's length: QEMU's stream netdev sends none larger
// than 68 KiB, an MTU of 65520 with its headers.
const maxFrame = 128 << 10

// receive hands the stack a frame from the VM that is for the gateway or
// for everyone; frames for other addresses have nowhere to go.
func (l *link) receive(frame []byte) {
	eth := header.Ethernet(frame)
	dst := eth.DestinationAddress()
	l.mu.Lock()
	d := l.dispatcher
	l.mu.Unlock()
	if d == nil || (dst != l.mac && dst != header.EthernetBroadcastAddress) {
		return
	}
	data := buffer.MakeWithData(frame)
	data.TrimFront(header.EthernetMinimumSize)
	pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: data})
	d.DeliverNetworkPacket(eth.Type(), pkt)
	pkt.DecRef()
}

// send writes a frame of the stack's to the VM, the one host on the link;
// its network card drops what is not for its address.
func (l *link) send(pkt *stack.PacketBuffer) tcpip.Error {
	r := pkt.EgressRoute
	src := l.mac
	if r.LocalLinkAddress != "" {
		src = r.LocalLinkAddress
	}
	eth := header.Ethernet(pkt.LinkHeader().Push(header.EthernetMinimumSize))
	eth.Encode(&header.EthernetFields{Type: pkt.NetworkProtocolNumber, SrcAddr: src, DstAddr: r.RemoteLinkAddress})
	if arp := header.ARP(pkt.NetworkHeader().Slice()); arp.IsValid() && arp.Op() == header.ARPReply &&
		!l.own[tcpip.AddrFromSlice(arp.ProtocolAddressSender())] {
		return nil
	}
	view := pkt.ToView()
	defer view.Release()
	frame := view.AsSlice()
	var size [4]byte
	binary.BigEndian.PutUint32(size[:], uint32(len(frame)))
	l.mu.Lock()
	vm := l.vm
	l.mu.Unlock()
	if vm == nil {
		return nil
	}
	l.wmu.Lock()
	defer l.wmu.Unlock()
	bufs := net.Buffers{size[:], frame}
	if _, err := bufs.WriteTo(vm); err != nil {
		// The reader sees the connection end and detaches the VM.
		vm.Close()
		return &tcpip.ErrClosedForSend{}
	}
	return nil
}

// The rest makes a stack.LinkEndpoint.

func (l *link) WritePackets(pkts stack.PacketBufferList) (int, tcpip.Error) {
	n := 0
	for _, p := range pkts.AsSlice() {
		if err := l.send(p); err != nil {
			return n, err
		}
		n++
	}
	return n, nil
}

func (l *link) Attach(d stack.NetworkDispatcher) {
	l.mu.Lock()
	l.dispatcher = d
	l.mu.Unlock()
}

func (l *link) IsAttached() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.dispatcher != nil
}

func (l *link) MTU() uint32                                    { return MTU }
func (l *link) SetMTU(uint32)                                  {}
func (l *link) MaxHeaderLength() uint16                        { return header.EthernetMinimumSize }
func (l *link) LinkAddress() tcpip.LinkAddress                 { return l.mac }
func (l *link) SetLinkAddress(tcpip.LinkAddress)               {}
func (l *link) ARPHardwareType() header.ARPHardwareType        { return header.ARPHardwareEther }
func (l *link) AddHeader(*stack.PacketBuffer)                  {}
func (l *link) ParseHeader(*stack.PacketBuffer) bool           { return true }
func (l *link) Wait()                                          {}
func (l *link) Close()                                         {}
func (l *link) SetOnCloseAction(func())                        {}
func (l *link) WriteRawPacket(*stack.PacketBuffer) tcpip.Error { return &tcpip.ErrNotSupported{} }

func (l *link) Capabilities() stack.LinkEndpointCapabilities {
	return stack.CapabilityResolutionRequired | stack.CapabilityRXChecksumOffload
}

var _ stack.LinkEndpoint = (*link)(nil)

package network_test

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/link/channel"
	"gvisor.dev/gvisor/pkg/tcpip/link/ethernet"
	"gvisor.dev/gvisor/pkg/tcpip/network/arp"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"

	"github.com/smolvm/smolvm/internal/network"
)

// These tests put a guest of their own, a second network stack in this
// process, on the sandbox network's link in QEMU's framing, and give the
// network a dialer that records every host-side dial and makes none but to
// this machine's loopback: no packet leaves the machine.

// recorder is the injected dialer.
type recorder struct {
	mu    sync.Mutex
	dials []string
	// timeout lists destinations that "never answer".
	timeout []string
}

type timeoutError struct{}

func (timeoutError) Error() string   { return "i/o timeout" }
func (timeoutError) Timeout() bool   { return true }
func (timeoutError) Temporary() bool { return true }

func (r *recorder) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	r.mu.Lock()
	r.dials = append(r.dials, network+" "+addr)
	r.mu.Unlock()
	ap, err := netip.ParseAddrPort(addr)
	if err == nil && ap.Addr().IsLoopback() {
		var d net.Dialer
		return d.DialContext(ctx, network, addr)
	}
	if slices.Contains(r.timeout, addr) {
		return nil, &net.OpError{Op: "dial", Net: network, Err: timeoutError{}}
	}
	return nil, &net.OpError{Op: "dial", Net: network, Err: syscall.ECONNREFUSED}
}

func (r *recorder) take() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	d := r.dials
	r.dials = nil
	return d
}

// guest attaches a network stack at network.GuestIP to n.
func guest(t *testing.T, n *network.Network) *stack.Stack {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	hostEnd, guestEnd := net.Pipe()
	served := make(chan struct{})
	go func() {
		defer close(served)
		n.ServeQEMU(ctx, hostEnd)
	}()
	mac, err := net.ParseMAC(network.GuestMAC)
	if err != nil {
		t.Fatal(err)
	}
	ch := channel.New(256, network.MTU, tcpip.LinkAddress(mac))
	s := stack.New(stack.Options{
		NetworkProtocols:   []stack.NetworkProtocolFactory{ipv4.NewProtocol, arp.NewProtocol},
		TransportProtocols: []stack.TransportProtocolFactory{tcp.NewProtocol},
	})
	if terr := s.CreateNIC(1, ethernet.New(ch)); terr != nil {
		t.Fatal(terr)
	}
	if terr := s.AddProtocolAddress(1, tcpip.ProtocolAddress{
		Protocol:          ipv4.ProtocolNumber,
		AddressWithPrefix: tcpip.AddrFrom4(network.GuestIP.As4()).WithPrefix(),
	}, stack.AddressProperties{}); terr != nil {
		t.Fatal(terr)
	}
	s.SetRouteTable([]tcpip.Route{{Destination: header.IPv4EmptySubnet, Gateway: tcpip.AddrFrom4(network.GatewayIP.As4()), NIC: 1}})

	var wg sync.WaitGroup
	wg.Add(2)
	go func() { // guest -> network
		defer wg.Done()
		for {
			pkt := ch.ReadContext(ctx)
			if pkt == nil {
				return
			}
			v := pkt.ToView()
			frame := make([]byte, 4+v.Size())
			binary.BigEndian.PutUint32(frame, uint32(v.Size()))
			copy(frame[4:], v.AsSlice())
			v.Release()
			pkt.DecRef()
			if _, err := guestEnd.Write(frame); err != nil {
				return
			}
		}
	}()
	go func() { // network -> guest
		defer wg.Done()
		r := bufio.NewReader(guestEnd)
		for {
			frame, err := readFrame(r)
			if err != nil {
				return
			}
			pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: buffer.MakeWithData(frame)})
			ch.InjectInbound(0, pkt)
			pkt.DecRef()
		}
	}()
	t.Cleanup(func() {
		cancel()
		guestEnd.Close()
		hostEnd.Close()
		wg.Wait()
		<-served
		s.Close()
		ch.Close()
	})
	return s
}

// connect opens a TCP connection from the guest to addr.
func connect(t *testing.T, g *stack.Stack, addr string, wait time.Duration) (net.Conn, error) {
	t.Helper()
	ap := netip.MustParseAddrPort(addr)
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	return gonet.DialContextTCP(ctx, g, tcpip.FullAddress{NIC: 1, Addr: tcpip.AddrFrom4(ap.Addr().As4()), Port: ap.Port()}, ipv4.ProtocolNumber)
}

func isRefused(err error) bool {
	return err != nil && (errors.Is(err, syscall.ECONNREFUSED) || strings.Contains(err.Error(), "refused"))
}

// With the default policy the guest reaches the public Internet and
// nothing private; each connection's outcome is the host's.
func TestGuestConnectionsFollowPolicyAndOutcome(t *testing.T) {
	t.Parallel()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			io.WriteString(c, "hello from the host\n")
			c.Close()
		}
	}()
	hostPort := ln.Addr().(*net.TCPAddr).Port

	rec := &recorder{timeout: []string{"203.0.113.9:80"}}
	n, err := network.New(network.Policy{Mode: network.ModeOpen, AllowHostLoopback: true}, network.Options{Dial: rec.dial})
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close()
	g := guest(t, n)

	// A public address is dialed from the host, and its refusal is the
	// guest's.
	if _, err := connect(t, g, "93.184.216.34:80", 20*time.Second); !isRefused(err) {
		t.Errorf("connect to a public address the host's dial refused: %v, want refused", err)
	}
	if got := rec.take(); !slices.Equal(got, []string{"tcp 93.184.216.34:80"}) {
		t.Errorf("host dials = %q, want the public address", got)
	}

	// Private ranges are refused before any dial.
	for _, dst := range []string{"10.1.2.3:80", "172.16.0.1:443", "192.168.1.1:22", "100.64.0.1:80", "198.18.0.1:80", "169.254.169.254:80", "0.0.0.1:80"} {
		if _, err := connect(t, g, dst, 20*time.Second); !isRefused(err) {
			t.Errorf("connect to %s: %v, want refused", dst, err)
		}
	}
	if got := rec.take(); len(got) != 0 {
		t.Errorf("host dials for private destinations: %q, want none", got)
	}

	// The handshake completes only when the host's did: a destination
	// that never answers leaves the guest waiting, as the real one would.
	if c, err := connect(t, g, "203.0.113.9:80", 2*time.Second); err == nil || isRefused(err) {
		if c != nil {
			c.Close()
		}
		t.Errorf("connect to a destination that never answers: %v, want the guest's own timeout", err)
	}
	if got := rec.take(); len(got) == 0 || got[0] != "tcp 203.0.113.9:80" {
		t.Errorf("host dials = %q, want the silent destination", got)
	}

	// A destination that answers does so through the guest's connection.
	c, err := connect(t, g, netip.AddrPortFrom(network.HostIP, uint16(hostPort)).String(), 20*time.Second)
	if err != nil {
		t.Fatalf("connect to the host's loopback (allowed): %v", err)
	}
	c.SetDeadline(time.Now().Add(20 * time.Second))
	b, err := io.ReadAll(c)
	c.Close()
	if string(b) != "hello from the host\n" {
		t.Errorf("read through the guest's connection: %q, %v", b, err)
	}
	if got := rec.take(); !slices.Equal(got, []string{"tcp 127.0.0.1:" + strconv.Itoa(hostPort)}) {
		t.Errorf("host dials = %q, want the host's loopback", got)
	}

	// allow lets named private destinations through; allow_private all.
	if err := n.SetPolicy(network.Policy{Mode: network.ModeOpen, Allow: []netip.Prefix{netip.MustParsePrefix("10.1.0.0/16")}}); err != nil {
		t.Fatal(err)
	}
	connect(t, g, "10.1.2.3:80", 20*time.Second)
	connect(t, g, "10.2.0.1:80", 20*time.Second)
	if got := rec.take(); !slices.Equal(got, []string{"tcp 10.1.2.3:80"}) {
		t.Errorf("with allow 10.1.0.0/16, host dials = %q, want only 10.1.2.3", got)
	}
	if err := n.SetPolicy(network.Policy{Mode: network.ModeOpen, AllowPrivate: true}); err != nil {
		t.Fatal(err)
	}
	for _, dst := range []string{"10.2.0.1:80", "192.168.1.1:22", "100.64.0.1:80", "169.254.169.254:80"} {
		connect(t, g, dst, 20*time.Second)
	}
	if got := rec.take(); !slices.Equal(got, []string{"tcp 10.2.0.1:80", "tcp 192.168.1.1:22", "tcp 100.64.0.1:80"}) {
		t.Errorf("with allow_private, host dials = %q, want the private ranges but not metadata", got)
	}
}

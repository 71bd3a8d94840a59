package network

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/containers/gvisor-tap-vsock/pkg/services/dns"
	"github.com/containers/gvisor-tap-vsock/pkg/services/forwarder"
	"github.com/containers/gvisor-tap-vsock/pkg/types"
	"golang.org/x/net/netutil"
	"golang.org/x/time/rate"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/link/nested"
	"gvisor.dev/gvisor/pkg/tcpip/network/arp"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/icmp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"
	"gvisor.dev/gvisor/pkg/waiter"
)

const nicID = 1

// dialTimeout bounds an outbound connection attempt made for the guest.
const dialTimeout = 30 * time.Second

// udpIdle ends a guest UDP flow nobody has used for this long.
const udpIdle = 90 * time.Second

// Network is one sandbox's virtual network: the gateway the guest sees, and
// the forwards from the host into the guest.
//
// gvisor-tap-vsock's VirtualNetwork is not used whole because its TCP and
// UDP forwarders dial whatever the guest asks for (only the metadata range
// can be turned off) and it offers no hook to refuse a destination; smolvm
// builds the same stack from the library's parts with a forwarder that asks
// the Policy first.
type Network struct {
	stack *stack.Stack
	link  *link
	log   *log.Logger
	dial  DialFunc

	// refused counts flows the policy turned away; per-flow log lines
	// would let the guest fill the log.
	refused  atomic.Int64
	tcpConns atomic.Int64
	udpFlows atomic.Int64

	addrsMu sync.Mutex
	addrs   []netip.Addr
	addrsAt time.Time

	mu       sync.Mutex
	policy   Policy
	forwards map[int]*forward // by guest port
	closed   bool
}

type forward struct {
	Forward
	ln net.Listener
}

// DialFunc opens the host's side of a guest's connection; net.Dialer's
// DialContext is the one used outside tests.
type DialFunc func(ctx context.Context, network, addr string) (net.Conn, error)

// Options are a network's settings beyond its policy.
type Options struct {
	Logger *log.Logger
	// Dial replaces net.Dialer for the host's side of guest connections:
	// tests give one that records and refuses, so no packet leaves the
	// machine.
	Dial DialFunc
}

// New builds the network for policy. Nothing reaches it until a VM is
// attached with ServeQEMU.
func New(policy Policy, o Options) (*Network, error) {
	if err := policy.Normalize(); err != nil {
		return nil, err
	}
	logger := o.Logger
	if logger == nil {
		logger = log.New(io.Discard, "", 0)
	}
	dial := o.Dial
	if dial == nil {
		dial = (&net.Dialer{}).DialContext
	}
	ep, err := newLink(GatewayMAC, tcpip.AddrFrom4(GatewayIP.As4()), tcpip.AddrFrom4(HostIP.As4()))
	if err != nil {
		return nil, fmt.Errorf("network link: %w", err)
	}

	s := stack.New(stack.Options{
		NetworkProtocols:   []stack.NetworkProtocolFactory{ipv4.NewProtocol, arp.NewProtocol},
		TransportProtocols: []stack.TransportProtocolFactory{tcp.NewProtocol, udp.NewProtocol, icmp.NewProtocol4},
	})
	if terr := s.CreateNIC(nicID, newEchoFilter(ep)); terr != nil {
		return nil, fmt.Errorf("network NIC: %s", terr)
	}
	if terr := s.AddProtocolAddress(nicID, tcpip.ProtocolAddress{
		Protocol:          ipv4.ProtocolNumber,
		AddressWithPrefix: tcpip.AddrFrom4(GatewayIP.As4()).WithPrefix(),
	}, stack.AddressProperties{}); terr != nil {
		return nil, fmt.Errorf("network address: %s", terr)
	}
	// Spoofing and promiscuous mode make the stack take every packet the
	// guest sends, whatever its destination: that is what lets the
	// forwarders see (and rule on) connections to the whole Internet.
	s.SetSpoofing(nicID, true)
	s.SetPromiscuousMode(nicID, true)
	sub, _ := tcpip.NewSubnet(tcpip.AddrFrom4(Subnet.Addr().As4()), tcpip.MaskFromBytes(net.CIDRMask(Subnet.Bits(), 32)))
	s.SetRouteTable([]tcpip.Route{{Destination: sub, NIC: nicID}})

	n := &Network{stack: s, link: ep, log: logger, dial: dial, policy: policy, forwards: make(map[int]*forward)}
	s.SetTransportProtocolHandler(tcp.ProtocolNumber, tcp.NewForwarder(s, 0, 64, n.forwardTCP).HandlePacket)
	s.SetTransportProtocolHandler(udp.ProtocolNumber, udp.NewForwarder(s, n.forwardUDP).HandlePacket)
	if err := n.serveDNS(); err != nil {
		s.Close()
		return nil, err
	}
	return n, nil
}

// echoFilter drops ICMP from the guest unless it is for the gateway. In
// promiscuous mode gVisor takes every destination as its own and answers
// pings for all of them, so `ping` would report any address, the metadata
// one included, as reachable although nothing leaves the host. ICMP is not
// forwarded; the gateway still answers.
type echoFilter struct{ nested.Endpoint }

func newEchoFilter(child stack.LinkEndpoint) *echoFilter {
	f := &echoFilter{}
	f.Endpoint.Init(child, f)
	return f
}

var gatewayAddr = tcpip.AddrFrom4(GatewayIP.As4())

func (f *echoFilter) DeliverNetworkPacket(proto tcpip.NetworkProtocolNumber, pkt *stack.PacketBuffer) {
	if proto == header.IPv4ProtocolNumber {
		if b, ok := pkt.Data().PullUp(header.IPv4MinimumSize); ok {
			ip := header.IPv4(b)
			if ip.Protocol() == uint8(header.ICMPv4ProtocolNumber) && ip.DestinationAddress() != gatewayAddr {
				return
			}
		}
	}
	f.Endpoint.DeliverNetworkPacket(proto, pkt)
}

// ServeQEMU carries the guest's frames over conn, in QEMU's stream netdev
// framing (a 32-bit big-endian length before each frame), until conn
// closes or ctx ends.
func (n *Network) ServeQEMU(ctx context.Context, conn net.Conn) error {
	return n.link.serve(ctx, conn)
}

// Policy is the policy in force.
func (n *Network) Policy() Policy {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.policy
}

// SetPolicy replaces the policy for connections opened from now on.
func (n *Network) SetPolicy(p Policy) error {
	if err := p.Normalize(); err != nil {
		return err
	}
	if !p.Enabled() {
		return &FieldError{Field: "network.mode", Message: "a running network cannot be turned off; create the sandbox with mode \"off\""}
	}
	n.mu.Lock()
	n.policy = p
	n.mu.Unlock()
	return nil
}

// Close ends every forward and the stack.
func (n *Network) Close() {
	n.mu.Lock()
	n.closed = true
	for _, f := range n.forwards {
		f.ln.Close()
	}
	n.forwards = map[int]*forward{}
	n.mu.Unlock()
	n.stack.Close()
}

func (n *Network) decide(dst tcpip.Address) Verdict {
	a, ok := netip.AddrFromSlice(dst.AsSlice())
	if !ok {
		return Verdict{Reason: "not an IP address"}
	}
	host, ok := n.hostAddrs()
	if !ok {
		return Verdict{Reason: "the host's addresses cannot be read"}
	}
	return n.Policy().Decide(a, host)
}

// hostAddrs are the host's own addresses, read again at most every
// hostAddrsTTL so an interface that comes up later is covered too. When
// they cannot be read, and none were read before, ok is false and every
// connection is refused: failing open would let the guest reach the host.
func (n *Network) hostAddrs() (addrs []netip.Addr, ok bool) {
	n.addrsMu.Lock()
	defer n.addrsMu.Unlock()
	if time.Since(n.addrsAt) < hostAddrsTTL && n.addrs != nil {
		return n.addrs, true
	}
	ifaddrs, err := net.InterfaceAddrs()
	if err != nil {
		return n.addrs, n.addrs != nil
	}
	out := make([]netip.Addr, 0, len(ifaddrs))
	for _, a := range ifaddrs {
		if p, err := netip.ParsePrefix(a.String()); err == nil {
			out = append(out, p.Addr().Unmap())
		}
	}
	n.addrs, n.addrsAt = out, time.Now()
	return out, true
}

const hostAddrsTTL = time.Second

// Limits on what one guest can make the host hold for it: each TCP
// connection is a host socket and two copy buffers, each UDP flow a host
// socket and two 64 KiB buffers for up to udpIdle.
const (
	maxTCPConns = 1024
	maxUDPFlows = 256
)

// admit counts one more flow in c unless that would pass limit.
func isTimeout(err error) bool {
	var ne net.Error
	return errors.Is(err, context.DeadlineExceeded) || (errors.As(err, &ne) && ne.Timeout())
}

func admit(c *atomic.Int64, limit int64) bool {
	if c.Add(1) > limit {
		c.Add(-1)
		return false
	}
	return true
}

func (n *Network) forwardTCP(r *tcp.ForwarderRequest) {
	id := r.ID()
	v := n.decide(id.LocalAddress)
	if !v.Allowed || !admit(&n.tcpConns, maxTCPConns) {
		n.refused.Add(1)
		r.Complete(true) // a reset: the guest sees "connection refused" at once
		return
	}
	defer n.tcpConns.Add(-1)
	// The guest's handshake completes only once the host's has: the guest
	// sees the real outcome, not a connection that dies after "success".
	ctx, cancel := context.WithTimeout(context.Background(), dialTimeout)
	out, err := n.dial(ctx, "tcp", netip.AddrPortFrom(v.Dial, id.LocalPort).String())
	cancel()
	if err != nil {
		// A destination that never answered gets no answer either, and
		// the guest times out as it would have; anything else (refused,
		// unreachable) is a reset, which the guest reports at once.
		r.Complete(!isTimeout(err))
		return
	}
	var wq waiter.Queue
	ep, terr := r.CreateEndpoint(&wq)
	r.Complete(false)
	if terr != nil {
		out.Close()
		return
	}
	pipe(gonet.NewTCPConn(&wq, ep), out)
}

func (n *Network) forwardUDP(r *udp.ForwarderRequest) {
	id := r.ID()
	v := n.decide(id.LocalAddress)
	if !v.Allowed || !admit(&n.udpFlows, maxUDPFlows) {
		n.refused.Add(1)
		return
	}
	var wq waiter.Queue
	ep, terr := r.CreateEndpoint(&wq)
	if terr != nil {
		n.udpFlows.Add(-1)
		return
	}
	target := netip.AddrPortFrom(v.Dial, id.LocalPort).String()
	p, _ := forwarder.NewUDPProxy(&idleUDP{gonet.NewUDPConn(&wq, ep)}, func() (net.Conn, error) {
		ctx, cancel := context.WithTimeout(context.Background(), dialTimeout)
		defer cancel()
		return n.dial(ctx, "udp", target)
	})
	go func() {
		defer n.udpFlows.Add(-1)
		p.Run()
		p.Close()
	}()
}

// idleUDP ends a UDP flow's proxy once the flow has been quiet for udpIdle.
type idleUDP struct{ *gonet.UDPConn }

func (c *idleUDP) ReadFrom(b []byte) (int, net.Addr, error) {
	c.SetReadDeadline(time.Now().Add(udpIdle))
	return c.UDPConn.ReadFrom(b)
}

// WriteTo counts replies as use too, so a flow that only receives lives.
func (c *idleUDP) WriteTo(b []byte, addr net.Addr) (int, error) {
	c.SetReadDeadline(time.Now().Add(udpIdle))
	return c.UDPConn.WriteTo(b, addr)
}

// serveDNS answers the guest's lookups on the gateway: names under
// smolvm.internal locally, the rest through the host's resolver.
func (n *Network) serveDNS() error {
	addr := tcpip.FullAddress{NIC: nicID, Addr: tcpip.AddrFrom4(GatewayIP.As4()), Port: 53}
	uc, err := gonet.DialUDP(n.stack, &addr, nil, ipv4.ProtocolNumber)
	if err != nil {
		return fmt.Errorf("dns: %w", err)
	}
	tl, err := gonet.ListenTCP(n.stack, addr, ipv4.ProtocolNumber)
	if err != nil {
		uc.Close()
		return fmt.Errorf("dns: %w", err)
	}
	// Each lookup the host resolves holds a goroutine until it is
	// answered, and the guest decides how many there are: pace them, and
	// bound the TCP connections to the resolver.
	paced := &pacedConn{PacketConn: uc, lim: rate.NewLimiter(dnsRate, dnsBurst)}
	srv, err := dns.New(paced, netutil.LimitListener(tl, dnsTCPConns), []types.Zone{{
		Name: "smolvm.internal.",
		Records: []types.Record{
			{Name: "host", IP: net.IP(HostIP.AsSlice())},
			{Name: "gateway", IP: net.IP(GatewayIP.AsSlice())},
		},
	}})
	if err != nil {
		return fmt.Errorf("dns: %w", err)
	}
	go srv.Serve()
	go srv.ServeTCP()
	return nil
}

// Limits on the guest's DNS traffic to the gateway.
const (
	dnsRate     = 500 // lookups a second, on average
	dnsBurst    = 100
	dnsTCPConns = 16
)

// pacedConn reads no faster than its limiter allows; what the guest sends
// faster waits in the stack's receive buffer, and is dropped when it is full.
type pacedConn struct {
	net.PacketConn
	lim *rate.Limiter
}

func (c *pacedConn) ReadFrom(b []byte) (int, net.Addr, error) {
	c.lim.Wait(context.Background())
	return c.PacketConn.ReadFrom(b)
}

// Forwards lists the ports exposed, by guest port.
func (n *Network) Forwards() []Forward {
	n.mu.Lock()
	defer n.mu.Unlock()
	out := make([]Forward, 0, len(n.forwards))
	for _, f := range n.forwards {
		out = append(out, f.Forward)
	}
	sortForwards(out)
	return out
}

// Error codes of Expose and Unexpose, as in the API.
var (
	ErrPortInUse       = errors.New("port_in_use")
	ErrAlreadyExposed  = errors.New("port_already_exposed")
	ErrNotExposed      = errors.New("port_not_exposed")
	ErrBadHostAddress  = errors.New("invalid_host_address")
	ErrPortNeedsRights = errors.New("port_forbidden")
)

// PortError is an Expose or Unexpose failure with a stable code (Code is
// one of the Err values above).
type PortError struct {
	Code    error
	Message string
}

func (e *PortError) Error() string { return e.Message }
func (e *PortError) Unwrap() error { return e.Code }

// Expose listens on f's host address and port and carries each connection
// to the guest's port. Host port 0 picks a free port; the forward returned
// has the one picked.
func (n *Network) Expose(f Forward) (Forward, error) {
	if err := f.Normalize(); err != nil {
		return f, err
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.closed {
		return f, errors.New("the network is closed")
	}
	if old, ok := n.forwards[f.Guest]; ok {
		return f, &PortError{ErrAlreadyExposed, fmt.Sprintf("guest port %d is already exposed on %s", f.Guest, old.Listen())}
	}
	ln, err := net.Listen("tcp", f.Listen())
	if err != nil {
		return f, listenError(f, err)
	}
	f.Host = ln.Addr().(*net.TCPAddr).Port
	fw := &forward{Forward: f, ln: ln}
	n.forwards[f.Guest] = fw
	go n.acceptLoop(fw)
	return f, nil
}

func listenError(f Forward, err error) error {
	switch {
	case errors.Is(err, syscall.EADDRINUSE):
		return &PortError{ErrPortInUse, fmt.Sprintf("host port %d on %s is already in use: pick another, or 0 for a free one", f.Host, f.HostAddress)}
	case errors.Is(err, syscall.EADDRNOTAVAIL):
		return &PortError{ErrBadHostAddress, fmt.Sprintf("host_address %s is not an address of this machine", f.HostAddress)}
	case errors.Is(err, syscall.EACCES):
		return &PortError{ErrPortNeedsRights, fmt.Sprintf("host port %d needs privileges smolvm does not have: use a port above 1023", f.Host)}
	}
	// Whatever else the kernel refuses to bind (an IPv6 address on a host
	// without IPv6, a link-local one without a zone) is the address's fault.
	return &PortError{ErrBadHostAddress, fmt.Sprintf("cannot listen on %s: %v", f.Listen(), err)}
}

// Unexpose stops forwarding the guest's port; connections already made
// through it are left to finish.
func (n *Network) Unexpose(guest int) (Forward, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	fw, ok := n.forwards[guest]
	if !ok {
		return Forward{}, &PortError{ErrNotExposed, fmt.Sprintf("guest port %d is not exposed", guest)}
	}
	delete(n.forwards, guest)
	fw.ln.Close()
	return fw.Forward, nil
}

func (n *Network) acceptLoop(fw *forward) {
	target := tcpip.FullAddress{NIC: nicID, Addr: tcpip.AddrFrom4(GuestIP.As4()), Port: uint16(fw.Guest)}
	for {
		c, err := fw.ln.Accept()
		if errors.Is(err, net.ErrClosed) {
			return // by Unexpose or Close
		}
		if err != nil {
			// Out of descriptors, say: the forward must outlive it.
			time.Sleep(50 * time.Millisecond)
			continue
		}
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), dialTimeout)
			defer cancel()
			g, err := gonet.DialContextTCP(ctx, n.stack, target, ipv4.ProtocolNumber)
			if err != nil {
				n.log.Printf("forward %s -> guest:%d: %v", fw.Listen(), fw.Guest, err)
				c.Close()
				return
			}
			pipe(c, g)
		}()
	}
}

type closeWriter interface{ CloseWrite() error }

// pipe copies both ways until both sides are done, passing on each side's
// end of stream as a half-close so protocols that rely on it still work.
func pipe(a, b net.Conn) {
	var wg sync.WaitGroup
	cp := func(dst, src net.Conn) {
		defer wg.Done()
		_, err := io.Copy(dst, src)
		if err != nil {
			// A reset or a failed write: nothing more will pass either way.
			dst.Close()
			src.Close()
			return
		}
		if cw, ok := dst.(closeWriter); ok {
			cw.CloseWrite()
		} else {
			dst.Close()
		}
	}
	wg.Add(2)
	go cp(a, b)
	go cp(b, a)
	wg.Wait()
	a.Close()
	b.Close()
}

func sortForwards(fs []Forward) {
	slices.SortFunc(fs, func(a, b Forward) int { return a.Guest - b.Guest })
}

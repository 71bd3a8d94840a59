package firecracker

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"runtime"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/smolvm/smolvm/internal/jail"
)

// The relay joins a guest's NIC to its network process. Firecracker's
// only network backend is a TAP device, which it opens by name in its
// own network namespace and holds; the network process (smolvm-net)
// listens on a Unix stream socket that carries Ethernet frames, each
// after its length as 4 bytes big-endian. The relay, in between, reads
// and writes the TAP device's host side, where the frames Firecracker
// writes arrive and from where frames reach Firecracker, through a
// packet socket bound to the device in that namespace. The namespace's
// own kernel has no address on the device and no IPv6, so nothing else
// talks on the link.
//
// Firecracker offers the guest checksum and segmentation offloads, and
// TAP devices pass them on: a packet socket with PACKET_VNET_HDR says,
// per frame, what the guest left undone (see fromGuest). Frames toward
// the guest are complete already and go with an empty header.

// RelayConfig is one relay.
type RelayConfig struct {
	// NetNS is a path naming the network namespace of the TAP device
	// (/proc/PID/ns/net).
	NetNS string
	// Tap is the device's name in it.
	Tap string
	// Socket is the network process's listening stream socket.
	Socket string
	// PID, when not 0, is the VM's process: the relay ends with it.
	PID int
	// UID, when not 0, is the user the relay runs as once its socket and
	// device are open.
	UID int
	// Ready, when set, is written "ready\n" and closed once the relay is
	// set up.
	Ready io.WriteCloser
}

// RelayMain relays frames between the TAP device tapName in the network
// namespace netnsPath and the stream socket socketPath until ctx ends or
// either side closes.
func RelayMain(ctx context.Context, netnsPath, tapName, socketPath string) error {
	return Relay(ctx, RelayConfig{NetNS: netnsPath, Tap: tapName, Socket: socketPath})
}

// relayMain is the tap-relay subcommand.
func relayMain(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet(RelayCommand, flag.ContinueOnError)
	var c RelayConfig
	fs.StringVar(&c.NetNS, "netns", "", "the network namespace holding the TAP device (a path)")
	fs.StringVar(&c.Tap, "tap", "", "the TAP device")
	fs.StringVar(&c.Socket, "socket", "", "the network process's stream socket")
	fs.IntVar(&c.PID, "pid", 0, "end when this process does")
	fs.IntVar(&c.UID, "uid", 0, "the user to run as once set up")
	ready := fs.Int("ready-fd", 0, "a descriptor to write \"ready\" to once set up")
	fs.String("tag", "", "the VM's marker (names the process)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if c.NetNS == "" || c.Tap == "" || c.Socket == "" || fs.NArg() > 0 {
		return fmt.Errorf("usage: %s --netns=PATH --tap=NAME --socket=PATH [--pid=N] [--uid=N] [--ready-fd=N]", RelayCommand)
	}
	if *ready > 0 {
		c.Ready = os.NewFile(uintptr(*ready), "ready")
	}
	return Relay(ctx, c)
}

// Relay runs one relay until ctx ends, the network process closes the
// stream, the VM's process ends, or an error.
func Relay(ctx context.Context, c RelayConfig) error {
	pkt, err := openPacket(c.NetNS, c.Tap)
	if err != nil {
		return err
	}
	defer pkt.Close()
	conn, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: c.Socket, Net: "unix"})
	if err != nil {
		return fmt.Errorf("relay: connect to the network process: %w", err)
	}
	defer conn.Close()
	pidfd := -1
	if c.PID > 0 {
		if pidfd, err = unix.PidfdOpen(c.PID, 0); err != nil {
			return fmt.Errorf("relay: watch process %d: %w", c.PID, err)
		}
		defer unix.Close(pidfd)
	}
	if c.UID != 0 {
		// Everything it needs is open.
		if err := jail.DropTo(c.UID); err != nil {
			return fmt.Errorf("relay: %w", err)
		}
	}
	if c.Ready != nil {
		_, err := c.Ready.Write([]byte("ready\n"))
		c.Ready.Close()
		if err != nil {
			return fmt.Errorf("relay: say ready: %w", err)
		}
	}
	ctx, cancel := context.WithCancel(ctx)
	var r relay
	errc := make(chan error, 3)
	go func() { errc <- r.fromTap(pkt, conn) }()
	go func() { errc <- r.toTap(conn, pkt, c.Tap) }()
	if pidfd >= 0 {
		watched := make(chan struct{})
		go func() {
			defer close(watched)
			errc <- waitPidfd(ctx, pidfd)
		}()
		// The descriptor is closed (deferred above) only once the watch
		// is over.
		defer func() { <-watched }()
	}
	defer cancel()
	select {
	case err = <-errc:
	case <-ctx.Done():
	}
	if n := r.dropped.Load(); n > 0 {
		slog.Warn("relay: frames dropped", "count", n)
	}
	if errors.Is(err, io.EOF) || errors.Is(err, errProcessGone) {
		return nil
	}
	return err
}

// relay counts what it could not carry.
type relay struct {
	dropped atomic.Int64
}

// errProcessGone means the VM's process ended.
var errProcessGone = errors.New("the VM process ended")

// waitPidfd returns errProcessGone once the process behind pidfd ends.
func waitPidfd(ctx context.Context, pidfd int) error {
	fds := []unix.PollFd{{Fd: int32(pidfd), Events: unix.POLLIN}}
	for ctx.Err() == nil {
		n, err := unix.Poll(fds, 100)
		if err != nil && !errors.Is(err, unix.EINTR) {
			return fmt.Errorf("relay: watch the VM process: %w", err)
		}
		if n > 0 {
			return errProcessGone
		}
	}
	return ctx.Err()
}

// vnetHdrLen is the size of struct virtio_net_hdr, which precedes every
// frame on a packet socket with PACKET_VNET_HDR.
const vnetHdrLen = 10

// maxFrame is the largest Ethernet frame either way: the TAP's MTU and
// the Ethernet header.
const maxFrame = tapMTU + 14

// openPacket opens a packet socket on the device tap in the network
// namespace at netns, with virtio-net headers, that sees neither what it
// sends itself nor any other device.
func openPacket(netns, tap string) (*os.File, error) {
	type result struct {
		fd  int
		err error
	}
	ch := make(chan result, 1)
	go func() {
		// The thread enters the namespace and never leaves: a goroutine
		// that ends locked takes its thread with it. A socket stays in
		// the namespace it was made in.
		runtime.LockOSThread()
		fd, err := packetIn(netns, tap)
		ch <- result{fd, err}
	}()
	r := <-ch
	if r.err != nil {
		return nil, fmt.Errorf("relay: %w", r.err)
	}
	return os.NewFile(uintptr(r.fd), "tap "+tap), nil
}

func packetIn(netns, tap string) (fd int, err error) {
	ns, err := unix.Open(netns, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("network namespace: %w", err)
	}
	defer unix.Close(ns)
	if err := unix.Setns(ns, unix.CLONE_NEWNET); err != nil {
		return -1, fmt.Errorf("enter network namespace %s: %w", netns, err)
	}
	// Protocol 0 until bound: no frame of another device comes in first.
	s, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, 0)
	if err != nil {
		return -1, fmt.Errorf("packet socket: %w", err)
	}
	defer func() {
		if err != nil {
			unix.Close(s)
		}
	}()
	ifr, err := unix.NewIfreq(tap)
	if err != nil {
		return -1, err
	}
	if err := unix.IoctlIfreq(s, unix.SIOCGIFINDEX, ifr); err != nil {
		return -1, fmt.Errorf("device %s: %w", tap, err)
	}
	if err := unix.SetsockoptInt(s, unix.SOL_PACKET, unix.PACKET_VNET_HDR, 1); err != nil {
		return -1, fmt.Errorf("packet socket: virtio-net headers: %w", err)
	}
	if err := unix.SetsockoptInt(s, unix.SOL_PACKET, unix.PACKET_IGNORE_OUTGOING, 1); err != nil {
		return -1, fmt.Errorf("packet socket: ignore outgoing: %w", err)
	}
	// Room for bursts from a fast guest; past this the kernel drops.
	if unix.SetsockoptInt(s, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, 4<<20) != nil {
		unix.SetsockoptInt(s, unix.SOL_SOCKET, unix.SO_RCVBUF, 4<<20)
	}
	addr := &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: int(ifr.Uint32())}
	if err := unix.Bind(s, addr); err != nil {
		return -1, fmt.Errorf("bind to %s: %w", tap, err)
	}
	return s, nil
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// fromTap carries what the guest sends to the stream.
func (r *relay) fromTap(pkt *os.File, conn net.Conn) error {
	buf := make([]byte, vnetHdrLen+maxFrame)
	out := make([]byte, 4+maxFrame)
	emit := func(frame []byte) error {
		binary.BigEndian.PutUint32(out, uint32(len(frame)))
		n := copy(out[4:], frame)
		_, err := conn.Write(out[:4+n])
		return err
	}
	for {
		n, err := pkt.Read(buf)
		if err != nil {
			return fmt.Errorf("relay: read from the TAP device: %w", err)
		}
		if n < vnetHdrLen+14 {
			continue
		}
		var werr error
		err = fromGuest(parseVnetHdr(buf[:vnetHdrLen]), buf[vnetHdrLen:n], func(f []byte) error {
			if werr == nil {
				werr = emit(f)
			}
			return werr
		})
		if werr != nil {
			return fmt.Errorf("relay: write to the network process: %w", werr)
		}
		if err != nil {
			// A frame the relay cannot finish is lost, as on a wire.
			if r.dropped.Add(1) == 1 {
				slog.Warn("relay: dropped a frame from the guest", "err", err)
			}
		}
	}
}

// toTap carries what the network process sends to the guest.
func (r *relay) toTap(conn net.Conn, pkt *os.File, tap string) error {
	br := bufio.NewReaderSize(conn, 256<<10)
	// The virtio-net header stays zero: the frame is complete.
	buf := make([]byte, vnetHdrLen+maxFrame)
	var lenb [4]byte
	running := false
	for {
		if _, err := io.ReadFull(br, lenb[:]); err != nil {
			if errors.Is(err, io.ErrUnexpectedEOF) {
				return fmt.Errorf("relay: the network process closed the link mid-frame")
			}
			return err // io.EOF: it closed the link
		}
		n := binary.BigEndian.Uint32(lenb[:])
		if n == 0 || n > maxFrame {
			return fmt.Errorf("relay: a frame of %d bytes from the network process (at most %d)", n, maxFrame)
		}
		if _, err := io.ReadFull(br, buf[vnetHdrLen:vnetHdrLen+n]); err != nil {
			return fmt.Errorf("relay: read a frame from the network process: %w", err)
		}
		if !running {
			running = waitRunning(pkt, tap, runningWait)
		}
		if _, err := pkt.Write(buf[:vnetHdrLen+n]); err != nil {
			// A full queue toward Firecracker, or no Firecracker holding
			// the device yet: the frame is lost, as on a wire.
			if errors.Is(err, unix.ENOBUFS) || errors.Is(err, unix.ENETDOWN) {
				r.dropped.Add(1)
				continue
			}
			return fmt.Errorf("relay: write to the TAP device: %w", err)
		}
	}
}

// runningWait bounds how long a frame toward the guest waits for the TAP
// device to run.
const runningWait = 2 * time.Second

// waitRunning waits up to d until the TAP device runs. When Firecracker
// attaches to it, the kernel activates the device's transmit queue
// asynchronously (link watch, under the RTNL lock, so later on a busy
// host), and until then drops what is sent through it while reporting
// success: the first frames toward a guest that has just started (or
// been restored) would be lost.
func waitRunning(pkt *os.File, tap string, d time.Duration) bool {
	rc, err := pkt.SyscallConn()
	if err != nil {
		return false
	}
	deadline := time.Now().Add(d)
	for {
		var flags uint16
		rc.Control(func(fd uintptr) {
			ifr, err := unix.NewIfreq(tap)
			if err == nil && unix.IoctlIfreq(int(fd), unix.SIOCGIFFLAGS, ifr) == nil {
				flags = ifr.Uint16()
			}
		})
		if flags&unix.IFF_RUNNING != 0 {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// relayReadyTimeout bounds how long the driver waits for a relay to say
// it is set up.
const relayReadyTimeout = 10 * time.Second

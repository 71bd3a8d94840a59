package agent_test

import (
	"context"
	"errors"
	"net"
	"os"
	"testing"
	"time"

	"github.com/mdlayher/vsock"
	"golang.org/x/sys/unix"

	"github.com/smolvm/smolvm/internal/agent"
	"github.com/smolvm/smolvm/internal/agent/wire"
)

// Where the guest has no virtio-serial port (Firecracker, libkrun), the
// agent listens on vsock.
func TestListenerWithoutSerialIsVsock(t *testing.T) {
	t.Parallel()
	if _, err := os.Stat("/dev/vsock"); err != nil {
		t.Skip("this kernel has no /dev/vsock")
	}
	l, err := agent.ListenWithoutSerial(2*time.Second, testVsockPort(1))
	if err != nil {
		t.Fatalf("the agent's listener without a serial port: %v", err)
	}
	defer l.Close()
	if _, ok := l.(*vsock.Listener); !ok {
		t.Fatalf("listener is a %T, want vsock", l)
	}
}

// testVsockPort is a port of this test process's own: the agent's may be
// taken on a host that is itself a guest.
func testVsockPort(n uint32) uint32 { return 40000 + uint32(os.Getpid()%10000)*2 + n }

// The agent speaks the same handshake and API over vsock. Connecting
// needs a kernel with vsock's loopback transport, which lets this host
// reach its own vsock ports; without it there is nothing to connect
// through, and the test says so.
func TestAgentOverVsock(t *testing.T) {
	t.Parallel()
	if _, err := os.Stat("/dev/vsock"); err != nil {
		t.Skip("this kernel has no /dev/vsock")
	}
	port := testVsockPort(0)
	l, err := agent.ListenWithoutSerial(2*time.Second, port)
	if err != nil {
		t.Fatalf("the agent's listener without a serial port: %v", err)
	}
	if _, ok := l.(*vsock.Listener); !ok {
		l.Close()
		t.Fatalf("listener is a %T, want vsock", l)
	}
	serveOn(t, l, &recordingSystem{}, "vsock-test")
	ctx := testCtx(t)
	dial := func(ctx context.Context) (net.Conn, error) { return vsock.Dial(vsock.Local, port, nil) }
	probe, err := dial(ctx)
	// Without the loopback transport a connection to the local CID goes
	// nowhere: refused at once, or (through a guest's virtio transport,
	// as on these machines) timed out.
	if errors.Is(err, unix.ENODEV) || errors.Is(err, unix.EAFNOSUPPORT) || errors.Is(err, unix.ENETUNREACH) || errors.Is(err, unix.ETIMEDOUT) {
		t.Skipf("this kernel has no vsock loopback transport (vsock_loopback) to connect through: %v", err)
	}
	if err != nil {
		t.Fatalf("dial vsock port %d: %v", port, err)
	}
	probe.Close()
	c := dialClient(t, dial)
	if p := c.Peer(); p.Version != wire.Version || !p.Has(wire.CapProcess) {
		t.Errorf("peer over vsock = %+v", p)
	}
	info, err := c.Ping(testCtx(t))
	if err != nil || info.Hostname != "vsock-test" {
		t.Fatalf("ping over vsock: %+v %v", info, err)
	}
}

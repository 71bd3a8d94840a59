package agent

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/vishvananda/netlink"
)

// netParams configure eth0, from smolvm.net=ADDR/BITS,GATEWAY,MTU on the
// kernel command line. The gateway also answers DNS.
type netParams struct {
	addr    netip.Prefix
	gateway netip.Addr
	mtu     int
}

func parseNetParam(v string) (*netParams, error) {
	f := strings.Split(v, ",")
	if len(f) != 3 {
		return nil, fmt.Errorf("smolvm.net=%q: want ADDR/BITS,GATEWAY,MTU", v)
	}
	p := &netParams{}
	var err error
	if p.addr, err = netip.ParsePrefix(f[0]); err != nil {
		return nil, fmt.Errorf("smolvm.net address: %w", err)
	}
	if p.gateway, err = netip.ParseAddr(f[1]); err != nil {
		return nil, fmt.Errorf("smolvm.net gateway: %w", err)
	}
	if p.mtu, err = strconv.Atoi(f[2]); err != nil || p.mtu < 576 || p.mtu > 65535 {
		return nil, fmt.Errorf("smolvm.net MTU %q: want 576 to 65535", f[2])
	}
	return p, nil
}

// configureNetwork brings eth0 up with a static address and default route
// through the host's gateway, before any command runs. There is no DHCP
// client in the guest: the host decides the addressing and says so on the
// command line.
func configureNetwork(p *netParams) error {
	var link netlink.Link
	var err error
	// The virtio-net driver has been loaded; its device registers almost
	// at once, but not necessarily before this runs.
	for deadline := time.Now().Add(5 * time.Second); ; {
		if link, err = netlink.LinkByName("eth0"); err == nil {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("no eth0: %w", err)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err := netlink.LinkSetMTU(link, p.mtu); err != nil {
		return fmt.Errorf("eth0 MTU %d: %w", p.mtu, err)
	}
	addr := &netlink.Addr{IPNet: &net.IPNet{IP: p.addr.Addr().AsSlice(), Mask: net.CIDRMask(p.addr.Bits(), 32)}}
	if err := netlink.AddrReplace(link, addr); err != nil {
		return fmt.Errorf("eth0 address %s: %w", p.addr, err)
	}
	// The network behind eth0 carries IPv4 alone. With IPv6 on, the
	// guest sends router solicitations, neighbour discovery and multicast
	// reports for seconds after the link comes up, to nobody, and a clone
	// of a template saved meanwhile carries on sending them. Loopback
	// keeps its ::1.
	if err := os.WriteFile("/proc/sys/net/ipv6/conf/eth0/disable_ipv6", []byte("1"), 0o644); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("eth0 without IPv6: %w", err)
	}
	if err := netlink.LinkSetUp(link); err != nil {
		return fmt.Errorf("eth0 up: %w", err)
	}
	route := &netlink.Route{LinkIndex: link.Attrs().Index, Gw: p.gateway.AsSlice()}
	if err := netlink.RouteReplace(route); err != nil {
		return fmt.Errorf("default route via %s: %w", p.gateway, err)
	}
	// The image's resolv.conf may be a link into a resolver daemon's
	// runtime directory, which nothing here runs.
	os.Remove("/etc/resolv.conf")
	return os.WriteFile("/etc/resolv.conf", []byte("nameserver "+p.gateway.String()+"\noptions timeout:2 attempts:2\n"), 0o644)
}

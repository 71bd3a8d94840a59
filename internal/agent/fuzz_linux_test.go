package agent

import (
	"strconv"
	"testing"
)

// FuzzNetParam: a smolvm.net value never panics the agent; one it accepts
// has an MTU the link takes, and written back in canonical form it parses
// to the same settings. (parseNetParam is Linux-only, as is this file.)
func FuzzNetParam(f *testing.F) {
	for _, s := range []string{
		"192.168.127.2/24,192.168.127.1,65520",
		"10.0.0.2/30,10.0.0.1,1500",
		"192.168.127.2/24,192.168.127.1",
		"192.168.127.2/24,192.168.127.1,1500,extra",
		"x/24,192.168.127.1,1500",
		"192.168.127.2/33,192.168.127.1,1500",
		"192.168.127.2/24,gw,1500",
		"192.168.127.2/24,192.168.127.1,575",
		"192.168.127.2/24,192.168.127.1,65536",
		"192.168.127.2/24,192.168.127.1,-1500",
		"192.168.127.2/24,192.168.127.1,+1500",
		"192.168.127.2/24,192.168.127.1,99999999999999999999",
		"fd00::2/64,fd00::1,1500",
		"::ffff:192.168.127.2/120,192.168.127.1,1500",
		"192.168.127.2%eth0/24,192.168.127.1,1500",
		"",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, v string) {
		p, err := parseNetParam(v)
		if err != nil {
			if p != nil {
				t.Fatalf("parseNetParam(%q) = %+v with error %v", v, p, err)
			}
			return
		}
		if p.mtu < 576 || p.mtu > 65535 || !p.addr.IsValid() || !p.gateway.IsValid() {
			t.Fatalf("parseNetParam(%q) = %+v", v, p)
		}
		canon := p.addr.String() + "," + p.gateway.String() + "," + strconv.Itoa(p.mtu)
		q, err := parseNetParam(canon)
		if err != nil || *q != *p {
			t.Fatalf("parseNetParam(%q) = %+v, but its canonical form %q parses to %+v, %v", v, p, canon, q, err)
		}
	})
}

package agent

import "testing"

func TestParseNetParam(t *testing.T) {
	p, err := parseNetParam("192.168.127.2/24,192.168.127.1,65520")
	if err != nil || p.addr.String() != "192.168.127.2/24" || p.gateway.String() != "192.168.127.1" || p.mtu != 65520 {
		t.Fatalf("parse = %+v, %v", p, err)
	}
	for _, bad := range []string{"", "192.168.127.2/24,192.168.127.1", "x/24,192.168.127.1,1500", "192.168.127.2/24,gw,1500", "192.168.127.2/24,192.168.127.1,100", "192.168.127.2/24,192.168.127.1,70000"} {
		if _, err := parseNetParam(bad); err == nil {
			t.Errorf("parseNetParam(%q) accepted", bad)
		}
	}
}

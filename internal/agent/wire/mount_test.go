package wire

import (
	"strings"
	"testing"
)

func TestMountParamRoundTrip(t *testing.T) {
	t.Parallel()
	for _, m := range []Mount{
		{Tag: "m0", Path: "/mnt/data", ReadOnly: true},
		{Tag: "m1", Path: "/work"},
		{Tag: "m2", Path: "/home/user/my files:v2/100%/é\"q'\t\\x"},
		{Tag: "m3", Path: "/a=b,c+d@e~f_g-h.i"},
	} {
		p := m.Param()
		// One word on the kernel command line, and three fields after the key.
		if strings.ContainsAny(p, " \t\n\"") || strings.Count(p, ":") != 2 {
			t.Errorf("Param(%+v) = %q: not one word of three fields", m, p)
		}
		k, v, ok := strings.Cut(p, "=")
		if !ok || k != MountKey {
			t.Fatalf("Param(%+v) = %q: want %s=...", m, p, MountKey)
		}
		got, err := ParseMount(v)
		if err != nil {
			t.Errorf("ParseMount(%q): %v", v, err)
			continue
		}
		if got != m {
			t.Errorf("round trip of %+v gave %+v (via %q)", m, got, p)
		}
	}
	if got := (Mount{Tag: "m0", Path: "/mnt/a b", ReadOnly: true}).Param(); got != "smolvm.mount=m0:/mnt/a%20b:ro" {
		t.Errorf("Param = %q", got)
	}
}

func TestParseMountCleansAndRefuses(t *testing.T) {
	t.Parallel()
	if m, err := ParseMount("m0:/mnt//x/../y/:rw"); err != nil || m.Path != "/mnt/y" {
		t.Errorf("ParseMount of an unclean path: %+v, %v", m, err)
	}
	for _, bad := range []string{
		"", "m0", "m0:/x", "m0:/x:rw:extra", ":/x:rw", "m0:x:rw", "m0:/:ro", "m0:/x/..:ro",
		"m0:/x:RW", "m0:/x:", "m0:/x%zz:ro", "m0:/x%00y:ro", "m0:%2E%2E:ro",
	} {
		if m, err := ParseMount(bad); err == nil {
			t.Errorf("ParseMount(%q) accepted: %+v", bad, m)
		}
	}
}

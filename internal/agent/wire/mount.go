package wire

import (
	"fmt"
	"net/url"
	"path"
	"strings"
)

// MountKey is the kernel command line key of a share the agent mounts at
// boot: smolvm.mount=TAG:PATH:ro (or :rw), once per share.
const MountKey = "smolvm.mount"

// Mount is a 9p share the agent mounts at boot, after it switched root
// and before it serves the host.
type Mount struct {
	Tag      string // the 9p mount tag the host gave the device
	Path     string // absolute path in the guest, made if missing
	ReadOnly bool
}

// Param is m as a kernel command line parameter. The kernel splits its
// command line at spaces and the value at colons here, so the path is
// percent-encoded; the tag is used as it is and must be plain.
func (m Mount) Param() string {
	mode := "rw"
	if m.ReadOnly {
		mode = "ro"
	}
	return MountKey + "=" + m.Tag + ":" + escapePath(m.Path) + ":" + mode
}

// ParseMount reads the value of a smolvm.mount parameter.
func ParseMount(v string) (Mount, error) {
	f := strings.Split(v, ":")
	if len(f) != 3 {
		return Mount{}, fmt.Errorf("%s=%q: want TAG:PATH:ro|rw", MountKey, v)
	}
	m := Mount{Tag: f[0]}
	if m.Tag == "" {
		return Mount{}, fmt.Errorf("%s=%q: no tag", MountKey, v)
	}
	p, err := url.PathUnescape(f[1])
	if err != nil {
		return Mount{}, fmt.Errorf("%s=%q: path: %w", MountKey, v, err)
	}
	// Mounting over "/" would hide the root filesystem the agent runs from.
	if !path.IsAbs(p) || path.Clean(p) == "/" || strings.ContainsRune(p, 0) {
		return Mount{}, fmt.Errorf("%s=%q: path %q is not an absolute path below /", MountKey, v, p)
	}
	m.Path = path.Clean(p)
	switch f[2] {
	case "ro":
		m.ReadOnly = true
	case "rw":
	default:
		return Mount{}, fmt.Errorf("%s=%q: mode %q is neither ro nor rw", MountKey, v, f[2])
	}
	return m, nil
}

// escapePath percent-encodes every byte that is not plainly safe on a
// kernel command line or that would split the parameter's fields; the
// agent decodes it with url.PathUnescape.
func escapePath(p string) string {
	const hex = "0123456789ABCDEF"
	var b strings.Builder
	for i := 0; i < len(p); i++ {
		c := p[i]
		if 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || strings.IndexByte("/._~+,=@-", c) >= 0 {
			b.WriteByte(c)
			continue
		}
		b.WriteByte('%')
		b.WriteByte(hex[c>>4])
		b.WriteByte(hex[c&15])
	}
	return b.String()
}

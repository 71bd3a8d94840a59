package sandbox

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/smolvm/smolvm/internal/vmm"
)

// maxMounts bounds the host directories one sandbox may share.
const maxMounts = 8

// normalizeMounts resolves each mount's host path (symlinks included) and
// refuses one outside the roots the Manager was opened with, so a request
// cannot reach past them through a link.
func (m *Manager) normalizeMounts(req *CreateRequest, drv vmm.Driver) error {
	if len(req.Mounts) == 0 {
		return nil
	}
	if _, ok := drv.(vmm.DirSharer); !ok {
		return &Error{Kind: KindUnavailable, Code: "unsupported", Field: "mounts",
			Message: fmt.Sprintf("backend %s cannot share host directories with a guest", drv.Name())}
	}
	if len(req.Mounts) > maxMounts {
		return invalid("invalid_mount", "mounts", "at most %d mounts, got %d", maxMounts, len(req.Mounts))
	}
	seen := map[string]bool{}
	for i := range req.Mounts {
		mt := &req.Mounts[i]
		field := fmt.Sprintf("mounts[%d]", i)
		if err := checkGuestPath(field+".guest", mt.Guest); err != nil {
			return err
		}
		if seen[mt.Guest] {
			return invalid("invalid_mount", field+".guest", "guest path %s is mounted twice", mt.Guest)
		}
		seen[mt.Guest] = true
		if !filepath.IsAbs(mt.Host) {
			return invalid("invalid_mount", field+".host", "host path %q must be absolute", mt.Host)
		}
		resolved, err := filepath.EvalSymlinks(mt.Host)
		if err != nil {
			if errors.Is(err, os.ErrNotExist) {
				return invalid("mount_not_found", field+".host", "host directory %s does not exist", mt.Host)
			}
			return invalid("invalid_mount", field+".host", "host path %s: %v", mt.Host, err)
		}
		if !m.mountAllowed(resolved) {
			return &Error{Kind: KindForbidden, Code: "mount_not_allowed", Field: field + ".host",
				Message: fmt.Sprintf("host path %s (%s) is outside the directories this server may share: start it with --allow-mount DIR", mt.Host, resolved)}
		}
		st, err := os.Stat(resolved)
		if err != nil || !st.IsDir() {
			return invalid("invalid_mount", field+".host", "host path %s is not a directory", mt.Host)
		}
		mt.Host = resolved
	}
	return nil
}

// mountAllowed reports whether the resolved path p is one of the allowed
// roots or beneath one (each root resolved too).
func (m *Manager) mountAllowed(p string) bool {
	for _, root := range m.opts.AllowMounts {
		r, err := filepath.EvalSymlinks(root)
		if err != nil || !filepath.IsAbs(r) {
			continue
		}
		if p == r || strings.HasPrefix(p, strings.TrimSuffix(r, "/")+"/") {
			return true
		}
	}
	return false
}

// driverMounts are rec's mounts as the driver and the guest's command
// line take them.
func driverMounts(mounts []Mount) []vmm.Mount {
	out := make([]vmm.Mount, len(mounts))
	for i, mt := range mounts {
		out[i] = vmm.Mount{Tag: fmt.Sprintf("m%d", i), HostPath: mt.Host, GuestPath: mt.Guest, ReadOnly: mt.ReadOnly}
	}
	return out
}

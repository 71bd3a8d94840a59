package qemu

import "github.com/smolvm/smolvm/internal/vmm"

// ShareDirs marks the driver as one that shares host directories with a
// guest (virtio-9p; Spec.Mounts).
func (d *Driver) ShareDirs() {}

var _ vmm.DirSharer = (*Driver)(nil)

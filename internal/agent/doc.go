// Package agent is the guest side of smolvm: PID 1 inside every sandbox.
//
// It runs from the initramfs smolvm builds, loads the kernel modules it was
// given, mounts the sandbox disk, switches root into it, prepares the usual
// mounts, and then serves the host over one virtio-serial port: commands run
// in their own process groups, and one reaper owns every wait4 call so
// orphans never pile up as zombies. The image needs no init system.
package agent

package agent

import (
	"context"
	"time"

	"golang.org/x/sys/unix"
)

// Main runs the agent as PID 1. It never returns: on a fatal error it powers
// the VM off so the host sees the failure instead of a hung guest.
func Main() {
	if err := mountEarly(); err != nil {
		logf("boot failed: %v", err)
		poweroff()
	}
	params := readBootParams()
	sys := guestSystem{reset: params.resetToPowerOff}
	if params.probe == "poweroff" {
		// Benchmarks time a boot to this point as their baseline.
		sys.Poweroff()
	}
	if err := boot(params); err != nil {
		logf("boot failed: %v", err)
		sys.Poweroff()
	}
	group, err := setupCommandGroup(cgroupRoot)
	if err != nil {
		logf("commands run without limits: %v", err)
	}
	srv := NewServer(Options{System: sys, Hostname: params.hostname, ReapAll: true, Logf: logf, CommandGroup: group})
	for {
		l, err := listen(10 * time.Second)
		if err != nil {
			logf("%v", err)
			time.Sleep(time.Second)
			continue
		}
		if err := srv.Serve(context.Background(), l); err != nil {
			logf("serve: %v", err)
		}
		l.Close()
		time.Sleep(time.Second)
	}
}

func boot(p bootParams) error {
	if err := loadModules(); err != nil {
		return err
	}
	if err := switchRoot(p.rootFS); err != nil {
		return err
	}
	prepareRoot(p)
	// After the switch, so the mounts are in the sandbox's tree; a share
	// that fails is logged and left out, and the host sees it missing.
	mountShares(p)
	return nil
}

// guestSystem is the machine the agent is PID 1 of.
type guestSystem struct {
	// reset ends the VM with a reset instead of a power-off: VMMs with
	// no ACPI power button (Firecracker, libkrun) exit on a reset and
	// would only halt on a power-off.
	reset bool
}

func (g guestSystem) Poweroff() {
	if g.reset {
		unix.Sync()
		unix.Reboot(unix.LINUX_REBOOT_CMD_RESTART)
		select {}
	}
	poweroff()
}

func poweroff() {
	unix.Sync()
	unix.Reboot(unix.LINUX_REBOOT_CMD_POWER_OFF)
	select {}
}

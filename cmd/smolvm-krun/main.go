// Command smolvm-krun runs one sandbox's VM with libkrun. libkrun's
// krun_start_enter takes over the process that calls it and exits it when
// the guest powers off, so the libkrun driver (internal/vmm/libkrun) starts
// this helper per VM rather than calling libkrun itself.
//
// It loads libkrun with purego, so it builds with CGO_ENABLED=0 like the
// rest of smolvm; purego links the binary dynamically against the C
// library's dlopen, so it runs wherever libkrun itself can.
//
//	smolvm-krun -config DIR/krun.json [-lib /usr/lib64/libkrun.so.1] [-status-fd 3]
//
// The config is krunconf.Config as JSON. With its jail set, the helper,
// started as root in a mount namespace of its own, moves into a root of
// its own and drops root before it loads libkrun (jail.go). With
// -status-fd, the helper
// writes one line there: krunconf.Ready once libkrun has taken every
// setting, just before krun_start_enter, or krunconf.ErrorPrefix and the
// failure (naming the libkrun call that failed and its error number).
package main

import (
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/smolvm/smolvm/internal/vmm/libkrun/krunconf"
)

func main() {
	configPath := flag.String(krunconf.FlagConfig, "", "the VM's configuration (JSON)")
	libPath := flag.String(krunconf.FlagLibrary, "", "libkrun's shared library (default: libkrun.so.1, then libkrun.so, where the dynamic loader finds them)")
	statusFD := flag.Int(krunconf.FlagStatusFD, -1, "a descriptor to write one status line to")
	flag.Parse()
	if *configPath == "" || flag.NArg() > 0 {
		fmt.Fprintf(os.Stderr, "usage: smolvm-krun -%s FILE [-%s LIBRARY] [-%s FD]\n", krunconf.FlagConfig, krunconf.FlagLibrary, krunconf.FlagStatusFD)
		os.Exit(2)
	}
	var status *os.File
	if *statusFD >= 0 {
		status = os.NewFile(uintptr(*statusFD), "status")
	}
	fail := func(err error) {
		fmt.Fprintf(os.Stderr, "smolvm-krun: %v\n", err)
		if status != nil {
			// One line, whatever the error holds.
			line := strings.ReplaceAll(strings.TrimSpace(err.Error()), "\n", "; ")
			fmt.Fprintf(status, "%s%s\n", krunconf.ErrorPrefix, line)
		}
		os.Exit(1)
	}

	cfg, err := krunconf.Read(*configPath)
	if err != nil {
		fail(err)
	}
	if cfg.Jail != nil {
		if err := enterJail(cfg, *libPath); err != nil {
			fail(err)
		}
	}
	// libkrun writes to sockets (the agent's, the network's) from threads
	// of its own; a peer that goes away must be an EPIPE there, not a
	// SIGPIPE that ends the VM, as it is in the Rust programs libkrun is
	// made for (their runtime ignores SIGPIPE).
	signal.Ignore(syscall.SIGPIPE)

	lib, err := load(*libPath)
	if err != nil {
		fail(err)
	}
	ctx, err := configure(lib, cfg)
	if err != nil {
		fail(err)
	}
	if status != nil {
		fmt.Fprintln(status, krunconf.Ready)
		// libkrun must not hold the descriptor: the driver reads it to
		// its end to see this process exit before the VM runs.
		status.Close()
		status = nil
	}

	// Returns only if libkrun could not start the VM; once the guest runs,
	// libkrun exits the process when it powers off.
	rc := lib.startEnter(ctx)
	err = callError("krun_start_enter", rc)
	if err == nil {
		err = fmt.Errorf("krun_start_enter returned %d", rc)
	}
	// The driver has returned by now; the console log is where whoever
	// waits for the guest looks when it never answers.
	if f, ferr := os.OpenFile(cfg.Console, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600); ferr == nil {
		fmt.Fprintf(f, "\nsmolvm-krun: %v\n", err)
		f.Close()
	}
	fail(err)
}

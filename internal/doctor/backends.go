package doctor

import "fmt"

// Backend is one backend's state on this host.
type Backend struct {
	Name string
	// Reason says what the host lacks to run it; "" when it can.
	Reason string
	// Default is the backend a sandbox that names none gets.
	Default bool
}

// backendFix says how to get a backend that is missing.
func backendFix(name string) string {
	switch name {
	case "qemu":
		return "smolvm setup"
	case "firecracker":
		return "smolvm setup --backend firecracker --firecracker-bin PATH (a Firecracker release binary; needs a working /dev/kvm)"
	case "libkrun":
		return "install libkrun (libkrun.so.1) and put smolvm-krun beside smolvm (needs a working /dev/kvm)"
	}
	return ""
}

// BackendChecks reports each backend. One that is unavailable is a
// warning, not a failure: smolvm works as long as one backend does (the
// QEMU tool checks say when none does).
func BackendChecks(backends []Backend) []Check {
	var out []Check
	for _, b := range backends {
		c := Check{Name: "backend " + b.Name, Status: StatusOK, Detail: "available"}
		if b.Default {
			c.Detail = "available; the default on this host"
		}
		if b.Reason != "" {
			c.Status = StatusWarn
			c.Detail = fmt.Sprintf("unavailable: %s", b.Reason)
			c.Fix = backendFix(b.Name)
		}
		out = append(out, c)
	}
	return out
}

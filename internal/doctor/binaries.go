package doctor

import (
	"os"
	"os/exec"
	"path/filepath"
)

// Helper is one of the binaries smolvm runs besides itself.
type Helper struct {
	Name string // file name, e.g. "smolvm-agent"
	Env  string // variable that names it, e.g. "SMOLVM_AGENT"
	// InPath allows finding it in $PATH too; the agent is not looked up
	// there, as a stray copy would be copied into every guest.
	InPath  bool
	Purpose string
}

// The binaries scripts/setup.sh builds beside smolvm.
var (
	Agent   = Helper{Name: "smolvm-agent", Env: "SMOLVM_AGENT", Purpose: "runs as PID 1 in every guest"}
	Net     = Helper{Name: "smolvm-net", Env: "SMOLVM_NET", InPath: true, Purpose: "the network of every sandbox that has one"}
	Jail    = Helper{Name: "smolvm-jail", Env: "SMOLVM_JAIL", InPath: true, Purpose: "starts every VMM in its jail"}
	Helpers = []Helper{Agent, Net, Jail}
)

// Locate finds h: override if set, then $Env, then next to the running
// executable, then (if h.InPath) $PATH. It returns "" when none is a file.
func (h Helper) Locate(override string) string { return h.LocateBeside(override, "") }

// LocateBeside is Locate that also looks in the directory of sibling,
// another helper found (the helpers are built and installed together),
// after $Env.
func (h Helper) LocateBeside(override, sibling string) string {
	candidates := []string{override, os.Getenv(h.Env)}
	if sibling != "" {
		candidates = append(candidates, filepath.Join(filepath.Dir(sibling), h.Name))
	}
	if exe, err := os.Executable(); err == nil {
		candidates = append(candidates, filepath.Join(filepath.Dir(exe), h.Name))
	}
	if h.InPath {
		if p, err := exec.LookPath(h.Name); err == nil {
			candidates = append(candidates, p)
		}
	}
	for _, p := range candidates {
		if p == "" {
			continue
		}
		if st, err := os.Stat(p); err == nil && st.Mode().IsRegular() {
			return p
		}
	}
	return ""
}

func checkHelper(h Helper, override string) Check {
	c := Check{Name: h.Name}
	if p := h.Locate(override); p != "" {
		c.Status, c.Detail = StatusOK, p
		return c
	}
	c.Status = StatusMissing
	c.Detail = "not found next to smolvm or in $" + h.Env + " (" + h.Purpose + ")"
	c.Fix = "bash scripts/setup.sh"
	return c
}

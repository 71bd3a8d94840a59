package sandbox

import (
	"encoding/json"
	"fmt"
	"maps"
	"path"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/smolvm/smolvm/internal/store"
	"github.com/smolvm/smolvm/internal/vmm"
)

// config is what a sandbox was created with beyond the store's columns,
// kept as JSON in the record.
type config struct {
	Labels    map[string]string `json:"labels,omitempty"`
	Env       map[string]string `json:"env,omitempty"`
	TimeoutMS int64             `json:"timeout_ms,omitempty"`
	OnTimeout string            `json:"on_timeout,omitempty"`
	Snapshot  string            `json:"snapshot,omitempty"`
	Mounts    []Mount           `json:"mounts,omitempty"`
}

func readConfig(rec store.Record) config {
	var c config
	if rec.Config != "" {
		json.Unmarshal([]byte(rec.Config), &c) // written by writeConfig only
	}
	return c
}

func writeConfig(rec *store.Record, c config) {
	b, _ := json.Marshal(c)
	rec.Config = string(b)
	if string(b) == "{}" {
		rec.Config = ""
	}
}

func (c config) timeout() time.Duration { return time.Duration(c.TimeoutMS) * time.Millisecond }

var (
	nameRE     = regexp.MustCompile(`^[a-z0-9][a-z0-9-]{0,62}$`)
	labelKeyRE = regexp.MustCompile(`^[A-Za-z0-9]([A-Za-z0-9._/-]{0,62}[A-Za-z0-9])?$`)
	envKeyRE   = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)
)

// CheckName reports whether name can name a sandbox or a snapshot.
func CheckName(field, name string) error {
	if !nameRE.MatchString(name) {
		return invalid("invalid_name", field, "%s %q must be 1 to 63 characters of a-z, 0-9 and '-', starting with a letter or digit", field, name)
	}
	return nil
}

// CheckLabels reports whether labels can label a sandbox.
func CheckLabels(labels map[string]string) error {
	if len(labels) > 64 {
		return invalid("invalid_labels", "labels", "at most 64 labels, got %d", len(labels))
	}
	for _, k := range slices.Sorted(maps.Keys(labels)) {
		if !labelKeyRE.MatchString(k) {
			return invalid("invalid_labels", "labels", "label key %q must be 1 to 64 characters of letters, digits and ._/-, starting and ending with a letter or digit", k)
		}
		if len(labels[k]) > 256 || strings.ContainsAny(labels[k], "\x00\n") {
			return invalid("invalid_labels", "labels", "label %q: values are at most 256 characters on one line", k)
		}
	}
	return nil
}

// CheckEnv reports whether env can be a sandbox's environment.
func CheckEnv(env map[string]string) error {
	for _, k := range slices.Sorted(maps.Keys(env)) {
		if !envKeyRE.MatchString(k) {
			return invalid("invalid_env", "env", "environment variable name %q must be letters, digits and '_', not starting with a digit", k)
		}
		if strings.ContainsRune(env[k], 0) {
			return invalid("invalid_env", "env", "environment variable %s contains a NUL byte", k)
		}
	}
	return nil
}

// normalizeConfig checks the request's name, labels, environment, time
// limit and mounts.
func (m *Manager) normalizeConfig(req *CreateRequest, drv vmm.Driver) error {
	if req.Name != "" {
		if err := CheckName("name", req.Name); err != nil {
			return err
		}
		if strings.HasPrefix(req.Name, "vm-") {
			return invalid("invalid_name", "name", "name %q may not start with \"vm-\", which sandbox ids use", req.Name)
		}
	}
	if err := CheckLabels(req.Labels); err != nil {
		return err
	}
	if err := CheckEnv(req.Env); err != nil {
		return err
	}
	if req.Timeout < 0 || req.Timeout > MaxTimeout {
		return invalid("invalid_timeout", "timeout", "timeout must be between 1 second and %d seconds (24 h), got %.0f", int(MaxTimeout.Seconds()), req.Timeout.Seconds())
	}
	switch req.OnTimeout {
	case "":
		if req.Timeout > 0 {
			req.OnTimeout = OnTimeoutDelete
		}
	case OnTimeoutDelete:
		if req.Timeout == 0 {
			req.OnTimeout = "" // the default, with nothing to apply to
		}
	case OnTimeoutPause:
		if req.Timeout == 0 {
			return invalid("invalid_on_timeout", "on_timeout", "on_timeout \"pause\" needs a timeout")
		}
	default:
		return invalid("invalid_on_timeout", "on_timeout", "on_timeout must be \"delete\" or \"pause\", got %q", req.OnTimeout)
	}
	return m.normalizeMounts(req, drv)
}

// checkGuestPath refuses a guest path a mount cannot sit on.
func checkGuestPath(field, p string) error {
	if !path.IsAbs(p) || path.Clean(p) != p || p == "/" || strings.ContainsRune(p, 0) {
		return invalid("invalid_mount", field, "guest path %q must be an absolute, clean path other than /", p)
	}
	for _, sys := range []string{"/proc", "/sys", "/dev", "/run", "/tmp"} {
		if p == sys || strings.HasPrefix(p, sys+"/") {
			return invalid("invalid_mount", field, "guest path %q is under %s, which the guest mounts itself", p, sys)
		}
	}
	return nil
}

// labelsMatch reports whether labels hold every pair of want.
func labelsMatch(labels, want map[string]string) bool {
	for k, v := range want {
		if got, ok := labels[k]; !ok || got != v {
			return false
		}
	}
	return true
}

// ParseLabelFilter reads "k=v" into a filter pair.
func ParseLabelFilter(s string) (string, string, error) {
	k, v, ok := strings.Cut(s, "=")
	if !ok || k == "" {
		return "", "", invalid("invalid_label_filter", "label", "label filter %q must be key=value", s)
	}
	return k, v, nil
}

// envList is a sandbox's environment in a stable order, for the agent.
func envList(env map[string]string) []string {
	out := make([]string, 0, len(env))
	for _, k := range slices.Sorted(maps.Keys(env)) {
		out = append(out, fmt.Sprintf("%s=%s", k, env[k]))
	}
	return out
}

// applyConfig records what req asks beyond the columns on a new record.
func applyConfig(rec *store.Record, req CreateRequest) {
	rec.Name = req.Name
	c := config{Labels: req.Labels, Env: req.Env, TimeoutMS: req.Timeout.Milliseconds(),
		OnTimeout: req.OnTimeout, Snapshot: req.Snapshot, Mounts: req.Mounts}
	if req.Timeout > 0 {
		rec.Deadline = time.Now().Add(req.Timeout).UTC()
	}
	writeConfig(rec, c)
}

func nameTaken(name string) error {
	return &Error{Kind: KindConflict, Code: "name_taken", Field: "name",
		Message: fmt.Sprintf("a sandbox named %q exists already: pick another name or delete that one", name)}
}

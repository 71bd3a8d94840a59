package sandbox

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/smolvm/smolvm/internal/agent/agentpb"
	"github.com/smolvm/smolvm/internal/image"
	"github.com/smolvm/smolvm/internal/store"
)

// imageRecord is kept in each sandbox's directory: where its root came
// from (so Start can find the same base again) and how the image says to
// run commands.
type imageRecord struct {
	Source image.Source `json:"source"`
	Digest string       `json:"digest"`
	Config image.Config `json:"config"`
}

func imageRecordPath(dir string) string { return filepath.Join(dir, "image.json") }

func writeImageRecord(dir string, src image.Source, base *image.Base) error {
	b, err := json.Marshal(imageRecord{Source: src, Digest: base.Digest, Config: base.Config})
	if err != nil {
		return err
	}
	return os.WriteFile(imageRecordPath(dir), b, 0o644)
}

func readImageRecord(dir string) imageRecord {
	var r imageRecord
	if b, err := os.ReadFile(imageRecordPath(dir)); err == nil {
		json.Unmarshal(b, &r)
	}
	return r
}

func sourceOf(rec store.Record) image.Source { return readImageRecord(rec.Dir).Source }

// imageConfig is the image config of a sandbox, read from its directory
// once per process and then kept: every command needs it, and it never
// changes for the life of the sandbox.
func (m *Manager) imageConfig(rec store.Record) image.Config {
	m.mu.Lock()
	cfg, ok := m.configs[rec.ID]
	m.mu.Unlock()
	if ok {
		return cfg
	}
	cfg = readImageRecord(rec.Dir).Config
	// The sandbox's own environment goes over the image's; a command's
	// own goes over both.
	cfg.Env = append(append([]string(nil), cfg.Env...), envList(readConfig(rec).Env)...)
	m.mu.Lock()
	m.configs[rec.ID] = cfg
	m.mu.Unlock()
	return cfg
}

// applyImageConfig gives a command the image's environment, working
// directory and user, as a container runtime would.
func applyImageConfig(w *agentpb.ProcessConfig, cfg image.Config) {
	w.Env = append(append([]string(nil), cfg.Env...), w.Env...)
	w.DefaultCwd = cfg.WorkingDir
	if w.User == "" {
		w.User = cfg.User
	}
}

// imageName is what a sandbox reports as its image.
func imageName(req CreateRequest, base *image.Base) string {
	if req.Image != "" {
		return req.Image
	}
	if base.Ref != "" && base.Ref != req.OS {
		return base.Ref
	}
	return base.Name
}

// imageError maps the image layer's failures to the Manager's kinds: what
// the caller can fix is invalid input; a registry or store that failed us
// is an upstream error.
func imageError(src image.Source, err error) error {
	var ie *image.Error
	if !errors.As(err, &ie) {
		return fmt.Errorf("prepare image: %w", err)
	}
	field := "image"
	if src.Image == "" {
		field = "os"
	}
	kind := KindInvalid
	switch ie.Code {
	case image.CodeRegistryUnreachable, image.CodeCorrupt:
		kind = KindUpstream
	case image.CodeBuildFailed:
		kind = KindInternal
	}
	return &Error{Kind: kind, Code: ie.Code, Field: field, Message: ie.Error(), Err: ie.Err}
}

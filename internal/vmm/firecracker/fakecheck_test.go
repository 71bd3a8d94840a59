package firecracker

import (
	"context"
	"errors"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// isRefused reports whether err is Firecracker's answer rather than a
// failure to reach it.
func isRefused(err error) bool {
	var ae *apiError
	return errors.As(err, &ae)
}

// TestFakeChecksRequests makes sure the fake refuses what Firecracker
// refuses, so that the driver's tests against it mean something.
func TestFakeChecksRequests(t *testing.T) {
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	log := filepath.Join(dir, "records.jsonl")
	os.WriteFile(log, nil, 0o666)
	sock := filepath.Join(dir, "fc.sock")
	cmd := exec.Command(exe, "--api-sock", sock, "--id", "fake-check")
	cmd.Env = append(os.Environ(), fakeEnv+"=1", fakeLogEnv+"="+log)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	c := newClient(sock)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	exited := make(chan error)
	if err := waitAPI(ctx, c, exited); err != nil {
		t.Fatal(err)
	}
	kernel := filepath.Join(dir, "vmlinux")
	os.WriteFile(kernel, []byte("k"), 0o644)
	for _, tc := range []struct {
		method, path string
		body         any
		fault        string // "" for success
	}{
		{"PUT", "/actions", map[string]any{"action_type": "Start"}, "unknown variant `Start`"},
		{"PUT", "/actions", map[string]any{}, "missing field `action_type`"},
		{"PUT", "/actions", map[string]any{"action_type": "InstanceStart", "force": true}, "unknown field `force`"},
		{"PUT", "/actions", map[string]any{"action_type": "InstanceStart"}, "without kernel configuration"},
		{"PUT", "/machine-config", map[string]any{"vcpu_count": "2", "mem_size_mib": 128}, "not a number"},
		{"PUT", "/machine-config", map[string]any{"vcpu_count": 33, "mem_size_mib": 128}, "out of range"},
		{"PUT", "/machine-config", map[string]any{"vcpu_count": 1.5, "mem_size_mib": 128}, "not an integer"},
		{"PUT", "/vsock", map[string]any{"guest_cid": 2, "uds_path": filepath.Join(dir, "v.sock")}, "out of range"},
		{"PUT", "/drives/rootfs", map[string]any{"drive_id": "other", "is_root_device": true, "path_on_host": kernel}, "does not match"},
		{"PUT", "/drives/rootfs", map[string]any{"drive_id": "rootfs", "path_on_host": kernel}, "missing field `is_root_device`"},
		{"PUT", "/drives/rootfs", map[string]any{"drive_id": "rootfs", "is_root_device": true, "path_on_host": "/nonexistent"}, "Unable to create the block device"},
		{"PUT", "/logger", map[string]any{"level": "loud"}, "unknown variant"},
		{"PUT", "/boot-source", map[string]any{"kernel_image_path": "/nonexistent"}, "Cannot open"},
		{"PATCH", "/vm", map[string]any{"state": "Running"}, "unknown variant `Running`"},
		{"PATCH", "/vm", map[string]any{"state": "Paused"}, "before starting the microVM"},
		{"PUT", "/snapshot/load", map[string]any{"snapshot_path": "x"}, "Exactly one of"},
		{"PUT", "/snapshot/load", map[string]any{"snapshot_path": "x", "mem_backend": map[string]any{"backend_type": "Disk", "backend_path": "y"}}, "unknown variant `Disk`"},
		{"PUT", "/snapshot/create", map[string]any{"snapshot_path": "x", "mem_file_path": "y", "snapshot_type": "Full"}, "before starting"},
		{"PUT", "/network-interfaces/eth0", map[string]any{"iface_id": "eth0"}, "missing field `host_dev_name`"},
		{"DELETE", "/vm", nil, "Invalid request method"},
		{"PUT", "/logger", map[string]any{"level": "warning", "log_path": filepath.Join(dir, "fc.log")}, ""},
		{"PUT", "/boot-source", map[string]any{"kernel_image_path": kernel}, ""},
		{"PUT", "/snapshot/load", map[string]any{"snapshot_path": "x", "mem_file_path": "y"}, "not allowed after configuring"},
	} {
		err := c.call(ctx, tc.method, tc.path, tc.body, nil)
		switch {
		case tc.fault == "" && err != nil:
			t.Errorf("%s %s %v: %v", tc.method, tc.path, tc.body, err)
		case tc.fault != "" && (err == nil || !isRefused(err) || !strings.Contains(err.Error(), tc.fault) || !strings.Contains(err.Error(), "HTTP 400")):
			t.Errorf("%s %s %v: %v; want a 400 saying %q", tc.method, tc.path, tc.body, err, tc.fault)
		}
	}
	// Firecracker's answers: 204 without a body.
	req, _ := http.NewRequest("PUT", "http://localhost/metrics", strings.NewReader(`{"metrics_path":"`+filepath.Join(dir, "m.json")+`"}`))
	resp, err := c.hc.Do(req)
	if err != nil || resp.StatusCode != http.StatusNoContent {
		t.Fatalf("PUT /metrics: %v %v", resp, err)
	}
}

package firecracker

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"time"
)

// The request bodies of Firecracker's REST API (swagger: firecracker.yaml,
// definitions of the same names). Only the fields smolvm sets are here;
// Firecracker refuses unknown fields, so none is sent that it lacks.

type bootSource struct {
	KernelImagePath string `json:"kernel_image_path"`
	InitrdPath      string `json:"initrd_path,omitempty"`
	BootArgs        string `json:"boot_args,omitempty"`
}

type drive struct {
	DriveID      string `json:"drive_id"`
	PathOnHost   string `json:"path_on_host"`
	IsRootDevice bool   `json:"is_root_device"`
	IsReadOnly   bool   `json:"is_read_only"`
}

// partialDrive is PATCH /drives/{id}: naming the same file again makes
// Firecracker read its size anew and tell the guest.
type partialDrive struct {
	DriveID    string `json:"drive_id"`
	PathOnHost string `json:"path_on_host"`
}

type machineConfig struct {
	VCPUCount  int `json:"vcpu_count"`
	MemSizeMiB int `json:"mem_size_mib"`
}

type vsockConfig struct {
	GuestCID int    `json:"guest_cid"`
	UDSPath  string `json:"uds_path"`
}

type networkInterface struct {
	IfaceID     string `json:"iface_id"`
	HostDevName string `json:"host_dev_name"`
	GuestMAC    string `json:"guest_mac,omitempty"`
}

type logger struct {
	LogPath       string `json:"log_path"`
	Level         string `json:"level"`
	ShowLevel     bool   `json:"show_level"`
	ShowLogOrigin bool   `json:"show_log_origin"`
}

type metrics struct {
	MetricsPath string `json:"metrics_path"`
}

type action struct {
	ActionType string `json:"action_type"`
}

type vmState struct {
	State string `json:"state"`
}

type snapshotCreate struct {
	SnapshotType string `json:"snapshot_type"`
	SnapshotPath string `json:"snapshot_path"`
	MemFilePath  string `json:"mem_file_path"`
}

type memBackend struct {
	BackendType string `json:"backend_type"`
	BackendPath string `json:"backend_path"`
}

type snapshotLoad struct {
	SnapshotPath string     `json:"snapshot_path"`
	MemBackend   memBackend `json:"mem_backend"`
	ResumeVM     bool       `json:"resume_vm"`
}

// instanceInfo is GET /'s answer.
type instanceInfo struct {
	ID    string `json:"id"`
	State string `json:"state"` // "Not started", "Running", "Paused"
}

// apiError is a request Firecracker refused, with what it said.
type apiError struct {
	Method, Path string
	Status       int
	Fault        string
}

func (e *apiError) Error() string {
	return fmt.Sprintf("firecracker refused %s %s (HTTP %d): %s", e.Method, e.Path, e.Status, e.Fault)
}

// client speaks to one Firecracker's API socket.
type client struct {
	socket string
	hc     *http.Client
}

func newClient(socket string) *client {
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		},
		// One request at a time, and the process may be gone next time.
		DisableKeepAlives: true,
	}
	return &client{socket: socket, hc: &http.Client{Transport: tr}}
}

// requestTimeout bounds a configuration request; Firecracker answers them
// at once. Snapshots take as long as their memory takes to write or map,
// and are bounded by the caller's context.
const requestTimeout = 10 * time.Second

// call sends body (nil: none) and decodes a 200's answer into out.
func (c *client) call(ctx context.Context, method, path string, body, out any) error {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return err
		}
		rd = bytes.NewReader(b)
	}
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, requestTimeout)
		defer cancel()
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://localhost"+path, rd)
	if err != nil {
		return err
	}
	req.Header.Set("Accept", "application/json")
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return fmt.Errorf("firecracker %s %s: %w", method, path, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	switch {
	case resp.StatusCode == http.StatusNoContent:
		return nil
	case resp.StatusCode == http.StatusOK:
		if out == nil {
			return nil
		}
		if err := json.Unmarshal(b, out); err != nil {
			return fmt.Errorf("firecracker %s %s: answer %q: %w", method, path, b, err)
		}
		return nil
	}
	var fault struct {
		FaultMessage string `json:"fault_message"`
	}
	msg := strings.TrimSpace(string(b))
	if json.Unmarshal(b, &fault) == nil && fault.FaultMessage != "" {
		msg = fault.FaultMessage
	}
	return &apiError{Method: method, Path: path, Status: resp.StatusCode, Fault: msg}
}

func (c *client) put(ctx context.Context, path string, body any) error {
	return c.call(ctx, http.MethodPut, path, body, nil)
}

func (c *client) patch(ctx context.Context, path string, body any) error {
	return c.call(ctx, http.MethodPatch, path, body, nil)
}

func (c *client) info(ctx context.Context) (instanceInfo, error) {
	var ii instanceInfo
	err := c.call(ctx, http.MethodGet, "/", nil, &ii)
	return ii, err
}

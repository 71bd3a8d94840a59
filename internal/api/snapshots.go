package api

import (
	"context"
	"net/http"
	"time"

	"github.com/danielgtaylor/huma/v2"

	"github.com/smolvm/smolvm/internal/sandbox"
)

// SnapshotRequest is the optional body of POST /sandboxes/{id}/snapshots.
type SnapshotRequest struct {
	_    struct{} `json:"-" additionalProperties:"false"`
	Name string   `json:"name,omitempty" pattern:"^[a-z0-9][a-z0-9-]{0,62}$" example:"after-setup" doc:"A unique name, usable wherever the snapshot's id is."`
	Stop bool     `json:"stop,omitempty" example:"false" doc:"Stop the sandbox once it is saved; otherwise it goes on running (or stays paused)."`
}

// Snapshot is a saved sandbox.
type Snapshot struct {
	ID        string    `json:"id" example:"snap-1a2b3c4d" doc:"Snapshot id."`
	Name      string    `json:"name,omitempty" example:"after-setup" doc:"Its unique name, if it has one."`
	Sandbox   string    `json:"sandbox" example:"vm-a1b2c3d4" doc:"The sandbox it was taken of (which may be gone since)."`
	Backend   string    `json:"backend" example:"qemu" doc:"Backend of the saved machine; its forks run on it too."`
	OS        string    `json:"os" example:"debian" doc:"Guest operating system."`
	Image     string    `json:"image" example:"smolvm/debian" doc:"Image the saved machine booted from."`
	Memory    int       `json:"memory" minimum:"0" example:"512" doc:"Guest memory in MiB; its forks have the same."`
	VCPUs     int       `json:"vcpus" minimum:"0" example:"1" doc:"Virtual CPUs; its forks have the same."`
	DiskSize  int       `json:"disk_size" minimum:"0" example:"1024" doc:"Disk size in MiB; a fork's may be larger."`
	Network   bool      `json:"network" example:"true" doc:"Whether the saved machine has a network interface; its forks must have one too, or none."`
	SizeBytes int64     `json:"size_bytes" minimum:"0" example:"536870912" doc:"What it takes on the host's disk."`
	CreatedAt time.Time `json:"created_at" example:"2026-06-24T10:00:00Z" doc:"When it was taken."`
}

// SnapshotList is the body of GET /snapshots.
type SnapshotList struct {
	Snapshots []Snapshot `json:"snapshots" nullable:"false" doc:"Every snapshot on the host, newest first."`
}

type snapshotCreateInput struct {
	ID   string `path:"id" example:"vm-a1b2c3d4" doc:"Sandbox id or name."`
	Body *SnapshotRequest
}

type snapshotCreateOutput struct {
	Status   int
	Location string `header:"Location" doc:"The new snapshot's URL."`
	Body     Snapshot
}

type snapshotRef struct {
	ID string `path:"id" example:"snap-1a2b3c4d" doc:"Snapshot id or name."`
}

type snapshotDeleteInput struct {
	ID    string `path:"id" example:"snap-1a2b3c4d" doc:"Snapshot id or name."`
	Force bool   `query:"force" example:"false" doc:"Delete the sandboxes forked from it too, instead of refusing with 409 snapshot_in_use."`
}

type snapshotOutput struct{ Body Snapshot }
type snapshotListOutput struct{ Body SnapshotList }
type snapshotPruneOutput struct{ Body SnapshotList }

func registerSnapshots(hapi huma.API, h *handlers, common, withBody []int) {
	huma.Register(hapi, huma.Operation{
		OperationID:   "createSnapshot",
		Method:        http.MethodPost,
		Path:          "/sandboxes/{id}/snapshots",
		Summary:       "Snapshot a sandbox",
		Description:   "Saves a running or paused sandbox's memory, devices and disk, and answers 201 with a Location header. The sandbox stands still while it is saved and then goes on as it was, unless stop is set. Create sandboxes from it with snapshot in POST /sandboxes.",
		Tags:          []string{"snapshots"},
		DefaultStatus: http.StatusCreated,
		Errors:        append(append([]int{http.StatusNotFound, http.StatusConflict}, withBody...), common...),
	}, h.createSnapshot)
	huma.Register(hapi, huma.Operation{
		OperationID: "listSnapshots",
		Method:      http.MethodGet,
		Path:        "/snapshots",
		Summary:     "List snapshots",
		Tags:        []string{"snapshots"},
		Errors:      common,
	}, h.listSnapshots)
	huma.Register(hapi, huma.Operation{
		OperationID: "getSnapshot",
		Method:      http.MethodGet,
		Path:        "/snapshots/{id}",
		Summary:     "Get a snapshot",
		Tags:        []string{"snapshots"},
		Errors:      append([]int{http.StatusNotFound}, common...),
	}, h.getSnapshot)
	huma.Register(hapi, huma.Operation{
		OperationID:   "deleteSnapshot",
		Method:        http.MethodDelete,
		Path:          "/snapshots/{id}",
		Summary:       "Delete a snapshot",
		Description:   "Removes a snapshot and answers 204. Refused with 409 snapshot_in_use while sandboxes are forks of it, unless force, which deletes them first.",
		Tags:          []string{"snapshots"},
		DefaultStatus: http.StatusNoContent,
		Errors:        append([]int{http.StatusNotFound, http.StatusConflict}, common...),
	}, h.deleteSnapshot)
	huma.Register(hapi, huma.Operation{
		OperationID: "pruneSnapshots",
		Method:      http.MethodPost,
		Path:        "/snapshots/prune",
		Summary:     "Delete unused snapshots",
		Description: "Removes every snapshot that no sandbox and no other snapshot is made over, and lists what it removed.",
		Tags:        []string{"snapshots"},
		Errors:      common,
	}, h.pruneSnapshots)
}

// SnapshotFrom is the API representation of a snapshot, shared with the CLI.
func SnapshotFrom(s sandbox.Snapshot) Snapshot {
	return Snapshot{ID: s.ID, Name: s.Name, Sandbox: s.Sandbox, Backend: s.Backend, OS: s.OS, Image: s.Image,
		Memory: s.MemoryMiB, VCPUs: s.VCPUs, DiskSize: s.DiskMiB, Network: s.Network,
		SizeBytes: s.SizeBytes, CreatedAt: s.CreatedAt.UTC()}
}

func (h *handlers) createSnapshot(ctx context.Context, in *snapshotCreateInput) (*snapshotCreateOutput, error) {
	m, err := h.manager(in.ID)
	if err != nil {
		return nil, err
	}
	var req sandbox.SnapshotRequest
	if in.Body != nil {
		req = sandbox.SnapshotRequest{Name: in.Body.Name, Stop: in.Body.Stop}
	}
	s, err := m.CreateSnapshot(ctx, in.ID, req)
	if err != nil {
		return nil, ProblemFrom(ctx, err)
	}
	return &snapshotCreateOutput{Status: http.StatusCreated, Location: "/snapshots/" + s.ID, Body: SnapshotFrom(s)}, nil
}

func (h *handlers) listSnapshots(ctx context.Context, _ *struct{}) (*snapshotListOutput, error) {
	m, err := h.manager("")
	if err != nil {
		return nil, err
	}
	all, err := m.Snapshots()
	if err != nil {
		return nil, ProblemFrom(ctx, err)
	}
	out := SnapshotList{Snapshots: make([]Snapshot, 0, len(all))}
	for _, s := range all {
		out.Snapshots = append(out.Snapshots, SnapshotFrom(s))
	}
	return &snapshotListOutput{Body: out}, nil
}

func (h *handlers) getSnapshot(ctx context.Context, in *snapshotRef) (*snapshotOutput, error) {
	m, err := h.manager(in.ID)
	if err != nil {
		return nil, err
	}
	s, err := m.GetSnapshot(ctx, in.ID)
	if err != nil {
		return nil, ProblemFrom(ctx, err)
	}
	return &snapshotOutput{Body: SnapshotFrom(s)}, nil
}

func (h *handlers) deleteSnapshot(ctx context.Context, in *snapshotDeleteInput) (*deleteOutput, error) {
	m, err := h.manager(in.ID)
	if err != nil {
		return nil, err
	}
	if err := m.DeleteSnapshot(ctx, in.ID, in.Force); err != nil {
		return nil, ProblemFrom(ctx, err)
	}
	return &deleteOutput{}, nil
}

func (h *handlers) pruneSnapshots(ctx context.Context, _ *struct{}) (*snapshotPruneOutput, error) {
	m, err := h.manager("")
	if err != nil {
		return nil, err
	}
	removed, err := m.PruneSnapshots(ctx)
	if err != nil {
		return nil, ProblemFrom(ctx, err)
	}
	out := SnapshotList{Snapshots: make([]Snapshot, 0, len(removed))}
	for _, s := range removed {
		out.Snapshots = append(out.Snapshots, SnapshotFrom(s))
	}
	return &snapshotPruneOutput{Body: out}, nil
}

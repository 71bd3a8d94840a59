package api

import (
	"context"
	"fmt"
	"io"
	"mime"
	"net/http"
	"reflect"
	"strconv"
	"strings"
	"time"

	"github.com/danielgtaylor/huma/v2"

	"github.com/smolvm/smolvm/internal/sandbox"
)

const mediaTar = "application/x-tar"

// FileEntry describes a path in a sandbox.
type FileEntry struct {
	Name       string    `json:"name" example:"app.py" doc:"The entry's name."`
	Path       string    `json:"path" example:"/root/app.py" doc:"Its absolute path."`
	Type       string    `json:"type" enum:"file,directory,symlink,other" example:"file" doc:"What it is (a symlink is not followed)."`
	Size       int64     `json:"size" example:"1024" doc:"Size in bytes."`
	Mode       string    `json:"mode" example:"0644" doc:"Permission bits in octal, with setuid, setgid and sticky."`
	ModTime    time.Time `json:"mtime" example:"2026-06-24T10:00:00Z" doc:"Last modification (RFC 3339)."`
	LinkTarget string    `json:"link_target,omitempty" example:"../lib/app.py" doc:"A symlink's target."`
	UID        uint32    `json:"uid" example:"0" doc:"Owner's user id."`
	GID        uint32    `json:"gid" example:"0" doc:"Owner's group id."`
}

// FileList is the body of GET /sandboxes/{id}/fs/list.
type FileList struct {
	Entries []FileEntry `json:"entries" nullable:"false" doc:"The directory's entries, by name."`
}

// MkdirRequest is the body of POST /sandboxes/{id}/fs/mkdir.
type MkdirRequest struct {
	_       struct{} `json:"-" additionalProperties:"false"`
	Path    string   `json:"path" example:"/root/project/src" doc:"Absolute path of the directory to create."`
	Parents bool     `json:"parents,omitempty" doc:"Create missing parents too; an existing directory is then no error."`
	Mode    string   `json:"mode,omitempty" pattern:"^[0-7]{1,4}$" example:"0755" doc:"Permission bits in octal; 0755 by default."`
}

// MoveRequest is the body of POST /sandboxes/{id}/fs/move.
type MoveRequest struct {
	_           struct{} `json:"-" additionalProperties:"false"`
	Source      string   `json:"source" example:"/root/a.txt" doc:"Absolute path to move."`
	Destination string   `json:"destination" example:"/root/b.txt" doc:"Absolute path it moves to (replacing a file there)."`
}

// FileEntryFrom is the API's form of a file's description; the CLI's local
// path shares it.
func FileEntryFrom(f sandbox.FileInfo) FileEntry { return fileEntry(f) }

func fileEntry(f sandbox.FileInfo) FileEntry {
	return FileEntry{Name: f.Name, Path: f.Path, Type: f.Type, Size: f.Size, Mode: fmt.Sprintf("%04o", f.Mode),
		ModTime: f.ModTime, LinkTarget: f.LinkTarget, UID: f.UID, GID: f.GID}
}

type pathInput struct {
	ID   string `path:"id" example:"vm-a1b2c3d4" doc:"Sandbox id."`
	Path string `query:"path" required:"true" example:"/root/app.py" doc:"Absolute path in the sandbox."`
}

type deleteFileInput struct {
	ID        string `path:"id" example:"vm-a1b2c3d4" doc:"Sandbox id."`
	Path      string `query:"path" required:"true" example:"/root/app.py" doc:"Absolute path in the sandbox."`
	Recursive bool   `query:"recursive" doc:"Remove a directory and everything in it."`
}

type mkdirInput struct {
	ID   string `path:"id" example:"vm-a1b2c3d4" doc:"Sandbox id."`
	Body MkdirRequest
}

type moveInput struct {
	ID   string `path:"id" example:"vm-a1b2c3d4" doc:"Sandbox id."`
	Body MoveRequest
}

type fileEntryOutput struct{ Body FileEntry }
type fileCreatedOutput struct {
	Status int
	Body   FileEntry
}
type fileListOutput struct{ Body FileList }

func registerFiles(hapi huma.API, h *handlers, common, withBody []int) {
	fileErrs := []int{http.StatusNotFound, http.StatusConflict, http.StatusUnprocessableEntity, http.StatusInsufficientStorage}
	huma.Register(hapi, huma.Operation{
		OperationID: "statFile",
		Method:      http.MethodGet,
		Path:        "/sandboxes/{id}/fs/stat",
		Summary:     "Describe a path",
		Description: "Describes a path in the sandbox without following a final symlink. A missing path is 404 file_not_found; a relative one or one with .. is 422 invalid_path.",
		Tags:        []string{"files"},
		Errors:      append(fileErrs, common...),
	}, h.statFile)
	huma.Register(hapi, huma.Operation{
		OperationID: "listFiles",
		Method:      http.MethodGet,
		Path:        "/sandboxes/{id}/fs/list",
		Summary:     "List a directory",
		Description: "Lists a directory's entries by name. A file is 409 wrong_file_type.",
		Tags:        []string{"files"},
		Errors:      append(fileErrs, common...),
	}, h.listFiles)
	huma.Register(hapi, huma.Operation{
		OperationID:   "makeDirectory",
		Method:        http.MethodPost,
		Path:          "/sandboxes/{id}/fs/mkdir",
		Summary:       "Create a directory",
		Description:   "Creates a directory (with parents when asked) and answers 201 with it. An existing path is 409 file_exists unless parents is set and it is a directory.",
		Tags:          []string{"files"},
		DefaultStatus: http.StatusCreated,
		Errors:        append(append(fileErrs, withBody...), common...),
	}, h.makeDirectory)
	huma.Register(hapi, huma.Operation{
		OperationID: "movePath",
		Method:      http.MethodPost,
		Path:        "/sandboxes/{id}/fs/move",
		Summary:     "Move a path",
		Description: "Renames a file or directory within the sandbox's filesystem.",
		Tags:        []string{"files"},
		Errors:      append(append(fileErrs, withBody...), common...),
	}, h.movePath)
	huma.Register(hapi, huma.Operation{
		OperationID:   "deleteFile",
		Method:        http.MethodDelete,
		Path:          "/sandboxes/{id}/files",
		Summary:       "Delete a path",
		Description:   "Deletes a file, symlink or empty directory; a directory with its contents with recursive=true (else 409 wrong_file_type).",
		Tags:          []string{"files"},
		DefaultStatus: http.StatusNoContent,
		Errors:        append(fileErrs, common...),
	}, h.deleteFile)
	documentFileTransfer(hapi)
}

func (h *handlers) statFile(ctx context.Context, in *pathInput) (*fileEntryOutput, error) {
	m, err := h.manager(in.ID)
	if err != nil {
		return nil, err
	}
	f, err := m.StatPath(ctx, in.ID, in.Path)
	if err != nil {
		return nil, ProblemFrom(ctx, err)
	}
	return &fileEntryOutput{Body: fileEntry(f)}, nil
}

func (h *handlers) listFiles(ctx context.Context, in *pathInput) (*fileListOutput, error) {
	m, err := h.manager(in.ID)
	if err != nil {
		return nil, err
	}
	fs, err := m.ListDir(ctx, in.ID, in.Path)
	if err != nil {
		return nil, ProblemFrom(ctx, err)
	}
	out := FileList{Entries: make([]FileEntry, 0, len(fs))}
	for _, f := range fs {
		out.Entries = append(out.Entries, fileEntry(f))
	}
	return &fileListOutput{Body: out}, nil
}

func (h *handlers) makeDirectory(ctx context.Context, in *mkdirInput) (*fileCreatedOutput, error) {
	m, err := h.manager(in.ID)
	if err != nil {
		return nil, err
	}
	mode, _ := strconv.ParseUint(in.Body.Mode, 8, 32) // the schema's pattern holds
	f, err := m.MakeDir(ctx, in.ID, in.Body.Path, in.Body.Parents, uint32(mode))
	if err != nil {
		return nil, ProblemFrom(ctx, err)
	}
	return &fileCreatedOutput{Status: http.StatusCreated, Body: fileEntry(f)}, nil
}

func (h *handlers) movePath(ctx context.Context, in *moveInput) (*fileEntryOutput, error) {
	m, err := h.manager(in.ID)
	if err != nil {
		return nil, err
	}
	f, err := m.MovePath(ctx, in.ID, in.Body.Source, in.Body.Destination)
	if err != nil {
		return nil, ProblemFrom(ctx, err)
	}
	return &fileEntryOutput{Body: fileEntry(f)}, nil
}

func (h *handlers) deleteFile(ctx context.Context, in *deleteFileInput) (*struct{}, error) {
	m, err := h.manager(in.ID)
	if err != nil {
		return nil, err
	}
	if err := m.RemovePath(ctx, in.ID, in.Path, in.Recursive); err != nil {
		return nil, ProblemFrom(ctx, err)
	}
	return nil, nil
}

// isFilesPath reports the route whose PUT takes a raw body.
func isFilesPath(p string) bool {
	rest, ok := strings.CutPrefix(p, "/sandboxes/")
	if !ok {
		return false
	}
	id, tail, ok := strings.Cut(rest, "/")
	return ok && id != "" && tail == "files"
}

// wantsTar reports whether a GET asks for a directory as a tar.
func wantsTar(r *http.Request, p string) bool {
	if strings.HasSuffix(p, "/") {
		return true
	}
	for _, part := range strings.Split(r.Header.Get("Accept"), ",") {
		if mt, _, err := mime.ParseMediaType(strings.TrimSpace(part)); err == nil && mt == mediaTar {
			return true
		}
	}
	return false
}

// downloadFile serves GET /sandboxes/{id}/files.
func (h *handlers) downloadFile(w http.ResponseWriter, r *http.Request) {
	id, p := r.PathValue("id"), r.URL.Query().Get("path")
	m, err := h.manager(id)
	if err != nil {
		writeProblem(w, r, ProblemFrom(r.Context(), err))
		return
	}
	if wantsTar(r, p) {
		tr, err := m.ReadTar(r.Context(), id, p)
		if err != nil {
			writeProblem(w, r, ProblemFrom(r.Context(), err))
			return
		}
		defer tr.Close()
		w.Header().Set("Content-Type", mediaTar)
		w.WriteHeader(http.StatusOK)
		io.Copy(w, tr) // a cut stream ends the response short: the tar is then invalid
		return
	}
	offset, length, ranged, perr := parseRange(r.Header.Get("Range"))
	if perr != nil {
		writeProblem(w, r, perr)
		return
	}
	f, err := m.OpenFile(r.Context(), id, p, offset, length)
	if err != nil {
		writeProblem(w, r, ProblemFrom(r.Context(), err))
		return
	}
	defer f.Close()
	size := f.Info.Size
	hdr := w.Header()
	hdr.Set("Content-Type", "application/octet-stream")
	hdr.Set("Last-Modified", f.Info.ModTime.Format(http.TimeFormat))
	hdr.Set("Accept-Ranges", "bytes")
	status := http.StatusOK
	n := size
	if ranged {
		if offset >= size && size > 0 || (size == 0 && offset > 0) {
			hdr.Set("Content-Range", fmt.Sprintf("bytes */%d", size))
			writeProblem(w, r, newProblem(http.StatusRequestedRangeNotSatisfiable, "range_not_satisfiable", fmt.Sprintf("the file is %d bytes", size)))
			return
		}
		end := size - 1
		if length > 0 {
			end = min(offset+length-1, size-1)
		}
		n = end - offset + 1
		hdr.Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", offset, end, size))
		status = http.StatusPartialContent
	}
	hdr.Set("Content-Length", strconv.FormatInt(n, 10))
	w.WriteHeader(status)
	if r.Method != http.MethodHead {
		io.CopyN(w, f, n)
	}
}

// parseRange reads one "bytes=a-b" or "bytes=a-" range; suffix and
// multiple ranges are refused.
func parseRange(v string) (offset, length int64, ranged bool, p *Problem) {
	if v == "" {
		return 0, 0, false, nil
	}
	bad := func() *Problem {
		p := newProblem(http.StatusRequestedRangeNotSatisfiable, "range_not_satisfiable",
			fmt.Sprintf("Range %q: one range of the form bytes=START- or bytes=START-END is served", v))
		p.Field = "Range"
		return p
	}
	spec, ok := strings.CutPrefix(v, "bytes=")
	if !ok || strings.Contains(spec, ",") {
		return 0, 0, false, bad()
	}
	a, b, _ := strings.Cut(spec, "-")
	start, err := strconv.ParseInt(a, 10, 64)
	if err != nil || start < 0 {
		return 0, 0, false, bad()
	}
	if b == "" {
		return start, 0, true, nil
	}
	end, err := strconv.ParseInt(b, 10, 64)
	if err != nil || end < start {
		return 0, 0, false, bad()
	}
	return start, end - start + 1, true, nil
}

// uploadFile serves PUT /sandboxes/{id}/files: the body is the file, or a
// tar to unpack into the directory path.
func (h *handlers) uploadFile(w http.ResponseWriter, r *http.Request) {
	id, q := r.PathValue("id"), r.URL.Query()
	p := q.Get("path")
	m, err := h.manager(id)
	if err != nil {
		writeProblem(w, r, ProblemFrom(r.Context(), err))
		return
	}
	mt, _, _ := mime.ParseMediaType(r.Header.Get("Content-Type"))
	if mt == mediaTar {
		if _, err := m.WriteTar(r.Context(), id, p, r.Body); err != nil {
			writeProblem(w, r, ProblemFrom(r.Context(), err))
			return
		}
		w.WriteHeader(http.StatusNoContent)
		return
	}
	if mt != "" && mt != "application/octet-stream" {
		pr := newProblem(http.StatusUnsupportedMediaType, CodeUnsupportedMediaType,
			fmt.Sprintf("a file is sent as application/octet-stream, a directory as application/x-tar (got %q)", mt))
		pr.Field = "Content-Type"
		writeProblem(w, r, pr)
		return
	}
	o := sandbox.WriteOptions{Owner: q.Get("user")}
	if v := q.Get("mode"); v != "" {
		mode, err := strconv.ParseUint(v, 8, 32)
		if err != nil || mode > 0o7777 {
			pr := newProblem(http.StatusUnprocessableEntity, "invalid_mode", fmt.Sprintf("mode %q is not an octal permission mode such as 0644", v))
			pr.Field = "mode"
			writeProblem(w, r, pr)
			return
		}
		o.Mode = uint32(mode)
	}
	if uid := q.Get("uid"); uid != "" {
		if o.Owner != "" {
			pr := newProblem(http.StatusUnprocessableEntity, CodeValidationFailed, "give user or uid (and gid), not both")
			pr.Field = "uid"
			writeProblem(w, r, pr)
			return
		}
		o.Owner = uid
		if gid := q.Get("gid"); gid != "" {
			o.Owner += ":" + gid
		}
		for _, part := range strings.Split(o.Owner, ":") {
			if _, err := strconv.ParseUint(part, 10, 32); err != nil {
				pr := newProblem(http.StatusUnprocessableEntity, CodeValidationFailed, fmt.Sprintf("uid and gid are numbers (got %q)", o.Owner))
				pr.Field = "uid"
				writeProblem(w, r, pr)
				return
			}
		}
	}
	if r.ContentLength > 0 {
		o.Size = r.ContentLength
	}
	if _, err := m.WriteFile(r.Context(), id, p, r.Body, o); err != nil {
		writeProblem(w, r, ProblemFrom(r.Context(), err))
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func documentFileTransfer(hapi huma.API) {
	reg := hapi.OpenAPI().Components.Schemas
	prob := &huma.MediaType{Schema: reg.Schema(reflect.TypeOf(Problem{}), true, "")}
	problems := map[string]*huma.Response{}
	for code, what := range map[int]string{
		400: "Malformed request.", 401: "The server has a token and the request did not carry it.",
		404: "No such sandbox (sandbox_not_found) or file (file_not_found).",
		409: "The sandbox is not running, or a directory where a file is wanted or the reverse (wrong_file_type).",
		415: "Not a media type this route takes.", 416: "A Range that cannot be served.",
		422: "A relative path or one with .. (invalid_path), a bad mode, user or tar.",
		507: "The sandbox's disk is full (disk_full); nothing of the upload was kept.",
	} {
		problems[strconv.Itoa(code)] = &huma.Response{Description: what, Content: map[string]*huma.MediaType{"application/problem+json": prob}}
	}
	params := func(extra ...*huma.Param) []*huma.Param {
		return append([]*huma.Param{
			{Name: "id", In: "path", Required: true, Description: "Sandbox id.", Schema: &huma.Schema{Type: "string"}},
			{Name: "path", In: "query", Required: true, Description: "Absolute path in the sandbox.", Schema: &huma.Schema{Type: "string"}},
		}, extra...)
	}
	with := func(rs map[string]*huma.Response) map[string]*huma.Response {
		for k, v := range problems {
			rs[k] = v
		}
		return rs
	}
	binary := &huma.Schema{Type: "string", Format: "binary"}
	hapi.OpenAPI().AddOperation(&huma.Operation{
		OperationID: "downloadFile", Method: http.MethodGet, Path: "/sandboxes/{id}/files",
		Summary: "Download a file or a directory", Tags: []string{"files"},
		Description: "Answers a regular file's bytes, streamed, with Content-Length and Last-Modified; one Range (bytes=START-END or START-) answers 206. With Accept: application/x-tar, or a path ending in /, answers a tar of the directory's contents (names relative to it).",
		Parameters:  params(&huma.Param{Name: "Range", In: "header", Description: "One byte range.", Schema: &huma.Schema{Type: "string"}}),
		Responses: with(map[string]*huma.Response{
			"200": {Description: "The file, or the directory as a tar.", Content: map[string]*huma.MediaType{"application/octet-stream": {Schema: binary}, mediaTar: {Schema: binary}}},
			"206": {Description: "The range asked for.", Content: map[string]*huma.MediaType{"application/octet-stream": {Schema: binary}}},
		}),
	})
	hapi.OpenAPI().AddOperation(&huma.Operation{
		OperationID: "uploadFile", Method: http.MethodPut, Path: "/sandboxes/{id}/files",
		Summary: "Upload a file or a directory", Tags: []string{"files"},
		Description: "With Content-Type: application/octet-stream the body becomes the file at path (parents made), streamed to a temporary file beside it and renamed into place only when complete: a failed or cut upload leaves what was there. With application/x-tar the body is unpacked into the directory path (made when missing); entries may not leave it.",
		Parameters: params(
			&huma.Param{Name: "mode", In: "query", Description: "Permission bits in octal (0644 by default).", Schema: &huma.Schema{Type: "string", Pattern: "^[0-7]{1,4}$"}},
			&huma.Param{Name: "user", In: "query", Description: "Owner as user or user:group (root by default).", Schema: &huma.Schema{Type: "string"}},
			&huma.Param{Name: "uid", In: "query", Description: "Owner's user id, instead of user.", Schema: &huma.Schema{Type: "integer", Minimum: ptr(0.0)}},
			&huma.Param{Name: "gid", In: "query", Description: "Owner's group id, with uid.", Schema: &huma.Schema{Type: "integer", Minimum: ptr(0.0)}},
		),
		RequestBody: &huma.RequestBody{Required: true, Content: map[string]*huma.MediaType{"application/octet-stream": {Schema: binary}, mediaTar: {Schema: binary}}},
		Responses:   with(map[string]*huma.Response{"204": {Description: "Written."}}),
	})
}

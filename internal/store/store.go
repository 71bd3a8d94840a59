// Package store records sandboxes in a SQLite file so that they outlive the
// process that created them: a restarted server, or the CLI running beside it,
// sees the same sandboxes.
package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	sqlite "modernc.org/sqlite"
	sqlite3 "modernc.org/sqlite/lib"
)

// ErrNotFound is returned when no sandbox has the requested id.
var ErrNotFound = errors.New("sandbox not found")

// ErrExists is returned by Insert when a sandbox with the same id is recorded.
var ErrExists = errors.New("sandbox already exists")

// ErrNameTaken is returned by Insert when another sandbox has the name.
var ErrNameTaken = errors.New("sandbox name taken")

// Status is a sandbox's lifecycle state as recorded.
type Status string

const (
	StatusCreating Status = "creating"
	StatusRunning  Status = "running"
	StatusStopped  Status = "stopped"
	StatusError    Status = "error"
	// StatusPaused is a VM whose vCPUs are stopped and whose memory is
	// kept: it resumes exactly where it was.
	StatusPaused Status = "paused"
	// StatusWarming and StatusPooled are members of a warm pool: running
	// VMs that no caller sees until a create claims one.
	StatusWarming Status = "warming"
	StatusPooled  Status = "pooled"
	// StatusDeleting is a sandbox whose delete has begun: no caller sees
	// it again, and a process that finds it so (the one deleting it died)
	// finishes the delete.
	StatusDeleting Status = "deleting"
)

// Record is one sandbox as stored.
type Record struct {
	ID          string
	Status      Status
	OS          string
	Image       string
	Backend     string
	MemoryMiB   int
	DiskSizeMiB int
	VCPUs       int
	PID         int
	// Dir is the sandbox's directory.
	Dir string
	// Runtime is backend-specific JSON (sockets, paths) owned by the VM
	// layer; the store keeps it verbatim.
	Runtime string
	// Network is the sandbox's network settings and exposed ports, as
	// JSON owned by the sandbox layer; the store keeps it verbatim.
	Network string
	// Name is unique among recorded sandboxes when not empty.
	Name string
	// Deadline is when the server ends the sandbox (zero: never).
	Deadline time.Time
	// Config is what the sandbox was created with beyond the columns
	// (labels, environment, mounts, time limit), as JSON owned by the
	// sandbox layer.
	Config    string
	Error     string
	CreatedAt time.Time
	UpdatedAt time.Time
}

// Store is a handle on the database file. It is safe for concurrent use, and
// several Stores (in one process or several) may share one file.
type Store struct {
	db *sql.DB
}

// busyTimeout is how long a connection waits for another writer (possibly in
// another process) before giving up with SQLITE_BUSY. Writes are single small
// rows, so waiting this long means something is badly stuck.
const busyTimeout = 10 * time.Second

// migrations are applied in order; PRAGMA user_version records how many have
// run. Append only: never edit a migration that has shipped.
var migrations = []string{
	`CREATE TABLE sandboxes (
		id            TEXT PRIMARY KEY NOT NULL,
		status        TEXT NOT NULL,
		os            TEXT NOT NULL DEFAULT '',
		image         TEXT NOT NULL DEFAULT '',
		backend       TEXT NOT NULL DEFAULT '',
		memory_mib    INTEGER NOT NULL DEFAULT 0,
		disk_size_mib INTEGER NOT NULL DEFAULT 0,
		vcpus         INTEGER NOT NULL DEFAULT 0,
		pid           INTEGER NOT NULL DEFAULT 0,
		dir           TEXT NOT NULL DEFAULT '',
		runtime       TEXT NOT NULL DEFAULT '',
		error         TEXT NOT NULL DEFAULT '',
		created_at    INTEGER NOT NULL, -- Unix nanoseconds
		updated_at    INTEGER NOT NULL  -- Unix nanoseconds
	) STRICT`,
	`CREATE INDEX sandboxes_created ON sandboxes (created_at, id)`,
	`ALTER TABLE sandboxes ADD COLUMN network TEXT NOT NULL DEFAULT ''`,
	`ALTER TABLE sandboxes ADD COLUMN name TEXT NOT NULL DEFAULT ''`,
	`CREATE UNIQUE INDEX sandboxes_name ON sandboxes (name) WHERE name <> ''`,
	`ALTER TABLE sandboxes ADD COLUMN deadline INTEGER NOT NULL DEFAULT 0`, // Unix nanoseconds, 0: none
	`ALTER TABLE sandboxes ADD COLUMN config TEXT NOT NULL DEFAULT ''`,
}

// Open opens (creating if needed) the database at path and brings its schema
// up to date.
func Open(ctx context.Context, path string) (*Store, error) {
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, fmt.Errorf("open store %s: %w", path, err)
	}
	if err := os.MkdirAll(filepath.Dir(abs), 0o700); err != nil {
		return nil, fmt.Errorf("open store: %w", err)
	}
	// A file: URI so that any character in the path is escaped rather than
	// read as the start of the parameters. WAL lets readers proceed while one
	// writer writes; busy_timeout makes writers from other connections and
	// processes wait their turn instead of failing; BEGIN IMMEDIATE takes the
	// write lock up front so a read-then-write transaction cannot deadlock
	// with another one.
	u := url.URL{Scheme: "file", Path: filepath.ToSlash(abs)}
	q := url.Values{}
	q.Set("_busy_timeout", fmt.Sprint(busyTimeout.Milliseconds()))
	q.Set("_journal_mode", "WAL")
	q.Set("_synchronous", "NORMAL")
	q.Set("_txlock", "immediate")
	dsn := u.String() + "?" + q.Encode()

	db, err := sql.Open("sqlite", dsn)
	if err != nil {
		return nil, fmt.Errorf("open store %s: %w", abs, err)
	}
	s := &Store{db: db}
	if err := s.migrate(ctx); err != nil {
		db.Close()
		return nil, fmt.Errorf("open store %s: %w", abs, err)
	}
	return s, nil
}

// migrate applies the migrations the file has not seen yet, in one
// transaction so that two processes opening a new file at once cannot both
// create the schema.
func (s *Store) migrate(ctx context.Context) error {
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("begin migration: %w", err)
	}
	defer tx.Rollback()

	var version int
	if err := tx.QueryRowContext(ctx, `PRAGMA user_version`).Scan(&version); err != nil {
		return fmt.Errorf("read schema version: %w", err)
	}
	if version > len(migrations) {
		return fmt.Errorf("schema version %d is newer than this program knows (%d); upgrade smolvm", version, len(migrations))
	}
	for i := version; i < len(migrations); i++ {
		if _, err := tx.ExecContext(ctx, migrations[i]); err != nil {
			return fmt.Errorf("apply migration %d: %w", i+1, err)
		}
	}
	if version == len(migrations) {
		return nil
	}
	// PRAGMA does not take bound parameters; the value is our own integer.
	if _, err := tx.ExecContext(ctx, fmt.Sprintf(`PRAGMA user_version = %d`, len(migrations))); err != nil {
		return fmt.Errorf("record schema version: %w", err)
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("commit migration: %w", err)
	}
	return nil
}

// Close closes the database.
func (s *Store) Close() error {
	if err := s.db.Close(); err != nil {
		return fmt.Errorf("close store: %w", err)
	}
	return nil
}

const columns = `id, status, os, image, backend, memory_mib, disk_size_mib, vcpus, pid, dir, runtime, network, name, deadline, config, error, created_at, updated_at`

func unixNano(t time.Time) int64 {
	if t.IsZero() {
		return 0
	}
	return t.UnixNano()
}

// Insert records a new sandbox. CreatedAt and UpdatedAt default to now. It
// returns an error wrapping ErrExists if the id is taken.
func (s *Store) Insert(ctx context.Context, r Record) error {
	if r.ID == "" {
		return errors.New("insert sandbox: empty id")
	}
	now := time.Now()
	if r.CreatedAt.IsZero() {
		r.CreatedAt = now
	}
	if r.UpdatedAt.IsZero() {
		r.UpdatedAt = r.CreatedAt
	}
	_, err := s.db.ExecContext(ctx,
		`INSERT INTO sandboxes (`+columns+`) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`,
		r.ID, r.Status, r.OS, r.Image, r.Backend, r.MemoryMiB, r.DiskSizeMiB, r.VCPUs, r.PID,
		r.Dir, r.Runtime, r.Network, r.Name, unixNano(r.Deadline), r.Config, r.Error, r.CreatedAt.UnixNano(), r.UpdatedAt.UnixNano())
	if err != nil {
		if isConstraint(err) && strings.Contains(err.Error(), "sandboxes.name") {
			return fmt.Errorf("insert sandbox %s: name %q: %w", r.ID, r.Name, ErrNameTaken)
		}
		if isConstraint(err) {
			return fmt.Errorf("insert sandbox %s: %w", r.ID, ErrExists)
		}
		return fmt.Errorf("insert sandbox %s: %w", r.ID, err)
	}
	return nil
}

// Transition replaces every field of the recorded sandbox r.ID except
// CreatedAt, and sets UpdatedAt to now, but only if its status is still one
// of from:
// each state change is one compare-and-set, so of two processes changing
// a sandbox at once the second sees that the first did. It reports whether
// the record changed; a missing record is ErrNotFound.
func (s *Store) Transition(ctx context.Context, r Record, from ...Status) (bool, error) {
	if len(from) == 0 {
		return false, fmt.Errorf("transition sandbox %s: no status to move from", r.ID)
	}
	args := []any{r.Status, r.OS, r.Image, r.Backend, r.MemoryMiB, r.DiskSizeMiB, r.VCPUs, r.PID,
		r.Dir, r.Runtime, r.Network, r.Name, unixNano(r.Deadline), r.Config, r.Error, time.Now().UnixNano(), r.ID}
	marks := make([]string, len(from))
	for i, st := range from {
		marks[i] = "?"
		args = append(args, st)
	}
	changed, err := s.updateIf(ctx, "update", r.ID,
		`UPDATE sandboxes SET status = ?, os = ?, image = ?, backend = ?, memory_mib = ?,
			disk_size_mib = ?, vcpus = ?, pid = ?, dir = ?, runtime = ?, network = ?, name = ?, deadline = ?, config = ?,
			error = ?, updated_at = ?
		WHERE id = ? AND status IN (`+strings.Join(marks, ", ")+`)`, args...)
	if err != nil && isConstraint(err) && strings.Contains(err.Error(), "sandboxes.name") {
		return false, fmt.Errorf("update sandbox %s: name %q: %w", r.ID, r.Name, ErrNameTaken)
	}
	if err != nil || changed {
		return changed, err
	}
	if _, err := s.Get(ctx, r.ID); err != nil {
		return false, err
	}
	return false, nil
}

// SetNetwork replaces only the network settings of sandbox id, so a change
// of exposed ports never overwrites a concurrent change of state.
func (s *Store) SetNetwork(ctx context.Context, id, network string) error {
	res, err := s.db.ExecContext(ctx, `UPDATE sandboxes SET network = ?, updated_at = ? WHERE id = ?`,
		network, time.Now().UnixNano(), id)
	if err != nil {
		return fmt.Errorf("update sandbox %s: %w", id, err)
	}
	return affectedOne(res, "update", id)
}

// SetDeadline replaces only the deadline of sandbox id, if it is still in
// one of the statuses from.
func (s *Store) SetDeadline(ctx context.Context, id string, deadline time.Time, from ...Status) (bool, error) {
	args := []any{unixNano(deadline), time.Now().UnixNano(), id}
	marks := make([]string, len(from))
	for i, st := range from {
		marks[i] = "?"
		args = append(args, st)
	}
	return s.updateIf(ctx, "update", id,
		`UPDATE sandboxes SET deadline = ?, updated_at = ? WHERE id = ? AND status IN (`+strings.Join(marks, ", ")+`)`, args...)
}

// MarkExited records that a running sandbox's VM process (pid) is gone, only
// if the record still says it runs with that pid: a Stop or Start that
// finished meanwhile in another goroutine or process is not overwritten.
func (s *Store) MarkExited(ctx context.Context, id string, pid int, status Status, reason string) (bool, error) {
	return s.updateIf(ctx, "update", id,
		`UPDATE sandboxes SET status = ?, pid = 0, error = ?, updated_at = ? WHERE id = ? AND status IN ('running', 'paused') AND pid = ?`,
		status, reason, time.Now().UnixNano(), id, pid)
}

// MarkDeleting records that sandbox id is being deleted, whatever its
// status was.
func (s *Store) MarkDeleting(ctx context.Context, id string) error {
	_, err := s.updateIf(ctx, "update", id,
		`UPDATE sandboxes SET status = 'deleting', updated_at = ? WHERE id = ?`,
		time.Now().UnixNano(), id)
	return err
}

// MarkInterrupted records that the creation of sandbox id stopped with the
// process doing it, only if the record still says it is being created.
func (s *Store) MarkInterrupted(ctx context.Context, id, reason string) (bool, error) {
	return s.updateIf(ctx, "update", id,
		`UPDATE sandboxes SET status = 'error', pid = 0, error = ?, updated_at = ? WHERE id = ? AND status = 'creating'`,
		reason, time.Now().UnixNano(), id)
}

// Claim moves the sandbox id from status from to status to, and sets its
// creation time, only if it still has status from. It reports whether it
// did: of several processes claiming one record, exactly one wins.
func (s *Store) Claim(ctx context.Context, id string, from, to Status, createdAt time.Time) (bool, error) {
	return s.updateIf(ctx, "claim", id,
		`UPDATE sandboxes SET status = ?, created_at = ?, updated_at = ? WHERE id = ? AND status = ?`,
		to, createdAt.UnixNano(), time.Now().UnixNano(), id, from)
}

// updateIf runs an UPDATE of sandbox id whose WHERE clause carries a
// condition, and reports whether the condition held (the row changed).
func (s *Store) updateIf(ctx context.Context, op, id, query string, args ...any) (bool, error) {
	res, err := s.db.ExecContext(ctx, query, args...)
	if err != nil {
		return false, fmt.Errorf("%s sandbox %s: %w", op, id, err)
	}
	n, err := res.RowsAffected()
	if err != nil {
		return false, fmt.Errorf("%s sandbox %s: %w", op, id, err)
	}
	return n == 1, nil
}

// Get returns the sandbox with the given id, or an error wrapping
// ErrNotFound.
func (s *Store) Get(ctx context.Context, id string) (Record, error) {
	row := s.db.QueryRowContext(ctx, `SELECT `+columns+` FROM sandboxes WHERE id = ?`, id)
	r, err := scan(row)
	if errors.Is(err, sql.ErrNoRows) {
		return Record{}, fmt.Errorf("get sandbox %s: %w", id, ErrNotFound)
	}
	if err != nil {
		return Record{}, fmt.Errorf("get sandbox %s: %w", id, err)
	}
	return r, nil
}

// GetByName returns the sandbox called name, or an error wrapping
// ErrNotFound.
func (s *Store) GetByName(ctx context.Context, name string) (Record, error) {
	row := s.db.QueryRowContext(ctx, `SELECT `+columns+` FROM sandboxes WHERE name = ? AND name <> ''`, name)
	r, err := scan(row)
	if errors.Is(err, sql.ErrNoRows) {
		return Record{}, fmt.Errorf("get sandbox named %s: %w", name, ErrNotFound)
	}
	if err != nil {
		return Record{}, fmt.Errorf("get sandbox named %s: %w", name, err)
	}
	return r, nil
}

// List returns every recorded sandbox, oldest first.
func (s *Store) List(ctx context.Context) ([]Record, error) {
	return s.query(ctx, "list sandboxes", `SELECT `+columns+` FROM sandboxes ORDER BY created_at, id`)
}

func (s *Store) query(ctx context.Context, what, query string, args ...any) ([]Record, error) {
	rows, err := s.db.QueryContext(ctx, query, args...)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	defer rows.Close()
	out := []Record{}
	for rows.Next() {
		r, err := scan(rows)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", what, err)
		}
		out = append(out, r)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	return out, nil
}

// Expired returns the sandboxes whose deadline is at or before now.
func (s *Store) Expired(ctx context.Context, now time.Time) ([]Record, error) {
	return s.query(ctx, "list expired sandboxes",
		`SELECT `+columns+` FROM sandboxes WHERE deadline > 0 AND deadline <= ? ORDER BY deadline`, now.UnixNano())
}

// Delete removes the sandbox's record. It returns an error wrapping
// ErrNotFound if there is none, so that two concurrent deletes can tell
// which one won.
func (s *Store) Delete(ctx context.Context, id string) error {
	res, err := s.db.ExecContext(ctx, `DELETE FROM sandboxes WHERE id = ?`, id)
	if err != nil {
		return fmt.Errorf("delete sandbox %s: %w", id, err)
	}
	return affectedOne(res, "delete", id)
}

func affectedOne(res sql.Result, op, id string) error {
	n, err := res.RowsAffected()
	if err != nil {
		return fmt.Errorf("%s sandbox %s: %w", op, id, err)
	}
	if n == 0 {
		return fmt.Errorf("%s sandbox %s: %w", op, id, ErrNotFound)
	}
	return nil
}

type scanner interface {
	Scan(dest ...any) error
}

func scan(sc scanner) (Record, error) {
	var r Record
	var created, updated, deadline int64
	err := sc.Scan(&r.ID, &r.Status, &r.OS, &r.Image, &r.Backend, &r.MemoryMiB, &r.DiskSizeMiB,
		&r.VCPUs, &r.PID, &r.Dir, &r.Runtime, &r.Network, &r.Name, &deadline, &r.Config, &r.Error, &created, &updated)
	if err != nil {
		return Record{}, err
	}
	if deadline != 0 {
		r.Deadline = time.Unix(0, deadline).UTC()
	}
	r.CreatedAt = time.Unix(0, created).UTC()
	r.UpdatedAt = time.Unix(0, updated).UTC()
	return r, nil
}

// isConstraint reports whether err is a uniqueness (or other constraint)
// violation.
func isConstraint(err error) bool {
	var se *sqlite.Error
	if errors.As(err, &se) {
		return se.Code()&0xff == sqlite3.SQLITE_CONSTRAINT
	}
	return strings.Contains(err.Error(), "constraint failed")
}

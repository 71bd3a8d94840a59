package image

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"sync"
	"time"
)

// Progress phases, in the order a build goes through them.
const (
	PhaseResolve = "resolve"
	PhasePull    = "pull"
	PhaseExtract = "extract"
	PhaseMkfs    = "mkfs"
	PhaseReady   = "ready"
)

// Progress is a structured progress report. Done and Total count bytes in
// the pull and extract phases; Total is 0 when unknown.
type Progress struct {
	Phase string `json:"phase"`
	Done  int64  `json:"done"`
	Total int64  `json:"total"`
}

// reporter serialises progress from concurrent downloads and throttles it,
// so a caller's callback (an HTTP event stream, a progress bar) is not
// flooded with one event per read.
type reporter struct {
	log io.Writer
	fn  func(Progress)

	mu    sync.Mutex
	cur   Progress
	last  time.Time
	every time.Duration
}

func newReporter(o Options) *reporter {
	log := o.Log
	if log == nil {
		log = io.Discard
	}
	return &reporter{log: log, fn: o.Progress, every: 100 * time.Millisecond}
}

func (r *reporter) logf(format string, args ...any) {
	fmt.Fprintf(r.log, format+"\n", args...)
}

// phase starts a phase and always reports it.
func (r *reporter) phase(name string, total int64) {
	r.emit(Progress{Phase: name, Total: total})
}

// emit sets and reports the current progress.
func (r *reporter) emit(p Progress) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.cur = p
	r.last = time.Now()
	if r.fn != nil {
		r.fn(p)
	}
}

// add counts n more bytes done in the current phase.
func (r *reporter) add(n int64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.cur.Done += n
	now := time.Now()
	if now.Sub(r.last) < r.every && r.cur.Done != r.cur.Total {
		return
	}
	r.last = now
	if r.fn != nil {
		// Under the lock: concurrent downloads report through one caller.
		r.fn(r.cur)
	}
}

// counter is an io.Writer that reports what passes through it.
type counter struct{ r *reporter }

func (c counter) Write(p []byte) (int, error) {
	c.r.add(int64(len(p)))
	return len(p), nil
}

// stallTransport bounds every wait of a request: the response headers
// (with the base transport's ResponseHeaderTimeout) and each gap between two
// reads of the body. An image's total size puts no useful bound on a
// transfer, but a connection that stops delivering is dead.
type stallTransport struct {
	base    http.RoundTripper
	timeout time.Duration
}

var errStalled = errors.New("transfer stalled")

func (t *stallTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	ctx, cancel := context.WithCancelCause(req.Context())
	timer := time.AfterFunc(t.timeout, func() { cancel(errStalled) })
	resp, err := t.base.RoundTrip(req.WithContext(ctx))
	if err != nil {
		timer.Stop()
		stalled := context.Cause(ctx) == errStalled
		cancel(nil)
		if stalled {
			return nil, &unreachableError{err: fmt.Errorf("%s %s: no answer for %s: %w", req.Method, req.URL.Redacted(), t.timeout, errStalled)}
		}
		return nil, err
	}
	timer.Reset(t.timeout)
	resp.Body = &stallBody{rc: resp.Body, ctx: ctx, cancel: cancel, timer: timer, timeout: t.timeout, url: req.URL.Redacted()}
	return resp, nil
}

type stallBody struct {
	rc      io.ReadCloser
	ctx     context.Context
	cancel  context.CancelCauseFunc
	timer   *time.Timer
	timeout time.Duration
	url     string
}

func (b *stallBody) Read(p []byte) (int, error) {
	n, err := b.rc.Read(p)
	if n > 0 {
		b.timer.Reset(b.timeout)
	}
	if err != nil && err != io.EOF && context.Cause(b.ctx) == errStalled {
		err = &unreachableError{err: fmt.Errorf("GET %s: no data for %s: %w", b.url, b.timeout, errStalled)}
	}
	return n, err
}

func (b *stallBody) Close() error {
	b.timer.Stop()
	b.cancel(nil)
	return b.rc.Close()
}

// stageError returns why a stage's context ended when that, rather than
// the operation, is what failed: the cause (a stage deadline) says more
// than "context deadline exceeded".
func stageError(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		if cause := context.Cause(ctx); cause != nil && cause != ctx.Err() {
			return cause
		}
	}
	return err
}

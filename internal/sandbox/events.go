package sandbox

import (
	"sync"
	"time"
)

// Event types.
const (
	EventSandboxCreated = "sandbox.created"
	EventSandboxUpdated = "sandbox.updated" // status or ports changed
	EventSandboxDeleted = "sandbox.deleted"
	EventImagePull      = "image.pull"     // preparing a sandbox's image; at most one a second, the last always
	EventProcessExited  = "process.exited" // a command ended
)

// Event is something that happened to a sandbox in this process, for
// subscribers such as GET /events.
type Event struct {
	ID        uint64 // increasing from 1 within the process
	Type      string
	Time      time.Time
	SandboxID string
	// Sandbox is the sandbox as it is after the event (created, updated).
	Sandbox *Info
	// Progress is the image preparation (image.pull).
	Progress *Progress
	// Exit is how a command ended (process.exited).
	Exit *ExitEvent
}

// ExitEvent is a command that ended.
type ExitEvent struct {
	ExitCode int
	TimedOut bool
	Duration time.Duration
}

// EventBacklog is how many past events a subscriber can resume from.
const EventBacklog = 1024

// pullInterval bounds image.pull events per sandbox.
const pullInterval = time.Second

// subscriberBuffer is how far a subscriber may fall behind before it is
// dropped (its channel closed); it can resume from the backlog.
const subscriberBuffer = 256

// events is the Manager's event log: a bounded backlog and the
// subscribers to what comes next.
type events struct {
	mu       sync.Mutex
	next     uint64
	backlog  []Event
	subs     map[chan Event]struct{}
	lastPull map[string]time.Time
}

func newEvents() *events {
	return &events{next: 1, subs: make(map[chan Event]struct{}), lastPull: make(map[string]time.Time)}
}

func (e *events) publish(ev Event) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if ev.Type == EventImagePull {
		last := ev.Progress != nil && ev.Progress.Phase == "ready"
		if t, ok := e.lastPull[ev.SandboxID]; ok && !last && time.Since(t) < pullInterval {
			return
		}
		e.lastPull[ev.SandboxID] = time.Now()
		if last {
			delete(e.lastPull, ev.SandboxID)
		}
	}
	ev.ID, ev.Time = e.next, time.Now().UTC()
	e.next++
	e.backlog = append(e.backlog, ev)
	if len(e.backlog) > EventBacklog {
		e.backlog = append(e.backlog[:0], e.backlog[len(e.backlog)-EventBacklog:]...)
	}
	for ch := range e.subs {
		select {
		case ch <- ev:
		default:
			// Too far behind: let it go and resume from the backlog.
			delete(e.subs, ch)
			close(ch)
		}
	}
}

// Subscribe returns, when resume is set, the past events after the one
// with id after (0: every event kept), and a channel of those that follow,
// closed when the subscriber falls too far behind or cancels. complete is
// false when some events after it have left the backlog, or when after is
// from an earlier run of the server (ids start again at 1).
func (m *Manager) Subscribe(after uint64, resume bool) (past []Event, complete bool, next <-chan Event, cancel func()) {
	e := m.events
	e.mu.Lock()
	defer e.mu.Unlock()
	complete = true
	if resume {
		if after >= e.next {
			// An id this process never gave out: the subscriber saw
			// an earlier server, whose events are gone. Everything kept
			// is new to it.
			complete, after = false, 0
		}
		if len(e.backlog) > 0 && e.backlog[0].ID > after+1 {
			complete = false
		}
		for _, ev := range e.backlog {
			if ev.ID > after {
				past = append(past, ev)
			}
		}
	}
	ch := make(chan Event, subscriberBuffer)
	e.subs[ch] = struct{}{}
	return past, complete, ch, func() {
		e.mu.Lock()
		defer e.mu.Unlock()
		if _, ok := e.subs[ch]; ok {
			delete(e.subs, ch)
			close(ch)
		}
	}
}

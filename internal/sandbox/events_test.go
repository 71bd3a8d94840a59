package sandbox

import "testing"

func TestEventBacklogAndSlowSubscribers(t *testing.T) {
	m := &Manager{events: newEvents()}
	_, _, slow, cancelSlow := m.Subscribe(0, false)
	defer cancelSlow()
	for range EventBacklog + 100 {
		m.events.publish(Event{Type: EventSandboxUpdated, SandboxID: "vm-1"})
	}
	// A subscriber that never reads is let go once its buffer is full.
	n := 0
	for range slow {
		n++
	}
	if n != subscriberBuffer {
		t.Errorf("the slow subscriber got %d events before it was let go, want %d", n, subscriberBuffer)
	}
	past, complete, _, cancel := m.Subscribe(1, true)
	cancel()
	if complete || len(past) != EventBacklog || past[0].ID != 101 {
		t.Errorf("resume from 1: complete %v, %d events from %d; want incomplete, the whole backlog from 101", complete, len(past), past[0].ID)
	}
	past, complete, _, cancel = m.Subscribe(1000, true)
	cancel()
	if !complete || len(past) != EventBacklog+100-1000 || past[0].ID != 1001 {
		t.Errorf("resume from 1000: complete %v, %d events", complete, len(past))
	}
	// An id past the newest comes from an earlier run of the server,
	// whose ids began at 1 as these did: a gap, then everything kept.
	past, complete, _, cancel = m.Subscribe(EventBacklog+100+5, true)
	cancel()
	if complete || len(past) != EventBacklog || past[0].ID != 101 {
		t.Errorf("resume from an id never given out: complete %v, %d events; want incomplete, the whole backlog", complete, len(past))
	}
	// The newest id itself is this run's: nothing missed.
	past, complete, _, cancel = m.Subscribe(EventBacklog+100, true)
	cancel()
	if !complete || len(past) != 0 {
		t.Errorf("resume from the newest id: complete %v, %d events", complete, len(past))
	}
}

func TestImagePullEventsArePaced(t *testing.T) {
	m := &Manager{events: newEvents()}
	for range 50 {
		m.events.publish(Event{Type: EventImagePull, SandboxID: "vm-1", Progress: &Progress{Phase: "pull"}})
	}
	m.events.publish(Event{Type: EventImagePull, SandboxID: "vm-2", Progress: &Progress{Phase: "pull"}})
	m.events.publish(Event{Type: EventImagePull, SandboxID: "vm-1", Progress: &Progress{Phase: "ready"}})
	past, _, _, cancel := m.Subscribe(0, false)
	cancel()
	if len(past) != 0 {
		t.Errorf("a new subscriber got %d past events", len(past))
	}
	past, _, _, cancel = m.Subscribe(0, true)
	cancel()
	if len(past) != 3 {
		t.Errorf("resuming from 0 replayed %d events, want all 3", len(past))
	}
	got := m.events.backlog
	if len(got) != 3 || got[0].SandboxID != "vm-1" || got[1].SandboxID != "vm-2" || got[2].Progress.Phase != "ready" {
		t.Errorf("events %+v; want one pull of each sandbox and the last one", got)
	}
}

package sandbox

import (
	"sync"

	"github.com/smolvm/smolvm/internal/guest"
)

// sessions is this process's connection to each sandbox's agent, and the
// per-sandbox locks that serialise lifecycle changes within the process.
// A guest agent serves one connection at a time, so one process keeps one
// per sandbox and shares it between callers.
type sessions struct {
	mu      sync.Mutex
	clients map[string]*guest.Client
	locks   map[string]*idLock
}

// idLock is one sandbox's lock, with how many callers hold or wait for it,
// so it is forgotten when none does.
type idLock struct {
	mu   sync.Mutex
	refs int
}

func newSessions() *sessions {
	return &sessions{clients: make(map[string]*guest.Client), locks: make(map[string]*idLock)}
}

// lock takes the sandbox's lifecycle lock and returns its unlock.
func (s *sessions) lock(id string) func() {
	s.mu.Lock()
	l, ok := s.locks[id]
	if !ok {
		l = &idLock{}
		s.locks[id] = l
	}
	l.refs++
	s.mu.Unlock()
	l.mu.Lock()
	return func() {
		l.mu.Unlock()
		s.mu.Lock()
		if l.refs--; l.refs == 0 {
			delete(s.locks, id)
		}
		s.mu.Unlock()
	}
}

// live returns the sandbox's connection if it is still open.
func (s *sessions) live(id string) *guest.Client {
	s.mu.Lock()
	c := s.clients[id]
	s.mu.Unlock()
	if c == nil || c.Closed() {
		return nil
	}
	return c
}

// set makes c the sandbox's connection, closing the one it replaces.
func (s *sessions) set(id string, c *guest.Client) {
	s.mu.Lock()
	old := s.clients[id]
	s.clients[id] = c
	s.mu.Unlock()
	if old != nil && old != c {
		old.Close()
	}
}

// drop closes and forgets the sandbox's connection.
func (s *sessions) drop(id string) {
	s.mu.Lock()
	c := s.clients[id]
	delete(s.clients, id)
	s.mu.Unlock()
	if c != nil {
		c.Close()
	}
}

// closeAll closes every connection; the VMs keep running.
func (s *sessions) closeAll() {
	s.mu.Lock()
	cs := s.clients
	s.clients = make(map[string]*guest.Client)
	s.mu.Unlock()
	for _, c := range cs {
		c.Close()
	}
}

package agent

import (
	"net"
	"time"
)

// SpareUsed counts the commands s handed to a spare login shell.
func SpareUsed(s *Server) int64 { return s.spares.used.Load() }

// SpareKey is the key of the spare login shell s has waiting, "" if none:
// user, directory, shell and environment, separated by NULs.
func SpareKey(s *Server) string {
	s.spares.mu.Lock()
	defer s.spares.mu.Unlock()
	if s.spares.shell == nil {
		return ""
	}
	return s.spares.shell.key
}

// ListenWithoutSerial is the agent's listener on a guest without the
// virtio-serial port (Firecracker, libkrun): a vsock port.
func ListenWithoutSerial(timeout time.Duration, port uint32) (net.Listener, error) {
	return listenAt(timeout, func() (string, bool) { return "", false }, port)
}

// WriteIfChanged is writeIfChanged.
var WriteIfChanged = writeIfChanged

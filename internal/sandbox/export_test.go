package sandbox

import "context"

// SetAfterRestore makes m run f in every clone once its agent answers and
// before it gets its identity, so a test can break a clone at that moment.
func SetAfterRestore(m *Manager, f func(ctx context.Context, run func(cmd string) error)) {
	m.l.afterRestore = f
}

package sandbox

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
)

// crashMarkers begin the lines a Linux kernel prints on its console when it
// oopses or panics. The guest runs with oops=panic, so an oops ends in a
// panic and the VM exits (panic=-1 with QEMU's -no-reboot); seeing the
// first line lets the host give up on the guest before that.
var crashMarkers = [][]byte{
	[]byte("Kernel panic - not syncing"),
	[]byte("BUG: unable to handle"),
	[]byte("BUG: kernel NULL pointer"),
	[]byte("Oops: "),
	[]byte("general protection fault"),
	[]byte("unable to execute userspace code"),
	[]byte("invalid opcode: "),
	[]byte("double fault: "),
}

// consoleWatch reads a guest's console log as it grows and reports the
// first crash line in it.
type consoleWatch struct {
	path string
	off  int64
	tail []byte // the end of what was read, for markers split across reads
}

// maxConsoleRead bounds one poll's read, so a guest flooding its console
// cannot make the host read without end.
const maxConsoleRead = 1 << 20

// crash returns the crash line seen so far, or "".
func (w *consoleWatch) crash() string {
	f, err := os.Open(w.path)
	if err != nil {
		return ""
	}
	defer f.Close()
	// Read only what was added since the last poll: most polls find
	// nothing new.
	st, err := f.Stat()
	if err != nil || st.Size() <= w.off {
		return ""
	}
	buf := make([]byte, min(st.Size()-w.off, maxConsoleRead))
	n, _ := f.ReadAt(buf, w.off)
	if n <= 0 {
		return ""
	}
	w.off += int64(n)
	data := append(w.tail, buf[:n]...)
	for _, m := range crashMarkers {
		if i := bytes.Index(data, m); i >= 0 {
			line := data[i:]
			if j := bytes.IndexByte(line, '\n'); j >= 0 {
				line = line[:j]
			}
			return string(bytes.TrimSpace(line))
		}
	}
	// Keep enough for a marker cut in two, and the line it starts.
	const keep = 256
	if len(data) > keep {
		data = data[len(data)-keep:]
	}
	w.tail = append([]byte(nil), data...)
	return ""
}

// consoleError is a failure of a guest whose console says why; its message
// carries the console's tail, and summary is the failure alone.
type consoleError struct {
	err     error
	console string
}

func (e *consoleError) Error() string { return e.err.Error() + "; console output:\n" + e.console }
func (e *consoleError) Unwrap() error { return e.err }

// summary is err without a console it carries, for one-line messages.
func summary(err error) string {
	var ce *consoleError
	if errors.As(err, &ce) {
		return strings.Replace(err.Error(), "; console output:\n"+ce.console, "", 1)
	}
	return err.Error()
}

// consoleTail is the last 4 KiB of a console log, for error messages.
func consoleTail(path string) string {
	f, err := os.Open(path)
	if err != nil {
		return "(no console output)"
	}
	defer f.Close()
	const size = 4096
	if st, err := f.Stat(); err == nil && st.Size() > size {
		f.Seek(st.Size()-size, io.SeekStart)
	}
	b, _ := io.ReadAll(io.LimitReader(f, size))
	if len(b) == 0 {
		return "(no console output)"
	}
	return string(b)
}

// ConsoleLog is the path of the sandbox's console log: what its guest
// kernel and agent printed since the VM last started.
func (m *Manager) ConsoleLog(ctx context.Context, id string) (string, error) {
	rec, err := m.get(ctx, id)
	if err != nil {
		return "", err
	}
	_, mach, err := m.l.machine(rec)
	if err != nil {
		return "", &Error{Kind: KindNotFound, Code: "console_not_found", Message: fmt.Sprintf("sandbox %s has no console log yet", rec.ID)}
	}
	return mach.ConsoleLog(), nil
}

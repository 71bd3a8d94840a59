package qemu

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	goruntime "runtime"
	"time"

	"golang.org/x/sys/unix"
)

// monitor is a QMP session. QMP is a line of JSON per message; the well-known
// Go client (go-qemu) pulls in a libvirt RPC library and its calls take no
// deadline, so this small one is written here: every call is bounded by a
// context, and asynchronous events are skipped.
type monitor struct {
	conn net.Conn
	r    *bufio.Reader
}

func dialQMP(ctx context.Context, socket string) (*monitor, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", socket)
	if err != nil {
		return nil, fmt.Errorf("connect to QMP socket %s: %w", socket, err)
	}
	m := &monitor{conn: conn, r: bufio.NewReaderSize(conn, 64<<10)}
	// The greeting, then capabilities negotiation, before any command.
	if err := m.within(ctx, func() error {
		if _, err := m.read(); err != nil {
			return err
		}
		return m.call("qmp_capabilities", nil, nil)
	}); err != nil {
		conn.Close()
		return nil, fmt.Errorf("QMP handshake: %w", err)
	}
	return m, nil
}

func (m *monitor) Close() error { return m.conn.Close() }

func (m *monitor) within(ctx context.Context, fn func() error) error {
	// AfterFunc runs in its own goroutine, even for a context already
	// done: without this check fn could finish before it fires.
	if err := ctx.Err(); err != nil {
		return err
	}
	dl, ok := ctx.Deadline()
	if !ok {
		dl = time.Now().Add(time.Minute)
	}
	m.conn.SetDeadline(dl)
	stop := context.AfterFunc(ctx, func() { m.conn.SetDeadline(time.Now()) })
	defer stop()
	err := fn()
	if err == nil {
		return nil
	}
	if cerr := ctx.Err(); cerr != nil {
		return cerr
	}
	// The socket's deadline is the context's, and its timer can fire
	// first: report that as the context's deadline too.
	var ne net.Error
	if ok && errors.As(err, &ne) && ne.Timeout() && !time.Now().Before(dl) {
		return context.DeadlineExceeded
	}
	return err
}

type qmpReply struct {
	Return json.RawMessage `json:"return"`
	Error  *struct {
		Class string `json:"class"`
		Desc  string `json:"desc"`
	} `json:"error"`
	Event string `json:"event"`
}

func (m *monitor) read() (qmpReply, error) {
	var r qmpReply
	line, err := m.r.ReadBytes('\n')
	if err != nil {
		return r, err
	}
	return r, json.Unmarshal(line, &r)
}

func (m *monitor) call(command string, args any, out any) error {
	b, err := encodeCommand(command, args)
	if err != nil {
		return err
	}
	if _, err := m.conn.Write(b); err != nil {
		return err
	}
	return m.reply(out)
}

func encodeCommand(command string, args any) ([]byte, error) {
	cmd := map[string]any{"execute": command}
	if args != nil {
		cmd["arguments"] = args
	}
	b, err := json.Marshal(cmd)
	return append(b, '\n'), err
}

// passFile hands f to QEMU as the file descriptor name (QMP getfd, the
// descriptor in the same message as SCM_RIGHTS). A migration to or from
// "fd:name" then needs no shell, which the VMM's seccomp filter forbids
// it to start, and no path, which its chroot hides.
func (m *monitor) passFile(ctx context.Context, name string, f *os.File) error {
	uc, ok := m.conn.(*net.UnixConn)
	if !ok {
		return fmt.Errorf("QMP getfd: the monitor is not on a unix socket")
	}
	err := m.within(ctx, func() error {
		b, err := encodeCommand("getfd", map[string]any{"fdname": name})
		if err != nil {
			return err
		}
		if _, _, err := uc.WriteMsgUnix(b, unix.UnixRights(int(f.Fd())), nil); err != nil {
			return err
		}
		return m.reply(nil)
	})
	goruntime.KeepAlive(f)
	if err != nil {
		return fmt.Errorf("QMP getfd: %w", err)
	}
	return nil
}

// reply reads the answer to the command just sent, skipping events.
func (m *monitor) reply(out any) error {
	for {
		r, err := m.read()
		if err != nil {
			return err
		}
		if r.Event != "" {
			continue
		}
		if r.Error != nil {
			return fmt.Errorf("%s: %s", r.Error.Class, r.Error.Desc)
		}
		if out != nil && len(r.Return) > 0 {
			return json.Unmarshal(r.Return, out)
		}
		return nil
	}
}

// run executes one command and decodes its "return" into out (if non-nil).
func (m *monitor) run(ctx context.Context, command string, args any, out any) error {
	if err := m.within(ctx, func() error { return m.call(command, args, out) }); err != nil {
		return fmt.Errorf("QMP %s: %w", command, err)
	}
	return nil
}

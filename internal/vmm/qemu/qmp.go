package qemu

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	goruntime "runtime"
	"strconv"
	"time"

	"golang.org/x/sys/unix"
)

// monitor is a QMP session. QMP is a line of JSON per message; the well-known
// Go client (go-qemu) pulls in a libvirt RPC library and its calls take no
// deadline, so this small one is written here: every call is bounded by a
// context, and asynchronous events are skipped.
//
// Every command carries an id that its reply echoes, and a reply with
// another id is skipped. QEMU sends the reply to a command on whatever
// connection its monitor has when the command finishes: a session given
// up before its answer came (a deadline under load) hands that answer to
// the next one, which would otherwise read every reply one behind.
type monitor struct {
	conn   net.Conn
	r      *bufio.Reader
	prefix string // unique to the session
	n      int    // commands sent
}

func dialQMP(ctx context.Context, socket string) (*monitor, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", socket)
	if err != nil {
		return nil, fmt.Errorf("connect to QMP socket %s: %w", socket, err)
	}
	m := &monitor{conn: conn, r: bufio.NewReaderSize(conn, 64<<10), prefix: rand.Text()[:8]}
	// The greeting, then capabilities negotiation, before any command.
	// An earlier session's late answer can come before the greeting.
	if err := m.within(ctx, func() error {
		for {
			r, err := m.read()
			if err != nil {
				return err
			}
			if r.Greeting != nil {
				break
			}
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
	Event    string          `json:"event"`
	ID       string          `json:"id"`
	Greeting json.RawMessage `json:"QMP"`
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
	b, id, err := m.encodeCommand(command, args)
	if err != nil {
		return err
	}
	if _, err := m.conn.Write(b); err != nil {
		return err
	}
	return m.reply(id, out)
}

// encodeCommand returns the command's line and the id its reply carries.
func (m *monitor) encodeCommand(command string, args any) ([]byte, string, error) {
	m.n++
	id := m.prefix + "-" + strconv.Itoa(m.n)
	cmd := map[string]any{"execute": command, "id": id}
	if args != nil {
		cmd["arguments"] = args
	}
	b, err := json.Marshal(cmd)
	return append(b, '\n'), id, err
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
		b, id, err := m.encodeCommand("getfd", map[string]any{"fdname": name})
		if err != nil {
			return err
		}
		if _, _, err := uc.WriteMsgUnix(b, unix.UnixRights(int(f.Fd())), nil); err != nil {
			return err
		}
		return m.reply(id, nil)
	})
	goruntime.KeepAlive(f)
	if err != nil {
		return fmt.Errorf("QMP getfd: %w", err)
	}
	return nil
}

// reply reads the answer to the command sent with id, skipping events and
// answers to other commands. An answer with no id is QEMU's to a line it
// could not parse, which can only be the one just sent.
func (m *monitor) reply(id string, out any) error {
	for {
		r, err := m.read()
		if err != nil {
			return err
		}
		if r.Event != "" || r.Greeting != nil || (r.ID != "" && r.ID != id) {
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

// Package qmp is a context-aware client for the QEMU Machine Protocol of a
// device model. It speaks go-qemu's qmp.Monitor interface and types, but
// with its own socket transport, because go-qemu's SocketMonitor drops
// QMP's error class and stalls command replies when nobody drains its
// unbuffered event channel. Here every error keeps its class, events are
// queued per subscriber without ever blocking replies, block jobs run to
// completion with progress and are cancelled with their context, and any
// command (newer than go-qemu's generated 2.11 schema too) is sent as raw
// JSON.
package qmp

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"strconv"
	"sync"
	"sync/atomic"

	goqmp "github.com/digitalocean/go-qemu/qmp"

	"github.com/xlsnap/xlsnap/errdefs"
	"github.com/xlsnap/xlsnap/internal/fanout"
)

// Sentinels, wrapping errdefs.ErrHypervisor: the device model is the
// hypervisor's part that failed.
var (
	// ErrClosed: the connection is gone (QEMU exited, or Disconnect).
	ErrClosed = fmt.Errorf("%w: QMP connection closed", errdefs.ErrHypervisor)
	// ErrProtocol: QEMU said something that is not QMP.
	ErrProtocol = fmt.Errorf("%w: QMP protocol error", errdefs.ErrHypervisor)
)

// Error is a QMP error reply, with QEMU's class ("GenericError",
// "DeviceNotFound", ...) kept so callers can tell failures apart. It
// unwraps to errdefs.ErrHypervisor.
type Error struct {
	Command string
	Class   string
	Desc    string
}

func (e *Error) Error() string { return fmt.Sprintf("QMP %s: %s: %s", e.Command, e.Class, e.Desc) }
func (e *Error) Unwrap() error { return errdefs.ErrHypervisor }

// IsClass reports whether err is a QMP error of the given class.
func IsClass(err error, class string) bool {
	var qe *Error
	return errors.As(err, &qe) && qe.Class == class
}

// Monitor is one QMP connection. A device model serves one client at a
// time: connect for an operation and let go, never hold it.
type Monitor struct {
	network, addr string

	// Version is what QEMU announced in its greeting.
	Version *goqmp.Version

	conn    net.Conn
	runMu   sync.Mutex // one command in flight
	replies chan []byte
	lastID  uint64

	mu      sync.Mutex
	pending string // the id of the command in flight, "" for none
	subs    map[*subscriber]bool
	closed  chan struct{}
	err     error
	// events counts the events read so far, as they are read.
	events atomic.Uint64
}

// maxLine bounds one QMP message: query-block of a deep chain is tens of
// kilobytes; a device model that sends more without a newline is broken
// and must not make the client hold it all.
const maxLine = 16 << 20

var _ goqmp.Monitor = (*Monitor)(nil)

// New prepares a monitor for a socket; Connect or Dial opens it.
func New(network, addr string) *Monitor {
	return &Monitor{network: network, addr: addr}
}

// Dial connects to a QMP socket and negotiates capabilities.
func Dial(ctx context.Context, network, addr string) (*Monitor, error) {
	m := New(network, addr)
	if err := m.connect(ctx); err != nil {
		return nil, err
	}
	return m, nil
}

// Connect is qmp.Monitor's Connect.
func (m *Monitor) Connect() error { return m.connect(context.Background()) }

func (m *Monitor) connect(ctx context.Context) error {
	var d net.Dialer
	conn, err := d.DialContext(ctx, m.network, m.addr)
	if err != nil {
		return fmt.Errorf("%w: QMP %s: %w", errdefs.ErrHypervisor, m.addr, err)
	}
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	r := bufio.NewReader(conn)
	var greeting struct {
		QMP *struct {
			Version goqmp.Version `json:"version"`
		} `json:"QMP"`
	}
	line, err := readLine(r)
	if err == nil {
		err = json.Unmarshal(line, &greeting)
	}
	if err != nil || greeting.QMP == nil {
		conn.Close()
		if ctx.Err() != nil {
			// A device model that does not greet in time: the caller's
			// deadline, which its code (68) says, not a protocol fault.
			return fmt.Errorf("%w: QMP %s sent no greeting: %w", errdefs.ErrHypervisor, m.addr, ctx.Err())
		}
		return fmt.Errorf("%w: greeting from %s: %q %v", ErrProtocol, m.addr, line, err)
	}
	m.Version = &greeting.QMP.Version
	m.conn = conn
	m.replies = make(chan []byte, 1)
	m.subs = map[*subscriber]bool{}
	m.closed = make(chan struct{})
	go m.read(r)
	if _, err := m.execute(ctx, "qmp_capabilities", nil); err != nil {
		m.Disconnect()
		return err
	}
	return nil
}

// readLine reads one message, at most maxLine bytes.
func readLine(r *bufio.Reader) ([]byte, error) {
	var line []byte
	for {
		part, err := r.ReadSlice('\n')
		if len(line)+len(part) > maxLine {
			return nil, fmt.Errorf("%w: a message longer than %d bytes", ErrProtocol, maxLine)
		}
		line = append(line, part...)
		if err != bufio.ErrBufferFull {
			return line, err
		}
	}
}

// read hands the reply of the command in flight to it, and events to
// subscribers. A reply that is not that command's (a stray, a second
// one) is dropped: it must never pass for the next command's, and the
// reader must never wait for someone to take it.
func (m *Monitor) read(r *bufio.Reader) {
	var err error
	for {
		var line []byte
		if line, err = readLine(r); err != nil {
			break
		}
		var probe struct {
			Event string          `json:"event"`
			ID    json.RawMessage `json:"id"`
		}
		if json.Unmarshal(line, &probe) != nil {
			continue
		}
		if probe.Event != "" {
			m.events.Add(1)
			var ev goqmp.Event
			if json.Unmarshal(line, &ev) == nil {
				m.publish(ev)
			}
			continue
		}
		var id string
		if json.Unmarshal(probe.ID, &id) != nil {
			continue
		}
		m.mu.Lock()
		mine := id != "" && id == m.pending
		if mine {
			m.pending = ""
		}
		m.mu.Unlock()
		if mine {
			m.replies <- line // buffered: the one reply of the one command
		}
	}
	m.mu.Lock()
	m.err = fmt.Errorf("%w: %v", ErrClosed, err)
	for s := range m.subs {
		s.close()
	}
	m.subs = nil
	m.mu.Unlock()
	close(m.closed)
}

// EventCount is how many events QEMU has sent on this connection that
// have been read: a caller keeping an answer (a query-block) across
// commands compares it to tell whether anything happened since (a job
// ended, a device went) that the answer may no longer show.
func (m *Monitor) EventCount() uint64 { return m.events.Load() }

// Closed reports whether the connection is gone (QEMU exited, or
// Disconnect).
func (m *Monitor) Closed() bool {
	if m.closed == nil {
		return true
	}
	select {
	case <-m.closed:
		return true
	default:
		return false
	}
}

// Disconnect closes the connection.
func (m *Monitor) Disconnect() error {
	if m.conn == nil {
		return nil
	}
	err := m.conn.Close()
	<-m.closed
	return err
}

// Run is qmp.Monitor's Run: a raw JSON command in, the raw reply out.
// A QMP error comes back as *Error with its class.
func (m *Monitor) Run(command []byte) ([]byte, error) {
	return m.RunContext(context.Background(), command)
}

// RunContext sends a raw JSON command. If ctx ends first the connection is
// closed: a reply that arrives later could not be told from the next one.
func (m *Monitor) RunContext(ctx context.Context, command []byte) ([]byte, error) {
	var cmd goqmp.Command
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(command, &cmd); err != nil {
		return nil, fmt.Errorf("%w: command is not JSON: %v", ErrProtocol, err)
	}
	if err := json.Unmarshal(command, &fields); err != nil {
		return nil, fmt.Errorf("%w: command is not a JSON object: %v", ErrProtocol, err)
	}
	m.runMu.Lock()
	defer m.runMu.Unlock()
	// QMP echoes a command's id in its reply: the reader matches on it.
	m.lastID++
	id := "xlsnap-" + strconv.FormatUint(m.lastID, 10)
	fields["id"], _ = json.Marshal(id)
	line, err := json.Marshal(fields)
	if err != nil {
		return nil, err
	}
	m.mu.Lock()
	m.pending = id
	m.mu.Unlock()
	defer func() {
		m.mu.Lock()
		m.pending = ""
		m.mu.Unlock()
	}()
	if _, err := m.conn.Write(append(line, '\n')); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrClosed, err)
	}
	select {
	case line := <-m.replies:
		var resp struct {
			Return json.RawMessage `json:"return"`
			Error  *struct {
				Class string `json:"class"`
				Desc  string `json:"desc"`
			} `json:"error"`
		}
		if err := json.Unmarshal(line, &resp); err != nil {
			return nil, fmt.Errorf("%w: reply %q", ErrProtocol, line)
		}
		if resp.Error != nil {
			return line, &Error{Command: cmd.Execute, Class: resp.Error.Class, Desc: resp.Error.Desc}
		}
		return line, nil
	case <-m.closed:
		return nil, m.closeErr()
	case <-ctx.Done():
		m.conn.Close()
		return nil, ctx.Err()
	}
}

func (m *Monitor) closeErr() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.err
}

// Execute runs a command with arguments and decodes its "return" into
// result (when not nil).
func (m *Monitor) Execute(ctx context.Context, command string, args, result any) error {
	ret, err := m.execute(ctx, command, args)
	if err != nil || result == nil {
		return err
	}
	if err := json.Unmarshal(ret, result); err != nil {
		return fmt.Errorf("%w: %s returned %s: %v", ErrProtocol, command, ret, err)
	}
	return nil
}

func (m *Monitor) execute(ctx context.Context, command string, args any) (json.RawMessage, error) {
	raw, err := json.Marshal(goqmp.Command{Execute: command, Args: args})
	if err != nil {
		return nil, err
	}
	line, err := m.RunContext(ctx, raw)
	if err != nil {
		return nil, err
	}
	var resp struct {
		Return json.RawMessage `json:"return"`
	}
	if err := json.Unmarshal(line, &resp); err != nil {
		return nil, fmt.Errorf("%w: reply %q", ErrProtocol, line)
	}
	return resp.Return, nil
}

// subscriber queues events so a slow reader never stalls the connection.
type subscriber struct {
	queue *fanout.Queue[goqmp.Event]
	done  chan struct{}
	once  sync.Once
}

func (s *subscriber) close() { s.once.Do(func() { close(s.done) }) }

// Events is qmp.Monitor's Events: every event from now until ctx ends or
// the connection closes.
func (m *Monitor) Events(ctx context.Context) (<-chan goqmp.Event, error) {
	s := &subscriber{queue: fanout.New[goqmp.Event](), done: make(chan struct{})}
	m.mu.Lock()
	if m.subs == nil {
		m.mu.Unlock()
		return nil, m.closeErr()
	}
	m.subs[s] = true
	m.mu.Unlock()
	out := make(chan goqmp.Event)
	go func() {
		defer close(out)
		defer func() {
			m.mu.Lock()
			delete(m.subs, s)
			m.mu.Unlock()
		}()
		s.queue.Drain(ctx, out, s.done)
	}()
	return out, nil
}

func (m *Monitor) publish(ev goqmp.Event) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for s := range m.subs {
		s.queue.Push(ev)
	}
}

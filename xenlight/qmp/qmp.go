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
	"sync"

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
	runMu   sync.Mutex // one command in flight: replies carry no ids
	replies chan []byte

	mu     sync.Mutex
	subs   map[*subscriber]bool
	closed chan struct{}
	err    error
}

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
	line, err := r.ReadBytes('\n')
	if err == nil {
		err = json.Unmarshal(line, &greeting)
	}
	if err != nil || greeting.QMP == nil {
		conn.Close()
		return fmt.Errorf("%w: greeting from %s: %q %v", ErrProtocol, m.addr, line, ctxErr(ctx, err))
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

func ctxErr(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return ctx.Err()
	}
	return err
}

// read hands replies to the command waiting and events to subscribers.
func (m *Monitor) read(r *bufio.Reader) {
	var err error
	for {
		var line []byte
		if line, err = r.ReadBytes('\n'); err != nil {
			break
		}
		var probe struct {
			Event string `json:"event"`
		}
		if json.Unmarshal(line, &probe) != nil {
			continue
		}
		if probe.Event != "" {
			var ev goqmp.Event
			if json.Unmarshal(line, &ev) == nil {
				m.publish(ev)
			}
			continue
		}
		m.replies <- line
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
	if err := json.Unmarshal(command, &cmd); err != nil {
		return nil, fmt.Errorf("%w: command is not JSON: %v", ErrProtocol, err)
	}
	m.runMu.Lock()
	defer m.runMu.Unlock()
	if _, err := m.conn.Write(append(command, '\n')); err != nil {
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

// Package serve speaks libvirt's remote RPC protocol on a Unix socket, so
// stock virsh, virt-manager and every libvirt binding reach xlsnap's
// domain snapshots: the snapshot procedures are answered from the driver
// in libvirt's terms (flags, error codes, error structure), and, without
// an upstream daemon, the few domain calls those clients make around
// them are answered from the driver's domain source.
//
// The RPC structures are go-libvirt's, generated from libvirt's
// remote_protocol.x; the XDR coding is go-xdr, which go-libvirt's own
// coder is a fork of.
package serve

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"

	"github.com/digitalocean/go-libvirt/socket"

	"github.com/xlsnap/xlsnap/driver"
	"github.com/xlsnap/xlsnap/xenlight"
)

// maxClientRequests is libvirtd's max_client_requests default: calls of
// one client run at once up to this; past it the server stops reading
// that client until one ends, as libvirtd does.
const maxClientRequests = 5

// Config says what a Server serves.
type Config struct {
	// Driver answers the snapshot procedures.
	Driver *driver.Driver
	// Source answers domain lookups, lists and definitions.
	Source driver.DomainSource
	// Hypervisor, when set, says which domains run; without it every
	// domain is as the source reports it.
	Hypervisor xenlight.Hypervisor
	// Upstream, when set, is the read-write socket of a libvirt daemon
	// (libvirtd, virtxend, virtqemud) every procedure but the snapshot
	// ones is relayed to, unchanged; UpstreamRO is its read-only socket,
	// which read-only listeners relay to. Driver's source should then be
	// a connection to the same daemon.
	Upstream, UpstreamRO string
	// Logf reports what happens to connections (closed for a bad packet,
	// refused credentials); nil is silent.
	Logf func(format string, args ...any)
}

// Server answers libvirt remote-protocol clients. It is safe for
// concurrent use; each connection runs on its own goroutines.
type Server struct {
	cfg Config
	// ctx is the life of the server: calls run under it, not under
	// their connection, so a client that goes away mid-call leaves the
	// operation to finish (or be undone) whole, as libvirtd does.
	ctx    context.Context
	cancel context.CancelFunc

	// defineMu makes a define's checks and its write one step.
	defineMu sync.Mutex

	mu    sync.Mutex
	conns map[*conn]struct{}
	wg    sync.WaitGroup
}

// New returns a Server for cfg. Close ends it.
func New(cfg Config) *Server {
	ctx, cancel := context.WithCancel(context.Background())
	return &Server{cfg: cfg, ctx: ctx, cancel: cancel, conns: map[*conn]struct{}{}}
}

func (s *Server) logf(format string, args ...any) {
	if s.cfg.Logf != nil {
		s.cfg.Logf(format, args...)
	}
}

// Serve accepts connections on l until l is closed, serving each as a
// client of a read-write socket, or of a read-only one (every changing
// call refused with VIR_ERR_OPERATION_DENIED, as on libvirtd's
// libvirt-sock-ro). A non-nil allow is asked about every connection
// first (peer credentials, see Listen).
//
// Errors: l's Accept error once it is closed (net.ErrClosed).
func (s *Server) Serve(l net.Listener, readOnly bool, allow func(net.Conn) error) error {
	for {
		nc, err := l.Accept()
		if err != nil {
			return err
		}
		if allow != nil {
			if err := allow(nc); err != nil {
				s.logf("refused connection: %v", err)
				nc.Close()
				continue
			}
		}
		c := &conn{s: s, nc: nc, readOnly: readOnly, inflight: map[int32]bool{}, slots: make(chan struct{}, maxClientRequests)}
		upstream := s.cfg.Upstream
		if readOnly {
			upstream = s.cfg.UpstreamRO
		}
		s.mu.Lock()
		s.conns[c] = struct{}{}
		s.mu.Unlock()
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			if upstream != "" {
				c.relay(upstream)
			} else {
				c.serve()
			}
			s.mu.Lock()
			delete(s.conns, c)
			s.mu.Unlock()
		}()
	}
}

// Close closes every connection and waits for their calls to end; it
// does not close listeners (their owner does).
func (s *Server) Close() error {
	s.cancel()
	s.mu.Lock()
	for c := range s.conns {
		c.nc.Close()
	}
	s.mu.Unlock()
	s.wg.Wait()
	return nil
}

// conn is one client connection.
type conn struct {
	s        *Server
	nc       net.Conn
	readOnly bool

	wmu sync.Mutex // one packet at a time on the wire

	mu     sync.Mutex
	opened bool
	// condemned: the connection broke the protocol and is closing; no
	// call read after that point runs, though the reader may still hold
	// it buffered.
	condemned bool
	uri       string
	// openSerial is the serial of the CONNECT_OPEN relayed upstream.
	openSerial int32
	inflight   map[int32]bool
	slots      chan struct{}
	calls      sync.WaitGroup
}

// serve reads packets until the client goes or breaks the protocol.
func (c *conn) serve() {
	defer func() {
		c.nc.Close()
		c.calls.Wait()
	}()
	r := bufio.NewReader(c.nc)
	for !c.isCondemned() {
		p, err := ReadPacket(r)
		if err != nil {
			if !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) {
				c.condemn(err)
			}
			return
		}
		if err := c.dispatch(p); err != nil {
			c.condemn(err)
			return
		}
	}
}

// condemn closes the connection for err, logging it once however many
// of its calls fail on the way.
func (c *conn) condemn(err error) {
	c.mu.Lock()
	first := !c.condemned
	c.condemned = true
	c.mu.Unlock()
	if first {
		c.s.logf("closing connection: %v", err)
	}
	c.nc.Close()
}

func (c *conn) isCondemned() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.condemned
}

// dispatch takes one packet; an error closes the connection.
func (c *conn) dispatch(p *Packet) error {
	switch p.Program {
	case ProgramKeepalive:
		// Keepalive is a MESSAGE exchange (virkeepalive.c): a PING is
		// answered at once, even while calls run; a PONG needs nothing
		// since the server sends no PING.
		if p.Version != keepaliveVersion || p.Type != socket.Message || len(p.Body) != 0 {
			return fmt.Errorf("%w: keepalive packet version %d type %d with %d body bytes", ErrMalformed, p.Version, p.Type, len(p.Body))
		}
		switch p.Procedure {
		case procPing:
			return c.write(&Packet{Header: socket.Header{Program: ProgramKeepalive, Version: keepaliveVersion, Procedure: procPong, Type: socket.Message}})
		case procPong:
			return nil
		}
		return fmt.Errorf("%w: keepalive procedure %d", ErrMalformed, p.Procedure)
	case ProgramRemote:
		if p.Version != ProtocolVersion {
			return c.refuse(p, fmt.Sprintf("Cannot find program %d version %d", p.Program, p.Version))
		}
	default:
		return c.refuse(p, fmt.Sprintf("Cannot find program %d version %d", p.Program, p.Version))
	}
	// Only calls come from a client here: a reply, an event or stream
	// data with no stream open is out of order.
	if p.Type != socket.Call {
		return c.refuse(p, fmt.Sprintf("Unexpected message type %d", p.Type))
	}
	if p.Status != socket.StatusOK {
		return c.refuse(p, fmt.Sprintf("Unexpected message status %d", p.Status))
	}
	return c.start(p)
}

// start runs a call: the connection's own calls in order with the
// reading, the others concurrently, at most maxClientRequests at once.
func (c *conn) start(p *Packet) error {
	c.mu.Lock()
	dup := c.inflight[p.Serial]
	if !dup {
		c.inflight[p.Serial] = true
	}
	c.mu.Unlock()
	if dup {
		return c.refuse(p, fmt.Sprintf("call serial %d is already running", p.Serial))
	}
	// Arguments are decoded here, in the reading, so a call that does
	// not decode condemns the connection before the next packet is
	// taken.
	h, known := handlers[p.Procedure]
	var fn run
	if known {
		var err error
		if fn, err = h.decode(p.Body); err != nil {
			c.reply(p, nil, &Error{Code: codeRPC, Domain: fromRPC, Detail: "Unable to decode message payload"})
			return err
		}
	}
	// The connection's own calls (auth, open, close, features) run in
	// order with the reading, so a call read after CONNECT_OPEN always
	// finds the connection open.
	if known && (h.beforeOpen || p.Procedure == procConnectClose) {
		return c.call(p, h, fn)
	}
	c.slots <- struct{}{}
	// A call that failed while this one waited for its slot may have
	// condemned the connection.
	if c.isCondemned() {
		<-c.slots
		return nil
	}
	c.calls.Add(1)
	go func() {
		defer c.calls.Done()
		err := c.call(p, h, fn)
		<-c.slots
		if err != nil {
			c.condemn(err)
		}
	}()
	return nil
}

// refuse answers a packet the protocol does not allow with libvirt's
// VIR_ERR_RPC reply (when it is a call: there is a caller to tell) and
// then closes the connection.
func (c *conn) refuse(p *Packet, msg string) error {
	if p.Type == socket.Call {
		c.reply(p, nil, &Error{Code: codeRPC, Domain: fromRPC, Detail: msg})
	}
	return fmt.Errorf("%w: %s", ErrMalformed, msg)
}

// call runs one call, fn of handler h (nil for a procedure without
// one), and sends its reply. An error is one that closes the connection
// (a reply that cannot be sent).
func (c *conn) call(p *Packet, h handler, fn run) error {
	if fn == nil {
		// libvirt's dispatcher (virnetserverprogram.c) for a procedure
		// it has no handler for.
		return c.reply(p, nil, &Error{Code: codeRPC, Domain: fromRPC, Detail: fmt.Sprintf("unknown procedure: %d", p.Procedure)})
	}
	c.mu.Lock()
	opened := c.opened
	c.mu.Unlock()
	if !opened && !h.beforeOpen {
		return c.reply(p, nil, &Error{Code: 1, Domain: fromRPC, Detail: "connection not open"})
	}
	if h.changes != "" && c.isReadOnly() {
		return c.reply(p, nil, errReadOnly(h.changes))
	}
	ret, err := fn(c.s.ctx, c)
	return c.reply(p, ret, err)
}

func (c *conn) isReadOnly() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.readOnly
}

// reply sends ret (a go-libvirt remote_*_ret value, or nil) or, for a
// non-nil err, libvirt's error structure.
func (c *conn) reply(p *Packet, ret any, err error) error {
	h := socket.Header{Program: p.Program, Version: p.Version, Procedure: p.Procedure, Type: socket.Reply, Serial: p.Serial, Status: socket.StatusOK}
	var body []byte
	if err == nil {
		body, err = encodeRet(ret)
	}
	if err != nil {
		h.Status = socket.StatusError
		if body, err = encodeRet(toRemote(err, fromDomainSnapshot)); err != nil {
			return err
		}
	}
	// The serial is free again once its reply is on its way: a client
	// may reuse it as soon as it reads the reply.
	c.mu.Lock()
	delete(c.inflight, p.Serial)
	c.mu.Unlock()
	return c.write(&Packet{Header: h, Body: body})
}

func (c *conn) write(p *Packet) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	_, err := c.nc.Write(p.Encode())
	return err
}

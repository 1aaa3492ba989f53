package libvirt_test

import (
	"bufio"
	"encoding/binary"
	"errors"
	"io"
	"io/fs"
	"net"
	"os"
	"sync"
	"testing"
)

// libvirt's RPC ABI (src/rpc/virnetprotocol.x, src/remote/remote_protocol.x):
// the program of every API call, the message type of a call and of its
// reply, and the procedures the tests stop at.
const (
	programRemote = 0x20008086
	typeCall      = 0
	typeReply     = 1

	procDomainDefineXML  = 11  // REMOTE_PROC_DOMAIN_DEFINE_XML
	procDomainGetXMLDesc = 14  // REMOTE_PROC_DOMAIN_GET_XML_DESC
	procDomainGetState   = 212 // REMOTE_PROC_DOMAIN_GET_STATE
)

// rpcProxy stands between libvirt clients and a daemon's socket, passing
// every packet both ways, and can run a function (kill the daemon) the
// moment a chosen call reaches it: before the daemon sees the call, or
// once the daemon answered it, the answer then never reaching the client.
// Not a fake: the daemon does all the work. It dials the daemon afresh
// for each client, so a client that connects again after the daemon
// restarted reaches the new one.
type rpcProxy struct {
	t        *testing.T
	socket   string
	upstream string
	wg       sync.WaitGroup

	mu    sync.Mutex
	l     *net.UnixListener
	open  map[net.Conn]bool
	trap  *rpcTrap
	calls []uint32
}

type rpcTrap struct {
	proc     uint32
	flags    int64
	answered bool
	then     func()
	fired    chan struct{}
}

// anyFlags matches a call whatever its flags.
const anyFlags = -1

// startRPCProxy listens on socket and forwards to upstream; the test's
// cleanup stops it.
func startRPCProxy(t *testing.T, socket, upstream string) *rpcProxy {
	t.Helper()
	p := &rpcProxy{t: t, socket: socket, upstream: upstream, open: map[net.Conn]bool{}}
	t.Cleanup(func() {
		p.Down()
		p.mu.Lock()
		for c := range p.open {
			c.Close()
		}
		p.mu.Unlock()
		p.wg.Wait()
	})
	p.Up()
	return p
}

// Up takes connections (again).
func (p *rpcProxy) Up() {
	p.t.Helper()
	// A socket Down left behind is no one's.
	if err := os.Remove(p.socket); err != nil && !errors.Is(err, fs.ErrNotExist) {
		p.t.Fatal(err)
	}
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: p.socket, Net: "unix"})
	if err != nil {
		p.t.Fatal(err)
	}
	p.mu.Lock()
	p.l = l
	p.mu.Unlock()
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			p.wg.Add(1)
			go func() {
				defer p.wg.Done()
				p.serve(c)
			}()
		}
	}()
}

// Down stops taking connections as a killed daemon does: its socket file
// stays, and a client is refused (ECONNREFUSED). Connections it took
// end as the daemon's do.
func (p *rpcProxy) Down() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.l != nil {
		p.l.SetUnlinkOnClose(false)
		p.l.Close()
		p.l = nil
	}
}

// At arms the proxy: at the next call of procedure proc whose flags (its
// last argument, as in every procedure that has them) are flags, or with
// any flags for anyFlags, then runs (before the daemon sees the call, or
// once it answered it when answered is set) and the client's connection
// is dropped. The channel is closed once then ran.
func (p *rpcProxy) At(proc uint32, flags int64, answered bool, then func()) <-chan struct{} {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.trap = &rpcTrap{proc: proc, flags: flags, answered: answered, then: then, fired: make(chan struct{})}
	return p.trap.fired
}

// Calls returns the procedures called through the proxy since the last
// Calls, in order.
func (p *rpcProxy) Calls() []uint32 {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := p.calls
	p.calls = nil
	return out
}

// packet is one RPC message as it travels, length word included, and the
// header fields the proxy reads.
type packet struct {
	raw                []byte
	program, proc, typ uint32
	serial             uint32
}

func readPacket(r io.Reader) (*packet, error) {
	var lw [4]byte
	if _, err := io.ReadFull(r, lw[:]); err != nil {
		return nil, err
	}
	n := binary.BigEndian.Uint32(lw[:])
	if n < 28 || n > 64<<20 {
		return nil, io.ErrUnexpectedEOF
	}
	raw := make([]byte, n)
	copy(raw, lw[:])
	if _, err := io.ReadFull(r, raw[4:]); err != nil {
		return nil, err
	}
	be := binary.BigEndian
	return &packet{raw: raw, program: be.Uint32(raw[4:]), proc: be.Uint32(raw[12:]), typ: be.Uint32(raw[16:]), serial: be.Uint32(raw[20:])}, nil
}

// take reports whether pk is the armed call, disarming the proxy if so.
func (p *rpcProxy) take(pk *packet) *rpcTrap {
	p.mu.Lock()
	defer p.mu.Unlock()
	if pk.program != programRemote || pk.typ != typeCall {
		return nil
	}
	p.calls = append(p.calls, pk.proc)
	tr := p.trap
	if tr == nil || tr.proc != pk.proc || tr.flags != anyFlags && int64(binary.BigEndian.Uint32(pk.raw[len(pk.raw)-4:])) != tr.flags {
		return nil
	}
	p.trap = nil
	return tr
}

// track keeps c until the proxy's cleanup, which closes what is left.
func (p *rpcProxy) track(c net.Conn) func() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.open[c] = true
	return func() {
		p.mu.Lock()
		defer p.mu.Unlock()
		delete(p.open, c)
		c.Close()
	}
}

func (p *rpcProxy) serve(client net.Conn) {
	defer p.track(client)()
	server, err := net.Dial("unix", p.upstream)
	if err != nil {
		return // the daemon is down: the client finds its connection closed
	}
	defer p.track(server)()
	var mu sync.Mutex
	var pending *rpcTrap // answered trap, waiting for the reply to serial
	var serial uint32
	done := make(chan struct{})
	go func() {
		defer close(done)
		defer client.Close()
		r := bufio.NewReader(server)
		for {
			pk, err := readPacket(r)
			if err != nil {
				return
			}
			mu.Lock()
			tr := pending
			mu.Unlock()
			if tr != nil && pk.typ == typeReply && pk.serial == serial {
				tr.then()
				close(tr.fired)
				return
			}
			if _, err := client.Write(pk.raw); err != nil {
				return
			}
		}
	}()
	r := bufio.NewReader(client)
	for {
		pk, err := readPacket(r)
		if err != nil {
			break
		}
		if tr := p.take(pk); tr != nil {
			if !tr.answered {
				tr.then()
				close(tr.fired)
				break
			}
			mu.Lock()
			pending, serial = tr, pk.serial
			mu.Unlock()
		}
		if _, err := server.Write(pk.raw); err != nil {
			break
		}
	}
	client.Close()
	server.Close()
	<-done
}

package qemutest

import (
	"bufio"
	"bytes"
	"net"
	"sync"
	"testing"
)

// Proxy stands between QMP clients and QEMU's monitor socket, passing
// every line both ways, and can drop a connection the moment a chosen
// command has reached QEMU: the peer that closes mid-command, which a
// client must survive. Not a fake: QEMU still runs the command.
type Proxy struct {
	l        net.Listener
	mu       sync.Mutex
	cut      string // drop after a client line holding this; "" for none
	onCut    func()
	cutCount int
}

// StartProxy listens on socket and forwards each connection to upstream
// (QEMU's socket); the test's cleanup stops it.
func StartProxy(t testing.TB, socket, upstream string) *Proxy {
	t.Helper()
	l, err := net.Listen("unix", socket)
	if err != nil {
		t.Fatal(err)
	}
	p := &Proxy{l: l}
	var wg sync.WaitGroup
	t.Cleanup(func() { l.Close(); wg.Wait() })
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				p.serve(c, upstream)
			}()
		}
	}()
	return p
}

// CutAfter makes the proxy drop the client that sends the next line
// holding match, then pass the line to QEMU, which answers into the
// void; then (if not nil) runs once that answer came (a job the command
// started is running by then).
func (p *Proxy) CutAfter(match string, then func()) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.cut, p.onCut = match, then
}

// Close stops listening and removes the socket, as a device model that
// died leaves nothing to connect to.
func (p *Proxy) Close() error { return p.l.Close() }

// Cuts is how many connections the proxy dropped.
func (p *Proxy) Cuts() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.cutCount
}

func (p *Proxy) serve(client net.Conn, upstream string) {
	server, err := net.Dial("unix", upstream)
	if err != nil {
		client.Close()
		return
	}
	// The client is dropped at once; QEMU's end stays open until the
	// command's reply comes, so QEMU runs it (a monitor closed first
	// drops the commands it has not dispatched yet).
	cut := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		defer server.Close()
		r := bufio.NewReader(server)
		for {
			line, err := r.ReadBytes('\n')
			select {
			case <-cut:
				if !bytes.Contains(line, []byte(`"event"`)) && len(line) > 0 {
					return // the reply to the command that was cut
				}
			default:
				client.Write(line)
			}
			if err != nil {
				client.Close()
				return
			}
		}
	}()
	r := bufio.NewReader(client)
	for {
		line, err := r.ReadBytes('\n')
		if len(line) > 0 {
			if cutting, then := p.cutNow(line); cutting {
				close(cut)
				client.Close()
				server.Write(line)
				<-done
				if then != nil {
					then()
				}
				return
			}
			if _, werr := server.Write(line); werr != nil {
				break
			}
		}
		if err != nil {
			break
		}
	}
	client.Close()
	server.Close()
	<-done
}

func (p *Proxy) cutNow(line []byte) (bool, func()) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cut == "" || !bytes.Contains(line, []byte(p.cut)) {
		return false, nil
	}
	then := p.onCut
	p.cut, p.onCut = "", nil
	p.cutCount++
	return true, then
}

package serve

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"

	"github.com/digitalocean/go-libvirt/socket"
)

// relay serves a client in front of an upstream daemon: one upstream
// connection per client, every packet copied unchanged both ways (calls,
// replies, events, stream data, keepalive) except the snapshot
// procedures' calls, which the driver answers here under the client's
// serial. The upstream never sees those serials, and a client never has
// two calls of one serial in flight, so replies cannot be confused.
// Packets are read with the same bounds in both directions; a broken
// client or upstream ends this pair of connections only.
func (c *conn) relay(path string) {
	defer func() {
		c.nc.Close()
		c.calls.Wait()
	}()
	up, err := net.Dial("unix", path)
	if err != nil {
		c.s.logf("closing connection: upstream: %v", err)
		return
	}
	defer up.Close()
	go func() {
		defer c.nc.Close()
		r := bufio.NewReader(up)
		for {
			p, err := ReadPacket(r)
			if err != nil {
				if !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) {
					c.s.logf("closing connection: from upstream: %v", err)
				}
				return
			}
			c.sawUpstream(p)
			if c.write(p) != nil {
				return
			}
		}
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
		if err := c.relayOne(p, up); err != nil {
			c.condemn(err)
			return
		}
	}
}

// relayOne answers a snapshot call here or sends p upstream.
func (c *conn) relayOne(p *Packet, up net.Conn) error {
	if p.Program == ProgramRemote && p.Version == ProtocolVersion {
		switch {
		case p.Type == socket.Call && slices.Contains(SnapshotProcedures, p.Procedure):
			if p.Status != socket.StatusOK {
				return c.refuse(p, fmt.Sprintf("Unexpected message status %d", p.Status))
			}
			return c.start(p)
		case p.Type == socket.Call && p.Procedure == procConnectOpen:
			// The upstream opens the connection; its reply, seen on
			// the way back, opens it here too. A read-only open makes
			// the snapshot calls read-only as well.
			a, err := decodeConnectOpen(p.Body)
			if err != nil {
				return err
			}
			c.mu.Lock()
			c.openSerial = p.Serial
			if a.Flags&connectRO != 0 {
				c.readOnly = true
			}
			c.mu.Unlock()
		case p.Type == socket.CallWithFDs:
			// File descriptors travel beside the packet (SCM_RIGHTS);
			// the relay does not carry them, so say so rather than
			// send the upstream a call without its files.
			return c.reply(p, nil, &Error{Code: codeRPC, Domain: fromRPC, Detail: "calls with file descriptors are not relayed by xlsnap"})
		}
	}
	_, err := up.Write(p.Encode())
	return err
}

// sawUpstream notes the upstream's answer to the client's CONNECT_OPEN.
func (c *conn) sawUpstream(p *Packet) {
	if p.Program != ProgramRemote || p.Type != socket.Reply || p.Procedure != procConnectOpen {
		return
	}
	c.mu.Lock()
	if p.Serial == c.openSerial && p.Status == socket.StatusOK {
		c.opened = true
	}
	c.mu.Unlock()
}

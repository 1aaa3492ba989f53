package serve

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	libvirt "github.com/digitalocean/go-libvirt"
	"github.com/digitalocean/go-libvirt/socket"
	"github.com/digitalocean/go-libvirt/socket/dialers"

	"github.com/xlsnap/xlsnap/driver"
	"github.com/xlsnap/xlsnap/errdefs"
)

const testDomainXML = `<domain type='xen'>
  <name>web</name>
  <uuid>4dea22b3-1d52-d8f3-2516-782e98ab3fa0</uuid>
  <memory unit='MiB'>256</memory>
  <vcpu>2</vcpu>
  <os><type>xen</type></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='%s'/>
      <target dev='xvda' bus='xen'/>
    </disk>
  </devices>
</domain>
`

// testServer serves a folder with one domain, web, on a read-write and a
// read-only socket; it returns their paths.
func testServer(t testing.TB) (rw, ro string) {
	t.Helper()
	rw, ro, _ = testServerDriver(t)
	return rw, ro
}

// testServerDriver is testServer that also returns the driver it serves,
// for calls made directly beside those through the socket.
func testServerDriver(t testing.TB) (rw, ro string, d *driver.Driver) {
	t.Helper()
	rw, ro, d, _ = testServerLogf(t, t.Logf)
	return rw, ro, d
}

// testServerLogf is testServerDriver with the server's log going to
// logf; it also returns the server.
func testServerLogf(t testing.TB, logf func(string, ...any)) (rw, ro string, d *driver.Driver, srv *Server) {
	t.Helper()
	dir := t.TempDir()
	img := filepath.Join(dir, "web.qcow2")
	if out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", img, "1M").CombinedOutput(); err != nil {
		t.Fatalf("qemu-img create: %v\n%s", err, out)
	}
	if err := os.WriteFile(filepath.Join(dir, "web.xml"), fmt.Appendf(nil, testDomainXML, img), 0o600); err != nil {
		t.Fatal(err)
	}
	src, err := driver.NewDirSource(dir)
	if err != nil {
		t.Fatal(err)
	}
	d, err = driver.Open(context.Background(), driver.Config{StateDir: t.TempDir(), Source: src})
	if err != nil {
		t.Fatal(err)
	}
	srv = New(Config{Driver: d, Source: src, Logf: logf})
	sockets := t.TempDir()
	rw, ro = filepath.Join(sockets, "rw.sock"), filepath.Join(sockets, "ro.sock")
	for _, s := range []struct {
		path string
		ro   bool
	}{{rw, false}, {ro, true}} {
		l, err := Listen(s.path, OwnerOnly())
		if err != nil {
			t.Fatal(err)
		}
		go srv.Serve(l, s.ro, PeerCheck(OwnerOnly()))
		t.Cleanup(func() { l.Close() })
	}
	t.Cleanup(func() { srv.Close(); d.Close() })
	return rw, ro, d, srv
}

// goClient is go-libvirt's own client on path, opened.
func goClient(t testing.TB, path string) *libvirt.Libvirt {
	t.Helper()
	l := libvirt.NewWithDialer(dialers.NewLocal(dialers.WithSocket(path)))
	if err := l.ConnectToURI(libvirt.XenSystem); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Disconnect() })
	return l
}

// TestGoLibvirtClient takes, lists, reverts and deletes snapshots through
// go-libvirt's client, a third implementation of the protocol.
func TestGoLibvirtClient(t *testing.T) {
	rw, _ := testServer(t)
	l := goClient(t, rw)
	dom, err := l.DomainLookupByName("web")
	if err != nil {
		t.Fatal(err)
	}
	if dom.UUID[0] != 0x4d || dom.ID != -1 {
		t.Fatalf("domain %+v", dom)
	}
	for _, name := range []string{"s1", "s2"} {
		s, err := l.DomainSnapshotCreateXML(dom, "<domainsnapshot><name>"+name+"</name></domainsnapshot>", uint32(driver.CreateDiskOnly))
		if err != nil || s.Name != name {
			t.Fatalf("create %s: %+v %v", name, s, err)
		}
	}
	snaps, n, err := l.DomainListAllSnapshots(dom, 1, 0)
	if err != nil || n != 2 || len(snaps) != 2 {
		t.Fatalf("list: %v %d %v", snaps, n, err)
	}
	s2, err := l.DomainSnapshotLookupByName(dom, "s2", 0)
	if err != nil {
		t.Fatal(err)
	}
	if p, err := l.DomainSnapshotGetParent(s2, 0); err != nil || p.Name != "s1" {
		t.Fatalf("parent %+v %v", p, err)
	}
	if cur, err := l.DomainSnapshotIsCurrent(s2, 0); err != nil || cur != 1 {
		t.Fatalf("current %d %v", cur, err)
	}
	if err := l.DomainRevertToSnapshot(libvirt.DomainSnapshot{Name: "s1", Dom: dom}, 0); err != nil {
		t.Fatal(err)
	}
	if err := l.DomainSnapshotDelete(s2, 0); err != nil {
		t.Fatal(err)
	}
	if names, err := l.DomainSnapshotListNames(dom, 10, 0); err != nil || strings.Join(names, ",") != "s1" {
		t.Fatalf("names %v %v", names, err)
	}
	_, err = l.DomainSnapshotLookupByName(dom, "nosuch", 0)
	var le libvirt.Error
	if !errors.As(err, &le) || le.Code != uint32(errdefs.CodeNoDomainSnapshot) ||
		le.Message != "Domain snapshot not found: no domain snapshot with matching name 'nosuch'" {
		t.Fatalf("lookup of a missing snapshot: %#v", err)
	}
	_, err = l.DomainLookupByName("nosuch")
	if !errors.As(err, &le) || le.Code != uint32(errdefs.CodeNoDomain) {
		t.Fatalf("lookup of a missing domain: %#v", err)
	}
}

// TestReadOnlySocket refuses every changing call and answers reads.
func TestReadOnlySocket(t *testing.T) {
	_, ro := testServer(t)
	l := goClient(t, ro)
	dom, err := l.DomainLookupByName("web")
	if err != nil {
		t.Fatal(err)
	}
	_, err = l.DomainSnapshotCreateXML(dom, "<domainsnapshot/>", uint32(driver.CreateDiskOnly))
	var le libvirt.Error
	if !errors.As(err, &le) || le.Code != uint32(errdefs.CodeOperationDenied) ||
		le.Message != "operation forbidden: read only access prevents virDomainSnapshotCreateXML" {
		t.Fatalf("create on a read-only socket: %#v", err)
	}
	if _, n, err := l.DomainListAllSnapshots(dom, 1, 0); err != nil || n != 0 {
		t.Fatalf("list on a read-only socket: %d %v", n, err)
	}
}

// rawConn is a client that writes packets by hand.
type rawConn struct {
	t  *testing.T
	c  net.Conn
	rd *bufio.Reader
}

func dialRaw(t *testing.T, path string) *rawConn {
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(10 * time.Second))
	return &rawConn{t: t, c: c, rd: bufio.NewReader(c)}
}

func (r *rawConn) send(prog, proc, typ uint32, serial int32, args any) {
	r.t.Helper()
	body, err := encodeRet(args)
	if err != nil {
		r.t.Fatal(err)
	}
	p := &Packet{Header: socket.Header{Program: prog, Version: 1, Procedure: proc, Type: typ, Serial: serial}, Body: body}
	if _, err := r.c.Write(p.Encode()); err != nil {
		r.t.Fatal(err)
	}
}

func (r *rawConn) recv() (*Packet, error) { return ReadPacket(r.rd) }

// recvError reads a reply that must be an error and decodes it.
func (r *rawConn) recvError() *remoteError {
	r.t.Helper()
	p, err := r.recv()
	if err != nil || p.Status != socket.StatusError {
		r.t.Fatalf("want an error reply, got %+v, %v", p, err)
	}
	var e remoteError
	if err := decodeArgs(p.Body, &e); err != nil {
		r.t.Fatal(err)
	}
	return &e
}

func (r *rawConn) open() {
	r.t.Helper()
	r.send(ProgramRemote, procConnectOpen, socket.Call, 1, &libvirt.ConnectOpenArgs{Name: libvirt.OptString{"xen:///system"}})
	if p, err := r.recv(); err != nil || p.Status != socket.StatusOK {
		r.t.Fatalf("open: %+v %v", p, err)
	}
}

// TestProtocolErrors: libvirt's answers to what its dispatcher refuses,
// and a broken client closed without disturbing another.
func TestProtocolErrors(t *testing.T) {
	rw, _ := testServer(t)
	good := dialRaw(t, rw)
	good.open()

	// Keepalive: a PING is answered by a PONG.
	good.send(ProgramKeepalive, procPing, socket.Message, 0, nil)
	if p, err := good.recv(); err != nil || p.Program != ProgramKeepalive || p.Procedure != procPong {
		t.Fatalf("ping: %+v %v", p, err)
	}
	// An unknown procedure is libvirt's RPC error; the connection stays.
	good.send(ProgramRemote, 9999, socket.Call, 2, nil)
	if e := good.recvError(); e.Code != int32(codeRPC) || e.Message[0] != "unknown procedure: 9999" {
		t.Fatalf("unknown procedure: %+v", e)
	}
	// A call before CONNECT_OPEN.
	early := dialRaw(t, rw)
	early.send(ProgramRemote, procDomainLookupByName, socket.Call, 1, &libvirt.DomainLookupByNameArgs{Name: "web"})
	if e := early.recvError(); e.Code != 1 || e.Message[0] != "internal error: connection not open" {
		t.Fatalf("call before open: %+v", e)
	}

	for _, tc := range []struct {
		name  string
		write func(r *rawConn)
		reply bool // an RPC error reply comes before the close
	}{
		{"oversized", func(r *rawConn) { r.c.Write(rawPacket(MessageMax+lenWord+1, nil, nil)) }, false},
		{"short", func(r *rawConn) { r.c.Write(rawPacket(8, []uint32{1}, nil)) }, false},
		{"reply from a client", func(r *rawConn) { r.send(ProgramRemote, procAuthList, socket.Reply, 3, nil) }, false},
		{"garbled arguments", func(r *rawConn) {
			r.send(ProgramRemote, procDomainLookupByName, socket.Call, 3, &struct{ N uint32 }{1 << 30})
		}, true},
		{"duplicate serial", func(r *rawConn) {
			// Two creates on serial 5 back to back: the second arrives
			// while the first runs.
			args := &libvirt.DomainSnapshotCreateXMLArgs{Dom: libvirt.Domain{Name: "web"}, XMLDesc: "<domainsnapshot/>", Flags: uint32(driver.CreateDiskOnly)}
			r.send(ProgramRemote, procDomainSnapshotCreateXML, socket.Call, 5, args)
			r.send(ProgramRemote, procDomainSnapshotCreateXML, socket.Call, 5, args)
		}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			bad := dialRaw(t, rw)
			bad.open()
			tc.write(bad)
			// Whatever comes back, the connection ends.
			var err error
			for range 4 {
				if _, err = bad.recv(); err != nil {
					break
				}
			}
			if !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) && !strings.Contains(err.Error(), "reset") {
				t.Fatalf("connection not closed: %v", err)
			}
			// The other client is served as before.
			good.send(ProgramRemote, procDomainLookupByName, socket.Call, 10, &libvirt.DomainLookupByNameArgs{Name: "web"})
			if p, err := good.recv(); err != nil || p.Status != socket.StatusOK {
				t.Fatalf("other client after %s: %+v %v", tc.name, p, err)
			}
		})
	}
}

func TestAccessAllows(t *testing.T) {
	a := Access{UID: 1000, GID: 100, Mode: 0o660}
	for _, tc := range []struct {
		uid, gid int
		groups   []int
		want     bool
	}{
		{0, 0, nil, true},
		{1000, 1000, nil, true},
		{1001, 100, nil, true},
		{1001, 1001, []int{5, 100}, true},
		{1001, 1001, nil, false},
	} {
		if got := a.Allows(tc.uid, tc.gid, tc.groups); got != tc.want {
			t.Errorf("Allows(%d, %d, %v) = %v", tc.uid, tc.gid, tc.groups, got)
		}
	}
	if (Access{UID: 1000, Mode: 0o600}).Allows(1001, 1001, nil) || !(Access{UID: 1000, Mode: 0o666}).Allows(1001, 1001, nil) {
		t.Error("mode bits for others")
	}
}

// TestListenPermissions: the socket has the rule's mode from the start,
// and a live socket is not taken over.
func TestListenPermissions(t *testing.T) {
	p := filepath.Join(t.TempDir(), "s.sock")
	l, err := Listen(p, OwnerOnly())
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	fi, err := os.Stat(p)
	if err != nil || fi.Mode().Perm() != 0o600 || fi.Mode().Type() != os.ModeSocket {
		t.Fatalf("socket %v %v", fi.Mode(), err)
	}
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	if _, err := Listen(p, OwnerOnly()); !errors.Is(err, ErrSocketInUse) {
		t.Fatalf("second Listen: %v", err)
	}
}

// TestCondemnedConnection: once a packet condemns a connection, nothing
// it sent after runs, though it came in the same write, and the close is
// logged once.
func TestCondemnedConnection(t *testing.T) {
	var mu sync.Mutex
	var logs []string
	rw, _, d, srv := testServerLogf(t, func(format string, args ...any) {
		mu.Lock()
		logs = append(logs, fmt.Sprintf(format, args...))
		mu.Unlock()
	})
	bad := dialRaw(t, rw)
	bad.open()
	var burst []byte
	packet := func(proc uint32, serial int32, args any) {
		body, err := encodeRet(args)
		if err != nil {
			t.Fatal(err)
		}
		p := &Packet{Header: socket.Header{Program: ProgramRemote, Version: 1, Procedure: proc, Type: socket.Call, Serial: serial}, Body: body}
		burst = append(burst, p.Encode()...)
	}
	garbled := &struct{ N uint32 }{1 << 30}
	packet(procDomainLookupByName, 2, garbled)
	packet(procDomainLookupByName, 3, garbled)
	packet(procDomainSnapshotCreateXML, 4, &libvirt.DomainSnapshotCreateXMLArgs{Dom: libvirt.Domain{Name: "web"},
		XMLDesc: "<domainsnapshot><name>after</name></domainsnapshot>", Flags: uint32(driver.CreateDiskOnly)})
	if _, err := bad.c.Write(burst); err != nil {
		t.Fatal(err)
	}
	if e := bad.recvError(); e.Code != int32(codeRPC) || e.Message[0] != "Unable to decode message payload" {
		t.Fatalf("garbled call: %+v", e)
	}
	if p, err := bad.recv(); err == nil {
		t.Fatalf("the condemned connection answered %+v", p)
	}
	// Close waits for every call the server started.
	srv.Close()
	l, err := d.ListAllSnapshots(context.Background(), "web", 0)
	if err != nil || len(l) != 0 {
		t.Fatalf("snapshots after a condemned burst: %v %v", l, err)
	}
	mu.Lock()
	defer mu.Unlock()
	n := 0
	for _, line := range logs {
		if strings.HasPrefix(line, "closing connection") {
			n++
		}
	}
	if n != 1 {
		t.Fatalf("%d close lines for one connection: %q", n, logs)
	}
}

// TestSnapshotExists: a second snapshot of one name is refused in
// libvirt's words, as the CLI words it.
func TestSnapshotExists(t *testing.T) {
	rw, _ := testServer(t)
	l := goClient(t, rw)
	dom, err := l.DomainLookupByName("web")
	if err != nil {
		t.Fatal(err)
	}
	for i := range 2 {
		_, err = l.DomainSnapshotCreateXML(dom, "<domainsnapshot><name>p1</name></domainsnapshot>", uint32(driver.CreateDiskOnly))
		if i == 0 && err != nil {
			t.Fatal(err)
		}
	}
	var le libvirt.Error
	if !errors.As(err, &le) || le.Code != uint32(errdefs.CodeOperationFailed) || le.Message != "operation failed: domain moment p1 already exists" {
		t.Fatalf("second p1: %#v", err)
	}
}

package libvirt

import (
	"context"
	"errors"
	"net"
	"path/filepath"
	"testing"
	"time"

	"github.com/xlsnap/xlsnap/errdefs"
)

func TestKeepaliveBound(t *testing.T) {
	for _, c := range []struct {
		ka   Keepalive
		want time.Duration
	}{
		{DefaultKeepalive, 35 * time.Second},
		{Keepalive{Interval: 1, Count: 2}, 3 * time.Second},
		{Keepalive{Interval: 0, Count: 5}, 0},
	} {
		if got := c.ka.Bound(); got != c.want {
			t.Errorf("%+v: bound %v, want %v", c.ka, got, c.want)
		}
	}
}

// TestDialSilentDaemon: a socket that takes the connection and answers
// nothing (a hung daemon) is given up on after the keepalive's bound,
// ErrNoConnection with libvirt's VIR_ERR_SYSTEM_ERROR, where libvirt's
// own open would wait for ever.
func TestDialSilentDaemon(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "silent.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	held := make(chan net.Conn, 1)
	go func() {
		if c, err := l.Accept(); err == nil {
			held <- c
		}
	}()
	defer func() {
		select {
		case c := <-held:
			c.Close()
		default:
		}
	}()
	_, err = Dial("qemu+unix:///session?socket="+sock, Keepalive{Interval: 1, Count: 0})
	if !errors.Is(err, ErrNoConnection) || !errors.Is(err, errdefs.ErrHypervisor) || errdefs.CodeOf(err) != errdefs.CodeSystemError {
		t.Fatalf("dialling a silent daemon: %v (code %d); want ErrNoConnection, VIR_ERR_SYSTEM_ERROR", err, errdefs.CodeOf(err))
	}
}

// TestDialRefused: a daemon that is down (its socket left behind, nobody
// listening) refuses at once, with libvirt's own error and code.
func TestDialRefused(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "dead.sock")
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	l.SetUnlinkOnClose(false)
	l.Close()
	_, err = Dial("qemu+unix:///session?socket="+sock, DefaultKeepalive)
	if errdefs.CodeOf(err) != errdefs.CodeSystemError {
		t.Fatalf("dialling a dead daemon: %v (code %d); want VIR_ERR_SYSTEM_ERROR", err, errdefs.CodeOf(err))
	}
}

// TestClosedConn: a Conn that closed its own connection connects no
// more.
func TestClosedConn(t *testing.T) {
	c, err := Dial("test:///default", DefaultKeepalive)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Get(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Get(context.Background()); !errors.Is(err, ErrNoConnection) {
		t.Fatalf("Get after Close: %v; want ErrNoConnection", err)
	}
	if err := c.Close(); err != nil {
		t.Fatalf("a second Close: %v", err)
	}
}

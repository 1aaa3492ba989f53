package qmp

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"net"
	"path/filepath"
	"testing"
	"time"

	"github.com/xlsnap/xlsnap/errdefs"
)

// fakeQMP is a fake device model for the decoder's fuzz test: it greets,
// then answers each command line with the next of replies, written as
// they are (several lines, none, garbage) but with @ID@ replaced by the
// command's id, and closes after the last.
func fakeQMP(t *testing.T, replies [][]byte) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "qmp")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		c, err := l.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		c.Write([]byte(`{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, "capabilities": []}}` + "\n"))
		r := bufio.NewReader(c)
		for _, reply := range replies {
			line, err := r.ReadBytes('\n')
			if err != nil {
				return
			}
			var cmd struct {
				ID string `json:"id"`
			}
			json.Unmarshal(line, &cmd)
			if _, err := c.Write(bytes.ReplaceAll(reply, []byte("@ID@"), []byte(cmd.ID))); err != nil {
				return
			}
		}
	}()
	return sock
}

// FuzzMonitor: whatever a device model sends, a call ends with a reply or
// a typed error within its context, never a panic, and Disconnect
// returns.
func FuzzMonitor(f *testing.F) {
	ok := []byte(`{"return": {}, "id": "@ID@"}` + "\n")
	f.Add(ok, []byte(`{"return": [{"device": "xvda"}], "id": "@ID@"}`+"\n"))
	f.Add(ok, []byte(`{"error": {"class": "GenericError", "desc": "no"}, "id": "@ID@"}`+"\n"))
	f.Add(ok, []byte(`{"event": "JOB_STATUS_CHANGE", "data": {"id": "j", "status": "ready"}, "timestamp": {"seconds": 1, "microseconds": 2}}`+"\n"+`{"return": {}, "id": "@ID@"}`+"\n"))
	// Strays and repeats: one more than the reply buffer holds.
	f.Add(bytes.Repeat(ok, 3), ok)
	f.Add(ok, []byte(`{"return": {}}`+"\n"+`{"return": 1, "id": "other"}`+"\n"+`{"return": 2, "id": "@ID@"}`+"\n"))
	f.Add([]byte("not json\n"), []byte("{\n"))
	f.Fuzz(func(t *testing.T, first, second []byte) {
		sock := fakeQMP(t, [][]byte{first, second})
		ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
		defer cancel()
		m, err := Dial(ctx, "unix", sock)
		if err != nil {
			if !errors.Is(err, errdefs.ErrHypervisor) && !errors.Is(err, context.DeadlineExceeded) {
				t.Fatalf("dial: untyped %v", err)
			}
			return
		}
		for range 2 {
			var out any
			err := m.Execute(ctx, "query-block", nil, &out)
			if err != nil && !errors.Is(err, errdefs.ErrHypervisor) && !errors.Is(err, context.DeadlineExceeded) {
				t.Fatalf("execute: untyped %v", err)
			}
		}
		done := make(chan struct{})
		go func() { m.Disconnect(); close(done) }()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			t.Fatal("Disconnect hangs")
		}
	})
}

// TestStrayRepliesDropped: replies that are not the command's (repeats,
// another id, none) never pass for its reply.
func TestStrayRepliesDropped(t *testing.T) {
	ok := []byte(`{"return": {}, "id": "@ID@"}` + "\n")
	sock := fakeQMP(t, [][]byte{
		bytes.Repeat(ok, 4),
		[]byte(`{"return": 1}` + "\n" + `{"return": 2, "id": "other"}` + "\n" + `{"return": 3, "id": "@ID@"}` + "\n"),
		[]byte(`{"return": 4, "id": "@ID@"}` + "\n"),
	})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	m, err := Dial(ctx, "unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Disconnect()
	for _, want := range []int{3, 4} {
		var got int
		if err := m.Execute(ctx, "query-version", nil, &got); err != nil || got != want {
			t.Fatalf("reply %d, %v; want %d", got, err, want)
		}
	}
}

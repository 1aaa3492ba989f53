package driver_test

import (
	"context"
	"errors"
	"os/exec"
	"reflect"
	"testing"
	"time"

	"github.com/xlsnap/xlsnap/driver"
)

// next reads one event, failing after a while.
func next(t *testing.T, ch <-chan driver.ChainEvent) driver.ChainEvent {
	t.Helper()
	select {
	case ev, ok := <-ch:
		if !ok {
			t.Fatal("the event channel closed")
		}
		return ev
	case <-time.After(10 * time.Second):
		t.Fatal("no event")
	}
	return driver.ChainEvent{}
}

// quiet fails if an event comes within a short while.
func quiet(t *testing.T, ch <-chan driver.ChainEvent) {
	t.Helper()
	select {
	case ev, ok := <-ch:
		if ok {
			t.Fatalf("an event nothing caused: %+v", ev)
		}
	case <-time.After(200 * time.Millisecond):
	}
}

// closes fails unless ch is closed soon, with no event before.
func closes(t *testing.T, ch <-chan driver.ChainEvent) {
	t.Helper()
	select {
	case ev, ok := <-ch:
		if ok {
			t.Fatalf("an event instead of the close: %+v", ev)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the channel stayed open")
	}
}

// TestSubscribe: a create, a delete, a revert and a rescan each give
// exactly one event, with the disk's chain before and after, the reason
// and the snapshot; an internal snapshot, which changes no chain, gives
// none. A subscriber that reads nothing holds up no operation and gets
// every event afterwards, in order. The channel closes when its context
// ends, and when the driver closes.
func TestSubscribe(t *testing.T) {
	e := newAPIEnv(t)
	fastCtx, stopFast := context.WithCancel(e.ctx)
	defer stopFast()
	fast, err := e.d.Subscribe(fastCtx)
	if err != nil {
		t.Fatal(err)
	}
	slow, err := e.d.Subscribe(e.ctx) // read only at the end
	if err != nil {
		t.Fatal(err)
	}

	var want []driver.ChainEvent
	expect := func(ev driver.ChainEvent) {
		t.Helper()
		ev.Domain, ev.Disk = "vm", "vda"
		want = append(want, ev)
		if got := next(t, fast); !reflect.DeepEqual(got, ev) {
			t.Fatalf("event %+v\nwant  %+v", got, ev)
		}
		quiet(t, fast)
	}
	e.create("s1", driver.CreateDiskOnly)
	expect(driver.ChainEvent{Reason: driver.ReasonSnapshot, Snapshot: "s1",
		Before: e.paths("vda.qcow2"), After: e.paths("vda.s1", "vda.qcow2")})
	e.create("s2", driver.CreateDiskOnly)
	expect(driver.ChainEvent{Reason: driver.ReasonSnapshot, Snapshot: "s2",
		Before: e.paths("vda.s1", "vda.qcow2"), After: e.paths("vda.s2", "vda.s1", "vda.qcow2")})
	before := e.chain()
	if _, err := e.d.SnapshotDelete(e.ctx, "vm", "s2", 0); err != nil {
		t.Fatal(err)
	}
	after := e.chain()
	if len(after) != 2 || after[1] != e.path("vda.qcow2") {
		t.Fatalf("chain after deleting s2: %v", after)
	}
	expect(driver.ChainEvent{Reason: driver.ReasonDelete, Snapshot: "s2", Before: before, After: after})
	e.create("inside", 0) // internal: the chain stays as it is
	quiet(t, fast)

	e.revert("s1")
	reverted := e.chain()
	if len(reverted) != 2 || reverted[1] != e.path("vda.qcow2") || reverted[0] == after[0] {
		t.Fatalf("chain after reverting to s1: %v (before %v)", reverted, after)
	}
	expect(driver.ChainEvent{Reason: driver.ReasonRevert, Snapshot: "s1", Before: after, After: reverted})

	// Outside xlsnap, an empty layer goes under the active one; the
	// rescan adopts it.
	mid := e.path("mid.qcow2")
	for _, args := range [][]string{
		{"qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", e.path("vda.qcow2"), mid},
		{"qemu-img", "rebase", "-u", "-f", "qcow2", "-F", "qcow2", "-b", mid, reverted[0]},
	} {
		if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
			t.Fatalf("%v: %v\n%s", args, err, out)
		}
	}
	if err := e.d.ChainChanged(e.ctx, "vm", "vda"); err != nil {
		t.Fatal(err)
	}
	expect(driver.ChainEvent{Reason: driver.ReasonRescan, Before: reverted, After: []string{reverted[0], mid, e.path("vda.qcow2")}})

	for i, w := range want {
		if got := next(t, slow); !reflect.DeepEqual(got, w) {
			t.Fatalf("the slow subscriber's event %d: %+v, want %+v", i, got, w)
		}
	}
	quiet(t, slow)

	stopFast()
	closes(t, fast)
	if err := e.d.Close(); err != nil {
		t.Fatal(err)
	}
	closes(t, slow)
	if _, err := e.d.Subscribe(e.ctx); !errors.Is(err, driver.ErrOperationInvalid) {
		t.Fatalf("Subscribe after Close: %v", err)
	}
	done, cancel := context.WithCancel(e.ctx)
	cancel()
	if _, err := e.d.Subscribe(done); !errors.Is(err, context.Canceled) || driver.Code(err) != driver.ErrNumOperationAborted {
		t.Fatalf("Subscribe with a cancelled context: %v", err)
	}
}

// TestSubscribeNeverBlocks: operations finish while a subscriber reads
// nothing at all, however many events wait for it.
func TestSubscribeNeverBlocks(t *testing.T) {
	e := newAPIEnv(t)
	if _, err := e.d.Subscribe(e.ctx); err != nil { // never read
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		for _, n := range []string{"s1", "s2", "s3", "s4"} {
			if _, err := e.d.CreateSnapshot(e.ctx, "vm", driver.SnapshotRequest{Name: n}, driver.CreateDiskOnly); err != nil {
				done <- err
				return
			}
		}
		done <- e.d.RevertToSnapshot(e.ctx, "vm", "s1", 0)
	}()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(60 * time.Second):
		t.Fatal("operations blocked behind a subscriber that reads nothing")
	}
}

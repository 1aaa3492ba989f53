// Package metastoretest is the conformance suite every metadata store
// runs (containerd's snapshotter testsuite is the model): records,
// transactions, intents, domain locks, the image-user index and events,
// each a named subtest.
package metastoretest

import (
	"context"
	"errors"
	"fmt"
	"reflect"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/xlsnap/xlsnap/errdefs"
	"github.com/xlsnap/xlsnap/storage/metastore"
)

// Opener opens a fresh, empty store for one subtest and returns it with
// a function that opens another handle on the same data, as another
// process (or, for a cluster store, another host) would. The suite closes
// what it opens.
type Opener func(t *testing.T) (metastore.Store, func() metastore.Store)

// RunSuite runs every subtest against the stores open makes.
func RunSuite(t *testing.T, open Opener) {
	for _, c := range []struct {
		name string
		fn   func(t *testing.T, s metastore.Store, again func() metastore.Store)
	}{
		{"Records", testRecords},
		{"Rollback", testRollback},
		{"DeleteDomain", testDeleteDomain},
		{"ReadOwnWrites", testReadOwnWrites},
		{"Intents", testIntents},
		{"Lock", testLock},
		{"LockAcrossHandles", testLockAcrossHandles},
		{"LockSerialises", testLockSerialises},
		{"Cancelled", testCancelled},
		{"Users", testUsers},
		{"Events", testEvents},
	} {
		t.Run(c.name, func(t *testing.T) {
			s, again := open(t)
			t.Cleanup(func() { s.Close() })
			c.fn(t, s, func() metastore.Store {
				o := again()
				t.Cleanup(func() { o.Close() })
				return o
			})
		})
	}
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func update(t *testing.T, s metastore.Store, fn func(metastore.Tx) error) {
	t.Helper()
	if err := s.Update(ctxT(t), fn); err != nil {
		t.Fatal(err)
	}
}

func domain(name string) *metastore.Domain {
	return &metastore.Domain{Name: name, DisplayName: "vm-" + name, UUID: "u-" + name, Current: "s1",
		Disks: []metastore.Disk{{Target: "vda", Active: "/p/" + name + ".s1", Format: "qcow2"}},
		Images: map[string]*metastore.Image{
			"/p/" + name + ".qcow2": {Format: "qcow2"},
			"/p/" + name + ".s1":    {Format: "qcow2", Backing: "/p/" + name + ".qcow2", BackingFormat: "qcow2", Owned: true},
		}}
}

func snapshot(name string) *metastore.Snapshot {
	return &metastore.Snapshot{Name: name, Description: "d " + name, Created: time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC),
		State: "shutoff", DomainXML: "<domain><name>" + name + "</name></domain>", XML: "<domainsnapshot/>",
		Disks: []metastore.SnapshotDisk{{Target: "vda", Mode: metastore.DiskExternal, Image: "/p/a.qcow2", Format: "qcow2", Overlay: "/p/a." + name}}}
}

func names(list []*metastore.Snapshot) []string {
	var out []string
	for _, s := range list {
		out = append(out, s.Name)
	}
	slices.Sort(out)
	return out
}

// testRecords: what is put comes back as it was; a listing leaves the
// domain XML out; what is absent is ErrNotFound (errdefs.ErrNotFound).
func testRecords(t *testing.T, s metastore.Store, again func() metastore.Store) {
	update(t, s, func(tx metastore.Tx) error {
		for _, n := range []string{"a", "b"} {
			if err := tx.PutDomain(domain(n)); err != nil {
				return err
			}
		}
		for _, n := range []string{"s1", "s2", "s10"} {
			if err := tx.PutSnapshot("a", snapshot(n)); err != nil {
				return err
			}
		}
		return nil
	})
	for _, st := range []metastore.Store{s, again()} {
		err := st.View(ctxT(t), func(tx metastore.Tx) error {
			dn, err := tx.DomainNames()
			if err != nil {
				return err
			}
			slices.Sort(dn)
			if !slices.Equal(dn, []string{"a", "b"}) {
				t.Errorf("DomainNames %v", dn)
			}
			d, err := tx.Domain("a")
			if err != nil {
				return err
			}
			if !reflect.DeepEqual(d, domain("a")) {
				t.Errorf("Domain a: %+v", d)
			}
			list, err := tx.Snapshots("a")
			if err != nil {
				return err
			}
			if got := names(list); !slices.Equal(got, []string{"s1", "s10", "s2"}) {
				t.Errorf("Snapshots %v", got)
			}
			for _, sn := range list {
				if sn.DomainXML != "" {
					t.Errorf("listing carries the domain XML of %s", sn.Name)
				}
			}
			got, err := tx.Snapshot("a", "s10")
			if err != nil {
				return err
			}
			if want := snapshot("s10"); !reflect.DeepEqual(got, want) {
				t.Errorf("Snapshot s10:\n%+v\nwant\n%+v", got, want)
			}
			if list, err := tx.Snapshots("b"); err != nil || len(list) != 0 {
				t.Errorf("Snapshots of b: %v %v", list, err)
			}
			for what, err := range map[string]error{
				"Domain":         second(tx.Domain("zz")),
				"Snapshot":       second(tx.Snapshot("a", "zz")),
				"Snapshots":      second(tx.Snapshots("zz")),
				"Snapshot of zz": second(tx.Snapshot("zz", "s1")),
			} {
				if !errors.Is(err, metastore.ErrNotFound) || !errors.Is(err, errdefs.ErrNotFound) {
					t.Errorf("%s of what is absent: %v, want ErrNotFound", what, err)
				}
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	update(t, s, func(tx metastore.Tx) error { return tx.DeleteSnapshot("a", "s2") })
	err := s.Update(ctxT(t), func(tx metastore.Tx) error { return tx.DeleteSnapshot("a", "s2") })
	if !errors.Is(err, metastore.ErrNotFound) {
		t.Errorf("deleting a deleted snapshot: %v", err)
	}
	s.View(ctxT(t), func(tx metastore.Tx) error {
		list, _ := tx.Snapshots("a")
		if got := names(list); !slices.Equal(got, []string{"s1", "s10"}) {
			t.Errorf("after delete: %v", got)
		}
		return nil
	})
}

func second[T any](_ T, err error) error { return err }

// testRollback: an Update whose fn fails commits nothing of it.
func testRollback(t *testing.T, s metastore.Store, _ func() metastore.Store) {
	update(t, s, func(tx metastore.Tx) error { return tx.PutDomain(domain("a")) })
	boom := errors.New("boom")
	err := s.Update(ctxT(t), func(tx metastore.Tx) error {
		d := domain("a")
		d.Current = "changed"
		if err := tx.PutDomain(d); err != nil {
			return err
		}
		if err := tx.PutDomain(domain("new")); err != nil {
			return err
		}
		if err := tx.PutSnapshot("a", snapshot("s9")); err != nil {
			return err
		}
		if err := tx.PutIntent(&metastore.Intent{ID: "i1", Domain: "a"}); err != nil {
			return err
		}
		return boom
	})
	if !errors.Is(err, boom) {
		t.Fatalf("Update returned %v, want fn's error", err)
	}
	s.View(ctxT(t), func(tx metastore.Tx) error {
		d, _ := tx.Domain("a")
		dn, _ := tx.DomainNames()
		list, _ := tx.Snapshots("a")
		in, _ := tx.Intents()
		if d == nil || d.Current != "s1" || len(dn) != 1 || len(list) != 0 || len(in) != 0 {
			t.Errorf("a failed Update left: %+v %v %v %v", d, dn, names(list), in)
		}
		return nil
	})
}

// testDeleteDomain: a domain goes with its snapshots, and a domain of a
// name that extends it keeps its own.
func testDeleteDomain(t *testing.T, s metastore.Store, _ func() metastore.Store) {
	update(t, s, func(tx metastore.Tx) error {
		for _, n := range []string{"a", "ab"} {
			if err := tx.PutDomain(domain(n)); err != nil {
				return err
			}
			if err := tx.PutSnapshot(n, snapshot("s1")); err != nil {
				return err
			}
		}
		return nil
	})
	update(t, s, func(tx metastore.Tx) error { return tx.DeleteDomain("a") })
	s.View(ctxT(t), func(tx metastore.Tx) error {
		if _, err := tx.Snapshot("a", "s1"); !errors.Is(err, metastore.ErrNotFound) {
			t.Errorf("snapshot of a deleted domain: %v", err)
		}
		if list, err := tx.Snapshots("ab"); err != nil || len(list) != 1 {
			t.Errorf("domain ab lost its snapshot: %v %v", list, err)
		}
		return nil
	})
	if err := s.Update(ctxT(t), func(tx metastore.Tx) error { return tx.DeleteDomain("a") }); !errors.Is(err, metastore.ErrNotFound) {
		t.Errorf("deleting a deleted domain: %v", err)
	}
	// Put again, it starts with no snapshots.
	update(t, s, func(tx metastore.Tx) error { return tx.PutDomain(domain("a")) })
	s.View(ctxT(t), func(tx metastore.Tx) error {
		if list, err := tx.Snapshots("a"); err != nil || len(list) != 0 {
			t.Errorf("a domain put again has snapshots: %v %v", names(list), err)
		}
		return nil
	})
}

// testReadOwnWrites: inside one Update, reads see its writes.
func testReadOwnWrites(t *testing.T, s metastore.Store, _ func() metastore.Store) {
	update(t, s, func(tx metastore.Tx) error { return tx.PutDomain(domain("a")) })
	update(t, s, func(tx metastore.Tx) error {
		d := domain("a")
		d.Current = "s2"
		if err := tx.PutDomain(d); err != nil {
			return err
		}
		if got, err := tx.Domain("a"); err != nil || got.Current != "s2" {
			t.Errorf("Domain after Put in the same Update: %+v %v", got, err)
		}
		if err := tx.PutSnapshot("a", snapshot("s2")); err != nil {
			return err
		}
		if err := tx.PutSnapshot("a", snapshot("s3")); err != nil {
			return err
		}
		if err := tx.DeleteSnapshot("a", "s3"); err != nil {
			return err
		}
		list, err := tx.Snapshots("a")
		if got := names(list); err != nil || !slices.Equal(got, []string{"s2"}) {
			t.Errorf("Snapshots in the same Update: %v %v", got, err)
		}
		if got, err := tx.Snapshot("a", "s2"); err != nil || got.DomainXML == "" {
			t.Errorf("Snapshot in the same Update: %+v %v", got, err)
		}
		if err := tx.PutDomain(domain("b")); err != nil {
			return err
		}
		if err := tx.DeleteDomain("b"); err != nil {
			return err
		}
		dn, err := tx.DomainNames()
		if !slices.Equal(dn, []string{"a"}) {
			t.Errorf("DomainNames in the same Update: %v %v", dn, err)
		}
		return nil
	})
}

// testIntents: intents list in ID order and go with DeleteIntent.
func testIntents(t *testing.T, s metastore.Store, again func() metastore.Store) {
	want := []*metastore.Intent{
		{ID: "a1", Domain: "a", Op: "delete", Steps: []metastore.Step{{Kind: metastore.StepCommit, Path: "/p/x", Format: "qcow2"}},
			NoReturn: 1, Commit: &metastore.Commit{Domain: domain("a"), DeleteSnapshots: []string{"s1"}}, Owner: "h1", Holder: "lease 1"},
		{ID: "b2", Domain: "b", Op: "guest-snapshot", Guest: &metastore.Guest{WasRunning: true, Pauses: true}},
	}
	update(t, s, func(tx metastore.Tx) error {
		for _, in := range []*metastore.Intent{want[1], want[0]} {
			if err := tx.PutIntent(in); err != nil {
				return err
			}
		}
		return nil
	})
	again().View(ctxT(t), func(tx metastore.Tx) error {
		got, err := tx.Intents()
		if err != nil || !reflect.DeepEqual(got, want) {
			t.Errorf("Intents: %+v %v", got, err)
		}
		return nil
	})
	update(t, s, func(tx metastore.Tx) error { return tx.DeleteIntent("a1") })
	s.View(ctxT(t), func(tx metastore.Tx) error {
		got, err := tx.Intents()
		if err != nil || len(got) != 1 || got[0].ID != "b2" {
			t.Errorf("Intents after delete: %+v %v", got, err)
		}
		return nil
	})
}

// wantBusy fails unless err is ErrBusy and not a context's error.
func wantBusy(t *testing.T, what string, err error) {
	t.Helper()
	if !errors.Is(err, errdefs.ErrBusy) || errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("%s: %v, want ErrBusy", what, err)
	}
}

// wantCtxErr fails unless err is cause and not ErrBusy (a caller that
// retries on busy must not retry a call it gave up).
func wantCtxErr(t *testing.T, what string, err, cause error) {
	t.Helper()
	if !errors.Is(err, cause) || errors.Is(err, errdefs.ErrBusy) {
		t.Errorf("%s: %v, want %v and not ErrBusy", what, err, cause)
	}
}

// testLock: one holder per domain; a try fails busy, a wait ends with
// its context; other domains are free; Lost closes on Unlock.
func testLock(t *testing.T, s metastore.Store, _ func() metastore.Store) {
	ctx := ctxT(t)
	l, err := s.Lock(ctx, "a", true)
	if err != nil {
		t.Fatal(err)
	}
	if l.Domain() != "a" || l.Holder() == "" {
		t.Errorf("lock: domain %q holder %q", l.Domain(), l.Holder())
	}
	_, err = s.Lock(ctx, "a", false)
	wantBusy(t, "a second try", err)
	start := time.Now()
	dctx, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
	_, err = s.Lock(dctx, "a", true)
	cancel()
	wantCtxErr(t, "a wait past its deadline", err, context.DeadlineExceeded)
	if d := time.Since(start); d < 100*time.Millisecond || d > 5*time.Second {
		t.Errorf("the wait took %v for a 100ms deadline", d)
	}
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	_, err = s.Lock(cctx, "a", true)
	wantCtxErr(t, "a wait cancelled", err, context.Canceled)
	b, err := s.Lock(ctx, "b", false)
	if err != nil {
		t.Fatalf("another domain: %v", err)
	}
	b.Unlock(ctx)
	select {
	case <-l.Lost():
		t.Fatal("Lost closed while held")
	default:
	}
	if err := l.Unlock(ctx); err != nil {
		t.Fatal(err)
	}
	select {
	case <-l.Lost():
	case <-time.After(5 * time.Second):
		t.Fatal("Lost not closed after Unlock")
	}
	if err := l.Unlock(ctx); err != nil {
		t.Errorf("a second Unlock: %v", err)
	}
	l2, err := s.Lock(ctx, "a", false)
	if err != nil {
		t.Fatalf("after Unlock: %v", err)
	}
	l2.Unlock(ctx)
	// The context carries a lock for the calls made with it.
	if metastore.HeldLock(metastore.WithLock(ctx, l2), "a") != nil {
		t.Error("HeldLock returns a released lock")
	}
}

// testLockAcrossHandles: another handle (process, host) waits for the
// holder and gets the lock once it is released.
func testLockAcrossHandles(t *testing.T, s metastore.Store, again func() metastore.Store) {
	ctx := ctxT(t)
	o := again()
	l, err := s.Lock(ctx, "a", true)
	if err != nil {
		t.Fatal(err)
	}
	_, err = o.Lock(ctx, "a", false)
	wantBusy(t, "the other handle's try", err)
	dctx, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
	_, err = o.Lock(dctx, "a", true)
	cancel()
	wantCtxErr(t, "the other handle's wait", err, context.DeadlineExceeded)
	got := make(chan error, 1)
	go func() {
		l2, err := o.Lock(ctx, "a", true)
		if err == nil {
			l2.Unlock(ctx)
		}
		got <- err
	}()
	time.Sleep(50 * time.Millisecond)
	select {
	case err := <-got:
		t.Fatalf("the other handle got the lock while held: %v", err)
	default:
	}
	l.Unlock(ctx)
	select {
	case err := <-got:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the other handle never got the released lock")
	}
}

// testLockSerialises: goroutines of two handles increment a counter
// under the lock; no two are ever inside at once.
func testLockSerialises(t *testing.T, s metastore.Store, again func() metastore.Store) {
	ctx := ctxT(t)
	stores := []metastore.Store{s, again()}
	var inside, most atomic.Int32
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for g := range 4 {
		wg.Go(func() {
			st := stores[g%2]
			for range 5 {
				l, err := st.Lock(ctx, "a", true)
				if err != nil {
					errs <- err
					return
				}
				n := inside.Add(1)
				if n > most.Load() {
					most.Store(n)
				}
				time.Sleep(time.Millisecond)
				inside.Add(-1)
				l.Unlock(ctx)
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if most.Load() != 1 {
		t.Errorf("%d holders at once", most.Load())
	}
}

// testCancelled: a call with a context already ended does nothing and
// returns its error.
func testCancelled(t *testing.T, s metastore.Store, _ func() metastore.Store) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	ran := false
	err := s.Update(ctx, func(tx metastore.Tx) error { ran = true; return tx.PutDomain(domain("a")) })
	if !errors.Is(err, context.Canceled) {
		t.Errorf("Update with a cancelled context: %v", err)
	}
	if err := s.View(ctxT(t), func(tx metastore.Tx) error {
		if _, err := tx.Domain("a"); !errors.Is(err, metastore.ErrNotFound) {
			t.Errorf("a cancelled Update wrote (fn ran: %v): %v", ran, err)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if err := s.View(ctx, func(metastore.Tx) error { return nil }); !errors.Is(err, context.Canceled) {
		t.Errorf("View with a cancelled context: %v", err)
	}
	if _, err := s.Watch(ctx); err == nil {
		t.Errorf("Watch with a cancelled context: no error")
	}
}

// testUsers: each publisher's list replaces its last; every handle sees
// every publisher's; an empty list withdraws it.
func testUsers(t *testing.T, s metastore.Store, again func() metastore.Store) {
	ctx := ctxT(t)
	o := again()
	a := []metastore.ImageUse{{Host: "h1", Domain: "d1", DomainName: "web", Disk: "xvda", Chain: []string{"/p/web.qcow2", "/p/base.qcow2"}}}
	b := []metastore.ImageUse{{Host: "h2", Domain: "d2", Disk: "xvda", Chain: []string{"/p/db.qcow2", "/p/base.qcow2"}},
		{Host: "h2", Domain: "d3", Disk: "xvdb", Chain: []string{"/p/base.qcow2"}}}
	if err := s.PutUsers(ctx, "h1/src", a); err != nil {
		t.Fatal(err)
	}
	if err := o.PutUsers(ctx, "h2/src", b); err != nil {
		t.Fatal(err)
	}
	if err := s.PutUsers(ctx, "h1/src", a); err != nil { // again, the same
		t.Fatal(err)
	}
	for _, st := range []metastore.Store{s, o} {
		got, err := st.Users(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if len(got) != 3 || got[0].Publisher != "h1/src" || got[0].DomainName != "web" || !slices.Equal(got[0].Chain, a[0].Chain) ||
			got[1].Publisher != "h2/src" || got[2].Domain != "d3" {
			t.Errorf("Users: %+v", got)
		}
	}
	if err := o.PutUsers(ctx, "h2/src", b[1:]); err != nil {
		t.Fatal(err)
	}
	if err := s.PutUsers(ctx, "h1/src", nil); err != nil {
		t.Fatal(err)
	}
	got, err := s.Users(ctx)
	if err != nil || len(got) != 1 || got[0].Domain != "d3" {
		t.Errorf("Users after replacing and withdrawing: %+v %v", got, err)
	}
}

// testEvents: a watcher of either handle gets every event published
// after it began, in order, from both; none published before; its
// channel closes when its context ends.
func testEvents(t *testing.T, s metastore.Store, again func() metastore.Store) {
	ctx := ctxT(t)
	o := again()
	if err := s.Publish(ctx, metastore.Event{Origin: "x", Domain: "early", Reason: "snapshot"}); err != nil {
		t.Fatal(err)
	}
	wctx, stop := context.WithCancel(ctx)
	w1, err := s.Watch(wctx)
	if err != nil {
		t.Fatal(err)
	}
	w2, err := o.Watch(wctx)
	if err != nil {
		t.Fatal(err)
	}
	var want []metastore.Event
	for i := range 3 {
		ev := metastore.Event{Origin: "s", Host: "h1", Domain: fmt.Sprint("d", i), Disk: "xvda", Reason: "snapshot", Snapshot: fmt.Sprint("s", i),
			Before: []string{"/p/a"}, After: []string{"/p/a.s", "/p/a"}}
		if err := s.Publish(ctx, ev); err != nil {
			t.Fatal(err)
		}
		want = append(want, ev)
	}
	two := []metastore.Event{{Origin: "o", Domain: "d9", Disk: "xvdb", Reason: "delete"}, {Origin: "o", Domain: "d9", Disk: "xvdc", Reason: "delete"}}
	if err := o.Publish(ctx, two...); err != nil {
		t.Fatal(err)
	}
	want = append(want, two...)
	for i, w := range []<-chan metastore.Event{w1, w2} {
		for j, ev := range want {
			select {
			case got := <-w:
				if !reflect.DeepEqual(got, ev) {
					t.Errorf("watcher %d event %d: %+v, want %+v", i, j, got, ev)
				}
			case <-time.After(10 * time.Second):
				t.Fatalf("watcher %d: event %d never came", i, j)
			}
		}
	}
	stop()
	for i, w := range []<-chan metastore.Event{w1, w2} {
		timeout := time.After(10 * time.Second)
		for open := true; open; {
			select {
			case _, open = <-w:
			case <-timeout:
				t.Fatalf("watcher %d not closed after its context ended", i)
			}
		}
	}
}

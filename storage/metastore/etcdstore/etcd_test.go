package etcdstore_test

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/xlsnap/xlsnap/errdefs"
	"github.com/xlsnap/xlsnap/storage/metastore"
	"github.com/xlsnap/xlsnap/storage/metastore/etcdstore"
	"github.com/xlsnap/xlsnap/storage/metastore/etcdstore/etcdtest"
	"github.com/xlsnap/xlsnap/storage/metastore/metastoretest"
)

var prefixSeq atomic.Int64

// open opens a store on c under its own prefix (each subtest its own
// empty store on one cluster), as host.
func open(t testing.TB, c *etcdtest.Cluster, prefix, host string, ttl time.Duration) *etcdstore.Store {
	t.Helper()
	s, err := etcdstore.Open(context.Background(), etcdstore.Config{Endpoints: c.Endpoints, Prefix: prefix, Host: host,
		LockTTL: ttl, RequestTimeout: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestSuite(t *testing.T) {
	c := etcdtest.Start(t, 3)
	metastoretest.RunSuite(t, func(t *testing.T) (metastore.Store, func() metastore.Store) {
		prefix := fmt.Sprintf("/suite%d/", prefixSeq.Add(1))
		return open(t, c, prefix, "h1", 0), func() metastore.Store { return open(t, c, prefix, "h2", 0) }
	})
}

// TestFencing: once a holder's lease is gone (revoked here, as expiry
// does it), its writes to the domain commit nothing (ErrLockLost), its
// lock reports itself lost, and another host takes the lock; writes of
// other domains go on.
func TestFencing(t *testing.T) {
	c := etcdtest.Start(t, 3)
	ctx := context.Background()
	a := open(t, c, "/fence/", "a", time.Second)
	defer a.Close()
	b := open(t, c, "/fence/", "b", time.Second)
	defer b.Close()
	put := func(s metastore.Store, name, current string) error {
		return s.Update(ctx, func(tx metastore.Tx) error {
			return tx.PutDomain(&metastore.Domain{Name: name, Current: current})
		})
	}
	l, err := a.Lock(ctx, "d", true)
	if err != nil {
		t.Fatal(err)
	}
	if err := put(a, "d", "one"); err != nil {
		t.Fatal(err)
	}
	resp, err := a.Client().Get(ctx, "/fence/locks/d/", clientv3.WithPrefix())
	if err != nil || len(resp.Kvs) != 1 {
		t.Fatalf("lock keys: %v %v", resp, err)
	}
	if _, err := b.Client().Revoke(ctx, clientv3.LeaseID(resp.Kvs[0].Lease)); err != nil {
		t.Fatal(err)
	}
	err = put(a, "d", "two")
	if !errors.Is(err, metastore.ErrLockLost) || errdefs.CodeOf(err) != errdefs.CodeOperationTimeout {
		t.Fatalf("a write after the lease went: %v (code %d), want ErrLockLost", err, errdefs.CodeOf(err))
	}
	err = a.Update(ctx, func(tx metastore.Tx) error {
		return tx.PutIntent(&metastore.Intent{ID: "i1", Domain: "d"})
	})
	if !errors.Is(err, metastore.ErrLockLost) {
		t.Fatalf("an intent of the domain after the lease went: %v", err)
	}
	select {
	case <-l.Lost():
	case <-time.After(10 * time.Second):
		t.Fatal("the lock never reported itself lost")
	}
	lb, err := b.Lock(ctx, "d", false)
	if err != nil {
		t.Fatalf("another host after the lease went: %v", err)
	}
	if err := put(b, "d", "three"); err != nil {
		t.Fatal(err)
	}
	if err := put(a, "other", "x"); err != nil {
		t.Fatalf("a write of another domain: %v", err)
	}
	b.View(ctx, func(tx metastore.Tx) error {
		d, err := tx.Domain("d")
		in, _ := tx.Intents()
		if err != nil || d.Current != "three" || len(in) != 0 {
			t.Errorf("record after fencing: %+v %v, intents %v", d, err, in)
		}
		return nil
	})
	lb.Unlock(ctx)
	l.Unlock(ctx) // lost already: no error, nothing deleted of b's
	// a locks again on a new lease.
	l2, err := a.Lock(ctx, "d", false)
	if err != nil {
		t.Fatalf("a again: %v", err)
	}
	if err := put(a, "d", "four"); err != nil {
		t.Fatal(err)
	}
	l2.Unlock(ctx)
}

// TestUnreachable: with no member answering, every call fails within
// the request timeout with ErrUnavailable (libvirt's 9), writing nothing.
func TestUnreachable(t *testing.T) {
	c := etcdtest.Start(t, 3)
	ctx := context.Background()
	s, err := etcdstore.Open(ctx, etcdstore.Config{Endpoints: c.Endpoints, Prefix: "/gone/", LockTTL: time.Second,
		RequestTimeout: 300 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if err := s.Update(ctx, func(tx metastore.Tx) error { return tx.PutDomain(&metastore.Domain{Name: "d"}) }); err != nil {
		t.Fatal(err)
	}
	c.Stop()
	start := time.Now()
	checks := map[string]error{
		"View": s.View(ctx, func(tx metastore.Tx) error { _, err := tx.Domain("d"); return err }),
		"Update": s.Update(ctx, func(tx metastore.Tx) error {
			return tx.PutIntent(&metastore.Intent{ID: "x", Domain: "d"})
		}),
		"Lock":     second(s.Lock(ctx, "d", true)),
		"Users":    second(s.Users(ctx)),
		"PutUsers": s.PutUsers(ctx, "p", []metastore.ImageUse{{Domain: "d"}}),
		"Publish":  s.Publish(ctx, metastore.Event{Domain: "d"}),
		"Watch":    second(s.Watch(ctx)),
		"Open":     second(etcdstore.Open(ctx, etcdstore.Config{Endpoints: c.Endpoints, RequestTimeout: time.Second})),
	}
	for what, err := range checks {
		if !errors.Is(err, metastore.ErrUnavailable) || errdefs.CodeOf(err) != errdefs.CodeOperationFailed {
			t.Errorf("%s with no member: %v (code %d), want ErrUnavailable", what, err, errdefs.CodeOf(err))
		}
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Errorf("the calls took %v", d)
	}
	// A caller's own deadline is its own error.
	dctx, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
	defer cancel()
	err = s.View(dctx, func(tx metastore.Tx) error { _, err := tx.Domain("d"); return err })
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("with the caller's deadline: %v", err)
	}
}

func second[T any](_ T, err error) error { return err }

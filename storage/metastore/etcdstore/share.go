package etcdstore

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"sync/atomic"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/xlsnap/xlsnap/storage/metastore"
)

// PutUsers replaces publisher's list under users/PUBLISHER; an empty
// list deletes it. The list stays after its host is gone: a dead host's
// domains still read their images until it says otherwise.
func (s *Store) PutUsers(ctx context.Context, publisher string, uses []metastore.ImageUse) error {
	for i := range uses {
		uses[i].Publisher = publisher
	}
	key := s.prefix + "users/" + publisher
	rctx, cancel := s.req(ctx)
	defer cancel()
	var err error
	if len(uses) == 0 {
		err = retry(rctx, func() error { _, err := s.cli.Delete(rctx, key); return err })
	} else {
		var data []byte
		if data, err = json.Marshal(uses); err != nil {
			return err
		}
		// Unchanged, nothing is written (a put would wake watchers and
		// grow the history).
		err = retry(rctx, func() error {
			_, err := s.cli.Txn(rctx).If(clientv3.Compare(clientv3.Value(key), "=", string(data))).
				Else(clientv3.OpPut(key, string(data))).Commit()
			return err
		})
	}
	if err != nil {
		return s.fail(ctx, "publishing the images this host uses", err)
	}
	return nil
}

// Users lists every publisher's image uses, by publisher.
func (s *Store) Users(ctx context.Context) ([]metastore.ImageUse, error) {
	rctx, cancel := s.req(ctx)
	defer cancel()
	var resp *clientv3.GetResponse
	err := retry(rctx, func() (err error) { resp, err = s.cli.Get(rctx, s.prefix+"users/", clientv3.WithPrefix()); return err })
	if err != nil {
		return nil, s.fail(ctx, "reading the images other hosts use", err)
	}
	var out []metastore.ImageUse
	for _, kv := range resp.Kvs {
		var uses []metastore.ImageUse
		if err := json.Unmarshal(kv.Value, &uses); err != nil {
			return nil, fmt.Errorf("%w: etcd %s: decode: %w", metastore.ErrDamaged, kv.Key, err)
		}
		out = append(out, uses...)
	}
	return out, nil
}

// eventsTTL is how long an event stays in etcd for watchers that fall
// behind; the lease that expires them is reused for half of it.
const eventsTTL = 120 * time.Second

var eventSeq atomic.Uint64

// eventPrefix makes this process's event keys unique.
var eventPrefix = func() string {
	var b [6]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}()

// eventsLease returns the lease events are written with.
func (s *Store) eventsLease(ctx context.Context) (clientv3.LeaseID, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.evLease != 0 && time.Now().Before(s.evUntil) {
		return s.evLease, nil
	}
	rctx, cancel := s.req(ctx)
	defer cancel()
	g, err := s.cli.Grant(rctx, int64(eventsTTL/time.Second))
	if err != nil {
		return 0, s.fail(ctx, "granting the events lease", err)
	}
	s.evLease, s.evUntil = g.ID, time.Now().Add(eventsTTL/2)
	return g.ID, nil
}

// Publish puts each event under events/, in one transaction, on a lease
// that expires it.
func (s *Store) Publish(ctx context.Context, evs ...metastore.Event) error {
	if err := ctx.Err(); err != nil || len(evs) == 0 {
		return err
	}
	lease, err := s.eventsLease(ctx)
	if err != nil {
		return err
	}
	var ops []clientv3.Op
	for _, ev := range evs {
		data, err := json.Marshal(ev)
		if err != nil {
			return err
		}
		key := fmt.Sprintf("%sevents/%s-%016x", s.prefix, eventPrefix, eventSeq.Add(1))
		ops = append(ops, clientv3.OpPut(key, string(data), clientv3.WithLease(lease)))
	}
	rctx, cancel := s.req(ctx)
	defer cancel()
	if err := retry(rctx, func() error { _, err := s.cli.Txn(rctx).Then(ops...).Commit(); return err }); err != nil {
		return s.fail(ctx, "publishing events", err)
	}
	return nil
}

// Watch watches events/ from the revision after the present one; a
// watch the cluster ends (a member lost, history compacted) is taken up
// again where it left off.
func (s *Store) Watch(ctx context.Context) (<-chan metastore.Event, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	rctx, cancel := s.req(ctx)
	resp, err := s.cli.Get(rctx, s.prefix+"events/", clientv3.WithCountOnly())
	cancel()
	if err != nil {
		return nil, s.fail(ctx, "watching events", err)
	}
	next := resp.Header.Revision + 1
	out := make(chan metastore.Event)
	go func() {
		defer close(out)
		for ctx.Err() == nil {
			wctx, stop := context.WithCancel(clientv3.WithRequireLeader(ctx))
			for wr := range s.cli.Watch(wctx, s.prefix+"events/", clientv3.WithPrefix(), clientv3.WithRev(next), clientv3.WithFilterDelete()) {
				if wr.CompactRevision > next {
					next = wr.CompactRevision
				}
				for _, e := range wr.Events {
					next = e.Kv.ModRevision + 1
					var ev metastore.Event
					if json.Unmarshal(e.Kv.Value, &ev) != nil {
						continue
					}
					select {
					case out <- ev:
					case <-ctx.Done():
						stop()
						return
					}
				}
			}
			stop()
			select {
			case <-ctx.Done():
			case <-time.After(100 * time.Millisecond):
			}
		}
	}()
	return out, nil
}

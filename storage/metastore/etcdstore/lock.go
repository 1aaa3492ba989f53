package etcdstore

import (
	"context"
	"errors"
	"fmt"
	"sync"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"

	"github.com/xlsnap/xlsnap/errdefs"
	"github.com/xlsnap/xlsnap/storage/metastore"
)

// session is the lease this store's locks live on: kept alive while the
// store is open and the cluster answers; once it expires every lock on
// it is lost, and the next lock takes a new one.
type session struct {
	*concurrency.Session
	lease clientv3.LeaseID
}

func (s *Store) session(ctx context.Context) (*session, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.sess != nil {
		select {
		case <-s.sess.Done():
			s.sess = nil
		default:
			return s.sess, nil
		}
	}
	// The lease is granted here, within the request timeout: the
	// session's own grant would wait for an unreachable cluster forever.
	rctx, cancel := s.req(ctx)
	defer cancel()
	var g *clientv3.LeaseGrantResponse
	err := retry(rctx, func() (err error) { g, err = s.cli.Grant(rctx, s.ttl); return err })
	if err != nil {
		return nil, s.fail(ctx, "granting a lock lease", err)
	}
	cs, err := concurrency.NewSession(s.cli, concurrency.WithLease(g.ID), concurrency.WithTTL(int(s.ttl)), concurrency.WithContext(s.ctx))
	if err != nil {
		return nil, s.fail(ctx, "keeping a lock lease alive", err)
	}
	s.sess = &session{Session: cs, lease: g.ID}
	return s.sess, nil
}

// lock is a domain lock held in etcd: the mutex key under
// locks/DOMAIN/, on this store's lease.
type lock struct {
	s      *Store
	domain string
	holder string
	mu     *concurrency.Mutex
	slot   func()
	once   sync.Once
	lost   chan struct{}
	done   chan struct{} // closed by Unlock, ends the watch on the lease
}

func (l *lock) Domain() string        { return l.domain }
func (l *lock) Holder() string        { return l.holder }
func (l *lock) Lost() <-chan struct{} { return l.lost }

// Unlock deletes the mutex key (nothing to do once its lease expired).
func (l *lock) Unlock(ctx context.Context) error {
	var err error
	l.once.Do(func() {
		close(l.done)
		l.s.mu.Lock()
		if l.s.held[l.domain] == l {
			delete(l.s.held, l.domain)
		}
		l.s.mu.Unlock()
		rctx, cancel := l.s.req(ctx)
		defer cancel()
		if uerr := l.mu.Unlock(rctx); uerr != nil {
			err = l.s.fail(ctx, "releasing the lock of domain "+l.domain, uerr)
		}
		l.slot()
	})
	return err
}

// Lock takes the domain's lock: the process's own slot, then the etcd
// mutex. A wait ends with ctx, or with the store's lease (ErrLockLost).
func (s *Store) Lock(ctx context.Context, domain string, wait bool) (metastore.Lock, error) {
	slot, err := s.slots.Take(ctx, domain, wait)
	if err != nil {
		return nil, err
	}
	sess, err := s.session(ctx)
	if err != nil {
		slot()
		return nil, err
	}
	m := concurrency.NewMutex(sess.Session, s.lockDir(domain))
	rctx, cancel := s.req(ctx)
	err = retry(rctx, func() error { return m.TryLock(rctx) })
	cancel()
	if errors.Is(err, concurrency.ErrLocked) && wait {
		// Held by another host or process: wait for it as long as ctx
		// lets, and no longer than this store's lease lives.
		wctx, stop := context.WithCancel(ctx)
		go func() {
			select {
			case <-sess.Done():
			case <-wctx.Done():
			}
			stop()
		}()
		err = m.Lock(wctx)
		stop()
		if err != nil && ctx.Err() == nil && wctx.Err() != nil {
			err = metastore.ErrLockLost
		}
	}
	switch {
	case errors.Is(err, concurrency.ErrLocked):
		slot()
		return nil, fmt.Errorf("%w: %s, held by another host or process", errdefs.ErrBusy, domain)
	case ctx.Err() != nil:
		slot()
		if err == nil {
			m.Unlock(context.WithoutCancel(ctx))
		}
		return nil, fmt.Errorf("waiting for domain %s, busy: %w", domain, ctx.Err())
	case err != nil:
		slot()
		if errors.Is(err, metastore.ErrLockLost) || errors.Is(err, metastore.ErrUnavailable) {
			return nil, fmt.Errorf("locking domain %s: %w", domain, err)
		}
		return nil, s.fail(ctx, "locking domain "+domain, err)
	}
	l := &lock{s: s, domain: domain, mu: m, slot: slot, lost: make(chan struct{}), done: make(chan struct{}),
		holder: fmt.Sprintf("%s (etcd lease %x)", s.host, int64(sess.lease))}
	s.mu.Lock()
	s.held[domain] = l
	s.mu.Unlock()
	go func() {
		select {
		case <-sess.Done():
		case <-l.done:
		}
		close(l.lost)
	}()
	return l, nil
}

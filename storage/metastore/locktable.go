package metastore

import (
	"context"
	"fmt"
	"sync"

	"github.com/xlsnap/xlsnap/errdefs"
)

// Slots serialises one process's holders of a domain's lock: a channel
// per domain, so a wait honours its context. Each store puts its
// cross-process lock (a lock file, an etcd mutex) behind it.
type Slots struct {
	mu  sync.Mutex
	sem map[string]chan struct{}
}

// NewSlots returns an empty table.
func NewSlots() *Slots { return &Slots{sem: map[string]chan struct{}{}} }

// Take takes domain's slot and returns its release; with wait false it
// fails with ErrBusy at once. A wait that ctx ends fails with ctx's
// error, not ErrBusy: the caller gave up, and one that retries on busy
// must not retry a cancelled call.
func (l *Slots) Take(ctx context.Context, domain string, wait bool) (func(), error) {
	l.mu.Lock()
	ch, ok := l.sem[domain]
	if !ok {
		ch = make(chan struct{}, 1)
		l.sem[domain] = ch
	}
	l.mu.Unlock()
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("waiting for domain %s: %w", domain, err)
	}
	if wait {
		select {
		case ch <- struct{}{}:
		case <-ctx.Done():
			return nil, fmt.Errorf("waiting for domain %s, busy with another operation: %w", domain, ctx.Err())
		}
	} else {
		select {
		case ch <- struct{}{}:
		default:
			return nil, fmt.Errorf("%w: %s", errdefs.ErrBusy, domain)
		}
	}
	return func() { <-ch }, nil
}

// heldLock is a Lock whose loss is only its release.
type heldLock struct {
	domain, holder string
	once           sync.Once
	lost           chan struct{}
	release        func(ctx context.Context) error
}

func (l *heldLock) Domain() string        { return l.domain }
func (l *heldLock) Holder() string        { return l.holder }
func (l *heldLock) Lost() <-chan struct{} { return l.lost }

func (l *heldLock) Unlock(ctx context.Context) error {
	var err error
	l.once.Do(func() {
		close(l.lost)
		err = l.release(ctx)
	})
	return err
}

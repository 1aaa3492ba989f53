package storage

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"sync"
	"time"

	"github.com/xlsnap/xlsnap/internal/fanout"
	"github.com/xlsnap/xlsnap/storage/metastore"
)

// ChainChanged tells that a disk's chain changed: the images top to base
// before and after, and why ("snapshot", "revert", "delete", "rescan",
// "coalesce").
// Snapshot is the snapshot the operation took, reverted to or deleted
// ("" for a rescan, and for a snapshot taken without metadata). Host is
// the host of the process that changed it, "" when it was this Manager.
type ChainChanged struct {
	Domain   string
	Disk     string
	Before   []string
	After    []string
	Reason   string
	Snapshot string
	Host     string
}

// broker hands events to subscribers without ever blocking an operation:
// each subscriber has its own queue drained by its own goroutine. Events
// of this Manager go to its subscribers at once and to the store
// (Publish); while anyone subscribes, the store's events of other
// processes and hosts (Watch) come in too, less this Manager's own.
type broker struct {
	store        metastore.Store
	origin, host string

	mu     sync.Mutex
	subs   map[*subscriber]bool
	closed bool
	// unwatch ends the store watch, running while subs is not empty.
	unwatch context.CancelFunc
	// outbox holds events for the store, which forward publishes in
	// order, all that wait in one call, off the operation's path; wake
	// tells it there are some, flushed is closed when it has ended.
	outbox  []metastore.Event
	wake    chan struct{}
	flushed chan struct{}
}

type subscriber struct {
	queue *fanout.Queue[ChainChanged]
	done  chan struct{}
	out   chan ChainChanged
}

func newBroker(store metastore.Store, origin, host string) *broker {
	b := &broker{store: store, origin: origin, host: host, subs: map[*subscriber]bool{},
		wake: make(chan struct{}, 1), flushed: make(chan struct{})}
	go b.forward()
	return b
}

// forward publishes the outbox to the store until close, then what is
// left. A publication that fails is dropped: an event another process
// misses is no failure of the operation that made it.
func (b *broker) forward() {
	defer close(b.flushed)
	for {
		_, open := <-b.wake
		b.mu.Lock()
		evs := b.outbox
		b.outbox = nil
		b.mu.Unlock()
		if len(evs) > 0 {
			ctx, cancel := context.WithTimeout(context.Background(), publishTimeout)
			_ = b.store.Publish(ctx, evs...)
			cancel()
		}
		if !open {
			return
		}
	}
}

// newOrigin is a Manager's own id in the events it publishes.
func newOrigin() string {
	var b [8]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// Subscribe returns a channel of every ChainChanged from now on, of this
// Manager and (through the store) of every other process and host, and
// a function that ends the subscription and closes the channel.
func (m *Manager) Subscribe() (<-chan ChainChanged, func()) {
	return m.events.subscribe()
}

func (b *broker) subscribe() (<-chan ChainChanged, func()) {
	s := &subscriber{queue: fanout.New[ChainChanged](), done: make(chan struct{}), out: make(chan ChainChanged)}
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		close(s.out)
		return s.out, func() {}
	}
	b.subs[s] = true
	b.watchLocked()
	b.mu.Unlock()
	go s.run()
	var once sync.Once
	return s.out, func() {
		once.Do(func() {
			b.mu.Lock()
			_, live := b.subs[s] // Close may have ended it already
			delete(b.subs, s)
			if len(b.subs) == 0 && b.unwatch != nil {
				b.unwatch()
				b.unwatch = nil
			}
			b.mu.Unlock()
			if live {
				close(s.done)
			}
		})
	}
}

// watchLocked starts the store watch unless it runs; b.mu held. It is
// set up before Subscribe returns, so nothing published after is missed.
// A store that cannot watch now (unreachable) leaves the subscription to
// this Manager's events; the next Subscribe tries again.
func (b *broker) watchLocked() {
	if b.unwatch != nil {
		return
	}
	ctx, cancel := context.WithCancel(context.Background())
	evs, err := b.store.Watch(ctx)
	if err != nil {
		cancel()
		return
	}
	b.unwatch = cancel
	go func() {
		for ev := range evs {
			if ev.Origin == b.origin {
				continue
			}
			b.local(ChainChanged{Domain: ev.Domain, Disk: ev.Disk, Before: ev.Before, After: ev.After,
				Reason: ev.Reason, Snapshot: ev.Snapshot, Host: ev.Host})
		}
	}()
}

func (s *subscriber) run() {
	defer close(s.out)
	s.queue.Drain(context.Background(), s.out, s.done)
}

// publishTimeout bounds one publication to the store.
const publishTimeout = 5 * time.Second

// publish tells this Manager's subscribers, and queues the event for
// the store.
func (b *broker) publish(ev ChainChanged) {
	b.local(ev)
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return
	}
	b.outbox = append(b.outbox, metastore.Event{Origin: b.origin, Host: b.host, Domain: ev.Domain, Disk: ev.Disk,
		Before: ev.Before, After: ev.After, Reason: ev.Reason, Snapshot: ev.Snapshot})
	select {
	case b.wake <- struct{}{}:
	default:
	}
}

func (b *broker) local(ev ChainChanged) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for s := range b.subs {
		s.queue.Push(ev)
	}
}

// close ends every subscription and, once the events still queued for
// the store are published, returns: a process that exits after its
// operation still tells the others.
func (b *broker) close() {
	defer func() { <-b.flushed }()
	b.mu.Lock()
	defer b.mu.Unlock()
	if !b.closed {
		close(b.wake)
	}
	b.closed = true
	if b.unwatch != nil {
		b.unwatch()
		b.unwatch = nil
	}
	for s := range b.subs {
		delete(b.subs, s)
		close(s.done)
	}
}

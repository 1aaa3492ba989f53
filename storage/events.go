package storage

import (
	"context"
	"sync"

	"github.com/xlsnap/xlsnap/internal/fanout"
)

// ChainChanged tells that a disk's chain changed: the images top to base
// before and after, and why ("snapshot", "revert", "delete", "rescan",
// "coalesce").
// Snapshot is the snapshot the operation took, reverted to or deleted
// ("" for a rescan, and for a snapshot taken without metadata).
type ChainChanged struct {
	Domain   string
	Disk     string
	Before   []string
	After    []string
	Reason   string
	Snapshot string
}

// broker hands events to subscribers without ever blocking an operation:
// each subscriber has its own queue drained by its own goroutine.
type broker struct {
	mu     sync.Mutex
	subs   map[*subscriber]bool
	closed bool
}

type subscriber struct {
	queue *fanout.Queue[ChainChanged]
	done  chan struct{}
	out   chan ChainChanged
}

func newBroker() *broker { return &broker{subs: map[*subscriber]bool{}} }

// Subscribe returns a channel of every ChainChanged from now on, and a
// function that ends the subscription and closes the channel.
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
	b.mu.Unlock()
	go s.run()
	var once sync.Once
	return s.out, func() {
		once.Do(func() {
			b.mu.Lock()
			_, live := b.subs[s] // Close may have ended it already
			delete(b.subs, s)
			b.mu.Unlock()
			if live {
				close(s.done)
			}
		})
	}
}

func (s *subscriber) run() {
	defer close(s.out)
	s.queue.Drain(context.Background(), s.out, s.done)
}

func (b *broker) publish(ev ChainChanged) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for s := range b.subs {
		s.queue.Push(ev)
	}
}

func (b *broker) close() {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.closed = true
	for s := range b.subs {
		delete(b.subs, s)
		close(s.done)
	}
}

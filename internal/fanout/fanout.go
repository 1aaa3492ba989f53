// Package fanout is the unbounded per-subscriber queue behind xlsnap's
// event streams (storage's ChainChanged, the device model's QMP events):
// a publisher never waits for a slow reader.
package fanout

import (
	"context"
	"sync"
)

// Queue holds values for one reader until Drain hands them over.
type Queue[T any] struct {
	mu    sync.Mutex
	items []T
	wake  chan struct{}
}

// New returns an empty queue.
func New[T any]() *Queue[T] { return &Queue[T]{wake: make(chan struct{}, 1)} }

// Push queues v without blocking.
func (q *Queue[T]) Push(v T) {
	q.mu.Lock()
	q.items = append(q.items, v)
	q.mu.Unlock()
	select {
	case q.wake <- struct{}{}:
	default:
	}
}

// Drain sends the queued values to out in order, waiting for more, until
// ctx ends or done closes. The caller closes out after it returns.
func (q *Queue[T]) Drain(ctx context.Context, out chan<- T, done <-chan struct{}) {
	for {
		q.mu.Lock()
		if len(q.items) == 0 {
			q.mu.Unlock()
			select {
			case <-q.wake:
				continue
			case <-ctx.Done():
				return
			case <-done:
				return
			}
		}
		v := q.items[0]
		q.items = q.items[1:]
		q.mu.Unlock()
		select {
		case out <- v:
		case <-ctx.Done():
			return
		case <-done:
			return
		}
	}
}

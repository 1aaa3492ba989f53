package fanout

import (
	"context"
	"sync"
	"testing"
	"time"
)

// TestOrderAndNoBlocking: pushes from several goroutines never wait for
// the reader, and the reader gets every value, each pusher's in order.
func TestOrderAndNoBlocking(t *testing.T) {
	q := New[[2]int]()
	const pushers, each = 4, 1000
	var wg sync.WaitGroup
	for p := range pushers {
		wg.Go(func() {
			for i := range each {
				q.Push([2]int{p, i})
			}
		})
	}
	wg.Wait() // nobody reads yet: Push did not block
	out, done := make(chan [2]int), make(chan struct{})
	go func() { defer close(out); q.Drain(context.Background(), out, done) }()
	next := make([]int, pushers)
	for range pushers * each {
		select {
		case v := <-out:
			if v[1] != next[v[0]] {
				t.Fatalf("pusher %d: got %d, want %d", v[0], v[1], next[v[0]])
			}
			next[v[0]]++
		case <-time.After(10 * time.Second):
			t.Fatalf("values missing: %v", next)
		}
	}
	close(done)
	if _, ok := <-out; ok {
		t.Fatal("a value more than pushed, or Drain did not stop on done")
	}
}

func TestDrainStopsOnContext(t *testing.T) {
	q := New[int]()
	q.Push(1)
	ctx, cancel := context.WithCancel(context.Background())
	out := make(chan int) // never read: Drain waits to send, then sees ctx
	stopped := make(chan struct{})
	go func() { defer close(stopped); q.Drain(ctx, out, nil) }()
	cancel()
	select {
	case <-stopped:
	case <-time.After(10 * time.Second):
		t.Fatal("Drain did not stop when ctx ended")
	}
}

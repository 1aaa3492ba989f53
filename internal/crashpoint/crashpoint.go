// Package crashpoint lets crash tests kill a process at a named step. It
// is compiled in and switched on only by environment variables:
// XLSNAP_CRASH_AT=NAME kills the process with SIGKILL when NAME is hit;
// XLSNAP_CRASH_TRACE=FILE appends every name hit to FILE, so a test can
// learn the points an operation passes before it crashes at each.
package crashpoint

import (
	"context"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
)

var (
	once    sync.Once
	crashAt string
	trace   string
	mu      sync.Mutex
)

// Hit marks a point an operation reaches.
func Hit(name string) {
	once.Do(func() {
		crashAt, trace = os.Getenv("XLSNAP_CRASH_AT"), os.Getenv("XLSNAP_CRASH_TRACE")
	})
	if trace != "" {
		mu.Lock()
		if f, err := os.OpenFile(trace, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600); err == nil {
			f.WriteString(name + "\n")
			f.Close()
		}
		mu.Unlock()
	}
	if crashAt == name {
		syscall.Kill(os.Getpid(), syscall.SIGKILL)
		select {} // the signal is on its way; never run past the point
	}
	if p, _ := panicAt.Load().(string); p != "" && p == name {
		panic(Crash(name))
	}
	if a, _ := action.Load().(*hook); a != nil && a.name == name {
		a.fn()
	}
}

type hook struct {
	name string
	fn   func()
}

var action atomic.Value

// Do makes Hit run fn at name, in the operation's goroutine, until stop
// is called: for tests that break another component at a step (kill a
// daemon the operation talks to next) while the operation goes on.
func Do(name string, fn func()) (stop func()) {
	action.Store(&hook{name: name, fn: fn})
	return func() { action.Store((*hook)(nil)) }
}

var panicAt atomic.Value

// Crash is the value Hit panics with at the point PanicAt names.
type Crash string

// PanicAt makes Hit panic with Crash(name) at name instead of killing the
// process: for in-process tests whose other half would die with the
// process (libvirt's test driver keeps its domains in the process). ""
// switches it off.
func PanicAt(name string) { panicAt.Store(name) }

type opKey struct{}

// WithOp names the operation ctx runs for, so code below it (a backend)
// marks its points as that operation's: Within(ctx, "x") hits "OP/x".
func WithOp(ctx context.Context, op string) context.Context {
	return context.WithValue(ctx, opKey{}, op)
}

// Within marks a point of the operation ctx runs for (see WithOp).
func Within(ctx context.Context, name string) {
	if op, ok := ctx.Value(opKey{}).(string); ok {
		name = op + "/" + name
	}
	Hit(name)
}

// Catch runs op with PanicAt(point) armed and reports whether op reached
// point (its panic recovered there) or returned first, with op's error.
// Another panic goes on.
func Catch(point string, op func() error) (crashed bool, err error) {
	PanicAt(point)
	defer PanicAt("")
	defer func() {
		if r := recover(); r != nil {
			if _, ok := r.(Crash); !ok {
				panic(r)
			}
			crashed = true
		}
	}()
	return false, op()
}

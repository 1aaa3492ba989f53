package metastore

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"runtime"
	"runtime/debug"
	"strings"
	"syscall"

	bolt "go.etcd.io/bbolt"
	bolterrors "go.etcd.io/bbolt/errors"

	"github.com/xlsnap/xlsnap/errdefs"
)

// ErrDamaged is returned when the metadata file exists but is not a
// database xlsnap can trust: empty, cut short, or with pages that are not
// what bbolt wrote. Nothing is written to it; `xlsnap check --restore`
// (storage.RestoreStore) puts back the copy kept after the last operation.
var ErrDamaged = errdefs.ErrDamaged

func damaged(path, format string, args ...any) error {
	return fmt.Errorf("%w: %s: %s", ErrDamaged, path, fmt.Sprintf(format, args...))
}

// openErr classifies an error of bolt.Open: the system's (a permission,
// a full disk) stay as they are, bbolt's own (no valid meta page, a bad
// checksum, a file shorter than two pages) mean a damaged file.
func openErr(path string, err error) error {
	var pe *fs.PathError
	var errno syscall.Errno
	switch {
	case err == nil, errors.Is(err, ErrDamaged):
		return err
	case errors.Is(err, bolterrors.ErrTimeout):
		return fmt.Errorf("%w: %s", ErrLocked, path)
	case errors.As(err, &pe), errors.As(err, &errno):
		return err
	}
	return damaged(path, "%v", err)
}

// guard runs fn, a call into bbolt, turning what bbolt does on a damaged
// file into ErrDamaged: a panic raised inside bbolt (its page assertions,
// an index out of range on a garbage page), and a memory fault on a page
// of the mapping the file no longer backs. A panic raised elsewhere is a
// bug, not damage: it goes on.
func guard(path string, fn func() error) (err error) {
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer func() {
		r := recover()
		if r == nil {
			return
		}
		if _, fault := r.(interface{ Addr() uintptr }); fault || panicInBolt() {
			err = damaged(path, "bbolt: %v", r)
			return
		}
		panic(r)
	}()
	return fn()
}

// panicInBolt reports whether the panic being recovered was raised in
// bbolt's code: the first frame below runtime.gopanic that is not the
// runtime's own.
func panicInBolt() bool {
	pcs := make([]uintptr, 64)
	frames := runtime.CallersFrames(pcs[:runtime.Callers(2, pcs)])
	seen := false
	for {
		f, more := frames.Next()
		if seen && !strings.HasPrefix(f.Function, "runtime.") {
			return strings.HasPrefix(f.Function, "go.etcd.io/bbolt")
		}
		if f.Function == "runtime.gopanic" {
			seen = true
		}
		if !more {
			return false
		}
	}
}

// checkSize refuses a file shorter than the pages its meta page counts:
// one cut short, whose last pages bbolt would read from beyond its end.
func checkSize(path string, tx *bolt.Tx) error {
	fi, err := os.Stat(path)
	if err != nil {
		return err
	}
	if need := tx.Size(); fi.Size() < need {
		return damaged(path, "truncated: %d bytes where the store needs %d", fi.Size(), need)
	}
	return nil
}

// verify reads every record of the transaction's snapshot, in this
// goroutine so a fault is caught, then runs bbolt's own consistency check
// (free pages, page references, key order).
func verify(path string, tx *bolt.Tx) error {
	var walk func(b *bolt.Bucket) error
	walk = func(b *bolt.Bucket) error {
		return b.ForEach(func(k, v []byte) error {
			if v == nil {
				if sub := b.Bucket(k); sub != nil {
					return walk(sub)
				}
			}
			return nil
		})
	}
	err := tx.ForEach(func(_ []byte, b *bolt.Bucket) error { return walk(b) })
	if err != nil {
		return damaged(path, "%v", err)
	}
	// Read the channel out: the check's goroutine ends only then.
	var first error
	for err := range tx.Check() {
		if first == nil {
			first = err
		}
	}
	if first != nil {
		return damaged(path, "bbolt check: %v", first)
	}
	return nil
}

// verifyFile opens the bbolt file at path read-only and verifies it.
func verifyFile(ctx context.Context, path string) error {
	db, err := openDB(ctx, path, true)
	if err != nil {
		return err
	}
	defer db.Close()
	return guard(path, func() error {
		return db.View(func(tx *bolt.Tx) error { return verify(path, tx) })
	})
}

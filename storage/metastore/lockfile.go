package metastore

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"time"

	"github.com/gofrs/flock"
)

// errLockHeld: another process holds the domain's lock file.
var errLockHeld = errors.New("lock file held by another process")

// lockRetry is how often a waiting process retries another's flock; the
// kernel offers no way to wait for an flock and for ctx at once.
const lockRetry = 20 * time.Millisecond

// lockFile takes an exclusive flock (gofrs/flock: the maintained wrapper,
// rather than raw syscalls here) on path.
func lockFile(ctx context.Context, path string, wait bool) (func(), error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, err
	}
	fl := flock.New(path)
	var ok bool
	var err error
	if wait {
		ok, err = fl.TryLockContext(ctx, lockRetry)
	} else {
		ok, err = fl.TryLock()
	}
	if err != nil {
		return nil, err
	}
	if !ok {
		return nil, errLockHeld
	}
	return func() { fl.Unlock() }, nil
}

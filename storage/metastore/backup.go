package metastore

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"github.com/gofrs/flock"
	bolt "go.etcd.io/bbolt"

	"github.com/xlsnap/xlsnap/errdefs"
)

// Backuper is a store that keeps a verified copy of itself, to put back
// when the store is damaged. storage calls Backup after every operation
// commits, so a restore loses at most the operations after the last one.
type Backuper interface {
	Backup(ctx context.Context) error
}

// ErrNotDamaged: a restore was asked for a store that verifies clean
// (wraps errdefs.ErrOperationInvalid: not in the store's present state).
var ErrNotDamaged = fmt.Errorf("%w: metadata store is not damaged", errdefs.ErrOperationInvalid)

// BackupPath is where the copy of the store at path is kept.
func BackupPath(path string) string { return path + ".backup" }

// Backup writes a consistent copy of the store (bbolt's WriteTo of one
// read transaction) under a temporary name, syncs it, verifies it (every
// record read, bbolt's check), and only then renames it over the last
// copy and syncs the folder: a damaged store never replaces a good copy.
// Copies are taken one at a time (a lock file), so the last rename is of
// the newest state.
func (b *Bolt) Backup(ctx context.Context) error {
	path := b.f.path
	unlock, err := lockPath(ctx, path+".backup.lock")
	if err != nil {
		return err
	}
	defer unlock()
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, filepath.Base(path)+".backup.tmp-*")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	err = b.f.run(ctx, false, func(tx *bolt.Tx) error {
		_, err := tx.WriteTo(f)
		return err
	})
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("backing up %s: %w", path, err)
	}
	if err := verifyFile(ctx, f.Name()); err != nil {
		return fmt.Errorf("backing up %s: the copy does not verify, the last one is kept: %w", path, err)
	}
	if err := os.Rename(f.Name(), BackupPath(path)); err != nil {
		return err
	}
	return syncDir(dir)
}

// Restored says what RestoreBolt did.
type Restored struct {
	// Store is the store's file, now a copy of Backup.
	Store  string `json:"store"`
	Backup string `json:"backup"`
	// SetAside is the name the replaced store's file was given ("" when
	// there was none); it is never removed.
	SetAside string `json:"set_aside,omitempty"`
	// Reason is why the store was replaced: its damage, or "forced".
	Reason string `json:"reason"`
}

// RestoreBolt puts the verified copy Backup keeps back in place of the
// store at path. It refuses (ErrNotDamaged) when the store verifies
// clean, unless force is set. The store's file is kept beside it as
// path.damaged-<UTC time> (a hard link made before the copy is renamed
// over it, so the store's name always names a whole file).
func RestoreBolt(ctx context.Context, path string, force bool) (*Restored, error) {
	unlock, err := lockPath(ctx, path+".backup.lock")
	if err != nil {
		return nil, err
	}
	defer unlock()
	r := &Restored{Store: path, Backup: BackupPath(path), Reason: "forced"}
	if _, err := os.Stat(r.Backup); err != nil {
		return nil, fmt.Errorf("no backup of the metadata store to restore: %w", err)
	}
	if err := verifyFile(ctx, r.Backup); err != nil {
		return nil, fmt.Errorf("the backup cannot be restored: %w", err)
	}
	_, err = os.Stat(path)
	exists := err == nil
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, err
	}
	if exists {
		verr := verifyFile(ctx, path)
		switch {
		case errors.Is(verr, ErrDamaged):
			r.Reason = verr.Error()
		case verr != nil:
			return nil, verr
		case !force:
			return nil, fmt.Errorf("%w: %s verifies clean (force replaces it anyway)", ErrNotDamaged, path)
		}
		// Hold the store's own lock (bbolt's flock) while it is replaced,
		// so no transaction of another process runs across the swap; a
		// process holding the file lets go of it for a waiter.
		unlockStore, err := lockStore(ctx, path)
		if err != nil {
			return nil, err
		}
		defer unlockStore()
	}
	dir := filepath.Dir(path)
	tmp, err := copyTemp(r.Backup, dir, filepath.Base(path)+".restore-*")
	if err != nil {
		return nil, err
	}
	defer os.Remove(tmp)
	if exists {
		if r.SetAside, err = linkAside(path); err != nil {
			return nil, err
		}
	}
	if err := os.Rename(tmp, path); err != nil {
		return nil, err
	}
	return r, syncDir(dir)
}

// linkAside gives the file at path a second name, path.damaged-<UTC
// time>, never replacing a file of that name.
func linkAside(path string) (string, error) {
	base := path + ".damaged-" + time.Now().UTC().Format("20060102T150405Z")
	name := base
	for i := 2; ; i++ {
		err := os.Link(path, name)
		if err == nil {
			return name, nil
		}
		if !errors.Is(err, fs.ErrExist) {
			return "", err
		}
		name = fmt.Sprintf("%s-%d", base, i)
	}
}

// copyTemp copies src to a new synced file in dir and returns its name.
func copyTemp(src, dir, pattern string) (string, error) {
	in, err := os.Open(src)
	if err != nil {
		return "", err
	}
	defer in.Close()
	out, err := os.CreateTemp(dir, pattern)
	if err != nil {
		return "", err
	}
	_, err = io.Copy(out, in)
	if err == nil {
		err = out.Sync()
	}
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Chmod(out.Name(), 0o600)
	}
	if err != nil {
		os.Remove(out.Name())
		return "", err
	}
	return out.Name(), nil
}

// lockPath takes an exclusive flock on path, waiting as long as ctx lets.
func lockPath(ctx context.Context, path string) (func(), error) {
	fl := flock.New(path)
	ok, err := fl.TryLockContext(ctx, 20*time.Millisecond)
	if err != nil {
		return nil, err
	}
	if !ok {
		return nil, fmt.Errorf("%w: %s", ErrLocked, path)
	}
	return func() { fl.Unlock() }, nil
}

// lockStore takes the store file's own lock (the one bbolt takes), as a
// waiter that a process holding the file gives way to.
func lockStore(ctx context.Context, path string) (func(), error) {
	f, err := os.OpenFile(path, os.O_RDWR, 0o600)
	if err != nil {
		return nil, err
	}
	if err := waitLock(ctx, f, path, syscall.LOCK_EX); err != nil {
		f.Close()
		return nil, err
	}
	return func() { f.Close() }, nil
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

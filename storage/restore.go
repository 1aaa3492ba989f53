package storage

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/xlsnap/xlsnap/storage/metastore"
)

// StoreFile is the embedded store's file in a state folder.
func StoreFile(stateDir string) string { return filepath.Join(stateDir, "xlsnap.db") }

// backup has the store keep its verified copy, when it can: called once
// an operation's metadata is committed, so a restore loses at most what
// came after. The operation stands either way: a copy that could not be
// refreshed (a full state folder, say) is marked stale for Check, and
// the mark goes with the next copy made.
func (m *Manager) backup(ctx context.Context) error {
	b, ok := m.store.(metastore.Backuper)
	if !ok {
		return nil
	}
	mark := staleBackupMark(m.stateDir)
	if err := b.Backup(ctx); err != nil {
		f, ferr := os.Create(mark)
		if ferr == nil {
			f.WriteString(err.Error() + "\n")
			f.Close()
		}
		return nil
	}
	if err := os.Remove(mark); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return nil
}

// staleBackupMark is the file that says the store's copy is older than
// the store, and why.
func staleBackupMark(stateDir string) string {
	return filepath.Join(stateDir, "xlsnap.db.backup-stale")
}

// RestoreStore puts the copy of the embedded store kept after the last
// committed operation back in place of a damaged one. It needs no
// Manager (Open fails on a damaged store). It refuses a store that
// verifies clean (ErrOperationInvalid) unless force is set; the replaced
// file is kept beside it as xlsnap.db.damaged-<UTC time>, never removed.
// An operation that committed after the copy was made is lost: Check
// then reports the images it left.
func RestoreStore(ctx context.Context, stateDir string, force bool) (*metastore.Restored, error) {
	if stateDir == "" {
		return nil, fmt.Errorf("%w: no state folder", ErrInvalidArg)
	}
	r, err := metastore.RestoreBolt(ctx, StoreFile(stateDir), force)
	if errors.Is(err, metastore.ErrNotDamaged) {
		return nil, fmt.Errorf("%w: %w", ErrOperationInvalid, err)
	}
	return r, err
}

// Package dir is the storage backend for a folder of qcow2 (and raw base)
// images, doing its work through qemu-img.
package dir

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"

	"github.com/xlsnap/xlsnap/chain"
	"github.com/xlsnap/xlsnap/internal/crashpoint"
	"github.com/xlsnap/xlsnap/internal/fsutil"
	"github.com/xlsnap/xlsnap/internal/qemuimg"
	"github.com/xlsnap/xlsnap/storage"
)

// Backend implements storage.Backend and storage.InternalSnapshotter.
type Backend struct {
	root string
	img  qemuimg.Runner
}

// New opens a folder pool; the folder must exist.
func New(pc storage.PoolConfig) (storage.Backend, error) {
	abs, err := filepath.Abs(pc.Path)
	if err != nil {
		return nil, err
	}
	st, err := os.Stat(abs)
	if err != nil {
		return nil, fmt.Errorf("pool %q: %w", pc.Name, err)
	}
	if !st.IsDir() {
		return nil, fmt.Errorf("%w: pool %q: %s is not a folder", storage.ErrInvalidArg, pc.Name, abs)
	}
	return &Backend{root: abs}, nil
}

func (b *Backend) Root() string { return b.root }

// CreateOverlay makes the overlay under a temporary name (TempName) and
// links it into place only once qemu-img is done: a crash leaves either
// no overlay or a whole one, never a half-made file at the overlay's
// name, and the temporary file is recognisably xlsnap's.
func (b *Backend) CreateOverlay(ctx context.Context, path, format, backing, backingFormat string) error {
	tmp := storage.TempName(path)
	os.Remove(tmp) // a crash's leftover: ours by its name
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_EXCL|syscall.O_NOFOLLOW, 0o600)
	if err != nil {
		return err
	}
	defer os.Remove(tmp)
	// The device model opens the overlay as it opened the image below:
	// same owner, same mode, set before any data is in it.
	err = takeOwner(f, backing)
	f.Close()
	if err != nil {
		return err
	}
	if err := b.img.Create(ctx, qemuimg.CreateOptions{Path: tmp, Format: format, Backing: backing, BackingFormat: backingFormat}); err != nil {
		return err
	}
	crashpoint.Within(ctx, "overlay-made")
	return linkInPlace(tmp, path)
}

// linkInPlace gives the finished file tmp its name, never replacing a
// file that is there (link fails with EEXIST), and makes it durable.
func linkInPlace(tmp, path string) error {
	t, err := os.OpenFile(tmp, os.O_RDONLY|syscall.O_NOFOLLOW, 0)
	if err != nil {
		return err
	}
	err = t.Sync()
	t.Close()
	if err != nil {
		return err
	}
	if err := os.Link(tmp, path); err != nil {
		return err
	}
	if err := os.Remove(tmp); err != nil {
		return err
	}
	return syncDir(path)
}

func (b *Backend) Commit(ctx context.Context, path, format string, progress func(float64)) error {
	// -d: path is removed once the merge is durable; emptying it first
	// would only widen the window in which a kill leaves it half-written.
	return b.img.Commit(ctx, qemuimg.CommitOptions{Path: path, Format: format, Drop: true, Progress: progress})
}

func (b *Backend) Rebase(ctx context.Context, path, format, backing, backingFormat string, progress func(float64)) error {
	return b.img.Rebase(ctx, qemuimg.RebaseOptions{Path: path, Format: format, Backing: backing, BackingFormat: backingFormat, Progress: progress})
}

func (b *Backend) RebaseUnsafe(ctx context.Context, path, format, backing, backingFormat string) error {
	return b.img.Rebase(ctx, qemuimg.RebaseOptions{Path: path, Format: format, Backing: backing, BackingFormat: backingFormat, Unsafe: true})
}

// AllocatedBytes reads the image's own tables (chain.Allocated): no
// qemu-img process, and no lock, so it works on images a running device
// model holds open.
func (b *Backend) AllocatedBytes(ctx context.Context, path, format string) (int64, error) {
	return chain.Allocated(path, chain.Format(format))
}

func (b *Backend) Check(ctx context.Context, path, format string) error {
	if format == "raw" {
		return nil // raw images have no metadata to check
	}
	res, err := b.img.Check(ctx, path, format)
	if errors.Is(err, qemuimg.ErrCheckFailed) && res.Corruptions == 0 && res.Leaks > 0 {
		return fmt.Errorf("%w: %s: %d leaked clusters (%w)", storage.ErrLeaks, path, res.Leaks, err)
	}
	return err
}

// RepairLeaks frees leaked clusters with qemu-img check -r leaks.
func (b *Backend) RepairLeaks(ctx context.Context, path, format string) error {
	_, err := b.img.RepairLeaks(ctx, path, format)
	return err
}

func (b *Backend) Remove(ctx context.Context, path string) error {
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return syncDir(path)
}

func (b *Backend) InternalCreate(ctx context.Context, path, format, name string) error {
	return b.img.SnapshotCreate(ctx, path, format, name)
}

func (b *Backend) InternalApply(ctx context.Context, path, format, name string) error {
	return b.img.SnapshotApply(ctx, path, format, name)
}

func (b *Backend) InternalDelete(ctx context.Context, path, format, name string) error {
	return b.img.SnapshotDelete(ctx, path, format, name)
}

// InternalCopy converts under a temporary name too (see CreateOverlay).
func (b *Backend) InternalCopy(ctx context.Context, path, format, name, dst, backing, backingFormat string) error {
	tmp := storage.TempName(dst)
	os.Remove(tmp)
	defer os.Remove(tmp)
	err := b.img.Convert(ctx, qemuimg.ConvertOptions{Src: path, SrcFormat: format, Snapshot: name,
		Dst: tmp, DstFormat: "qcow2", Backing: backing, BackingFormat: backingFormat})
	if err != nil {
		return err
	}
	// The copy takes the place of the image its snapshot is in.
	f, err := os.OpenFile(tmp, os.O_RDONLY|syscall.O_NOFOLLOW, 0)
	if err != nil {
		return err
	}
	err = takeOwner(f, path)
	f.Close()
	if err != nil {
		return err
	}
	return linkInPlace(tmp, dst)
}

// takeOwner gives a new image the permission bits and owner of the image
// it covers (like), keeping the owner's write bit: the new image is the
// one the guest writes, even over a read-only base. Changing the owner needs root: a process that is not
// root tries only when the owners differ, and a refusal there is not an
// error (the image stays its creator's, as any file it makes).
func takeOwner(f *os.File, like string) error {
	st, err := os.Stat(like)
	if err != nil {
		return err
	}
	if err := f.Chmod(st.Mode().Perm() | 0o200); err != nil {
		return err
	}
	if err := fsutil.SameOwner(f, st); err != nil {
		return fmt.Errorf("giving %s the owner of %s: %w", f.Name(), like, err)
	}
	return nil
}

// syncDir makes a created or removed name durable.
func syncDir(path string) error { return fsutil.SyncDir(filepath.Dir(path)) }

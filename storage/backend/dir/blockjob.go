package dir

import (
	"context"

	"github.com/xlsnap/xlsnap/internal/qemuimg"
	"github.com/xlsnap/xlsnap/storage"
)

var _ storage.BaseCommitter = (*Backend)(nil)

// CommitInto is qemu-img commit -b BASE: path's data and that of every
// image between it and base go into base in one pass. The formats come
// from the images' headers, as storage recorded them (never probed);
// qemu-img leaves path and the images between as they are (-b implies
// -d).
func (b *Backend) CommitInto(ctx context.Context, path, format, base string, progress func(float64)) error {
	return b.img.Commit(ctx, qemuimg.CommitOptions{Path: path, Format: format, Base: base, Drop: true, Progress: progress})
}

package storage

import (
	"context"
	"fmt"
	"path/filepath"
	"sort"
	"strings"
	"sync"
)

// Backend does a pool's disk work. It is given paths inside its pool and
// formats always explicit; it never decides policy, storage does.
type Backend interface {
	// Root is the folder the pool's images live in.
	Root() string
	// CreateOverlay creates path (format) backed by backing (backingFormat).
	CreateOverlay(ctx context.Context, path, format, backing, backingFormat string) error
	// Commit writes path's data into its backing image.
	Commit(ctx context.Context, path, format string, progress func(percent float64)) error
	// Rebase makes backing path's backing image (backing "" for none),
	// copying whatever is needed so path's content is unchanged.
	Rebase(ctx context.Context, path, format, backing, backingFormat string, progress func(percent float64)) error
	// RebaseUnsafe rewrites only the backing reference.
	RebaseUnsafe(ctx context.Context, path, format, backing, backingFormat string) error
	// AllocatedBytes is the data held by path itself, not its backing.
	AllocatedBytes(ctx context.Context, path, format string) (int64, error)
	// Check reports an image's consistency problems as an error.
	Check(ctx context.Context, path, format string) error
	// Remove deletes an image; removing a missing one is not an error.
	Remove(ctx context.Context, path string) error
}

// LeakRepairer is the optional ability to free leaked clusters (what a
// killed commit or rebase leaves in an image): data no table references.
type LeakRepairer interface {
	RepairLeaks(ctx context.Context, path, format string) error
}

// InternalSnapshotter is the optional ability to keep snapshots inside an
// image (qcow2).
type InternalSnapshotter interface {
	InternalCreate(ctx context.Context, path, format, name string) error
	InternalApply(ctx context.Context, path, format, name string) error
	InternalDelete(ctx context.Context, path, format, name string) error
	// InternalCopy creates dst holding what path held at the internal
	// snapshot name, as an overlay of backing (path's own backing).
	InternalCopy(ctx context.Context, path, format, name, dst, backing, backingFormat string) error
}

// PoolConfig names a pool and where its images are.
type PoolConfig struct {
	Name string `json:"name"`
	Type string `json:"type"`
	Path string `json:"path"`
	// MaxDepth is the most layers a disk's chain may have once a new
	// overlay in this pool is on it (the new one included): a snapshot
	// that would pass it first coalesces what nothing needs, else is
	// refused (ChainTooLongError). 0 means DefaultMaxDepth (30, XAPI's
	// limit); at most 1000, the deepest chain xlsnap reads.
	MaxDepth int `json:"max_depth,omitempty"`
}

// Factory opens a backend for a pool.
type Factory func(PoolConfig) (Backend, error)

var (
	registryMu sync.RWMutex
	registry   = map[string]Factory{}
)

// Register makes a backend type available to pools, like database/sql
// drivers; callers register explicitly (no init side effects).
func Register(typ string, f Factory) {
	registryMu.Lock()
	defer registryMu.Unlock()
	registry[typ] = f
}

// Backends lists the registered types.
func Backends() []string {
	registryMu.RLock()
	defer registryMu.RUnlock()
	var out []string
	for t := range registry {
		out = append(out, t)
	}
	sort.Strings(out)
	return out
}

func openBackend(pc PoolConfig) (Backend, error) {
	if err := checkPoolConfig(pc); err != nil {
		return nil, err
	}
	registryMu.RLock()
	f, ok := registry[pc.Type]
	registryMu.RUnlock()
	if !ok {
		return nil, fmt.Errorf("%w: pool %q: no backend %q registered (have %v)", ErrInvalidArg, pc.Name, pc.Type, Backends())
	}
	return f(pc)
}

// TempName is where a backend makes a new image before giving it its
// name: a hidden file in the same folder, recognisably xlsnap's, so a
// crash's leftover is never taken for an image and may be removed.
func TempName(path string) string {
	return filepath.Join(filepath.Dir(path), "."+filepath.Base(path)+tempSuffix)
}

const tempSuffix = ".xlsnap-tmp"

// IsTempName reports a name TempName made.
func IsTempName(path string) bool {
	base := filepath.Base(path)
	return strings.HasPrefix(base, ".") && strings.HasSuffix(base, tempSuffix)
}

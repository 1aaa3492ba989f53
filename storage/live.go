package storage

import (
	"context"
	"errors"
	"fmt"

	"github.com/xlsnap/xlsnap/chain"
	"github.com/xlsnap/xlsnap/storage/metastore"
)

// Live carries out chain changes of an active domain through its device
// model: every step that changes such a chain goes through it, never
// behind its back. xenlight implements it over QMP.
type Live interface {
	// Snapshot switches every external disk from its active image to a
	// new overlay and takes every internal one, in one transaction: all or
	// none. On failure no created file remains.
	Snapshot(ctx context.Context, disks []LiveOverlay) error
	// Uses reports whether any disk of the device model reads image (as
	// its active layer or anywhere in its backing chain).
	Uses(ctx context.Context, image string) (bool, error)
	// Writes reports whether a disk of the device model writes to image.
	Writes(ctx context.Context, image string) (bool, error)
	// InternalDelete deletes an internal snapshot of an image in use.
	InternalDelete(ctx context.Context, image, name string) error
	// Commit writes top into base (its backing) and drops top from the
	// chain; if a disk writes to top, it writes to base afterwards.
	Commit(ctx context.Context, top, base string, progress func(float64)) error
	// Stream copies into image what its backing chain holds above base
	// (base "" for all of it) and makes base its backing.
	Stream(ctx context.Context, image, base, baseFormat string, progress func(float64)) error
}

// LiveOverlay is one disk's part in a live snapshot: a new overlay, or
// with Internal set an internal snapshot of that name in Image.
type LiveOverlay struct {
	Disk        string
	Image       string // the active layer now
	ImageFormat string
	Overlay     string // the new active layer, created by the device model
	Format      string
	Internal    string
}

// errLiveDone: an undo found that the device model already made the
// change; recovery finishes the operation instead.
var errLiveDone = errors.New("the device model already carried out this step")

func isLiveStep(k metastore.StepKind) bool {
	switch k {
	case metastore.StepLiveSnapshot, metastore.StepLiveInternalDelete, metastore.StepLiveCommit, metastore.StepLiveStream:
		return true
	}
	return false
}

func needLive(live Live, st step) error {
	if live == nil {
		return fmt.Errorf("%w: step %s of %s needs the domain's device model, or the domain shut off (RecoverOffline)", ErrLiveUnsupported, st.Kind, st.Path)
	}
	return nil
}

// redoLive runs a live step unless the device model shows it done. A
// fresh step (run for the first time, not by recovery) skips that check:
// it costs queries inside the device model while the guest waits. With
// the device model gone (offline), the images tell instead.
func (m *Manager) redoLive(ctx context.Context, st step, live Live, fresh bool) error {
	if o, ok := live.(offline); ok {
		return m.redoOffline(ctx, st, o.domain)
	}
	if err := needLive(live, st); err != nil {
		return err
	}
	switch st.Kind {
	case metastore.StepLiveSnapshot:
		if !fresh {
			done, err := m.liveSnapshotDone(ctx, st, live)
			if err != nil || done {
				return err
			}
		}
		var disks []LiveOverlay
		for _, g := range st.Group {
			lo := LiveOverlay{Disk: g.Disk, Image: g.Backing, ImageFormat: g.BackingFormat, Overlay: g.Path, Format: g.Format}
			if g.Kind == metastore.StepInternalCreate {
				lo = LiveOverlay{Disk: g.Disk, Image: g.Path, ImageFormat: g.Format, Internal: g.Name}
			}
			disks = append(disks, lo)
		}
		return live.Snapshot(ctx, disks)
	case metastore.StepLiveInternalDelete:
		if has, err := hasInternal(st.Path, st.Name); err != nil || !has {
			return err
		}
		return live.InternalDelete(ctx, st.Path, st.Name)
	case metastore.StepLiveCommit:
		if !fresh {
			if used, err := live.Uses(ctx, st.Path); err != nil || !used {
				return err
			}
		}
		return live.Commit(ctx, st.Path, st.Backing, progressFor(ctx, "commit", st))
	case metastore.StepLiveStream:
		if !fresh {
			if used, err := live.Uses(ctx, st.UndoBacking); err != nil || !used {
				return err
			}
		}
		return live.Stream(ctx, st.Path, st.Backing, st.BackingFormat, progressFor(ctx, "stream", st))
	}
	return fmt.Errorf("unknown live step %q", st.Kind)
}

// undoLive undoes a live step that did not take effect; one that did
// cannot be undone on a running guest and reports errLiveDone.
func (m *Manager) undoLive(ctx context.Context, st step, live Live) error {
	if isOffline(live) {
		return m.undoOffline(ctx, st)
	}
	if err := needLive(live, st); err != nil {
		return err
	}
	switch st.Kind {
	case metastore.StepLiveSnapshot:
		if done, err := m.liveSnapshotDone(ctx, st, live); err != nil {
			return err
		} else if done {
			return errLiveDone
		}
		// A transaction that failed half-way leaves the overlays of the
		// actions that succeeded on disk; QEMU no longer uses them. One
		// that holds data was switched to by a device model that died,
		// and the domain runs again from its definition: those writes are
		// nowhere else, so it is kept (check lists it).
		for _, g := range st.Group {
			if g.Kind == metastore.StepCreateOverlay && !holdsData(g) {
				if err := m.undo(ctx, g, nil); err != nil {
					return err
				}
			}
		}
		return nil
	case metastore.StepLiveInternalDelete:
		return fmt.Errorf("step %q cannot be undone", st.Kind)
	case metastore.StepLiveCommit, metastore.StepLiveStream:
		gone := st.Path
		if st.Kind == metastore.StepLiveStream {
			gone = st.UndoBacking
		}
		if used, err := live.Uses(ctx, gone); err != nil {
			return err
		} else if !used {
			return errLiveDone
		}
		return nil // a job that failed or never ran changed no chain
	}
	return fmt.Errorf("unknown live step %q", st.Kind)
}

// liveSnapshotDone reads a live snapshot's outcome: the transaction is
// atomic, so its first action tells for all.
func (m *Manager) liveSnapshotDone(ctx context.Context, st step, live Live) (bool, error) {
	g := st.Group[0]
	if g.Kind == metastore.StepInternalCreate {
		return hasInternal(g.Path, g.Name)
	}
	return live.Writes(ctx, g.Path)
}

// holdsData reports whether a live snapshot's new overlay is there, an
// overlay of its image, with data of its own (or tables that cannot be
// read: it may).
func holdsData(g step) bool {
	if !isOverlayOf(g.Path, g.Backing) {
		return false
	}
	n, err := chain.Allocated(g.Path, chain.Format(g.Format))
	return err != nil || n > 0
}

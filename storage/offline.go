package storage

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"slices"

	"github.com/hashicorp/go-multierror"

	"github.com/xlsnap/xlsnap/chain"
	"github.com/xlsnap/xlsnap/storage/metastore"
)

// A live operation whose device model died (killed, crashed) in the
// middle leaves its intent in the journal, and the domain shut off: no
// device model can tell how far it got any more. RecoverOffline judges
// each live step from the images instead, and finishes or undoes it with
// qemu-img, by these rules (each keeps every byte the guest wrote and
// flushed before the device model died):
//
//   - live-commit (Path into Backing) without the pivot's mark is redone:
//     qemu-img commit -b Backing Path, then every image the record shows
//     backed by Path whose header still names it is rebased (safe mode)
//     onto Backing, and the intent's remaining steps run. A commit job
//     writes into Backing only data the chain above it holds, and Path
//     (with the images between) stays on disk until the operation has
//     committed, so writing it again is harmless; it also mends a
//     finished intermediate job whose metadata QEMU never flushed (the
//     overlay's header already names Backing, whose tables lack the
//     data). An active commit without the mark never pivoted (the mark is
//     durable before job-complete is sent): Path holds every guest write.
//   - live-commit with the mark (Pivoting: an active commit) is not
//     redone, for it may have pivoted, and nothing on disk tells: after
//     the pivot the guest wrote Backing only, and committing Path again
//     would overwrite those writes with older data. Nor need it be: the
//     mark was made with the guest paused, the job in sync (Backing held
//     what Path did) and Backing flushed, and the guest wrote nothing
//     until the pivot (xlsnap resumes it without pivoting only once the
//     mark is taken back). So Backing holds every write, pivot or not;
//     the rest runs as above (the records and the definition name
//     Backing; Path is removed once nothing is found to use it).
//   - live-stream (into Path from above Backing; UndoBacking was Path's
//     backing) is undone while Path's header still names UndoBacking (a
//     stream copies only what the chain already reads: nothing to take
//     back), and finished once it names Backing (QEMU completed the job):
//     Path is put back on UndoBacking (unsafe: same content) and safely
//     rebased onto Backing, so a job whose copies QEMU never flushed loses
//     nothing. Past the point of no return it is finished the same way.
//   - live-snapshot took effect when every overlay of its group is a
//     qcow2 backed by its image (with that image's format) that qemu-img
//     check accepts, and every internal snapshot of the group is there: it
//     is finished, as the images stood when the device model died (an
//     overlay may hold guest writes made after the switch; an empty one
//     is a snapshot taken at that moment). Otherwise the transaction cannot
//     have switched any disk (QEMU creates every overlay and internal
//     snapshot before its transaction completes, and holds the guest's
//     I/O drained meanwhile), so no overlay holds guest data: it is undone,
//     removing the empty files at the overlays' names and the overlays of
//     their images that hold no data and that nothing else names, and
//     deleting the internal snapshots. Anything else at an overlay's name
//     is kept (check lists it); an overlay that holds data stops the undo,
//     never removed.
//   - live-internal-delete is redone with qemu-img snapshot -d while the
//     snapshot is still there.
type offline struct{ domain string }

var _ Live = offline{}

// errNoDeviceModel: a Live call reached the device model of a domain
// that is shut off. The offline rules above never make one.
var errNoDeviceModel = fmt.Errorf("%w: the domain is shut off: no device model", ErrLiveUnsupported)

func (offline) Snapshot(context.Context, []LiveOverlay) error        { return errNoDeviceModel }
func (offline) Uses(context.Context, string) (bool, error)           { return false, errNoDeviceModel }
func (offline) Writes(context.Context, string) (bool, error)         { return false, errNoDeviceModel }
func (offline) InternalDelete(context.Context, string, string) error { return errNoDeviceModel }
func (offline) Commit(context.Context, string, string, func(float64), Pivot) error {
	return errNoDeviceModel
}
func (offline) Stream(context.Context, string, string, string, func(float64)) error {
	return errNoDeviceModel
}

func isOffline(live Live) bool {
	_, ok := live.(offline)
	return ok
}

// RecoverOffline finishes or undoes the live operations a domain's device
// model left half-done when it died (see the rules on offline): the
// domain is shut off now. Its caller must know that, under the domain's
// lock (the driver asks the hypervisor, then calls this): redone while a
// device model still ran the job, a step would write behind its back. An
// intent another host of a shared store wrote is left to that host (the
// domain may run there) and reported.
//
// Errors: ErrPending, wrapping the cause, for an intent it can neither
// finish nor undo yet (an image gone or changed, an overlay that holds
// data beside a half-made transaction; check lists it); ErrBusy; the
// store's.
func (m *Manager) RecoverOffline(ctx context.Context, domain string) error {
	return m.eachIntent(ctx, domain, func(in *intent) error {
		if !in.Live || in.Committed {
			return nil // not the device model's, or only its cleanup left (lockDomain runs it)
		}
		if m.shared && in.Owner != "" && in.Owner != m.host {
			return fmt.Errorf("%w: host %s started it, and the domain may run there: that host finishes it", ErrPending, in.Owner)
		}
		if err := m.recoverIntent(ctx, in, offline{domain: domain}); err != nil {
			return fmt.Errorf("%w (the device model is gone; finished or undone from the images once the cause is fixed): %w", ErrPending, err)
		}
		return nil
	})
}

// redoOffline finishes a live step from the images (see offline).
func (m *Manager) redoOffline(ctx context.Context, st step, domain string) error {
	switch st.Kind {
	case metastore.StepLiveCommit:
		return m.redoCommitOffline(ctx, st, domain)
	case metastore.StepLiveStream:
		return m.redoStreamOffline(ctx, st)
	case metastore.StepLiveSnapshot:
		took, err := m.liveSnapshotTook(ctx, st)
		if err != nil || took {
			return err
		}
		// Reached only past the point of no return, which a snapshot's
		// intent never passes: refuse rather than guess.
		return fmt.Errorf("%w: the live snapshot's overlays are not all there: it cannot be finished offline", ErrChainBroken)
	case metastore.StepLiveInternalDelete:
		off := st
		off.Kind = metastore.StepInternalDelete
		return m.redo(ctx, off, nil)
	}
	return fmt.Errorf("unknown live step %q", st.Kind)
}

// undoOffline undoes a live step that did not take effect, or reports
// errLiveDone for one that did (see offline).
func (m *Manager) undoOffline(ctx context.Context, st step) error {
	switch st.Kind {
	case metastore.StepLiveSnapshot:
		took, err := m.liveSnapshotTook(ctx, st)
		if err != nil {
			return err
		}
		if took {
			return errLiveDone
		}
		return m.undoSnapshotOffline(ctx, st)
	case metastore.StepLiveStream:
		on, err := backingNow(st.Path)
		if err != nil {
			return err
		}
		switch {
		case on == filepath.Clean(st.UndoBacking):
			return nil
		case on == cleanOrEmpty(st.Backing):
			return errLiveDone
		}
		return fmt.Errorf("%w: %s is backed by %q, neither %s nor %s as the stream left it", ErrChainBroken, st.Path, on, st.UndoBacking, st.Backing)
	}
	return fmt.Errorf("step %q cannot be undone", st.Kind)
}

// redoCommitOffline is qemu-img commit -b Backing Path (none for a step
// with the pivot's mark), then a safe rebase onto Backing of each image
// the record shows backed by Path whose header still names Path (the
// overlay QEMU would have repointed). Everything is checked before the
// first change.
func (m *Manager) redoCommitOffline(ctx context.Context, st step, domain string) error {
	if !exists(st.Path) {
		return fmt.Errorf("%w: %s, which this operation commits into %s, is gone (moved?)", ErrChainBroken, st.Path, st.Backing)
	}
	c, err := chain.Walk(ctx, st.Path, chain.Format(st.Format), m.policy())
	if err != nil {
		return fmt.Errorf("reading the chain of %s: %w", st.Path, err)
	}
	if !slices.ContainsFunc(c.Layers, func(l chain.Layer) bool { return filepath.Clean(l.Path) == filepath.Clean(st.Backing) }) {
		return fmt.Errorf("%w: %s is no longer in the chain of %s, which this operation commits into it", ErrChainBroken, st.Backing, st.Path)
	}
	var d *Domain
	if err := m.store.View(ctx, func(tx metastore.Tx) error {
		var err error
		d, err = tx.Domain(domain)
		return err
	}); err != nil {
		return err
	}
	var above []string
	for _, k := range d.Children(st.Path) {
		on, err := backingNow(k)
		if err != nil {
			return fmt.Errorf("reading %s, backed by %s: %w", k, st.Path, err)
		}
		switch on {
		case filepath.Clean(st.Path):
			above = append(above, k)
		case filepath.Clean(st.Backing): // QEMU repointed it already
		default:
			return fmt.Errorf("%w: %s is backed by %q, neither %s nor %s as the commit left it", ErrChainBroken, k, on, st.Path, st.Backing)
		}
	}
	slices.Sort(above)
	b, err := m.backendFor(st.Path)
	if err != nil {
		return err
	}
	if !pivotIsMarked(st.Pivoting) {
		if err := m.commitInto(ctx, b, st); err != nil {
			return err
		}
	}
	for _, k := range above {
		kb, err := m.backendFor(k)
		if err != nil {
			return err
		}
		format := d.Images[k].Format
		// The device model wrote into it until it died.
		if err := m.repairLeaks(ctx, k, format); err != nil {
			return err
		}
		if err := kb.Rebase(ctx, k, format, st.Backing, st.BackingFormat, progressFor(ctx, "rebase", st)); err != nil {
			return err
		}
	}
	return nil
}

// redoStreamOffline puts Path back on UndoBacking (unsafe: the content
// is the same over either) when QEMU had switched it, then rebases it
// safely onto Backing.
func (m *Manager) redoStreamOffline(ctx context.Context, st step) error {
	on, err := backingNow(st.Path)
	if err != nil {
		return err
	}
	b, err := m.backendFor(st.Path)
	if err != nil {
		return err
	}
	if !exists(st.UndoBacking) {
		if on == cleanOrEmpty(st.Backing) {
			// The layers the stream read are gone: someone removed them
			// after it; what Path holds cannot be checked against them.
			return fmt.Errorf("%w: %s, which the stream into %s read, is gone (moved?)", ErrChainBroken, st.UndoBacking, st.Path)
		}
		return fmt.Errorf("%w: %s, the backing of %s, is gone (moved?)", ErrChainBroken, st.UndoBacking, st.Path)
	}
	switch on {
	case filepath.Clean(st.UndoBacking):
	case cleanOrEmpty(st.Backing):
		if err := b.RebaseUnsafe(ctx, st.Path, st.Format, st.UndoBacking, st.UndoBackingFormat); err != nil {
			return err
		}
	default:
		return fmt.Errorf("%w: %s is backed by %q, neither %s nor %s as the stream left it", ErrChainBroken, st.Path, on, st.UndoBacking, st.Backing)
	}
	return b.Rebase(ctx, st.Path, st.Format, st.Backing, st.BackingFormat, progressFor(ctx, "stream", st))
}

// liveSnapshotTook reports whether a live snapshot's every overlay is a
// whole qcow2 over its image and every internal snapshot is there.
func (m *Manager) liveSnapshotTook(ctx context.Context, st step) (bool, error) {
	for _, g := range st.Group {
		if g.Kind == metastore.StepInternalCreate {
			has, err := hasInternal(g.Path, g.Name)
			if err != nil || !has {
				return false, err
			}
			continue
		}
		h, err := readHeader(g.Path)
		if err != nil || h.BackingFile == "" || h.BackingFormat != g.BackingFormat ||
			filepath.Clean(chain.ResolveBacking(g.Path, h.BackingFile)) != filepath.Clean(g.Backing) {
			return false, nil
		}
		b, err := m.backendFor(g.Path)
		if err != nil {
			return false, err
		}
		if err := b.Check(ctx, g.Path, g.Format); err != nil && !errors.Is(err, ErrLeaks) {
			return false, nil
		}
	}
	return true, nil
}

// undoSnapshotOffline takes back what a live snapshot that switched no
// disk made: the internal snapshots, and the overlays that hold no data
// and that nothing names.
func (m *Manager) undoSnapshotOffline(ctx context.Context, st step) error {
	var u *users
	var errs error
	for _, g := range st.Group {
		if g.Kind == metastore.StepInternalCreate {
			if err := m.undo(ctx, g, nil); err != nil {
				errs = multierror.Append(errs, err)
			}
			continue
		}
		if err := removeTemp(g.Path); err != nil {
			return err
		}
		if !exists(g.Path) {
			continue
		}
		if !isEmptyFile(g.Path) {
			if !isOverlayOf(g.Path, g.Backing) {
				continue // not the overlay this step made: kept
			}
			n, err := chain.Allocated(g.Path, chain.Format(g.Format))
			if err != nil {
				continue // a creation cut short, or not ours to judge: kept
			}
			if n > 0 {
				errs = multierror.Append(errs, fmt.Errorf("%w: %s holds %d bytes of data, though the snapshot's other images are not all there: kept", ErrChainBroken, g.Path, n))
				continue
			}
		}
		if u == nil {
			var err error
			if u, err = m.scanUsers(ctx); err != nil {
				return err
			}
		}
		if len(u.ofName(g.Path)) > 0 {
			continue // something else took it up: kept
		}
		b, err := m.backendFor(g.Path)
		if err != nil {
			return err
		}
		if err := b.Remove(ctx, g.Path); err != nil {
			return err
		}
	}
	return errs
}

// backingNow is the file an image's header names as its backing,
// resolved and cleaned; "" for none.
func backingNow(path string) (string, error) {
	h, err := readHeader(path)
	if err != nil {
		return "", err
	}
	if h.BackingFile == "" {
		return "", nil
	}
	return filepath.Clean(chain.ResolveBacking(path, h.BackingFile)), nil
}

func cleanOrEmpty(path string) string {
	if path == "" {
		return ""
	}
	return filepath.Clean(path)
}

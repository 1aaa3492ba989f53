package storage

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/xlsnap/xlsnap/chain"
	"github.com/xlsnap/xlsnap/errdefs"
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
	// chain; if a disk writes to top, it writes to base afterwards: the
	// pivot, which the device model makes with the guest paused and
	// pivot's mark durable (see Pivot), so that a crash at any instant
	// leaves what the rules of offline.go can judge. With pivot.Marked,
	// an earlier call's pivot is finished first (found done, its pause
	// is ended).
	Commit(ctx context.Context, top, base string, progress func(float64), pivot Pivot) error
	// Stream copies into image what its backing chain holds above base
	// (base "" for all of it) and makes base its backing.
	Stream(ctx context.Context, image, base, baseFormat string, progress func(float64)) error
}

// Pivot is the journal's part in an active commit's pivot. The device
// model records what it is about to pause (Pausing), pauses the guest,
// waits until the job is in sync and flushes base, then calls Mark, then
// pivots, then resumes the guest: from the mark on, base holds every
// write, so offline recovery never commits the stale top over it
// (offline.go); before it, a guest left paused by a call cut short is
// resumed by recovery, as the record says. The record is the step's
// Pivoting.
type Pivot struct {
	// Marked: an earlier call made the mark, and may have been cut short
	// anywhere between it and the guest's resumption.
	Marked bool
	// Resume: an earlier call may have paused the running guest (QMP
	// stop) for the pivot, so it is resumed (cont) once it is over.
	Resume bool
	// Held: an earlier call may have paused the guest through the back
	// end as well (Xen's vCPUs), to be released once it is over.
	Held bool
	// Pausing records, before the pause, what the pivot may pause: the
	// running guest (stopped) and the back end's vCPUs (held).
	Pausing func(ctx context.Context, stopped, held bool) error
	// Mark makes the mark durable before job-complete; paused says xlsnap
	// paused the guest for the pivot (it was running).
	Mark func(ctx context.Context, paused bool) error
	// Unmark takes the mark back once the job ended without pivoting,
	// before the guest resumes writing top.
	Unmark func(ctx context.Context) error
}

// A live-commit step's Pivoting (metastore.Step) is a phase, "pausing"
// (the guest may be paused; no job-complete was sent) or "marked" (base
// holds every write), with what xlsnap paused: ",stopped" (the running
// guest, by QMP stop) and ",held" (the back end's vCPUs). "" for none.
const (
	pivotPausing = "pausing"
	pivotMarked  = "marked"
)

// pivotState is a Pivoting value read.
type pivotState struct {
	phase         string
	stopped, held bool
}

func parsePivoting(v string) pivotState {
	parts := strings.Split(v, ",")
	ps := pivotState{phase: parts[0]}
	for _, f := range parts[1:] {
		switch f {
		case "stopped":
			ps.stopped = true
		case "held":
			ps.held = true
		}
	}
	return ps
}

func (ps pivotState) String() string {
	v := ps.phase
	if ps.stopped {
		v += ",stopped"
	}
	if ps.held {
		v += ",held"
	}
	return v
}

// pivotIsMarked: the step's pivot may have happened, so base holds every
// write and the stale top must never be committed over it.
func pivotIsMarked(v string) bool { return parsePivoting(v).phase == pivotMarked }

type journalKey struct{}

// journalPos is where a step stands in its intent, for a step that
// records its own progress (the pivot's mark).
type journalPos struct {
	in *intent
	i  int
}

// atStep tells a step's run (redo, forward) where it stands in its
// intent.
func atStep(ctx context.Context, in *intent, i int) context.Context {
	return context.WithValue(ctx, journalKey{}, journalPos{in, i})
}

// pivotOf is the Pivot of a live-commit step: Mark and Unmark write the
// step's Pivoting into its intent, durably (the intent as run holds it,
// so a later write of the intent keeps it).
func (m *Manager) pivotOf(ctx context.Context, st step) (Pivot, error) {
	pos, ok := ctx.Value(journalKey{}).(journalPos)
	if !ok || pos.i >= len(pos.in.Steps) || pos.in.Steps[pos.i].Kind != metastore.StepLiveCommit || pos.in.Steps[pos.i].Path != st.Path {
		return Pivot{}, fmt.Errorf("%w: the live commit of %s runs outside its journal record: no pivot could be marked", errdefs.ErrInternal, st.Path)
	}
	put := func(ctx context.Context, v string) error {
		at := &pos.in.Steps[pos.i]
		old := at.Pivoting
		at.Pivoting = v
		if err := m.store.Update(ctx, func(tx metastore.Tx) error { return tx.PutIntent(pos.in) }); err != nil {
			at.Pivoting = old
			return fmt.Errorf("recording the pivot of %s onto %s in the journal: %w", st.Path, st.Backing, err)
		}
		return nil
	}
	ps := parsePivoting(st.Pivoting)
	stopped, held := ps.stopped, ps.held
	return Pivot{
		Marked: ps.phase == pivotMarked,
		Resume: ps.stopped,
		Held:   ps.held,
		Pausing: func(ctx context.Context, s, h bool) error {
			stopped, held = s, h
			return put(ctx, pivotState{pivotPausing, s, h}.String())
		},
		Mark: func(ctx context.Context, paused bool) error {
			stopped = paused
			return put(ctx, pivotState{pivotMarked, paused, held}.String())
		},
		// The guest may still be paused when the mark goes: what paused
		// it stays recorded until the step is over.
		Unmark: func(ctx context.Context) error {
			return put(ctx, pivotState{pivotPausing, stopped, held}.String())
		},
	}, nil
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
		// A marked step goes to the device model even when done: the
		// guest its pivot paused may be waiting.
		if !fresh && st.Pivoting == "" {
			if used, err := live.Uses(ctx, st.Path); err != nil || !used {
				return err
			}
		}
		pivot, err := m.pivotOf(ctx, st)
		if err != nil {
			return err
		}
		return live.Commit(ctx, st.Path, st.Backing, progressFor(ctx, "commit", st), pivot)
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
		if st.Pivoting != "" {
			// The pivot may be under way, or the guest paused for it:
			// finished (which resumes it), never undone.
			return errLiveDone
		}
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

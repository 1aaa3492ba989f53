package storage

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-multierror"

	"github.com/xlsnap/xlsnap/chain"
	"github.com/xlsnap/xlsnap/internal/crashpoint"
	"github.com/xlsnap/xlsnap/internal/fsutil"
	"github.com/xlsnap/xlsnap/storage/metastore"
)

type (
	intent = metastore.Intent
	step   = metastore.Step
)

var intentSeq atomic.Uint64

func newIntent(domain, op string) *intent {
	id := strconv.FormatInt(time.Now().UnixNano(), 36) + "-" + strconv.FormatUint(intentSeq.Add(1), 36)
	return &intent{ID: id, Domain: domain, Op: op}
}

// run executes an operation under the journal: the intent is durable
// before the first disk change; steps before NoReturn are undone if one
// fails; the metadata and the intent's end are one transaction; cleanup
// (removing images nothing needs) runs only after that.
func (m *Manager) run(ctx context.Context, in *intent, live Live) error {
	crash := func(point string) { crashpoint.Hit(in.Op + "/" + point) }
	crash("begin")
	// A lock lost (its lease expired) stops the operation before its
	// next step, and cancels the step running: another host may now
	// finish or undo it, so this one neither goes on nor undoes.
	lk := m.locks.holding(in.Domain)
	ctx, stop := whileHeld(ctx, lk)
	defer stop()
	in.Owner = m.host
	if lk != nil {
		in.Holder = lk.Holder()
	}
	// An operation that cannot be undone from its first step says so in
	// the intent itself: one journal write fewer.
	in.PassedNoReturn = in.NoReturn == 0 && len(in.Steps) > 0
	if in.Commit != nil && in.Definition == nil && m.defs != nil {
		in.Definition = &metastore.Definition{Name: domainName(in.Commit.Domain), Disks: in.Commit.Domain.Disks}
	}
	if err := m.store.Update(ctx, func(tx metastore.Tx) error { return tx.PutIntent(in) }); err != nil {
		return err
	}
	crash("intent-written")
	for i, st := range in.Steps {
		if err := lockErr(ctx); err != nil {
			return fmt.Errorf("%s %s of domain %s stopped before step %d (%s): %w", in.Op, in.ID, in.Domain, i, st.Kind, err)
		}
		if i == in.NoReturn && !in.PassedNoReturn {
			in.PassedNoReturn = true
			if err := m.store.Update(ctx, func(tx metastore.Tx) error { return tx.PutIntent(in) }); err != nil {
				return m.abandon(ctx, in, i-1, err, live)
			}
		}
		point := fmt.Sprintf("step%d-%s", i, st.Kind)
		crash(point)
		// A backend marks its own points inside the step (see crashpoint.Within).
		if err := m.forward(atStep(crashpoint.WithOp(ctx, in.Op+"/"+point), in, i), st, live); err != nil {
			if lerr := lockErr(ctx); lerr != nil {
				return fmt.Errorf("%s %s of domain %s stopped in step %d (%s), left to the lock's next holder: %w", in.Op, in.ID, in.Domain, i, st.Kind, lerr)
			}
			if i < in.NoReturn {
				return m.abandon(ctx, in, i, err, live)
			}
			return fmt.Errorf("%w (%s %s: %s): %w", ErrPending, in.Op, in.ID, pendingHint(in), err)
		}
	}
	crash("steps-done")
	return m.commit(ctx, in)
}

// whileHeld returns ctx cancelled, with ErrLockLost as its cause, once
// lk is lost; nil lk (storage used without a held lock) changes nothing.
func whileHeld(ctx context.Context, lk metastore.Lock) (context.Context, func()) {
	if lk == nil {
		return ctx, func() {}
	}
	ctx, cancel := context.WithCancelCause(ctx)
	done := make(chan struct{})
	go func() {
		select {
		case <-lk.Lost():
			cancel(metastore.ErrLockLost)
		case <-done:
		}
	}()
	return ctx, func() { close(done); cancel(nil) }
}

// lockErr is ErrLockLost once whileHeld saw the lock lost.
func lockErr(ctx context.Context) error {
	if errors.Is(context.Cause(ctx), metastore.ErrLockLost) {
		return context.Cause(ctx)
	}
	return nil
}

// forward runs a step for the first time; see redoLive.
func (m *Manager) forward(ctx context.Context, st step, live Live) error {
	if isLiveStep(st.Kind) {
		return m.redoLive(ctx, st, live, true)
	}
	return m.redo(ctx, st, live)
}

// abandon undoes steps[0..last] in reverse, drops the intent and returns
// the cause of the failure.
func (m *Manager) abandon(ctx context.Context, in *intent, last int, cause error, live Live) error {
	if err := lockErr(ctx); err != nil {
		return fmt.Errorf("%s %s of domain %s stopped, left to the lock's next holder: %w (%w)", in.Op, in.ID, in.Domain, err, cause)
	}
	if err := m.rollBack(ctx, in, last, live); err != nil {
		hint := "for Repair"
		if in.Live {
			hint = "(" + pendingHint(in) + ")"
		}
		return fmt.Errorf("%w; undoing it failed too, the journal keeps it %s: %w", cause, hint, err)
	}
	return cause
}

// rollBack undoes steps[0..last] in reverse and drops the intent.
func (m *Manager) rollBack(ctx context.Context, in *intent, last int, live Live) error {
	// Undo must run even when ctx was cancelled: that is often the cause.
	uctx := context.WithoutCancel(ctx)
	var undoErr error
	for i := last; i >= 0; i-- {
		if err := m.undo(uctx, in.Steps[i], live); err != nil {
			undoErr = multierror.Append(undoErr, err)
		}
	}
	if undoErr != nil {
		return undoErr
	}
	return m.store.Update(uctx, func(tx metastore.Tx) error { return tx.DeleteIntent(in.ID) })
}

// commit writes the operation's metadata and ends (or shrinks to its
// cleanup) the intent in one transaction, then runs the cleanup.
func (m *Manager) commit(ctx context.Context, in *intent) error {
	var before *Domain
	c := in.Commit
	err := m.store.Update(ctx, func(tx metastore.Tx) error {
		if c != nil {
			var err error
			if before, err = tx.Domain(c.Domain.Name); err != nil && !errors.Is(err, metastore.ErrNotFound) {
				return err
			}
			if err := tx.PutDomain(c.Domain); err != nil {
				return err
			}
			// Disks that name what they named before need no definition
			// step (one journal write fewer); a whole definition (a
			// revert's) always goes.
			if def := in.Definition; def != nil && def.Base == "" && before != nil && slices.Equal(before.Disks, c.Domain.Disks) {
				in.Definition = nil
			}
			for _, name := range c.DeleteSnapshots {
				if err := tx.DeleteSnapshot(c.Domain.Name, name); err != nil && !errors.Is(err, metastore.ErrNotFound) {
					return err
				}
			}
			for _, s := range c.PutSnapshots {
				if err := tx.PutSnapshot(c.Domain.Name, s); err != nil {
					return err
				}
			}
		}
		if len(in.Cleanup) == 0 && in.Definition == nil {
			return tx.DeleteIntent(in.ID)
		}
		in.Committed, in.Steps, in.Commit = true, nil, nil
		return tx.PutIntent(in)
	})
	if err != nil {
		return err
	}
	// The store's copy (of the state just committed) and the cleanup
	// write different files: side by side, the call waits for the
	// slower, not for both (a live merge's last milliseconds).
	backupErr := make(chan error, 1)
	// The commit stands whatever becomes of the caller: its copy is
	// made even if the call is cancelled now.
	go func() { backupErr <- m.backup(context.WithoutCancel(ctx)) }()
	crashpoint.Hit(in.Op + "/committed")
	if before != nil {
		m.publishChanges(before, c.Domain, in.Op, opSnapshot(in.Op, c))
	}
	if !m.mine(in.Domain) {
		// Another host's operation, finished here: its definition step,
		// and the cleanup that must follow it, are for the host that
		// serves the domain (its next call, or its Open, finds the
		// intent committed).
		return <-backupErr
	}
	err = m.cleanup(ctx, in)
	return errors.Join(err, <-backupErr)
}

// cleanup runs a committed intent's definition step, then removes what
// nothing needs any more: no image the old definition named is removed
// before the new one is durable.
func (m *Manager) cleanup(ctx context.Context, in *intent) error {
	if !in.Committed {
		return nil // nothing was left to do: commit ended the intent
	}
	if def := in.Definition; def != nil && m.defs != nil {
		crashpoint.Hit(in.Op + "/definition")
		if err := m.defs.Redefine(ctx, in.Domain, def.Name, def.Base, def.Disks); err != nil {
			return fmt.Errorf("%w (rewriting the definition of %s, %s %s): %w", ErrPending, def.Name, in.Op, in.ID, err)
		}
		crashpoint.Hit(in.Op + "/defined")
	}
	for i, st := range in.Cleanup {
		crashpoint.Hit(fmt.Sprintf("%s/cleanup%d", in.Op, i))
		if err := m.redo(ctx, st, nil); err != nil {
			return fmt.Errorf("%w (cleanup of %s %s): %w", ErrPending, in.Op, in.ID, err)
		}
	}
	return m.store.Update(ctx, func(tx metastore.Tx) error { return tx.DeleteIntent(in.ID) })
}

// Recover finishes or undoes every intent in the journal whose domain no
// other process is working on. Open calls it; Repair calls it again.
func (m *Manager) Recover(ctx context.Context) error {
	intents, err := m.intents(ctx, "")
	if err != nil {
		return err
	}
	var errs error
	for _, in := range intents {
		if in.Live && !in.Committed || in.Guest != nil {
			// Only the driver knows whether a device model still runs
			// the live steps (RecoverLive) or is gone (RecoverOffline),
			// and only it reaches the hypervisor: its next call on the
			// domain finishes them.
			continue
		}
		if !m.mine(in.Domain) && !m.adoptable(in) {
			continue // another source's: its images, its definition
		}
		unlock, err := m.locks.lock(ctx, in.Domain, false)
		if errors.Is(err, ErrBusy) {
			continue // in progress in another process or goroutine
		}
		if err != nil {
			return err
		}
		if m.shared && in.Owner != "" && in.Owner != m.host {
			select {
			case <-time.After(m.adoptAfter):
			case <-ctx.Done():
				unlock()
				return ctx.Err()
			}
			// Read it again under the lock: its host may have moved it
			// on, or ended it, between the listing and its death.
			if in, err = m.intent(ctx, in.Domain, in.ID); in == nil || err != nil {
				unlock()
				if err != nil {
					errs = multierror.Append(errs, err)
				}
				continue
			}
		}
		if err := m.recoverIntent(ctx, in, nil); err != nil {
			errs = multierror.Append(errs, intentErr(in, err))
		}
		unlock()
	}
	return errs
}

// adoptable reports whether this Manager may finish or undo the disk
// and metadata steps of another source's intent: one another host wrote
// on a shared store, not yet committed, every image of whose steps is in
// this Manager's pools. Recover takes its domain's lock first, which it
// gets only once that host's lock (its lease) is gone.
func (m *Manager) adoptable(in *intent) bool {
	if !m.shared || in.Committed || in.Owner == "" || in.Owner == m.host {
		return false
	}
	for _, st := range in.Steps {
		for _, p := range []string{st.Path, st.Source} {
			if _, err := m.poolOf(p); p != "" && err != nil {
				return false
			}
		}
	}
	return true
}

func (m *Manager) recoverIntent(ctx context.Context, in *intent, live Live) error {
	// A running device model may be writing the images of a live intent:
	// only once it is gone are they ours to repair.
	if !in.Committed && (!in.Live || isOffline(live)) {
		if err := m.freeLeaks(ctx, in); err != nil {
			return err
		}
	}
	switch {
	case in.Committed:
		return m.cleanup(ctx, in)
	case in.PassedNoReturn:
		return m.rollForward(ctx, in, live)
	}
	// Steps from NoReturn on never started: run makes PassedNoReturn
	// durable before the first of them, so only the undoable ones ran.
	err := m.rollBack(ctx, in, min(in.NoReturn, len(in.Steps))-1, live)
	if errors.Is(err, errLiveDone) {
		// The device model shows the change happened: finish it.
		return m.rollForward(ctx, in, live)
	}
	return err
}

// freeLeaks frees the clusters a killed qemu-img (or device model) may
// have leaked in the images an interrupted operation's steps write
// (qemu-img check -r leaks touches nothing a table references), so that
// once recovery is done check finds nothing. Any other finding is left
// to check to report.
func (m *Manager) freeLeaks(ctx context.Context, in *intent) error {
	for _, st := range in.Steps {
		targets := [][2]string{{st.Path, st.Format}}
		switch st.Kind {
		case metastore.StepLiveCommit:
			targets = append(targets, [2]string{st.Backing, st.BackingFormat})
		case metastore.StepLiveSnapshot:
			targets = nil
			for _, g := range st.Group {
				targets = append(targets, [2]string{g.Path, g.Format})
				if g.Backing != "" {
					targets = append(targets, [2]string{g.Backing, g.BackingFormat})
				}
			}
		case metastore.StepLiveStream, metastore.StepLiveInternalDelete:
		case metastore.StepCommit:
			if st.Backing != "" { // a commit into a named base (blockjob.go)
				targets = append(targets, [2]string{st.Backing, st.BackingFormat})
				break
			}
			// A commit writes into the image's backing file, as its
			// header names it (recorded formats only: never probed).
			h, err := readHeader(st.Path)
			if err != nil || h.BackingFile == "" || h.BackingFormat == "" {
				continue
			}
			targets = append(targets, [2]string{chain.ResolveBacking(st.Path, h.BackingFile), h.BackingFormat})
		case metastore.StepRebase, metastore.StepRebaseUnsafe, metastore.StepInternalCreate,
			metastore.StepInternalApply, metastore.StepInternalDelete:
		default:
			continue
		}
		for _, t := range targets {
			if err := m.repairLeaks(ctx, t[0], t[1]); err != nil {
				return err
			}
		}
	}
	return nil
}

// repairLeaks frees an image's leaked clusters, if it has any and
// nothing worse; an image outside the pools is not xlsnap's to repair.
func (m *Manager) repairLeaks(ctx context.Context, path, format string) error {
	if path == "" || !exists(path) {
		return nil
	}
	b, err := m.backendFor(path)
	if err != nil {
		return nil
	}
	lr, ok := b.(LeakRepairer)
	if !ok || !errors.Is(b.Check(ctx, path, format), ErrLeaks) {
		return nil
	}
	if err := lr.RepairLeaks(ctx, path, format); err != nil {
		return fmt.Errorf("freeing the clusters a crash leaked in %s: %w", path, err)
	}
	return nil
}

func (m *Manager) rollForward(ctx context.Context, in *intent, live Live) error {
	for i, st := range in.Steps {
		if err := m.redo(atStep(ctx, in, i), st, live); err != nil {
			return err
		}
	}
	return m.commit(ctx, in)
}

// RecoverLive finishes or undoes the pending operations of an active
// domain, reading their outcome from its device model. The driver calls
// it for each active domain once it can reach the hypervisor.
func (m *Manager) RecoverLive(ctx context.Context, domain string, live Live) error {
	return m.eachIntent(ctx, domain, func(in *intent) error {
		if !in.Live {
			return nil
		}
		return m.recoverIntent(ctx, in, live)
	})
}

// eachIntent runs fn on each of domain's intents under the domain's
// lock, going on past a failure; the failures, each naming its intent.
func (m *Manager) eachIntent(ctx context.Context, domain string, fn func(in *intent) error) error {
	unlock, err := m.locks.lock(ctx, domain, true)
	if err != nil {
		return err
	}
	defer unlock()
	intents, err := m.intents(ctx, domain)
	if err != nil {
		return err
	}
	var errs error
	for _, in := range intents {
		if err := fn(in); err != nil {
			errs = multierror.Append(errs, intentErr(in, err))
		}
	}
	return errs
}

// intents lists the journal's intents, of one domain unless domain is "".
func (m *Manager) intents(ctx context.Context, domain string) ([]*intent, error) {
	var out []*intent
	err := m.store.View(ctx, func(tx metastore.Tx) error {
		all, err := tx.Intents()
		for _, in := range all {
			if domain == "" || in.Domain == domain {
				out = append(out, in)
			}
		}
		return err
	})
	return out, err
}

// intent reads one intent of domain again, nil when it is gone.
func (m *Manager) intent(ctx context.Context, domain, id string) (*intent, error) {
	list, err := m.intents(ctx, domain)
	for _, in := range list {
		if in.ID == id {
			return in, err
		}
	}
	return nil, err
}

func intentErr(in *intent, err error) error {
	return fmt.Errorf("intent %s (%s of %s): %w", in.ID, in.Op, in.Domain, err)
}

func (m *Manager) backendFor(path string) (Backend, error) {
	p, err := m.poolOf(path)
	if err != nil {
		return nil, err
	}
	return p.backend, nil
}

func (m *Manager) internal(path string) (InternalSnapshotter, error) {
	b, err := m.backendFor(path)
	if err != nil {
		return nil, err
	}
	is, ok := b.(InternalSnapshotter)
	if !ok {
		return nil, fmt.Errorf("%w: the pool of %s keeps no internal snapshots", ErrUnsupported, path)
	}
	return is, nil
}

// redo runs a step so that running it again is harmless: recovery may
// repeat any step whose outcome it cannot see.
func (m *Manager) redo(ctx context.Context, st step, live Live) error {
	if isLiveStep(st.Kind) {
		return m.redoLive(ctx, st, live, false)
	}
	b, err := m.backendFor(st.Path)
	if err != nil {
		return err
	}
	switch st.Kind {
	case metastore.StepCreateOverlay:
		if isOverlayOf(st.Path, st.Backing) {
			return nil
		}
		return b.CreateOverlay(ctx, st.Path, st.Format, st.Backing, st.BackingFormat)
	case metastore.StepInternalCreate:
		return m.internalStep(st, presentDone, func(is InternalSnapshotter) error {
			return is.InternalCreate(ctx, st.Path, st.Format, st.Name)
		})
	case metastore.StepInternalApply:
		return m.internalStep(st, nil, func(is InternalSnapshotter) error {
			return is.InternalApply(ctx, st.Path, st.Format, st.Name)
		})
	case metastore.StepInternalDelete:
		return m.internalStep(st, absentDone, func(is InternalSnapshotter) error {
			return is.InternalDelete(ctx, st.Path, st.Format, st.Name)
		})
	case metastore.StepInternalCopy:
		is, err := m.internal(st.Source)
		if err != nil {
			return err
		}
		// A copy cut short by a crash is made again from the start.
		if err := b.Remove(ctx, st.Path); err != nil {
			return err
		}
		return is.InternalCopy(ctx, st.Source, st.SourceFormat, st.Name, st.Path, st.Backing, st.BackingFormat)
	case metastore.StepCommit:
		// The image is removed only after the metadata commits (cleanup):
		// gone before that, it was moved or removed by someone else, and
		// its data is not in the image below. Stop; never take it as done.
		if !exists(st.Path) {
			return fmt.Errorf("%w: %s, which this operation commits into its backing image, is gone (moved?)", ErrChainBroken, st.Path)
		}
		if st.Backing != "" {
			return m.commitInto(ctx, b, st)
		}
		return b.Commit(ctx, st.Path, st.Format, progressFor(ctx, "commit", st))
	case metastore.StepRebase:
		return b.Rebase(ctx, st.Path, st.Format, st.Backing, st.BackingFormat, progressFor(ctx, "rebase", st))
	case metastore.StepRebaseUnsafe:
		return b.RebaseUnsafe(ctx, st.Path, st.Format, st.Backing, st.BackingFormat)
	case metastore.StepRemove:
		return m.removeUnused(ctx, b, st.Path)
	case metastore.StepLink:
		return linkOver(st.Path, st.Backing)
	}
	return fmt.Errorf("unknown step %q", st.Kind)
}

// undo reverses a step that ran, ran in part, or never ran.
func (m *Manager) undo(ctx context.Context, st step, live Live) error {
	if isLiveStep(st.Kind) {
		return m.undoLive(ctx, st, live)
	}
	b, err := m.backendFor(st.Path)
	if err != nil {
		return err
	}
	switch st.Kind {
	case metastore.StepCreateOverlay:
		// Only an overlay this step made: never a file that was there.
		if err := removeTemp(st.Path); err != nil {
			return err
		}
		if isOverlayOf(st.Path, st.Backing) || isEmptyFile(st.Path) {
			return b.Remove(ctx, st.Path)
		}
		return nil
	case metastore.StepInternalCreate:
		return m.internalStep(st, absentDone, func(is InternalSnapshotter) error {
			return is.InternalDelete(ctx, st.Path, st.Format, st.Name)
		})
	case metastore.StepInternalCopy:
		// The copy is a new file named at plan time: nothing else is there.
		if err := removeTemp(st.Path); err != nil {
			return err
		}
		return b.Remove(ctx, st.Path)
	case metastore.StepLink:
		// The link is made after the point of no return only.
		return fmt.Errorf("step %q cannot be undone", st.Kind)
	case metastore.StepRebase, metastore.StepRebaseUnsafe:
		// Content is the same over either backing; only the reference
		// goes back.
		return b.RebaseUnsafe(ctx, st.Path, st.Format, st.UndoBacking, st.UndoBackingFormat)
	}
	return fmt.Errorf("step %q cannot be undone", st.Kind)
}

// removeUnused removes an image only when, looked for now, nothing uses
// it: no definition names it or reads through it, no image in the pools
// is backed by it, no record names it. Found users keep it:
// a removal that is skipped loses nothing.
func (m *Manager) removeUnused(ctx context.Context, b Backend, path string) error {
	if !exists(path) {
		return nil
	}
	u, err := m.scanUsers(ctx)
	if err != nil {
		return err
	}
	if len(u.ofName(path)) > 0 {
		return nil // check lists it, with its users
	}
	return b.Remove(ctx, path)
}

// linkOver makes dst a name of src's file, atomically replacing what dst
// named. Running it again once done changes nothing.
func linkOver(src, dst string) error {
	// src is removed only after the metadata commits (cleanup): gone
	// before that, someone moved it; dst does not hold its data.
	ss, err := os.Stat(src)
	if err != nil {
		return fmt.Errorf("%w: %s, which this operation gives the name %s, is gone (moved?): %w", ErrChainBroken, src, dst, err)
	}
	if ds, err := os.Stat(dst); err == nil && os.SameFile(ss, ds) {
		return nil
	}
	tmp := filepath.Join(filepath.Dir(dst), "."+filepath.Base(dst)+".xlsnap-link")
	os.Remove(tmp)
	if err := os.Link(src, tmp); err != nil {
		return err
	}
	if err := os.Rename(tmp, dst); err != nil {
		os.Remove(tmp)
		return err
	}
	return fsutil.SyncDir(filepath.Dir(dst))
}

// removeTemp removes what a crash left of a new image at path's
// temporary name (TempName): never an image anything names.
func removeTemp(path string) error {
	if err := os.Remove(TempName(path)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return nil
}

func exists(path string) bool {
	_, err := os.Lstat(path)
	return !errors.Is(err, fs.ErrNotExist)
}

func isEmptyFile(path string) bool {
	st, err := os.Lstat(path)
	return err == nil && st.Mode().IsRegular() && st.Size() == 0
}

// isOverlayOf reads path's header: is it a qcow2 backed by backing?
func isOverlayOf(path, backing string) bool {
	h, err := readHeader(path)
	if err != nil {
		return false
	}
	return filepath.Clean(chain.ResolveBacking(path, h.BackingFile)) == filepath.Clean(backing)
}

func readHeader(path string) (*chain.Header, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return chain.ParseHeader(f)
}

// hasInternal reports whether an image holds an internal snapshot whose
// name is name.
func hasInternal(path, name string) (bool, error) {
	h, err := readHeader(path)
	if err != nil {
		return false, err
	}
	return holdsSnapshot(h, name), nil
}

func holdsSnapshot(h *chain.Header, name string) bool {
	return slices.ContainsFunc(h.Snapshots, func(s chain.Snapshot) bool { return s.Name == name })
}

// opSnapshot is the snapshot an operation's commit is about: the one a
// create records, a revert makes current, a delete forgets (each delete
// of several snapshots is an operation of its own).
func opSnapshot(op string, c *metastore.Commit) string {
	switch {
	case op == "snapshot" && len(c.PutSnapshots) == 1:
		return c.PutSnapshots[0].Name
	case op == "revert":
		return c.Domain.Current
	case op == "delete" && len(c.DeleteSnapshots) == 1:
		return c.DeleteSnapshots[0]
	}
	return ""
}

func (m *Manager) publishChanges(before, after *Domain, reason, snapshot string) {
	for _, disk := range after.Disks {
		var old []string
		if bd := before.Disk(disk.Target); bd != nil {
			old = before.Chain(bd.Active)
		}
		now := after.Chain(disk.Active)
		if !slices.Equal(old, now) {
			m.events.publish(ChainChanged{Domain: domainName(after), Disk: disk.Target, Before: old, After: now, Reason: reason, Snapshot: snapshot})
		}
	}
}

// pendingHint says what finishes a pending intent.
func pendingHint(in *intent) string {
	if in.Live {
		return "cut short on the running domain; the next call on the domain finishes or undoes it, " +
			"through the device model while the domain runs (RecoverLive), from the images once it is shut off (RecoverOffline); " +
			"a domain whose device model died while the domain still runs must be destroyed first"
	}
	return "finish it with Repair once the cause is fixed"
}

// RecoverDomain finishes or undoes what the journal holds for one domain
// (a live operation needs RecoverLive, or RecoverOffline once the domain
// is shut off, first). Errors:
// ErrPending when an intent cannot be finished yet, ErrBusy.
func (m *Manager) RecoverDomain(ctx context.Context, domain string) error {
	unlock, err := m.lockDomain(ctx, domain)
	if err != nil {
		return err
	}
	unlock()
	return nil
}

// lockDomain takes a domain's lock for an operation, then finishes or
// undoes what the journal still holds for that domain: no operation may
// plan on metadata a pending one will overwrite, nor use images it left
// half written. Holding the lock, no such intent can be in progress.
func (m *Manager) lockDomain(ctx context.Context, domain string) (func(), error) {
	unlock, err := m.locks.lock(ctx, domain, true)
	if err != nil {
		return nil, err
	}
	pending, err := m.intents(ctx, domain)
	for _, in := range pending {
		if err != nil {
			break
		}
		if in.Guest != nil {
			continue // the driver's: it finishes it with the hypervisor
		}
		if in.Live && !in.Committed {
			err = fmt.Errorf("%w: %s %s of domain %s: %s", ErrPending, in.Op, in.ID, domain, pendingHint(in))
		} else if rerr := m.recoverIntent(ctx, in, nil); rerr != nil {
			err = fmt.Errorf("%w (%s %s of domain %s; Repair once the cause is fixed): %w", ErrPending, in.Op, in.ID, domain, rerr)
		}
	}
	if err != nil {
		unlock()
		return nil, err
	}
	return unlock, nil
}

// presentDone and absentDone say when an internal step has nothing to do:
// its snapshot is already there, or already gone.
func presentDone(has bool) bool { return has }
func absentDone(has bool) bool  { return !has }

// internalStep runs op on the image's internal snapshotter unless done
// (when given) finds the image already in the step's end state: recovery
// may repeat any step.
func (m *Manager) internalStep(st step, done func(has bool) bool, op func(InternalSnapshotter) error) error {
	if done != nil {
		has, err := hasInternal(st.Path, st.Name)
		if err != nil || done(has) {
			return err
		}
	}
	is, err := m.internal(st.Path)
	if err != nil {
		return err
	}
	return op(is)
}

package qmp

import (
	"context"
	"errors"
	"fmt"
	"time"

	goqmp "github.com/digitalocean/go-qemu/qmp"

	"github.com/xlsnap/xlsnap/errdefs"
	"github.com/xlsnap/xlsnap/internal/crashpoint"
)

// Pivot completes a job that waits ready (an active commit: QEMU's
// mirror job, block/mirror.c) so that a crash at any instant leaves the
// images in a state its caller can judge from its own record alone:
//
//  1. the guest is paused (QMP stop; one that was not running, paused
//     already or never started, stays so: query-status tells, and stop
//     drains all the same);
//  2. the job is awaited in sync (query-block-jobs: ready, not paused,
//     offset == len): with the guest paused nothing new becomes dirty,
//     and stop's drain woke the job, which brought its progress up to
//     date, so Target then holds what the source does;
//  3. Target's node is flushed, so its data and tables are on disk;
//  4. Mark records, durably, that the pivot may happen;
//  5. job-complete, and BLOCK_JOB_COMPLETED awaited: QEMU pivots the
//     disk onto Target under drain (mirror_exit_common);
//  6. the guest is resumed (cont), if paused here or Resume says so.
//
// From step 4 on, Target holds every write: the guest's writes until the
// pause, and after the pivot the guest writes Target alone. A job that
// ends without pivoting once marked (job-complete refused, the job failed
// or cancelled) has Unmark called before the guest resumes: the guest
// writes the source again, which Target no longer follows. A job not in
// sync within syncLimit of the pause has the guest resumed for syncRetry
// and is tried again; after pivotTries it is cancelled (ErrNotInSync).
// Once Marked, the pause lasts until the job is over: QEMU may hold an
// earlier call's job-complete.
//
// Every error path resumes the guest it paused, but two: a mark that
// cannot be taken back, and a job to which a job-complete may still come
// (a call's own lost answer, or an earlier call's), keep it paused,
// since it would write the source while the journal says Target holds
// every write; recovery resumes it, as the mark says. A connection lost
// leaves Resume set for the caller to finish on a new one (AdoptJob,
// EndPivot).
//
// QMP stop stops the vCPUs QEMU runs. A Xen device model runs none: Xen
// schedules them, and a PV disk served by QEMU (qdisk) may take the
// guest's requests again once stop's drain is over. There Hold pauses
// the domain through the back end as well.
type Pivot struct {
	// Target is the node the job writes: block-commit's base.
	Target string
	// Marked says the mark is durable already: an earlier call made it
	// and was cut short, and its job-complete may be under way, so the
	// job's completion by another client is that pivot, not an error.
	Marked bool
	// Resume says the guest is to be resumed once the pivot is over:
	// an earlier call paused it for this pivot (its mark says so), or
	// this one did (set here, cleared once resumed).
	Resume bool
	// Mark makes the pivot's mark durable; paused says whether it was
	// xlsnap that paused the guest for it (Resume), so that recovery
	// knows to resume it. An error stops the pivot.
	Mark func(ctx context.Context, paused bool) error
	// Unmark takes the mark back: the job ended without pivoting.
	Unmark func(ctx context.Context) error
	// Pausing, when not nil, records durably what the pivot is about to
	// pause (stopped: the running guest, by QMP stop; held: the back
	// end's vCPUs), before it does: a call cut short between the pause
	// and the mark leaves recovery what to resume. An error stops the
	// pivot before anything is paused.
	Pausing func(ctx context.Context, stopped, held bool) error
	// Hold pauses the guest's vCPUs where QMP stop cannot: a Xen device
	// model runs none, so the back end pauses the domain
	// (libxl_domain_pause), and reports whether it paused a running
	// guest. Release lets a guest paused so run again. nil for a device
	// model whose stop stops the vCPUs.
	Hold    func(ctx context.Context) (bool, error)
	Release func(ctx context.Context) error
	// Held: the guest was paused through Hold, by this call or (as its
	// record says) an earlier one; Release ends it.
	Held bool
}

// The bounds of the guest's pause: the job must be in sync within
// syncLimit, else the guest runs on for syncRetry and the pivot is tried
// again, pivotTries times in all. With the guest paused, the job has only
// what was dirty at the pause left to copy: milliseconds.
var (
	// earlierTries bounds the wait for an earlier call's marked job to
	// get in sync (a job paused by another client never does).
	earlierTries = 30
	syncLimit    = time.Second
	syncRetry    = time.Second
	pivotTries   = 3
)

// syncPoll is the first wait between two reads of the job's progress;
// it doubles up to syncPollMax. QEMU sends no event when a ready job
// catches up, so its progress is read.
const (
	syncPoll    = 500 * time.Microsecond
	syncPollMax = 16 * time.Millisecond
)

// ErrNotInSync: the job did not catch up with the guest paused, pivotTries
// times; it was cancelled, and the source stays the active layer. It
// wraps errdefs.ErrOperationFailed.
var ErrNotInSync = fmt.Errorf("%w: the block job did not get in sync with the guest paused", errdefs.ErrOperationFailed)

// pivot runs Pivot's steps on the ready job id, reading the job's events
// from events, and returns the job's outcome (nil: pivoted). Its commands
// outlive ctx (a reply lost mid-way would close the connection): ctx
// only ends the wait for a job an earlier call marked, which leaves the
// guest paused for recovery.
func (m *Monitor) pivot(ctx context.Context, id string, p *Pivot, events <-chan goqmp.Event) error {
	caller := ctx
	ctx = context.WithoutCancel(ctx)
	// earlier: a mark from an earlier call, whose job-complete may be
	// pending in QEMU (which then pivots once the job is in sync).
	earlier := p.Marked
	for try := 1; ; try++ {
		if err := caller.Err(); err != nil && earlier {
			return errors.Join(err, m.unpause(ctx, p, nil, false))
		}
		var st struct {
			Running bool `json:"running"`
		}
		if err := m.Execute(ctx, "query-status", nil, &st); err != nil {
			return m.unpause(ctx, p, err, false)
		}
		if p.Pausing != nil && !earlier {
			if err := p.Pausing(ctx, st.Running || p.Resume, p.Hold != nil || p.Held); err != nil {
				return m.unpause(ctx, p, err, false)
			}
		}
		// stop drains every node and flushes it whatever the guest's
		// state (qmp_stop, do_vm_stop): a guest that does not run stays
		// as it is, and the drain wakes the job, which brings its
		// progress up to date (a ready job that sleeps shows the writes
		// since only once it runs again).
		err := m.Execute(ctx, "stop", nil, nil)
		var refused *Error
		if st.Running && !errors.As(err, &refused) {
			// Stopped, or its answer lost: it may have been.
			p.Resume = true
		}
		if err != nil {
			return m.unpause(ctx, p, err, false)
		}
		if p.Hold != nil && !p.Held {
			held, err := p.Hold(ctx)
			p.Held = held
			if err != nil {
				return m.unpause(ctx, p, err, false)
			}
		}
		crashpoint.Within(ctx, "pivot-paused")
		synced, ended, err := m.awaitSync(ctx, id, events)
		switch {
		case ended && err == nil && earlier:
			// The earlier call's job-complete, carried out.
			return m.resume(ctx, p)
		case ended && err == nil:
			// Another client's job-complete: the disk writes Target
			// now, so Target holds every write: marked before the
			// guest writes on, or offline recovery would commit the
			// stale source over it.
			if err := p.Mark(ctx, p.Resume); err != nil {
				return errors.Join(fmt.Errorf("%w: job %s completed by another client, and its mark failed: %w", ErrJobFailed, id, err), m.resume(ctx, p))
			}
			p.Marked = true
			return m.resume(ctx, p)
		case err != nil:
			return m.unpause(ctx, p, err, ended)
		case synced:
		case earlier && try < earlierTries:
			// The guest must not write the source while a pivot may
			// come: no retry with the guest running.
			continue
		case earlier:
			return fmt.Errorf("%w: the job %s marked by an earlier call did not get in sync in %v; the guest stays paused until the operation is recovered", ErrNotInSync, id, time.Duration(earlierTries)*syncLimit)
		case try == pivotTries:
			return errors.Join(m.resume(ctx, p), m.giveUp(ctx, id, events))
		default:
			if err := m.resume(ctx, p); err != nil {
				return err
			}
			if err := m.awaitEnd(ctx, id, events, syncRetry); err != nil {
				return err
			}
			continue
		}
		break
	}
	if err := m.FlushNode(ctx, p.Target); err != nil {
		return m.unpause(ctx, p, err, false)
	}
	if err := p.Mark(ctx, p.Resume); err != nil {
		// A write that failed may still have landed (a store that lost
		// its answer): taken back as well as can be; not made, as far
		// as is known, so the guest is resumed whatever becomes of that.
		if !earlier {
			_ = p.Unmark(ctx)
		}
		return m.unpause(ctx, p, err, false)
	}
	p.Marked = true
	crashpoint.Within(ctx, "pivot-marked")
	if err := m.Execute(ctx, "job-complete", map[string]any{"id": id}, nil); err != nil {
		var refused *Error
		if errors.As(err, &refused) {
			// This call's job-complete, refused, is the mark's only one.
			return m.unpause(ctx, p, err, !earlier)
		}
		// Carried out or not, nobody can tell from here: the mark
		// stays, and so does the pause (Resume) for a new connection.
		return err
	}
	if err := m.awaitEnd(ctx, id, events, 0); err != nil {
		// Over without pivoting (failed, cancelled), or the connection
		// lost (not over).
		return m.unpause(ctx, p, err, !errors.Is(err, ErrClosed))
	}
	crashpoint.Within(ctx, "pivot-done")
	return m.resume(ctx, p)
}

// unpause ends a pivot that did not happen, returning cause with what
// else failed. over says no pivot can come any more (the job ended, or
// no job-complete for the mark reached QEMU): then the mark, if made, is
// taken back, and the guest resumed if the pivot paused it. Else, or if
// the mark cannot be taken back, the guest stays paused: resumed, it
// would write the source while the journal says Target holds every
// write (or while QEMU may still pivot). Recovery resumes it, as the mark
// says, once it finishes the pivot. A lost connection leaves Resume set
// for the caller to settle on a new one.
func (m *Monitor) unpause(ctx context.Context, p *Pivot, cause error, over bool) error {
	if m.Closed() {
		return cause
	}
	if p.Marked {
		if !over {
			return errors.Join(cause, fmt.Errorf("%w: the device model may still pivot: the guest stays paused until the operation is recovered", errdefs.ErrOperationFailed))
		}
		if err := p.Unmark(ctx); err != nil {
			return errors.Join(cause, fmt.Errorf("%w: taking back the pivot's mark failed; the guest stays paused until the operation is recovered: %w", errdefs.ErrOperationFailed, err))
		}
		p.Marked = false
	}
	return errors.Join(cause, m.resume(ctx, p))
}

// resume lets a guest the pivot paused run again (cont).
func (m *Monitor) resume(ctx context.Context, p *Pivot) error {
	if p.Resume {
		if err := m.Execute(ctx, "cont", nil, nil); err != nil {
			return fmt.Errorf("resuming the guest after a pivot: %w", err)
		}
		p.Resume = false
	}
	// The back end's pause too: this call's, or an earlier call's.
	if p.Held && p.Release != nil {
		if err := p.Release(ctx); err != nil {
			return fmt.Errorf("resuming the guest after a pivot: %w", err)
		}
		p.Held = false
	}
	return nil
}

// awaitSync reads the job's progress until it is ready with nothing
// left to copy (synced), or syncLimit passes (neither). A job that ends
// meanwhile ends the wait (ended), with its outcome as the error.
func (m *Monitor) awaitSync(ctx context.Context, id string, events <-chan goqmp.Event) (synced, ended bool, err error) {
	limit := time.NewTimer(syncLimit)
	defer limit.Stop()
	wait := syncPoll
	poll := time.NewTimer(0)
	defer poll.Stop()
	for {
		select {
		case ev, ok := <-events:
			if !ok {
				return false, false, m.closeErr()
			}
			if ended, err := jobEnd(ev, id); ended {
				return false, true, err
			}
			continue
		case <-limit.C:
			return false, false, nil
		case <-poll.C:
		}
		var jobs []struct {
			Device string `json:"device"`
			Len    int64  `json:"len"`
			Offset int64  `json:"offset"`
			Ready  bool   `json:"ready"`
			// Paused by a client (block-job-pause): its progress is
			// not brought up to date (mirror_run does that as it runs).
			Paused bool `json:"paused"`
		}
		if err := m.Execute(ctx, "query-block-jobs", nil, &jobs); err != nil {
			return false, false, err
		}
		for _, j := range jobs {
			if j.Device == id && j.Ready && !j.Paused && j.Offset == j.Len {
				return true, false, nil
			}
		}
		poll.Reset(wait)
		wait = min(2*wait, syncPollMax)
	}
}

// awaitEnd waits for the job's end and returns its outcome; with a
// positive limit, a job still running once it passes is no error.
func (m *Monitor) awaitEnd(ctx context.Context, id string, events <-chan goqmp.Event, limit time.Duration) error {
	var expired <-chan time.Time
	if limit > 0 {
		t := time.NewTimer(limit)
		defer t.Stop()
		expired = t.C
	}
	for {
		select {
		case ev, ok := <-events:
			if !ok {
				return m.closeErr()
			}
			if ended, err := jobEnd(ev, id); ended {
				if err == nil && limit > 0 {
					// Completed by someone else while the guest ran:
					// not a pivot this one can vouch for.
					return fmt.Errorf("%w: job %s completed by another client", ErrJobFailed, id)
				}
				return err
			}
		case <-expired:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// giveUp cancels a job that never got in sync and waits for QEMU to end
// it: the source stays the active layer.
func (m *Monitor) giveUp(ctx context.Context, id string, events <-chan goqmp.Event) error {
	cause := fmt.Errorf("%w: job %s, %d times %v", ErrNotInSync, id, pivotTries, syncLimit)
	if err := m.Execute(ctx, "job-cancel", map[string]any{"id": id}, nil); err != nil {
		return errors.Join(cause, err)
	}
	err := m.awaitEnd(ctx, id, events, 0)
	if errors.Is(err, ErrJobCancelled) {
		err = nil
	}
	return errors.Join(cause, err)
}

// jobEnd reports whether ev ends job id, and its outcome.
func jobEnd(ev goqmp.Event, id string) (bool, error) {
	if dev, _ := ev.Data["device"].(string); dev != id {
		return false, nil
	}
	switch ev.Event {
	case "BLOCK_JOB_COMPLETED":
		if msg, ok := ev.Data["error"].(string); ok {
			return true, fmt.Errorf("%w %s: %s", ErrJobFailed, id, msg)
		}
		return true, nil
	case "BLOCK_JOB_CANCELLED":
		return true, fmt.Errorf("%w: %s", ErrJobCancelled, id)
	}
	return false, nil
}

// FlushNode makes what QEMU holds of a block node durable on disk, its
// data and its tables (QEMU keeps qcow2 metadata cached until a flush):
// HMP's qemu-io flush on the node, for QMP has no flush command short of
// pausing the guest (stop flushes every node). qemu-io reports its
// failure as output, which comes back wrapping errdefs.ErrHypervisor.
func (m *Monitor) FlushNode(ctx context.Context, node string) error {
	var out string
	if err := m.Execute(ctx, "human-monitor-command", map[string]any{"command-line": "qemu-io " + node + " flush"}, &out); err != nil {
		return err
	}
	if out != "" {
		return fmt.Errorf("%w: flushing node %s: %s", errdefs.ErrHypervisor, node, out)
	}
	return nil
}

// EndPivot ends, on this connection, a pivot whose job is over (AdoptJob
// found none), pivoted or not as the chain shows: not pivoted, the mark
// (if made) is taken back first; then the guest is resumed if p.Resume.
func (m *Monitor) EndPivot(ctx context.Context, p *Pivot, pivoted bool) error {
	if pivoted {
		return m.resume(ctx, p)
	}
	return m.unpause(ctx, p, nil, true)
}

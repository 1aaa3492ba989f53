package driver

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"slices"

	"github.com/xlsnap/xlsnap/storage"
)

// Hypervisor steps (pause, save, destroy, restore, resume) are journaled
// like disk steps: GuestBegin before the first, GuestEnd after the last.
// A crash in between leaves a record that recoverGuest, on the domain's
// next use, finishes from what the hypervisor shows.

// ErrGuestStopped reports a domain an interrupted operation stopped and
// recovery could not restore (a revert that never reached its disks):
// it stays shut off, its snapshots intact.
var ErrGuestStopped = fmt.Errorf("%w: an interrupted operation stopped the domain", ErrOperationInvalid)

// recoverGuest finishes the journaled hypervisor steps of a domain: it
// resumes a domain an operation paused, restores one it stopped where
// the memory and disks to restore are there, and removes a memory image
// the operation wrote that no snapshot holds. It returns the domain's
// state afterwards; a domain it had to leave stopped is reported once,
// as ErrGuestStopped.
func (d *Driver) recoverGuest(ctx context.Context, key, name string, state DomainState) (DomainState, error) {
	recs, err := d.st.GuestPending(ctx, key)
	if err != nil || len(recs) == 0 {
		return state, err
	}
	var report error
	for _, r := range recs {
		g := r.Guest
		switch {
		case state == StatePaused && g.Pauses && g.WasRunning:
			if err := d.h.Resume(ctx, name); err != nil {
				return state, fmt.Errorf("resuming %s, which %s paused: %w", name, r.Op, err)
			}
			state = StateRunning
		case state == StateShutoff && g.Stops && g.Restore:
			mem, err := d.restoreImage(ctx, key, g)
			if err != nil {
				return state, err
			}
			if mem == "" {
				report = fmt.Errorf("%w: %s (%s of %s) was stopped before its disks were done; start it, or revert again", ErrGuestStopped, name, r.Op, g.Snapshot)
				break
			}
			sd, err := d.src.Domain(ctx, name)
			if err != nil {
				return state, err
			}
			if err := d.h.Restore(ctx, name, mem, sd.XML, g.RestorePaused); err != nil {
				return state, fmt.Errorf("restoring %s, which %s stopped, from %s: %w", name, r.Op, mem, err)
			}
			state = StateRunning
			if g.RestorePaused {
				state = StatePaused
			}
		}
		if err := d.dropMemory(ctx, g); err != nil {
			return state, err
		}
		if err := d.st.GuestEnd(ctx, r.ID); err != nil {
			return state, err
		}
	}
	return state, report
}

// restoreImage is the memory image a stopped domain comes back from: a
// revert's snapshot's, once the revert is done (the snapshot is current);
// a save's own, whether or not its snapshot committed (the disks hold
// what the memory saw either way). "" when there is none to restore.
func (d *Driver) restoreImage(ctx context.Context, key string, g storage.Guest) (string, error) {
	if !g.Restore {
		return "", nil
	}
	if g.Memory != "" {
		if _, err := os.Stat(g.Memory); err != nil {
			return "", nil
		}
		return g.Memory, nil
	}
	rec, err := d.st.Domain(ctx, key)
	if err != nil || rec.Current != g.Snapshot || slices.Equal(activeImages(rec), g.Before) {
		return "", nil // the revert was undone: the disks are as they were
	}
	snap, err := d.st.Snapshot(ctx, key, g.Snapshot)
	if err != nil || snap.Memory == "" {
		return "", nil
	}
	return snap.Memory, nil
}

// activeImages lists a record's disks' active images, in order.
func activeImages(rec *storage.Domain) []string {
	var out []string
	for _, disk := range rec.Disks {
		out = append(out, disk.Active)
	}
	return out
}

// dropMemory removes the memory image an operation wrote when no
// snapshot holds it and it was not there before.
func (d *Driver) dropMemory(ctx context.Context, g storage.Guest) error {
	if g.Memory == "" || g.MemoryExisted {
		return nil
	}
	held, err := d.st.MemoryHeld(ctx, g.Memory)
	if err != nil || held {
		return err
	}
	if err := os.Remove(g.Memory); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return nil
}

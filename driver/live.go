package driver

import (
	"context"
	"errors"
	"fmt"
	"os"

	"libvirt.org/go/libvirtxml"

	"github.com/xlsnap/xlsnap/errdefs"
	"github.com/xlsnap/xlsnap/internal/crashpoint"
	"github.com/xlsnap/xlsnap/storage"
	"github.com/xlsnap/xlsnap/xenlight"
)

// createActive snapshots a running or paused domain. Disk-only (DISK_ONLY,
// or <memory snapshot='no'/>, which libvirt refuses without DISK_ONLY):
// one QMP transaction over every disk, the guest running throughout.
// With memory: pause, checkpoint-save the memory, snapshot the disks,
// resume; where the back end has no checkpoint save, the save stops the
// domain, the disks are snapshotted offline, and the domain is restored
// from the memory image onto the new overlays. With LIVE the memory is
// copied while the guest runs (xenlight.LiveSaver: libxl's live suspend,
// iterative pre-copy as in migration), the guest is stopped only for the
// last pages, and the disks are snapshotted in that stopped window, so
// memory and disks are of one instant; a back end that cannot is
// errdefs.ErrLiveUnsupported before anything changes, never a non-live
// or an inconsistent snapshot. Memory a back end cannot save (a bare
// device model holds no Xen guest memory), or memory internal to the
// images (QEMU's savevm, which holds no Xen guest's memory either), is
// errdefs.ErrLiveUnsupported before anything changes.
func (d *Driver) createActive(ctx context.Context, v *domainView, doc *libvirtxml.DomainSnapshot, flags CreateFlags, spec storage.SnapshotSpec) (*storage.Snapshot, error) {
	live, err := d.live(v, "a snapshot")
	if err != nil {
		return nil, err
	}
	name := v.src.Name
	wasRunning := v.src.State == StateRunning
	if !memoryState(doc) {
		spec.State, spec.Live = "disk-snapshot", live
		snap, err := d.st.CreateSnapshot(ctx, v.key, spec)
		if err != nil {
			return nil, err
		}
		if flags&CreateHalt == 0 {
			if err := d.afterChange(ctx, v); err != nil {
				return nil, err
			}
			return snap, d.verifyLive(ctx, v, live)
		}
		return snap, d.finishCreate(ctx, v, flags)
	}
	if doc.Memory.Snapshot == "internal" {
		return nil, fmt.Errorf("%w: memory internal to the disk images of %s: xlsnap saves a guest's memory to a file (<memory snapshot='external' file='...'/>)",
			errdefs.ErrLiveUnsupported, name)
	}
	if rl, ok := d.h.(xenlight.RestoreLimiter); ok && !rl.CanRestore() {
		return nil, fmt.Errorf("%w: the hypervisor back end of %s can neither save nor restore its memory: a snapshot of its disks alone needs DISK_ONLY",
			errdefs.ErrLiveUnsupported, name)
	}
	var liveSaver xenlight.LiveSaver
	if flags&CreateLive != 0 {
		ls, ok := d.h.(xenlight.LiveSaver)
		if !ok {
			return nil, fmt.Errorf("%w: the hypervisor back end of %s cannot save memory live and snapshot the disks at the same instant: take the snapshot without LIVE (the guest is paused while its memory is saved)",
				errdefs.ErrLiveUnsupported, name)
		}
		liveSaver = ls
	}
	spec.Memory, spec.State = doc.Memory.File, string(v.src.State)
	// A chain at its pool's depth limit is coalesced now, the guest
	// running, not while it is paused for the memory.
	room := spec
	room.Live = live
	if _, err := d.st.MakeRoom(ctx, v.key, room); err != nil {
		return nil, err
	}
	pause := wasRunning && flags&CreateLive == 0
	// The hypervisor steps are journaled before the first: a crash after
	// it is put back by recoverGuest (resume, restore from the memory
	// saved, the memory image removed if no snapshot holds it).
	_, statErr := os.Lstat(doc.Memory.File)
	// A live save stops the guest too, for its last round and the
	// disks: recovery lets it go on (Pauses).
	g := storage.Guest{WasRunning: wasRunning, Pauses: pause || liveSaver != nil, Stops: flags&CreateLive == 0,
		Memory: doc.Memory.File, MemoryExisted: statErr == nil, Snapshot: spec.Name,
		Restore: flags&CreateHalt == 0, RestorePaused: !wasRunning}
	gid, err := d.st.GuestBegin(ctx, v.key, "snapshot", g)
	if err != nil {
		return nil, err
	}
	uctx := context.WithoutCancel(ctx)
	// fail puts the domain back as it was (resumed, or restored from the
	// memory just saved), drops a memory image no snapshot holds, and ends
	// the record; what it cannot do stays for recoverGuest.
	fail := func(cause error, restore bool) (*storage.Snapshot, error) {
		if errors.Is(cause, xenlight.ErrLiveUnsupported) {
			cause = fmt.Errorf("%w: %w", errdefs.ErrLiveUnsupported, cause)
		}
		var put error
		if restore {
			put = d.restore(uctx, v, doc.Memory.File, !wasRunning)
		} else if pause {
			put = d.h.Resume(uctx, name)
		}
		if put != nil {
			return nil, errors.Join(cause, put)
		}
		return nil, errors.Join(cause, d.dropMemory(uctx, g), d.st.GuestEnd(uctx, gid))
	}
	if liveSaver != nil {
		return d.createLiveMemory(ctx, v, flags, spec, live, liveSaver, doc.Memory.File, gid, fail)
	}
	if pause {
		if err := d.h.Pause(ctx, name); err != nil {
			return fail(err, false)
		}
	}
	crashpoint.Hit("guest-snapshot/paused")
	err = d.h.SaveMemory(ctx, name, doc.Memory.File, true)
	switch {
	case err == nil:
		crashpoint.Hit("guest-snapshot/saved")
		spec.Live = live
		snap, err := d.st.CreateSnapshot(ctx, v.key, spec)
		if err != nil {
			return fail(err, false)
		}
		crashpoint.Hit("guest-snapshot/disks-done")
		if pause {
			if err := d.h.Resume(uctx, name); err != nil {
				return nil, err // recoverGuest resumes it
			}
		}
		if err := d.st.GuestEnd(uctx, gid); err != nil {
			return nil, err
		}
		return snap, d.finishCreate(ctx, v, flags)
	case !errors.Is(err, xenlight.ErrLiveUnsupported) || flags&CreateLive != 0:
		return fail(err, false)
	}
	// No checkpoint: save (the domain stops), snapshot offline, restore
	// onto the new overlays.
	if err := d.h.SaveMemory(ctx, name, doc.Memory.File, false); err != nil {
		return fail(err, false)
	}
	crashpoint.Hit("guest-snapshot/stopped")
	snap, err := d.st.CreateSnapshot(ctx, v.key, spec)
	if err != nil {
		return fail(err, true)
	}
	crashpoint.Hit("guest-snapshot/disks-done")
	if err := d.afterChange(ctx, v); err != nil {
		return nil, err
	}
	if flags&CreateHalt == 0 {
		if err := d.restore(ctx, v, doc.Memory.File, !wasRunning); err != nil {
			return nil, err // recoverGuest restores it
		}
	}
	return snap, d.st.GuestEnd(uctx, gid)
}

// createLiveMemory is createActive's LIVE path: the memory saved while
// the guest runs, the disks snapshotted while the live save holds it
// stopped, then the guest let go on. On a failure of the disks the guest
// goes on as it was and the memory image goes (fail); fail itself
// resumes nothing here, since the live save paused nothing.
func (d *Driver) createLiveMemory(ctx context.Context, v *domainView, flags CreateFlags, spec storage.SnapshotSpec, live storage.Live,
	ls xenlight.LiveSaver, memory, gid string, fail func(error, bool) (*storage.Snapshot, error)) (*storage.Snapshot, error) {
	uctx := context.WithoutCancel(ctx)
	resume, err := ls.SaveMemoryLive(ctx, v.src.Name, memory)
	if err != nil {
		return fail(err, false)
	}
	crashpoint.Hit("guest-snapshot/saved-live")
	spec.Live = live
	snap, err := d.st.CreateSnapshot(ctx, v.key, spec)
	if err != nil {
		if rerr := resume(uctx); rerr != nil {
			return nil, errors.Join(err, rerr) // recoverGuest lets it go on
		}
		return fail(err, false)
	}
	crashpoint.Hit("guest-snapshot/disks-done")
	if err := resume(uctx); err != nil {
		return nil, err // recoverGuest lets it go on
	}
	if err := d.st.GuestEnd(uctx, gid); err != nil {
		return nil, err
	}
	if flags&CreateHalt == 0 {
		if err := d.afterChange(ctx, v); err != nil {
			return nil, err
		}
		return snap, d.verifyLive(ctx, v, xenlight.NewLive(d.h, v.src.Name))
	}
	return snap, d.finishCreate(ctx, v, flags)
}

// finishCreate rewrites the definition and honours HALT.
func (d *Driver) finishCreate(ctx context.Context, v *domainView, flags CreateFlags) error {
	if err := d.afterChange(ctx, v); err != nil {
		return err
	}
	if flags&CreateHalt != 0 {
		return d.h.Destroy(ctx, v.src.Name)
	}
	return nil
}

// restore starts the domain from a memory image with its current
// definition, whose disks storage has already repointed.
func (d *Driver) restore(ctx context.Context, v *domainView, memory string, paused bool) error {
	if err := d.h.Restore(ctx, v.src.Name, memory, v.src.XML, paused); err != nil {
		return fmt.Errorf("restoring %s from %s: %w", v.src.Name, memory, err)
	}
	return nil
}

package driver

import (
	"context"
	"errors"
	"fmt"
	"os"
	"slices"

	"github.com/xlsnap/xlsnap/internal/crashpoint"
	"github.com/xlsnap/xlsnap/storage"
	"github.com/xlsnap/xlsnap/xenlight"
)

// RevertToSnapshot is virDomainRevertToSnapshot. The disks go back to the
// snapshot (a new overlay on each external state image, internal
// snapshots applied or copied) and the definition becomes the one of the
// snapshot's time, its disks pointed at the new active layers. A running
// domain is destroyed first, which needs FORCE when the snapshot holds no
// memory to come back to. A snapshot with memory is then restored from its
// memory image onto the reverted disks, running unless it was taken
// paused or PAUSED is given; RUNNING and PAUSED without memory would need
// a fresh boot, which xlsnap leaves to the toolstack.
//
// RESET_NVRAM is accepted, as by libvirt 9.0's QEMU driver, and changes
// nothing: xlsnap keeps no NVRAM image for a Xen domain.
//
// Errors: ErrInvalidArg (VIR_ERR_INVALID_ARG, 8) for RUNNING with
// PAUSED (libvirt's virDomainRevertToSnapshot) and for flags the QEMU
// driver does not take; ErrNoDomain (42); ErrRevertRisky
// (VIR_ERR_SNAPSHOT_REVERT_RISKY, 77) without FORCE for a snapshot that
// records no domain definition (one redefined from a document without
// <domain>), as libvirt's QEMU driver refuses it; ErrOperationInvalid
// (55) with FORCE when such a snapshot records no memory and no disk
// either, as the revert would change nothing; ErrNoSnapshot
// (VIR_ERR_NO_DOMAIN_SNAPSHOT, 72); ErrRevertRisky (77) for an active
// domain without FORCE when the snapshot holds no memory (the revert
// stops it); ErrLiveUnsupported
// (VIR_ERR_OPERATION_UNSUPPORTED, 84) for RUNNING or PAUSED without
// memory and for memory the back end cannot restore; ErrChainBroken
// (VIR_ERR_OPERATION_FAILED, 9) for a missing memory or state image and
// for a snapshot marked Damaged; and those of every call that changes
// something (see the package documentation).
func (d *Driver) RevertToSnapshot(ctx context.Context, domain, name string, flags RevertFlags) error {
	if err := exclusive(flags, RevertRunning, RevertPaused); err != nil {
		return err
	}
	if err := checkFlags("RevertToSnapshot", flags, revertKnown); err != nil {
		return err
	}
	ctx, unlock, err := d.lockCall(ctx, domain)
	if err != nil {
		return err
	}
	defer unlock()
	v, err := d.sync(ctx, domain)
	if err != nil {
		return err
	}
	snap, err := d.st.Snapshot(ctx, v.key, name)
	if err != nil {
		return err
	}
	// libvirt's QEMU driver (qemuSnapshotRevert): without the definition
	// of the snapshot's time there is nothing to roll the domain back to
	// but its disks; only FORCE takes that.
	if snap.DomainXML == "" && flags&RevertForce == 0 {
		return fmt.Errorf("%w: snapshot '%s' lacks domain '%s' rollback info", ErrRevertRisky, name, domain)
	}
	if snap.DomainXML == "" && snap.Memory == "" && !slices.ContainsFunc(snap.Disks, func(sd storage.SnapshotDisk) bool { return sd.Mode != storage.DiskNone }) {
		return fmt.Errorf("%w: snapshot %s records no definition, memory or disk: a revert would change nothing", ErrOperationInvalid, name)
	}
	// The definition of the snapshot's time comes back, disks added or
	// removed since included: storage writes it as the revert's
	// definition step, its disks pointed at the reverted images.
	opts := storage.RevertOptions{Definition: snap.DomainXML}
	if snap.DomainXML != "" {
		def, err := parseDomain(snap.DomainXML)
		if err != nil {
			return fmt.Errorf("the definition in snapshot %s: %w", name, err)
		}
		opts.Disks = []storage.DiskSpec{}
		for _, di := range fileDisks(def) {
			opts.Disks = append(opts.Disks, storage.DiskSpec{Target: di.Target, Path: di.Path, Format: di.Format})
		}
	}
	if snap.Memory == "" && flags&(RevertRunning|RevertPaused) != 0 {
		return fmt.Errorf("%w: %s holds no memory; starting %s afresh is the toolstack's job", ErrLiveUnsupported, name, domain)
	}
	if snap.Memory != "" && d.h == nil {
		return fmt.Errorf("%w: restoring the memory of %s needs a hypervisor back end", ErrLiveUnsupported, name)
	}
	if rl, ok := d.h.(xenlight.RestoreLimiter); ok && snap.Memory != "" && !rl.CanRestore() {
		return fmt.Errorf("%w: the hypervisor back end cannot restore the memory of %s", ErrLiveUnsupported, name)
	}
	if snap.Memory != "" {
		if _, err := os.Stat(snap.Memory); err != nil {
			return fmt.Errorf("%w: the memory image of %s: %w", ErrChainBroken, name, err)
		}
	}
	active := v.src.State.Active()
	if active {
		// REVERT_RISKY, not OPERATION_INVALID: virsh's snapshot-revert
		// --force retries with FORCE only after that code.
		if snap.Memory == "" && flags&RevertForce == 0 {
			return fmt.Errorf("%w: %s is %s and snapshot %s holds no memory: reverting would stop it (use FORCE)",
				ErrRevertRisky, domain, v.src.State, name)
		}
		if d.h == nil {
			return fmt.Errorf("%w: stopping %s domain %s for a revert needs a hypervisor back end", ErrLiveUnsupported, v.src.State, domain)
		}
	}
	paused := flags&RevertPaused != 0 || snap.State == string(StatePaused) && flags&RevertRunning == 0
	// A guest restored from memory runs again before the layers the revert
	// frees are merged (through its device model): merges would lengthen
	// its downtime. Only what the revert frees is merged, as storage's own
	// revert does.
	var before []string
	if snap.Memory != "" {
		var live storage.Live
		if active {
			if live, err = d.live(v, "a revert"); err != nil {
				return err
			}
		}
		if before, err = d.mergeableLayers(ctx, v, live); err != nil {
			return err
		}
		opts.LeaveFreed = true
	}
	// Stopping the domain and restoring it are journaled before the first:
	// after a crash, recoverGuest restores it once the revert is done, or
	// reports it stopped when the revert was undone.
	var gid string
	if active || snap.Memory != "" {
		if gid, err = d.st.GuestBegin(ctx, v.key, "revert", storage.Guest{WasRunning: v.src.State == StateRunning,
			Stops: true, Snapshot: name, Restore: snap.Memory != "", RestorePaused: paused, Before: activeImages(v.rec)}); err != nil {
			return err
		}
	}
	if active {
		if err := d.h.Destroy(ctx, domain); err != nil {
			return errors.Join(err, d.st.GuestEnd(context.WithoutCancel(ctx), gid))
		}
		crashpoint.Hit("guest-revert/destroyed")
		v.src.State = StateShutoff
	}
	if _, err := d.st.Revert(ctx, v.key, name, opts); err != nil {
		return err // a domain stopped above: recoverGuest reports it
	}
	crashpoint.Hit("guest-revert/disks-done")
	if err := d.afterChange(ctx, v); err != nil {
		return err
	}
	if snap.Memory != "" {
		if err := d.restore(ctx, v, snap.Memory, paused); err != nil {
			return err // recoverGuest restores it
		}
	}
	if gid != "" {
		if err := d.st.GuestEnd(context.WithoutCancel(ctx), gid); err != nil {
			return err
		}
	}
	if opts.LeaveFreed {
		return d.coalesceFreed(ctx, v, before, true)
	}
	return nil
}

// SnapshotDelete is virDomainSnapshotDelete. Unlike libvirt's own
// drivers it deletes non-leaf external snapshots (merging images in the
// cheaper direction; live block jobs for images a running domain reads)
// and external snapshots with CHILDREN, and keeps an image that still
// backs others. It returns what happened to each disk.
//
// With an error, the report (when not nil) says what was done before it:
// each snapshot's delete is one operation, so with CHILDREN some may be
// gone.
//
// Errors: ErrInvalidArg (VIR_ERR_INVALID_ARG, 8) for CHILDREN with
// CHILDREN_ONLY (libvirt's virDomainSnapshotDelete) and for flags libvirt
// does not define, both before anything changes; ErrNoDomain (42);
// ErrNoSnapshot (VIR_ERR_NO_DOMAIN_SNAPSHOT, 72); ErrChainBroken
// (VIR_ERR_OPERATION_FAILED, 9) for an image a merge needs that is
// missing; and those of every call that changes something (see the
// package documentation).
func (d *Driver) SnapshotDelete(ctx context.Context, domain, name string, flags DeleteFlags) (*DeleteReport, error) {
	if err := exclusive(flags, DeleteChildren, DeleteChildrenOnly); err != nil {
		return nil, err
	}
	if err := checkFlags("SnapshotDelete", flags, deleteKnown); err != nil {
		return nil, err
	}
	ctx, unlock, err := d.lockCall(ctx, domain)
	if err != nil {
		return nil, err
	}
	defer unlock()
	v, err := d.sync(ctx, domain)
	if err != nil {
		return nil, err
	}
	opts := storage.DeleteOptions{
		Children:     flags&DeleteChildren != 0,
		ChildrenOnly: flags&DeleteChildrenOnly != 0,
		MetadataOnly: flags&DeleteMetadataOnly != 0,
	}
	var live *xenlight.Live
	if v.src.State.Active() {
		// Merges of images the device model reads run as its block jobs,
		// on one QMP connection with the queries that plan them.
		if live, err = d.live(v, "a delete"); err != nil {
			return nil, err
		}
		defer live.Hold()()
		opts.Live = live
	}
	report, err := d.st.DeleteSnapshot(ctx, v.key, name, opts)
	if err != nil {
		return deleteReportOf(report), err
	}
	if err := d.afterChange(ctx, v); err != nil {
		return deleteReportOf(report), err
	}
	if live != nil {
		return deleteReportOf(report), d.verifyLive(ctx, v, live)
	}
	return deleteReportOf(report), nil
}

package driver

import (
	"context"
	"errors"
	"fmt"

	"libvirt.org/go/libvirtxml"

	"github.com/xlsnap/xlsnap/storage"
	"github.com/xlsnap/xlsnap/xenlight"
)

// createActive snapshots a running or paused domain. Disk-only: one QMP
// transaction over every disk, the guest running throughout. With memory:
// pause, checkpoint-save the memory, snapshot the disks, resume; where the
// back end has no checkpoint save, the save stops the domain, the disks
// are snapshotted offline, and the domain is restored from the memory
// image onto the new overlays. With LIVE the pause is skipped.
func (d *Driver) createActive(ctx context.Context, v *domainView, doc *libvirtxml.DomainSnapshot, flags CreateFlags, spec storage.SnapshotSpec) (*Snapshot, error) {
	live, err := d.live(v, "a snapshot")
	if err != nil {
		return nil, err
	}
	name := v.src.Name
	wasRunning := v.src.State == StateRunning
	if doc.Memory == nil || doc.Memory.Snapshot == "" || doc.Memory.Snapshot == "no" {
		spec.State, spec.Live = "disk-snapshot", live
		snap, err := d.st.CreateSnapshot(ctx, v.key, spec)
		if err != nil {
			return nil, err
		}
		return snap, d.finishCreate(ctx, v, flags)
	}
	if doc.Memory.File == "" {
		return nil, invalidf("a memory snapshot needs a file (memspec file=PATH)")
	}
	spec.Memory, spec.State = doc.Memory.File, string(v.src.State)
	pause := wasRunning && flags&CreateLive == 0
	if pause {
		if err := d.h.Pause(ctx, name); err != nil {
			return nil, err
		}
	}
	resume := func() error {
		if pause {
			return d.h.Resume(context.WithoutCancel(ctx), name)
		}
		return nil
	}
	err = d.h.SaveMemory(ctx, name, doc.Memory.File, true)
	switch {
	case err == nil:
		spec.Live = live
		snap, err := d.st.CreateSnapshot(ctx, v.key, spec)
		if err != nil {
			return nil, errors.Join(err, resume())
		}
		if err := resume(); err != nil {
			return nil, err
		}
		return snap, d.finishCreate(ctx, v, flags)
	case !errors.Is(err, xenlight.ErrLiveUnsupported) || flags&CreateLive != 0:
		return nil, errors.Join(err, resume())
	}
	// No checkpoint: save (the domain stops), snapshot offline, restore
	// onto the new overlays.
	if err := d.h.SaveMemory(ctx, name, doc.Memory.File, false); err != nil {
		return nil, errors.Join(err, resume())
	}
	snap, err := d.st.CreateSnapshot(ctx, v.key, spec)
	if err != nil {
		return nil, errors.Join(err, d.restore(context.WithoutCancel(ctx), v, doc.Memory.File, !wasRunning))
	}
	if err := d.afterChange(ctx, v); err != nil {
		return nil, err
	}
	if flags&CreateHalt != 0 {
		return snap, nil
	}
	return snap, d.restore(ctx, v, doc.Memory.File, !wasRunning)
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

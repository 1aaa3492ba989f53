package driver

import (
	"context"
	"fmt"

	"github.com/xlsnap/xlsnap/storage"
)

// RevertToSnapshot is virDomainRevertToSnapshot for a shut-off domain: the
// disks go back to the snapshot (a new overlay on each external state
// image, internal snapshots applied) and the definition becomes the one
// of the snapshot's time, its disks pointed at the new active layers.
// RUNNING and PAUSED start the domain afterwards, which needs a
// hypervisor back end.
func (d *Driver) RevertToSnapshot(ctx context.Context, domain, name string, flags RevertFlags) error {
	if flags&RevertRunning != 0 && flags&RevertPaused != 0 {
		return invalidf("RUNNING and PAUSED together")
	}
	v, err := d.sync(ctx, domain)
	if err != nil {
		return err
	}
	if err := inactive(v, "a revert"); err != nil {
		return err
	}
	snap, err := d.st.Snapshot(ctx, domain, name)
	if err != nil {
		return err
	}
	if flags&(RevertRunning|RevertPaused) != 0 || snap.Memory != "" {
		return fmt.Errorf("%w: reverting %s to a running or paused domain needs a hypervisor back end (xenlight)", ErrLiveUnsupported, name)
	}
	if _, err := d.st.Revert(ctx, domain, name); err != nil {
		return err
	}
	if snap.DomainXML != "" {
		// The definition of the snapshot's time; writeDisks repoints it.
		if err := d.src.Redefine(ctx, domain, snap.DomainXML); err != nil {
			return err
		}
		def, err := parseDomain(snap.DomainXML)
		if err != nil {
			return err
		}
		v.src.XML, v.disks = snap.DomainXML, fileDisks(def)
	}
	return d.afterChange(ctx, v)
}

// SnapshotDelete is virDomainSnapshotDelete. Unlike libvirt's own
// drivers it deletes non-leaf external snapshots (merging images in the
// cheaper direction) and external snapshots with CHILDREN, and keeps an
// image that still backs others. It returns what happened to each disk.
func (d *Driver) SnapshotDelete(ctx context.Context, domain, name string, flags DeleteFlags) (*storage.DeleteReport, error) {
	v, err := d.sync(ctx, domain)
	if err != nil {
		return nil, err
	}
	if err := inactive(v, "a delete"); err != nil {
		return nil, err
	}
	report, err := d.st.DeleteSnapshot(ctx, domain, name, storage.DeleteOptions{
		Children:     flags&DeleteChildren != 0,
		ChildrenOnly: flags&DeleteChildrenOnly != 0,
		MetadataOnly: flags&DeleteMetadataOnly != 0,
	})
	if err != nil {
		return report, err
	}
	return report, d.afterChange(ctx, v)
}

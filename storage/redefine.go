package storage

import (
	"context"
	"fmt"
	"slices"

	"github.com/xlsnap/xlsnap/storage/metastore"
)

// RedefineSnapshot records a snapshot without touching any disk (libvirt's
// REDEFINE): its images must already be in the domain's tree. An external
// disk names its overlay; the state image is the overlay's backing. An
// internal disk's image is the layer of its chain that holds an internal
// snapshot of that name. A snapshot already recorded whose disks the new
// record names alike (modes, overlays) keeps its recorded images, checked
// against nothing else. An external disk may not name an overlay or a
// state image another snapshot's record names (ErrInvalidArg). With current, it becomes the current snapshot.
func (m *Manager) RedefineSnapshot(ctx context.Context, domain string, snap *Snapshot, current bool) error {
	if err := ValidName("snapshot", snap.Name); err != nil {
		return err
	}
	unlock, err := m.lockDomain(ctx, domain)
	if err != nil {
		return err
	}
	defer unlock()
	d, snaps, err := m.load(ctx, domain)
	if err != nil {
		return err
	}
	for p := snap.Parent; p != ""; p = snaps[p].Parent {
		if p == snap.Name {
			return fmt.Errorf("%w: parent %s would make a loop", ErrInvalidArg, snap.Parent)
		}
		if snaps[p] == nil {
			return fmt.Errorf("%w: parent %s of %s", ErrNoSnapshot, p, snap.Name)
		}
	}
	if old := snaps[snap.Name]; old != nil && sameDisks(old.Disks, snap.Disks) {
		// libvirt's REDEFINE of an existing snapshot checks the document
		// against the snapshot's own record, not against the disks as
		// they are now (virDomainSnapshotRedefineValidate): the images
		// it recorded stay its images whatever chain the disk has moved
		// to since (a revert elsewhere discards the overlay it was taken
		// on; a revert to an internal snapshot copies it out). So does
		// snapshot-current NAME, which redefines the XML dumpxml gave.
		snap.Disks = slices.Clone(old.Disks)
		// Damage is of those images, which the document cannot vouch for.
		snap.Damaged = old.Damaged
		return m.putRedefined(ctx, d, domain, snap, current)
	}
	for i := range snap.Disks {
		sd := &snap.Disks[i]
		disk := d.Disk(sd.Target)
		if disk == nil {
			return fmt.Errorf("%w: domain %s has no disk %q", ErrInvalidArg, domainName(d), sd.Target)
		}
		switch sd.Mode {
		case DiskNone:
		case DiskExternal:
			img, ok := d.Images[sd.Overlay]
			if !ok || img.Backing == "" {
				return fmt.Errorf("%w: disk %s: overlay %q is no known image with a backing file", ErrInvalidArg, sd.Target, sd.Overlay)
			}
			sd.Image, sd.Format = img.Backing, img.BackingFormat
		case DiskInternal:
			sd.Image = ""
			for _, p := range d.Chain(disk.Active) {
				if has, err := hasInternal(p, snap.Name); err == nil && has {
					sd.Image, sd.Format = p, d.Images[p].Format
					break
				}
			}
			if sd.Image == "" {
				return fmt.Errorf("%w: disk %s: no image of its chain holds an internal snapshot %q", ErrInvalidArg, sd.Target, snap.Name)
			}
		default:
			return fmt.Errorf("%w: disk %s: snapshot mode %q", ErrInvalidArg, sd.Target, sd.Mode)
		}
	}
	if err := checkUnclaimed(snaps, snap); err != nil {
		return err
	}
	return m.putRedefined(ctx, d, domain, snap, current)
}

// checkUnclaimed refuses a redefined record whose external disk names an
// overlay or a state image another snapshot's record already names: a
// state image holds one snapshot's point in time, and a later delete of
// either snapshot would merge the other's data away. libvirt has no such
// check because it never merges images.
func checkUnclaimed(snaps map[string]*Snapshot, snap *Snapshot) error {
	c := externalClaims(snaps, snap.Name)
	for _, sd := range snap.Disks {
		if sd.Mode != DiskExternal {
			continue
		}
		if other, ok := c.overlay[sd.Overlay]; ok {
			return fmt.Errorf("%w: disk %s: overlay %s is snapshot %s's", ErrInvalidArg, sd.Target, sd.Overlay, other)
		}
		if other, ok := c.state[sd.Image]; ok {
			return fmt.Errorf("%w: disk %s: state image %s is snapshot %s's", ErrInvalidArg, sd.Target, sd.Image, other)
		}
	}
	return nil
}

// claims are the images external snapshot records name, each mapped to
// the snapshot naming it: as its state image, or as the overlay it was
// taken on. Internal records are left out: any number of internal
// snapshots share one image, and a merge keeps them.
type claims struct {
	state, overlay map[string]string
}

// externalClaims collects the claims of every snapshot but skip.
func externalClaims(snaps map[string]*Snapshot, skip string) claims {
	c := claims{state: map[string]string{}, overlay: map[string]string{}}
	names := make([]string, 0, len(snaps))
	for n := range snaps {
		names = append(names, n)
	}
	slices.Sort(names) // the same snapshot named whatever the map order
	for _, n := range names {
		if n == skip {
			continue
		}
		for _, sd := range snaps[n].Disks {
			if sd.Mode != DiskExternal {
				continue
			}
			if _, ok := c.state[sd.Image]; !ok && sd.Image != "" {
				c.state[sd.Image] = n
			}
			if _, ok := c.overlay[sd.Overlay]; !ok && sd.Overlay != "" {
				c.overlay[sd.Overlay] = n
			}
		}
	}
	return c
}

// sameDisks says two snapshot records name the same disks in the same
// modes with the same overlays: what a snapshot's XML says of its disks
// (the images under them are storage's, not the document's).
func sameDisks(a, b []SnapshotDisk) bool {
	if len(a) != len(b) {
		return false
	}
	byTarget := map[string]SnapshotDisk{}
	for _, sd := range a {
		byTarget[sd.Target] = sd
	}
	for _, sd := range b {
		o, ok := byTarget[sd.Target]
		if !ok || o.Mode != sd.Mode || o.Mode == DiskExternal && o.Overlay != sd.Overlay {
			return false
		}
	}
	return true
}

// putRedefined records a redefined snapshot (and, with current, makes it
// the domain's current one) in one transaction.
func (m *Manager) putRedefined(ctx context.Context, d *Domain, domain string, snap *Snapshot, current bool) error {
	if snap.State == "" {
		snap.State = "shutoff"
	}
	err := m.store.Update(ctx, func(tx metastore.Tx) error {
		if current {
			d.Current = snap.Name
			if err := tx.PutDomain(d); err != nil {
				return err
			}
		}
		return tx.PutSnapshot(domain, snap)
	})
	if err != nil {
		return err
	}
	return m.backup(ctx) // a restore loses at most the last change
}

package storage

import (
	"context"
	"fmt"
	"sort"

	"github.com/xlsnap/xlsnap/storage/metastore"
)

// Revert brings an inactive domain's disks back to a snapshot: external
// disks get a new overlay on the snapshot's state image, internal ones
// have the internal snapshot applied. The abandoned active layers are
// removed after the new metadata is durable, and only if no snapshot
// needs them. It returns the domain with its new active layers.
func (m *Manager) Revert(ctx context.Context, domain, name string) (*Domain, error) {
	unlock, err := m.lockDomain(ctx, domain)
	if err != nil {
		return nil, err
	}
	defer unlock()
	d, snaps, err := m.load(ctx, domain)
	if err != nil {
		return nil, err
	}
	s, ok := snaps[name]
	if !ok {
		return nil, fmt.Errorf("%w: %s of domain %s", ErrNoSnapshot, name, domain)
	}
	next := d.Clone()
	in := newIntent(domain, "revert")
	var applies []step
	for _, sd := range s.Disks {
		if sd.Mode == DiskNone {
			continue
		}
		disk := next.Disk(sd.Target)
		if disk == nil {
			return nil, fmt.Errorf("%w: snapshot %s has disk %s, the domain no longer does", ErrOperationInvalid, name, sd.Target)
		}
		switch sd.Mode {
		case DiskExternal:
			overlay := m.freeOverlayPath(next, sd.Image, name)
			in.Steps = append(in.Steps, step{Kind: metastore.StepCreateOverlay, Path: overlay, Format: "qcow2",
				Backing: sd.Image, BackingFormat: sd.Format, Disk: sd.Target})
			next.Images[overlay] = &Image{Format: "qcow2", Backing: sd.Image, BackingFormat: sd.Format, Owned: true}
			disk.Active, disk.Format = overlay, "qcow2"
		case DiskInternal:
			if err := m.checkInternalName(sd.Image, sd.Format, name, true); err != nil {
				return nil, fmt.Errorf("disk %s: %w", sd.Target, err)
			}
			// Applying writes the image: fine for the active layer, or for an
			// image nothing backs onto and no external snapshot keeps as
			// its state (it then becomes the active layer again). An image
			// others read must not change: the snapshot's content is copied
			// into a new image on the same backing instead.
			if disk.Active == sd.Image || len(next.Children(sd.Image)) == 0 && !isExternalState(snaps, sd.Image) {
				applies = append(applies, step{Kind: metastore.StepInternalApply, Path: sd.Image, Format: sd.Format, Name: name, Disk: sd.Target})
				disk.Active, disk.Format = sd.Image, sd.Format
				continue
			}
			img := next.Images[sd.Image]
			if img == nil {
				return nil, fmt.Errorf("%w: disk %s: image %s of internal snapshot %s is not in the tree", ErrChainBroken, sd.Target, sd.Image, name)
			}
			copyPath := m.freeOverlayPath(next, sd.Image, name)
			in.Steps = append(in.Steps, step{Kind: metastore.StepInternalCopy, Path: copyPath, Format: "qcow2",
				Source: sd.Image, SourceFormat: sd.Format, Name: name,
				Backing: img.Backing, BackingFormat: img.BackingFormat, Disk: sd.Target})
			next.Images[copyPath] = &Image{Format: "qcow2", Backing: img.Backing, BackingFormat: img.BackingFormat, Owned: true}
			disk.Active, disk.Format = copyPath, "qcow2"
		}
	}
	// New overlays first (undoable), then the applies, which overwrite the
	// active state and so cannot be undone.
	in.NoReturn = len(in.Steps)
	in.Steps = append(in.Steps, applies...)
	next.Current = name
	in.Cleanup = m.collect(next, snaps)
	in.Commit = &metastore.Commit{Domain: next}
	if err := m.run(ctx, in, nil); err != nil {
		return nil, err
	}
	return next, nil
}

func isExternalState(snaps map[string]*Snapshot, image string) bool {
	for _, s := range snaps {
		for _, sd := range s.Disks {
			if sd.Mode == DiskExternal && sd.Image == image {
				return true
			}
		}
	}
	return false
}

// load reads a domain and all its snapshots by name.
func (m *Manager) load(ctx context.Context, domain string) (*Domain, map[string]*Snapshot, error) {
	var d *Domain
	snaps := map[string]*Snapshot{}
	err := m.store.View(ctx, func(tx metastore.Tx) error {
		var err error
		if d, err = m.domain(tx, domain); err != nil {
			return err
		}
		list, err := tx.Snapshots(domain)
		for _, s := range list {
			snaps[s.Name] = s
		}
		return err
	})
	return d, snaps, err
}

// freeOverlayPath names a new overlay on image for a revert to snapshot:
// libvirt's default name if free, else the same with a counter.
func (m *Manager) freeOverlayPath(d *Domain, image, snapshot string) string {
	base := DefaultOverlayPath(image, snapshot)
	p := base
	for i := 1; ; i++ {
		if _, known := d.Images[p]; !known && !exists(p) {
			return p
		}
		p = fmt.Sprintf("%s-%d", base, i)
	}
}

// collect drops from d's image tree every image that neither a disk nor
// a snapshot needs (directly or as a backing image), and returns the
// steps that remove those xlsnap created. An image holding internal
// snapshots xlsnap does not know of is kept, recorded or not.
func (m *Manager) collect(d *Domain, snaps map[string]*Snapshot) []step {
	needed := map[string]bool{}
	mark := func(top string) {
		for _, p := range d.Chain(top) {
			needed[p] = true
		}
	}
	for _, disk := range d.Disks {
		mark(disk.Active)
	}
	for _, s := range snaps {
		for _, sd := range s.Disks {
			if sd.Image != "" {
				mark(sd.Image)
			}
		}
	}
	var drop []string
	for p := range d.Images {
		if !needed[p] {
			drop = append(drop, p)
		}
	}
	sort.Strings(drop)
	var steps []step
	for _, p := range drop {
		img := d.Images[p]
		if h, err := readHeader(p); err == nil && len(h.Snapshots) > 0 {
			continue
		}
		delete(d.Images, p)
		if img.Owned {
			steps = append(steps, step{Kind: metastore.StepRemove, Path: p})
		}
	}
	return steps
}

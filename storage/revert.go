package storage

import (
	"context"
	"fmt"
	"path/filepath"
	"slices"
	"sort"
	"strings"

	"github.com/xlsnap/xlsnap/chain"

	"github.com/xlsnap/xlsnap/storage/metastore"
)

// RevertOptions say what a revert's definition will be.
type RevertOptions struct {
	// Definition is the domain definition of the snapshot's time (libvirt
	// restores it on a revert); "" keeps the current one.
	Definition string
	// Disks are that definition's disks. A disk the snapshot took no part
	// in keeps its current image, or, if the domain no longer has it, the
	// image the old definition named. A disk of the domain that is not
	// listed leaves the definition; its images are the user's and stay.
	// Nil means the domain's current disks.
	Disks []DiskSpec
	// LeaveFreed leaves the layers the revert frees unmerged, for a
	// caller that must first start the domain again (the driver restoring
	// a guest's memory: merges would lengthen the guest's downtime); it
	// coalesces them afterwards, live (CoalesceOptions.Except).
	LeaveFreed bool
}

// Revert brings an inactive domain's disks back to a snapshot: external
// disks get a new overlay on the snapshot's state image, internal ones
// have the internal snapshot applied (or copied into a new image when
// anything else reads the image). The definition is rewritten to
// opts.Definition with the new active layers once the metadata is
// durable; only then are abandoned layers removed, and only those xlsnap
// made and nothing uses. Layers those removals freed (a base left with
// one child) are then coalesced, as a delete does (see DeleteSnapshot).
// It returns the domain with its new active layers. Errors:
// ErrNoSnapshot, ErrChainBroken (an image the revert needs is gone; all
// of them are listed), ErrPending.
func (m *Manager) Revert(ctx context.Context, domain, name string, opts RevertOptions) (*Domain, error) {
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
		return nil, fmt.Errorf("%w: %s of domain %s", ErrNoSnapshot, name, domainName(d))
	}
	if s.Damaged != "" {
		return nil, fmt.Errorf("%w: snapshot %s: %s", ErrChainBroken, name, s.Damaged)
	}
	var missing []string
	for _, sd := range s.Disks {
		if sd.Mode != DiskNone && !exists(sd.Image) {
			missing = append(missing, sd.Image)
		}
	}
	if len(missing) > 0 {
		return nil, fmt.Errorf("%w: snapshot %s needs images that are gone: %s (moved? rescan the disk with the moves)",
			ErrChainBroken, name, strings.Join(missing, ", "))
	}
	u, err := m.scanUsers(ctx)
	if err != nil {
		return nil, err
	}
	before, err := m.mergeableSet(ctx, d, snaps, u, nil)
	if err != nil {
		return nil, err
	}
	next := d.Clone()
	if opts.Disks != nil {
		if next.Disks, err = m.revertedDisks(ctx, next, s, opts.Disks); err != nil {
			return nil, err
		}
	}
	in := newIntent(domain, "revert")
	var applies []step
	var defined []DefinedDisk // read when an image is to be written or read anew
	for _, sd := range s.Disks {
		if sd.Mode == DiskNone {
			continue
		}
		disk := next.Disk(sd.Target)
		if disk == nil {
			if opts.Disks != nil {
				continue // not in the snapshot's definition
			}
			next.Disks = append(next.Disks, Disk{Target: sd.Target})
			disk = &next.Disks[len(next.Disks)-1]
		}
		switch sd.Mode {
		case DiskExternal:
			// The state image becomes a backing file again: no other
			// domain may write it as its disk meanwhile.
			if err := m.checkSoleWriter(ctx, &defined, d, sd.Image); err != nil {
				return nil, fmt.Errorf("disk %s: %w", sd.Target, err)
			}
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
			// image nothing else reads (no overlay, no external snapshot's
			// state, no other domain); it then becomes the active layer
			// again. Otherwise the snapshot's content is copied into a new
			// image on the same backing.
			writable := len(u.children(sd.Image, next.Images)) == 0 && !isExternalState(snaps, sd.Image) &&
				len(u.foreign(sd.Image, domain, d.Images)) == 0
			if disk.Active == sd.Image && len(u.foreign(sd.Image, domain, d.Images)) == 0 || writable {
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
	// A disk that leaves the definition keeps its data in its active image,
	// which is the user's from now on.
	for _, old := range d.Disks {
		if next.Disk(old.Target) == nil {
			if img := next.Images[old.Active]; img != nil {
				img.Detached = true
			}
		}
	}
	// New overlays first (undoable), then the applies, which overwrite the
	// active state and so cannot be undone.
	in.NoReturn = len(in.Steps)
	in.Steps = append(in.Steps, applies...)
	next.Current = name
	if in.Cleanup, err = m.collect(next, snaps, u, d.Images, nil); err != nil {
		return nil, err
	}
	in.Commit = &metastore.Commit{Domain: next}
	in.Definition = &metastore.Definition{Name: domainName(next), Base: opts.Definition, Disks: next.Disks}
	if err := m.run(ctx, in, nil); err != nil {
		return nil, err
	}
	// The abandoned layers may have been what kept a layer below from
	// merging (a second child, say): coalesce what the revert freed.
	if opts.LeaveFreed {
		return next, nil
	}
	if merges, err := m.coalesceLocked(ctx, domain, nil, before); err != nil {
		return nil, fmt.Errorf("reverted to %s; merging the layers it freed: %w", name, err)
	} else if len(merges) > 0 {
		return m.Domain(ctx, domain)
	}
	return next, nil
}

// revertedDisks is the disk list of the snapshot's definition: each disk
// the snapshot holds starts from its current record (the steps repoint
// it), a disk the snapshot took no part in keeps its current image, and
// one the domain no longer has comes back on the image the definition
// names, its chain recorded.
func (m *Manager) revertedDisks(ctx context.Context, d *Domain, s *Snapshot, specs []DiskSpec) ([]Disk, error) {
	var out []Disk
	for _, ds := range specs {
		if cur := d.Disk(ds.Target); cur != nil {
			out = append(out, *cur)
			continue
		}
		if sd := s.Disk(ds.Target); sd != nil && sd.Mode != DiskNone {
			out = append(out, Disk{Target: ds.Target})
			continue
		}
		abs, err := filepath.Abs(ds.Path)
		if err != nil {
			return nil, err
		}
		if _, err := m.poolOf(abs); err != nil {
			return nil, fmt.Errorf("disk %s: %w", ds.Target, err)
		}
		var defined []DefinedDisk
		if err := m.checkSoleWriter(ctx, &defined, d, abs); err != nil {
			return nil, fmt.Errorf("disk %s comes back on %s: %w", ds.Target, abs, err)
		}
		c, err := chain.Walk(ctx, abs, chain.Format(ds.Format), m.policy())
		if err != nil {
			return nil, fmt.Errorf("disk %s: %w", ds.Target, err)
		}
		m.recordChain(d, c)
		out = append(out, Disk{Target: ds.Target, Active: abs, Format: c.Top().Format.String()})
	}
	return out, nil
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
// steps that remove those xlsnap created and nothing else uses (u, with
// tree the domain's tree before the operation). An image holding
// internal snapshots, or whose header cannot be read, is kept with what
// it reads through, recorded or not, except for the internal snapshot
// the operation itself deletes (deleting: image to snapshot name), which
// goes before the cleanup runs. An image whose only users are images
// this cleanup removes goes too, after them: the removal itself looks
// for users again.
func (m *Manager) collect(d *Domain, snaps map[string]*Snapshot, u *users, tree map[string]*Image, deleting map[string]string) ([]step, error) {
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
	for p, img := range d.Images {
		if !exists(p) {
			continue
		}
		if img.Detached {
			mark(p)
			continue
		}
		if needed[p] {
			continue
		}
		h, err := readHeader(p)
		if err != nil && img.Format == "qcow2" || err == nil && keptInternal(h, deleting[p]) {
			mark(p)
		}
	}
	var drop []string
	depth := map[string]int{}
	for p := range d.Images {
		if !needed[p] {
			drop = append(drop, p)
			depth[p] = len(d.Chain(p))
		}
	}
	// Overlays before their backing images: a removal looks for users
	// again, and an overlay still there is one.
	sort.Slice(drop, func(i, j int) bool {
		if depth[drop[i]] != depth[drop[j]] {
			return depth[drop[i]] > depth[drop[j]]
		}
		return drop[i] < drop[j]
	})
	gone := map[string]bool{}
	var steps []step
	for _, p := range drop {
		img := d.Images[p]
		delete(d.Images, p)
		if !img.Removable() || !exists(p) {
			continue
		}
		// Its own domain's definition and snapshots are rewritten by this
		// operation; anything else keeps it, and so does an overlay this
		// cleanup does not remove.
		if len(u.foreign(p, d.Name, tree)) > 0 || slices.ContainsFunc(u.children(p, tree), func(c string) bool { return !gone[c] }) {
			continue
		}
		gone[p] = true
		steps = append(steps, step{Kind: metastore.StepRemove, Path: p})
	}
	return steps, nil
}

// keptInternal reports whether an image holds an internal snapshot
// besides gone (the one its operation deletes; "" for none): a second
// of the same name stays, as qemu-img snapshot -d removes one.
func keptInternal(h *chain.Header, gone string) bool {
	skip := gone != ""
	for _, s := range h.Snapshots {
		if !skip || s.Name != gone {
			return true
		}
		skip = false // only the first goes
	}
	return false
}

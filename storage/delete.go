package storage

import (
	"context"
	"fmt"
	"slices"
	"sort"
	"strings"

	"github.com/xlsnap/xlsnap/errdefs"
	"github.com/xlsnap/xlsnap/storage/metastore"
)

// DeleteOptions are libvirt's snapshot delete flags.
type DeleteOptions struct {
	Children     bool // the snapshot and all its descendants
	ChildrenOnly bool // its descendants, not the snapshot
	MetadataOnly bool // forget the records, leave every image as it is
	// Live merges the images a running domain uses through its device
	// model (block jobs); images it does not use are merged offline.
	Live Live
}

// DiskAction says what a delete did to one disk of one snapshot.
type DiskAction string

const (
	ActionMergedDown      DiskAction = "merged-down"       // child committed into the state image
	ActionPulledUp        DiskAction = "pulled-up"         // state image pulled into its child
	ActionInternalDeleted DiskAction = "internal-deleted"  // qcow2 internal snapshot removed
	ActionSharedBase      DiskAction = "kept-shared-base"  // state image backs several images: kept
	ActionInternalAbove   DiskAction = "kept-for-internal" // the child holds internal snapshots: a merge would change what they see
	ActionUserImage       DiskAction = "kept-user-image"   // a merge would remove an image xlsnap did not create
	ActionUnreferenced    DiskAction = "unreferenced"      // state image had no child: left to the collector
	ActionMetadataOnly    DiskAction = "metadata-only"
)

// DiskReport is one disk's outcome.
type DiskReport struct {
	Snapshot string
	Disk     string
	Action   DiskAction
	// Kept is the image that holds the merged data; Removed the one
	// whose data moved into it.
	Kept    string
	Removed string
	// Users are what kept a shared base: its users besides this domain.
	Users []User `json:",omitempty"`
}

// DeleteReport lists what a delete did, disk by disk, the images it
// removed because nothing needed them any more, and the layers it freed
// and coalesced.
type DeleteReport struct {
	Deleted   []string
	Disks     []DiskReport
	Collected []string
	Coalesced []Merge `json:",omitempty"`
}

// DeleteSnapshot removes a snapshot (and, with the options, its
// descendants, leaves first). Each snapshot's delete is one journaled
// operation: a crash leaves every snapshot either deleted or intact.
// Then, unless MetadataOnly, the layers the deletes freed (idle ones
// that could not be merged before: the state image of a snapshot now
// gone whose child held an internal snapshot now gone, say) are
// coalesced, each merge one more journaled operation (see Coalesce); a
// layer that could be merged before the delete is left to Coalesce, as
// something else (a NO_METADATA snapshot's user) may count on it. An
// error while coalescing comes back with the report of the deletes done.
func (m *Manager) DeleteSnapshot(ctx context.Context, domain, name string, opts DeleteOptions) (*DeleteReport, error) {
	if opts.Children && opts.ChildrenOnly {
		return nil, fmt.Errorf("%w: children and children-only together", ErrInvalidArg)
	}
	unlock, err := m.lockDomain(ctx, domain)
	if err != nil {
		return nil, err
	}
	defer unlock()
	d, snaps, err := m.load(ctx, domain)
	if err != nil {
		return nil, err
	}
	if _, ok := snaps[name]; !ok {
		return nil, fmt.Errorf("%w: %s of domain %s", ErrNoSnapshot, name, domainName(d))
	}
	var order []string
	if opts.Children || opts.ChildrenOnly {
		order = descendantsLeavesFirst(snaps, name)
	}
	if !opts.ChildrenOnly {
		order = append(order, name)
	}
	var before map[string]bool
	if !opts.MetadataOnly {
		if before, err = m.mergeableSet(ctx, d, snaps, nil, opts.Live); err != nil {
			return nil, err
		}
	}
	report := &DeleteReport{}
	for i, n := range order {
		if i > 0 { // the previous delete committed new records
			if d, snaps, err = m.load(ctx, domain); err != nil {
				return report, err
			}
		}
		if err := m.deleteOne(ctx, d, snaps, n, opts, report); err != nil {
			return report, fmt.Errorf("deleting snapshot %s: %w", n, err)
		}
		report.Deleted = append(report.Deleted, n)
	}
	if opts.MetadataOnly {
		return report, nil
	}
	if report.Coalesced, err = m.coalesceLocked(ctx, domain, opts.Live, before); err != nil {
		return report, fmt.Errorf("%s deleted; merging the layers it freed: %w", strings.Join(report.Deleted, ", "), err)
	}
	return report, nil
}

// descendantsLeavesFirst lists name's descendants, each after its own.
func descendantsLeavesFirst(snaps map[string]*Snapshot, name string) []string {
	children := map[string][]string{}
	for _, s := range snaps {
		children[s.Parent] = append(children[s.Parent], s.Name)
	}
	var out []string
	var visit func(string)
	visit = func(n string) {
		kids := children[n]
		sort.Strings(kids)
		for _, k := range kids {
			visit(k)
			out = append(out, k)
		}
	}
	visit(name)
	return out
}

func (m *Manager) deleteOne(ctx context.Context, d *Domain, snaps map[string]*Snapshot, name string, opts DeleteOptions, report *DeleteReport) error {
	metadataOnly, live, domain := opts.MetadataOnly, opts.Live, d.Name
	s := snaps[name]
	next := d.Clone()
	in := newIntent(domain, "delete")
	var forward []step // steps that cannot be undone: after NoReturn
	var merged []step  // removal of images whose data a merge moved
	movedTo := map[string]string{}
	deleting := map[string]string{} // internal snapshots this delete removes, by image
	var u *users
	if s.Damaged != "" && !metadataOnly {
		return fmt.Errorf("%w: snapshot %s: %s; delete it with metadata only", ErrChainBroken, name, s.Damaged)
	}
	if !metadataOnly {
		var missing []string
		for _, sd := range s.Disks {
			if sd.Mode != DiskNone && sd.Image != "" && !exists(sd.Image) {
				missing = append(missing, sd.Image)
			}
		}
		if len(missing) > 0 {
			return fmt.Errorf("%w: snapshot %s needs images that are gone: %s (moved? rescan the disk with the moves, or delete with metadata-only)",
				ErrChainBroken, name, strings.Join(missing, ", "))
		}
		var err error
		if u, err = m.scanUsers(ctx); err != nil {
			return err
		}
		for _, sd := range s.Disks {
			r := DiskReport{Snapshot: name, Disk: sd.Target}
			switch sd.Mode {
			case DiskNone:
				continue
			case DiskInternal:
				h, err := readHeader(sd.Image)
				if err != nil {
					return err
				}
				if holdsSnapshot(h, name) {
					if err := checkInternalFormat(sd.Image, sd.Format); err != nil {
						return err
					}
					if err := checkSnapshotName(h, sd.Image, name, true); err != nil {
						return err
					}
					kind, err := m.liveKind(ctx, live, sd.Image, metastore.StepInternalDelete, metastore.StepLiveInternalDelete)
					if err != nil {
						return err
					}
					forward = append(forward, step{Kind: kind, Path: sd.Image, Format: sd.Format, Name: name, Disk: sd.Target})
					deleting[sd.Image] = name
				}
				r.Action, r.Kept = ActionInternalDeleted, sd.Image
			case DiskExternal:
				undoable, fwd, err := m.planMerge(ctx, next, sd, u, needs(next, snaps, name), externalClaims(snaps, name), live, &r)
				if err != nil {
					return fmt.Errorf("disk %s: %w", sd.Target, err)
				}
				in.Steps = append(in.Steps, undoable...)
				forward = append(forward, fwd...)
				if r.Removed != "" {
					movedTo[r.Removed] = r.Kept
					merged = append(merged, step{Kind: metastore.StepRemove, Path: r.Removed, Disk: sd.Target})
				}
			}
			report.Disks = append(report.Disks, r)
		}
	} else {
		for _, sd := range s.Disks {
			if sd.Mode != DiskNone {
				report.Disks = append(report.Disks, DiskReport{Snapshot: name, Disk: sd.Target, Action: ActionMetadataOnly})
			}
		}
	}
	in.NoReturn = len(in.Steps)
	in.Steps = append(in.Steps, forward...)
	for _, st := range in.Steps {
		in.Live = in.Live || isLiveStep(st.Kind)
	}

	// The snapshot tree: children move up to the deleted one's parent,
	// and so does "current".
	delete(snaps, name)
	var put []*Snapshot
	for _, o := range snaps {
		if o.Parent == name {
			o.Parent = s.Parent
			put = append(put, o)
		}
	}
	if next.Current == name {
		next.Current = s.Parent
	}
	put = append(put, repointSnapshots(snaps, movedTo, next)...)
	if !metadataOnly {
		collected, err := m.collect(next, snaps, u, d.Images, deleting)
		if err != nil {
			return err
		}
		for _, st := range collected {
			report.Collected = append(report.Collected, st.Path)
		}
		in.Cleanup = append(merged, collected...)
	}
	in.Commit = &metastore.Commit{Domain: next, PutSnapshots: uniqueSnapshots(put), DeleteSnapshots: []string{name}}
	if len(in.Commit.PutSnapshots) > 0 {
		// Records written here lose their XML unless it is carried along.
		if err := m.withXML(ctx, domain, in.Commit.PutSnapshots); err != nil {
			return err
		}
	}
	return m.run(ctx, in, live)
}

// planMerge merges an external snapshot's state image X with its only
// child C in the cheaper direction, unless that would change an image
// that anything besides this domain's own records uses (found by u, not
// assumed), or remove or rename an image xlsnap did not create. It
// updates next's image tree and disks and fills the report; the merge's
// steps come back split into undoable and not. Records of other
// snapshots that claim X as their state image, or C as their overlay,
// make it fail: a merge would lose their data, and which record is
// right cannot be told.
func (m *Manager) planMerge(ctx context.Context, next *Domain, sd SnapshotDisk, u *users, needed map[string]bool, others claims, live Live, r *DiskReport) (undoable, forward []step, err error) {
	x := sd.Image
	ximg, ok := next.Images[x]
	if !ok {
		r.Action = ActionUnreferenced
		return nil, nil, nil
	}
	kids := u.children(x, next.Images)
	// The records may know a child the pools do not show (an image gone
	// for a while): while a snapshot or a disk needs it, X must not
	// change.
	for _, tc := range next.Children(x) {
		if needed[tc] && !slices.Contains(kids, tc) {
			return nil, nil, fmt.Errorf("%w: %s is backed by %s and still needed, but it is gone (moved? rescan the disk with the moves)", ErrChainBroken, tc, x)
		}
	}
	if len(kids) == 0 {
		r.Action = ActionUnreferenced
		return nil, nil, nil
	}
	c := kids[0]
	cimg, inTree := next.Images[c]
	shared := u.foreign(x, next.Name, next.Images)
	if len(kids) == 1 && inTree {
		shared = append(shared, u.foreign(c, next.Name, next.Images)...)
	}
	if len(kids) > 1 || !inTree || len(shared) > 0 {
		r.Action, r.Kept = ActionSharedBase, x
		seen := map[string]bool{}
		for _, k := range kids {
			shared = append(shared, User{Kind: UserOverlay, Path: k})
		}
		for _, usr := range shared {
			if !seen[usr.String()] && !(usr.Kind == UserOverlay && usr.Path == c && inTree && len(kids) == 1) {
				seen[usr.String()] = true
				r.Users = append(r.Users, usr)
			}
		}
		return nil, nil, nil
	}
	// A merge is refused only where it would change what an internal
	// snapshot sees (each claim tried with qemu-img and qemu-io, see
	// docs/chains.md):
	//   - one in C is lost with C when a commit down removes it, and a
	//     pull-up rebases C onto X's backing, copying X's data into C's
	//     active tables only: what C's internal snapshot reads through
	//     its backing changes. C's forbid both directions.
	//   - one in X has its own L1 table: a commit into X writes X's
	//     active tables (copy-on-write), the snapshot reads as before;
	//     a pull-up removes X. X's forbid the pull-up only.
	//   - one above C reads the pair as C read it, merged either way,
	//     and nothing below X is written: neither forbids anything.
	// A header that cannot be read might hold one: the merge stops.
	ch, err := readHeader(c)
	if err != nil {
		return nil, nil, fmt.Errorf("reading %s for internal snapshots: %w", c, err)
	}
	if len(ch.Snapshots) > 0 {
		r.Action, r.Kept = ActionInternalAbove, x
		return nil, nil, nil
	}
	xh, err := readHeader(x)
	if err != nil && ximg.Format == "qcow2" {
		return nil, nil, fmt.Errorf("reading %s for internal snapshots: %w", x, err)
	}
	xHasInternal := err == nil && len(xh.Snapshots) > 0
	// C's overlays are repointed by a commit down: only those of this
	// domain's own tree.
	cKidsOwn := true
	for _, gc := range u.children(c, next.Images) {
		if _, ok := next.Images[gc]; !ok {
			cKidsOwn = false
		}
	}
	liveMerge := false
	if live != nil {
		if liveMerge, err = live.Uses(ctx, c); err != nil {
			return nil, nil, err
		}
	}
	// A commit down removes C; a pull-up removes X, or, when X is the
	// user's own image, ends by giving C X's name (offline only: the
	// device model holds C open by its name).
	canDown := cimg.Removable() && cKidsOwn
	// Taking the user's name needs the user's format too: a qcow2 under a
	// raw image's name would have anything opening it as raw read qcow2
	// metadata as data.
	canUp := !xHasInternal && (ximg.Removable() || !liveMerge && cimg.Removable() && !ximg.Detached && cimg.Format == ximg.Format)
	if !canDown && !canUp {
		r.Action, r.Kept = ActionUserImage, x
		return nil, nil, nil
	}
	// Every merge rewrites X's data or removes X, and C goes or takes X's
	// data: fail closed if another record holds its state there.
	if other, ok := others.state[x]; ok {
		return nil, nil, fmt.Errorf("%w: %s is also snapshot %s's state image: a merge would destroy that snapshot's data (the records conflict; delete one of them with metadata only)",
			errdefs.ErrOperationFailed, x, other)
	}
	if other, ok := others.overlay[c]; ok {
		return nil, nil, fmt.Errorf("%w: %s is also snapshot %s's overlay: a merge would destroy that snapshot's data (the records conflict; delete one of them with metadata only)",
			errdefs.ErrOperationFailed, c, other)
	}
	down := canDown
	if canDown && canUp {
		bx, err := m.allocated(ctx, x, ximg.Format)
		if err != nil {
			return nil, nil, err
		}
		bc, err := m.allocated(ctx, c, cimg.Format)
		if err != nil {
			return nil, nil, err
		}
		down = bc < bx || liveMerge && !ximg.Removable()
	}
	if down {
		// Commit C into X, point C's children at X, forget C; the device
		// model does the commit when it reads C.
		commit := step{Kind: metastore.StepCommit, Path: c, Format: cimg.Format, Disk: sd.Target}
		if liveMerge {
			commit.Kind, commit.Backing, commit.BackingFormat = metastore.StepLiveCommit, x, ximg.Format
		}
		forward = append(forward, commit)
		for _, gc := range next.Children(c) {
			// QEMU repoints the overlay it has open; any other child is
			// repointed here.
			used := false
			if liveMerge {
				if used, err = live.Uses(ctx, gc); err != nil {
					return nil, nil, err
				}
			}
			if !used {
				forward = append(forward, step{Kind: metastore.StepRebaseUnsafe, Path: gc, Format: next.Images[gc].Format,
					Backing: x, BackingFormat: ximg.Format, UndoBacking: c, UndoBackingFormat: cimg.Format, Disk: sd.Target})
			}
			next.Images[gc].Backing, next.Images[gc].BackingFormat = x, ximg.Format
		}
		replaceImage(next, c, x)
		r.Action, r.Kept, r.Removed = ActionMergedDown, x, c
		return nil, forward, nil
	}
	// Pull X into C: C is rebased onto X's backing with X's data copied
	// in, by the device model (a stream) when it reads C.
	kind := metastore.StepRebase
	if liveMerge {
		kind = metastore.StepLiveStream
	}
	undoable = append(undoable, step{Kind: kind, Path: c, Format: cimg.Format,
		Backing: ximg.Backing, BackingFormat: ximg.BackingFormat, UndoBacking: x, UndoBackingFormat: ximg.Format, Disk: sd.Target})
	cimg.Backing, cimg.BackingFormat = ximg.Backing, ximg.BackingFormat
	if ximg.Removable() {
		replaceImage(next, x, c)
		r.Action, r.Kept, r.Removed = ActionPulledUp, c, x
		return undoable, nil, nil
	}
	// X is the user's: C takes its name (a second link, so the
	// definition's name for C stays valid until it is rewritten), C's
	// children follow, and C's own name goes in the cleanup.
	forward = append(forward, step{Kind: metastore.StepLink, Path: c, Backing: x, Disk: sd.Target})
	for _, gc := range next.Children(c) {
		forward = append(forward, step{Kind: metastore.StepRebaseUnsafe, Path: gc, Format: next.Images[gc].Format,
			Backing: x, BackingFormat: cimg.Format, UndoBacking: c, UndoBackingFormat: cimg.Format, Disk: sd.Target})
		next.Images[gc].Backing, next.Images[gc].BackingFormat = x, cimg.Format
	}
	delete(next.Images, x)
	next.Images[x] = &Image{Format: cimg.Format, Backing: cimg.Backing, BackingFormat: cimg.BackingFormat}
	replaceImage(next, c, x)
	next.Images[x].Owned = false
	r.Action, r.Kept, r.Removed = ActionPulledUp, x, c
	return undoable, forward, nil
}

func (m *Manager) allocated(ctx context.Context, path, format string) (int64, error) {
	b, err := m.backendFor(path)
	if err != nil {
		return 0, err
	}
	return b.AllocatedBytes(ctx, path, format)
}

// needs lists the images a domain's disks and its snapshots other than
// skip read, through their recorded chains.
func needs(d *Domain, snaps map[string]*Snapshot, skip string) map[string]bool {
	out := map[string]bool{}
	for _, disk := range d.Disks {
		for _, p := range d.Chain(disk.Active) {
			out[p] = true
		}
	}
	for _, s := range snaps {
		if s.Name == skip {
			continue
		}
		for _, sd := range s.Disks {
			if sd.Image != "" {
				for _, p := range d.Chain(sd.Image) {
					out[p] = true
				}
			}
		}
	}
	return out
}

// replaceImage makes every disk that wrote to old write to repl and drops
// old from the tree; it stays on disk until the collector removes it.
func replaceImage(d *Domain, old, repl string) {
	for i := range d.Disks {
		if d.Disks[i].Active == old {
			d.Disks[i].Active, d.Disks[i].Format = repl, d.Images[repl].Format
		}
	}
	// repl keeps its own ownership: a merge into the user's image does
	// not make it xlsnap's.
	delete(d.Images, old)
}

// repointSnapshots rewrites snapshot records that name an image a merge
// moved into another, and returns those it changed.
func repointSnapshots(snaps map[string]*Snapshot, movedTo map[string]string, after *Domain) []*Snapshot {
	var changed []*Snapshot
	for _, s := range snaps {
		dirty := false
		for i := range s.Disks {
			sd := &s.Disks[i]
			if repl, ok := movedTo[sd.Image]; ok {
				sd.Image, sd.Format, dirty = repl, after.Images[repl].Format, true
			}
			if repl, ok := movedTo[sd.Overlay]; ok {
				sd.Overlay, dirty = repl, true
			}
		}
		if dirty {
			changed = append(changed, s)
		}
	}
	return changed
}

func uniqueSnapshots(in []*Snapshot) []*Snapshot {
	seen := map[string]bool{}
	var out []*Snapshot
	for _, s := range in {
		if !seen[s.Name] {
			seen[s.Name] = true
			out = append(out, s)
		}
	}
	return out
}

// withXML loads the domain XML of snapshots about to be rewritten.
func (m *Manager) withXML(ctx context.Context, domain string, snaps []*Snapshot) error {
	return m.store.View(ctx, func(tx metastore.Tx) error {
		for _, s := range snaps {
			full, err := tx.Snapshot(domain, s.Name)
			if err != nil {
				return err
			}
			s.DomainXML = full.DomainXML
		}
		return nil
	})
}

// liveKind picks the live step kind for an image the device model uses,
// the offline one otherwise.
func (m *Manager) liveKind(ctx context.Context, live Live, image string, offline, online metastore.StepKind) (metastore.StepKind, error) {
	if live == nil {
		return offline, nil
	}
	used, err := live.Uses(ctx, image)
	if err != nil || !used {
		return offline, err
	}
	return online, nil
}

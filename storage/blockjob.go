package storage

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/xlsnap/xlsnap/chain"
	"github.com/xlsnap/xlsnap/errdefs"
	"github.com/xlsnap/xlsnap/storage/metastore"
)

// Block jobs: libvirt's virDomainBlockCommit and virDomainBlockPull on one
// disk's chain, offline with qemu-img and live through the device model,
// each one journaled operation (op "blockcommit" or "blockpull").

// BlockCommitOptions are virDomainBlockCommit's arguments.
type BlockCommitOptions struct {
	// Top is the image whose data, with that of every image between it
	// and Base, is committed; "" means the disk's active layer.
	Top string
	// Base is the image the data is written into; "" means the bottom of
	// the chain, or with Shallow Top's backing image.
	Base string
	// Shallow takes Top's backing image as Base (libvirt's
	// VIR_DOMAIN_BLOCK_COMMIT_SHALLOW); a Base given with it must be that
	// image.
	Shallow bool
	// Active allows Top to be the active layer (libvirt's
	// VIR_DOMAIN_BLOCK_COMMIT_ACTIVE) and is refused otherwise. xlsnap
	// always finishes such a commit by switching the disk to Base (libvirt's
	// pivot): it keeps no job in its synchronized phase.
	Active bool
	// Live runs the commit as a block job of the running domain's device
	// model; nil means the domain is shut off (qemu-img).
	Live Live
}

// BlockPullOptions are virDomainBlockPull's (and virDomainBlockRebase's
// pull) arguments.
type BlockPullOptions struct {
	// Base is the image the active layer is backed by afterwards; the
	// data of every image above it is copied into the active layer. ""
	// pulls the whole chain: the active layer stands alone afterwards.
	Base string
	// Live runs the pull as a block-stream job of the running domain's
	// device model; nil means the domain is shut off (qemu-img rebase).
	Live Live
}

// BlockJobReport says what a block commit or pull did to one disk.
type BlockJobReport struct {
	Disk string
	// Top and Base are the images the job went between (a pull's Top is
	// the active layer; its Base is "" for a whole pull).
	Top, Base string
	// Active is the disk's active layer afterwards; Chain its chain, top
	// to base.
	Active string
	Chain  []string
	// Removed lists the images that left the chain and that xlsnap
	// removed: images it created that nothing uses any more.
	Removed []string
	// Kept lists the images that left the chain and stay: the user's own,
	// and those a snapshot or another user still reads.
	Kept []string
	// Unchanged says the job had nothing to do (a pull from the image
	// just below the active layer, or of a chain of one image).
	Unchanged bool
}

// Conflict is one reason a block job was refused: an image it would
// change (write into, remove from a chain, or rewrite) and who reads it.
type Conflict struct {
	Image  string
	Reason string
	Users  []User `json:",omitempty"`
}

func (c Conflict) String() string {
	s := c.Image + ": " + c.Reason
	if len(c.Users) > 0 {
		s += " (" + DescribeUsers(c.Users) + ")"
	}
	return s
}

// ConflictError refuses a block job that would change what a snapshot,
// another image or another domain reads; nothing was changed. It wraps
// errdefs.ErrOperationInvalid (libvirt's VIR_ERR_OPERATION_INVALID, 55):
// the call is valid, but not while those users exist.
type ConflictError struct {
	Op        string // blockcommit or blockpull
	Disk      string
	Conflicts []Conflict
}

func (e *ConflictError) Error() string {
	var parts []string
	for _, c := range e.Conflicts {
		parts = append(parts, c.String())
	}
	return fmt.Sprintf("%s: %s of disk %s would change data that others read: %s",
		errdefs.ErrOperationInvalid, e.Op, e.Disk, strings.Join(parts, "; "))
}

func (e *ConflictError) Unwrap() error { return errdefs.ErrOperationInvalid }

// BaseCommitter is the optional ability of a backend to commit an image
// into an image deeper in its backing chain than its own backing file,
// with every image between (qemu-img commit -b). Block commits with
// images between Top and Base need it.
type BaseCommitter interface {
	// CommitInto writes path's data, and that of every image between it
	// and base, into base; path and the images between are left as they
	// are (and no longer valid over base).
	CommitInto(ctx context.Context, path, format, base string, progress func(percent float64)) error
}

// commitInto is a commit step with its Base (Backing) named: qemu-img
// commit -b. Running it again commits the same data again: harmless.
func (m *Manager) commitInto(ctx context.Context, b Backend, st step) error {
	bc, ok := b.(BaseCommitter)
	if !ok {
		return fmt.Errorf("%w: the pool of %s cannot commit into an image below its backing file", ErrUnsupported, st.Path)
	}
	return bc.CommitInto(ctx, st.Path, st.Format, st.Backing, progressFor(ctx, "commit", st))
}

// diskChain is what a block job starts from: the disk, its chain on disk
// (which must be the recorded one) and the headers read on the way.
type diskChain struct {
	disk   *Disk
	paths  []string
	layers []chain.Layer
}

// loadDiskChain finds a disk by target or by its active image's path (as
// virsh takes either) and reads its chain from disk, refusing one that
// differs from the records: a block job plans on both.
func (m *Manager) loadDiskChain(ctx context.Context, d *Domain, disk string) (*diskChain, error) {
	var dk *Disk
	if dk = d.Disk(disk); dk == nil {
		if abs, err := filepath.Abs(disk); err == nil {
			for i := range d.Disks {
				if d.Disks[i].Active == filepath.Clean(abs) {
					dk = &d.Disks[i]
				}
			}
		}
	}
	if dk == nil {
		// libvirt's qemuDomainDiskByName.
		return nil, fmt.Errorf("%w: disk '%s' not found in domain", ErrInvalidArg, disk)
	}
	c, err := chain.Walk(ctx, dk.Active, chain.Format(dk.Format), m.policy())
	if err != nil {
		return nil, fmt.Errorf("disk %s: %w", dk.Target, err)
	}
	dc := &diskChain{disk: dk, layers: c.Layers}
	for _, l := range c.Layers {
		dc.paths = append(dc.paths, filepath.Clean(l.Path))
	}
	rec := d.Chain(dk.Active)
	for _, p := range rec {
		if d.Images[p] == nil {
			rec = nil // an image the tree does not know: not the chain on disk
		}
	}
	if !slices.Equal(rec, dc.paths) {
		return nil, fmt.Errorf("%w: disk %s: the chain on disk is %v, the records say %v (rescan the disk)",
			ErrChainBroken, dk.Target, dc.paths, d.Chain(dk.Active))
	}
	return dc, nil
}

// index finds an image of the chain by the name the caller gave, made
// absolute, or by file identity (another name of the same file); -1 when
// it is not in the chain.
func (dc *diskChain) index(name string) int {
	abs, err := filepath.Abs(name)
	if err != nil {
		return -1
	}
	if i := slices.Index(dc.paths, filepath.Clean(abs)); i >= 0 {
		return i
	}
	st, err := os.Stat(abs)
	if err != nil {
		return -1
	}
	for i, p := range dc.paths {
		if pst, err := os.Stat(p); err == nil && os.SameFile(st, pst) {
			return i
		}
	}
	return -1
}

// BlockCommit commits the data of opts.Top and of every image between it
// and opts.Base into Base, then drops them from the disk's chain: the
// image above Top is backed by Base afterwards, or, for the active layer
// (opts.Active), the disk writes to Base and the definition names it
// (libvirt's virDomainBlockCommit with its pivot). Offline this is
// qemu-img commit -b BASE TOP (formats always explicit) and an unsafe
// rebase of the image above; live it is QMP block-commit, completed once
// ready for an active commit. The images that left the chain are removed
// if xlsnap created them and nothing uses them (after the definition
// names Base); the user's are kept, as libvirt keeps them.
//
// Everything is checked before the first change: Base and every image
// between it and Top change, so the commit is refused with a
// *ConflictError (errdefs.ErrOperationInvalid, 55) if any of them is a
// snapshot's state image, is read by another image (a linked clone, a
// branch of the tree), by another disk or domain or by another domain's
// records, or if an image leaving the chain holds internal snapshots. An
// internal snapshot of Base itself, or of an image above Top, sees the
// same data afterwards and does not block it.
//
// Errors besides: ErrInvalidArg (8) for a disk, Top or Base not in the
// chain, Top without a backing image, the active layer without Active or
// Active with another Top, and Shallow with a Base that is not Top's
// backing (libvirt's messages); ErrChainBroken (9) for a chain on disk
// that differs from the records; ErrUnsupported (67) for a pool that
// cannot commit past a backing file; those of every operation (ErrBusy,
// ErrPending, the images' and the device model's).
func (m *Manager) BlockCommit(ctx context.Context, domain, disk string, opts BlockCommitOptions) (*BlockJobReport, error) {
	unlock, err := m.lockDomain(ctx, domain)
	if err != nil {
		return nil, err
	}
	defer unlock()
	d, snaps, err := m.load(ctx, domain)
	if err != nil {
		return nil, err
	}
	dc, err := m.loadDiskChain(ctx, d, disk)
	if err != nil {
		return nil, err
	}
	target, paths := dc.disk.Target, dc.paths
	// Top and Base, as libvirt's qemuDomainBlockCommit resolves them.
	top := 0
	if opts.Top != "" {
		if top = dc.index(opts.Top); top < 0 {
			return nil, fmt.Errorf("%w: could not find image '%s' in chain for '%s'", ErrInvalidArg, opts.Top, target)
		}
	}
	if top == len(paths)-1 {
		return nil, fmt.Errorf("%w: top '%s' in chain for '%s' has no backing file", ErrInvalidArg, paths[top], target)
	}
	base := len(paths) - 1
	switch {
	case opts.Base != "":
		if base = dc.index(opts.Base); base <= top {
			return nil, fmt.Errorf("%w: could not find image '%s' beneath '%s' in chain for '%s'", ErrInvalidArg, opts.Base, paths[top], target)
		}
		if opts.Shallow && base != top+1 {
			return nil, fmt.Errorf("%w: base '%s' is not immediately below '%s' in chain for '%s'", ErrInvalidArg, opts.Base, paths[top], target)
		}
	case opts.Shallow:
		base = top + 1
	}
	if top == 0 && !opts.Active {
		return nil, fmt.Errorf("%w: commit of '%s' active layer requires active flag", ErrInvalidArg, target)
	}
	if top != 0 && opts.Active {
		return nil, fmt.Errorf("%w: active commit requested but '%s' is not active", ErrInvalidArg, paths[top])
	}
	topPath, basePath := paths[top], paths[base]
	topImg, baseImg := d.Images[topPath], d.Images[basePath]
	live := opts.Live
	if live != nil {
		if err := liveReads(ctx, live, topPath, top == 0); err != nil {
			return nil, fmt.Errorf("disk %s: %w", target, err)
		}
	} else if base > top+1 {
		b, err := m.backendFor(topPath)
		if err != nil {
			return nil, err
		}
		if _, ok := b.(BaseCommitter); !ok {
			return nil, fmt.Errorf("%w: the pool of %s cannot commit into an image below its backing file (use --shallow)", ErrUnsupported, topPath)
		}
	}
	u, err := m.scanUsers(ctx)
	if err != nil {
		return nil, err
	}
	if cs := m.commitConflicts(d, snaps, u, dc, top, base); len(cs) > 0 {
		return nil, &ConflictError{Op: "blockcommit", Disk: target, Conflicts: cs}
	}

	next := d.Clone()
	in := newIntent(domain, "blockcommit")
	st := step{Kind: metastore.StepCommit, Path: topPath, Format: topImg.Format,
		Backing: basePath, BackingFormat: baseImg.Format, Disk: target}
	if live != nil {
		// QEMU repoints the image above Top itself.
		st.Kind = metastore.StepLiveCommit
		in.Live = true
	}
	in.Steps = append(in.Steps, st)
	if top == 0 {
		nd := next.Disk(target)
		nd.Active, nd.Format = basePath, baseImg.Format
	} else {
		above := paths[top-1]
		aimg := next.Images[above]
		if live == nil {
			in.Steps = append(in.Steps, step{Kind: metastore.StepRebaseUnsafe, Path: above, Format: aimg.Format,
				Backing: basePath, BackingFormat: baseImg.Format, UndoBacking: topPath, UndoBackingFormat: topImg.Format, Disk: target})
		}
		aimg.Backing, aimg.BackingFormat = basePath, baseImg.Format
	}
	// A commit cannot be undone: Base holds the new data from the first
	// write on. Recovery finishes it.
	in.NoReturn = 0
	report := &BlockJobReport{Disk: target, Top: topPath, Base: basePath}
	in.Cleanup = m.dropLayers(next, snaps, u, dc, paths[top:base], report)
	in.Commit = &metastore.Commit{Domain: next}
	if err := m.run(ctx, in, live); err != nil {
		return nil, err
	}
	nd := next.Disk(target)
	report.Active, report.Chain = nd.Active, next.Chain(nd.Active)
	return report, nil
}

// liveReads checks, before any change, that the device model reads image
// (and, for the active layer, writes it): a block job on a running
// domain's image it does not hold would run behind its back.
func liveReads(ctx context.Context, live Live, image string, active bool) error {
	held := live.Uses
	if active {
		held = live.Writes
	}
	used, err := held(ctx, image)
	if err != nil {
		return err
	}
	if !used {
		return fmt.Errorf("%w: the device model does not hold %s as the records say (rescan the disk)", errdefs.ErrOperationFailed, image)
	}
	return nil
}

// commitConflicts lists what a commit of paths[top] into paths[base]
// would change for someone else: Base and every image down from Top
// change (Base is written, the others leave the chain and no longer
// hold valid data), and the image above Top has its header rewritten.
func (m *Manager) commitConflicts(d *Domain, snaps map[string]*Snapshot, u *users, dc *diskChain, top, base int) []Conflict {
	paths := dc.paths
	changed := paths[top : base+1]
	var out []Conflict
	add := func(image, reason string, users ...User) {
		out = append(out, Conflict{Image: image, Reason: reason, Users: users})
	}
	for _, name := range sortedSnapshotNames(snaps) {
		s := snaps[name]
		for _, sd := range s.Disks {
			if sd.Mode == DiskNone || sd.Image == "" {
				continue
			}
			// A snapshot whose state is above Top reads the same data
			// through Base afterwards; so does an internal snapshot of
			// Base, whose own clusters stay as they are.
			if k := slices.Index(paths, sd.Image); k >= 0 && k < top || sd.Mode == DiskInternal && sd.Image == paths[base] {
				continue
			}
			for _, p := range d.Chain(sd.Image) {
				if slices.Contains(changed, p) {
					add(p, "a snapshot reads it",
						User{Kind: UserSnapshot, Domain: d.Name, DomainName: domainName(d), Snapshot: s.Name, Disk: sd.Target})
					break
				}
			}
		}
	}
	for k := top; k <= base; k++ {
		p := paths[k]
		if k < base {
			if n := dc.layers[k].Qcow2; n != nil && n.NbSnapshots > 0 {
				add(p, fmt.Sprintf("it holds %d internal snapshot(s), which would lose the data below them", n.NbSnapshots))
			}
		}
		m.readers(d, u, dc, p, k, &out)
	}
	if top > 0 {
		// Its content stays; its header is rewritten, which another
		// domain's running device model holding it open would prevent.
		above := paths[top-1]
		var defs []User
		for _, usr := range u.foreign(above, d.Name, d.Images) {
			if usr.Kind == UserDefinition {
				defs = append(defs, usr)
			}
		}
		if len(defs) > 0 {
			add(above, "its backing reference is rewritten while another domain's disk reads it", defs...)
		}
	}
	return out
}

// readers adds a conflict for every reader of paths[k] besides the disk's
// own chain: an image backed by it other than the layer above it (a
// clone, a branch of the tree), another disk of the domain, another
// domain's disk or records.
func (m *Manager) readers(d *Domain, u *users, dc *diskChain, p string, k int, out *[]Conflict) {
	var who []User
	seen := map[string]bool{}
	for _, kid := range u.children(p, d.Images) {
		if k > 0 && kid == dc.paths[k-1] {
			continue
		}
		usr := User{Kind: UserOverlay, Path: kid}
		seen[usr.String()] = true
		who = append(who, usr)
	}
	for _, usr := range u.foreign(p, d.Name, d.Images) {
		if !seen[usr.String()] {
			seen[usr.String()] = true
			who = append(who, usr)
		}
	}
	for _, other := range d.Disks {
		if other.Target != dc.disk.Target && slices.Contains(d.Chain(other.Active), p) {
			who = append(who, User{Kind: UserDefinition, Domain: d.Name, DomainName: domainName(d), Disk: other.Target, Path: other.Active})
		}
	}
	if len(who) > 0 {
		*out = append(*out, Conflict{Image: p, Reason: "another user reads it", Users: who})
	}
}

// dropLayers takes the images that leave a disk's chain out of next's
// tree, unless a snapshot still reads them, and returns the steps that
// remove those xlsnap created and nothing else uses (top down, so that
// each is no longer backing the one removed before it). The removal
// looks for users again when it runs. The user's images stay on disk.
func (m *Manager) dropLayers(next *Domain, snaps map[string]*Snapshot, u *users, dc *diskChain, gone []string, r *BlockJobReport) []step {
	needed := neededImages(next, snaps)
	var steps []step
	for _, p := range gone {
		img := next.Images[p]
		if needed[p] || img == nil {
			r.Kept = append(r.Kept, p)
			continue
		}
		delete(next.Images, p)
		k := slices.Index(dc.paths, p)
		others := u.foreign(p, next.Name, dc.tree())
		for _, kid := range u.children(p, dc.tree()) {
			if !slices.Contains(dc.paths, kid) {
				others = append(others, User{Kind: UserOverlay, Path: kid})
			}
		}
		if !img.Removable() || len(others) > 0 || dc.layers[k].Qcow2 != nil && dc.layers[k].Qcow2.NbSnapshots > 0 {
			r.Kept = append(r.Kept, p)
			continue
		}
		steps = append(steps, step{Kind: metastore.StepRemove, Path: p, Disk: dc.disk.Target})
		r.Removed = append(r.Removed, p)
	}
	return steps
}

// tree is the disk chain's images as an image tree, for the users scan's
// questions about them.
func (dc *diskChain) tree() map[string]*Image {
	t := make(map[string]*Image, len(dc.paths))
	for _, p := range dc.paths {
		t[p] = &Image{}
	}
	return t
}

// neededImages lists what a domain's disks, detached images and snapshots
// read, through the recorded chains.
func neededImages(d *Domain, snaps map[string]*Snapshot) map[string]bool {
	out := map[string]bool{}
	mark := func(top string) {
		for _, p := range d.Chain(top) {
			out[p] = true
		}
	}
	for _, disk := range d.Disks {
		mark(disk.Active)
	}
	for p, img := range d.Images {
		if img.Detached {
			mark(p)
		}
	}
	for _, s := range snaps {
		for _, sd := range s.Disks {
			if sd.Mode != DiskNone && sd.Image != "" {
				mark(sd.Image)
			}
		}
	}
	return out
}

func sortedSnapshotNames(snaps map[string]*Snapshot) []string {
	names := make([]string, 0, len(snaps))
	for n := range snaps {
		names = append(names, n)
	}
	slices.Sort(names)
	return names
}

// BlockPull copies into the disk's active layer the data of every image
// between it and opts.Base (the whole chain when Base is ""), and makes
// Base its backing image (none for a whole pull): libvirt's
// virDomainBlockPull and virDomainBlockRebase's pull. What the guest
// reads does not change. Offline this is qemu-img rebase -b BASE (safe
// mode: the data is copied) of the active layer; live it is QMP
// block-stream. The images that left the disk's chain stay while a
// snapshot or another user needs them; those xlsnap created that
// nothing needs any more are removed, the user's kept.
//
// Refused before any change with a *ConflictError
// (errdefs.ErrOperationInvalid, 55) when the active layer holds internal
// snapshots (they would lose the layers below them) or another domain
// reads it. Errors besides: ErrInvalidArg (8) for a disk or Base not in
// the chain below the active layer; ErrChainBroken (9) for a chain on
// disk that differs from the records; those of every operation.
func (m *Manager) BlockPull(ctx context.Context, domain, disk string, opts BlockPullOptions) (*BlockJobReport, error) {
	unlock, err := m.lockDomain(ctx, domain)
	if err != nil {
		return nil, err
	}
	defer unlock()
	d, snaps, err := m.load(ctx, domain)
	if err != nil {
		return nil, err
	}
	dc, err := m.loadDiskChain(ctx, d, disk)
	if err != nil {
		return nil, err
	}
	target, paths := dc.disk.Target, dc.paths
	active := paths[0]
	base, basePath, baseFormat := len(paths), "", ""
	if opts.Base != "" {
		if base = dc.index(opts.Base); base <= 0 {
			return nil, fmt.Errorf("%w: could not find image '%s' beneath '%s' in chain for '%s'", ErrInvalidArg, opts.Base, active, target)
		}
		basePath, baseFormat = paths[base], d.Images[paths[base]].Format
	}
	report := &BlockJobReport{Disk: target, Top: active, Base: basePath, Active: active}
	if base <= 1 {
		report.Chain, report.Unchanged = paths, true
		return report, nil
	}
	live := opts.Live
	if live != nil {
		if err := liveReads(ctx, live, active, true); err != nil {
			return nil, fmt.Errorf("disk %s: %w", target, err)
		}
	}
	u, err := m.scanUsers(ctx)
	if err != nil {
		return nil, err
	}
	var cs []Conflict
	if n := dc.layers[0].Qcow2; n != nil && n.NbSnapshots > 0 {
		cs = append(cs, Conflict{Image: active, Reason: fmt.Sprintf("it holds %d internal snapshot(s), which would lose the images below them", n.NbSnapshots)})
	}
	if others := u.foreign(active, d.Name, d.Images); len(others) > 0 {
		cs = append(cs, Conflict{Image: active, Reason: "it is rewritten while another user reads it", Users: others})
	}
	if len(cs) > 0 {
		return nil, &ConflictError{Op: "blockpull", Disk: target, Conflicts: cs}
	}

	next := d.Clone()
	in := newIntent(domain, "blockpull")
	aimg := next.Images[active]
	st := step{Kind: metastore.StepRebase, Path: active, Format: aimg.Format, Backing: basePath, BackingFormat: baseFormat,
		UndoBacking: paths[1], UndoBackingFormat: aimg.BackingFormat, Disk: target}
	if live != nil {
		st.Kind, in.Live = metastore.StepLiveStream, true
	}
	in.Steps = []step{st}
	// The pull changes no data anyone reads: a failed one is undone (the
	// old backing reference put back).
	in.NoReturn = 1
	aimg.Backing, aimg.BackingFormat = basePath, baseFormat
	in.Cleanup = m.dropLayers(next, snaps, u, dc, paths[1:base], report)
	in.Commit = &metastore.Commit{Domain: next}
	if err := m.run(ctx, in, live); err != nil {
		return nil, err
	}
	report.Chain = next.Chain(active)
	return report, nil
}

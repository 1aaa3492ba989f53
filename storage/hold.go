package storage

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/xlsnap/xlsnap/storage/metastore"
)

// Holds: the first phase of the Xen-devel review's two-phase hook (a
// chain "was to be changed / has changed"). A toolstack about to edit a
// disk's chain itself announces the edit; CheckChainEdit judges it
// against the images and their users, PutHold keeps the domain in the
// domain's record (so every process and host sees it) until the rescan
// that ends it (ReleaseHold) or its expiry. The driver makes its writers
// wait for a hold; storage's own operations do not look at it.

// Hold is a domain kept for an outside edit of one disk's chain.
type Hold = metastore.Hold

// HeldError: the domain is held for an outside edit of a disk's chain
// (driver.ChainChanging), and the call could not wait for its release:
// a second announcement, refused at once, or a writer whose context
// ended first (Err is then the context's error). It wraps ErrBusy,
// libvirt's "cannot acquire state change lock" (VIR_ERR_OPERATION_TIMEOUT,
// 68), and Err (a cancelled context makes it VIR_ERR_OPERATION_ABORTED,
// 78, as errdefs.CodeOf reads it).
type HeldError struct {
	// Domain is the domain's name.
	Domain string
	Hold   Hold
	Err    error
}

func (e *HeldError) Error() string {
	lead := ErrBusy.Error()
	if errors.Is(e.Err, context.Canceled) {
		// Code 78, not 68: the caller gave up, nothing timed out.
		lead = "operation aborted while waiting for the state change lock"
	}
	s := fmt.Sprintf("%s (held by chain-changing of disk %s of domain %s: hold %s from host %s until %s)",
		lead, e.Hold.Disk, e.Domain, e.Hold.ID, e.Hold.Host, e.Hold.Until.UTC().Format(time.RFC3339))
	if e.Err != nil {
		s += ": " + e.Err.Error()
	}
	return s
}

func (e *HeldError) Unwrap() []error {
	if e.Err != nil {
		return []error{ErrBusy, e.Err}
	}
	return []error{ErrBusy}
}

// Host is the name this Manager gives its host to others (Config.Host).
func (m *Manager) Host() string { return m.host }

// HoldOf returns the domain's hold, expired or not, and the domain's
// name; a nil hold when there is none. It takes no lock: a read.
// Errors: ErrNoDomain for a domain without a record; the store's.
func (m *Manager) HoldOf(ctx context.Context, domain string) (*Hold, string, error) {
	d, err := m.Domain(ctx, domain)
	if err != nil {
		return nil, "", err
	}
	return d.Hold, domainName(d), nil
}

// PutHold records h in the domain's record, under the domain's lock,
// unless a hold that has not expired is there: then a *HeldError
// (ErrBusy, 68) at once, and nothing changes. An expired one is
// replaced. Errors besides: ErrInvalidArg for a disk the domain does
// not have; those of every operation (ErrBusy, ErrPending, the store's).
func (m *Manager) PutHold(ctx context.Context, domain string, h Hold) error {
	unlock, err := m.lockDomain(ctx, domain)
	if err != nil {
		return err
	}
	defer unlock()
	return m.store.Update(ctx, func(tx metastore.Tx) error {
		d, err := m.domain(tx, domain)
		if err != nil {
			return err
		}
		if d.Hold != nil && !d.Hold.Expired(time.Now()) {
			return &HeldError{Domain: domainName(d), Hold: *d.Hold}
		}
		if d.Disk(h.Disk) == nil {
			return fmt.Errorf("%w: domain %s has no disk %q", ErrInvalidArg, domainName(d), h.Disk)
		}
		d.Hold = &h
		return tx.PutDomain(d)
	})
}

// ReleaseHold ends the domain's hold when it is disk's (expired or
// not), under the domain's lock, and returns it; nil when the domain
// holds none for disk (nothing is written then). The images the hold
// announced as merged away that are out of every chain the records
// read (a disk's, a snapshot's, a detached image's) and back no
// recorded image leave the image tree in the same transaction: they
// are the toolstack's to remove, and no record names a file that may
// be gone. Errors: ErrNoDomain; those of every operation.
func (m *Manager) ReleaseHold(ctx context.Context, domain, disk string) (*Hold, error) {
	unlock, err := m.lockDomain(ctx, domain)
	if err != nil {
		return nil, err
	}
	defer unlock()
	var released *Hold
	err = m.store.Update(ctx, func(tx metastore.Tx) error {
		d, err := m.domain(tx, domain)
		if err != nil || d.Hold == nil || d.Hold.Disk != disk {
			return err
		}
		list, err := tx.Snapshots(domain)
		if err != nil {
			return err
		}
		snaps := map[string]*Snapshot{}
		for _, s := range list {
			snaps[s.Name] = s
		}
		needed := neededImages(d, snaps)
		for _, p := range d.Hold.Merges {
			if _, ok := d.Images[p]; ok && !needed[p] && len(d.Children(p)) == 0 {
				delete(d.Images, p)
			}
		}
		released, d.Hold = d.Hold, nil
		return tx.PutDomain(d)
	})
	if err != nil || released == nil {
		return nil, err
	}
	return released, m.backup(ctx)
}

// ClearHold removes the domain's hold id if it has expired, under the
// domain's lock (the next writer's tidying: an expired hold binds no
// one). Errors: those of every operation.
func (m *Manager) ClearHold(ctx context.Context, domain, id string) error {
	unlock, err := m.lockDomain(ctx, domain)
	if err != nil {
		return err
	}
	defer unlock()
	return m.store.Update(ctx, func(tx metastore.Tx) error {
		d, err := m.domain(tx, domain)
		if err != nil || d.Hold == nil || d.Hold.ID != id || !d.Hold.Expired(time.Now()) {
			return err
		}
		d.Hold = nil
		return tx.PutDomain(d)
	})
}

// PathMove is an image (or a folder of images) moved or copied from
// From to To.
type PathMove struct{ From, To string }

// ChainEdit is an edit of one disk's chain that someone other than
// xlsnap is about to make. Paths name images of the chain (absolute, or
// relative to the working folder; another name of the same file does
// too); a move's From may also be a folder holding layers.
type ChainEdit struct {
	// Moves: images copied or moved to other files (the old file may
	// stay, as a copy's does).
	Moves []PathMove
	// Commits: images whose data is committed into their backing image
	// (qemu-img commit), then dropped from the chain (the image above is
	// rebased onto that backing image).
	Commits []string
	// Pulls: images whose data is pulled up into the image above them
	// (qemu-img rebase of that image onto their backing image), then
	// dropped from the chain.
	Pulls []string
	// Rewrites: images whose header is rewritten in place (qemu-img
	// amend, rebase -u), their data left as it is.
	Rewrites []string
}

// EditCheck is what CheckChainEdit found.
type EditCheck struct {
	// Disk is the disk's target; Chain its chain, top to base.
	Disk  string
	Chain []string
	// Checked says, one line per planned change, what was checked.
	Checked []string
	// Merges are the images committed or pulled away, absolute.
	Merges []string
}

// CheckChainEdit judges, before anything changes, whether an outside
// edit of a disk's chain is safe; it changes nothing. disk is a target,
// or the active image's path. The chain on disk must be the recorded
// one. running says the domain's device model reads the chain:
//
//   - no change of a running domain's active layer (its device model
//     writes it); no move or merge of a shut-off domain's (its
//     definition names it, and must always name an image that exists
//     and holds the disk's data);
//   - a move (copy) of a backing layer is allowed, with the rewrite of
//     the backing reference of the image above it that it needs (the
//     device model makes it for a running domain, rescan --moved);
//   - a running domain's guest reads every layer: each merge and each
//     header rewrite is refused (only the device model can merge what it
//     reads, or rewrite headers it holds locked);
//   - for a domain that is shut off, a commit, pull or rewrite is refused
//     when it would change what anyone else reads, found by a scan of
//     every user (every definition, every image in the pools, every
//     record, other hosts' definitions): the rules of BlockCommit and
//     BlockPull, plus, since the merged image may then be removed, every
//     reader of it besides the chain above it.
//
// Errors: ErrInvalidArg (8) for an empty edit, a disk, image or folder
// not of the chain, an image named twice or by two merges that touch
// each other, a commit of the base, a pull of the active layer, a move
// onto an image of the chain; ErrUnsafeBacking (67) for a move out of
// the pools; ErrChainBroken (9) for a chain on disk that differs from
// the records; ErrOperationInvalid (55) for the refusals above (a
// *ConflictError where users are the reason); those of every operation.
func (m *Manager) CheckChainEdit(ctx context.Context, domain, disk string, edit ChainEdit, running bool) (*EditCheck, error) {
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
	p, err := m.planEdit(d, dc, edit)
	if err != nil {
		return nil, err
	}
	u, err := m.scanUsers(ctx)
	if err != nil {
		return nil, err
	}
	rep := &EditCheck{Disk: dc.disk.Target, Chain: dc.paths}
	if err := m.judgeEdit(d, snaps, u, dc, p, running, rep); err != nil {
		return nil, err
	}
	return rep, nil
}

// editKind names a planned change.
type editKind string

const (
	editMove    editKind = "move"
	editCommit  editKind = "commit"
	editPull    editKind = "pull"
	editRewrite editKind = "rewrite"
)

// plannedChange is one change of the plan, resolved to a layer.
type plannedChange struct {
	kind editKind
	k    int    // the layer's index in the chain, top first
	to   string // a move's new path
}

// planEdit resolves every path of the edit to a layer of the chain and
// checks the plan's shape; nothing is read but the names.
func (m *Manager) planEdit(d *Domain, dc *diskChain, edit ChainEdit) ([]plannedChange, error) {
	paths, target := dc.paths, dc.disk.Target
	if len(edit.Moves)+len(edit.Commits)+len(edit.Pulls)+len(edit.Rewrites) == 0 {
		return nil, fmt.Errorf("%w: an edit of the chain of disk %s of domain %s names no image: say what it moves, commits, pulls or rewrites",
			ErrInvalidArg, target, domainName(d))
	}
	notInChain := func(name string) error {
		return fmt.Errorf("%w: %s is no image of the chain of disk %s of domain %s (%s)",
			ErrInvalidArg, name, target, domainName(d), strings.Join(paths, " <- "))
	}
	var plan []plannedChange
	for _, mv := range edit.Moves {
		if mv.From == "" || mv.To == "" {
			return nil, fmt.Errorf("%w: a move from %q to %q: want both", ErrInvalidArg, mv.From, mv.To)
		}
		from, err1 := filepath.Abs(mv.From)
		to, err2 := filepath.Abs(mv.To)
		if err1 != nil || err2 != nil {
			return nil, fmt.Errorf("%w: move %s to %s", ErrInvalidArg, mv.From, mv.To)
		}
		if k := dc.index(from); k >= 0 {
			plan = append(plan, plannedChange{kind: editMove, k: k, to: to})
			continue
		}
		// A folder moved moves every layer inside it.
		found := false
		for k, p := range paths {
			if rel, ok := strings.CutPrefix(p, from+"/"); ok {
				plan = append(plan, plannedChange{kind: editMove, k: k, to: filepath.Join(to, rel)})
				found = true
			}
		}
		if !found {
			return nil, notInChain(mv.From)
		}
	}
	for _, g := range []struct {
		kind  editKind
		names []string
	}{{editCommit, edit.Commits}, {editPull, edit.Pulls}, {editRewrite, edit.Rewrites}} {
		for _, name := range g.names {
			k := dc.index(name)
			if k < 0 {
				return nil, notInChain(name)
			}
			plan = append(plan, plannedChange{kind: g.kind, k: k})
		}
	}
	named := map[int]editKind{}
	for _, c := range plan {
		if prev, ok := named[c.k]; ok {
			return nil, fmt.Errorf("%w: %s is named twice in the edit (%s and %s): one change per image", ErrInvalidArg, paths[c.k], prev, c.kind)
		}
		named[c.k] = c.kind
	}
	// A merge changes two layers: the one that goes and the one that
	// takes its data. Two changes touching one layer are two steps, each
	// to be announced and rescanned in turn.
	touched := map[int]editKind{}
	touch := func(k int, by editKind) error {
		if other, ok := touched[k]; ok {
			return fmt.Errorf("%w: the %s and the %s both write %s: announce, make and rescan one of them at a time",
				ErrInvalidArg, other, by, paths[k])
		}
		touched[k] = by
		return nil
	}
	for _, c := range plan {
		switch c.kind {
		case editCommit:
			if c.k == len(paths)-1 {
				return nil, fmt.Errorf("%w: %s is the base of the chain of disk %s: it has no backing file to commit into", ErrInvalidArg, paths[c.k], target)
			}
			if err := touch(c.k+1, c.kind); err != nil {
				return nil, err
			}
		case editPull:
			if c.k == 0 {
				return nil, fmt.Errorf("%w: %s is the active layer of disk %s: there is no image above it to pull it into", ErrInvalidArg, paths[c.k], target)
			}
			if err := touch(c.k-1, c.kind); err != nil {
				return nil, err
			}
		case editMove:
			if k := dc.index(c.to); k >= 0 || slices.Contains(paths, c.to) {
				return nil, fmt.Errorf("%w: a move of %s onto %s, an image of the chain of disk %s", ErrInvalidArg, paths[c.k], c.to, target)
			}
		}
	}
	for _, k := range slices.Sorted(maps.Keys(touched)) {
		if other, ok := named[k]; ok {
			return nil, fmt.Errorf("%w: the %s writes %s, which the edit also names (%s): announce, make and rescan one of them at a time",
				ErrInvalidArg, touched[k], paths[k], other)
		}
	}
	for _, c := range plan {
		if c.kind != editMove {
			continue
		}
		if err := m.inPoolsTarget(c.to); err != nil {
			return nil, fmt.Errorf("a move of %s: %w", paths[c.k], err)
		}
	}
	return plan, nil
}

// judgeEdit applies the rules of CheckChainEdit to a resolved plan.
func (m *Manager) judgeEdit(d *Domain, snaps map[string]*Snapshot, u *users, dc *diskChain, plan []plannedChange, running bool, rep *EditCheck) error {
	paths, target, name := dc.paths, dc.disk.Target, domainName(d)
	for _, c := range plan {
		p := paths[c.k]
		switch {
		case c.k == 0 && running:
			if c.kind == editMove || c.kind == editRewrite {
				return fmt.Errorf("%w: %s is the layer the running domain %s writes on disk %s: no %s of it outside the device model while it writes it",
					ErrOperationInvalid, p, name, target, c.kind)
			}
			return fmt.Errorf("%w: %s is the layer the running domain %s writes on disk %s: no %s of it outside the device model while it writes it; the device model merges it: xlsnap blockcommit --active --pivot (virDomainBlockCommit) or snapshot-delete",
				ErrOperationInvalid, p, name, target, c.kind)
		case c.k == 0 && c.kind != editRewrite:
			return fmt.Errorf("%w: %s is the active layer of disk %s of domain %s, which its definition names: no outside %s of it, since the definition must always name an image that exists and holds the disk's data (xlsnap blockcommit --active merges it and repoints the definition)",
				ErrOperationInvalid, p, target, name, c.kind)
		case c.kind == editMove:
			if _, err := os.Stat(c.to); err == nil {
				if us := u.of(c.to); len(us) > 0 {
					return fmt.Errorf("%w: a move of %s onto %s, which is in use (%s)", ErrOperationInvalid, p, c.to, DescribeUsers(us))
				}
			}
			line := fmt.Sprintf("move %s to %s: a backing layer; ", p, c.to)
			if running {
				// The header above names the old file until the device
				// model rewrites it: a file moved away (mv) leaves that
				// name dangling, and the copy cannot be checked against it.
				line += fmt.Sprintf("copy it (cp, not mv: %s names the old file until the rescan, which compares the copy with it); rescan --moved switches the device model to it, has it make %s name it, and follows it in the records and every snapshot; remove the old file after", paths[c.k-1], paths[c.k-1])
			} else {
				line += fmt.Sprintf("make %s name it (qemu-img rebase -u), then rescan --moved follows it in the records and every snapshot", paths[c.k-1])
			}
			var others []Conflict
			m.readers(d, u, dc, p, c.k, &others)
			if len(others) > 0 {
				line += "; others read the old file, so leave it in place (" + DescribeUsers(others[0].Users) + ")"
			}
			rep.Checked = append(rep.Checked, line)
		case running:
			return runningRefusal(c.kind, p, name, target)
		case c.kind == editCommit:
			if cs := m.commitConflicts(d, snaps, u, dc, c.k, c.k+1); len(cs) > 0 {
				return mergeRefusal("the planned commit of "+p, target, cs)
			}
			rep.Checked = append(rep.Checked, fmt.Sprintf("commit %s into %s: nothing but the chain of disk %s reads either", p, paths[c.k+1], target))
			rep.Merges = append(rep.Merges, p)
		case c.kind == editPull:
			if cs := m.pullConflicts(d, snaps, u, dc, c.k); len(cs) > 0 {
				return mergeRefusal("the planned pull of "+p, target, cs)
			}
			rep.Checked = append(rep.Checked, fmt.Sprintf("pull %s into %s: nothing but the chain of disk %s reads %s, and %s holds no internal snapshot",
				p, paths[c.k-1], target, p, paths[c.k-1]))
			rep.Merges = append(rep.Merges, p)
		case c.kind == editRewrite:
			if us := u.foreign(p, d.Name, d.Images); len(us) > 0 {
				return &ConflictError{Op: "the planned header rewrite of " + p, Disk: target,
					Conflicts: []Conflict{{Image: p, Reason: "another domain or image reads it", Users: us}}}
			}
			rep.Checked = append(rep.Checked, fmt.Sprintf("rewrite the header of %s: no other domain or image reads it", p))
		}
	}
	return nil
}

// runningRefusal refuses a merge or a header rewrite of a backing layer
// of a running domain's chain, naming what does it through the device
// model.
func runningRefusal(kind editKind, p, domain, disk string) error {
	if kind == editRewrite {
		return fmt.Errorf("%w: the running domain %s reads %s (disk %s): its device model holds the image open and locked, so only it may rewrite the header; a backing file moved or copied is renamed in the header by the device model on rescan --moved",
			ErrOperationInvalid, domain, p, disk)
	}
	return fmt.Errorf("%w: the running domain %s reads %s (disk %s): a %s outside the device model would change what the guest reads behind its back; merge through the device model instead: xlsnap snapshot-delete (of the snapshot that holds it), blockcommit or blockpull (virDomainSnapshotDelete, virDomainBlockCommit, virDomainBlockPull)",
		ErrOperationInvalid, domain, p, disk, kind)
}

// mergeRefusal is a *ConflictError for a planned merge, with what to do
// when snapshots are the reason.
func mergeRefusal(op, disk string, cs []Conflict) error {
	err := error(&ConflictError{Op: op, Disk: disk, Conflicts: cs})
	for _, c := range cs {
		for _, usr := range c.Users {
			if usr.Kind == UserSnapshot {
				return fmt.Errorf("%w; xlsnap snapshot-delete merges the images a snapshot holds", err)
			}
		}
	}
	return err
}

// pullConflicts lists what pulling paths[k] up into the image above it
// would change for someone else. The image above keeps what it shows
// but is rewritten: refused where it holds internal snapshots (they see
// through to the layer that goes) or another domain or image reads it.
// The pulled image leaves the chain and may then be removed: refused
// where a snapshot whose state is not above it reads it, another image
// is backed by it, another disk or domain reads it, or it holds
// internal snapshots.
func (m *Manager) pullConflicts(d *Domain, snaps map[string]*Snapshot, u *users, dc *diskChain, k int) []Conflict {
	paths := dc.paths
	p, above := paths[k], paths[k-1]
	var out []Conflict
	if n := dc.layers[k-1].Qcow2; n != nil && n.NbSnapshots > 0 {
		out = append(out, Conflict{Image: above, Reason: fmt.Sprintf("it holds %d internal snapshot(s), which would lose the image below them", n.NbSnapshots)})
	}
	if others := u.foreign(above, d.Name, d.Images); len(others) > 0 {
		out = append(out, Conflict{Image: above, Reason: "it is rewritten while another user reads it", Users: others})
	}
	for _, name := range sortedSnapshotNames(snaps) {
		for _, sd := range snaps[name].Disks {
			if sd.Mode == DiskNone || sd.Image == "" {
				continue
			}
			if i := slices.Index(paths, sd.Image); i >= 0 && i < k {
				continue // its state is above: it reads the same afterwards
			}
			if slices.Contains(d.Chain(sd.Image), p) {
				out = append(out, Conflict{Image: p, Reason: "a snapshot reads it",
					Users: []User{{Kind: UserSnapshot, Domain: d.Name, DomainName: domainName(d), Snapshot: name, Disk: sd.Target}}})
				break
			}
		}
	}
	if n := dc.layers[k].Qcow2; n != nil && n.NbSnapshots > 0 {
		out = append(out, Conflict{Image: p, Reason: fmt.Sprintf("it holds %d internal snapshot(s), which would go with it", n.NbSnapshots)})
	}
	m.readers(d, u, dc, p, k, &out)
	return out
}

// inPoolsTarget checks that path, which may not exist yet, would lie
// inside a pool: its nearest existing folder, symlinks resolved, with
// the rest of the path below it. ErrUnsafeBacking
// (VIR_ERR_CONFIG_UNSUPPORTED, 67) when it would not.
func (m *Manager) inPoolsTarget(path string) error {
	dir, rest := filepath.Dir(path), filepath.Base(path)
	for {
		real, err := filepath.EvalSymlinks(dir)
		if err == nil {
			full := filepath.Join(real, rest)
			for _, root := range m.policy().Roots {
				if r, err := filepath.EvalSymlinks(root); err == nil && strings.HasPrefix(full, r+"/") {
					return nil
				}
			}
			return fmt.Errorf("%w: %s would lie outside the pools", ErrUnsafeBacking, path)
		}
		if !errors.Is(err, os.ErrNotExist) || filepath.Dir(dir) == dir {
			return fmt.Errorf("%w: %s: %v", ErrInvalidArg, path, err)
		}
		dir, rest = filepath.Dir(dir), filepath.Join(filepath.Base(dir), rest)
	}
}

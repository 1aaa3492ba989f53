package storage

import (
	"context"
	"fmt"
	"slices"
	"sort"
	"strings"

	"github.com/hashicorp/go-multierror"

	"github.com/xlsnap/xlsnap/storage/metastore"
)

// Coalescing. A layer that no disk writes, no external snapshot holds its
// state in and no detached disk's data lives in is needed by nothing for
// its own view: only what is above it reads it. Such an idle layer with
// one child is merged with that child by planMerge, the machinery of a
// delete (the cheaper direction, a live block job where the device model
// reads the child, every user found by scanUsers, the exact rule for
// internal snapshots), one journaled operation ("coalesce") per merge. A
// delete coalesces what it frees; Coalesce does it for a domain or the
// whole store; a snapshot that would pass its pool's depth limit does it
// first (see docs/chains.md).

// DefaultMaxDepth is the most layers a disk's chain may have in a pool
// whose PoolConfig sets no MaxDepth: 30, XAPI's limit (libvirt itself
// follows chains of up to 200 layers).
const DefaultMaxDepth = 30

// maxDepthLimit is the largest MaxDepth a pool may set: the chain reader
// follows no deeper chain (chain.DefaultMaxDepth).
const maxDepthLimit = 1000

// maxDepth is the pool's depth limit.
func (p *pool) maxDepth() int {
	if p.MaxDepth == 0 {
		return DefaultMaxDepth
	}
	return p.MaxDepth
}

// checkPoolConfig refuses a depth limit no chain could keep.
func checkPoolConfig(pc PoolConfig) error {
	if pc.MaxDepth < 0 || pc.MaxDepth > maxDepthLimit {
		return fmt.Errorf("%w: pool %q: max_depth %d (0 for the default of %d, else 1 to %d layers)",
			ErrInvalidArg, pc.Name, pc.MaxDepth, DefaultMaxDepth, maxDepthLimit)
	}
	return nil
}

// Merge is one layer coalescing merged away (or, in a dry run, would).
type Merge struct {
	// Domain is the domain's name; Disk the disk whose chain held Layer.
	Domain string `json:"domain"`
	Disk   string `json:"disk"`
	// Layer is the idle image: no disk writes it and no snapshot holds
	// its state there.
	Layer string `json:"layer"`
	// Action is merged-down (Layer's child committed into it) or
	// pulled-up (Layer pulled into its child); Kept is the image that
	// holds the merged data, Removed the name that went.
	Action  DiskAction `json:"action"`
	Kept    string     `json:"kept"`
	Removed string     `json:"removed"`
}

// CoalesceOptions say how Coalesce runs.
type CoalesceOptions struct {
	// DryRun changes nothing: the report lists every merge Coalesce would
	// make, each judged as if it were the only one.
	DryRun bool
	// Live merges the images a running domain's device model reads
	// through it (block jobs); only with one domain named.
	Live Live
	// Except names layers to leave as they are: those a dry run found
	// mergeable before a revert with RevertOptions.LeaveFreed, so that
	// only what the revert freed is merged, as a revert itself does.
	Except []string
}

// CoalesceReport lists the merges, in the order they ran.
type CoalesceReport struct {
	DryRun bool    `json:"dry_run"`
	Merges []Merge `json:"merges"`
}

// Coalesce merges away every idle layer of a domain's tree ("" for every
// domain of this Manager's source, offline) that nothing else needs
// either: each merge is refused, and the layer kept, where a delete would
// keep it (another image or domain uses it, it is the user's image and
// cannot be merged into, or its child holds internal snapshots). Each
// merge is one journaled operation; a domain's merges stop at its first
// failure. Errors: ErrNoDomain, ErrInvalidArg (Live without a domain),
// ErrBusy, ErrPending, and those of the merges (ErrChainBroken,
// ErrLocked, ...); with every domain, one domain's failure does not stop
// the others (all are returned, joined).
func (m *Manager) Coalesce(ctx context.Context, domain string, opts CoalesceOptions) (*CoalesceReport, error) {
	rep := &CoalesceReport{DryRun: opts.DryRun, Merges: []Merge{}}
	domains := []string{domain}
	if domain == "" {
		if opts.Live != nil {
			return nil, fmt.Errorf("%w: a live coalesce names its domain", ErrInvalidArg)
		}
		all, err := m.Domains(ctx)
		if err != nil {
			return nil, err
		}
		domains = slices.DeleteFunc(all, func(n string) bool { return !m.mine(n) })
	}
	var errs error
	for _, dn := range domains {
		merges, err := m.coalesceDomain(ctx, dn, opts)
		rep.Merges = append(rep.Merges, merges...)
		if err != nil {
			if domain != "" {
				return rep, err
			}
			errs = multierror.Append(errs, fmt.Errorf("domain %s: %w", dn, err))
		}
	}
	return rep, errs
}

func (m *Manager) coalesceDomain(ctx context.Context, domain string, opts CoalesceOptions) ([]Merge, error) {
	unlock, err := m.lockDomain(ctx, domain)
	if err != nil {
		return nil, err
	}
	defer unlock()
	skip := map[string]bool{}
	for _, p := range opts.Except {
		skip[p] = true
	}
	if !opts.DryRun {
		return m.coalesceLocked(ctx, domain, opts.Live, skip)
	}
	d, snaps, err := m.load(ctx, domain)
	if err != nil {
		return nil, err
	}
	merges, err := m.mergeable(ctx, d, snaps, nil, opts.Live)
	return slices.DeleteFunc(merges, func(mg Merge) bool { return skip[mg.Layer] }), err
}

// coalesceLocked merges idle layers of a domain one at a time, each
// planned on the state the previous one left, until none can go; skip
// names layers to leave alone. The caller holds the domain's lock.
func (m *Manager) coalesceLocked(ctx context.Context, domain string, live Live, skip map[string]bool) ([]Merge, error) {
	var merges []Merge
	// Each merge takes an image out of the tree: the loop ends.
	for {
		plan, err := m.nextCoalesce(ctx, domain, live, skip)
		if err != nil || plan == nil {
			return merges, err
		}
		if err := m.run(ctx, plan.in, live); err != nil {
			return merges, fmt.Errorf("coalescing %s: %w", plan.merge.Layer, err)
		}
		merges = append(merges, plan.merge)
	}
}

// nextCoalesce plans the first merge coalescing can make now (layers in
// path order), or returns nil when there is none.
func (m *Manager) nextCoalesce(ctx context.Context, domain string, live Live, skip map[string]bool) (*coalescePlan, error) {
	d, snaps, err := m.load(ctx, domain)
	if err != nil {
		return nil, err
	}
	cands := slices.DeleteFunc(idleLayers(d, snaps), func(p string) bool { return skip[p] })
	if len(cands) == 0 {
		return nil, nil
	}
	u, err := m.scanUsers(ctx)
	if err != nil {
		return nil, err
	}
	for _, x := range cands {
		plan, err := m.planCoalesce(ctx, d, snaps, u, x, live)
		if err != nil {
			return nil, fmt.Errorf("coalescing %s: %w", x, err)
		}
		if plan == nil {
			continue
		}
		if c := plan.in.Commit; len(c.PutSnapshots) > 0 {
			// Records written here lose their XML unless it is carried along.
			if err := m.withXML(ctx, domain, c.PutSnapshots); err != nil {
				return nil, err
			}
		}
		return plan, nil
	}
	return nil, nil
}

// mergeable lists the merges Coalesce would make now, each judged
// alone; u is a scan of the users already made, or nil.
func (m *Manager) mergeable(ctx context.Context, d *Domain, snaps map[string]*Snapshot, u *users, live Live) ([]Merge, error) {
	cands := idleLayers(d, snaps)
	if len(cands) == 0 {
		return nil, nil
	}
	if u == nil {
		var err error
		if u, err = m.scanUsers(ctx); err != nil {
			return nil, err
		}
	}
	var out []Merge
	for _, x := range cands {
		plan, err := m.planCoalesce(ctx, d, snaps, u, x, live)
		if err != nil {
			return nil, fmt.Errorf("coalescing %s: %w", x, err)
		}
		if plan != nil {
			out = append(out, plan.merge)
		}
	}
	return out, nil
}

// mergeableSet is mergeable's layers, for telling what an operation
// frees: a delete or a revert coalesces only layers that were not
// mergeable before it.
func (m *Manager) mergeableSet(ctx context.Context, d *Domain, snaps map[string]*Snapshot, u *users, live Live) (map[string]bool, error) {
	merges, err := m.mergeable(ctx, d, snaps, u, live)
	if err != nil {
		return nil, err
	}
	set := map[string]bool{}
	for _, mg := range merges {
		set[mg.Layer] = true
	}
	return set, nil
}

// idleLayers lists, sorted, the images of d's tree with one child that
// nothing needs for its own view: no disk writes them, no external
// snapshot holds its state in them, no detached disk's data is there.
// Internal snapshots inside one do not make it needed: a commit down
// into it keeps them (planMerge). A layer with no child is the
// collector's; one with several is read by each.
func idleLayers(d *Domain, snaps map[string]*Snapshot) []string {
	busy := map[string]bool{}
	for _, disk := range d.Disks {
		busy[disk.Active] = true
	}
	for _, s := range snaps {
		for _, sd := range s.Disks {
			if sd.Mode == DiskExternal && sd.Image != "" {
				busy[sd.Image] = true
			}
		}
	}
	var out []string
	for p, img := range d.Images {
		if !busy[p] && !img.Detached && exists(p) && len(d.Children(p)) == 1 {
			out = append(out, p)
		}
	}
	sort.Strings(out)
	return out
}

// coalescePlan is one merge, ready to run.
type coalescePlan struct {
	in    *intent
	merge Merge
}

// planCoalesce plans merging the idle layer x with its child, or returns
// nil where planMerge keeps it (shared, the user's, or its child holds
// internal snapshots). Nothing changes: d and snaps are left as they are.
func (m *Manager) planCoalesce(ctx context.Context, d *Domain, snaps map[string]*Snapshot, u *users, x string, live Live) (*coalescePlan, error) {
	next := d.Clone()
	own := cloneSnapshots(snaps)
	sd := SnapshotDisk{Target: diskOf(d, snaps, x), Mode: DiskExternal, Image: x, Format: d.Images[x].Format}
	r := DiskReport{Disk: sd.Target}
	undoable, forward, err := m.planMerge(ctx, next, sd, u, needs(next, own, ""), externalClaims(own, ""), live, &r)
	if err != nil {
		return nil, err
	}
	if r.Action != ActionMergedDown && r.Action != ActionPulledUp {
		return nil, nil
	}
	in := newIntent(d.Name, "coalesce")
	in.Steps = append(undoable, forward...)
	in.NoReturn = len(undoable)
	for _, st := range in.Steps {
		in.Live = in.Live || isLiveStep(st.Kind)
	}
	put := repointSnapshots(own, map[string]string{r.Removed: r.Kept}, next)
	collected, err := m.collect(next, own, u, d.Images, nil)
	if err != nil {
		return nil, err
	}
	in.Cleanup = append([]step{{Kind: metastore.StepRemove, Path: r.Removed, Disk: sd.Target}}, collected...)
	in.Commit = &metastore.Commit{Domain: next, PutSnapshots: uniqueSnapshots(put)}
	return &coalescePlan{in: in, merge: Merge{Domain: domainName(d), Disk: sd.Target, Layer: x,
		Action: r.Action, Kept: r.Kept, Removed: r.Removed}}, nil
}

// diskOf names the disk whose chain reads p: a disk's active chain
// first, else a snapshot's.
func diskOf(d *Domain, snaps map[string]*Snapshot, p string) string {
	for _, disk := range d.Disks {
		if slices.Contains(d.Chain(disk.Active), p) {
			return disk.Target
		}
	}
	names := make([]string, 0, len(snaps))
	for n := range snaps {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		for _, sd := range snaps[n].Disks {
			if sd.Image != "" && slices.Contains(d.Chain(sd.Image), p) {
				return sd.Target
			}
		}
	}
	return ""
}

// cloneSnapshots copies records deep enough for a plan to rewrite them.
func cloneSnapshots(snaps map[string]*Snapshot) map[string]*Snapshot {
	out := make(map[string]*Snapshot, len(snaps))
	for n, s := range snaps {
		c := *s
		c.Disks = slices.Clone(s.Disks)
		out[n] = &c
	}
	return out
}

// ChainTooLongError: a snapshot would give a disk's chain more layers
// than its pool allows (PoolConfig.MaxDepth), even after coalescing. It
// names every layer under the new one and what holds it there. It wraps
// ErrOperationInvalid (VIR_ERR_OPERATION_INVALID, 55): the request is
// sound but not in the chain's present state; libvirt has no code of
// its own for it.
type ChainTooLongError struct {
	Domain string
	Disk   string
	// Depth is the layers the chain would have; Max the pool's limit.
	Depth, Max int
	Pool       string
	// Held are the layers the new overlay would sit on, top first.
	Held []HeldLayer
}

// HeldLayer is one layer of a chain too long and why it stays.
type HeldLayer struct {
	Path string `json:"path"`
	// Snapshots hold their data in it: external ones their state,
	// internal ones inside it.
	Snapshots []string `json:"snapshots,omitempty"`
	// Why says what holds it, in words.
	Why string `json:"why"`
}

func (e *ChainTooLongError) Error() string {
	var held []string
	for _, h := range e.Held {
		held = append(held, h.Path+" ("+h.Why+")")
	}
	return fmt.Sprintf("%s: disk %s of domain %s: a snapshot would make a chain of %d layers, and pool %s allows %d (max_depth); merging what nothing needs left it there. The layers it would sit on: %s",
		ErrOperationInvalid, e.Disk, e.Domain, e.Depth, e.Pool, e.Max, strings.Join(held, "; "))
}

func (e *ChainTooLongError) Unwrap() error { return ErrOperationInvalid }

// tooDeep finds the first external disk of a planned snapshot whose
// chain, new overlay included, is longer than its pool allows; nil when
// none is. next is the domain after the snapshot.
func (m *Manager) tooDeep(next *Domain, snap *Snapshot) *ChainTooLongError {
	for _, sd := range snap.Disks {
		if sd.Mode != DiskExternal {
			continue
		}
		p, err := m.poolOf(sd.Overlay)
		if err != nil {
			continue // planOverlay refused it already
		}
		if depth := len(next.Chain(sd.Overlay)); depth > p.maxDepth() {
			return &ChainTooLongError{Domain: domainName(next), Disk: sd.Target, Depth: depth, Max: p.maxDepth(), Pool: p.Name}
		}
	}
	return nil
}

// explainDepth fills e.Held: for each layer of the disk's chain now,
// what keeps it there.
func (m *Manager) explainDepth(ctx context.Context, e *ChainTooLongError, d *Domain, snaps map[string]*Snapshot, live Live) error {
	disk := d.Disk(e.Disk)
	if disk == nil {
		return nil
	}
	u, err := m.scanUsers(ctx)
	if err != nil {
		return err
	}
	names := make([]string, 0, len(snaps))
	for n := range snaps {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, p := range d.Chain(disk.Active) {
		h := HeldLayer{Path: p}
		var why []string
		if p == disk.Active {
			why = append(why, "the active layer, the new snapshot's state")
		}
		var ext, in []string
		for _, n := range names {
			for _, sd := range snaps[n].Disks {
				switch {
				case sd.Image != p:
				case sd.Mode == DiskExternal:
					ext = append(ext, n)
				case sd.Mode == DiskInternal:
					in = append(in, n)
				}
			}
		}
		if len(ext) > 0 {
			why = append(why, "the state of snapshot "+strings.Join(ext, ", "))
		}
		if len(in) > 0 {
			why = append(why, "holds internal snapshot "+strings.Join(in, ", "))
		}
		h.Snapshots = append(ext, in...)
		if len(why) == 0 {
			why = append(why, m.keptBecause(ctx, d, snaps, u, p, live))
		}
		h.Why = strings.Join(why, "; ")
		e.Held = append(e.Held, h)
	}
	return nil
}

// keptBecause says why coalescing leaves the idle layer p.
func (m *Manager) keptBecause(ctx context.Context, d *Domain, snaps map[string]*Snapshot, u *users, p string, live Live) string {
	img := d.Images[p]
	if img == nil {
		return "not in the records"
	}
	if img.Detached {
		return "the data of a disk that left the definition"
	}
	if len(d.Children(p)) != 1 {
		return fmt.Sprintf("backs %d images", len(d.Children(p)))
	}
	next := d.Clone()
	r := DiskReport{}
	sd := SnapshotDisk{Target: diskOf(d, snaps, p), Mode: DiskExternal, Image: p, Format: img.Format}
	own := cloneSnapshots(snaps)
	if _, _, err := m.planMerge(ctx, next, sd, u, needs(next, own, ""), externalClaims(own, ""), live, &r); err != nil {
		return err.Error()
	}
	switch r.Action {
	case ActionSharedBase:
		return "also used by " + DescribeUsers(r.Users)
	case ActionInternalAbove:
		return "its child holds internal snapshots, which a merge would change"
	case ActionUserImage:
		return "the user's image, and its child cannot be merged into it"
	}
	return string(r.Action)
}

package driver

import (
	"context"
	"fmt"

	"github.com/hashicorp/go-multierror"

	"github.com/xlsnap/xlsnap/storage"
	"github.com/xlsnap/xlsnap/xenlight"
)

// CoalesceFlags change what Coalesce does. libvirt has no such call (its
// drivers merge only when asked, with blockcommit and blockpull); the
// flags are xlsnap's own.
type CoalesceFlags uint32

const (
	// CoalesceDryRun changes nothing: the report lists the merges
	// Coalesce would make, each judged as if it were the only one.
	CoalesceDryRun CoalesceFlags = 1 << 0
)

const coalesceKnown = CoalesceDryRun

// ReasonCoalesce: a layer nothing needed was merged out of the chain, by
// Coalesce or after the delete or revert that freed it (a ChainEvent of
// its own, after that operation's).
const ReasonCoalesce ChainReason = "coalesce"

// Merge is one layer Coalesce merged away (or, with CoalesceDryRun,
// would): Layer is the image nothing needed for its own view, merged
// with its only child (Action merged-down: the child was committed into
// it; pulled-up: it was pulled into the child); Kept holds the merged
// data, Removed is the name that went.
type Merge struct {
	Domain  string
	Disk    string
	Layer   string
	Action  DiskAction
	Kept    string
	Removed string
}

// CoalesceReport is what Coalesce did (or would do), merge by merge.
type CoalesceReport struct {
	DryRun bool
	Merges []Merge
}

// ChainTooLongError is a snapshot refused because a disk's chain, new
// overlay included, would be longer than its pool's depth limit even
// after coalescing (storage.PoolConfig.MaxDepth; Config.MaxDepth and
// Config.PoolMaxDepth set it). It names every layer the new overlay
// would sit on and what holds each there. It wraps ErrOperationInvalid
// (VIR_ERR_OPERATION_INVALID, 55).
type ChainTooLongError = storage.ChainTooLongError

// HeldLayer is one layer of a chain too long and why it stays.
type HeldLayer = storage.HeldLayer

// Coalesce merges away every layer of a domain's chains ("" for every
// domain of the source) that no snapshot, no other image and no other
// domain needs: no disk writes it and no snapshot holds its state in it,
// and a merge with its only child changes what nothing sees (the rule of
// SnapshotDelete's merges: the cheaper direction, block jobs through the
// device model for a running domain, every merge journaled). A delete or
// revert already merges what it frees; this is for what is left (layers
// a NO_METADATA snapshot left, a clone's base once the clone is gone, an
// operation a crash cut short). The definition follows the merges. Every
// domain is tried, one's failure reported with the others' (joined).
//
// Errors: ErrInvalidArg (VIR_ERR_INVALID_ARG, 8) for unknown flags;
// those of SnapshotDelete's merges; and those of every call that
// changes something (see the package documentation).
func (d *Driver) Coalesce(ctx context.Context, domain string, flags CoalesceFlags) (*CoalesceReport, error) {
	if err := checkFlags("Coalesce", flags, coalesceKnown); err != nil {
		return nil, err
	}
	rep := &CoalesceReport{DryRun: flags&CoalesceDryRun != 0, Merges: []Merge{}}
	if domain != "" {
		return rep, d.coalesce(ctx, domain, flags, rep)
	}
	names, err := d.src.Domains(ctx)
	if err != nil {
		return nil, err
	}
	var errs error
	for _, n := range names {
		if err := d.coalesce(ctx, n, flags, rep); err != nil {
			errs = multierror.Append(errs, fmt.Errorf("domain %s: %w", n, err))
		}
	}
	return rep, errs
}

func (d *Driver) coalesce(ctx context.Context, domain string, flags CoalesceFlags, rep *CoalesceReport) error {
	ctx, unlock, err := d.lockCall(ctx, domain)
	if err != nil {
		return err
	}
	defer unlock()
	v, err := d.sync(ctx, domain)
	if err != nil {
		return err
	}
	opts := storage.CoalesceOptions{DryRun: flags&CoalesceDryRun != 0}
	var live *xenlight.Live
	if v.src.State.Active() {
		if live, err = d.live(v, "a coalesce"); err != nil {
			return err
		}
		defer live.Hold()()
		opts.Live = live
	}
	r, err := d.st.Coalesce(ctx, v.key, opts)
	if r != nil {
		rep.Merges = append(rep.Merges, mergesOf(r.Merges)...)
	}
	if err != nil || opts.DryRun || r == nil || len(r.Merges) == 0 {
		return err
	}
	if err := d.afterChange(ctx, v); err != nil {
		return err
	}
	if live != nil {
		return d.verifyLive(ctx, v, live)
	}
	return nil
}

func mergesOf(in []storage.Merge) []Merge {
	var out []Merge
	for _, m := range in {
		out = append(out, Merge{Domain: m.Domain, Disk: m.Disk, Layer: m.Layer, Action: DiskAction(m.Action), Kept: m.Kept, Removed: m.Removed})
	}
	return out
}

// mergeableLayers lists the layers of a domain a coalesce would merge
// now: what a revert must leave alone when it coalesces only what it
// freed (storage.CoalesceOptions.Except).
func (d *Driver) mergeableLayers(ctx context.Context, v *domainView, live storage.Live) ([]string, error) {
	r, err := d.st.Coalesce(ctx, v.key, storage.CoalesceOptions{DryRun: true, Live: live})
	if err != nil {
		return nil, err
	}
	var out []string
	for _, m := range r.Merges {
		out = append(out, m.Layer)
	}
	return out, nil
}

// coalesceFreed merges, once a reverted domain runs again (running: its
// device model does the merges), the layers its revert freed: all but
// before. The revert itself is done whatever this returns.
func (d *Driver) coalesceFreed(ctx context.Context, v *domainView, before []string, running bool) error {
	opts := storage.CoalesceOptions{Except: before}
	if running {
		live, err := d.live(v, "a coalesce")
		if err != nil {
			return err
		}
		opts.Live = live
	}
	r, err := d.st.Coalesce(ctx, v.key, opts)
	if err == nil && r != nil && len(r.Merges) > 0 {
		err = d.afterChange(ctx, v)
	}
	if err != nil {
		return fmt.Errorf("reverted; merging the layers the revert freed (xlsnap check lists them, coalesce merges them): %w", err)
	}
	return nil
}

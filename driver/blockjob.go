package driver

import (
	"context"
	"fmt"

	"github.com/xlsnap/xlsnap/storage"
	"github.com/xlsnap/xlsnap/xenlight"
)

// BlockCommitFlags are virDomainBlockCommitFlags.
type BlockCommitFlags uint32

const (
	BlockCommitShallow        BlockCommitFlags = 1 << 0 // VIR_DOMAIN_BLOCK_COMMIT_SHALLOW
	BlockCommitDelete         BlockCommitFlags = 1 << 1 // VIR_DOMAIN_BLOCK_COMMIT_DELETE
	BlockCommitActive         BlockCommitFlags = 1 << 2 // VIR_DOMAIN_BLOCK_COMMIT_ACTIVE
	BlockCommitRelative       BlockCommitFlags = 1 << 3 // VIR_DOMAIN_BLOCK_COMMIT_RELATIVE
	BlockCommitBandwidthBytes BlockCommitFlags = 1 << 4 // VIR_DOMAIN_BLOCK_COMMIT_BANDWIDTH_BYTES
)

// BlockPullFlags are virDomainBlockPullFlags.
type BlockPullFlags uint32

// BlockPullBandwidthBytes is VIR_DOMAIN_BLOCK_PULL_BANDWIDTH_BYTES.
const BlockPullBandwidthBytes BlockPullFlags = 1 << 6

// BlockRebaseFlags are virDomainBlockRebaseFlags.
type BlockRebaseFlags uint32

const (
	BlockRebaseShallow        BlockRebaseFlags = 1 << 0 // VIR_DOMAIN_BLOCK_REBASE_SHALLOW
	BlockRebaseReuseExt       BlockRebaseFlags = 1 << 1 // VIR_DOMAIN_BLOCK_REBASE_REUSE_EXT
	BlockRebaseCopyRaw        BlockRebaseFlags = 1 << 2 // VIR_DOMAIN_BLOCK_REBASE_COPY_RAW
	BlockRebaseCopy           BlockRebaseFlags = 1 << 3 // VIR_DOMAIN_BLOCK_REBASE_COPY
	BlockRebaseRelative       BlockRebaseFlags = 1 << 4 // VIR_DOMAIN_BLOCK_REBASE_RELATIVE
	BlockRebaseCopyDev        BlockRebaseFlags = 1 << 5 // VIR_DOMAIN_BLOCK_REBASE_COPY_DEV
	BlockRebaseBandwidthBytes BlockRebaseFlags = 1 << 6 // VIR_DOMAIN_BLOCK_REBASE_BANDWIDTH_BYTES
)

// The bits xlsnap's block jobs take. A bandwidth-bytes bit only says how
// to read a bandwidth, and the bandwidth must be 0; the rest (DELETE,
// which libvirt's QEMU driver refuses too; RELATIVE: xlsnap writes
// absolute backing references; the copy bits of blockcopy) are refused.
const (
	blockCommitKnown = BlockCommitShallow | BlockCommitActive | BlockCommitBandwidthBytes
	blockPullKnown   = BlockPullBandwidthBytes
	blockRebaseKnown = BlockRebaseBandwidthBytes
)

// BlockJobReport says what a block commit or pull did to one disk.
type BlockJobReport struct {
	Disk string
	// Top and Base are the images the job went between: a commit's,
	// or a pull's active layer and new backing image ("" for a whole
	// pull).
	Top, Base string
	// Active is the disk's active layer afterwards (Base after an active
	// commit: libvirt's pivot); Chain the disk's chain, top to base.
	Active string
	Chain  []string
	// Removed are images that left the chain which xlsnap created and
	// nothing uses any more: removed once the definition named the new
	// chain. Kept are those that stay: the user's own (libvirt never
	// removes them either) and those a snapshot or another user reads.
	Removed []string
	Kept    []string
	// Unchanged says there was nothing to do (a pull from the image just
	// below the active layer).
	Unchanged bool
}

func blockJobReportOf(r *storage.BlockJobReport) *BlockJobReport {
	return &BlockJobReport{Disk: r.Disk, Top: r.Top, Base: r.Base, Active: r.Active, Chain: r.Chain,
		Removed: r.Removed, Kept: r.Kept, Unchanged: r.Unchanged}
}

// BlockCommit is virDomainBlockCommit: the data of top (the active layer
// when "") and of every image between it and base (the bottom of the
// chain when "", top's backing image with BlockCommitShallow) is
// committed into base, and those images leave the disk's chain. disk is
// a target (xvda) or the path of the disk's active image, as libvirt
// takes either; top and base are image paths. Committing the active
// layer needs BlockCommitActive, and xlsnap then completes the job by
// switching the disk to base (libvirt's pivot, virDomainBlockJobAbort
// with VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT): it cannot keep a job in its
// synchronized phase past the call. The call returns when the job is
// done.
//
// A running or paused domain's disk is committed by its device model
// (QMP block-commit, job-complete once ready); a shut-off domain's with
// qemu-img commit -b (libvirt's QEMU driver refuses those with "domain
// is not running": xlsnap does them). Images that left the chain are
// removed if xlsnap created them and nothing uses them, after the
// definition names the new chain; the user's stay, as libvirt leaves
// them. See storage.Manager.BlockCommit for the rules.
//
// Errors, before anything changes: ErrInvalidArg (VIR_ERR_INVALID_ARG, 8)
// for flags xlsnap does not take (DELETE, RELATIVE), and, in libvirt's
// qemuDomainBlockCommit's words, for a disk, top or base not in the
// chain, the active layer without BlockCommitActive, BlockCommitActive
// with another top, and BlockCommitShallow with another base;
// ErrUnsupported (VIR_ERR_CONFIG_UNSUPPORTED, 67) for a bandwidth limit;
// ErrOperationInvalid (VIR_ERR_OPERATION_INVALID, 55), a
// *storage.ConflictError naming each image and its users, when base or
// an image leaving the chain is read by a snapshot, another image, disk
// or domain, or holds internal snapshots it would lose; and those of
// every call that changes something (see the package documentation).
func (d *Driver) BlockCommit(ctx context.Context, domain, disk, base, top string, bandwidth uint64, flags BlockCommitFlags) (*BlockJobReport, error) {
	if err := checkFlags("virDomainBlockCommit", flags, blockCommitKnown); err != nil {
		return nil, err
	}
	if err := noBandwidth(bandwidth); err != nil {
		return nil, err
	}
	opts := storage.BlockCommitOptions{Base: base, Top: top, Shallow: flags&BlockCommitShallow != 0, Active: flags&BlockCommitActive != 0}
	return d.blockJob(ctx, domain, "a block commit", func(ctx context.Context, v *domainView, live storage.Live) (*storage.BlockJobReport, error) {
		opts.Live = live
		return d.st.BlockCommit(ctx, v.key, disk, opts)
	})
}

// BlockPull is virDomainBlockPull: the data of every image below disk's
// active layer is copied into it, which then stands alone. What the
// guest reads does not change. A running or paused domain's disk is
// pulled by its device model (QMP block-stream), a shut-off domain's by
// qemu-img rebase -b "" (safe mode). The images that left the disk's
// chain stay while a snapshot or another user reads them; those xlsnap
// created that nothing needs are removed, the user's kept. The call
// returns when the job is done.
//
// Errors, before anything changes: ErrInvalidArg (8) for flags other
// than VIR_DOMAIN_BLOCK_PULL_BANDWIDTH_BYTES and a disk not in the
// domain; ErrUnsupported (67) for a bandwidth limit;
// ErrOperationInvalid (55), a *storage.ConflictError, when the active
// layer holds internal snapshots (they would lose the images below them)
// or another domain reads it; and those of every call that changes
// something.
func (d *Driver) BlockPull(ctx context.Context, domain, disk string, bandwidth uint64, flags BlockPullFlags) (*BlockJobReport, error) {
	if err := checkFlags("virDomainBlockPull", flags, blockPullKnown); err != nil {
		return nil, err
	}
	return d.pull(ctx, domain, disk, "", bandwidth)
}

// BlockRebase is virDomainBlockRebase's pull: BlockPull that stops at
// base, which becomes the active layer's backing image ("" pulls the
// whole chain). The copy forms of the call (blockcopy) are not xlsnap's:
// their flags are ErrInvalidArg (8), as are SHALLOW, REUSE_EXT and
// RELATIVE. Errors otherwise as BlockPull's, and ErrInvalidArg for a
// base that is not below the active layer in the chain.
func (d *Driver) BlockRebase(ctx context.Context, domain, disk, base string, bandwidth uint64, flags BlockRebaseFlags) (*BlockJobReport, error) {
	if err := checkFlags("virDomainBlockRebase", flags, blockRebaseKnown); err != nil {
		return nil, err
	}
	return d.pull(ctx, domain, disk, base, bandwidth)
}

func (d *Driver) pull(ctx context.Context, domain, disk, base string, bandwidth uint64) (*BlockJobReport, error) {
	if err := noBandwidth(bandwidth); err != nil {
		return nil, err
	}
	return d.blockJob(ctx, domain, "a block pull", func(ctx context.Context, v *domainView, live storage.Live) (*storage.BlockJobReport, error) {
		return d.st.BlockPull(ctx, v.key, disk, storage.BlockPullOptions{Base: base, Live: live})
	})
}

// noBandwidth refuses a bandwidth limit: neither qemu-img commit/rebase
// nor xlsnap's block jobs take one.
func noBandwidth(bandwidth uint64) error {
	if bandwidth != 0 {
		return fmt.Errorf("%w: a bandwidth limit (%d) on a block job: xlsnap's block jobs run at full speed", ErrUnsupported, bandwidth)
	}
	return nil
}

// blockJob runs a block job on a domain brought in line with its
// definition, through the device model when the domain is active, and
// re-reads the definition the job's definition step rewrote. job gets
// the context that carries the call's lock: storage takes it no second
// time (with the caller's own, it would wait for itself).
func (d *Driver) blockJob(ctx context.Context, domain, what string, job func(ctx context.Context, v *domainView, live storage.Live) (*storage.BlockJobReport, error)) (*BlockJobReport, error) {
	ctx, unlock, err := d.lockCall(ctx, domain)
	if err != nil {
		return nil, err
	}
	defer unlock()
	v, err := d.sync(ctx, domain)
	if err != nil {
		return nil, err
	}
	var live storage.Live
	var l *xenlight.Live
	if v.src.State.Active() {
		if l, err = d.live(v, what); err != nil {
			return nil, err
		}
		// The job and the queries that check it share one connection.
		defer l.Hold()()
		live = l
	}
	r, err := job(ctx, v, live)
	if err != nil {
		return nil, err
	}
	if r.Unchanged {
		return blockJobReportOf(r), nil
	}
	if err := d.afterChange(ctx, v); err != nil {
		return blockJobReportOf(r), err
	}
	if l != nil {
		return blockJobReportOf(r), d.verifyLive(ctx, v, l)
	}
	return blockJobReportOf(r), nil
}

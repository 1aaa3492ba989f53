package driver

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"time"

	"github.com/xlsnap/xlsnap/storage"
)

// ChainEdit is an edit of one disk's chain a toolstack is about to make
// itself, outside xlsnap: what ChainChanging checks and holds the domain
// for. Paths name images of the disk's chain, absolute or relative to
// the working folder (another name of the same file does too).
type ChainEdit struct {
	// Moves: images copied or moved to other files (Move.From may also
	// be a folder holding layers, as ChainChanged takes it). The old file
	// may stay (a copy).
	Moves []Move
	// Commits: images whose data will be committed into their backing
	// image (qemu-img commit), which then backs the image above.
	Commits []string
	// Pulls: images whose data will be pulled up into the image above
	// them (qemu-img rebase of that image onto their backing image).
	Pulls []string
	// Rewrites: images whose header will be rewritten in place (qemu-img
	// amend, qemu-img rebase -u), their data left as it is.
	Rewrites []string
}

// ChainHold is a disk's chain held for an outside edit: what
// ChainChanging checked and until when the domain is held.
type ChainHold struct {
	Domain string `json:"domain"`
	// Disk is the disk's target.
	Disk string `json:"disk"`
	// ID names the hold; Host the host that holds it (Config.Host).
	ID   string `json:"id"`
	Host string `json:"host"`
	// Until is when the hold lapses, by this host's clock.
	Until time.Time `json:"until"`
	// Chain is the disk's chain as checked, top to base.
	Chain []string `json:"chain"`
	// Checked says, one line per planned change, what was checked and
	// found safe.
	Checked []string `json:"checked"`
}

// HeldError is a call refused, or given up, because its domain is held
// for an outside edit (ChainChanging): it names the hold (disk, ID,
// host, expiry) and wraps ErrBusy (VIR_ERR_OPERATION_TIMEOUT, 68,
// libvirt's "cannot acquire state change lock") and, for a writer whose
// context ended while it waited, the context's error.
type HeldError = storage.HeldError

// MaxHold is the longest hold ChainChanging grants.
const MaxHold = 24 * time.Hour

// ChainChanging is the first phase of the two-phase hook the Xen-devel
// review of libxl's snapshot API asked for: the toolstack tells xlsnap
// that a chain in a domain "was to be changed", edits it, then says it
// "has changed" (ChainChanged, which rescans and makes the device model
// follow). libvirt and libxl have no such call.
//
// ChainChanging checks, before anything changes, that plan (the edit
// about to be made to the chain of disk, a target such as "xvda") is
// safe: the chain on disk must be the recorded one (and, for an active
// domain, the one the device model reads); the active layer is never
// moved or merged, nor changed at all while the device model writes it
// (a shut-off domain's may have its header rewritten); a running guest
// reads every layer, so a merge or a header rewrite of an active domain
// is refused (xlsnap's snapshot-delete, blockcommit and blockpull merge
// through the device model), while a move (copy) of a backing layer is
// allowed; for a domain that is shut off, a commit, pull or rewrite is
// allowed only where no snapshot, image, disk or domain other than the
// chain above reads what it changes, found by a scan of every user
// (storage.CheckChainEdit has the rules). A refusal changes nothing.
//
// Then it holds the domain, in its metadata record, so every process
// and every host sharing the store sees it, until ChainChanged for the
// same domain and disk ends the hold, or until timeout (more than 0, at
// most MaxHold) has passed. While held, every call that changes the
// domain waits for the hold to end, with no lock taken, as long as its
// context lets, then fails with a *HeldError; reads (snapshot lists,
// info, XML, DiskList from the records as they stand, Check without
// repair) go on. A hold past its expiry binds no one and is cleared by
// the next writer. Check with repair does not wait (storage's Repair
// rescans every chain that changed, a held one too): run it outside an
// edit.
//
// Errors: ErrInvalidArg (VIR_ERR_INVALID_ARG, 8) for a timeout out of
// range, an empty plan, no such disk, an image not of the disk's chain,
// an image named twice, merges touching one layer, a commit of the base,
// a pull of the active layer, a move onto the chain; ErrOperationInvalid
// (VIR_ERR_OPERATION_INVALID, 55) for what the domain's state or the
// images' users forbid (a *storage.ConflictError naming the users where
// they are the reason); ErrUnsafeBacking (VIR_ERR_CONFIG_UNSUPPORTED,
// 67) for a move out of the pools; ErrChainBroken (9) for a chain on
// disk that differs from the records (rescan first); a *HeldError
// (ErrBusy, 68), at once, when the domain is held already; for an active
// domain, ErrLiveUnsupported (84) without a hypervisor back end and
// xenlight's MismatchError (9) where the device model reads another
// chain; and those of every call that changes something.
func (d *Driver) ChainChanging(ctx context.Context, domain, disk string, plan ChainEdit, timeout time.Duration) (*ChainHold, error) {
	if timeout <= 0 || timeout > MaxHold {
		return nil, invalidf("hold timeout %v: want more than 0 and at most %v", timeout, MaxHold)
	}
	ctx, unlock, err := d.lockCallFor(ctx, domain, holdPolicy{refuse: true})
	if err != nil {
		return nil, err
	}
	defer unlock()
	v, err := d.sync(ctx, domain)
	if err != nil {
		return nil, err
	}
	active := v.src.State.Active()
	if active {
		live, err := d.live(v, "an outside edit")
		if err != nil {
			return nil, err
		}
		// The records must be what the device model reads, or the check
		// below would judge another chain.
		if err := d.verifyLive(ctx, v, live); err != nil {
			return nil, err
		}
	}
	edit := storage.ChainEdit{Commits: plan.Commits, Pulls: plan.Pulls, Rewrites: plan.Rewrites}
	for _, m := range plan.Moves {
		edit.Moves = append(edit.Moves, storage.PathMove{From: m.From, To: m.To})
	}
	check, err := d.st.CheckChainEdit(ctx, v.key, disk, edit, active)
	if err != nil {
		return nil, err
	}
	id, err := newHoldID()
	if err != nil {
		return nil, err
	}
	now := time.Now()
	h := storage.Hold{ID: id, Disk: check.Disk, Host: d.st.Host(), Since: now, Until: now.Add(timeout), Merges: check.Merges}
	if err := d.st.PutHold(ctx, v.key, h); err != nil {
		return nil, err
	}
	return &ChainHold{Domain: v.src.Name, Disk: h.Disk, ID: h.ID, Host: h.Host, Until: h.Until,
		Chain: check.Chain, Checked: check.Checked}, nil
}

func newHoldID() (string, error) {
	var b [8]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", err
	}
	return hex.EncodeToString(b[:]), nil
}

// holdPolicy says what a call does when its domain is held for an
// outside edit (ChainChanging).
type holdPolicy struct {
	// release is the disk whose hold the call ends (ChainChanged): that
	// hold does not stop it.
	release string
	// refuse fails at once with the *HeldError instead of waiting: a
	// second announcement, or a read that answers from the records.
	refuse bool
}

// heldBy returns the hold that stops a call under p, nil when none;
// ctx carries the domain's lock, under which an expired hold is cleared.
func (d *Driver) heldBy(ctx context.Context, key string, p holdPolicy) (*HeldError, error) {
	h, name, err := d.st.HoldOf(ctx, key)
	if errors.Is(err, storage.ErrNoDomain) || err == nil && h == nil {
		return nil, nil // a domain storage has not seen yet holds nothing
	}
	if err != nil {
		return nil, err
	}
	if p.release != "" && h.Disk == p.release {
		return nil, nil // expired or not, the call ends it (and records its merges)
	}
	if h.Expired(time.Now()) {
		return nil, d.st.ClearHold(ctx, key, h.ID)
	}
	return &HeldError{Domain: name, Hold: *h}, nil
}

// Bounds of the wait for a hold's release: it is a write to the record,
// in bbolt or etcd alike, so the waiter reads the record again, sooner
// at first (a rescan often follows at once), then once a second.
const (
	holdLookFirst = 20 * time.Millisecond
	holdLookMax   = time.Second
)

// HoldWait bounds how long a writer waits for a hold's release before
// it fails with a *HeldError (VIR_ERR_OPERATION_TIMEOUT, 68): libvirt's
// wait for a domain's job (VIR_JOB_WAIT_TIME in src/hypervisor/
// domain_job.h, 30 s), so a writer learns of a long edit as a libvirt
// client learns of a long job.
var HoldWait = 30 * time.Second

// waitHold waits, holding no lock, until the hold held names is
// released, replaced or expired; when ctx ends first it returns held
// with the context's error, when HoldWait passes first held alone.
func (d *Driver) waitHold(ctx context.Context, key string, held *HeldError) error {
	giveUp := time.NewTimer(HoldWait)
	defer giveUp.Stop()
	for delay := holdLookFirst; ; delay = min(2*delay, holdLookMax) {
		left := time.Until(held.Hold.Until)
		if left <= 0 {
			return nil
		}
		t := time.NewTimer(min(delay, left))
		select {
		case <-giveUp.C:
			t.Stop()
			return held
		case <-ctx.Done():
			t.Stop()
			held.Err = ctx.Err()
			return held
		case <-t.C:
		}
		h, _, err := d.st.HoldOf(ctx, key)
		if ctx.Err() != nil {
			held.Err = ctx.Err()
			return held
		}
		if errors.Is(err, storage.ErrNoDomain) || err == nil && (h == nil || h.ID != held.Hold.ID) {
			return nil
		}
		if err != nil {
			return err
		}
	}
}

// releaseHold ends the hold of disk, if the domain has one (ChainChanged).
func (d *Driver) releaseHold(ctx context.Context, domain, disk string) error {
	_, _, key, err := d.readDefinition(ctx, domain)
	if err != nil {
		return nil // no definition: the call's own error says so
	}
	if _, err := d.st.ReleaseHold(ctx, key, disk); err != nil && !errors.Is(err, storage.ErrNoDomain) {
		return fmt.Errorf("releasing the hold of disk %s of %s: %w", disk, domain, err)
	}
	return nil
}

// heldNote words a hold for a read that answers from the records as they
// stand while the chain is being edited.
func heldNote(held *HeldError) error {
	return fmt.Errorf("the chain of disk %s is held for an outside edit (chain-changing, hold %s from host %s) until %s: shown as recorded",
		held.Hold.Disk, held.Hold.ID, held.Hold.Host, held.Hold.Until.UTC().Format(time.RFC3339))
}

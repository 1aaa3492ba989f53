package driver

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/xlsnap/xlsnap/errdefs"
	"github.com/xlsnap/xlsnap/internal/qemuimg"
	"github.com/xlsnap/xlsnap/xenlight"
)

// Move says an image was moved from one path to another (a folder
// renamed, a base copied to other storage).
type Move struct{ From, To string }

// ChainChanged is the public "a chain changed, rescan" call: rescan a
// disk's chain after someone else edited it, update metadata and every
// snapshot record that names a moved image (moves, and any recorded
// layer that is gone where the chain on disk has a new one), tell
// subscribers (Subscribe), and rewrite the definition if the active layer
// moved. libvirt has no such call: its drivers trust the chain they
// built.
//
// For an active domain the device model is made to read the recorded
// chain (xenlight.Live.Follow: new backing nodes, blockdev-reopen,
// change-backing-file), so backing images may be copied to other
// storage while the guest runs: a move whose old file is still there is
// such a copy, checked first to hold the same data as the layer
// (qemu-img compare, backing files left out), and once the call returns
// the old files may be removed. The active layer itself cannot move
// while the device model writes it.
//
// It is the second phase of the two-phase hook (ChainChanging is the
// first): it ends the disk's hold, also when it fails, since the
// toolstack's edit is done either way and its error says what differs;
// the domain's writers need not wait out the hold's expiry. Images the
// hold announced as merged away that no record reads any more leave
// the records. A hold of another disk of the domain makes it wait, as
// every call that changes something.
//
// Errors: ErrInvalidArg (VIR_ERR_INVALID_ARG, 8) for no such disk, a
// move of an image the domain never had or that is not the old one
// moved, and a copy that differs from its layer; ErrOperationInvalid
// (55) for a move of a running disk's active layer; the chain's own
// (ErrUnsafeBacking, VIR_ERR_CONFIG_UNSUPPORTED 67; ErrChainBroken and
// ErrInvalidImage, VIR_ERR_OPERATION_FAILED 9); for an active domain,
// xenlight's MismatchError (ErrChainMismatch, 9) where the device model
// cannot be made to read the chain (it writes another image; its disk
// was opened by -drive, whose nodes cannot be reopened); and those of
// every call that changes something (see the package documentation).
func (d *Driver) ChainChanged(ctx context.Context, domain, disk string, moves ...Move) (err error) {
	ctx, unlock, err := d.lockCallFor(ctx, domain, holdPolicy{release: disk})
	if err != nil {
		return err
	}
	defer unlock()
	defer func() {
		// Also for a caller that gave up: the edit is over.
		if rerr := d.releaseHold(context.WithoutCancel(ctx), domain, disk); err == nil {
			err = rerr
		}
	}()
	mv := map[string]string{}
	for _, m := range moves {
		from, err1 := filepath.Abs(m.From)
		to, err2 := filepath.Abs(m.To)
		if err1 != nil || err2 != nil {
			return invalidf("move %s=%s", m.From, m.To)
		}
		mv[from] = to
	}
	v, err := d.sync(ctx, domain)
	if err != nil {
		if errors.Is(err, ErrChainBroken) {
			for from, to := range mv {
				if _, serr := os.Stat(from); serr != nil {
					return fmt.Errorf("%w; %s was moved away, and an image above still names it: a running domain's backing file is copied, not moved, since only its device model may rewrite that header (rescan --moved has it do so); offline, repoint the image above first (qemu-img rebase -u -b %s)", err, from, to)
				}
			}
		}
		return err
	}
	active := v.src.State.Active()
	var live *xenlight.Live
	if active {
		if live, err = d.live(v, "a rescan"); err != nil {
			return err
		}
		// The running domain reads the old files: it is switched to the
		// copies first, which also makes the headers name them, so the
		// rescan then finds the chain reading the new files.
		layers, err := d.movedLayers(ctx, v.key, disk, mv)
		if err != nil {
			return err
		}
		if layers != nil {
			if err := live.Follow(ctx, disk, layers); err != nil {
				return err
			}
		}
	}
	c, err := d.st.ChainChanged(ctx, v.key, disk, mv)
	if err != nil {
		return err
	}
	if err := d.afterChange(ctx, v); err != nil {
		return err
	}
	if !active {
		return nil
	}
	// The device model must read the chain storage recorded: it is
	// switched to it where it reads another, and where it cannot be the
	// difference is reported exactly (xenlight.MismatchError).
	_, layers, err := d.recordedLayers(ctx, v.key, disk)
	if err != nil {
		return err
	}
	if len(layers) != len(c.Layers) {
		return fmt.Errorf("%w: disk %s: the chain on disk has %d layers, the record %d", errdefs.ErrInternal, disk, len(c.Layers), len(layers))
	}
	return live.Follow(ctx, disk, layers)
}

// recordedLayers is a disk's chain as storage recorded it, top to base,
// with the recorded formats (after moves, the new files), and the
// domain's name for messages.
func (d *Driver) recordedLayers(ctx context.Context, key, disk string) (string, []xenlight.Layer, error) {
	rec, err := d.st.Domain(ctx, key)
	if err != nil {
		return "", nil, err
	}
	dk := rec.Disk(disk)
	if dk == nil {
		return "", nil, invalidf("domain %s has no disk %q", rec.DisplayName, disk)
	}
	var layers []xenlight.Layer
	for _, p := range rec.Chain(dk.Active) {
		img, ok := rec.Images[p]
		if !ok {
			return "", nil, fmt.Errorf("%w: %s of disk %s has no record", errdefs.ErrInternal, p, disk)
		}
		layers = append(layers, xenlight.Layer{Path: p, Format: img.Format})
	}
	return rec.DisplayName, layers, nil
}

// movedLayers is the recorded chain of a running disk with the moves
// applied (an image moved itself, or inside a folder that moved), nil
// when no move touches it. Each copy whose old file is still there must
// hold the layer's data; nothing changes here.
func (d *Driver) movedLayers(ctx context.Context, key, disk string, moves map[string]string) ([]xenlight.Layer, error) {
	if len(moves) == 0 {
		return nil, nil
	}
	name, layers, err := d.recordedLayers(ctx, key, disk)
	if err != nil {
		return nil, err
	}
	touched := false
	for i := range layers {
		p, format := layers[i].Path, layers[i].Format
		np := movedTo(p, moves)
		if np != p {
			if i == 0 {
				return nil, fmt.Errorf("%w: %s is the layer the running domain %s writes on disk %s: it cannot move while the device model writes it",
					errdefs.ErrOperationInvalid, p, name, disk)
			}
			if _, err := os.Stat(np); err != nil {
				return nil, invalidf("moved %s: nothing at %s: %v", p, np, err)
			}
			// What the walk after the switch would refuse is refused
			// before the device model is touched.
			if err := d.st.InPools(np); err != nil {
				return nil, err
			}
			if _, err := os.Stat(p); err == nil {
				var q qemuimg.Runner
				if err := q.SameLayer(ctx, p, np, format); err != nil {
					return nil, fmt.Errorf("%s is not a copy of %s: %w", np, p, err)
				}
			}
			layers[i].Path, touched = np, true
		}
	}
	if !touched {
		return nil, nil
	}
	return layers, nil
}

// movedTo is where p is after the moves: its own, or its folder's.
func movedTo(p string, moves map[string]string) string {
	if n, ok := moves[p]; ok {
		return n
	}
	for o, n := range moves {
		if rel, ok := strings.CutPrefix(p, o+"/"); ok {
			return filepath.Join(n, rel)
		}
	}
	return p
}

// verifyLive ends a live operation, on its Live (whose held connection
// a new one would wait behind: QEMU serves one monitor client at a
// time): the device model must read exactly
// the chains storage recorded for every disk (xenlight.Live.Verify);
// where it does not, the *MismatchError says how, rather than a success
// over a guest that reads something else.
func (d *Driver) verifyLive(ctx context.Context, v *domainView, live *xenlight.Live) error {
	rec, err := d.st.Domain(ctx, v.key)
	if err != nil {
		return err
	}
	want := map[string][]string{}
	for _, dk := range rec.Disks {
		want[dk.Target] = rec.Chain(dk.Active)
	}
	if err := live.Verify(ctx, want); err != nil {
		return fmt.Errorf("after the change of %s: %w", v.src.Name, err)
	}
	return nil
}

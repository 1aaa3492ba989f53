package xenlight

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/xlsnap/xlsnap/errdefs"
	"github.com/xlsnap/xlsnap/storage"
	"github.com/xlsnap/xlsnap/xenlight/qmp"
)

// Live carries out storage's chain changes for one active domain through
// its device model's QMP. It connects for each call and lets go, unless
// held (Hold): then the calls of one operation share a connection.
type Live struct {
	h      Hypervisor
	domain string

	// mu serialises the calls; the rest is the held connection's.
	mu    sync.Mutex
	holds int
	m     *qmp.Monitor
	// kept is query-block's answer on m, kept while nothing changed:
	// no command of ours changed a chain and QEMU sent no event since
	// (seen is the event count it was read at).
	kept []DiskChain
	seen uint64
}

var _ storage.Live = (*Live)(nil)

// NewLive returns the storage.Live of an active domain.
func NewLive(h Hypervisor, domain string) *Live { return &Live{h: h, domain: domain} }

// Hold makes the calls until release share one QMP connection, opened at
// the first of them: an operation's queries and its block job pay for
// one connection, and a query-block answered on it serves the next call
// too while QEMU reports nothing (no event) and no call changed a chain.
// A device model serves one client at a time, so the holder releases it
// as soon as the operation ends; release may be called more than once.
func (l *Live) Hold() (release func()) {
	l.mu.Lock()
	l.holds++
	l.mu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			l.mu.Lock()
			defer l.mu.Unlock()
			if l.holds--; l.holds == 0 {
				l.drop()
			}
		})
	}
}

// drop lets the held connection go. Callers hold l.mu.
func (l *Live) drop() {
	if l.m != nil {
		l.m.Disconnect()
	}
	l.m, l.kept = nil, nil
}

// with runs fn on a connection: the held one (dialled if need be), or
// one of its own. A failure drops what was kept: the connection may be
// cut, the chains changed.
func (l *Live) with(ctx context.Context, fn func(m *qmp.Monitor) error) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.holds > 0 {
		if l.m != nil && l.m.Closed() {
			l.drop()
		}
		if l.m == nil {
			m, err := l.h.DeviceModel(ctx, l.domain)
			if err != nil {
				return err
			}
			l.m = m
		}
		err := fn(l.m)
		if err != nil {
			l.drop()
		}
		return err
	}
	m, err := l.h.DeviceModel(ctx, l.domain)
	if err != nil {
		return err
	}
	defer m.Disconnect()
	return fn(m)
}

// DiskChain is one disk as the device model sees it: its top node and
// the files of its chain, top to base.
type DiskChain struct {
	Node  string
	Files []string
}

type imageInfo struct {
	Filename string     `json:"filename"`
	Backing  *imageInfo `json:"backing-image"`
}

// Chains reads every disk's chain from the device model (query-block).
func Chains(ctx context.Context, m *qmp.Monitor) ([]DiskChain, error) {
	var blocks []struct {
		Inserted *struct {
			Node  string    `json:"node-name"`
			Image imageInfo `json:"image"`
		} `json:"inserted"`
	}
	if err := m.Execute(ctx, "query-block", nil, &blocks); err != nil {
		return nil, err
	}
	var out []DiskChain
	for _, b := range blocks {
		if b.Inserted == nil {
			continue
		}
		dc := DiskChain{Node: b.Inserted.Node}
		for img := &b.Inserted.Image; img != nil; img = img.Backing {
			dc.Files = append(dc.Files, img.Filename)
		}
		out = append(out, dc)
	}
	return out, nil
}

func (l *Live) chains(ctx context.Context) ([]DiskChain, error) {
	var out []DiskChain
	err := l.with(ctx, func(m *qmp.Monitor) error {
		var err error
		out, err = l.chainsOn(ctx, m)
		return err
	})
	return out, err
}

// chainsOn is Chains on m, answered from the held connection's last
// query-block while it still holds (see Hold). Callers hold l.mu.
func (l *Live) chainsOn(ctx context.Context, m *qmp.Monitor) ([]DiskChain, error) {
	if m == l.m && l.kept != nil && m.EventCount() == l.seen {
		return l.kept, nil
	}
	seen := m.EventCount()
	c, err := Chains(ctx, m)
	if err == nil && m == l.m {
		l.kept, l.seen = c, seen
	}
	return c, err
}

// changed forgets the kept chains: a command that changes them was sent.
// Callers hold l.mu.
func (l *Live) changed() { l.kept = nil }

// Writes reports whether a disk writes to image.
func (l *Live) Writes(ctx context.Context, image string) (bool, error) {
	chains, err := l.chains(ctx)
	return slices.ContainsFunc(chains, func(c DiskChain) bool { return c.Files[0] == image }), err
}

// Uses reports whether any disk's chain holds image.
func (l *Live) Uses(ctx context.Context, image string) (bool, error) {
	chains, err := l.chains(ctx)
	return slices.ContainsFunc(chains, func(c DiskChain) bool { return slices.Contains(c.Files, image) }), err
}

// errNotInUse: the device model has no disk chain holding the image,
// which storage's records say it uses.
var errNotInUse = fmt.Errorf("%w: no disk of the device model uses the image", ErrChainMismatch)

// chainOf finds the disk whose chain holds image.
func chainOf(chains []DiskChain, image string) (DiskChain, error) {
	for _, c := range chains {
		if slices.Contains(c.Files, image) {
			return c, nil
		}
	}
	return DiskChain{}, fmt.Errorf("%w: %s", errNotInUse, image)
}

var (
	nodeSeq atomic.Uint32
	// nodeTag tells this process's names from another's: a device model
	// outlives the processes that name its nodes, and a counter alone
	// starts again at 1 in each ("Duplicate nodes with node-name").
	nodeTag = func() string {
		var b [3]byte
		if _, err := rand.Read(b[:]); err != nil {
			return fmt.Sprintf("%06x", os.Getpid()&0xffffff)
		}
		return hex.EncodeToString(b[:])
	}()
)

// nodeName names a new overlay's node or a job: QMP names are short
// identifiers (QEMU takes 31 characters), so a hash of the path
// (jobPrefix, which a later process's adopt looks for), this process's
// tag and a counter.
func nodeName(path string) string {
	return fmt.Sprintf("%s%s%d", jobPrefix(path), nodeTag, nodeSeq.Add(1))
}

// Snapshot runs one QMP transaction over every disk: blockdev-snapshot-sync
// for external ones (QEMU creates the overlay, with the backing format
// written), blockdev-snapshot-internal-sync for internal ones. QEMU undoes
// a failed transaction inside itself but leaves the files of the actions
// that succeeded: those are removed here when QEMU refused it, and left
// to storage's recovery when its answer was lost.
func (l *Live) Snapshot(ctx context.Context, disks []storage.LiveOverlay) error {
	return l.with(ctx, func(m *qmp.Monitor) error {
		chains, err := l.chainsOn(ctx, m)
		if err != nil {
			return err
		}
		var actions []map[string]any
		var created []string
		for _, d := range disks {
			c, err := chainOf(chains, d.Image)
			if err != nil || c.Files[0] != d.Image {
				return fmt.Errorf("%w: disk %s: %s is not the active layer the device model writes", ErrChainMismatch, d.Disk, d.Image)
			}
			if d.Internal != "" {
				actions = append(actions, map[string]any{"type": "blockdev-snapshot-internal-sync",
					"data": map[string]any{"device": c.Node, "name": d.Internal}})
				continue
			}
			if _, err := os.Lstat(d.Overlay); err == nil {
				return fmt.Errorf("%w: overlay %s exists", errdefs.ErrInvalidArg, d.Overlay)
			}
			created = append(created, d.Overlay)
			actions = append(actions, map[string]any{"type": "blockdev-snapshot-sync",
				"data": map[string]any{"node-name": c.Node, "snapshot-file": d.Overlay,
					"snapshot-node-name": nodeName(d.Overlay), "format": d.Format, "mode": "absolute-paths"}})
		}
		l.changed()
		err = m.Execute(ctx, "transaction", map[string]any{"actions": actions}, nil)
		if err != nil {
			// Only a refusal is known to have switched no disk: with the
			// answer lost (the connection cut, the device model killed,
			// a deadline), the guest may be writing the overlays already.
			// Storage's recovery judges them.
			var refused *qmp.Error
			if errors.As(err, &refused) {
				for _, p := range created {
					os.Remove(p)
				}
			}
			return fmt.Errorf("live snapshot of %s: %w", l.domain, err)
		}
		return nil
	})
}

// InternalDelete deletes an internal snapshot of an image a disk uses.
func (l *Live) InternalDelete(ctx context.Context, image, name string) error {
	return l.with(ctx, func(m *qmp.Monitor) error {
		node, err := l.nodeOf(ctx, m, image)
		if err != nil {
			return err
		}
		l.changed()
		return m.Execute(ctx, "blockdev-snapshot-delete-internal-sync", map[string]any{"device": node, "name": name}, nil)
	})
}

// nodeOf finds the format node of an image in a disk's chain. Callers
// hold l.mu.
func (l *Live) nodeOf(ctx context.Context, m *qmp.Monitor, image string) (string, error) {
	chains, err := l.chainsOn(ctx, m)
	if err != nil {
		return "", err
	}
	c, err := chainOf(chains, image)
	if err != nil {
		return "", err
	}
	if c.Files[0] == image {
		return c.Node, nil
	}
	var nodes []struct {
		Node    string `json:"node-name"`
		File    string `json:"file"`
		Drv     string `json:"drv"`
		Backing string `json:"backing_file"`
	}
	if err := m.Execute(ctx, "query-named-block-nodes", map[string]any{"flat": true}, &nodes); err != nil {
		return "", err
	}
	// The format node of image (not its protocol node), as the chain below
	// it says: its backing is the next file of the chain.
	i := slices.Index(c.Files, image)
	for _, n := range nodes {
		if n.File != image || n.Drv == "file" {
			continue
		}
		if i+1 == len(c.Files) || n.Backing == c.Files[i+1] {
			return n.Node, nil
		}
	}
	return "", fmt.Errorf("%w: no node for %s", errNotInUse, image)
}

// Commit runs block-commit of top into base (with every image between):
// an active commit when a disk writes to top, completed through the pivot
// protocol (qmp.Pivot: the guest paused, the job in sync, base flushed,
// pivot's mark made, job-complete, the guest resumed), else an
// intermediate one, after which QEMU repoints top's overlay at base
// itself. Either way base's data is on disk when it returns. A pivot
// whose connection is lost is settled on a new one while the device
// model answers: its job adopted (or found over), the guest resumed.
// With pivot.Marked, an earlier call's pivot is settled first: a top no
// disk reads any more was pivoted from (only its pause may be left).
func (l *Live) Commit(ctx context.Context, top, base string, progress func(float64), pivot storage.Pivot) error {
	return l.with(ctx, func(m *qmp.Monitor) error {
		chains, err := l.chainsOn(ctx, m)
		if err != nil {
			return err
		}
		c, err := chainOf(chains, top)
		if err != nil && errors.Is(err, errNotInUse) && (pivot.Marked || pivot.Resume || pivot.Held) {
			// Pivoted from (by the earlier call, or by another client
			// in its pause): only the guest's pause may be left.
			qp, perr := l.qmpPivot(ctx, pivot, "")
			if perr != nil {
				return perr
			}
			return m.EndPivot(ctx, qp, true)
		}
		if err != nil {
			return err
		}
		var qp *qmp.Pivot
		switch {
		case c.Files[0] == top:
			target, err := l.nodeOf(ctx, m, base)
			if err != nil {
				return err
			}
			if qp, err = l.qmpPivot(ctx, pivot, target); err != nil {
				return err
			}
		case pivot.Marked:
			return fmt.Errorf("%w: the pivot from %s was marked, but the device model writes %s now", ErrChainMismatch, top, c.Files[0])
		}
		l.changed()
		if qp != nil && qp.Marked {
			// An earlier call's job first: no new job may run under
			// its mark (Backing would not hold the guest's writes).
			done, err := settle(ctx, m, top, progress, qp)
			if err != nil || done {
				return err
			}
		}
		job := qmp.Job{ID: nodeName("commit" + top), Progress: percent(progress), Pivot: qp}
		err = m.RunJob(ctx, job, "block-commit", map[string]any{"job-id": job.ID, "device": c.Node, "top": top, "base": base})
		switch {
		case err == nil:
		case qp != nil && (qp.Resume || qp.Marked) && m.Closed():
			// Lost mid-pivot: the guest may be paused, the job waiting.
			done, serr := l.settleAnew(ctx, top, progress, qp)
			if serr != nil || !done {
				return errors.Join(err, serr)
			}
		default:
			// A job an earlier call started and lost may hold the node.
			if done, aerr := adopt(ctx, m, "commit"+top, progress, qp, func(chains []DiskChain) bool {
				_, err := chainOf(chains, top)
				return err != nil
			}); aerr != nil || !done {
				return errors.Join(err, aerr)
			}
		}
		if qp != nil {
			// An active commit is QEMU's mirror job, which flushes its
			// target, base, under drain before it completes (block/mirror.c,
			// mirror_run: mirror_flush): no flush of ours is needed.
			return nil
		}
		return l.flush(ctx, m, base)
	})
}

// qmpPivot is storage's pivot for the device model's node target.
// The guest is held through the back end as well (Xen schedules its
// vCPUs, not QEMU), and only a running one.
func (l *Live) qmpPivot(ctx context.Context, p storage.Pivot, target string) (*qmp.Pivot, error) {
	qp := &qmp.Pivot{Target: target, Marked: p.Marked, Resume: p.Resume, Held: p.Held,
		Pausing: p.Pausing, Mark: p.Mark, Unmark: p.Unmark}
	vp, ok := l.h.(VCPUPauser)
	if !ok {
		return qp, nil
	}
	pauses, err := vp.PausesVCPUs(ctx)
	if err != nil {
		return nil, fmt.Errorf("asking the back end who runs the vCPUs of %s, which the pivot must hold: %w", l.domain, err)
	}
	if pauses {
		qp.Hold = func(ctx context.Context) (bool, error) {
			st, err := l.h.State(ctx, l.domain)
			if err != nil || st != Running {
				return false, err
			}
			return true, l.h.Pause(ctx, l.domain)
		}
		qp.Release = func(ctx context.Context) error {
			st, err := l.h.State(ctx, l.domain)
			if err != nil || st != Paused {
				return err
			}
			return l.h.Resume(ctx, l.domain)
		}
	}
	return qp, nil
}

// settle finishes a pivot an earlier connection left (its job adopted,
// or found over) and reports whether top was pivoted from; not, the
// mark is taken back and the guest resumed, and top is still to commit.
func settle(ctx context.Context, m *qmp.Monitor, top string, progress func(float64), p *qmp.Pivot) (bool, error) {
	if _, err := m.AdoptJob(ctx, jobPrefix("commit"+top), percent(progress), p); err != nil {
		return false, err
	}
	// Read after the job is over: a pivot under way is seen.
	chains, err := Chains(ctx, m)
	if err != nil {
		return false, err
	}
	_, err = chainOf(chains, top)
	pivoted := err != nil
	return pivoted, m.EndPivot(ctx, p, pivoted)
}

// settleAnew is settle on a new connection, for one lost mid-pivot: a
// guest may be paused, so a caller that gave up does not stop it, but
// the device model gets a minute to answer.
func (l *Live) settleAnew(ctx context.Context, top string, progress func(float64), p *qmp.Pivot) (bool, error) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Minute)
	defer cancel()
	m, err := l.h.DeviceModel(ctx, l.domain)
	if err != nil {
		return false, err
	}
	defer m.Disconnect()
	return settle(ctx, m, top, progress, p)
}

// flush makes what a block job wrote durable on disk before storage
// records the merge and removes the image the data came from: QEMU keeps
// qcow2 metadata in its caches until a flush, and neither block-commit's
// intermediate job nor block-stream flushes. QMP has no flush command;
// HMP's qemu-io flush on the node is the one way short of pausing the
// guest (stop flushes everything, but the guest would feel it).
// Callers hold l.mu.
func (l *Live) flush(ctx context.Context, m *qmp.Monitor, image string) error {
	node, err := l.nodeOf(ctx, m, image)
	if err != nil {
		return err
	}
	return flushNode(ctx, m, node, image)
}

// flushNode is flush on a node already looked up.
func flushNode(ctx context.Context, m *qmp.Monitor, node, image string) error {
	if err := m.FlushNode(ctx, node); err != nil {
		return fmt.Errorf("flushing %s: %w", image, err)
	}
	return nil
}

// Stream runs block-stream into image from the chain above base ("" for
// all of it); QEMU then makes base image's backing.
func (l *Live) Stream(ctx context.Context, image, base, baseFormat string, progress func(float64)) error {
	return l.with(ctx, func(m *qmp.Monitor) error {
		node, err := l.nodeOf(ctx, m, image)
		if err != nil {
			return err
		}
		l.changed()
		job := qmp.Job{ID: nodeName("stream" + image), Progress: percent(progress)}
		args := map[string]any{"job-id": job.ID, "device": node}
		if base != "" {
			args["base"] = base
		}
		if err := m.RunJob(ctx, job, "block-stream", args); err != nil {
			// A job an earlier call started and lost may hold the node.
			if done, aerr := adopt(ctx, m, "stream"+image, progress, nil, func(chains []DiskChain) bool {
				c, err := chainOf(chains, image)
				i := slices.Index(c.Files, image)
				return err == nil && (base == "" && i == len(c.Files)-1 || i+1 < len(c.Files) && c.Files[i+1] == base)
			}); aerr != nil || !done {
				return errors.Join(err, aerr)
			}
		}
		// The node keeps its name through the stream.
		return flushNode(ctx, m, node, image)
	})
}

func percent(progress func(float64)) func(done, total int64) {
	if progress == nil {
		return nil
	}
	return func(done, total int64) {
		if total > 0 {
			progress(100 * float64(done) / float64(total))
		}
	}
}

// ErrChainMismatch: the device model's view of a disk differs from the
// chain on disk; the error says exactly how. It wraps
// errdefs.ErrOperationFailed.
var ErrChainMismatch = fmt.Errorf("%w: device model and disk chains differ", errdefs.ErrOperationFailed)

// MismatchError is the exact difference for one disk.
type MismatchError struct {
	Disk        string
	DeviceModel []string
	OnDisk      []string
}

func (e *MismatchError) Error() string {
	return fmt.Sprintf("disk %s: device model reads %v, the chain on disk is %v", e.Disk, e.DeviceModel, e.OnDisk)
}
func (e *MismatchError) Unwrap() error { return ErrChainMismatch }

func cleanAll(paths []string) []string {
	out := make([]string, len(paths))
	for i, p := range paths {
		out[i] = filepath.Clean(p)
	}
	return out
}

package storage

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sort"

	"github.com/xlsnap/xlsnap/chain"
	"github.com/xlsnap/xlsnap/storage/metastore"
)

// ProblemKind classifies what Check found.
type ProblemKind string

const (
	ProblemPending      ProblemKind = "pending-operation" // an intent is in the journal
	ProblemMissingImage ProblemKind = "missing-image"     // metadata names an image that is not there
	ProblemChainDiffers ProblemKind = "chain-differs"     // a disk's chain on disk is not the recorded one
	ProblemBadImage     ProblemKind = "bad-image"         // qemu-img check or the chain reader refuses an image
	ProblemOrphan       ProblemKind = "orphan-image"      // an overlay of a known image that no record holds
)

// Problem is one finding; Fixed says Repair mended it, Note why not.
type Problem struct {
	Kind   ProblemKind `json:"kind"`
	Domain string      `json:"domain,omitempty"`
	Disk   string      `json:"disk,omitempty"`
	Path   string      `json:"path,omitempty"`
	Detail string      `json:"detail"`
	Fixed  bool        `json:"fixed,omitempty"`
	Note   string      `json:"note,omitempty"`
}

// Check compares metadata with the disks and reports every difference.
func (m *Manager) Check(ctx context.Context) ([]Problem, error) {
	return m.check(ctx, false)
}

// Repair finishes pending operations, rescans chains that changed on
// disk, and removes orphan overlays that hold no data. What it cannot
// mend safely (a missing image, an orphan holding data) stays reported.
func (m *Manager) Repair(ctx context.Context) ([]Problem, error) {
	return m.check(ctx, true)
}

func (m *Manager) check(ctx context.Context, repair bool) ([]Problem, error) {
	var problems []Problem
	if repair {
		if err := m.Recover(ctx); err != nil {
			problems = append(problems, Problem{Kind: ProblemPending, Detail: err.Error()})
		}
	}
	var intents []*intent
	var domains []*Domain
	snaps := map[string][]*Snapshot{}
	err := m.store.View(ctx, func(tx metastore.Tx) error {
		var err error
		if intents, err = tx.Intents(); err != nil {
			return err
		}
		names, err := tx.DomainNames()
		if err != nil {
			return err
		}
		for _, n := range names {
			d, err := tx.Domain(n)
			if err != nil {
				return err
			}
			domains = append(domains, d)
			if snaps[n], err = tx.Snapshots(n); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	for _, in := range intents {
		problems = append(problems, Problem{Kind: ProblemPending, Domain: in.Domain,
			Detail: fmt.Sprintf("%s %s (committed %v)", in.Op, in.ID, in.Committed)})
	}
	known := map[string]bool{}
	for _, d := range domains {
		for p := range d.Images {
			known[p] = true
		}
		problems = append(problems, m.checkDomain(ctx, d, snaps[d.Name], repair)...)
	}
	problems = append(problems, m.orphans(ctx, known, repair)...)
	return problems, nil
}

func (m *Manager) checkDomain(ctx context.Context, d *Domain, snaps []*Snapshot, repair bool) []Problem {
	var problems []Problem
	paths := make([]string, 0, len(d.Images))
	for p := range d.Images {
		paths = append(paths, p)
	}
	sort.Strings(paths)
	for _, p := range paths {
		if !exists(p) {
			pr := Problem{Kind: ProblemMissingImage, Domain: d.Name, Path: p, Detail: "recorded image does not exist"}
			if users := snapshotsUsing(snaps, p); len(users) > 0 {
				pr.Detail += fmt.Sprintf("; snapshots %v need it", users)
			}
			problems = append(problems, pr)
			continue
		}
		if b, err := m.backendFor(p); err == nil {
			if err := b.Check(ctx, p, d.Images[p].Format); err != nil {
				problems = append(problems, Problem{Kind: ProblemBadImage, Domain: d.Name, Path: p, Detail: err.Error()})
			}
		}
	}
	for _, disk := range d.Disks {
		recorded := d.Chain(disk.Active)
		c, err := chain.Walk(ctx, disk.Active, chain.Format(disk.Format), m.policy())
		if err != nil {
			problems = append(problems, Problem{Kind: ProblemBadImage, Domain: d.Name, Disk: disk.Target, Path: disk.Active, Detail: err.Error()})
			continue
		}
		onDisk := layerPaths(c)
		if slices.Equal(recorded, onDisk) {
			continue
		}
		pr := Problem{Kind: ProblemChainDiffers, Domain: d.Name, Disk: disk.Target, Path: disk.Active,
			Detail: fmt.Sprintf("recorded %v, on disk %v", recorded, onDisk)}
		if repair {
			if _, err := m.ChainChanged(ctx, d.Name, disk.Target); err != nil {
				pr.Note = err.Error()
			} else {
				pr.Fixed = true
			}
		}
		problems = append(problems, pr)
	}
	return problems
}

func snapshotsUsing(snaps []*Snapshot, path string) []string {
	var out []string
	for _, s := range snaps {
		for _, sd := range s.Disks {
			if sd.Image == path {
				out = append(out, s.Name)
			}
		}
	}
	return out
}

func layerPaths(c *chain.Chain) []string {
	out := make([]string, len(c.Layers))
	for i, l := range c.Layers {
		out[i] = filepath.Clean(l.Path)
	}
	return out
}

// orphans finds images in the pools that are backed by a known image but
// are not known themselves: overlays a crash or an outside tool left.
func (m *Manager) orphans(ctx context.Context, known map[string]bool, repair bool) []Problem {
	var problems []Problem
	for _, p := range m.pools {
		root := p.backend.Root()
		entries, err := os.ReadDir(root)
		if err != nil {
			problems = append(problems, Problem{Kind: ProblemBadImage, Path: root, Detail: err.Error()})
			continue
		}
		for _, e := range entries {
			path := filepath.Join(root, e.Name())
			if known[path] || !e.Type().IsRegular() {
				continue
			}
			h, err := readHeader(path)
			if err != nil || h.BackingFile == "" {
				continue
			}
			backing := filepath.Clean(chain.ResolveBacking(path, h.BackingFile))
			if !known[backing] {
				continue
			}
			pr := Problem{Kind: ProblemOrphan, Path: path, Detail: "overlay of " + backing + " that no record holds"}
			if repair {
				m.removeIfEmpty(ctx, p.backend, path, &pr)
			}
			problems = append(problems, pr)
		}
	}
	return problems
}

// removeIfEmpty removes an orphan only when it holds no data of its own:
// data that lives nowhere else is never removed.
func (m *Manager) removeIfEmpty(ctx context.Context, b Backend, path string, pr *Problem) {
	n, err := b.AllocatedBytes(ctx, path, "qcow2")
	switch {
	case err != nil:
		pr.Note = err.Error()
	case n > 0:
		pr.Note = fmt.Sprintf("kept: holds %d bytes of data", n)
	default:
		if err := b.Remove(ctx, path); err != nil {
			pr.Note = err.Error()
		} else {
			pr.Fixed = true
		}
	}
}

// ChainChanged is the public "a chain changed, rescan" call: someone
// edited a disk's chain behind storage's back. It rereads the chain from
// the disk's active layer, records it, and tells every subscriber.
func (m *Manager) ChainChanged(ctx context.Context, domain, disk string) (*chain.Chain, error) {
	unlock, err := m.lockDomain(ctx, domain)
	if err != nil {
		return nil, err
	}
	defer unlock()
	var c *chain.Chain
	var ev ChainChanged
	err = m.store.Update(ctx, func(tx metastore.Tx) error {
		d, err := m.domain(tx, domain)
		if err != nil {
			return err
		}
		dk := d.Disk(disk)
		if dk == nil {
			return fmt.Errorf("%w: domain %s has no disk %q", ErrInvalidArg, domain, disk)
		}
		before := d.Chain(dk.Active)
		if c, err = chain.Walk(ctx, dk.Active, chain.Format(dk.Format), m.policy()); err != nil {
			return err
		}
		m.recordChain(d, c)
		ev = ChainChanged{Domain: domain, Disk: disk, Before: before, After: layerPaths(c), Reason: "rescan"}
		return tx.PutDomain(d)
	})
	if err != nil {
		return nil, err
	}
	m.events.publish(ev)
	return c, nil
}

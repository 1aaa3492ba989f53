package storage

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/xlsnap/xlsnap/chain"
	"github.com/xlsnap/xlsnap/storage/metastore"
)

// SnapshotSpec asks for a snapshot. Every disk of the domain not listed
// takes no part (mode "no"); the driver fills libvirt's defaults.
type SnapshotSpec struct {
	Name        string
	Description string
	// State is the domain's state at the time (shutoff, running, paused).
	State string
	// Memory is the external memory file, "" for a disk-only snapshot.
	Memory    string
	DomainXML string
	// XML is the snapshot's own document, kept as Snapshot.XML.
	XML   string
	Disks []SnapshotDiskSpec
	// NoMetadata changes the disks and records no snapshot (libvirt's
	// VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA).
	NoMetadata bool
	// Created defaults to now.
	Created time.Time
	// Live takes the snapshot through the running domain's device model:
	// every disk in one transaction.
	Live Live
}

// SnapshotDiskSpec is one disk's part in a new snapshot.
type SnapshotDiskSpec struct {
	Target string
	Mode   DiskMode
	// Overlay is the new active layer of an external snapshot; empty means
	// next to the active image, named after the snapshot.
	Overlay string
	// Format of the overlay; empty means qcow2 (the only format that can
	// have a backing file among those a file pool keeps).
	Format string
	// Reuse takes an existing Overlay, which must already be a qcow2 image
	// backed by the active layer (libvirt's REUSE_EXT).
	Reuse bool
}

// DefaultOverlayPath is where libvirt puts an external snapshot's overlay:
// the image's name with its extension replaced by the snapshot's name.
func DefaultOverlayPath(image, snapshot string) string {
	ext := filepath.Ext(image)
	return strings.TrimSuffix(image, ext) + "." + snapshot
}

// CreateSnapshot takes a snapshot of an inactive domain's disks: external
// disks get a new overlay on their active layer and switch to it,
// internal ones get a qcow2 internal snapshot. The new snapshot becomes
// the current one, a child of the previous current one. A new overlay
// that would make a chain longer than its pool's MaxDepth first has the
// domain coalesced (see Coalesce), through spec.Live for a running one;
// if the chain is still too long, the snapshot is refused with a
// *ChainTooLongError (ErrOperationInvalid) naming the layers that hold
// it. Every input is checked before anything changes.
func (m *Manager) CreateSnapshot(ctx context.Context, domain string, spec SnapshotSpec) (*Snapshot, error) {
	if err := ValidName("snapshot", spec.Name); err != nil {
		return nil, err
	}
	unlock, err := m.lockDomain(ctx, domain)
	if err != nil {
		return nil, err
	}
	defer unlock()
	in, snap, _, err := m.makeRoom(ctx, domain, spec)
	if err != nil {
		return nil, err
	}
	if err := m.run(ctx, in, spec.Live); err != nil {
		return nil, err
	}
	return snap, nil
}

// MakeRoom readies a domain for the snapshot spec asks for, as
// CreateSnapshot does before it takes it: where a new overlay would pass
// its pool's depth limit, the domain is coalesced (through spec.Live for
// a running one). It returns the merges made. Errors: those of
// CreateSnapshot's checks, before anything changes; *ChainTooLongError
// (ErrOperationInvalid) when coalescing cannot make room. The driver
// calls it before it pauses a guest for a snapshot with memory, so the
// merges never lengthen the pause.
func (m *Manager) MakeRoom(ctx context.Context, domain string, spec SnapshotSpec) ([]Merge, error) {
	if err := ValidName("snapshot", spec.Name); err != nil {
		return nil, err
	}
	unlock, err := m.lockDomain(ctx, domain)
	if err != nil {
		return nil, err
	}
	defer unlock()
	_, _, merges, err := m.makeRoom(ctx, domain, spec)
	return merges, err
}

// makeRoom plans the snapshot, coalescing first where its chains would be
// too long; the caller holds the domain's lock.
func (m *Manager) makeRoom(ctx context.Context, domain string, spec SnapshotSpec) (*intent, *Snapshot, []Merge, error) {
	in, snap, next, err := m.planSnapshot(ctx, domain, spec)
	if err != nil {
		return nil, nil, nil, err
	}
	if m.tooDeep(next, snap) == nil {
		return in, snap, nil, nil
	}
	merges, err := m.coalesceLocked(ctx, domain, spec.Live, nil)
	if err != nil {
		return nil, nil, merges, err
	}
	if in, snap, next, err = m.planSnapshot(ctx, domain, spec); err != nil {
		return nil, nil, merges, err
	}
	tooLong := m.tooDeep(next, snap)
	if tooLong == nil {
		return in, snap, merges, nil
	}
	d, snaps, err := m.load(ctx, domain)
	if err == nil {
		err = m.explainDepth(ctx, tooLong, d, snaps, spec.Live)
	}
	if err != nil {
		return nil, nil, merges, err
	}
	return nil, nil, merges, tooLong
}

// planSnapshot checks spec against the domain and its images and plans
// the snapshot: the intent, the record, and the domain after it.
func (m *Manager) planSnapshot(ctx context.Context, domain string, spec SnapshotSpec) (*intent, *Snapshot, *Domain, error) {
	var d *Domain
	err := m.store.View(ctx, func(tx metastore.Tx) error {
		var err error
		if d, err = m.domain(tx, domain); err != nil {
			return err
		}
		if _, err := tx.Snapshot(domain, spec.Name); err == nil {
			return fmt.Errorf("%w: %s of domain %s", ErrSnapshotExists, spec.Name, domainName(d))
		} else if !errors.Is(err, metastore.ErrNotFound) {
			return err
		}
		return nil
	})
	if err != nil {
		return nil, nil, nil, err
	}
	next := d.Clone()
	snap := &Snapshot{
		Name: spec.Name, Description: spec.Description, Created: spec.Created,
		State: spec.State, Parent: d.Current, Memory: spec.Memory, DomainXML: spec.DomainXML, XML: spec.XML,
	}
	if snap.Created.IsZero() {
		snap.Created = time.Now().UTC().Truncate(time.Second)
	}
	if snap.State == "" {
		snap.State = "shutoff"
	}
	in := newIntent(domain, "snapshot")
	var group []step          // a live snapshot's disks, for one transaction
	var defined []DefinedDisk // read when a disk's image is to be written
	seen := map[string]bool{}
	for _, ds := range spec.Disks {
		disk := next.Disk(ds.Target)
		if disk == nil {
			return nil, nil, nil, fmt.Errorf("%w: domain %s has no disk %q", ErrInvalidArg, domainName(d), ds.Target)
		}
		if seen[ds.Target] {
			return nil, nil, nil, fmt.Errorf("%w: disk %s named twice", ErrInvalidArg, ds.Target)
		}
		seen[ds.Target] = true
		rec := SnapshotDisk{Target: ds.Target, Mode: ds.Mode}
		switch ds.Mode {
		case DiskNone:
		case DiskExternal:
			overlay, fmtName, st, err := m.planOverlay(ctx, disk, ds, spec.Name)
			if err != nil {
				return nil, nil, nil, fmt.Errorf("disk %s: %w", ds.Target, err)
			}
			// The active image becomes a backing file, which nothing may
			// write; a reused overlay becomes this disk's: neither may be
			// another domain's disk.
			if err := m.checkSoleWriter(ctx, &defined, d, disk.Active); err != nil {
				return nil, nil, nil, fmt.Errorf("disk %s: %w", ds.Target, err)
			}
			if st == nil {
				if err := m.checkSoleWriter(ctx, &defined, d, overlay); err != nil {
					return nil, nil, nil, fmt.Errorf("disk %s: %w", ds.Target, err)
				}
			}
			switch {
			case st != nil && spec.Live != nil:
				group = append(group, *st)
			case st != nil:
				in.Steps = append(in.Steps, *st)
			case spec.Live != nil:
				return nil, nil, nil, fmt.Errorf("%w: disk %s: reusing an overlay on a running domain", ErrLiveUnsupported, ds.Target)
			}
			rec.Image, rec.Format, rec.Overlay = disk.Active, disk.Format, overlay
			next.Images[overlay] = &Image{Format: fmtName, Backing: disk.Active, BackingFormat: disk.Format, Owned: st != nil}
			disk.Active, disk.Format = overlay, fmtName
		case DiskInternal:
			if err := m.checkInternalName(disk.Active, disk.Format, spec.Name, false); err != nil {
				return nil, nil, nil, fmt.Errorf("disk %s: %w", ds.Target, err)
			}
			if _, err := m.internal(disk.Active); err != nil {
				return nil, nil, nil, fmt.Errorf("disk %s: %w", ds.Target, err)
			}
			if err := m.checkSoleWriter(ctx, &defined, d, disk.Active); err != nil {
				return nil, nil, nil, fmt.Errorf("disk %s: %w", ds.Target, err)
			}
			st := step{Kind: metastore.StepInternalCreate, Path: disk.Active, Format: disk.Format, Name: spec.Name, Disk: ds.Target}
			if spec.Live != nil {
				group = append(group, st)
			} else {
				in.Steps = append(in.Steps, st)
			}
			rec.Image, rec.Format = disk.Active, disk.Format
		default:
			return nil, nil, nil, fmt.Errorf("%w: disk %s: snapshot mode %q", ErrInvalidArg, ds.Target, ds.Mode)
		}
		snap.Disks = append(snap.Disks, rec)
	}
	// Two disks on one new overlay would each write the other's data.
	overlays := map[string]string{}
	for _, sd := range snap.Disks {
		if sd.Overlay == "" {
			continue
		}
		if other, dup := overlays[sd.Overlay]; dup {
			return nil, nil, nil, fmt.Errorf("%w: disks %s and %s would both write %s", ErrInvalidArg, other, sd.Target, sd.Overlay)
		}
		overlays[sd.Overlay] = sd.Target
	}
	for _, disk := range d.Disks {
		if !seen[disk.Target] {
			snap.Disks = append(snap.Disks, SnapshotDisk{Target: disk.Target, Mode: DiskNone})
		}
	}
	if len(group) > 0 {
		in.Steps, in.Live = []step{{Kind: metastore.StepLiveSnapshot, Group: group}}, true
	}
	in.NoReturn = len(in.Steps) // a new overlay or internal snapshot can always go again
	in.Commit = &metastore.Commit{Domain: next}
	if !spec.NoMetadata {
		next.Current = snap.Name
		in.Commit.PutSnapshots = []*Snapshot{snap}
	}
	return in, snap, next, nil
}

// planOverlay checks an external disk's overlay and returns the step
// that creates it (nil when an existing one is reused).
func (m *Manager) planOverlay(ctx context.Context, disk *Disk, ds SnapshotDiskSpec, snapName string) (string, string, *step, error) {
	overlay := ds.Overlay
	if overlay == "" {
		overlay = DefaultOverlayPath(disk.Active, snapName)
	}
	overlay, err := filepath.Abs(overlay)
	if err != nil {
		return "", "", nil, err
	}
	format := ds.Format
	if format == "" {
		format = string(chain.FormatQcow2)
	}
	if format != string(chain.FormatQcow2) {
		return "", "", nil, fmt.Errorf("%w: overlay format %q (an overlay needs a backing file: qcow2)", ErrUnsupported, format)
	}
	if _, err := m.poolOf(overlay); err != nil {
		return "", "", nil, err
	}
	if ds.Reuse {
		if err := m.checkReused(ctx, disk, overlay); err != nil {
			return "", "", nil, err
		}
		return overlay, format, nil, nil
	}
	if err := m.checkNewFile(overlay); err != nil {
		return "", "", nil, err
	}
	return overlay, format, &step{Kind: metastore.StepCreateOverlay, Path: overlay, Format: format,
		Backing: disk.Active, BackingFormat: disk.Format, Disk: disk.Target}, nil
}

// checkSoleWriter refuses an image another domain's definition names as
// a disk (any name of the file): that domain writes it, or may start
// and write it at any moment. Reading it through a chain is fine: an
// internal snapshot changes no content, and a new overlay leaves it as
// it is. Only the definitions (and the records of other sources' domains)
// are read: no pool scan.
func (m *Manager) checkSoleWriter(ctx context.Context, defined *[]DefinedDisk, d *Domain, path string) error {
	if *defined == nil {
		var err error
		if *defined, err = m.definedDisks(ctx); err != nil {
			return err
		}
		if m.defs != nil {
			// Domains of other sources sharing this state folder are known
			// by their records only.
			recs, err := m.recordedDisks(ctx)
			if err != nil {
				return err
			}
			for _, r := range recs {
				if !m.mine(r.Domain) {
					*defined = append(*defined, r)
				}
			}
		}
	}
	k, st := keyOf(path)
	if st == nil {
		return nil // a new file: nobody names it yet
	}
	var others []User
	for _, dd := range *defined {
		if dk, _ := keyOf(dd.Path); dk == k && dd.Domain != d.Name {
			others = append(others, User{Kind: UserDefinition, Domain: dd.Domain, DomainName: dd.DomainName, Disk: dd.Target, Path: dd.Path})
		}
	}
	if len(others) > 0 {
		return fmt.Errorf("%w: %s is also used by %s", ErrOperationInvalid, path, DescribeUsers(others))
	}
	return nil
}

// checkReused checks an overlay made beforehand (REUSE_EXT) against the
// disk it is to cover: it must read as qcow2, name the disk's active
// image as its backing file with the disk's format, and have the same
// virtual size. Anything else would have the guest read another image,
// read the active image's metadata as data, or lose its tail.
func (m *Manager) checkReused(ctx context.Context, disk *Disk, overlay string) error {
	c, err := chain.Walk(ctx, overlay, chain.FormatQcow2, m.policy())
	switch {
	case errors.Is(err, ErrUnsafeBacking):
		return fmt.Errorf("reused overlay %s: %w", overlay, err)
	case err != nil:
		return fmt.Errorf("%w: reused overlay %s is not a usable qcow2 image: %w", ErrInvalidArg, overlay, err)
	}
	top := c.Top()
	if len(c.Layers) < 2 {
		return fmt.Errorf("%w: reused overlay %s has no backing file; it must be backed by %s", ErrInvalidArg, overlay, disk.Active)
	}
	if backing := filepath.Clean(c.Layers[1].Path); backing != disk.Active {
		return fmt.Errorf("%w: reused overlay %s is backed by %s, not by the active image %s", ErrInvalidArg, overlay, backing, disk.Active)
	}
	if top.BackingFormat != disk.Format {
		return fmt.Errorf("%w: reused overlay %s reads its backing file %s as %s; the image is %s", ErrInvalidArg, overlay, disk.Active, top.BackingFormat, disk.Format)
	}
	if base := c.Layers[1]; top.VirtualSize != base.VirtualSize {
		return fmt.Errorf("%w: reused overlay %s is %d bytes, the active image %s is %d", ErrInvalidArg, overlay, top.VirtualSize, disk.Active, base.VirtualSize)
	}
	return nil
}

// checkNewFile checks where a new image will go: nothing there yet (not
// even a dangling symlink), and its folder, after symlinks, inside a
// pool. A folder inside a pool that is a symlink to somewhere else would
// otherwise put the image (and the guest's data) outside every pool.
func (m *Manager) checkNewFile(path string) error {
	if base := filepath.Base(path); len(base) > MaxNameLen {
		return fmt.Errorf("%w: file name of %d bytes (at most %d): %s", ErrInvalidArg, len(base), MaxNameLen, path)
	}
	if _, err := os.Lstat(path); err == nil {
		return fmt.Errorf("%w: %s exists (to use it as the overlay: --reuse-external, libvirt's REUSE_EXT)", ErrInvalidArg, path)
	} else if !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	real, err := realPath(path)
	if err != nil {
		return fmt.Errorf("%w: folder of %s: %w", ErrInvalidArg, path, err)
	}
	for _, p := range m.pools {
		root := p.backend.Root()
		if r, err := filepath.EvalSymlinks(root); err == nil {
			root = r
		}
		if strings.HasPrefix(real, root+"/") {
			return nil
		}
	}
	return fmt.Errorf("%w: %s is %s after symlinks, in no pool", ErrInvalidArg, path, real)
}

// realPath is where path lands after symlinks: its nearest existing
// folder resolved, the missing rest (which no one can have made a
// symlink; creating the file there fails) joined back on.
func realPath(path string) (string, error) {
	dir, rest := filepath.Dir(path), filepath.Base(path)
	for {
		real, err := filepath.EvalSymlinks(dir)
		if err == nil {
			return filepath.Join(real, rest), nil
		}
		parent := filepath.Dir(dir)
		if !errors.Is(err, fs.ErrNotExist) || parent == dir {
			return "", err
		}
		if _, lerr := os.Lstat(dir); lerr == nil {
			return "", fmt.Errorf("%w: %s is a symlink to nowhere", ErrInvalidArg, dir)
		}
		dir, rest = parent, filepath.Join(filepath.Base(dir), rest)
	}
}

// checkInternalName guards qemu-img's lookup, which matches a snapshot's
// id before its name: a name equal to another snapshot's id would act on
// the wrong one. With existing set, the name must be there exactly once.
func (m *Manager) checkInternalName(path, format, name string, existing bool) error {
	if err := checkInternalFormat(path, format); err != nil {
		return err
	}
	h, err := readHeader(path)
	if err != nil {
		return err
	}
	return checkSnapshotName(h, path, name, existing)
}

func checkInternalFormat(path, format string) error {
	if format != string(chain.FormatQcow2) {
		return fmt.Errorf("%w: internal snapshots need qcow2, %s is %s", ErrUnsupported, path, format)
	}
	return nil
}

// checkSnapshotName is checkInternalName on a header already read.
func checkSnapshotName(h *chain.Header, path, name string, existing bool) error {
	byName := slices.IndexFunc(h.Snapshots, func(s chain.Snapshot) bool { return s.Name == name })
	byID := slices.IndexFunc(h.Snapshots, func(s chain.Snapshot) bool { return s.ID == name })
	switch {
	case byID >= 0 && byID != byName:
		return fmt.Errorf("%w: %q is the id of another internal snapshot in %s", ErrInvalidArg, name, path)
	case existing && byName < 0:
		return fmt.Errorf("%w: %s holds no internal snapshot %q", ErrChainBroken, path, name)
	case !existing && byName >= 0:
		return fmt.Errorf("%w: %s already holds an internal snapshot %q", ErrSnapshotExists, path, name)
	}
	return nil
}

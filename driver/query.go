package driver

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strconv"

	"libvirt.org/go/libvirtxml"

	"github.com/xlsnap/xlsnap/errdefs"
	"github.com/xlsnap/xlsnap/storage"
)

// tree is a domain's snapshots with their children.
type tree struct {
	key      string // the domain's key in storage
	current  string
	byName   map[string]*Snapshot
	children map[string][]string // "" holds the roots
}

// snapshots reads a domain's snapshot tree. A domain the source has but
// storage never saw simply has none.
func (d *Driver) snapshots(ctx context.Context, domain string) (*tree, error) {
	if err := storage.ValidName("domain", domain); err != nil {
		return nil, err
	}
	_, _, key, err := d.readDefinition(ctx, domain)
	if err != nil {
		return nil, err
	}
	t := &tree{key: key, byName: map[string]*Snapshot{}, children: map[string][]string{}}
	rec, err := d.st.Domain(ctx, t.key)
	if errors.Is(err, storage.ErrNoDomain) {
		return t, nil
	}
	if err != nil {
		return nil, err
	}
	t.current = rec.Current
	list, err := d.st.Snapshots(ctx, t.key)
	if err != nil {
		return nil, err
	}
	sort.Slice(list, func(i, j int) bool {
		if !list[i].Created.Equal(list[j].Created) {
			return list[i].Created.Before(list[j].Created)
		}
		return list[i].Name < list[j].Name
	})
	for _, s := range list {
		t.byName[s.Name] = s
		t.children[s.Parent] = append(t.children[s.Parent], s.Name)
	}
	return t, nil
}

func (t *tree) get(domain, name string) (*Snapshot, error) {
	s, ok := t.byName[name]
	if !ok {
		return nil, fmt.Errorf("%w: no domain snapshot with matching name %q of domain %s", ErrNoSnapshot, name, domain)
	}
	return s, nil
}

// descendants lists name's descendants parents first ("" for all).
func (t *tree) descendants(name string, all bool) []*Snapshot {
	var out []*Snapshot
	queue := append([]string(nil), t.children[name]...)
	for len(queue) > 0 {
		n := queue[0]
		queue = queue[1:]
		out = append(out, t.byName[n])
		if all {
			queue = append(queue, t.children[n]...)
		}
	}
	return out
}

// IsExternal is libvirt's location test: any external disk or memory file.
func IsExternal(s *Snapshot) bool {
	if s.Memory != "" {
		return true
	}
	for _, sd := range s.Disks {
		if sd.Mode == storage.DiskExternal {
			return true
		}
	}
	return false
}

// filter applies libvirt's list filters; each group (leaves, metadata,
// state, location) is an OR inside and an AND across groups.
func (t *tree) filter(in []*Snapshot, flags ListFlags) []*Snapshot {
	var out []*Snapshot
	for _, s := range in {
		leaf := len(t.children[s.Name]) == 0
		if flags&(ListLeaves|ListNoLeaves) != 0 &&
			!(flags&ListLeaves != 0 && leaf || flags&ListNoLeaves != 0 && !leaf) {
			continue
		}
		// Every snapshot xlsnap lists has metadata.
		if flags&(ListMetadata|ListNoMetadata) == ListNoMetadata {
			continue
		}
		if flags&(ListInactive|ListActive|ListDiskOnly) != 0 {
			st := DomainState(s.State)
			ok := flags&ListInactive != 0 && st == StateShutoff ||
				flags&ListActive != 0 && st.Active() ||
				flags&ListDiskOnly != 0 && s.State == "disk-snapshot"
			if !ok {
				continue
			}
		}
		if flags&(ListInternal|ListExternal) != 0 {
			ext := IsExternal(s)
			if !(flags&ListExternal != 0 && ext || flags&ListInternal != 0 && !ext) {
				continue
			}
		}
		out = append(out, s)
	}
	return out
}

// ListAllSnapshots is virDomainListAllSnapshots: every snapshot, or the
// roots with ListRoots, filtered; oldest first, or parents before
// children with ListTopological. Errors: ErrInvalidArg for flags libvirt
// does not define, ErrNoDomain.
func (d *Driver) ListAllSnapshots(ctx context.Context, domain string, flags ListFlags) ([]*Snapshot, error) {
	if err := checkFlags("ListAllSnapshots", flags, listKnown); err != nil {
		return nil, err
	}
	t, err := d.snapshots(ctx, domain)
	if err != nil {
		return nil, err
	}
	var all []*Snapshot
	switch {
	case flags&ListRoots != 0:
		all = t.descendants("", false)
	case flags&ListTopological != 0:
		all = t.descendants("", true)
	default:
		all = t.descendants("", true)
		sort.SliceStable(all, func(i, j int) bool { return all[i].Created.Before(all[j].Created) })
	}
	return t.filter(all, flags), nil
}

// SnapshotListAllChildren is virDomainSnapshotListAllChildren: the direct
// children, or every descendant with ListDescendants, filtered. Errors:
// ErrInvalidArg for flags libvirt does not define, ErrNoDomain,
// ErrNoSnapshot.
func (d *Driver) SnapshotListAllChildren(ctx context.Context, domain, name string, flags ListFlags) ([]*Snapshot, error) {
	return d.children(ctx, "SnapshotListAllChildren", domain, name, flags)
}

func (d *Driver) children(ctx context.Context, call, domain, name string, flags ListFlags) ([]*Snapshot, error) {
	// ListDescendants is ListRoots's bit: listKnown covers both.
	if err := checkFlags(call, flags, listKnown); err != nil {
		return nil, err
	}
	t, _, err := d.lookup(ctx, domain, name)
	if err != nil {
		return nil, err
	}
	return t.filter(t.descendants(name, flags&ListDescendants != 0), flags&^ListDescendants), nil
}

// SnapshotNumChildren is virDomainSnapshotNumChildren, with the errors of
// SnapshotListAllChildren.
func (d *Driver) SnapshotNumChildren(ctx context.Context, domain, name string, flags ListFlags) (int, error) {
	list, err := d.children(ctx, "SnapshotNumChildren", domain, name, flags)
	return len(list), err
}

// SnapshotLookupByName is virDomainSnapshotLookupByName. Errors:
// ErrInvalidArg for any flag (libvirt defines none), ErrNoDomain,
// ErrNoSnapshot.
func (d *Driver) SnapshotLookupByName(ctx context.Context, domain, name string, flags uint32) (*Snapshot, error) {
	if err := checkFlags("SnapshotLookupByName", flags, 0); err != nil {
		return nil, err
	}
	return d.snapshot(ctx, domain, name)
}

// snapshot reads one snapshot with its domain XML, after asking the
// source for the domain as every other query does: a domain the source
// has but storage never saw has no snapshots, one the source no longer
// has is no domain.
func (d *Driver) snapshot(ctx context.Context, domain, name string) (*Snapshot, error) {
	t, _, err := d.lookup(ctx, domain, name)
	if err != nil {
		return nil, err
	}
	return d.st.Snapshot(ctx, t.key, name)
}

// lookup reads the domain's snapshot tree and the named snapshot in it.
func (d *Driver) lookup(ctx context.Context, domain, name string) (*tree, *Snapshot, error) {
	t, err := d.snapshots(ctx, domain)
	if err != nil {
		return nil, nil, err
	}
	s, err := t.get(domain, name)
	if err != nil {
		return nil, nil, err
	}
	return t, s, nil
}

// SnapshotCurrent is virDomainSnapshotCurrent. Errors: ErrInvalidArg for
// any flag (libvirt defines none), ErrNoDomain, ErrNoSnapshot when there
// is no current snapshot.
func (d *Driver) SnapshotCurrent(ctx context.Context, domain string, flags uint32) (*Snapshot, error) {
	if err := checkFlags("SnapshotCurrent", flags, 0); err != nil {
		return nil, err
	}
	t, err := d.snapshots(ctx, domain)
	if err != nil {
		return nil, err
	}
	if t.current == "" {
		return nil, fmt.Errorf("%w: the domain %s has no current snapshot", ErrNoSnapshot, domain)
	}
	return t.get(domain, t.current)
}

// SnapshotIsCurrent is virDomainSnapshotIsCurrent. Errors: ErrInvalidArg
// for any flag (libvirt defines none), ErrNoDomain, ErrNoSnapshot.
func (d *Driver) SnapshotIsCurrent(ctx context.Context, domain, name string, flags uint32) (bool, error) {
	if err := checkFlags("SnapshotIsCurrent", flags, 0); err != nil {
		return false, err
	}
	t, _, err := d.lookup(ctx, domain, name)
	if err != nil {
		return false, err
	}
	return t.current == name, nil
}

// SnapshotHasMetadata is virDomainSnapshotHasMetadata: every snapshot
// xlsnap can name has metadata (NO_METADATA ones are not named later).
// Errors: ErrInvalidArg for any flag (libvirt defines none), ErrNoDomain,
// ErrNoSnapshot.
func (d *Driver) SnapshotHasMetadata(ctx context.Context, domain, name string, flags uint32) (bool, error) {
	if err := checkFlags("SnapshotHasMetadata", flags, 0); err != nil {
		return false, err
	}
	_, _, err := d.lookup(ctx, domain, name)
	return err == nil, err
}

// SnapshotGetParent is virDomainSnapshotGetParent. Errors: ErrInvalidArg
// for any flag (libvirt defines none), ErrNoDomain, ErrNoSnapshot (also
// for a root snapshot, as libvirt).
func (d *Driver) SnapshotGetParent(ctx context.Context, domain, name string, flags uint32) (*Snapshot, error) {
	if err := checkFlags("SnapshotGetParent", flags, 0); err != nil {
		return nil, err
	}
	t, s, err := d.lookup(ctx, domain, name)
	if err != nil {
		return nil, err
	}
	if s.Parent == "" {
		return nil, fmt.Errorf("%w: snapshot %s has no parent", ErrNoSnapshot, name)
	}
	return t.get(domain, s.Parent)
}

// SnapshotGetXMLDesc is virDomainSnapshotGetXMLDesc: libvirt's domain
// snapshot XML, with the domain definition of the snapshot's time (see
// SnapshotXML). Errors: ErrInvalidArg for flags other than XMLSecure,
// ErrNoDomain, ErrNoSnapshot.
func (d *Driver) SnapshotGetXMLDesc(ctx context.Context, domain, name string, flags uint32) (string, error) {
	if err := checkFlags("SnapshotGetXMLDesc", flags, uint32(XMLSecure)); err != nil {
		return "", err
	}
	s, err := d.snapshot(ctx, domain, name)
	if err != nil {
		return "", err
	}
	return SnapshotXML(s)
}

// SnapshotXML renders a snapshot record as libvirt's domain snapshot XML:
// the document the record keeps (what the snapshot was created or
// redefined with), with what storage owns taken from the record: the
// name, description, state, creation time, parent, memory file, each
// disk's mode and overlay, and the domain definition. A memory mode the
// record does not say is libvirt's default on redefine: none for a
// shut-off or disk-only snapshot, internal otherwise. <active> is
// libvirt's private bookkeeping, left out as libvirt's dumpxml does.
// Errors: ErrInternal for a record whose XML cannot be read back.
func SnapshotXML(s *Snapshot) (string, error) {
	var doc libvirtxml.DomainSnapshot
	if s.XML != "" {
		if err := doc.Unmarshal(s.XML); err != nil {
			return "", fmt.Errorf("%w: the stored XML of snapshot %s: %w", errdefs.ErrInternal, s.Name, err)
		}
	}
	byTarget := map[string]libvirtxml.DomainSnapshotDisk{}
	if doc.Disks != nil {
		for _, sd := range doc.Disks.Disks {
			byTarget[sd.Name] = sd
		}
	}
	doc.Name, doc.Description, doc.State = s.Name, s.Description, s.State
	doc.CreationTime = strconv.FormatInt(s.Created.Unix(), 10)
	doc.Parent, doc.Domain, doc.Active = nil, nil, nil
	if s.Parent != "" {
		doc.Parent = &libvirtxml.DomainSnapshotParent{Name: s.Parent}
	}
	switch {
	case s.Memory != "":
		doc.Memory = &libvirtxml.DomainSnapshotMemory{Snapshot: "external", File: s.Memory}
	case doc.Memory != nil && (doc.Memory.Snapshot == "no" || doc.Memory.Snapshot == "internal"):
	case s.State == string(StateShutoff) || s.State == "disk-snapshot":
		doc.Memory = &libvirtxml.DomainSnapshotMemory{Snapshot: "no"}
	default:
		doc.Memory = &libvirtxml.DomainSnapshotMemory{Snapshot: "internal"}
	}
	doc.Disks = &libvirtxml.DomainSnapshotDisks{}
	for _, rd := range s.Disks {
		disk := byTarget[rd.Target]
		disk.Name, disk.Snapshot = rd.Target, string(rd.Mode)
		if rd.Mode == storage.DiskExternal {
			// The overlay is storage's; the rest of the source (its
			// seclabels, say) and the driver are the document's.
			if disk.Source == nil || disk.Source.File == nil {
				disk.Source = &libvirtxml.DomainDiskSource{File: &libvirtxml.DomainDiskSourceFile{}}
			}
			disk.Source.File.File = rd.Overlay
			if disk.Driver == nil {
				disk.Driver = &libvirtxml.DomainDiskDriver{}
			}
			if disk.Driver.Type == "" {
				disk.Driver.Type = "qcow2" // what storage makes
			}
		} else {
			// libvirt's schema has no source or driver for them.
			disk.Source, disk.Driver = nil, nil
		}
		doc.Disks.Disks = append(doc.Disks.Disks, disk)
	}
	if s.DomainXML != "" {
		def, err := parseDomain(s.DomainXML)
		if err != nil {
			return "", err
		}
		doc.Domain = def
	}
	return doc.Marshal()
}

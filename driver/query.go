package driver

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sort"
	"strconv"

	"libvirt.org/go/libvirtxml"

	"github.com/xlsnap/xlsnap/errdefs"
	"github.com/xlsnap/xlsnap/storage"
)

// tree is a domain's snapshot records with their children.
type tree struct {
	key      string // the domain's key in storage
	current  string
	byName   map[string]*storage.Snapshot
	children map[string][]string // "" holds the roots; oldest first
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
	t := &tree{key: key, byName: map[string]*storage.Snapshot{}, children: map[string][]string{}}
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

func (t *tree) get(domain, name string) (*storage.Snapshot, error) {
	s, ok := t.byName[name]
	if !ok {
		return nil, fmt.Errorf("%w: no domain snapshot with matching name %q of domain %s", ErrNoSnapshot, name, domain)
	}
	return s, nil
}

// view is a record as the driver shows it, with what the tree knows of
// it (current, children).
func (t *tree) view(rec *storage.Snapshot) *Snapshot {
	s := snapshotOf(rec)
	s.Current = rec.Name == t.current
	s.Children = slices.Clone(t.children[rec.Name])
	slices.SortFunc(s.Children, compareNames)
	return s
}

// snapshotOf copies a stored record into the driver's view, leaving out
// the stored document (SnapshotGetXMLDesc renders it).
func snapshotOf(rec *storage.Snapshot) *Snapshot {
	s := &Snapshot{Name: rec.Name, Description: rec.Description, Created: rec.Created, State: rec.State,
		Parent: rec.Parent, Memory: rec.Memory, Damaged: rec.Damaged, DomainXML: rec.DomainXML, HasMetadata: true}
	for _, sd := range rec.Disks {
		s.Disks = append(s.Disks, SnapshotDisk{Target: sd.Target, Mode: DiskMode(sd.Mode), Image: sd.Image, Format: sd.Format, Overlay: sd.Overlay})
	}
	return s
}

// descendants lists name's descendants parents first ("" for all).
func (t *tree) descendants(name string, all bool) []*storage.Snapshot {
	var out []*storage.Snapshot
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
		if sd.Mode == DiskExternal {
			return true
		}
	}
	return false
}

// filter applies libvirt's list filters as virDomainSnapshotObjListGetNames
// and virDomainSnapshotFilter do. LEAVES and NO_LEAVES are each a
// condition, so both together list nothing; METADATA and NO_METADATA are
// all or none (every snapshot xlsnap lists has metadata: NO_METADATA
// alone lists nothing); the state group (INACTIVE, ACTIVE, DISK_ONLY) is
// an OR, where ACTIVE is any state but shutoff and disk-snapshot; the
// location group (INTERNAL, EXTERNAL) is a condition each, except that
// both together filter nothing, as libvirt drops a group whose bits are
// all set.
func (t *tree) filter(in []*storage.Snapshot, flags ListFlags) []*Snapshot {
	if flags&(ListMetadata|ListNoMetadata) == ListNoMetadata {
		return nil
	}
	const status = ListInactive | ListActive | ListDiskOnly
	if flags&status == status {
		flags &^= status
	}
	const location = ListInternal | ListExternal
	if flags&location == location {
		flags &^= location
	}
	var out []*Snapshot
	for _, rec := range in {
		s := t.view(rec)
		leaf := len(s.Children) == 0
		if flags&ListLeaves != 0 && !leaf || flags&ListNoLeaves != 0 && leaf {
			continue
		}
		if flags&status != 0 {
			var need ListFlags
			switch s.State {
			case string(StateShutoff):
				need = ListInactive
			case "disk-snapshot":
				need = ListDiskOnly
			default:
				need = ListActive
			}
			if flags&need == 0 {
				continue
			}
		}
		ext := IsExternal(s)
		if flags&ListInternal != 0 && ext || flags&ListExternal != 0 && !ext {
			continue
		}
		out = append(out, s)
	}
	return out
}

// ListAllSnapshots is virDomainListAllSnapshots: every snapshot, or the
// roots with ListRoots, filtered as libvirt filters (see filter: LEAVES
// with NO_LEAVES lists nothing, INTERNAL with EXTERNAL everything);
// oldest first, or parents
// before children with ListTopological. The snapshots' DomainXML is left
// empty.
//
// Errors: ErrInvalidArg (VIR_ERR_INVALID_ARG, 8) for bits libvirt does
// not define, naming them; ErrNoDomain (VIR_ERR_NO_DOMAIN, 42); and
// those every call returns (see the package documentation).
func (d *Driver) ListAllSnapshots(ctx context.Context, domain string, flags ListFlags) ([]*Snapshot, error) {
	if err := checkFlags("ListAllSnapshots", flags, listKnown); err != nil {
		return nil, err
	}
	t, err := d.snapshots(ctx, domain)
	if err != nil {
		return nil, err
	}
	var all []*storage.Snapshot
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
// children, or every descendant (parents first) with ListDescendants,
// filtered as ListAllSnapshots filters. The snapshots' DomainXML is left
// empty.
//
// Errors: ErrInvalidArg (8) for bits libvirt does not define;
// ErrNoDomain (42); ErrNoSnapshot (VIR_ERR_NO_DOMAIN_SNAPSHOT, 72); and
// those every call returns.
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

// SnapshotNumChildren is virDomainSnapshotNumChildren: how many
// snapshots SnapshotListAllChildren lists, with its errors.
func (d *Driver) SnapshotNumChildren(ctx context.Context, domain, name string, flags ListFlags) (int, error) {
	list, err := d.children(ctx, "SnapshotNumChildren", domain, name, flags)
	return len(list), err
}

// SnapshotLookupByName is virDomainSnapshotLookupByName: the snapshot
// with its DomainXML.
//
// Errors: ErrInvalidArg (8) for any flag (libvirt defines none yet);
// ErrNoDomain (42); ErrNoSnapshot (72); and those every call returns.
func (d *Driver) SnapshotLookupByName(ctx context.Context, domain, name string, flags LookupFlags) (*Snapshot, error) {
	if err := checkFlags("SnapshotLookupByName", flags, 0); err != nil {
		return nil, err
	}
	t, _, err := d.lookup(ctx, domain, name)
	if err != nil {
		return nil, err
	}
	return d.full(ctx, t, name)
}

// full reads one snapshot with its domain XML, which listings leave out.
func (d *Driver) full(ctx context.Context, t *tree, name string) (*Snapshot, error) {
	rec, err := d.st.Snapshot(ctx, t.key, name)
	if err != nil {
		return nil, err
	}
	return t.view(rec), nil
}

// lookup reads the domain's snapshot tree and the named snapshot in it,
// after asking the source for the domain as every other query does: a
// domain the source has but storage never saw has no snapshots, one the
// source no longer has is no domain.
func (d *Driver) lookup(ctx context.Context, domain, name string) (*tree, *storage.Snapshot, error) {
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

// SnapshotCurrent is virDomainSnapshotCurrent: the current snapshot (the
// one last taken, reverted to or redefined with CreateCurrent), with its
// DomainXML.
//
// Errors: ErrInvalidArg (8) for any flag (libvirt defines none yet);
// ErrNoDomain (42); ErrNoSnapshot (72) when there is no current
// snapshot, as libvirt; and those every call returns.
func (d *Driver) SnapshotCurrent(ctx context.Context, domain string, flags LookupFlags) (*Snapshot, error) {
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
	if _, err := t.get(domain, t.current); err != nil {
		return nil, err
	}
	return d.full(ctx, t, t.current)
}

// SnapshotIsCurrent is virDomainSnapshotIsCurrent (also a Snapshot's
// Current).
//
// Errors: ErrInvalidArg (8) for any flag (libvirt defines none yet);
// ErrNoDomain (42); ErrNoSnapshot (72); and those every call returns.
func (d *Driver) SnapshotIsCurrent(ctx context.Context, domain, name string, flags LookupFlags) (bool, error) {
	if err := checkFlags("SnapshotIsCurrent", flags, 0); err != nil {
		return false, err
	}
	t, _, err := d.lookup(ctx, domain, name)
	if err != nil {
		return false, err
	}
	return t.current == name, nil
}

// SnapshotHasMetadata is virDomainSnapshotHasMetadata (also a Snapshot's
// HasMetadata): every snapshot xlsnap can name has metadata, since one
// taken with CreateNoMetadata is never recorded.
//
// Errors: ErrInvalidArg (8) for any flag (libvirt defines none yet);
// ErrNoDomain (42); ErrNoSnapshot (72); and those every call returns.
func (d *Driver) SnapshotHasMetadata(ctx context.Context, domain, name string, flags LookupFlags) (bool, error) {
	if err := checkFlags("SnapshotHasMetadata", flags, 0); err != nil {
		return false, err
	}
	_, _, err := d.lookup(ctx, domain, name)
	return err == nil, err
}

// SnapshotGetParent is virDomainSnapshotGetParent: the parent, with its
// DomainXML.
//
// Errors: ErrInvalidArg (8) for any flag (libvirt defines none yet);
// ErrNoDomain (42); ErrNoSnapshot (72), also for a root snapshot, as
// libvirt reports it; and those every call returns.
func (d *Driver) SnapshotGetParent(ctx context.Context, domain, name string, flags LookupFlags) (*Snapshot, error) {
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
	if _, err := t.get(domain, s.Parent); err != nil {
		return nil, err
	}
	return d.full(ctx, t, s.Parent)
}

// SnapshotGetXMLDesc is virDomainSnapshotGetXMLDesc: libvirt's domain
// snapshot XML of the snapshot: the document it was created or redefined
// with, what storage owns taken from its record (name, description,
// state, creation time, parent, memory file, each disk's mode and
// overlay), and the domain definition of its time. A memory mode the
// record does not say is libvirt's default on redefine: none for a
// shut-off or disk-only snapshot, internal otherwise. <active>, libvirt's
// private bookkeeping, is left out as libvirt's dumpxml leaves it out.
// Without XMLSecure a definition's graphics passwords are left out, as
// libvirt leaves them out (HideSecrets).
//
// Errors: ErrInvalidArg (8) for bits other than XMLSecure; ErrNoDomain
// (42); ErrNoSnapshot (72); ErrInternal (VIR_ERR_INTERNAL_ERROR, 1) for
// a stored document that no longer parses; and those every call returns.
func (d *Driver) SnapshotGetXMLDesc(ctx context.Context, domain, name string, flags XMLFlags) (string, error) {
	if err := checkFlags("SnapshotGetXMLDesc", flags, XMLSecure); err != nil {
		return "", err
	}
	t, _, err := d.lookup(ctx, domain, name)
	if err != nil {
		return "", err
	}
	rec, err := d.st.Snapshot(ctx, t.key, name)
	if err != nil {
		return "", err
	}
	doc, err := snapshotXML(rec)
	if err != nil || flags&XMLSecure != 0 {
		return doc, err
	}
	return HideSecrets(doc)
}

// snapshotXML renders a record as SnapshotGetXMLDesc describes, in
// libvirt's layout (libvirtStyle).
func snapshotXML(s *storage.Snapshot) (string, error) {
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
	if len(doc.Disks.Disks) == 0 {
		doc.Disks = nil // libvirt prints no <disks> for none
	}
	if s.DomainXML != "" {
		def, err := parseDomain(s.DomainXML)
		if err != nil {
			return "", err
		}
		doc.Domain = def
	}
	out, err := doc.Marshal()
	if err != nil {
		return "", fmt.Errorf("%w: snapshot XML: %w", errdefs.ErrInternal, err)
	}
	return libvirtStyle(out)
}

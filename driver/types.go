package driver

import (
	"slices"
	"strings"
	"time"

	"github.com/xlsnap/xlsnap/storage"
)

// The driver's public types are its own, not storage's records: storage
// may change how it keeps a snapshot (the stored document, keys, journal
// fields) without changing what a toolstack compiles against. The enums
// take their values from storage's constants so the two cannot drift;
// conversion happens once, here.

// Snapshot is one snapshot as the driver shows it: its record, plus what
// libvirt's per-snapshot calls answer (virDomainSnapshotIsCurrent,
// virDomainSnapshotHasMetadata, virDomainSnapshotGetParent,
// virDomainSnapshotListAllChildren), read together so a caller need not
// ask again. It is a copy taken at the call: a later operation changes
// the driver's records, not this value. The snapshot document itself is
// the driver's; SnapshotGetXMLDesc gives it.
type Snapshot struct {
	Name        string
	Description string
	// Created is libvirt's creationTime (whole seconds, UTC).
	Created time.Time
	// State is the domain's state when the snapshot was taken, in
	// libvirt's names (shutoff, running, paused, disk-snapshot, ...).
	State string
	// Parent is the parent snapshot's name, "" for a root.
	Parent string
	// Memory is the external file of the saved memory, "" for none.
	Memory string
	Disks  []SnapshotDisk
	// Damaged says why the snapshot's data may no longer be what it held
	// (an operation Repair set aside): a revert to it is refused.
	Damaged string
	// DomainXML is the domain's definition at the snapshot's time. Calls
	// that return one snapshot fill it; lists leave it empty (it is the
	// bulk of a record).
	DomainXML string
	// Current says it is the domain's current snapshot.
	Current bool
	// Children are the names of its direct children, ordered by name as
	// virsh lists them (ASCII case folded, as strcasecmp in the C locale).
	Children []string
	// HasMetadata is false only for the snapshot a CreateNoMetadata call
	// returns: xlsnap keeps no record of it, so no later call names it.
	HasMetadata bool
}

// Disk returns the snapshot's record of a disk (by target), or nil.
func (s *Snapshot) Disk(target string) *SnapshotDisk {
	for i := range s.Disks {
		if s.Disks[i].Target == target {
			return &s.Disks[i]
		}
	}
	return nil
}

// DiskMode is how a disk took part in a snapshot: libvirt's snapshot
// attribute of a snapshot's <disk>.
type DiskMode string

const (
	DiskNone     = DiskMode(storage.DiskNone)     // snapshot='no'
	DiskInternal = DiskMode(storage.DiskInternal) // snapshot='internal': inside the qcow2 image
	DiskExternal = DiskMode(storage.DiskExternal) // snapshot='external': a new overlay
)

// SnapshotDisk is one disk's part in a snapshot.
type SnapshotDisk struct {
	Target string
	Mode   DiskMode
	// Image holds the snapshot's state: for an external snapshot the
	// layer that was active when it was taken, for an internal one the
	// image holding the internal snapshot.
	Image  string
	Format string
	// Overlay is the image an external snapshot created on Image.
	Overlay string
}

// compareNames orders snapshot names as virsh does (strcasecmp in the C
// locale: ASCII letters folded), byte order breaking ties so the order is
// total.
func compareNames(a, b string) int {
	if c := strings.Compare(asciiLower(a), asciiLower(b)); c != 0 {
		return c
	}
	return strings.Compare(a, b)
}

// SortByName orders snapshots as virsh's snapshot-list does unless
// --topological: by name as strcasecmp compares them in the C locale,
// names that differ only in case keeping the list's order.
func SortByName(snaps []*Snapshot) {
	slices.SortStableFunc(snaps, func(a, b *Snapshot) int {
		return strings.Compare(asciiLower(a.Name), asciiLower(b.Name))
	})
}

// asciiLower folds as strcasecmp does in the C locale: ASCII letters only.
func asciiLower(s string) string {
	return strings.Map(func(r rune) rune {
		if 'A' <= r && r <= 'Z' {
			return r + 'a' - 'A'
		}
		return r
	}, s)
}

// DiskAction says what a delete did to one disk of one snapshot.
type DiskAction string

const (
	ActionMergedDown      = DiskAction(storage.ActionMergedDown)      // the child was committed into the state image
	ActionPulledUp        = DiskAction(storage.ActionPulledUp)        // the state image was pulled into its child
	ActionInternalDeleted = DiskAction(storage.ActionInternalDeleted) // the qcow2 internal snapshot was removed
	ActionSharedBase      = DiskAction(storage.ActionSharedBase)      // the state image backs other images: kept
	ActionInternalAbove   = DiskAction(storage.ActionInternalAbove)   // a merge would change what an internal snapshot sees: kept
	ActionUserImage       = DiskAction(storage.ActionUserImage)       // a merge would remove an image xlsnap did not create: kept
	ActionUnreferenced    = DiskAction(storage.ActionUnreferenced)    // the state image had no child: left to the collector
	ActionMetadataOnly    = DiskAction(storage.ActionMetadataOnly)    // DeleteMetadataOnly: images untouched
)

// DeleteReport is what SnapshotDelete did: the snapshots deleted (leaves
// first), each disk's outcome, the images removed because nothing
// needed them any more, and the layers the delete freed and merged away
// (see Coalesce).
type DeleteReport struct {
	Deleted   []string
	Disks     []DiskReport
	Collected []string
	Coalesced []Merge
}

// DiskReport is one disk's outcome in a delete.
type DiskReport struct {
	Snapshot string
	Disk     string
	Action   DiskAction
	// Kept is the image that holds the merged data; Removed the one
	// whose data moved into it.
	Kept    string
	Removed string
	// Users are what kept a shared base: its users besides this domain.
	Users []ImageUser
}

// UserKind says how an ImageUser uses an image.
type UserKind string

const (
	UserDefinition = UserKind(storage.UserDefinition) // a domain definition's disk reads it
	UserOverlay    = UserKind(storage.UserOverlay)    // an image in a pool is backed by it
	UserSnapshot   = UserKind(storage.UserSnapshot)   // a snapshot record names it
	UserRecord     = UserKind(storage.UserRecord)     // a domain's recorded image tree holds it
)

// ImageUser is one user of an image that a delete kept for it.
type ImageUser struct {
	Kind       UserKind
	DomainName string
	Disk       string
	Snapshot   string
	// Path is the overlay backed by the image (UserOverlay), or the
	// image the definition's disk names (UserDefinition).
	Path string
	// Host is the other host whose definition it is (a cluster store);
	// "" for this host's.
	Host string
}

func (u ImageUser) storage() storage.User {
	return storage.User{Kind: storage.UserKind(u.Kind), DomainName: u.DomainName, Disk: u.Disk, Snapshot: u.Snapshot, Path: u.Path, Host: u.Host}
}

// String describes the user in the words of xlsnap's reports.
func (u ImageUser) String() string { return u.storage().String() }

// DescribeUsers renders users comma-separated, as xlsnap's reports and
// errors name them.
func DescribeUsers(us []ImageUser) string {
	var parts []string
	for _, u := range us {
		parts = append(parts, u.String())
	}
	return strings.Join(parts, ", ")
}

// ProblemKind names a finding of Check.
type ProblemKind string

const (
	ProblemPending         = ProblemKind(storage.ProblemPending)         // an operation is in the journal
	ProblemMissingImage    = ProblemKind(storage.ProblemMissingImage)    // metadata names an image that is not there
	ProblemChainDiffers    = ProblemKind(storage.ProblemChainDiffers)    // a disk's chain on disk is not the recorded one
	ProblemBadImage        = ProblemKind(storage.ProblemBadImage)        // qemu-img check or the chain reader refuses an image
	ProblemOrphan          = ProblemKind(storage.ProblemOrphan)          // an overlay of a known image no record holds (informational)
	ProblemSharedBase      = ProblemKind(storage.ProblemSharedBase)      // a known image backing images no record holds (informational)
	ProblemDetached        = ProblemKind(storage.ProblemDetached)        // the data of a disk that left the definition (informational)
	ProblemTempFile        = ProblemKind(storage.ProblemTempFile)        // a file a crash left under its temporary name
	ProblemStaleBackup     = ProblemKind(storage.ProblemStaleBackup)     // the store's copy could not be refreshed
	ProblemUsersUnknown    = ProblemKind(storage.ProblemUsersUnknown)    // an image's users could not all be read
	ProblemSetAside        = ProblemKind(storage.ProblemSetAside)        // an operation Repair set aside, awaiting a person
	ProblemDamagedSnapshot = ProblemKind(storage.ProblemDamagedSnapshot) // a snapshot a set-aside operation may have changed
	ProblemCoalescible     = ProblemKind(storage.ProblemCoalescible)     // a chain with layers nothing needs: Coalesce merges them (informational)
	ProblemHeld            = ProblemKind(storage.ProblemHeld)            // a domain held by ChainChanging: not repaired meanwhile (informational)
)

// Informational reports a finding that is no fault (a shared base, an
// orphan, a detached disk's data, a chain that could be shorter):
// reported so its owner is known.
func (k ProblemKind) Informational() bool { return storage.ProblemKind(k).Informational() }

// Problem is one finding of Check; Fixed says Repair mended it, Note why
// not (or how).
type Problem struct {
	Kind   ProblemKind
	Domain string
	Disk   string
	Path   string
	Detail string
	Fixed  bool
	Note   string
}

func problemOf(p storage.Problem) Problem {
	return Problem{Kind: ProblemKind(p.Kind), Domain: p.Domain, Disk: p.Disk, Path: p.Path, Detail: p.Detail, Fixed: p.Fixed, Note: p.Note}
}

func deleteReportOf(r *storage.DeleteReport) *DeleteReport {
	if r == nil {
		return nil
	}
	out := &DeleteReport{Deleted: r.Deleted, Collected: r.Collected, Coalesced: mergesOf(r.Coalesced)}
	for _, dr := range r.Disks {
		rep := DiskReport{Snapshot: dr.Snapshot, Disk: dr.Disk, Action: DiskAction(dr.Action), Kept: dr.Kept, Removed: dr.Removed}
		for _, u := range dr.Users {
			rep.Users = append(rep.Users, ImageUser{Kind: UserKind(u.Kind), DomainName: u.DomainName, Disk: u.Disk, Snapshot: u.Snapshot, Path: u.Path, Host: u.Host})
		}
		out.Disks = append(out.Disks, rep)
	}
	return out
}

// TreeNode is one snapshot in a Tree, with its children.
type TreeNode struct {
	Snapshot *Snapshot
	Children []*TreeNode
}

// Tree arranges snapshots as virsh's snapshot-list --tree does: a
// snapshot whose parent is not in the list is a root, and roots and
// siblings keep the list's order (virsh sorts the list by name, or lists
// it parents first with --topological, before it draws the tree).
func Tree(snaps []*Snapshot) []*TreeNode {
	nodes := make(map[string]*TreeNode, len(snaps))
	for _, s := range snaps {
		nodes[s.Name] = &TreeNode{Snapshot: s}
	}
	var roots []*TreeNode
	for _, s := range snaps {
		n := nodes[s.Name]
		if p, ok := nodes[s.Parent]; ok && s.Parent != "" {
			p.Children = append(p.Children, n)
		} else {
			roots = append(roots, n)
		}
	}
	return roots
}

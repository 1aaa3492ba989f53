// Package metastore keeps xlsnap's metadata: per domain the disks, the
// image tree and the snapshot tree, the journal of operations in flight,
// the per-domain locks, the index of which images each host's domains
// use, and the events of chain changes. Store is the small interface
// every implementation satisfies, and metastoretest the one suite each
// runs: Bolt is the embedded default (one file per host), etcdstore the
// cluster store (several hosts on shared pools).
package metastore

import (
	"context"
	"fmt"
	"time"

	"github.com/xlsnap/xlsnap/errdefs"
)

// ErrNotFound is returned for a domain, snapshot or intent with no record.
// It wraps errdefs.ErrNotFound; its own value, so a record's absence is
// told apart from a missing file.
var ErrNotFound = fmt.Errorf("record %w", errdefs.ErrNotFound)

// ErrLockLost: the domain's lock is no longer held (its lease expired
// while its host was cut off, or it was released): the operation stops
// before its next step and writes nothing more; another host may finish
// or undo it. It wraps errdefs.ErrBusy (libvirt's state change lock, 68).
var ErrLockLost = fmt.Errorf("%w: the domain's lock was lost", errdefs.ErrBusy)

// ErrUnavailable: the store could not be reached (a cluster without
// quorum, no member answering). Nothing was written. It wraps
// errdefs.ErrOperationFailed (9); a call whose context expired waiting
// also wraps the context's error (68).
var ErrUnavailable = fmt.Errorf("%w: metadata store unavailable", errdefs.ErrOperationFailed)

// Store is where xlsnap keeps its metadata. Every call takes a context
// and returns when it ends, with its error.
type Store interface {
	// View runs fn in a read transaction: one consistent view.
	View(ctx context.Context, fn func(Tx) error) error
	// Update runs fn in a write transaction and commits everything fn
	// did or nothing. A write of a domain's records (and of an intent on
	// it) while this store holds that domain's lock commits only if the
	// lock is still held (fencing): ErrLockLost otherwise.
	Update(ctx context.Context, fn func(Tx) error) error
	// Lock takes domain's lock, waiting as long as ctx lets when wait is
	// set, else failing at once with an error wrapping errdefs.ErrBusy.
	// A wait that ctx ends returns ctx's error. The lock serialises
	// operations on the domain across goroutines, processes and (for a
	// cluster store) hosts.
	Lock(ctx context.Context, domain string, wait bool) (Lock, error)
	// PutUsers replaces what publisher (a host and domain source) says
	// its domains' disks use; Users lists every publisher's.
	PutUsers(ctx context.Context, publisher string, uses []ImageUse) error
	Users(ctx context.Context) ([]ImageUse, error)
	// Publish tells watchers of chain changes; Watch returns every event
	// published from now on, by any process or host, until ctx ends (the
	// channel is closed then). A watcher that falls far behind may miss
	// events (the store keeps them for a while, not for ever).
	Publish(ctx context.Context, evs ...Event) error
	Watch(ctx context.Context) (<-chan Event, error)
	Close() error
}

// Local is the optional ability of a store only one host uses (Bolt):
// every definition it serves is that host's, so no image-user index need
// be kept, and no other host's operation is ever found in its journal.
type Local interface{ Local() bool }

// Lock is a held domain lock.
type Lock interface {
	Domain() string
	// Holder names the holder: this host and, for a cluster store, the
	// lease that keeps the lock (journal intents record it).
	Holder() string
	// Lost is closed once the lock is no longer held: released, or its
	// lease expired.
	Lost() <-chan struct{}
	// Unlock releases it; releasing a lost lock is no error.
	Unlock(ctx context.Context) error
}

type lockKey struct{}

// WithLock returns ctx carrying l, so that calls made with it know the
// caller holds l's domain (storage takes a domain's lock once per call).
func WithLock(ctx context.Context, l Lock) context.Context {
	held, _ := ctx.Value(lockKey{}).([]Lock)
	return context.WithValue(ctx, lockKey{}, append(held[:len(held):len(held)], l))
}

// HeldLock returns the lock ctx carries for domain, nil when none or
// when it was lost.
func HeldLock(ctx context.Context, domain string) Lock {
	held, _ := ctx.Value(lockKey{}).([]Lock)
	for _, l := range held {
		if l.Domain() != domain {
			continue
		}
		select {
		case <-l.Lost():
			return nil
		default:
			return l
		}
	}
	return nil
}

// ImageUse is one disk of one domain definition of one host, and every
// image it reads: the index that lets a host see another host's users
// of an image on a shared pool.
type ImageUse struct {
	// Publisher is who published it (a host and domain source).
	Publisher  string `json:"publisher"`
	Host       string `json:"host"`
	Domain     string `json:"domain"`
	DomainName string `json:"domain_name,omitempty"`
	Disk       string `json:"disk"`
	// Chain is the disk's image and every image below it, top to base.
	Chain []string `json:"chain"`
}

// Event tells that one disk's chain changed (see storage.ChainChanged).
type Event struct {
	// Origin is the publishing Manager's own id, so it can skip its own
	// events (it tells its subscribers at once); Host its host.
	Origin   string   `json:"origin"`
	Host     string   `json:"host,omitempty"`
	Domain   string   `json:"domain"`
	Disk     string   `json:"disk"`
	Before   []string `json:"before,omitempty"`
	After    []string `json:"after,omitempty"`
	Reason   string   `json:"reason"`
	Snapshot string   `json:"snapshot,omitempty"`
}

// Tx reads and writes records inside one transaction.
type Tx interface {
	DomainNames() ([]string, error)
	Domain(name string) (*Domain, error)
	PutDomain(d *Domain) error
	DeleteDomain(name string) error

	// Snapshots lists a domain's snapshots without their domain XML, so a
	// tree of thousands lists quickly; Snapshot loads one with its XML.
	Snapshots(domain string) ([]*Snapshot, error)
	Snapshot(domain, name string) (*Snapshot, error)
	PutSnapshot(domain string, s *Snapshot) error
	DeleteSnapshot(domain, name string) error

	Intents() ([]*Intent, error)
	PutIntent(in *Intent) error
	DeleteIntent(id string) error
}

// Domain is what storage knows of a domain: its disks and the tree of
// images they have used.
type Domain struct {
	// Name is the domain's key: its UUID within its source (see
	// storage.DomainKey), so two sources, or two domains of one name,
	// never share records, and a renamed domain keeps its snapshots.
	Name string `json:"name"`
	// DisplayName is the name the source gives the domain now.
	DisplayName string `json:"display_name,omitempty"`
	UUID        string `json:"uuid,omitempty"`
	// Current names the current snapshot, "" when there is none.
	Current string `json:"current,omitempty"`
	Disks   []Disk `json:"disks"`
	// Images maps an image's path to its record: the image tree, since
	// each record names the image it is backed by.
	Images map[string]*Image `json:"images"`
	// Hold, when set, keeps the domain for an outside edit of one
	// disk's chain (see Hold); nil when none.
	Hold *Hold `json:"hold,omitempty"`
}

// Disk is one of a domain's disks and the image it writes to now.
type Disk struct {
	Target string `json:"target"`
	Active string `json:"active"`
	Format string `json:"format"`
}

// Image is one node of the image tree.
type Image struct {
	Format  string `json:"format"`
	Backing string `json:"backing,omitempty"`
	// BackingFormat is the backing image's format, written explicitly.
	BackingFormat string `json:"backing_format,omitempty"`
	// Owned marks images xlsnap created; only those are removed when
	// nothing needs them any more. Others (a template base, say) may be
	// shared with domains xlsnap does not know of.
	Owned bool `json:"owned,omitempty"`
	// Detached marks the last image of a disk that left the definition
	// (or was pointed at another file): it holds that disk's data, which
	// is the user's now, so it is neither removed nor merged away, until
	// a disk names it again.
	Detached bool `json:"detached,omitempty"`
}

// Removable reports an image xlsnap may remove or merge away, once
// nothing uses it: one it created that holds no detached disk's data.
func (img *Image) Removable() bool { return img.Owned && !img.Detached }

// Disk returns the disk with the given target, or nil.
func (d *Domain) Disk(target string) *Disk {
	for i := range d.Disks {
		if d.Disks[i].Target == target {
			return &d.Disks[i]
		}
	}
	return nil
}

// Chain lists the images from top down its recorded backing files, top
// to base. A loop in the records ends it after len(Images)+1 entries, so
// a longer list than there are images shows one.
func (d *Domain) Chain(top string) []string {
	var out []string
	for p := top; p != "" && len(out) <= len(d.Images); {
		out = append(out, p)
		img, ok := d.Images[p]
		if !ok {
			break
		}
		p = img.Backing
	}
	return out
}

// Children lists the images backed by path.
func (d *Domain) Children(path string) []string {
	var out []string
	for p, img := range d.Images {
		if img.Backing == path {
			out = append(out, p)
		}
	}
	return out
}

// Clone returns a deep copy, so a plan can be built without touching the
// record it came from.
func (d *Domain) Clone() *Domain {
	c := *d
	c.Disks = append([]Disk(nil), d.Disks...)
	c.Images = make(map[string]*Image, len(d.Images))
	for p, img := range d.Images {
		cp := *img
		c.Images[p] = &cp
	}
	return &c
}

// DiskMode is a disk's part in a snapshot, as libvirt names it.
type DiskMode string

const (
	DiskNone     DiskMode = "no"
	DiskInternal DiskMode = "internal"
	DiskExternal DiskMode = "external"
)

// Snapshot is one node of a domain's snapshot tree.
type Snapshot struct {
	Name        string    `json:"name"`
	Description string    `json:"description,omitempty"`
	Created     time.Time `json:"created"`
	// State is the domain's state when the snapshot was taken (libvirt's
	// names: shutoff, running, paused).
	State  string `json:"state"`
	Parent string `json:"parent,omitempty"`
	// Memory is the external file holding the saved memory, "" for none.
	Memory string         `json:"memory,omitempty"`
	Disks  []SnapshotDisk `json:"disks"`
	// Damaged says why the snapshot's data may no longer be what it
	// held (an operation set aside past its point of no return): a revert
	// to it is refused; it can be deleted with metadata only.
	Damaged string `json:"damaged,omitempty"`
	// DomainXML is the domain's definition at the time, needed to revert.
	// Stores keep it apart from the record so listings stay small.
	DomainXML string `json:"domain_xml,omitempty"`
	// XML is the snapshot's own document (libvirt's domain snapshot XML
	// without its <domain>, which DomainXML holds), kept so that what a
	// user or libvirt put in and storage has no field for (a disk's
	// driver and seclabels, <inactiveDomain>, <cookie>, internal memory)
	// comes back from dumpxml. The fields above win over it.
	XML string `json:"xml,omitempty"`
}

// SnapshotDisk records how one disk took part in a snapshot.
type SnapshotDisk struct {
	Target string   `json:"target"`
	Mode   DiskMode `json:"mode"`
	// Image holds the snapshot's state: for external snapshots the former
	// active layer, for internal ones the image holding the internal
	// snapshot.
	Image  string `json:"image,omitempty"`
	Format string `json:"format,omitempty"`
	// Overlay is the image created on Image when the snapshot was taken.
	Overlay string `json:"overlay,omitempty"`
}

// Disk returns the snapshot's record of a disk, or nil.
func (s *Snapshot) Disk(target string) *SnapshotDisk {
	for i := range s.Disks {
		if s.Disks[i].Target == target {
			return &s.Disks[i]
		}
	}
	return nil
}

// Intent is a journal record: an operation that changes disks writes it
// before the first change and clears it in the transaction that commits
// the operation's metadata, so recovery can finish or undo it.
type Intent struct {
	ID     string `json:"id"`
	Domain string `json:"domain"`
	Op     string `json:"op"`
	// Steps are the disk changes, in order. Steps before NoReturn are
	// undone on failure; once step NoReturn has started, the operation is
	// finished instead (its state can no longer be restored).
	Steps    []Step `json:"steps"`
	NoReturn int    `json:"no_return"`
	// Commit is the metadata the operation ends with.
	Commit *Commit `json:"commit,omitempty"`
	// Cleanup holds steps that run after Commit is durable (removing
	// images nothing needs). An intent with Committed set is only that.
	Cleanup   []Step `json:"cleanup,omitempty"`
	Committed bool   `json:"committed,omitempty"`
	// Live marks an operation on an active domain: its steps go through
	// the device model, and only the device model can tell how far it got.
	Live bool `json:"live,omitempty"`
	// PassedNoReturn is set, durably, before step NoReturn starts.
	PassedNoReturn bool `json:"passed_no_return,omitempty"`
	// Definition is the definition step: once Commit is durable, the
	// domain's definition is made to name the new active images, and
	// only then does Cleanup remove what the old one named.
	Definition *Definition `json:"definition,omitempty"`
	// Guest, when set, makes this the record of an operation's
	// hypervisor steps (pause, save, destroy, restore, resume), written
	// before the first of them and cleared after the last: only the
	// driver, which reaches the hypervisor, can finish it.
	Guest *Guest `json:"guest,omitempty"`
	// Owner is the host that wrote the intent and Holder the lock (with
	// its lease, for a cluster store) it held: once that lock is gone,
	// another host may finish or undo the disk and metadata steps.
	Owner  string `json:"owner,omitempty"`
	Holder string `json:"holder,omitempty"`
}

// Guest is what an operation does to a running or paused domain, so
// that recovery can put the domain back: resume one it paused, restore
// one it stopped, remove a memory image no snapshot holds.
type Guest struct {
	// WasRunning is the domain's state before (running, else paused).
	WasRunning bool `json:"was_running"`
	// Pauses, Stops: the operation pauses the domain, or stops it (a
	// save that ends the domain, or a destroy before a revert).
	Pauses bool `json:"pauses,omitempty"`
	Stops  bool `json:"stops,omitempty"`
	// Memory is the memory image the operation writes ("" for none);
	// MemoryExisted says a file was there before (never removed then).
	Memory        string `json:"memory,omitempty"`
	MemoryExisted bool   `json:"memory_existed,omitempty"`
	// Snapshot is the snapshot the operation creates or reverts to;
	// Restore says the domain is to be restored from Snapshot's memory
	// (a revert) or from Memory (a save that stops the domain) once the
	// disks are done; RestorePaused how.
	Snapshot      string `json:"snapshot,omitempty"`
	Restore       bool   `json:"restore,omitempty"`
	RestorePaused bool   `json:"restore_paused,omitempty"`
	// Before is each disk's active image before the operation: a revert
	// whose disks still name them never happened.
	Before []string `json:"before,omitempty"`
}

// Definition is what a definition step writes: Base (a whole definition,
// the snapshot's on a revert; "" keeps the current one) with each disk
// of Disks pointed at its active image.
type Definition struct {
	Name  string `json:"name"`
	Base  string `json:"base,omitempty"`
	Disks []Disk `json:"disks"`
}

// Commit is the metadata an operation writes in one transaction.
type Commit struct {
	Domain          *Domain     `json:"domain"`
	PutSnapshots    []*Snapshot `json:"put_snapshots,omitempty"`
	DeleteSnapshots []string    `json:"delete_snapshots,omitempty"`
}

// StepKind names a disk change the journal can redo or undo.
type StepKind string

const (
	StepCreateOverlay  StepKind = "create-overlay"
	StepInternalCreate StepKind = "internal-create"
	StepInternalApply  StepKind = "internal-apply"
	StepInternalDelete StepKind = "internal-delete"
	StepInternalCopy   StepKind = "internal-copy"

	// Steps carried out by a running device model.
	StepLiveSnapshot       StepKind = "live-snapshot"        // one transaction over Group
	StepLiveInternalDelete StepKind = "live-internal-delete" // internal snapshot Name of Path
	StepLiveCommit         StepKind = "live-commit"          // block-commit Path into Backing
	StepLiveStream         StepKind = "live-stream"          // block-stream into Path from above Backing
	StepCommit             StepKind = "commit"
	StepRebase             StepKind = "rebase"
	StepRebaseUnsafe       StepKind = "rebase-unsafe"
	StepRemove             StepKind = "remove"
	// StepLink gives the file at Path a second name, Backing, replacing
	// what Backing named: a pull-up that ends on the user's own name.
	StepLink StepKind = "link"
)

// Step is one disk change with everything needed to run it again.
type Step struct {
	Kind          StepKind `json:"kind"`
	Path          string   `json:"path"`
	Format        string   `json:"format,omitempty"`
	Backing       string   `json:"backing,omitempty"`
	BackingFormat string   `json:"backing_format,omitempty"`
	// UndoBacking is the backing a rebase step restores when undone.
	UndoBacking       string `json:"undo_backing,omitempty"`
	UndoBackingFormat string `json:"undo_backing_format,omitempty"`
	// Source is the image an internal-copy step reads (at snapshot Name).
	Source       string `json:"source,omitempty"`
	SourceFormat string `json:"source_format,omitempty"`
	// Name is the internal snapshot's name for internal steps.
	Name string `json:"name,omitempty"`
	// Group holds the overlays of a live-snapshot step, one per disk.
	Group []Step `json:"group,omitempty"`
	// Disk is the domain disk this step changes, for events.
	Disk string `json:"disk,omitempty"`
	// Pivoting, on a live-commit step of an active layer, records the
	// pivot onto Backing: "pausing" before xlsnap pauses the guest for
	// it, "marked" once Backing holds every write (the guest paused, the
	// job in sync, Backing flushed, just before job-complete), so Path is
	// not committed again; each followed by what xlsnap paused,
	// ",stopped" (the running guest) and ",held" (the back end's vCPUs),
	// which recovery resumes; "" for none (storage/live.go, offline.go).
	Pivoting string `json:"pivoting,omitempty"`
}

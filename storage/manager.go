package storage

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/xlsnap/xlsnap/chain"
	"github.com/xlsnap/xlsnap/internal/domxml"
	"github.com/xlsnap/xlsnap/storage/metastore"
)

// Records, re-exported so callers need not import metastore.
type (
	Domain       = metastore.Domain
	Disk         = metastore.Disk
	Image        = metastore.Image
	Snapshot     = metastore.Snapshot
	SnapshotDisk = metastore.SnapshotDisk
	DiskMode     = metastore.DiskMode
)

const (
	DiskNone     = metastore.DiskNone
	DiskInternal = metastore.DiskInternal
	DiskExternal = metastore.DiskExternal
)

// Config opens a Manager.
type Config struct {
	// StateDir holds xlsnap.db and the lock files.
	StateDir string
	Pools    []PoolConfig
	// Store replaces the embedded bbolt store (a cluster store, say).
	// The Manager closes it, also when Open fails.
	Store metastore.Store
	// Definitions is the domain source's side: every definition's disks,
	// and the definition step of each operation. Nil means storage is
	// used alone: its own records stand in for the definitions.
	Definitions Definitions
	// Source is the domain source's URI (see DomainKey): recovery at Open
	// finishes only the operations of this source's domains; another
	// source's wait for that source (their images need not be in these
	// pools).
	Source string
	// Host names this host to the other hosts of a shared store (intents
	// and published image users carry it); "" is the system's host name.
	Host string
	// AdoptAfter is how long recovery waits, once it holds the lock of a
	// domain another host's operation left pending, before it touches
	// the disks: that host, cut off, may take this long to see its lease
	// gone and stop its step (0 is 2 s).
	AdoptAfter time.Duration
}

// Manager owns the chains and snapshot metadata of every domain in its
// pools. It is safe for concurrent use; operations on one domain are
// serialised, different domains run in parallel.
type Manager struct {
	store    metastore.Store
	stateDir string
	pools    []*pool
	locks    *lockTable
	events   *broker
	defs     Definitions
	headers  headerCache
	// sourceTag ends the keys of this source's domains ("" when used
	// alone: every domain is this Manager's).
	sourceTag string
	// host is this host's name; origin this Manager's own id, which its
	// events carry so that it skips them when they come back.
	host, origin string
	adoptAfter   time.Duration
	// shared: the store is shared with other hosts (not metastore.Local):
	// this host publishes the images its definitions use, reads the
	// others', and may finish another host's operations.
	shared bool
}

type pool struct {
	PoolConfig
	backend Backend
}

// Open opens the store and the pools, then finishes or undoes every
// operation a crash left in the journal before it serves any call.
func Open(ctx context.Context, cfg Config) (*Manager, error) {
	if cfg.StateDir == "" {
		if cfg.Store != nil {
			cfg.Store.Close()
		}
		return nil, fmt.Errorf("%w: no state folder", ErrInvalidArg)
	}
	m := &Manager{stateDir: cfg.StateDir, store: cfg.Store, defs: cfg.Definitions, host: cfg.Host, origin: newOrigin(), adoptAfter: cfg.AdoptAfter}
	if m.adoptAfter <= 0 {
		m.adoptAfter = 2 * time.Second
	}
	if m.host == "" {
		m.host, _ = os.Hostname()
	}
	if cfg.Source != "" {
		m.sourceTag = sourceTag(cfg.Source)
	}
	if m.store == nil {
		s, err := metastore.OpenBolt(ctx, StoreFile(cfg.StateDir))
		if err != nil {
			return nil, err
		}
		m.store = s
	}
	m.locks = newLockTable(m.store)
	if l, ok := m.store.(metastore.Local); !ok || !l.Local() {
		m.shared = true
	}
	m.events = newBroker(m.store, m.origin, m.host)
	for _, pc := range cfg.Pools {
		b, err := openBackend(pc)
		if err != nil {
			m.store.Close()
			return nil, err
		}
		m.pools = append(m.pools, &pool{PoolConfig: pc, backend: b})
	}
	// Other hosts see this one's users of their images from now on; a
	// definition that cannot be read now stops the next scan instead.
	_ = m.publishUses(ctx)
	// An operation recovery cannot finish yet stays in the journal: its
	// domain's next operation says so (ErrPending), reads go on, Check
	// lists it and Repair sets it aside. It never stops the whole store.
	_ = m.Recover(ctx)
	return m, nil
}

// Store is the metadata store under the Manager, for tools and tests
// that read or write its records directly.
func (m *Manager) Store() metastore.Store { return m.store }

// Close releases the store.
func (m *Manager) Close() error {
	m.events.close()
	return m.store.Close()
}

// poolOf finds the pool whose folder holds path.
func (m *Manager) poolOf(path string) (*pool, error) {
	for _, p := range m.pools {
		root := p.backend.Root()
		if strings.HasPrefix(path, root+"/") {
			return p, nil
		}
	}
	return nil, fmt.Errorf("%w: %s is in no pool", ErrInvalidArg, path)
}

// InPools checks, before a caller hands path to anything, what every
// chain walk checks of the images it reads: that path, its symlinks
// resolved, lies inside a pool. ErrUnsafeBacking
// (VIR_ERR_CONFIG_UNSUPPORTED, 67) when it does not; ErrInvalidArg (8)
// when it cannot be resolved.
func (m *Manager) InPools(path string) error {
	real, err := filepath.EvalSymlinks(path)
	if err != nil {
		return fmt.Errorf("%w: %s: %v", ErrInvalidArg, path, err)
	}
	for _, root := range m.policy().Roots {
		if r, err := filepath.EvalSymlinks(root); err == nil && strings.HasPrefix(real, r+"/") {
			return nil
		}
	}
	return fmt.Errorf("%w: %s resolves outside the pools", ErrUnsafeBacking, path)
}

// policy is the chain policy of every walk: images stay inside the pools.
func (m *Manager) policy() chain.Policy {
	p := chain.Policy{}
	for _, pl := range m.pools {
		p.Roots = append(p.Roots, pl.backend.Root())
	}
	return p
}

// ValidName refuses names that could escape a folder or confuse a lock
// file: domain and snapshot names end up in file names.
func ValidName(kind, name string) error { return CheckName(kind, name) }

// DiskSpec names a disk and the image it writes to.
type DiskSpec struct {
	Target string
	Path   string
	Format string
}

// DomainKey is the key storage keeps a domain's records under: its UUID
// within its source (source is the source's URI), so two sources, or two
// domains of one name, never share records and a renamed domain keeps
// its snapshots. A definition without a UUID is keyed by its name.
func DomainKey(source, uuid, name string) string {
	id := strings.ToLower(uuid)
	if id == "" {
		id = "name-" + name
	}
	return id + "@" + sourceTag(source)
}

func sourceTag(source string) string {
	sum := sha256.Sum256([]byte(source))
	return hex.EncodeToString(sum[:6])
}

// mine reports whether a domain key is of this Manager's source.
func (m *Manager) mine(key string) bool {
	return m.sourceTag == "" || strings.HasSuffix(key, "@"+m.sourceTag)
}

// DefineDomain records a domain's disks under key and walks their chains
// into its image tree. For a known disk, storage's record wins over a
// path that is an older layer of the disk's own chain (a definition not yet
// rewritten after an operation, say after a crash): the caller compares
// the returned disks with its definition and rewrites it. A path storage
// never saw is taken as the operator's change and adopted. The active
// image of a disk that left the definition, or whose source now names
// another file, holds that disk's data: it becomes the user's (never
// removed by xlsnap).
func (m *Manager) DefineDomain(ctx context.Context, key, name, uuid string, disks []DiskSpec) (*Domain, error) {
	if err := ValidName("domain", key); err != nil {
		return nil, err
	}
	unlock, err := m.lockDomain(ctx, key)
	if err != nil {
		return nil, err
	}
	defer unlock()
	var d, before *Domain
	err = m.store.View(ctx, func(tx metastore.Tx) error {
		var err error
		d, err = tx.Domain(key)
		if errors.Is(err, metastore.ErrNotFound) {
			d, err = &Domain{Name: key, Images: map[string]*Image{}}, nil
		} else if err == nil {
			before = d.Clone()
		}
		return err
	})
	if err != nil {
		return nil, err
	}
	d.UUID, d.DisplayName = uuid, name
	var next []Disk
	moves := map[string]string{}
	for _, ds := range disks {
		if err := ValidName("disk", ds.Target); err != nil {
			return nil, err
		}
		abs, err := filepath.Abs(ds.Path)
		if err != nil {
			return nil, err
		}
		format := ds.Format
		if old := d.Disk(ds.Target); old != nil && old.Active != abs {
			// Only a layer below this disk's own active image is a
			// definition left behind; any other image (another disk's, a
			// detached one) is the operator's choice.
			if below := d.Chain(old.Active); len(below) > 1 && slices.Contains(below[1:], abs) {
				abs, format = old.Active, old.Format
			}
		}
		if _, err := m.poolOf(abs); err != nil {
			return nil, fmt.Errorf("disk %s: %w", ds.Target, err)
		}
		c, err := chain.Walk(ctx, abs, chain.Format(format), m.policy())
		if err != nil {
			return nil, fmt.Errorf("disk %s: %w", ds.Target, err)
		}
		if old := d.Disk(ds.Target); old != nil && old.Active != abs {
			detectMoves(d, d.Chain(old.Active), layerPaths(c), moves)
		}
		m.recordChain(d, c)
		next = append(next, Disk{Target: ds.Target, Active: abs, Format: c.Top().Format.String()})
	}
	for _, old := range d.Disks {
		if _, moved := moves[old.Active]; moved {
			continue
		}
		// An image the disk now reads through (a layer the operator put
		// on top) is still the disk's; any other is left behind.
		if nd := findDisk(next, old.Target); nd == nil || !slices.Contains(d.Chain(nd.Active), old.Active) {
			if img := d.Images[old.Active]; img != nil {
				img.Detached = true
			}
		}
	}
	d.Disks = next
	for _, disk := range next {
		if img := d.Images[disk.Active]; img != nil {
			img.Detached = false // a disk names it again: its own
		}
	}
	// Most calls find nothing changed: then no write (and no fsync).
	if before != nil && reflect.DeepEqual(before, d) {
		return d, nil
	}
	err = m.store.Update(ctx, func(tx metastore.Tx) error {
		if err := m.applyMoves(tx, d, moves); err != nil {
			return err
		}
		return tx.PutDomain(d)
	})
	if err != nil {
		return nil, err
	}
	if before != nil {
		// A chain edited behind storage's back, or a disk the operator
		// repointed, is adopted here: tell subscribers, as ChainChanged does.
		m.publishChanges(before, d, "rescan", "")
	}
	return d, m.backup(ctx)
}

// detectMoves finds images that moved: where a disk's recorded chain and
// the chain on disk differ layer by layer, a recorded image that is gone
// and a layer the tree does not know are one image under a new name.
func detectMoves(d *Domain, recorded, onDisk []string, moves map[string]string) {
	if len(recorded) != len(onDisk) {
		return
	}
	for i, o := range recorded {
		n := onDisk[i]
		if _, known := d.Images[n]; o != n && !known && !exists(o) {
			moves[o] = n
		}
	}
}

// applyMoves renames moved images in d's tree and in every snapshot
// record of d, in tx. The new names' records must be in the tree
// already (recordChain); what the old ones knew (Owned) carries over.
func (m *Manager) applyMoves(tx metastore.Tx, d *Domain, moves map[string]string) error {
	if len(moves) == 0 {
		return nil
	}
	for o, n := range moves {
		if img, ok := d.Images[o]; ok {
			if ni := d.Images[n]; ni != nil {
				ni.Owned, ni.Detached = img.Owned, img.Detached
			} else {
				d.Images[n] = img
			}
			delete(d.Images, o)
		}
		for _, img := range d.Images {
			if img.Backing == o {
				img.Backing = n
			}
		}
		for i := range d.Disks {
			if d.Disks[i].Active == o {
				d.Disks[i].Active = n
			}
		}
	}
	for _, disk := range d.Disks {
		if img := d.Images[disk.Active]; img != nil {
			img.Detached = false
		}
	}
	list, err := tx.Snapshots(d.Name)
	if err != nil {
		return err
	}
	for _, s := range list {
		dirty := false
		for i := range s.Disks {
			sd := &s.Disks[i]
			if n, ok := moves[sd.Image]; ok {
				sd.Image, dirty = n, true
			}
			if n, ok := moves[sd.Overlay]; ok {
				sd.Overlay, dirty = n, true
			}
		}
		// The definition of the snapshot's time names the images its
		// disks read then: a revert writes it back, so it must name
		// where they are now (a disk it left out of the snapshot too).
		full, err := tx.Snapshot(d.Name, s.Name)
		if err != nil {
			return err
		}
		doc, changed, err := domxml.MoveSources(full.DomainXML, moves)
		if err != nil {
			return fmt.Errorf("%w: the definition in snapshot %s: %w", ErrDamaged, s.Name, err)
		}
		if !dirty && !changed {
			continue
		}
		s.DomainXML = doc
		if err := tx.PutSnapshot(d.Name, s); err != nil {
			return err
		}
	}
	return nil
}

func findDisk(disks []Disk, target string) *Disk {
	for i := range disks {
		if disks[i].Target == target {
			return &disks[i]
		}
	}
	return nil
}

// recordChain adds a chain's images to the tree, keeping what is known.
func (m *Manager) recordChain(d *Domain, c *chain.Chain) {
	for i, l := range c.Layers {
		path := filepath.Clean(l.Path)
		img, ok := d.Images[path]
		if !ok {
			img = &Image{}
			d.Images[path] = img
		}
		img.Format = l.Format.String()
		img.Backing, img.BackingFormat = "", ""
		if i+1 < len(c.Layers) {
			img.Backing, img.BackingFormat = filepath.Clean(c.Layers[i+1].Path), l.BackingFormat
		}
	}
}

// Domain returns a domain's record.
func (m *Manager) Domain(ctx context.Context, name string) (*Domain, error) {
	var d *Domain
	err := m.store.View(ctx, func(tx metastore.Tx) error {
		var err error
		d, err = m.domain(tx, name)
		return err
	})
	return d, err
}

func (m *Manager) domain(tx metastore.Tx, name string) (*Domain, error) {
	d, err := tx.Domain(name)
	if errors.Is(err, metastore.ErrNotFound) {
		return nil, fmt.Errorf("%w: %s", ErrNoDomain, name)
	}
	return d, err
}

// Domains lists the domains with records.
func (m *Manager) Domains(ctx context.Context) ([]string, error) {
	var names []string
	err := m.store.View(ctx, func(tx metastore.Tx) error {
		var err error
		names, err = tx.DomainNames()
		return err
	})
	return names, err
}

// Snapshots lists a domain's snapshots (without their domain XML).
func (m *Manager) Snapshots(ctx context.Context, domain string) ([]*Snapshot, error) {
	var out []*Snapshot
	err := m.store.View(ctx, func(tx metastore.Tx) error {
		if _, err := m.domain(tx, domain); err != nil {
			return err
		}
		var err error
		out, err = tx.Snapshots(domain)
		return err
	})
	return out, err
}

// Snapshot returns one snapshot with its domain XML.
func (m *Manager) Snapshot(ctx context.Context, domain, name string) (*Snapshot, error) {
	var s *Snapshot
	err := m.store.View(ctx, func(tx metastore.Tx) error {
		var err error
		s, err = m.snapshot(tx, domain, name)
		return err
	})
	return s, err
}

func (m *Manager) snapshot(tx metastore.Tx, domain, name string) (*Snapshot, error) {
	d, err := m.domain(tx, domain)
	if err != nil {
		return nil, err
	}
	s, err := tx.Snapshot(domain, name)
	if errors.Is(err, metastore.ErrNotFound) {
		return nil, fmt.Errorf("%w: %s of domain %s", ErrNoSnapshot, name, domainName(d))
	}
	return s, err
}

// lockTable takes domain locks from the store and remembers those this
// Manager holds: a call whose context carries one (Lock) takes it no
// second time, and an operation sees its lock lost.
type lockTable struct {
	store metastore.Store
	mu    sync.Mutex
	held  map[string]metastore.Lock
}

func newLockTable(store metastore.Store) *lockTable {
	return &lockTable{store: store, held: map[string]metastore.Lock{}}
}

// lock takes the domain's lock unless ctx carries it (Lock); with wait
// false it fails with ErrBusy at once instead of waiting for ctx. A wait
// that ctx ends fails with ctx's error, not ErrBusy: the caller gave up,
// and one that retries on busy must not retry a cancelled call.
func (l *lockTable) lock(ctx context.Context, domain string, wait bool) (func(), error) {
	if l.carried(ctx, domain) != nil {
		return func() {}, nil
	}
	lk, err := l.store.Lock(ctx, domain, wait)
	if err != nil {
		return nil, err
	}
	l.mu.Lock()
	l.held[domain] = lk
	l.mu.Unlock()
	return func() {
		l.mu.Lock()
		if l.held[domain] == lk {
			delete(l.held, domain)
		}
		l.mu.Unlock()
		// A release must happen even for a caller that gave up.
		lk.Unlock(context.WithoutCancel(ctx))
	}, nil
}

// carried returns the lock ctx carries for domain when this Manager
// took it and holds it still.
func (l *lockTable) carried(ctx context.Context, domain string) metastore.Lock {
	lk := metastore.HeldLock(ctx, domain)
	if lk == nil {
		return nil
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.held[domain] != lk {
		return nil
	}
	return lk
}

// holding returns the lock this Manager holds on domain, or nil.
func (l *lockTable) holding(domain string) metastore.Lock {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.held[domain]
}

// Lock takes a domain's lock for a whole call of several operations
// (the driver's: a sync, then a snapshot, then a rewrite of the
// definition), waiting as long as ctx lets: every storage call made with
// the returned context takes it no second time. The function releases
// it. Errors: ErrBusy from the store, or ctx's error when it ends while
// waiting.
func (m *Manager) Lock(ctx context.Context, domain string) (context.Context, func(), error) {
	if err := ValidName("domain", domain); err != nil {
		return nil, nil, err
	}
	if m.locks.carried(ctx, domain) != nil {
		return ctx, func() {}, nil
	}
	unlock, err := m.locks.lock(ctx, domain, true)
	if err != nil {
		return nil, nil, err
	}
	return metastore.WithLock(ctx, m.locks.holding(domain)), unlock, nil
}

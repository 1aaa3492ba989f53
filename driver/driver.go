package driver

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/xlsnap/xlsnap/storage"
	"github.com/xlsnap/xlsnap/storage/backend/dir"
	"github.com/xlsnap/xlsnap/storage/metastore"
	"github.com/xlsnap/xlsnap/xenlight"
)

// Config opens a Driver.
type Config struct {
	// StateDir holds the metadata store and lock files.
	StateDir string
	Source   DomainSource
	// Pools are the folders images may live in. Empty means the folders
	// of every disk of every domain the source has now.
	Pools []string
	// MaxDepth is the most layers a disk's chain may have in every pool,
	// a snapshot's new overlay included: a snapshot that would pass it
	// first coalesces, else fails with ChainTooLongError. 0 means
	// storage.DefaultMaxDepth (30, XAPI's limit). PoolMaxDepth sets it for
	// one pool, by the folder as Pools names it.
	MaxDepth     int
	PoolMaxDepth map[string]int
	// Hypervisor drives active domains; nil means every domain is treated
	// as the source reports it and active ones are refused.
	Hypervisor xenlight.Hypervisor
	// Store is the metadata store: nil is the embedded bbolt file in
	// StateDir (one host); a cluster store (etcdstore) shares records,
	// locks, image users and events with the other hosts of a shared
	// pool. The driver closes it.
	Store metastore.Store
	// Host names this host to the others of a cluster store; "" is the
	// system's host name.
	Host string
}

// Driver is libvirt's domain snapshot API over xlsnap's storage layer.
// It is safe for concurrent use.
type Driver struct {
	src  DomainSource
	st   *storage.Manager
	h    xenlight.Hypervisor
	defs definitions

	mu      sync.Mutex
	domains map[string]chan struct{}
	// closed refuses new subscriptions once Close has ended the others.
	closed atomic.Bool
}

// lock serialises the driver's calls on one domain: storage serialises
// its own operations, and this keeps each definition rewrite in step with
// the operation it follows. (Across processes a late rewrite is mended by
// the next call's sync, since storage's record wins.)
func (d *Driver) lock(ctx context.Context, domain string) (func(), error) {
	d.mu.Lock()
	if d.domains == nil {
		d.domains = map[string]chan struct{}{}
	}
	ch, ok := d.domains[domain]
	if !ok {
		ch = make(chan struct{}, 1)
		d.domains[domain] = ch
	}
	d.mu.Unlock()
	// A caller that gives up while another call holds the domain gets
	// its context's error, as storage's own lock wait returns it.
	select {
	case ch <- struct{}{}:
		return func() { <-ch }, nil
	case <-ctx.Done():
		return nil, fmt.Errorf("waiting for domain %s, busy with another call: %w", domain, ctx.Err())
	}
}

// lockCall serialises a call on one domain for its whole length, across
// processes and hosts too: the driver's own slot, then storage's lock of
// the domain's key, which the returned context carries so that storage
// takes it no second time (once per call, not once per storage step). A
// definition that cannot be read is left to the call's sync to report.
// A domain held for an outside edit (ChainChanging) is waited for, with
// neither lock taken, until the hold ends or ctx does (*HeldError).
func (d *Driver) lockCall(ctx context.Context, domain string) (context.Context, func(), error) {
	return d.lockCallFor(ctx, domain, holdPolicy{})
}

// lockCallFor is lockCall with what to do about a hold (holdPolicy).
func (d *Driver) lockCallFor(ctx context.Context, domain string, hp holdPolicy) (context.Context, func(), error) {
	for {
		unlock, err := d.lock(ctx, domain)
		if err != nil {
			return nil, nil, err
		}
		_, _, key, err := d.readDefinition(ctx, domain)
		if err != nil || storage.ValidName("domain", domain) != nil {
			return ctx, unlock, nil
		}
		sctx, unlockKey, err := d.st.Lock(ctx, key)
		if err != nil {
			unlock()
			return nil, nil, err
		}
		held, err := d.heldBy(sctx, key, hp)
		if err == nil && held == nil {
			return sctx, func() { unlockKey(); unlock() }, nil
		}
		unlockKey()
		unlock()
		switch {
		case err != nil:
			return nil, nil, err
		case hp.refuse:
			return nil, nil, held
		}
		if err := d.waitHold(ctx, key, held); err != nil {
			return nil, nil, err
		}
	}
}

// Open opens the storage layer over the pools (the folders of every disk
// the source defines when cfg.Pools is empty) and finishes or undoes what
// a crash left in its journal; an operation it cannot finish yet stays
// there and its domain's next change returns ErrPending.
//
// Errors: ErrInvalidArg (VIR_ERR_INVALID_ARG, 8) for a Config without a
// source or state folder; ErrDamaged (VIR_ERR_OPERATION_FAILED, 9) for a
// metadata store that cannot be trusted; the source's own listing the
// domains; the file system's own for a state folder that cannot be
// written (VIR_ERR_INTERNAL_ERROR, 1, as nothing of errdefs describes it).
func Open(ctx context.Context, cfg Config) (*Driver, error) {
	if cfg.Source == nil {
		if cfg.Store != nil {
			cfg.Store.Close()
		}
		return nil, invalidf("no domain source")
	}
	pools := cfg.Pools
	if len(pools) == 0 {
		var err error
		if pools, err = diskFolders(ctx, cfg.Source); err != nil {
			if cfg.Store != nil {
				cfg.Store.Close()
			}
			return nil, err
		}
	}
	// Backends are registered by their consumer, explicitly.
	storage.Register("dir", dir.New)
	defs := definitions{src: cfg.Source}
	sc := storage.Config{StateDir: cfg.StateDir, Definitions: defs, Source: cfg.Source.URI(), Store: cfg.Store, Host: cfg.Host}
	for p := range cfg.PoolMaxDepth {
		if !slices.Contains(pools, p) {
			return nil, invalidf("a depth limit for %s, which is none of the pools %v", p, pools)
		}
	}
	for i, p := range pools {
		depth, ok := cfg.PoolMaxDepth[p]
		if !ok {
			depth = cfg.MaxDepth
		}
		sc.Pools = append(sc.Pools, storage.PoolConfig{Name: fmt.Sprintf("pool%d", i), Type: "dir", Path: p, MaxDepth: depth})
	}
	st, err := storage.Open(ctx, sc)
	if err != nil {
		return nil, err
	}
	return &Driver{src: cfg.Source, st: st, h: cfg.Hypervisor, defs: defs}, nil
}

// Close releases the storage layer and closes every Subscribe channel.
// Errors: the metadata store's, closing it.
func (d *Driver) Close() error {
	d.closed.Store(true)
	return d.st.Close()
}

// Storage is the storage layer under the driver, for tools and tests
// that read its records directly. Its types are storage's and may change
// with it; the driver's own calls (Check, Subscribe, the snapshot calls)
// are the stable surface.
func (d *Driver) Storage() *storage.Manager { return d.st }

// diskFolders lists the folders of every file disk the source knows.
func diskFolders(ctx context.Context, src DomainSource) ([]string, error) {
	names, err := src.Domains(ctx)
	if err != nil {
		return nil, err
	}
	seen := map[string]bool{}
	for _, n := range names {
		// A file that is not a domain definition is not this call's
		// business: the domain it names reports it when used.
		sd, err := src.Domain(ctx, n)
		if err != nil {
			continue
		}
		def, err := parseDomain(sd.XML)
		if err != nil {
			continue
		}
		for _, disk := range fileDisks(def) {
			abs, err := filepath.Abs(disk.Path)
			if err != nil {
				return nil, err
			}
			real, err := filepath.EvalSymlinks(filepath.Dir(abs))
			if err != nil {
				continue // a disk folder that is gone: its domain will report it
			}
			seen[real] = true
		}
	}
	var out []string
	for p := range seen {
		out = append(out, p)
	}
	sort.Strings(out)
	return out, nil
}

// domainView is a domain as the driver works on it: the source's
// definition and storage's record, made to agree.
type domainView struct {
	// key is the domain's key in storage (storage.DomainKey).
	key   string
	src   *SourceDomain
	disks []diskInfo
	rec   *storage.Domain
}

// sync reads a domain from its source and brings storage's record and
// the definition into agreement (see storage.DefineDomain): a definition
// left behind by an interrupted operation is rewritten here.
// Callers hold the domain's lock.
func (d *Driver) sync(ctx context.Context, name string) (*domainView, error) {
	if err := storage.ValidName("domain", name); err != nil {
		return nil, err
	}
	sd, err := d.src.Domain(ctx, name)
	if err != nil {
		return nil, err
	}
	def, err := parseDomain(sd.XML)
	if err != nil {
		return nil, err
	}
	key := d.defs.key(name, def.UUID)
	gone := false // the hypervisor runs no device model for the domain
	if d.h != nil {
		st, err := d.h.State(ctx, name)
		if err != nil {
			return nil, err
		}
		gone = st == xenlight.Shutoff
		if st != xenlight.Shutoff {
			sd.State = DomainState(st)
		}
		// Hypervisor steps a crash left half-done come first: the
		// domain is put back (resumed, restored) before anything else.
		if sd.State, err = d.recoverGuest(ctx, key, name, sd.State); err != nil {
			return nil, err
		}
	}
	if sd.State.Active() {
		// Operations a crash left half-done on this domain can be judged
		// now that its device model is reachable; before anything else.
		if err := d.st.RecoverLive(ctx, key, xenlight.NewLive(d.h, name)); err != nil {
			return nil, err
		}
	} else if gone {
		// A device model that died in the middle of a live operation
		// left the domain shut off, as the hypervisor said just now under
		// this call's lock: what it left half-done is judged from the
		// images.
		if err := d.st.RecoverOffline(ctx, key); err != nil {
			return nil, err
		}
	}
	// A pending operation's definition step may rewrite the definition:
	// finish it, then read what the definition names.
	if err := d.st.RecoverDomain(ctx, key); err != nil {
		return nil, err
	}
	state := sd.State
	if sd, err = d.src.Domain(ctx, name); err != nil {
		return nil, err
	}
	if def, err = parseDomain(sd.XML); err != nil {
		return nil, err
	}
	sd.State = state
	disks := fileDisks(def)
	var specs []storage.DiskSpec
	for _, di := range disks {
		specs = append(specs, storage.DiskSpec{Target: di.Target, Path: di.Path, Format: di.Format})
	}
	rec, err := d.st.DefineDomain(ctx, key, name, def.UUID, specs)
	if err != nil {
		return nil, err
	}
	v := &domainView{key: key, src: sd, disks: disks, rec: rec}
	if err := d.writeDisks(ctx, v); err != nil {
		return nil, err
	}
	return v, nil
}

// writeDisks rewrites the definition's disk sources to storage's active
// layers when they differ.
func (d *Driver) writeDisks(ctx context.Context, v *domainView) error {
	want := map[string]diskInfo{}
	changed := false
	for i, di := range v.disks {
		rd := v.rec.Disk(di.Target)
		if rd == nil {
			continue
		}
		if abs, _ := filepath.Abs(di.Path); abs != rd.Active || di.Format != rd.Format {
			changed = true
		}
		v.disks[i].Path, v.disks[i].Format = rd.Active, rd.Format
		want[di.Target] = v.disks[i]
	}
	if !changed {
		return nil
	}
	def, err := parseDomain(v.src.XML)
	if err != nil {
		return err
	}
	repointDisks(def, want)
	doc, err := marshalDomain(def)
	if err != nil {
		return err
	}
	if err := d.src.Redefine(ctx, v.src.Name, doc); err != nil {
		return fmt.Errorf("rewriting the definition of %s: %w", v.src.Name, err)
	}
	v.src.XML = doc
	return nil
}

// afterChange re-reads storage's record and the definition, which the
// operation's definition step rewrote; a definition that still differs
// (a definition step that failed) is rewritten here.
func (d *Driver) afterChange(ctx context.Context, v *domainView) error {
	rec, err := d.st.Domain(ctx, v.key)
	if err != nil {
		return err
	}
	sd, err := d.src.Domain(ctx, v.src.Name)
	if err != nil {
		return err
	}
	def, err := parseDomain(sd.XML)
	if err != nil {
		return err
	}
	v.rec, v.src.XML, v.disks = rec, sd.XML, fileDisks(def)
	return d.writeDisks(ctx, v)
}

// live returns the device-model executor of an active domain, or an
// error when no hypervisor back end is configured.
func (d *Driver) live(v *domainView, what string) (*xenlight.Live, error) {
	if d.h == nil {
		return nil, fmt.Errorf("%w: %s of %s domain %s needs a hypervisor back end", ErrLiveUnsupported, what, v.src.State, v.src.Name)
	}
	return xenlight.NewLive(d.h, v.src.Name), nil
}

// DiskInfo is one disk as domblklist shows it, with its recorded chain.
type DiskInfo struct {
	Target string   `json:"target"`
	Source string   `json:"source"`
	Format string   `json:"format"`
	Chain  []string `json:"chain"`
	// Pending says an operation on the domain is still in the journal
	// (the list is then the definition as it stands, unchanged).
	Pending string `json:"pending,omitempty"`
}

// DiskList is virsh's domblklist (virDomainGetXMLDesc's disks): each
// file disk, its active layer and its recorded chain. While an operation
// on the domain is pending in the journal it still answers, from the
// definition as it stands, and says so in Pending.
//
// Errors: those every call that reads a domain returns (see the package
// documentation). While the domain is held for an outside edit
// (ChainChanging) it answers the same way, from the records, and says
// so in Pending.
func (d *Driver) DiskList(ctx context.Context, domain string) ([]DiskInfo, error) {
	lctx, unlock, err := d.lockCallFor(ctx, domain, holdPolicy{refuse: true})
	if held := (*HeldError)(nil); errors.As(err, &held) {
		return d.diskListAsIs(ctx, domain, heldNote(held))
	}
	if err != nil {
		return nil, err
	}
	ctx = lctx
	defer unlock()
	v, err := d.sync(ctx, domain)
	if errors.Is(err, storage.ErrPending) {
		return d.diskListAsIs(ctx, domain, err)
	}
	if err != nil {
		return nil, err
	}
	var out []DiskInfo
	for _, di := range v.disks {
		out = append(out, DiskInfo{Target: di.Target, Source: di.Path, Format: di.Format, Chain: v.rec.Chain(di.Path)})
	}
	return out, nil
}

// diskListAsIs is DiskList while an operation is pending: a read-only
// call still answers, from the definition and the records as they are,
// and says what is pending.
func (d *Driver) diskListAsIs(ctx context.Context, domain string, pending error) ([]DiskInfo, error) {
	_, def, key, err := d.readDefinition(ctx, domain)
	if err != nil {
		return nil, err
	}
	rec, _ := d.st.Domain(ctx, key)
	var out []DiskInfo
	for _, di := range fileDisks(def) {
		info := DiskInfo{Target: di.Target, Source: di.Path, Format: di.Format, Chain: []string{di.Path}, Pending: pending.Error()}
		if rec != nil {
			info.Chain = rec.Chain(di.Path)
		}
		out = append(out, info)
	}
	return out, nil
}

// tempSource is the optional ability of a domain source to find (and
// remove) the temporary files a crash inside Redefine left.
type tempSource interface {
	StaleTemps(age time.Duration, remove bool) ([]string, error)
}

// Check compares the metadata with the disks and the pools and reports
// every difference (storage's Check), plus what the domain source itself
// may have left behind (stale temporary definitions). With repair it
// finishes pending operations, rescans chains that changed and removes
// stale temporary definitions, reporting each as Fixed; it removes no
// image. A clean store is an empty list. libvirt has no such call.
//
// Errors: ErrDamaged (VIR_ERR_OPERATION_FAILED, 9) for a metadata store
// that cannot be trusted; ErrBusy (VIR_ERR_OPERATION_TIMEOUT, 68) when
// repair waits on a domain another operation holds; the source's errors
// reading definitions; a cancelled context (VIR_ERR_OPERATION_ABORTED, 78).
func (d *Driver) Check(ctx context.Context, repair bool) ([]Problem, error) {
	check := d.st.Check
	if repair {
		check = d.st.Repair
	}
	found, err := check(ctx)
	if err != nil {
		return nil, err
	}
	problems := make([]Problem, 0, len(found))
	for _, p := range found {
		problems = append(problems, problemOf(p))
	}
	if ts, ok := d.src.(tempSource); ok {
		temps, err := ts.StaleTemps(10*time.Minute, repair)
		if err != nil {
			return nil, err
		}
		for _, p := range temps {
			problems = append(problems, Problem{Kind: ProblemTempFile, Path: p,
				Detail: "a definition a crash left half-written", Fixed: repair})
		}
	}
	return problems, nil
}

package metastore

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"syscall"
	"time"

	bolt "go.etcd.io/bbolt"
	bolterrors "go.etcd.io/bbolt/errors"

	"github.com/xlsnap/xlsnap/errdefs"
)

// ErrLocked is returned when another process keeps the database locked
// past the context's deadline. It wraps errdefs.ErrBusy: libvirt's state
// change lock timing out is the same failure.
var ErrLocked = fmt.Errorf("%w: metadata store is locked by another process", errdefs.ErrBusy)

var (
	bucketDomains = []byte("domains")
	bucketIntents = []byte("intents")
	keyMeta       = []byte("meta")
	bucketSnaps   = []byte("snapshots")
	bucketXML     = []byte("xml")
)

// Bolt is the embedded store: one bbolt file, opened once per process
// (every OpenBolt of one file in a process shares it) and kept open while
// the process uses it. bbolt locks the whole file while it is open, so a
// process that wants it while another holds it says so (a shared lock on
// FILE.wait) and the holder closes it at its next idle moment: several
// xlsnap processes still work on different domains at once, each holding
// the file only between its transactions.
type Bolt struct {
	f      *boltFile
	closed sync.Once
}

// OpenBolt creates the database (and its folder) if needed, and verifies
// it: every record read, bbolt's consistency check run. Errors: one
// wrapping ErrDamaged for a file that cannot be trusted, ErrLocked when
// another process keeps it past ctx's end, the file system's own.
func OpenBolt(ctx context.Context, path string) (*Bolt, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, err
	}
	f, err := shareFile(path)
	if err != nil {
		return nil, err
	}
	b := &Bolt{f: f}
	// Read-only first, when the file is not open already: a damaged file
	// is then only read, and a cut one is told as such (bbolt's write
	// mode reads the free list at once).
	if err := f.verify(ctx); err != nil && !errors.Is(err, fs.ErrNotExist) {
		b.Close()
		return nil, err
	}
	if err := b.Update(ctx, func(Tx) error { return nil }); err != nil {
		b.Close()
		return nil, err
	}
	return b, nil
}

// Verify reads every record and runs bbolt's consistency check: an
// error wrapping ErrDamaged says the file cannot be trusted.
func (b *Bolt) Verify(ctx context.Context) error { return b.f.verify(ctx) }

// create makes a new store under a temporary name and links it into
// place, so no process ever finds the store's file empty (bbolt would
// take an empty file for a new store; here it means damage).
func create(path string) error {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, filepath.Base(path)+".new-*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	f.Close()
	defer os.Remove(tmp)
	db, err := bolt.Open(tmp, 0o600, nil)
	if err != nil {
		return err
	}
	if err := db.Close(); err != nil {
		return err
	}
	if err := os.Link(tmp, path); err != nil && !errors.Is(err, fs.ErrExist) {
		return err
	}
	return syncDir(dir)
}

// View runs fn in a read transaction of the shared database.
func (b *Bolt) View(ctx context.Context, fn func(Tx) error) error {
	return b.f.run(ctx, false, func(tx *bolt.Tx) error { return fn(&boltTx{tx: tx, path: b.f.path}) })
}

// Update runs fn in a write transaction (bbolt's: one writer at a time,
// fsynced at commit). Fencing needs nothing here: a lock file is held
// until it is released.
func (b *Bolt) Update(ctx context.Context, fn func(Tx) error) error {
	return b.f.run(ctx, true, func(tx *bolt.Tx) error {
		for _, name := range [][]byte{bucketDomains, bucketIntents} {
			if _, err := tx.CreateBucketIfNotExists(name); err != nil {
				return err
			}
		}
		return fn(&boltTx{tx: tx, path: b.f.path})
	})
}

// Lock takes the domain's lock: the process's own slot, then the lock
// file locks/DOMAIN.lock beside the database for other processes.
func (b *Bolt) Lock(ctx context.Context, domain string, wait bool) (Lock, error) {
	release, err := b.f.locks.Take(ctx, domain, wait)
	if err != nil {
		return nil, err
	}
	unlockFile, err := lockFile(ctx, filepath.Join(filepath.Dir(b.f.path), "locks", domain+".lock"), wait)
	if err != nil {
		release()
		if ctx.Err() != nil {
			return nil, fmt.Errorf("waiting for domain %s, busy in another process: %w", domain, ctx.Err())
		}
		return nil, fmt.Errorf("%w: %s: %w", errdefs.ErrBusy, domain, err)
	}
	return &heldLock{domain: domain, holder: fmt.Sprintf("pid %d", os.Getpid()), lost: make(chan struct{}),
		release: func(context.Context) error { unlockFile(); release(); return nil }}, nil
}

// Local: a bbolt file is one host's.
func (b *Bolt) Local() bool { return true }

// Close lets go of the file: the last Close in the process closes it.
func (b *Bolt) Close() error {
	var err error
	b.closed.Do(func() { err = b.f.unshare() })
	return err
}

// files holds the process's open stores, by path: one bbolt.DB each.
var (
	filesMu sync.Mutex
	files   = map[string]*boltFile{}
)

// boltFile is one store file as the process holds it.
type boltFile struct {
	path   string
	shares int // open Bolt values; guarded by filesMu
	locks  *Slots

	mu      sync.Mutex
	db      *bolt.DB
	refs    int           // transactions running
	opening chan struct{} // closed when an open in progress ends
	ident   fileIdent     // the file as this process last left it
	drop    bool          // damage seen: close at the next idle moment
	idle    time.Time
	timer   *time.Timer
	wait    *os.File // FILE.wait, to see waiting processes
}

func shareFile(path string) (*boltFile, error) {
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, err
	}
	filesMu.Lock()
	defer filesMu.Unlock()
	f := files[abs]
	if f == nil {
		f = &boltFile{path: path, locks: NewSlots()}
		files[abs] = f
	}
	f.shares++
	return f, nil
}

func (f *boltFile) unshare() error {
	filesMu.Lock()
	f.shares--
	last := f.shares == 0
	if last {
		abs, _ := filepath.Abs(f.path)
		delete(files, abs)
	}
	filesMu.Unlock()
	if !last {
		return nil
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.closeDB()
}

// Linger: how long an idle process keeps the file open, and how often it
// looks for a process waiting for it meanwhile (first after lookFirst,
// then twice as long each time up to lookMax).
const (
	linger    = 500 * time.Millisecond
	lookFirst = time.Millisecond
	lookMax   = 16 * time.Millisecond
)

// run runs fn in a transaction of the shared database, opening it first
// when the process does not hold it.
func (f *boltFile) run(ctx context.Context, write bool, fn func(*bolt.Tx) error) error {
	db, err := f.acquire(ctx)
	if err != nil {
		return err
	}
	defer f.release()
	err = guard(f.path, func() error {
		do := db.View
		if write {
			do = db.Update
		}
		return do(func(tx *bolt.Tx) error {
			if err := checkSize(f.path, tx); err != nil {
				return err
			}
			return fn(tx)
		})
	})
	if errors.Is(err, ErrDamaged) {
		f.mu.Lock()
		f.drop = true
		f.mu.Unlock()
	}
	return err
}

// acquire returns the open database, opening it (waiting for another
// process to let go of it, as long as ctx lets) when needed.
func (f *boltFile) acquire(ctx context.Context) (*bolt.DB, error) {
	for {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		f.mu.Lock()
		if f.db != nil && !f.drop && f.refs == 0 && f.ident != identOf(f.path) {
			// Changed while this process held it, yet not by this
			// process: damage; a fresh open judges it.
			f.closeDB()
		}
		if f.db != nil && !f.drop {
			// Read under the lock: a Close of the last handle clears it.
			db := f.db
			f.refs++
			f.mu.Unlock()
			return db, nil
		}
		if f.db != nil && f.refs == 0 {
			f.closeDB()
		}
		if f.opening != nil || f.db != nil {
			// Another goroutine is opening it, or transactions still run
			// on a handle to be dropped.
			var ch <-chan struct{} = f.opening
			f.mu.Unlock()
			if ch == nil {
				ch = f.drained()
			}
			select {
			case <-ch:
			case <-ctx.Done():
				return nil, ctx.Err()
			}
			continue
		}
		opening := make(chan struct{})
		f.opening = opening
		f.mu.Unlock()
		db, err := openDB(ctx, f.path, false)
		f.mu.Lock()
		f.opening = nil
		close(opening)
		if err != nil {
			f.mu.Unlock()
			return nil, err
		}
		f.db, f.drop, f.refs, f.ident = db, false, 1, identOf(f.path)
		if f.wait == nil {
			f.wait, _ = os.OpenFile(f.path+".wait", os.O_RDWR|os.O_CREATE, 0o600)
		}
		f.mu.Unlock()
		return db, nil
	}
}

// drained returns a channel closed once no transaction runs: polled, as
// dropping a damaged handle is rare.
func (f *boltFile) drained() <-chan struct{} {
	ch := make(chan struct{})
	go func() {
		defer close(ch)
		for {
			f.mu.Lock()
			done := f.refs == 0
			f.mu.Unlock()
			if done {
				return
			}
			time.Sleep(lookFirst)
		}
	}()
	return ch
}

// release ends a transaction. The last one running hands the file to a
// waiting process at once, else keeps it open a while (linger).
func (f *boltFile) release() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.refs--
	if f.refs > 0 {
		return
	}
	if f.drop || f.waiting() {
		f.closeDB()
		return
	}
	f.ident = identOf(f.path)
	f.idle = time.Now()
	f.look(lookFirst)
}

// look checks again after d whether the idle file should be closed.
func (f *boltFile) look(d time.Duration) {
	if f.timer != nil {
		f.timer.Stop()
	}
	f.timer = time.AfterFunc(d, func() {
		f.mu.Lock()
		defer f.mu.Unlock()
		if f.db == nil || f.refs > 0 {
			return
		}
		if f.waiting() || time.Since(f.idle) >= linger {
			f.closeDB()
			return
		}
		f.look(min(2*d, lookMax))
	})
}

// waiting reports whether another process (or another handle in this
// one) waits for the file: it holds FILE.wait shared.
func (f *boltFile) waiting() bool {
	if f.wait == nil {
		return false
	}
	fd := int(f.wait.Fd())
	if err := syscall.Flock(fd, syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		return true
	}
	syscall.Flock(fd, syscall.LOCK_UN)
	return false
}

// closeDB closes the open database, if any; f.mu held, no transaction
// running.
func (f *boltFile) closeDB() error {
	if f.timer != nil {
		f.timer.Stop()
		f.timer = nil
	}
	if f.wait != nil {
		f.wait.Close()
		f.wait = nil
	}
	if f.db == nil {
		return nil
	}
	db := f.db
	f.db, f.drop = nil, false
	return guard(f.path, db.Close)
}

// verify verifies the store: in a transaction of the open database when
// the process holds it, else through a read-only open of its own.
func (f *boltFile) verify(ctx context.Context) error {
	f.mu.Lock()
	open := f.db != nil && !f.drop
	f.mu.Unlock()
	if open {
		return f.run(ctx, false, func(tx *bolt.Tx) error { return verify(f.path, tx) })
	}
	return verifyFile(ctx, f.path)
}

// fileIdent is what tells a file changed: its identity, size and times.
type fileIdent struct {
	dev, ino     uint64
	size         int64
	mtime, ctime int64
}

func identOf(path string) fileIdent {
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		return fileIdent{}
	}
	return fileIdent{dev: uint64(st.Dev), ino: st.Ino, size: st.Size, mtime: st.Mtim.Nano(), ctime: st.Ctim.Nano()}
}

// openDB opens the file at path. A missing file is a new store (made
// unless readOnly); an empty one is damage (a new store is never empty:
// see create), as is one bbolt refuses, or one shorter than its meta page
// says. Its lock (exclusive, or shared for readOnly) is waited for as
// long as ctx lets, saying so to the holder (waitLock).
func openDB(ctx context.Context, path string, readOnly bool) (*bolt.DB, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	fi, err := os.Stat(path)
	switch {
	case errors.Is(err, fs.ErrNotExist) && !readOnly:
		if err := create(path); err != nil {
			return nil, err
		}
	case err == nil && fi.Size() == 0:
		return nil, damaged(path, "empty file")
	}
	how := syscall.LOCK_EX
	if readOnly {
		how = syscall.LOCK_SH
	}
	opts := &bolt.Options{ReadOnly: readOnly}
	// Keep bbolt's file: if bbolt panics inside Open, closing it is what
	// releases the lock. The lock is taken here, where a wait can honour
	// ctx; bbolt's own flock of the same open file then succeeds at once.
	var file *os.File
	opts.OpenFile = func(name string, flag int, perm os.FileMode) (*os.File, error) {
		f, err := os.OpenFile(name, flag, perm)
		if err != nil || file != nil {
			return f, err
		}
		file = f
		if err := waitLock(ctx, f, name, how); err != nil {
			return nil, err
		}
		return f, nil
	}
	var db *bolt.DB
	err = guard(path, func() error {
		var err error
		if db, err = bolt.Open(path, 0o600, opts); err != nil {
			return err
		}
		return db.View(func(tx *bolt.Tx) error { return checkSize(path, tx) })
	})
	if err != nil {
		if db != nil {
			db.Close()
		} else if file != nil {
			file.Close()
		}
		return nil, openErr(path, err)
	}
	return db, nil
}

// waitLock flocks f (how: LOCK_EX or LOCK_SH), waiting as long as ctx
// lets. While it waits it holds name.wait shared, which a process holding
// the file sees (boltFile.waiting) and answers by closing it. The kernel
// offers no way to wait for an flock and for ctx at once: it retries.
func waitLock(ctx context.Context, f *os.File, name string, how int) error {
	fd := int(f.Fd())
	if syscall.Flock(fd, how|syscall.LOCK_NB) == nil {
		return nil
	}
	w, err := os.OpenFile(name+".wait", os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return err
	}
	defer w.Close()
	announced := false
	for d := lookFirst; ; d = min(2*d, lookMax) {
		if !announced {
			announced = syscall.Flock(int(w.Fd()), syscall.LOCK_SH|syscall.LOCK_NB) == nil
		}
		if syscall.Flock(fd, how|syscall.LOCK_NB) == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w: %s: %w", ErrLocked, name, ctx.Err())
		case <-time.After(d):
		}
	}
}

type boltTx struct {
	tx   *bolt.Tx
	path string
}

// decodeErr: a record that is not the JSON xlsnap wrote is damage too.
func (t *boltTx) decodeErr(what string, err error) error {
	return fmt.Errorf("%w: %s: %s: decode: %w", ErrDamaged, t.path, what, err)
}

func (t *boltTx) domainBucket(name string) *bolt.Bucket {
	root := t.tx.Bucket(bucketDomains)
	if root == nil {
		return nil
	}
	return root.Bucket([]byte(name))
}

func (t *boltTx) DomainNames() ([]string, error) {
	var names []string
	root := t.tx.Bucket(bucketDomains)
	if root == nil {
		return nil, nil
	}
	err := root.ForEachBucket(func(k []byte) error {
		names = append(names, string(k))
		return nil
	})
	return names, err
}

func (t *boltTx) Domain(name string) (*Domain, error) {
	b := t.domainBucket(name)
	if b == nil {
		return nil, fmt.Errorf("domain %q: %w", name, ErrNotFound)
	}
	var d Domain
	if err := json.Unmarshal(b.Get(keyMeta), &d); err != nil {
		return nil, t.decodeErr(fmt.Sprintf("domain %q", name), err)
	}
	if d.Images == nil {
		d.Images = map[string]*Image{}
	}
	return &d, nil
}

func (t *boltTx) PutDomain(d *Domain) error {
	b, err := t.tx.Bucket(bucketDomains).CreateBucketIfNotExists([]byte(d.Name))
	if err != nil {
		return err
	}
	for _, sub := range [][]byte{bucketSnaps, bucketXML} {
		if _, err := b.CreateBucketIfNotExists(sub); err != nil {
			return err
		}
	}
	return putJSON(b, keyMeta, d)
}

func (t *boltTx) DeleteDomain(name string) error {
	err := t.tx.Bucket(bucketDomains).DeleteBucket([]byte(name))
	if errors.Is(err, bolterrors.ErrBucketNotFound) {
		return fmt.Errorf("domain %q: %w", name, ErrNotFound)
	}
	return err
}

func (t *boltTx) snapBuckets(domain string) (snaps, xml *bolt.Bucket, err error) {
	b := t.domainBucket(domain)
	if b == nil {
		return nil, nil, fmt.Errorf("domain %q: %w", domain, ErrNotFound)
	}
	return b.Bucket(bucketSnaps), b.Bucket(bucketXML), nil
}

func (t *boltTx) Snapshots(domain string) ([]*Snapshot, error) {
	snaps, _, err := t.snapBuckets(domain)
	if err != nil {
		return nil, err
	}
	var out []*Snapshot
	err = snaps.ForEach(func(k, v []byte) error {
		s := &Snapshot{}
		if err := json.Unmarshal(v, s); err != nil {
			return t.decodeErr(fmt.Sprintf("snapshot %q", k), err)
		}
		out = append(out, s)
		return nil
	})
	return out, err
}

func (t *boltTx) Snapshot(domain, name string) (*Snapshot, error) {
	snaps, xml, err := t.snapBuckets(domain)
	if err != nil {
		return nil, err
	}
	v := snaps.Get([]byte(name))
	if v == nil {
		return nil, fmt.Errorf("snapshot %q of domain %q: %w", name, domain, ErrNotFound)
	}
	s := &Snapshot{}
	if err := json.Unmarshal(v, s); err != nil {
		return nil, t.decodeErr(fmt.Sprintf("snapshot %q", name), err)
	}
	s.DomainXML = string(xml.Get([]byte(name)))
	return s, nil
}

func (t *boltTx) PutSnapshot(domain string, s *Snapshot) error {
	snaps, xml, err := t.snapBuckets(domain)
	if err != nil {
		return err
	}
	rec := *s
	rec.DomainXML = ""
	if err := putJSON(snaps, []byte(s.Name), &rec); err != nil {
		return err
	}
	return xml.Put([]byte(s.Name), []byte(s.DomainXML))
}

func (t *boltTx) DeleteSnapshot(domain, name string) error {
	snaps, xml, err := t.snapBuckets(domain)
	if err != nil {
		return err
	}
	if snaps.Get([]byte(name)) == nil {
		return fmt.Errorf("snapshot %q of domain %q: %w", name, domain, ErrNotFound)
	}
	if err := snaps.Delete([]byte(name)); err != nil {
		return err
	}
	return xml.Delete([]byte(name))
}

func (t *boltTx) Intents() ([]*Intent, error) {
	var out []*Intent
	b := t.tx.Bucket(bucketIntents)
	if b == nil {
		return nil, nil
	}
	err := b.ForEach(func(k, v []byte) error {
		in := &Intent{}
		if err := json.Unmarshal(v, in); err != nil {
			return t.decodeErr(fmt.Sprintf("intent %q", k), err)
		}
		out = append(out, in)
		return nil
	})
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out, err
}

func (t *boltTx) PutIntent(in *Intent) error {
	return putJSON(t.tx.Bucket(bucketIntents), []byte(in.ID), in)
}

func (t *boltTx) DeleteIntent(id string) error {
	return t.tx.Bucket(bucketIntents).Delete([]byte(id))
}

func putJSON(b *bolt.Bucket, key []byte, v any) error {
	data, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return b.Put(key, data)
}

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

// Bolt is the embedded store: one bbolt file. It opens the file for each
// transaction and closes it after, so that several xlsnap processes can
// work on different domains at once (bbolt locks the whole file while it
// is open).
type Bolt struct {
	path string
}

// OpenBolt creates the database (and its folder) if needed, and verifies
// it once: every record read, bbolt's consistency check run.
func OpenBolt(ctx context.Context, path string) (*Bolt, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, err
	}
	b := &Bolt{path: path}
	// Read-only first: a damaged file is then only read, and a cut one
	// is told as such (bbolt's write mode reads the free list at once).
	if err := b.Verify(ctx); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, err
	}
	if err := b.Update(ctx, func(Tx) error { return nil }); err != nil {
		return nil, err
	}
	return b, nil
}

// Verify reads every record and runs bbolt's consistency check: an
// error wrapping ErrDamaged says the file cannot be trusted.
func (b *Bolt) Verify(ctx context.Context) error { return verifyFile(ctx, b.path) }

// open opens the file for one transaction. A missing file is a new store;
// an empty one is damage (a new store is never empty: see create), as is
// one bbolt refuses, or one shorter than its meta page says.
func (b *Bolt) open(ctx context.Context, readOnly bool) (*bolt.DB, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	fi, err := os.Stat(b.path)
	switch {
	case errors.Is(err, fs.ErrNotExist) && !readOnly:
		if err := b.create(); err != nil {
			return nil, err
		}
	case err == nil && fi.Size() == 0:
		return nil, damaged(b.path, "empty file")
	}
	opts := &bolt.Options{ReadOnly: readOnly}
	if dl, ok := ctx.Deadline(); ok {
		opts.Timeout = max(time.Until(dl), time.Millisecond)
	}
	// Keep bbolt's file: if bbolt panics inside Open, closing it is what
	// releases the lock it took (bbolt's DB is lost with the panic).
	var file *os.File
	opts.OpenFile = func(name string, flag int, perm os.FileMode) (*os.File, error) {
		f, err := os.OpenFile(name, flag, perm)
		if file == nil {
			file = f
		}
		return f, err
	}
	var db *bolt.DB
	err = guard(b.path, func() error {
		var err error
		if db, err = bolt.Open(b.path, 0o600, opts); err != nil {
			return err
		}
		return db.View(func(tx *bolt.Tx) error { return checkSize(b.path, tx) })
	})
	if err != nil {
		if db != nil {
			db.Close()
		} else if file != nil {
			file.Close()
		}
		return nil, openErr(b.path, err)
	}
	return db, nil
}

// create makes a new store under a temporary name and links it into
// place, so no process ever finds the store's file empty (bbolt would
// take an empty file for a new store; here it means damage).
func (b *Bolt) create() error {
	dir := filepath.Dir(b.path)
	f, err := os.CreateTemp(dir, filepath.Base(b.path)+".new-*")
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
	if err := os.Link(tmp, b.path); err != nil && !errors.Is(err, fs.ErrExist) {
		return err
	}
	return syncDir(dir)
}

func (b *Bolt) View(ctx context.Context, fn func(Tx) error) error {
	db, err := b.open(ctx, true)
	if err != nil {
		return err
	}
	defer db.Close()
	return guard(b.path, func() error {
		return db.View(func(tx *bolt.Tx) error { return fn(&boltTx{tx: tx, path: b.path}) })
	})
}

func (b *Bolt) Update(ctx context.Context, fn func(Tx) error) error {
	db, err := b.open(ctx, false)
	if err != nil {
		return err
	}
	defer db.Close()
	return guard(b.path, func() error {
		return db.Update(func(tx *bolt.Tx) error {
			for _, name := range [][]byte{bucketDomains, bucketIntents} {
				if _, err := tx.CreateBucketIfNotExists(name); err != nil {
					return err
				}
			}
			return fn(&boltTx{tx: tx, path: b.path})
		})
	})
}

// Close is a no-op: the file is open only inside transactions.
func (b *Bolt) Close() error { return nil }

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

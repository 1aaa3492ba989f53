package metastore

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"time"

	bolt "go.etcd.io/bbolt"
	bolterrors "go.etcd.io/bbolt/errors"
)

// ErrLocked is returned when another process keeps the database locked
// past the context's deadline.
var ErrLocked = errors.New("metadata store is locked by another process")

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

// OpenBolt creates the database (and its folder) if needed.
func OpenBolt(ctx context.Context, path string) (*Bolt, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, err
	}
	b := &Bolt{path: path}
	return b, b.Update(ctx, func(Tx) error { return nil })
}

func (b *Bolt) open(ctx context.Context, readOnly bool) (*bolt.DB, error) {
	opts := &bolt.Options{ReadOnly: readOnly}
	if dl, ok := ctx.Deadline(); ok {
		opts.Timeout = max(time.Until(dl), time.Millisecond)
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	db, err := bolt.Open(b.path, 0o600, opts)
	if errors.Is(err, bolterrors.ErrTimeout) {
		return nil, fmt.Errorf("%w: %s", ErrLocked, b.path)
	}
	return db, err
}

func (b *Bolt) View(ctx context.Context, fn func(Tx) error) error {
	db, err := b.open(ctx, true)
	if err != nil {
		return err
	}
	defer db.Close()
	return db.View(func(tx *bolt.Tx) error { return fn(&boltTx{tx: tx}) })
}

func (b *Bolt) Update(ctx context.Context, fn func(Tx) error) error {
	db, err := b.open(ctx, false)
	if err != nil {
		return err
	}
	defer db.Close()
	return db.Update(func(tx *bolt.Tx) error {
		for _, name := range [][]byte{bucketDomains, bucketIntents} {
			if _, err := tx.CreateBucketIfNotExists(name); err != nil {
				return err
			}
		}
		return fn(&boltTx{tx: tx})
	})
}

// Close is a no-op: the file is open only inside transactions.
func (b *Bolt) Close() error { return nil }

type boltTx struct{ tx *bolt.Tx }

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
		return nil, fmt.Errorf("domain %q: decode: %w", name, err)
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
			return fmt.Errorf("snapshot %q: decode: %w", k, err)
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
		return nil, fmt.Errorf("snapshot %q: decode: %w", name, err)
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
			return fmt.Errorf("intent %q: decode: %w", k, err)
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

// Package etcdstore is the cluster metadata store: several hosts on
// shared pools keep their records, intents, locks, image users and
// events in one etcd cluster (go.etcd.io/etcd/client/v3). Records and
// intents are keys under a prefix; a domain lock is a lease-backed
// mutex (concurrency.Mutex); every write of a domain this store holds
// the lock of is a transaction that commits only while that lock's key
// is still the holder's (fencing), so a host whose lease expired during
// a partition changes nothing afterwards; events go through a watch.
package etcdstore

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"sort"
	"strings"
	"sync"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/xlsnap/xlsnap/storage/metastore"
)

// Config opens a Store.
type Config struct {
	// Endpoints are the cluster's client URLs (http://127.0.0.1:2379,
	// or https:// with TLS).
	Endpoints []string
	// TLS is the client's TLS configuration (CA, client certificate);
	// nil for plain connections.
	TLS *tls.Config
	// Prefix is where every key lives; "" is "/xlsnap/".
	Prefix string
	// Host names this host in lock holders; "" is the system's name.
	Host string
	// LockTTL is the lease of this store's domain locks: a host that
	// dies (or is cut off) loses them this long after its last word, and
	// another host may take over. Whole seconds; 0 is 10 s.
	LockTTL time.Duration
	// RequestTimeout bounds each request: a cluster that does not answer
	// in time is ErrUnavailable. 0 is 5 s.
	RequestTimeout time.Duration
}

// Store is a metastore.Store in etcd. It is safe for concurrent use.
type Store struct {
	cli    *clientv3.Client
	prefix string
	host   string
	ttl    int64
	reqTO  time.Duration
	slots  *metastore.Slots

	// ctx lives as long as the store: sessions' keepalives run on it.
	ctx    context.Context
	cancel context.CancelFunc
	closed sync.Once

	// intentDomain maps the id of each intent this store wrote to its
	// domain.
	intentDomain sync.Map

	mu   sync.Mutex
	sess *session
	held map[string]*lock // the domain locks this store holds, by domain
	// evLease is the lease events are written with (they expire with
	// it), and until when it may still be used.
	evLease clientv3.LeaseID
	evUntil time.Time
}

// Open connects to the cluster. It returns once one member answers, or
// ErrUnavailable after RequestTimeout.
func Open(ctx context.Context, cfg Config) (*Store, error) {
	if len(cfg.Endpoints) == 0 {
		return nil, fmt.Errorf("%w: no etcd endpoint", metastore.ErrUnavailable)
	}
	s := &Store{prefix: cfg.Prefix, host: cfg.Host, ttl: int64(cfg.LockTTL / time.Second), reqTO: cfg.RequestTimeout,
		slots: metastore.NewSlots(), held: map[string]*lock{}}
	if s.prefix == "" {
		s.prefix = "/xlsnap/"
	}
	if !strings.HasSuffix(s.prefix, "/") {
		s.prefix += "/"
	}
	if s.host == "" {
		s.host, _ = os.Hostname()
	}
	if s.ttl <= 0 {
		s.ttl = 10
	}
	if s.reqTO <= 0 {
		s.reqTO = 5 * time.Second
	}
	cli, err := clientv3.New(clientv3.Config{Endpoints: cfg.Endpoints, TLS: cfg.TLS, DialTimeout: s.reqTO,
		Logger: zap.NewNop(), DialKeepAliveTime: 2 * time.Second, DialKeepAliveTimeout: 2 * time.Second})
	if err != nil {
		return nil, fmt.Errorf("%w: %w", metastore.ErrUnavailable, err)
	}
	s.cli = cli
	s.ctx, s.cancel = context.WithCancel(context.Background())
	rctx, cancel := s.req(ctx)
	defer cancel()
	if _, err := cli.Get(rctx, s.prefix+"domains/", clientv3.WithCountOnly()); err != nil {
		s.Close()
		return nil, s.fail(ctx, "connecting to "+strings.Join(cfg.Endpoints, ","), err)
	}
	return s, nil
}

// Close releases the locks this store holds and disconnects. Closing
// again does nothing.
func (s *Store) Close() error {
	var err error
	s.closed.Do(func() { err = s.close() })
	return err
}

func (s *Store) close() error {
	s.mu.Lock()
	var held []*lock
	for _, l := range s.held {
		held = append(held, l)
	}
	sess := s.sess
	s.sess = nil
	s.mu.Unlock()
	for _, l := range held {
		l.Unlock(context.Background())
	}
	if sess != nil {
		ctx, cancel := context.WithTimeout(context.Background(), s.reqTO)
		s.cli.Revoke(ctx, sess.lease)
		cancel()
	}
	s.cancel()
	return s.cli.Close()
}

// Client is the store's etcd client, for tools and tests.
func (s *Store) Client() *clientv3.Client { return s.cli }

// req bounds one request by RequestTimeout.
func (s *Store) req(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, s.reqTO)
}

// transient reports an error the cluster gives while it changes leader
// or lacks one: the request may be made again.
func transient(err error) bool {
	var ee rpctypes.EtcdError
	if errors.As(err, &ee) {
		return ee.Code() == codes.Unavailable
	}
	return status.Code(err) == codes.Unavailable
}

// retry makes a request again while the cluster answers that it is
// between leaders (a member died, say), until rctx ends. Every request
// of this store may run twice: reads, and writes of whole values.
func retry(rctx context.Context, fn func() error) error {
	for d := 20 * time.Millisecond; ; d = min(2*d, 200*time.Millisecond) {
		err := fn()
		if err == nil || !transient(err) {
			return err
		}
		select {
		case <-rctx.Done():
			return err
		case <-time.After(d):
		}
	}
}

// fail types a request's error: the caller's context's own when it
// ended; ErrUnavailable when no member answered in time or at all.
func (s *Store) fail(ctx context.Context, what string, err error) error {
	if ctx.Err() != nil {
		return fmt.Errorf("%s: %w", what, ctx.Err())
	}
	if transient(err) {
		return fmt.Errorf("%w: %s: %w", metastore.ErrUnavailable, what, err)
	}
	switch status.Code(err) {
	case codes.Unavailable, codes.DeadlineExceeded, codes.Canceled:
		return fmt.Errorf("%w: %s: %w", metastore.ErrUnavailable, what, err)
	}
	if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) {
		return fmt.Errorf("%w: %s: no etcd member answered within %v", metastore.ErrUnavailable, what, s.reqTO)
	}
	return fmt.Errorf("%s: %w", what, err)
}

// Keys. Names never hold "/" (storage.CheckName), so a domain's
// snapshots are exactly the keys under its own folder.
func (s *Store) domainKey(name string) string { return s.prefix + "domains/" + name }
func (s *Store) snapDir(d string) string      { return s.prefix + "snaps/" + d + "/" }
func (s *Store) xmlDir(d string) string       { return s.prefix + "xml/" + d + "/" }
func (s *Store) intentKey(id string) string   { return s.prefix + "intents/" + id }
func (s *Store) lockDir(d string) string      { return s.prefix + "locks/" + d + "/" }

// domainOf names the domain a record key belongs to ("" for none).
func (s *Store) domainOf(key string) string {
	rest := strings.TrimPrefix(key, s.prefix)
	for _, dir := range []string{"domains/", "snaps/", "xml/"} {
		if r, ok := strings.CutPrefix(rest, dir); ok {
			d, _, _ := strings.Cut(r, "/")
			return d
		}
	}
	return ""
}

// View runs fn over the cluster's state at one revision.
func (s *Store) View(ctx context.Context, fn func(metastore.Tx) error) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	return fn(&tx{s: s, ctx: ctx})
}

// Update runs fn over one revision, buffering its writes, then commits
// them in one transaction, fenced by every lock this store holds on a
// domain they touch: ErrLockLost when one is no longer this store's.
func (s *Store) Update(ctx context.Context, fn func(metastore.Tx) error) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	t := &tx{s: s, ctx: ctx, writes: map[string]*string{}}
	if err := fn(t); err != nil {
		return err
	}
	return t.commit()
}

// tx reads at one revision (the first read's) and buffers writes.
type tx struct {
	s   *Store
	ctx context.Context
	rev int64
	// writes maps a key to its new value, nil for a deletion; order is
	// the order keys were first written.
	writes map[string]*string
	order  []string
	// intentDomains names the domain of each intent written or deleted.
	intentDomains []string
	// read holds what was read at rev, by key (nil: no such key): the
	// revision does not change, so neither does it.
	read map[string][]byte
}

// remember keeps a value read at the transaction's revision.
func (t *tx) remember(key string, v []byte) {
	if t.read == nil {
		t.read = map[string][]byte{}
	}
	t.read[key] = v
}

func (t *tx) opts(o ...clientv3.OpOption) []clientv3.OpOption {
	if t.rev != 0 {
		o = append(o, clientv3.WithRev(t.rev))
	}
	return o
}

// get reads keys at the transaction's revision, its own writes first:
// one request for all of them.
func (t *tx) get(keys ...string) ([][]byte, error) {
	out := make([][]byte, len(keys))
	var ops []clientv3.Op
	var idx []int
	for i, k := range keys {
		if v, ok := t.writes[k]; ok {
			if v != nil {
				out[i] = []byte(*v)
			}
			continue
		}
		if v, ok := t.read[k]; ok {
			out[i] = v
			continue
		}
		ops = append(ops, clientv3.OpGet(k, t.opts()...))
		idx = append(idx, i)
	}
	if len(ops) == 0 {
		return out, nil
	}
	rctx, cancel := t.s.req(t.ctx)
	defer cancel()
	var resp *clientv3.TxnResponse
	err := retry(rctx, func() (err error) { resp, err = t.s.cli.Txn(rctx).Then(ops...).Commit(); return err })
	if err != nil {
		return nil, t.s.fail(t.ctx, "reading metadata", err)
	}
	if t.rev == 0 {
		t.rev = resp.Header.Revision
	}
	for j, r := range resp.Responses {
		if kvs := r.GetResponseRange().Kvs; len(kvs) > 0 {
			out[idx[j]] = kvs[0].Value
		}
		t.remember(keys[idx[j]], out[idx[j]])
	}
	return out, nil
}

// list reads every key under prefix at the transaction's revision, with
// its own writes, in key order.
func (t *tx) list(prefix string, keysOnly bool) ([]string, [][]byte, error) {
	o := []clientv3.OpOption{clientv3.WithPrefix()}
	if keysOnly {
		o = append(o, clientv3.WithKeysOnly())
	}
	rctx, cancel := t.s.req(t.ctx)
	defer cancel()
	var resp *clientv3.GetResponse
	err := retry(rctx, func() (err error) { resp, err = t.s.cli.Get(rctx, prefix, t.opts(o...)...); return err })
	if err != nil {
		return nil, nil, t.s.fail(t.ctx, "listing metadata", err)
	}
	if t.rev == 0 {
		t.rev = resp.Header.Revision
	}
	m := map[string][]byte{}
	for _, kv := range resp.Kvs {
		m[string(kv.Key)] = kv.Value
		if !keysOnly {
			t.remember(string(kv.Key), kv.Value)
		}
	}
	for k, v := range t.writes {
		if !strings.HasPrefix(k, prefix) {
			continue
		}
		if v == nil {
			delete(m, k)
		} else {
			m[k] = []byte(*v)
		}
	}
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	vals := make([][]byte, len(keys))
	for i, k := range keys {
		vals[i] = m[k]
	}
	return keys, vals, nil
}

func (t *tx) put(key string, v any) error {
	data, err := json.Marshal(v)
	if err != nil {
		return err
	}
	str := string(data)
	t.set(key, &str)
	return nil
}

func (t *tx) set(key string, v *string) {
	if t.writes == nil {
		panic("etcdstore: a write in a View")
	}
	if _, ok := t.writes[key]; !ok {
		t.order = append(t.order, key)
	}
	t.writes[key] = v
}

func (t *tx) decodeErr(what string, err error) error {
	return fmt.Errorf("%w: etcd %s: %s: decode: %w", metastore.ErrDamaged, t.s.prefix, what, err)
}

// DomainNames lists the domain records with their values: a caller
// that lists them reads them next (every record, for an image's users),
// and then finds them read.
func (t *tx) DomainNames() ([]string, error) {
	keys, _, err := t.list(t.s.prefix+"domains/", false)
	var out []string
	for _, k := range keys {
		out = append(out, strings.TrimPrefix(k, t.s.prefix+"domains/"))
	}
	return out, err
}

func (t *tx) Domain(name string) (*metastore.Domain, error) {
	v, err := t.get(t.s.domainKey(name))
	if err != nil {
		return nil, err
	}
	if v[0] == nil {
		return nil, fmt.Errorf("domain %q: %w", name, metastore.ErrNotFound)
	}
	var d metastore.Domain
	if err := json.Unmarshal(v[0], &d); err != nil {
		return nil, t.decodeErr(fmt.Sprintf("domain %q", name), err)
	}
	if d.Images == nil {
		d.Images = map[string]*metastore.Image{}
	}
	return &d, nil
}

func (t *tx) PutDomain(d *metastore.Domain) error { return t.put(t.s.domainKey(d.Name), d) }

func (t *tx) DeleteDomain(name string) error {
	if _, err := t.Domain(name); err != nil {
		return err
	}
	t.set(t.s.domainKey(name), nil)
	for _, dir := range []string{t.s.snapDir(name), t.s.xmlDir(name)} {
		keys, _, err := t.list(dir, true)
		if err != nil {
			return err
		}
		for _, k := range keys {
			t.set(k, nil)
		}
	}
	return nil
}

func (t *tx) Snapshots(domain string) ([]*metastore.Snapshot, error) {
	if _, err := t.Domain(domain); err != nil {
		return nil, err
	}
	_, vals, err := t.list(t.s.snapDir(domain), false)
	if err != nil {
		return nil, err
	}
	out := make([]*metastore.Snapshot, 0, len(vals))
	for _, v := range vals {
		sn := &metastore.Snapshot{}
		if err := json.Unmarshal(v, sn); err != nil {
			return nil, t.decodeErr(fmt.Sprintf("a snapshot of domain %q", domain), err)
		}
		out = append(out, sn)
	}
	return out, nil
}

func (t *tx) Snapshot(domain, name string) (*metastore.Snapshot, error) {
	v, err := t.get(t.s.domainKey(domain), t.s.snapDir(domain)+name, t.s.xmlDir(domain)+name)
	if err != nil {
		return nil, err
	}
	if v[0] == nil {
		return nil, fmt.Errorf("domain %q: %w", domain, metastore.ErrNotFound)
	}
	if v[1] == nil {
		return nil, fmt.Errorf("snapshot %q of domain %q: %w", name, domain, metastore.ErrNotFound)
	}
	sn := &metastore.Snapshot{}
	if err := json.Unmarshal(v[1], sn); err != nil {
		return nil, t.decodeErr(fmt.Sprintf("snapshot %q", name), err)
	}
	sn.DomainXML = string(v[2])
	return sn, nil
}

func (t *tx) PutSnapshot(domain string, sn *metastore.Snapshot) error {
	if _, err := t.Domain(domain); err != nil {
		return err
	}
	rec := *sn
	rec.DomainXML = ""
	if err := t.put(t.s.snapDir(domain)+sn.Name, &rec); err != nil {
		return err
	}
	x := sn.DomainXML
	t.set(t.s.xmlDir(domain)+sn.Name, &x)
	return nil
}

func (t *tx) DeleteSnapshot(domain, name string) error {
	if _, err := t.Snapshot(domain, name); err != nil {
		return err
	}
	t.set(t.s.snapDir(domain)+name, nil)
	t.set(t.s.xmlDir(domain)+name, nil)
	return nil
}

func (t *tx) Intents() ([]*metastore.Intent, error) {
	_, vals, err := t.list(t.s.prefix+"intents/", false)
	if err != nil {
		return nil, err
	}
	var out []*metastore.Intent
	for _, v := range vals {
		in := &metastore.Intent{}
		if err := json.Unmarshal(v, in); err != nil {
			return nil, t.decodeErr("an intent", err)
		}
		out = append(out, in)
	}
	return out, nil
}

func (t *tx) PutIntent(in *metastore.Intent) error {
	t.intentDomains = append(t.intentDomains, in.Domain)
	t.s.intentDomain.Store(in.ID, in.Domain)
	return t.put(t.s.intentKey(in.ID), in)
}

// DeleteIntent deletes the intent; its domain, which fences the write,
// is known without a read when this store wrote it.
func (t *tx) DeleteIntent(id string) error {
	if d, ok := t.s.intentDomain.Load(id); ok {
		t.intentDomains = append(t.intentDomains, d.(string))
		t.set(t.s.intentKey(id), nil)
		return nil
	}
	v, err := t.get(t.s.intentKey(id))
	if err != nil || v[0] == nil {
		return err
	}
	var in metastore.Intent
	if json.Unmarshal(v[0], &in) == nil {
		t.intentDomains = append(t.intentDomains, in.Domain)
	}
	t.set(t.s.intentKey(id), nil)
	return nil
}

// commit writes the buffered writes in one transaction whose condition
// is that every lock this store holds on a touched domain is still its
// own.
func (t *tx) commit() error {
	if len(t.order) == 0 {
		return nil
	}
	domains := map[string]bool{}
	for _, k := range t.order {
		if d := t.s.domainOf(k); d != "" {
			domains[d] = true
		}
	}
	for _, d := range t.intentDomains {
		domains[d] = true
	}
	var fences []clientv3.Cmp
	t.s.mu.Lock()
	for d := range domains {
		if l := t.s.held[d]; l != nil {
			fences = append(fences, l.mu.IsOwner())
		}
	}
	t.s.mu.Unlock()
	ops := make([]clientv3.Op, 0, len(t.order))
	for _, k := range t.order {
		if v := t.writes[k]; v != nil {
			ops = append(ops, clientv3.OpPut(k, *v))
		} else {
			ops = append(ops, clientv3.OpDelete(k))
		}
	}
	rctx, cancel := t.s.req(t.ctx)
	defer cancel()
	var resp *clientv3.TxnResponse
	err := retry(rctx, func() (err error) { resp, err = t.s.cli.Txn(rctx).If(fences...).Then(ops...).Commit(); return err })
	if err != nil {
		return t.s.fail(t.ctx, "writing metadata", err)
	}
	if !resp.Succeeded {
		return fmt.Errorf("writing metadata: %w", metastore.ErrLockLost)
	}
	for _, k := range t.order {
		if id, ok := strings.CutPrefix(k, t.s.prefix+"intents/"); ok && t.writes[k] == nil {
			t.s.intentDomain.Delete(id)
		}
	}
	return nil
}

package storage

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"syscall"

	"github.com/xlsnap/xlsnap/chain"
	"github.com/xlsnap/xlsnap/storage/metastore"
)

// DefinedDisk is one disk of one domain definition, as the domain source
// holds it now.
type DefinedDisk struct {
	// Domain is the domain's key in storage; DomainName its name.
	Domain     string
	DomainName string
	Target     string
	// Path is the image the disk names, absolute; Format its driver type.
	Path   string
	Format string
}

// Definitions is what storage needs of the domain source. xlsnap is not
// alone on its pools: an image's users include every disk of every
// definition the source has, not only the domain in hand; and no image a
// definition names may be removed before that definition names another.
type Definitions interface {
	// DefinedDisks lists every file disk of every domain definition. An
	// error (a definition that cannot be read, say) stops the operation
	// that asked: what cannot be read might name the image at stake.
	DefinedDisks(ctx context.Context) ([]DefinedDisk, error)
	// Redefine makes a domain's persistent definition name disks' active
	// images, durably, starting from base (a definition document) or,
	// when base is "", from the current definition. Running it again with
	// the same arguments changes nothing more: recovery repeats it.
	Redefine(ctx context.Context, domain, name, base string, disks []Disk) error
}

// UserKind says how a user reaches an image.
type UserKind string

const (
	UserDefinition UserKind = "definition" // a domain definition's disk reads it (as its image or through its chain)
	UserOverlay    UserKind = "overlay"    // an image in a pool is backed by it
	UserSnapshot   UserKind = "snapshot"   // a snapshot record names it
	UserRecord     UserKind = "record"     // a domain's recorded image tree holds it
)

// User is one user of an image.
type User struct {
	Kind UserKind `json:"kind"`
	// Domain is the user's domain key (definition, snapshot, record).
	Domain     string `json:"domain,omitempty"`
	DomainName string `json:"domain_name,omitempty"`
	Disk       string `json:"disk,omitempty"`
	Snapshot   string `json:"snapshot,omitempty"`
	// Path is the overlay backed by the image (overlay), or the image the
	// definition's disk names (definition).
	Path string `json:"path,omitempty"`
	// Host is the other host whose definition it is, on a shared store
	// ("" for this host's).
	Host string `json:"host,omitempty"`
}

func (u User) String() string {
	switch {
	case u.Kind == UserDefinition && u.Host != "":
		return fmt.Sprintf("disk %s of domain %s on host %s (%s)", u.Disk, u.DomainName, u.Host, u.Path)
	case u.Kind == UserDefinition:
		return fmt.Sprintf("disk %s of domain %s (%s)", u.Disk, u.DomainName, u.Path)
	case u.Kind == UserOverlay:
		return "overlay " + u.Path
	case u.Kind == UserSnapshot:
		return fmt.Sprintf("snapshot %s of domain %s", u.Snapshot, u.DomainName)
	}
	return "the records of domain " + u.DomainName
}

// fileKey identifies a file whatever name reaches it (symlinks, "..",
// hard links); a path that does not exist is keyed by its clean name.
type fileKey struct {
	dev, ino uint64
	missing  string
}

func keyOf(path string) (fileKey, *syscall.Stat_t) {
	st, err := os.Stat(path)
	if err != nil {
		return fileKey{missing: filepath.Clean(path)}, nil
	}
	sys := st.Sys().(*syscall.Stat_t)
	return fileKey{dev: uint64(sys.Dev), ino: sys.Ino}, sys
}

// users is what a scan found: every user of every image it saw.
type users struct {
	byKey map[fileKey][]User
	// byPath indexes the same users by the name they use, for removing one
	// name of a file that has several.
	byPath map[string][]User
	// overlays maps an image to the images backed by it.
	overlays map[fileKey][]string
	// stats memoises keyOf for one scan: a base with a thousand clones
	// is stat'ed once.
	stats map[string]statted
}

type statted struct {
	k  fileKey
	st *syscall.Stat_t
}

// key is keyOf, once per name per scan.
func (u *users) key(path string) (fileKey, *syscall.Stat_t) {
	if s, ok := u.stats[path]; ok {
		return s.k, s.st
	}
	k, st := keyOf(path)
	if u.stats == nil {
		u.stats = map[string]statted{}
	}
	u.stats[path] = statted{k, st}
	return k, st
}

// of lists the users of the file at path, whatever name they use for it
// (a hard link, a symlink): what writes into the file changes it for all.
func (u *users) of(path string) []User {
	k, _ := u.key(path)
	return u.byKey[k]
}

// ofName lists the users that removing the name path would hurt: while
// the file has another name, the data stays, so only users of this name
// count.
func (u *users) ofName(path string) []User {
	if _, st := u.key(path); st != nil && st.Nlink > 1 {
		return u.byPath[filepath.Clean(path)]
	}
	return u.of(path)
}

func (u *users) add(path string, usr User) {
	k, _ := u.key(path)
	u.byKey[k] = append(u.byKey[k], usr)
	u.byPath[filepath.Clean(path)] = append(u.byPath[filepath.Clean(path)], usr)
}

// children lists the images whose backing resolves to path, each by the
// name tree (an image tree) knows it by where it knows the file.
func (u *users) children(path string, tree map[string]*Image) []string {
	k, _ := u.key(path)
	var out []string
	for _, c := range u.overlays[k] {
		if _, ok := tree[c]; !ok {
			ck, _ := u.key(c)
			for p := range tree {
				if pk, _ := u.key(p); pk == ck {
					c = p
					break
				}
			}
		}
		out = append(out, c)
	}
	return out
}

// foreign lists path's users other than domain's own records and
// definition, and other than the overlays in own (domain's image tree).
func (u *users) foreign(path, domain string, own map[string]*Image) []User {
	var out []User
	for _, usr := range u.of(path) {
		switch usr.Kind {
		case UserOverlay:
			if _, ok := own[usr.Path]; ok {
				continue
			}
		default:
			if usr.Domain == domain {
				continue
			}
		}
		out = append(out, usr)
	}
	return out
}

// headerCache keeps what a pool scan read of each file, keyed by its
// identity and stat, so scanning a pool again reads only what changed.
type headerCache struct {
	mu sync.Mutex
	m  map[fileKey]cachedHeader
}

type cachedHeader struct {
	size, mtime, ctime int64
	backing            string // the reference as written, "" for none
	err                error
}

// backingOf reads the backing reference of the qcow2 image at path; ""
// for an image with none or a file that is not qcow2. A file that cannot
// be read is an error: it might be an overlay of the image at stake. k
// and st are path's identity and stat, as the caller took them.
func (c *headerCache) backingOf(path string, k fileKey, st *syscall.Stat_t) (string, error) {
	if st == nil {
		_, err := os.Stat(path)
		return "", err
	}
	c.mu.Lock()
	e, ok := c.m[k]
	c.mu.Unlock()
	if ok && e.size == st.Size && e.mtime == st.Mtim.Nano() && e.ctime == st.Ctim.Nano() {
		return e.backing, e.err
	}
	e = cachedHeader{size: st.Size, mtime: st.Mtim.Nano(), ctime: st.Ctim.Nano()}
	e.backing, e.err = readBackingRef(path)
	c.mu.Lock()
	if c.m == nil {
		c.m = map[fileKey]cachedHeader{}
	}
	c.m[k] = e
	c.mu.Unlock()
	return e.backing, e.err
}

func readBackingRef(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	var magic [4]byte
	if n, _ := f.ReadAt(magic[:], 0); n < 4 || string(magic[:]) != "QFI\xfb" {
		return "", nil // not qcow2: no backing file
	}
	h, err := chain.ParseHeader(f)
	if err != nil {
		return "", fmt.Errorf("reading %s: %w", path, err)
	}
	return h.BackingFile, nil
}

// scanUsers finds every user of every image: each disk of each domain
// definition (and the chain below it), each image in the pools backed by
// another, and every record. Nothing is inferred from xlsnap's records
// alone. Whatever cannot be read is an error.
func (m *Manager) scanUsers(ctx context.Context) (*users, error) {
	u := &users{byKey: map[fileKey][]User{}, byPath: map[string][]User{}, overlays: map[fileKey][]string{}}
	seen := map[fileKey]bool{}
	// dangling: images whose backing file is not there, each with it.
	var dangling [][2]string
	// edge records that image is backed by what its header names.
	var edge func(image string, depth int) error
	edge = func(image string, depth int) error {
		k, st := u.key(image)
		if st == nil || seen[k] || depth > chain.DefaultMaxDepth {
			return nil
		}
		seen[k] = true
		ref, err := m.headers.backingOf(image, k, st)
		if err != nil {
			return err
		}
		targets, err := backingTargets(image, ref)
		if err != nil {
			return err
		}
		for _, b := range targets {
			bk, bst := u.key(b)
			if bst == nil {
				dangling = append(dangling, [2]string{filepath.Clean(image), b})
			}
			u.overlays[bk] = append(u.overlays[bk], filepath.Clean(image))
			u.add(b, User{Kind: UserOverlay, Path: filepath.Clean(image)})
			if err := edge(b, depth+1); err != nil {
				return err
			}
		}
		return nil
	}
	for _, p := range m.pools {
		root := p.backend.Root()
		if err := walkPool(ctx, root, func(path string) error { return edge(path, 0) }); err != nil {
			return nil, fmt.Errorf("scanning pool %s for an image's users: %w", root, err)
		}
	}
	var recs []*Domain
	snaps := map[string][]*Snapshot{}
	err := m.store.View(ctx, func(tx metastore.Tx) error {
		var err error
		recs, snaps, err = allRecords(tx, true)
		return err
	})
	if err != nil {
		return nil, err
	}
	// Used alone, the records read above are the definitions: not read
	// a second time.
	defined := recordsDisks(recs)
	if m.defs != nil {
		if defined, err = m.definedDisks(ctx); err != nil {
			return nil, err
		}
	}
	var uses []metastore.ImageUse
	for _, dd := range defined {
		// A definition reads its image and everything below it.
		if err := edge(dd.Path, 0); err != nil {
			return nil, err
		}
		usr := User{Kind: UserDefinition, Domain: dd.Domain, DomainName: dd.DomainName, Disk: dd.Target, Path: filepath.Clean(dd.Path)}
		below, err := m.readsThrough(u, dd.Path)
		if err != nil {
			return nil, err
		}
		for _, p := range below {
			u.add(p, usr)
		}
		uses = append(uses, metastore.ImageUse{Host: m.host, Domain: dd.Domain, DomainName: dd.DomainName, Disk: dd.Target, Chain: below})
	}
	// An image whose backing file is gone reads a file that may be any
	// image here under a new name (a base moved by hand): who reads what
	// can no longer be known, so what writes or removes images stops.
	var list []string
	for _, d := range dangling {
		if stillDangling(d[0], d[1]) {
			list = append(list, fmt.Sprintf("%s names %s", d[0], d[1]))
		}
	}
	if len(list) > 0 {
		sort.Strings(list)
		return nil, fmt.Errorf("%w: backing files not there (moved or removed outside xlsnap?): %s; until each is repointed (qemu-img rebase -u -b NEW) or removed, an image's users cannot all be known and nothing is merged or removed",
			ErrChainBroken, strings.Join(list, "; "))
	}
	// Other hosts' definitions, as each last published them; this
	// host's, as they are now, for the others.
	if err := m.otherHostsUses(ctx, u); err != nil {
		return nil, err
	}
	if err := m.putUses(ctx, uses); err != nil {
		return nil, err
	}
	for _, d := range recs {
		for p := range d.Images {
			u.add(p, User{Kind: UserRecord, Domain: d.Name, DomainName: domainName(d)})
		}
		for _, s := range snaps[d.Name] {
			// A snapshot reads its state image and, as recorded (an image
			// of it may be gone for a while), every image below; the
			// overlay made on it is only where the disk went on writing.
			for _, sd := range s.Disks {
				if sd.Image == "" {
					continue
				}
				for _, p := range d.Chain(sd.Image) {
					u.add(p, User{Kind: UserSnapshot, Domain: d.Name, DomainName: domainName(d), Snapshot: s.Name, Disk: sd.Target})
				}
			}
			if s.Memory != "" {
				u.add(s.Memory, User{Kind: UserSnapshot, Domain: d.Name, DomainName: domainName(d), Snapshot: s.Name})
			}
		}
	}
	for k := range u.overlays {
		sort.Strings(u.overlays[k])
	}
	return u, nil
}

// stillDangling reads image's header again and reports whether it still
// names backing, which is still not there: a scan that raced an
// operation elsewhere (a child repointed, then its old base removed)
// is not taken for a file moved by hand.
func stillDangling(image, backing string) bool {
	ref, err := readBackingRef(image)
	if err != nil {
		return !errors.Is(err, fs.ErrNotExist) // unreadable: fail closed; gone: no one reads through it
	}
	targets, err := backingTargets(image, ref)
	if err != nil || !slices.Contains(targets, backing) {
		return err != nil
	}
	_, err = os.Stat(backing)
	return err != nil
}

// readsThrough lists the images a disk naming path reads: path and
// every image below it, as the headers name them now.
func (m *Manager) readsThrough(u *users, path string) ([]string, error) {
	var out []string
	for p, n := filepath.Clean(path), 0; p != "" && n <= chain.DefaultMaxDepth; n++ {
		out = append(out, p)
		k, st := u.key(p)
		ref, err := m.headers.backingOf(p, k, st)
		if err != nil && !errors.Is(err, fs.ErrNotExist) {
			return nil, err
		}
		if ref == "" {
			break
		}
		p = filepath.Clean(chain.ResolveBacking(p, ref))
	}
	return out, nil
}

// publisher is this Manager's name in the image-user index: its host
// and its domain source.
func (m *Manager) publisher() string { return m.host + "/" + m.sourceTag }

// putUses publishes this host's definitions' image uses, on a shared
// store with a domain source (used alone, storage reads every host's
// records as its definitions).
func (m *Manager) putUses(ctx context.Context, uses []metastore.ImageUse) error {
	if !m.shared || m.defs == nil {
		return nil
	}
	if err := m.store.PutUsers(ctx, m.publisher(), uses); err != nil {
		return fmt.Errorf("publishing the images this host's domains use: %w", err)
	}
	return nil
}

// publishUses reads every definition and publishes what they use: at
// Open, so other hosts know of this host's domains before it works.
func (m *Manager) publishUses(ctx context.Context) error {
	if !m.shared || m.defs == nil {
		return nil
	}
	defined, err := m.definedDisks(ctx)
	if err != nil {
		return err
	}
	u := &users{byKey: map[fileKey][]User{}, byPath: map[string][]User{}}
	var uses []metastore.ImageUse
	for _, dd := range defined {
		below, err := m.readsThrough(u, dd.Path)
		if err != nil {
			return err
		}
		uses = append(uses, metastore.ImageUse{Host: m.host, Domain: dd.Domain, DomainName: dd.DomainName, Disk: dd.Target, Chain: below})
	}
	return m.putUses(ctx, uses)
}

// otherHostsUses adds every other publisher's definitions to u: on a
// shared pool, another host's domain reads an image as surely as one of
// this host's. What cannot be read stops the operation that asked.
func (m *Manager) otherHostsUses(ctx context.Context, u *users) error {
	if !m.shared {
		return nil
	}
	all, err := m.store.Users(ctx)
	if err != nil {
		return fmt.Errorf("reading the images other hosts' domains use: %w", err)
	}
	for _, use := range all {
		if use.Publisher == m.publisher() || len(use.Chain) == 0 {
			continue
		}
		usr := User{Kind: UserDefinition, Domain: use.Domain, DomainName: use.DomainName, Disk: use.Disk, Path: use.Chain[0], Host: use.Host}
		if usr.DomainName == "" {
			usr.DomainName = use.Domain
		}
		for _, p := range use.Chain {
			u.add(p, usr)
		}
	}
	return nil
}

// Users lists every user of the image at path that can be found now:
// every definition's disk that names it or reads through it, every image
// in the pools backed by it, every snapshot and domain record. Shape:
// one User per way each user reaches it. Errors: what cannot be read (a
// pool file's header, a definition) is an error, as it is for the
// operations this guards.
func (m *Manager) Users(ctx context.Context, path string) ([]User, error) {
	u, err := m.scanUsers(ctx)
	if err != nil {
		return nil, err
	}
	return u.of(path), nil
}

// walkPool calls fn for every regular file under root, following
// symlinked folders (an overlay behind one is still a user) once each.
func walkPool(ctx context.Context, root string, fn func(path string) error) error {
	visited := map[fileKey]bool{}
	var walk func(dir string, depth int) error
	walk = func(dir string, depth int) error {
		k, st := keyOf(dir)
		if st == nil || visited[k] || depth > 64 {
			return nil
		}
		visited[k] = true
		entries, err := os.ReadDir(dir)
		if err != nil {
			return err
		}
		for _, e := range entries {
			if err := ctx.Err(); err != nil {
				return err
			}
			path := filepath.Join(dir, e.Name())
			mode := e.Type()
			if mode&fs.ModeSymlink != 0 {
				st, err := os.Stat(path)
				if err != nil {
					continue // a dangling link names nothing
				}
				mode = st.Mode().Type()
			}
			switch {
			case mode.IsDir():
				if err := walk(path, depth+1); err != nil {
					return err
				}
			case mode.IsRegular() && !IsTempName(path):
				// A temporary file is no image yet: nothing reads it.
				if err := fn(path); err != nil {
					return err
				}
			}
		}
		return nil
	}
	return walk(root, 0)
}

// backingTargets lists the local files a backing reference makes QEMU
// open, resolved as QEMU resolves them: a plain or file: path, or every
// "filename" of a json: reference. A network protocol opens no local
// file. A json: reference that does not parse could name anything: an
// error.
func backingTargets(image, ref string) ([]string, error) {
	switch {
	case ref == "":
		return nil, nil
	case strings.HasPrefix(ref, "json:"):
		var v any
		if err := json.Unmarshal([]byte(strings.TrimPrefix(ref, "json:")), &v); err != nil {
			return nil, fmt.Errorf("%w: %s: backing reference %q: %w", ErrUnsafeBacking, image, ref, err)
		}
		var out []string
		var find func(any)
		find = func(v any) {
			switch t := v.(type) {
			case map[string]any:
				for k, x := range t {
					if s, ok := x.(string); ok && k == "filename" {
						out = append(out, filepath.Clean(chain.ResolveBacking(image, s)))
					}
					find(x)
				}
			case []any:
				for _, x := range t {
					find(x)
				}
			}
		}
		find(v)
		return out, nil
	case strings.HasPrefix(ref, "file:"):
		return []string{filepath.Clean(chain.ResolveBacking(image, strings.TrimPrefix(ref, "file:")))}, nil
	}
	if i := strings.IndexByte(ref, ':'); i > 0 && !strings.Contains(ref[:i], "/") && networkProtocols[ref[:i]] {
		return nil, nil
	}
	return []string{filepath.Clean(chain.ResolveBacking(image, ref))}, nil
}

// networkProtocols are QEMU's block protocols that open no local file.
var networkProtocols = map[string]bool{
	"nbd": true, "nbd+unix": true, "nbd+tcp": true, "http": true, "https": true, "ftp": true, "ftps": true,
	"iscsi": true, "iser": true, "rbd": true, "gluster": true, "gluster+tcp": true, "gluster+unix": true,
	"gluster+rdma": true, "ssh": true, "nfs": true, "sheepdog": true, "vxhs": true,
}

// definedDisks lists every disk of every definition; storage used alone
// (no Definitions) takes its records of each domain's disks instead.
func (m *Manager) definedDisks(ctx context.Context) ([]DefinedDisk, error) {
	if m.defs != nil {
		defined, err := m.defs.DefinedDisks(ctx)
		if err != nil {
			return nil, fmt.Errorf("reading the domain definitions for an image's users: %w", err)
		}
		return defined, nil
	}
	return m.recordedDisks(ctx)
}

// recordedDisks lists every disk of every domain record, whatever its
// source: what another folder's domains wrote to when last seen.
func (m *Manager) recordedDisks(ctx context.Context) ([]DefinedDisk, error) {
	var recs []*Domain
	err := m.store.View(ctx, func(tx metastore.Tx) error {
		var err error
		recs, _, err = allRecords(tx, false)
		return err
	})
	return recordsDisks(recs), err
}

// recordsDisks lists every disk of the records.
func recordsDisks(recs []*Domain) []DefinedDisk {
	var defined []DefinedDisk
	for _, d := range recs {
		for _, disk := range d.Disks {
			defined = append(defined, DefinedDisk{Domain: d.Name, DomainName: domainName(d), Target: disk.Target, Path: disk.Active, Format: disk.Format})
		}
	}
	return defined
}

// allRecords reads every domain record of the store and, with snapshots,
// every snapshot record (without domain XML) by domain key.
func allRecords(tx metastore.Tx, snapshots bool) ([]*Domain, map[string][]*Snapshot, error) {
	names, err := tx.DomainNames()
	if err != nil {
		return nil, nil, err
	}
	var recs []*Domain
	snaps := map[string][]*Snapshot{}
	for _, n := range names {
		d, err := tx.Domain(n)
		if err != nil {
			return nil, nil, err
		}
		recs = append(recs, d)
		if snapshots {
			if snaps[n], err = tx.Snapshots(n); err != nil {
				return nil, nil, err
			}
		}
	}
	return recs, snaps, nil
}

// domainName is a record's display name.
func domainName(d *Domain) string {
	if d.DisplayName != "" {
		return d.DisplayName
	}
	return d.Name
}

// DescribeUsers renders users for a report or an error, comma-separated.
func DescribeUsers(us []User) string {
	var parts []string
	for _, u := range us {
		parts = append(parts, u.String())
	}
	return strings.Join(parts, ", ")
}

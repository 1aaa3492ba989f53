package storage_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"maps"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/xlsnap/xlsnap/chain"
	"github.com/xlsnap/xlsnap/storage"
	"github.com/xlsnap/xlsnap/storage/backend/dir"
	"github.com/xlsnap/xlsnap/storage/storagetest"
)

// TestMinimalChains is the property "chains stay minimal": after any
// sequence of snapshot creates (external, internal, mixed), reverts and
// deletes, every disk reads what a model says it holds, every snapshot
// reads what it held (its state image, or its internal snapshot, read
// back whole), Check finds nothing (no chain that could be shorter, no
// orphan), and every layer of every disk's chain is there for a reason:
// it is the active layer, a remaining external snapshot's state, it
// holds an internal snapshot, it backs more than one image, or its child
// holds an internal snapshot (a merge would change what that sees).
//
// The sequence is random: XLSNAP_MINIMAL_SEED replays one (the seed is
// logged), XLSNAP_MINIMAL_OPS sets its length (default 80, some 15-30 s).
func TestMinimalChains(t *testing.T) {
	t.Parallel()
	ops := 80
	if s := os.Getenv("XLSNAP_MINIMAL_OPS"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 {
			t.Fatalf("XLSNAP_MINIMAL_OPS=%q: want a number of operations", s)
		}
		ops = n
	}
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("XLSNAP_MINIMAL_SEED"); s != "" {
		n, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			t.Fatalf("XLSNAP_MINIMAL_SEED=%q: want a number", s)
		}
		seed = n
	}
	t.Logf("XLSNAP_MINIMAL_SEED=%d XLSNAP_MINIMAL_OPS=%d", seed, ops)
	storage.Register("dir", dir.New)
	p := newMinimal(t, rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15)))
	start := time.Now()
	for i := range ops {
		desc := p.step()
		t.Logf("%3d %s", i, desc)
		p.check(fmt.Sprintf("after step %d (%s), seed %d", i, desc, seed))
	}
	t.Logf("%d operations, %d snapshots taken, %d merges, in %v", ops, p.taken, p.merges, time.Since(start).Round(time.Millisecond))
}

const (
	minBlocks   = 16        // blocks per disk
	minBlockLen = 256 << 10 // bytes per block
	minMaxSnaps = 6
)

var minDisks = []string{"vda", "vdb"}

// minContent is what a disk shows: each block's pattern (0 for zeros).
type minContent [minBlocks]byte

type minSnap struct {
	name   string
	parent string
	modes  []storage.DiskMode // by disk, minDisks order
	data   []minContent
}

type minimal struct {
	t      *testing.T
	e      *storagetest.Env
	rnd    *rand.Rand
	cur    []minContent
	snaps  map[string]*minSnap
	curSn  string // the current snapshot
	next   byte   // the next pattern
	taken  int
	merges int
}

func newMinimal(t *testing.T, rnd *rand.Rand) *minimal {
	e := storagetest.NewEnv(t, "dir")
	var specs []storage.DiskSpec
	for _, d := range minDisks {
		p := e.Path("vm-" + d + ".qcow2")
		e.Run("qemu-img", "create", "-q", "-f", "qcow2", p, strconv.Itoa(minBlocks*minBlockLen))
		specs = append(specs, storage.DiskSpec{Target: d, Path: p, Format: "qcow2"})
	}
	if _, err := e.M.DefineDomain(e.Ctx, "vm", "vm", "", specs); err != nil {
		t.Fatal(err)
	}
	return &minimal{t: t, e: e, rnd: rnd, cur: make([]minContent, len(minDisks)), snaps: map[string]*minSnap{}, next: 1}
}

func (p *minimal) pattern() byte {
	b := p.next
	p.next++
	if p.next == 0 {
		p.next = 1
	}
	return b
}

// step does one random operation (a write to a disk or two first, most
// of the time) and says what it did.
func (p *minimal) step() string {
	var desc []string
	if p.rnd.IntN(4) > 0 {
		for i, d := range minDisks {
			if p.rnd.IntN(3) == 0 {
				continue
			}
			off, n := p.rnd.IntN(minBlocks), 1+p.rnd.IntN(3)
			n = min(n, minBlocks-off)
			b := p.pattern()
			p.e.Write("vm", d, b, off*minBlockLen, n*minBlockLen)
			for j := off; j < off+n; j++ {
				p.cur[i][j] = b
			}
			desc = append(desc, fmt.Sprintf("write %s 0x%02x@%d+%d", d, b, off, n))
		}
	}
	names := slices.Sorted(maps.Keys(p.snaps))
	r := p.rnd.IntN(10)
	switch {
	case len(names) > 0 && (r < 2 || len(names) >= minMaxSnaps && r < 5):
		name := names[p.rnd.IntN(len(names))]
		children := p.rnd.IntN(4) == 0
		desc = append(desc, p.delete(name, children))
	case len(names) > 0 && r < 4:
		name := names[p.rnd.IntN(len(names))]
		desc = append(desc, p.revert(name))
	default:
		desc = append(desc, p.create())
	}
	return strings.Join(desc, "; ")
}

func (p *minimal) create() string {
	p.taken++
	name := fmt.Sprintf("s%d", p.taken)
	s := &minSnap{name: name, parent: p.curSn, data: slices.Clone(p.cur)}
	spec := storage.SnapshotSpec{Name: name, DomainXML: "<domain/>"}
	kind := p.rnd.IntN(5)
	for range minDisks {
		var mode storage.DiskMode
		switch {
		case kind <= 1: // disk-only external, every disk
			mode = storage.DiskExternal
		case kind == 2: // internal, every disk
			mode = storage.DiskInternal
		default: // a mix, some disks taking no part
			mode = []storage.DiskMode{storage.DiskExternal, storage.DiskInternal, storage.DiskNone}[p.rnd.IntN(3)]
		}
		s.modes = append(s.modes, mode)
	}
	if !slices.ContainsFunc(s.modes, func(m storage.DiskMode) bool { return m != storage.DiskNone }) {
		s.modes[0] = storage.DiskExternal
	}
	for i, d := range minDisks {
		spec.Disks = append(spec.Disks, storage.SnapshotDiskSpec{Target: d, Mode: s.modes[i]})
	}
	if _, err := p.e.M.CreateSnapshot(p.e.Ctx, "vm", spec); err != nil {
		p.t.Fatalf("create %s %v: %v", name, s.modes, err)
	}
	p.snaps[name], p.curSn = s, name
	return fmt.Sprintf("create %s %v", name, s.modes)
}

func (p *minimal) revert(name string) string {
	if _, err := p.e.M.Revert(p.e.Ctx, "vm", name, storage.RevertOptions{}); err != nil {
		p.t.Fatalf("revert %s: %v", name, err)
	}
	s := p.snaps[name]
	for i, m := range s.modes {
		if m != storage.DiskNone {
			p.cur[i] = s.data[i]
		}
	}
	p.curSn = name
	return "revert " + name
}

func (p *minimal) delete(name string, children bool) string {
	r, err := p.e.M.DeleteSnapshot(p.e.Ctx, "vm", name, storage.DeleteOptions{Children: children})
	if err != nil {
		p.t.Fatalf("delete %s (children %v): %v", name, children, err)
	}
	p.merges += len(r.Coalesced)
	for _, n := range r.Deleted {
		gone := p.snaps[n]
		for _, o := range p.snaps {
			if o.parent == n {
				o.parent = gone.parent
			}
		}
		if p.curSn == n {
			p.curSn = gone.parent
		}
		delete(p.snaps, n)
	}
	what := "delete " + name
	if children {
		what += " --children"
	}
	return fmt.Sprintf("%s (deleted %v, merged %d freed layers)", what, r.Deleted, len(r.Coalesced))
}

// check asserts the property after a step.
func (p *minimal) check(when string) {
	t := p.t
	t.Helper()
	problems, err := p.e.M.Check(p.e.Ctx)
	if err != nil {
		t.Fatalf("%s: Check: %v", when, err)
	}
	if len(problems) > 0 {
		t.Fatalf("%s: Check found %+v", when, problems)
	}
	d, err := p.e.M.Domain(p.e.Ctx, "vm")
	if err != nil {
		t.Fatal(err)
	}
	if d.Current != p.curSn {
		t.Fatalf("%s: current %q, want %q", when, d.Current, p.curSn)
	}
	// Data: each disk, and each snapshot's view of each disk it holds.
	for i, name := range minDisks {
		p.expectView(when, d.Disk(name).Active, "", p.cur[i])
	}
	recs, err := p.e.M.Snapshots(p.e.Ctx, "vm")
	if err != nil {
		t.Fatal(err)
	}
	if len(recs) != len(p.snaps) {
		t.Fatalf("%s: %d snapshot records, the model has %d", when, len(recs), len(p.snaps))
	}
	ext := map[string]bool{} // remaining external snapshots' state images
	for _, rec := range recs {
		s := p.snaps[rec.Name]
		if s == nil {
			t.Fatalf("%s: snapshot %s is not in the model", when, rec.Name)
		}
		if rec.Parent != s.parent {
			t.Fatalf("%s: snapshot %s's parent %q, want %q", when, rec.Name, rec.Parent, s.parent)
		}
		for i, name := range minDisks {
			sd := rec.Disk(name)
			switch s.modes[i] {
			case storage.DiskExternal:
				ext[sd.Image] = true
				p.expectView(when+", snapshot "+rec.Name, sd.Image, "", s.data[i])
			case storage.DiskInternal:
				p.expectView(when+", snapshot "+rec.Name, sd.Image, rec.Name, s.data[i])
			}
		}
	}
	// Every layer of every chain is there for a reason.
	kids := p.children()
	for _, name := range minDisks {
		layers := p.chainOf(d.Disk(name).Active)
		for j, l := range layers {
			switch {
			case j == 0, ext[l.path], len(l.internal) > 0, kids[l.path] > 1,
				j > 0 && len(layers[j-1].internal) > 0:
				continue
			}
			var names []string
			for _, l := range layers {
				names = append(names, fmt.Sprintf("%s%v", filepath.Base(l.path), l.internal))
			}
			t.Fatalf("%s: disk %s, chain %v: %s is there for no reason (no disk writes it, no external snapshot holds its state, it holds no internal snapshot, it backs %d image, its child holds none)",
				when, name, names, filepath.Base(l.path), kids[l.path])
		}
	}
}

// minLayer is one layer of a chain as qemu-img reads it.
type minLayer struct {
	path     string
	internal []string
}

// chainOf reads the chain under image with qemu-img, with each layer's
// internal snapshots.
func (p *minimal) chainOf(image string) []minLayer {
	p.t.Helper()
	out := storagetest.Run(p.t, "qemu-img", "info", "-U", "--backing-chain", "--output=json", "-f", "qcow2", image)
	var infos []struct {
		Filename  string `json:"filename"`
		Snapshots []struct {
			Name string `json:"name"`
		} `json:"snapshots"`
	}
	if err := json.Unmarshal([]byte(out), &infos); err != nil {
		p.t.Fatalf("qemu-img info %s: %v", image, err)
	}
	var layers []minLayer
	for _, in := range infos {
		l := minLayer{path: in.Filename}
		for _, s := range in.Snapshots {
			l.internal = append(l.internal, s.Name)
		}
		sort.Strings(l.internal)
		layers = append(layers, l)
	}
	return layers
}

// children counts, for each file in the pool, the files backed by it.
func (p *minimal) children() map[string]int {
	out := map[string]int{}
	for _, f := range p.e.PoolFiles() {
		path := p.e.Path(f)
		h, err := crashHeader(path)
		if err != nil || h.BackingFile == "" {
			continue
		}
		out[filepath.Clean(chain.ResolveBacking(path, h.BackingFile))]++
	}
	return out
}

// expectView asserts image (at internal snapshot snapshot, "" for the
// image as it is) reads c, whole.
func (p *minimal) expectView(when, image, snapshot string, c minContent) {
	p.t.Helper()
	b := readImage(p.t, image, snapshot)
	if len(b) != minBlocks*minBlockLen {
		p.t.Fatalf("%s: %s@%q: %d bytes", when, image, snapshot, len(b))
	}
	for i, want := range c {
		if blk := b[i*minBlockLen : (i+1)*minBlockLen]; !bytes.Equal(blk, bytes.Repeat([]byte{want}, minBlockLen)) {
			p.t.Fatalf("%s: %s@%q block %d: want 0x%02x, read 0x%02x...", when, filepath.Base(image), snapshot, i, want, blk[0])
		}
	}
}

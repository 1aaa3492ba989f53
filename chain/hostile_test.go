package chain_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"

	"github.com/xlsnap/xlsnap/chain"
)

var update = flag.Bool("update", false, "rewrite the crafted images under testdata/hostile")

// hostileHeaders are images crafted byte by byte that ParseHeader must
// refuse with the given error. They are kept under testdata/hostile (and
// seed the fuzz corpus); -update rewrites them from these definitions.
func hostileHeaders() map[string]struct {
	img  []byte
	want error
} {
	c := newCrafted
	type tc = struct {
		img  []byte
		want error
	}
	m := map[string]tc{}
	add := func(name string, cr crafted, want error) { m[name] = tc{cr.bytes(), want} }

	m["bad-magic"] = tc{append([]byte("QFI\x00"), make([]byte, 200)...), chain.ErrInvalidImage}
	m["truncated"] = tc{c().bytes()[:40], chain.ErrInvalidImage}
	v1 := c()
	v1.version = 1
	add("version1", v1, chain.ErrUnsupported)
	v4 := c()
	v4.version = 4
	add("version4", v4, chain.ErrUnsupported)
	small := c()
	small.clusterBits = 8
	add("cluster-bits-8", small, chain.ErrInvalidImage)
	big := c()
	big.clusterBits = 22
	add("cluster-bits-22", big, chain.ErrInvalidImage)
	unk := c()
	unk.incompat = 1 << 5
	add("unknown-incompatible", unk, chain.ErrUnsupported)
	cor := c()
	cor.incompat = 1 << 1
	add("corrupt-bit", cor, chain.ErrCorrupt)
	hl := c()
	hl.headerLength = 1 << 31
	add("header-length-huge", hl, chain.ErrInvalidImage)
	m["header-length-2MiB-in-4KiB"] = tc{hugeHeaderLength(), chain.ErrInvalidImage}
	hl2 := c()
	hl2.headerLength = 96
	add("header-length-short", hl2, chain.ErrInvalidImage)
	ro := c()
	ro.refcountOrder = 7
	add("refcount-order-7", ro, chain.ErrInvalidImage)
	ct := c()
	ct.compression, ct.incompat = 2, 1<<3
	add("compression-unknown", ct, chain.ErrUnsupported)
	zs := c()
	zs.compression = 1
	add("zstd-without-bit", zs, chain.ErrInvalidImage)
	bl := c().withBacking(strings.Repeat("a", 1024), "qcow2")
	add("backing-name-1024", bl, chain.ErrInvalidImage)
	bo := c().withBacking("base.qcow2", "qcow2")
	bo.clusterBits, bo.backingOffset = 9, 1024
	add("backing-offset-past-cluster", bo, chain.ErrInvalidImage)
	bp := c()
	bp.backing, bp.backingOffset, bp.backingLen = "x", 512, 1000
	add("backing-past-eof", bp, chain.ErrInvalidImage)
	bf := c().withBacking("base.qcow2", "")
	bf.extensions = []extension{{typ: 0xe2792aca, data: []byte("qcow2-but-far-too-long")}}
	add("backing-format-16", bf, chain.ErrInvalidImage)
	el := c()
	el.extensions = []extension{{typ: 0x6803f857, data: make([]byte, 48), length: 0x7fffffff}}
	add("extension-length-huge", el, chain.ErrInvalidImage)
	bm := c()
	bm.autoclear = 1
	bm.extensions = []extension{{typ: 0x23852875, data: make([]byte, 8)}}
	add("bitmaps-ext-short", bm, chain.ErrInvalidImage)

	million := c()
	million.nbSnapshots, million.snapOffset = 1_000_000, 1<<16
	add("snapshots-million", million, chain.ErrInvalidImage)
	// The most snapshots QEMU allows, but the file holds none of them.
	claimed := c()
	claimed.nbSnapshots, claimed.snapOffset = 65536, 1<<16
	claimed.snapTable = snapshotEntry("1", "only", 0, nil)
	add("snapshots-claimed-not-present", claimed, chain.ErrInvalidImage)
	extra := c()
	extra.nbSnapshots, extra.snapOffset = 1, 1<<16
	extra.snapTable = snapshotEntry("1", "s", 1<<31, nil)
	add("snapshot-extra-2GiB", extra, chain.ErrInvalidImage)
	add("snapshot-names-claimed-not-present", bigNamesClaim(), chain.ErrInvalidImage)
	unaligned := c()
	unaligned.nbSnapshots, unaligned.snapOffset = 1, 4097
	add("snapshot-table-unaligned", unaligned, chain.ErrInvalidImage)
	return m
}

func TestHostileHeaders(t *testing.T) {
	dir := filepath.Join("testdata", "hostile")
	for name, tc := range hostileHeaders() {
		t.Run(name, func(t *testing.T) {
			path := filepath.Join(dir, name+".qcow2")
			if *update {
				if err := os.MkdirAll(dir, 0o755); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(path, tc.img, 0o644); err != nil {
					t.Fatal(err)
				}
			}
			img, err := os.ReadFile(path)
			if err != nil {
				t.Fatalf("%v (run go test ./chain -run TestHostileHeaders -update)", err)
			}
			if !bytes.Equal(img, tc.img) {
				t.Fatalf("%s differs from its definition: run with -update", path)
			}
			h, err := chain.ParseHeader(bytes.NewReader(img))
			if !errors.Is(err, tc.want) {
				t.Fatalf("ParseHeader = %+v, %v; want %v", h, err, tc.want)
			}
			// Through Walk the refusal is typed and names the image; the
			// policy asks for the snapshot tables, as ParseHeader reads them.
			_, err = chain.Walk(context.Background(), path, chain.FormatQcow2, chain.Policy{Snapshots: true})
			var ie *chain.ImageError
			if !errors.As(err, &ie) || !errors.Is(err, tc.want) || !strings.HasSuffix(ie.Path, name+".qcow2") {
				t.Fatalf("Walk error %v; want an ImageError naming the image, wrapping %v", err, tc.want)
			}
		})
	}
}

// bigNamesClaim is one snapshot entry whose ID and name claim 64 KiB
// each, in a file that ends right after the entry's fixed part.
func bigNamesClaim() crafted {
	cr := newCrafted()
	cr.nbSnapshots, cr.snapOffset = 1, 1<<16
	e := snapshotEntry("", "", 0, nil)
	binary.BigEndian.PutUint16(e[12:], 0xffff)
	binary.BigEndian.PutUint16(e[14:], 0xffff)
	cr.snapTable = e
	return cr
}

// allocPerRun is the bytes f allocates on the heap, averaged over runs.
func allocPerRun(runs int, f func()) uint64 {
	var before, after runtime.MemStats
	f() // warm up, as testing.AllocsPerRun does
	runtime.ReadMemStats(&before)
	for range runs {
		f()
	}
	runtime.ReadMemStats(&after)
	return (after.TotalAlloc - before.TotalAlloc) / uint64(runs)
}

// TestHostileHeaderAllocations proves a header claiming more than its
// file holds costs only what the file holds: a tiny hostile file parses in
// well under 64 KiB, whatever length, count or table size it claims.
func TestHostileHeaderAllocations(t *testing.T) {
	claimed := newCrafted()
	claimed.nbSnapshots, claimed.snapOffset = 65536, 1<<16
	claimed.snapTable = bytes.Repeat(snapshotEntry("1", "s", 0, nil), 3)
	for name, img := range map[string][]byte{
		"3 of 65536 entries":      claimed.bytes(),
		"2 MiB header in 4 KiB":   hugeHeaderLength(),
		"128 KiB of names absent": bigNamesClaim().bytes(),
	} {
		t.Run(name, func(t *testing.T) {
			parse := func() { _, _ = chain.ParseHeader(bytes.NewReader(img)) }
			if allocs := testing.AllocsPerRun(20, parse); allocs > 50 {
				t.Errorf("%v allocations per parse", allocs)
			}
			if n := allocPerRun(20, parse); n > 64<<10 {
				t.Errorf("%d bytes allocated per parse of a %d-byte file", n, len(img))
			}
		})
	}
}

// TestWalkSnapshotBomb walks 8 sparse layers whose tables each hold
// 64 MiB of names (QEMU's limit per image): without Policy.Snapshots the
// tables cost nothing; with it the walk stops at the chain's budget.
func TestWalkSnapshotBomb(t *testing.T) {
	top := writeSnapshotBombChain(t, t.TempDir(), 8)
	ctx := context.Background()
	var c *chain.Chain
	var err error
	n := allocPerRun(3, func() { c, err = chain.Walk(ctx, top, chain.FormatQcow2, chain.Policy{}) })
	if err != nil {
		t.Fatal(err)
	}
	if len(c.Layers) != 8 || c.Top().Snapshots() != nil || c.Top().Qcow2.NbSnapshots != 511 {
		t.Fatalf("%d layers, top's snapshots %d of %d", len(c.Layers), len(c.Top().Snapshots()), c.Top().Qcow2.NbSnapshots)
	}
	if n > 256<<10 {
		t.Errorf("walk without snapshots allocated %d bytes", n)
	}

	n = allocPerRun(3, func() { _, err = chain.Walk(ctx, top, chain.FormatQcow2, chain.Policy{Snapshots: true}) })
	var ie *chain.ImageError
	if !errors.Is(err, chain.ErrTooLarge) || !errors.As(err, &ie) || ie.Path != top {
		t.Fatalf("Walk with snapshots = %v; want an ImageError for %s wrapping ErrTooLarge", err, top)
	}
	// The names read before the budget ran out, held twice at most.
	if limit := uint64(2*chain.DefaultMaxSnapshotBytes + 1<<20); n > limit {
		t.Errorf("walk with snapshots allocated %d bytes, want under %d", n, limit)
	}
}

// TestSnapshotBudgetSpansTheChain proves the budget is the chain's, not
// each layer's: small tables add up until one layer passes it.
func TestSnapshotBudgetSpansTheChain(t *testing.T) {
	dir := t.TempDir()
	table := bytes.Repeat(snapshotEntry("1", "a", 0, nil), 3) // 144 bytes
	prev := ""
	for i := range 8 {
		cr := newCrafted()
		if prev != "" {
			cr = cr.withBacking(prev, "qcow2")
		}
		cr.nbSnapshots, cr.snapOffset, cr.snapTable = 3, 1<<16, table
		prev = fmt.Sprintf("l%d.qcow2", i)
		writeImage(t, dir, prev, cr)
	}
	top := filepath.Join(dir, prev)
	ctx := context.Background()
	c, err := chain.Walk(ctx, top, chain.FormatQcow2, chain.Policy{Snapshots: true, MaxSnapshotBytes: 8 * 144})
	if err != nil || len(c.Base().Snapshots()) != 3 {
		t.Fatalf("Walk within the budget = %v; base snapshots %v", err, c)
	}
	_, err = chain.Walk(ctx, top, chain.FormatQcow2, chain.Policy{Snapshots: true, MaxSnapshotBytes: 500})
	var ie *chain.ImageError
	// l7, l6 and l5 take 432 bytes; l4's first entry passes 500.
	if !errors.Is(err, chain.ErrTooLarge) || !errors.As(err, &ie) || filepath.Base(ie.Path) != "l4.qcow2" {
		t.Fatalf("Walk past the budget = %v; want an ImageError for l4.qcow2 wrapping ErrTooLarge", err)
	}
}

func TestValidCraftedHeader(t *testing.T) {
	cr := newCrafted().withBacking("base.raw", "raw")
	cr.nbSnapshots, cr.snapOffset = 2, 1<<16
	extra := make([]byte, 16)
	extra[7] = 9     // vm_state_size_large = 9
	extra[15] = 0x20 // disk_size = 32
	cr.snapTable = append(snapshotEntry("1", "first", 16, extra), snapshotEntry("7", "second", 0, nil)...)
	cr.extensions = []extension{
		{typ: 0x6803f857, data: append([]byte{0, 0}, append([]byte("dirty bit"), make([]byte, 37)...)...)},
		{typ: 0x0537be77, data: []byte{0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0x20, 0, 0}},
	}
	h, err := chain.ParseHeader(bytes.NewReader(cr.bytes()))
	if err != nil {
		t.Fatal(err)
	}
	if h.BackingFile != "base.raw" || h.BackingFormat != "raw" {
		t.Errorf("backing %q (%q)", h.BackingFile, h.BackingFormat)
	}
	if h.CryptoHeader == nil || h.CryptoHeader.Offset != 0x10000 || h.CryptoHeader.Length != 0x200000 {
		t.Errorf("crypto header %+v", h.CryptoHeader)
	}
	if len(h.FeatureNames) != 1 || h.FeatureNames[0].Name != "dirty bit" {
		t.Errorf("feature names %+v", h.FeatureNames)
	}
	if len(h.Snapshots) != 2 {
		t.Fatalf("snapshots %+v", h.Snapshots)
	}
	s0, s1 := h.Snapshots[0], h.Snapshots[1]
	if s0.ID != "1" || s0.Name != "first" || s0.VMStateSize != 9 || s0.DiskSize != 32 {
		t.Errorf("first snapshot %+v", s0)
	}
	if s1.ID != "7" || s1.Name != "second" || s1.DiskSize != 1<<20 {
		t.Errorf("second snapshot %+v (an entry without disk size takes the image's)", s1)
	}
}

// writeImage writes a crafted image into dir.
func writeImage(t *testing.T, dir, name string, cr crafted) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, cr.bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// qemuImgOverlay has qemu-img write root/top.qcow2 over the backing
// reference ref without opening it (-u): a hostile reference as real
// tools write it. References qemu-img will not write are crafted.
func qemuImgOverlay(t *testing.T, root, ref, format string) string {
	t.Helper()
	top := filepath.Join(root, "top.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", "-u", "-F", format, "-b", ref, top, "1M")
	return top
}

func TestHostileChains(t *testing.T) {
	q := newCrafted
	cases := []struct {
		name   string
		setup  func(t *testing.T, root, outside string) string // returns the top image
		policy func(root string) chain.Policy
		want   error
		ref    string // the reference the error must name
	}{
		{"absolute outside", func(t *testing.T, root, out string) string {
			return qemuImgOverlay(t, root, "/etc/passwd", "raw")
		}, nil, chain.ErrOutsideRoots, "/etc/passwd"},
		{"dotdot outside", func(t *testing.T, root, out string) string {
			writeImage(t, out, "base.qcow2", q())
			return writeImage(t, root, "top.qcow2", q().withBacking("../outside/base.qcow2", "qcow2"))
		}, nil, chain.ErrOutsideRoots, "../outside/base.qcow2"},
		{"symlink outside", func(t *testing.T, root, out string) string {
			writeImage(t, out, "base.qcow2", q())
			if err := os.Symlink(filepath.Join(out, "base.qcow2"), filepath.Join(root, "link.qcow2")); err != nil {
				t.Fatal(err)
			}
			return writeImage(t, root, "top.qcow2", q().withBacking("link.qcow2", "qcow2"))
		}, nil, chain.ErrOutsideRoots, "link.qcow2"},
		{"symlinked folder outside", func(t *testing.T, root, out string) string {
			writeImage(t, out, "base.qcow2", q())
			if err := os.Symlink(out, filepath.Join(root, "dir")); err != nil {
				t.Fatal(err)
			}
			return writeImage(t, root, "top.qcow2", q().withBacking("dir/base.qcow2", "qcow2"))
		}, nil, chain.ErrOutsideRoots, "dir/base.qcow2"},
		{"fifo outside is never opened", func(t *testing.T, root, out string) string {
			if err := syscall.Mkfifo(filepath.Join(out, "fifo"), 0o644); err != nil {
				t.Fatal(err)
			}
			return writeImage(t, root, "top.qcow2", q().withBacking("../outside/fifo", "raw"))
		}, nil, chain.ErrOutsideRoots, "../outside/fifo"},
		{"fifo inside", func(t *testing.T, root, out string) string {
			if err := syscall.Mkfifo(filepath.Join(root, "fifo"), 0o644); err != nil {
				t.Fatal(err)
			}
			return writeImage(t, root, "top.qcow2", q().withBacking("fifo", "raw"))
		}, nil, chain.ErrInvalidImage, "fifo"},
		{"no backing format", func(t *testing.T, root, out string) string {
			writeImage(t, root, "base.qcow2", q())
			return writeImage(t, root, "top.qcow2", q().withBacking("base.qcow2", ""))
		}, nil, chain.ErrNoBackingFormat, "base.qcow2"},
		{"unknown backing format", func(t *testing.T, root, out string) string {
			writeImage(t, root, "base.vmdk", q())
			return qemuImgOverlay(t, root, "base.vmdk", "vmdk")
		}, nil, chain.ErrUnsupported, "base.vmdk"},
		{"json backing", func(t *testing.T, root, out string) string {
			return qemuImgOverlay(t, root, `json:{"file":{"driver":"file","filename":"/etc/shadow"}}`, "raw")
		}, nil, chain.ErrProtocol, `json:{"file":{"driver":"file","filename":"/etc/shadow"}}`},
		{"nbd backing", func(t *testing.T, root, out string) string {
			return qemuImgOverlay(t, root, "nbd://10.0.0.1:10809/disk", "raw")
		}, nil, chain.ErrProtocol, "nbd://10.0.0.1:10809/disk"},
		{"self loop", func(t *testing.T, root, out string) string {
			return writeImage(t, root, "top.qcow2", q().withBacking("top.qcow2", "qcow2"))
		}, nil, chain.ErrLoop, "top.qcow2"},
		{"two-image loop", func(t *testing.T, root, out string) string {
			writeImage(t, root, "b.qcow2", q().withBacking("a.qcow2", "qcow2"))
			return writeImage(t, root, "a.qcow2", q().withBacking("b.qcow2", "qcow2"))
		}, nil, chain.ErrLoop, "a.qcow2"},
		{"loop through a hard link", func(t *testing.T, root, out string) string {
			top := writeImage(t, root, "a.qcow2", q().withBacking("b.qcow2", "qcow2"))
			if err := os.Link(top, filepath.Join(root, "b.qcow2")); err != nil {
				t.Fatal(err)
			}
			return top
		}, nil, chain.ErrLoop, "b.qcow2"},
		{"too deep", func(t *testing.T, root, out string) string {
			writeImage(t, root, "l0.qcow2", q())
			for _, n := range []string{"1", "2", "3", "4"} {
				prev := "l" + string(rune(n[0]-1)) + ".qcow2"
				writeImage(t, root, "l"+n+".qcow2", q().withBacking(prev, "qcow2"))
			}
			return filepath.Join(root, "l4.qcow2")
		}, func(string) chain.Policy { return chain.Policy{MaxDepth: 3} }, chain.ErrTooDeep, "l1.qcow2"},
		{"missing backing", func(t *testing.T, root, out string) string {
			return writeImage(t, root, "top.qcow2", q().withBacking("gone.qcow2", "qcow2"))
		}, nil, chain.ErrChainBroken, "gone.qcow2"},
		{"data file not allowed", func(t *testing.T, root, out string) string {
			cr := q()
			cr.incompat = 1 << 2
			cr.extensions = []extension{{typ: 0x44415441, data: []byte("data.raw")}}
			return writeImage(t, root, "top.qcow2", cr)
		}, nil, chain.ErrUnsupported, ""},
		{"data file outside", func(t *testing.T, root, out string) string {
			cr := q()
			cr.incompat = 1 << 2
			cr.extensions = []extension{{typ: 0x44415441, data: []byte("/etc/passwd")}}
			return writeImage(t, root, "top.qcow2", cr)
		}, func(string) chain.Policy { return chain.Policy{AllowDataFile: true} }, chain.ErrOutsideRoots, "/etc/passwd"},
		{"probe refused for a raw look-alike", func(t *testing.T, root, out string) string {
			if err := os.WriteFile(filepath.Join(root, "disk.vmdk"), []byte("KDMV....."), 0o644); err != nil {
				t.Fatal(err)
			}
			return writeImage(t, root, "top.qcow2", q().withBacking("disk.vmdk", ""))
		}, func(string) chain.Policy { return chain.Policy{AllowProbe: true} }, chain.ErrUnsupported, ""},
		{"top outside explicit roots", func(t *testing.T, root, out string) string {
			return writeImage(t, out, "top.qcow2", q())
		}, func(root string) chain.Policy { return chain.Policy{Roots: []string{root}} }, chain.ErrOutsideRoots, ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			base := t.TempDir()
			root, outside := filepath.Join(base, "root"), filepath.Join(base, "outside")
			for _, d := range []string{root, outside} {
				if err := os.Mkdir(d, 0o755); err != nil {
					t.Fatal(err)
				}
			}
			top := tc.setup(t, root, outside)
			p := chain.Policy{}
			if tc.policy != nil {
				p = tc.policy(root)
			}
			c, err := chain.Walk(context.Background(), top, chain.FormatQcow2, p)
			if !errors.Is(err, tc.want) {
				t.Fatalf("Walk = %v, %v; want %v", c, err, tc.want)
			}
			if tc.ref != "" {
				var be *chain.BackingError
				if !errors.As(err, &be) || !strings.HasSuffix(be.Reference, tc.ref) || be.Image == "" {
					t.Fatalf("error %v does not name the image and the reference %q", err, tc.ref)
				}
			}
		})
	}
}

func TestAllowedProtocolEndsChain(t *testing.T) {
	root := t.TempDir()
	top := qemuImgOverlay(t, root, "nbd://host/disk", "raw")
	c, err := chain.Walk(context.Background(), top, chain.FormatQcow2, chain.Policy{AllowProtocol: true})
	if err != nil {
		t.Fatal(err)
	}
	if len(c.Layers) != 1 || c.Top().BackingRef != "nbd://host/disk" {
		t.Fatalf("chain %+v", c.Layers)
	}
}

func TestProbeAllowed(t *testing.T) {
	root := t.TempDir()
	if err := os.WriteFile(filepath.Join(root, "base.img"), make([]byte, 4096), 0o644); err != nil {
		t.Fatal(err)
	}
	writeImage(t, root, "mid.qcow2", newCrafted().withBacking("base.img", ""))
	top := writeImage(t, root, "top.qcow2", newCrafted().withBacking("mid.qcow2", ""))
	c, err := chain.Walk(context.Background(), top, "", chain.Policy{AllowProbe: true})
	if err != nil {
		t.Fatal(err)
	}
	got := []chain.Format{c.Layers[0].Format, c.Layers[1].Format, c.Layers[2].Format}
	if got[0] != chain.FormatQcow2 || got[1] != chain.FormatQcow2 || got[2] != chain.FormatRaw || c.Base().VirtualSize != 4096 {
		t.Fatalf("probed formats %v, base size %d", got, c.Base().VirtualSize)
	}
}

func TestWalkCancelled(t *testing.T) {
	top := writeImage(t, t.TempDir(), "top.qcow2", newCrafted())
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := chain.Walk(ctx, top, chain.FormatQcow2, chain.Policy{}); !errors.Is(err, context.Canceled) {
		t.Fatalf("Walk on a cancelled context = %v", err)
	}
}

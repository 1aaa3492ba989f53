package chain_test

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/xlsnap/xlsnap/chain"
)

// qemuInfo is the part of `qemu-img info --output=json` the cross-checks
// compare, field for field, with what chain reads natively.
type qemuInfo struct {
	Filename              string `json:"filename"`
	Format                string `json:"format"`
	VirtualSize           uint64 `json:"virtual-size"`
	ClusterSize           uint64 `json:"cluster-size"`
	BackingFilename       string `json:"backing-filename"`
	FullBackingFilename   string `json:"full-backing-filename"`
	BackingFilenameFormat string `json:"backing-filename-format"`
	DirtyFlag             bool   `json:"dirty-flag"`
	Encrypted             bool   `json:"encrypted"`
	Snapshots             []struct {
		ID          string  `json:"id"`
		Name        string  `json:"name"`
		VMStateSize uint64  `json:"vm-state-size"`
		DateSec     uint32  `json:"date-sec"`
		DateNsec    uint32  `json:"date-nsec"`
		VMClockSec  uint64  `json:"vm-clock-sec"`
		VMClockNsec uint64  `json:"vm-clock-nsec"`
		ICount      *uint64 `json:"icount"`
	} `json:"snapshots"`
	FormatSpecific *struct {
		Type string `json:"type"`
		Data struct {
			Compat          string            `json:"compat"`
			CompressionType string            `json:"compression-type"`
			LazyRefcounts   bool              `json:"lazy-refcounts"`
			RefcountBits    uint32            `json:"refcount-bits"`
			Corrupt         bool              `json:"corrupt"`
			ExtendedL2      bool              `json:"extended-l2"`
			DataFile        string            `json:"data-file"`
			DataFileRaw     bool              `json:"data-file-raw"`
			Bitmaps         []json.RawMessage `json:"bitmaps"`
			Encrypt         *struct {
				Format string `json:"format"`
			} `json:"encrypt"`
		} `json:"data"`
	} `json:"format-specific"`
}

func needTool(t testing.TB, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		t.Fatalf("%s not found: run `make deps` (it installs qemu-utils)", name)
	}
	return p
}

func run(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

func qemuImg(t testing.TB, args ...string) string {
	t.Helper()
	return run(t, needTool(t, "qemu-img"), args...)
}

func qemuChain(t testing.TB, top, format string) []qemuInfo {
	t.Helper()
	var infos []qemuInfo
	out := qemuImg(t, "info", "--backing-chain", "--output=json", "-U", "-f", format, top)
	if err := json.Unmarshal([]byte(out), &infos); err != nil {
		t.Fatalf("parse qemu-img info: %v\n%s", err, out)
	}
	return infos
}

// compareChain fails on any field where chain.Walk and qemu-img disagree.
// It reads the snapshot tables: qemu-img reports them.
func compareChain(t *testing.T, top, format string, p chain.Policy) *chain.Chain {
	t.Helper()
	p.Snapshots = true
	c, err := chain.Walk(context.Background(), top, chain.Format(format), p)
	if err != nil {
		t.Fatalf("Walk(%s): %v", top, err)
	}
	want := qemuChain(t, top, format)
	if len(c.Layers) != len(want) {
		t.Fatalf("chain length: got %d, qemu-img says %d", len(c.Layers), len(want))
	}
	for i, w := range want {
		l := c.Layers[i]
		eq := func(field string, got, want any) {
			t.Helper()
			if fmt.Sprint(got) != fmt.Sprint(want) {
				t.Errorf("layer %d (%s) %s: got %v, qemu-img says %v", i, w.Filename, field, got, want)
			}
		}
		eq("filename", l.Path, w.Filename)
		eq("format", l.Format, w.Format)
		eq("virtual-size", l.VirtualSize, w.VirtualSize)
		eq("backing-filename", l.BackingRef, w.BackingFilename)
		eq("backing-filename-format", l.BackingFormat, w.BackingFilenameFormat)
		if i+1 < len(c.Layers) {
			eq("full-backing-filename", c.Layers[i+1].Path, w.FullBackingFilename)
		}
		if l.Format == chain.FormatRaw {
			if l.Qcow2 != nil {
				t.Errorf("layer %d: raw layer with a qcow2 header", i)
			}
			continue
		}
		h := l.Qcow2
		eq("cluster-size", h.ClusterSize(), w.ClusterSize)
		eq("dirty-flag", h.Dirty(), w.DirtyFlag)
		eq("encrypted", h.Encrypted(), w.Encrypted)
		fs := w.FormatSpecific
		if fs == nil || fs.Type != "qcow2" {
			t.Fatalf("layer %d: qemu-img gave no qcow2 format-specific data", i)
		}
		eq("compat", h.Compat(), fs.Data.Compat)
		eq("lazy-refcounts", h.LazyRefcounts(), fs.Data.LazyRefcounts)
		eq("refcount-bits", h.RefcountBits(), fs.Data.RefcountBits)
		eq("corrupt", h.Corrupt(), fs.Data.Corrupt)
		if h.Version == 3 {
			eq("compression-type", h.CompressionName(), fs.Data.CompressionType)
			eq("extended-l2", h.ExtendedL2(), fs.Data.ExtendedL2)
		}
		eq("data-file", h.DataFile, fs.Data.DataFile)
		eq("data-file-raw", h.AutoclearFeatures&chain.AutoclearDataRaw != 0, fs.Data.DataFileRaw)
		bitmaps := 0
		if h.Bitmaps != nil {
			bitmaps = int(h.Bitmaps.NbBitmaps)
		}
		eq("bitmaps", bitmaps, len(fs.Data.Bitmaps))
		if fs.Data.Encrypt != nil {
			eq("encrypt.format", map[uint32]string{chain.CryptAES: "aes", chain.CryptLUKS: "luks"}[h.CryptMethod], fs.Data.Encrypt.Format)
			eq("crypto header ext", h.CryptoHeader != nil, h.CryptMethod == chain.CryptLUKS)
		}
		eq("snapshot count", len(h.Snapshots), len(w.Snapshots))
		for j := range min(len(h.Snapshots), len(w.Snapshots)) {
			s, ws := h.Snapshots[j], w.Snapshots[j]
			eq("snapshot id", s.ID, ws.ID)
			eq("snapshot name", s.Name, ws.Name)
			eq("snapshot vm-state-size", s.VMStateSize, ws.VMStateSize)
			eq("snapshot date-sec", s.DateSec, ws.DateSec)
			eq("snapshot date-nsec", s.DateNsec, ws.DateNsec)
			eq("snapshot vm-clock-sec", s.VMClockNsec/1e9, ws.VMClockSec)
			eq("snapshot vm-clock-nsec", s.VMClockNsec%1e9, ws.VMClockNsec)
			eq("snapshot icount", fmtPtr(s.ICount), fmtPtr(ws.ICount))
		}
	}
	return c
}

func fmtPtr(p *uint64) string {
	if p == nil {
		return "none"
	}
	return fmt.Sprint(*p)
}

// makeChain builds depth qcow2 layers over a base, each referring to the
// one below by a name relative to its folder.
func makeChain(t testing.TB, dir string, depth int, baseFormat string, createOpts ...string) string {
	t.Helper()
	prev := "base." + baseFormat
	args := []string{"create", "-q", "-f", baseFormat}
	if baseFormat == "qcow2" {
		args = append(args, createOpts...)
	}
	qemuImg(t, append(args, filepath.Join(dir, prev), "64M")...)
	for i := 1; i <= depth; i++ {
		name := fmt.Sprintf("layer%03d.qcow2", i)
		args := append([]string{"create", "-q", "-f", "qcow2"}, createOpts...)
		qemuImg(t, append(args, "-F", baseFormatOf(prev, baseFormat), "-b", prev, filepath.Join(dir, name))...)
		prev = name
	}
	return filepath.Join(dir, prev)
}

func baseFormatOf(name, baseFormat string) string {
	if strings.HasPrefix(name, "base.") {
		return baseFormat
	}
	return "qcow2"
}

func TestCrossCheckDepths(t *testing.T) {
	for _, depth := range []int{1, 2, 10, 50, 200} {
		t.Run(fmt.Sprintf("depth%d", depth), func(t *testing.T) {
			t.Parallel()
			top := makeChain(t, t.TempDir(), depth, "qcow2")
			c := compareChain(t, top, "qcow2", chain.Policy{})
			if len(c.Layers) != depth+1 {
				t.Fatalf("got %d layers, want %d", len(c.Layers), depth+1)
			}
		})
	}
}

func TestCrossCheckFormatsAndOptions(t *testing.T) {
	cases := []struct {
		name       string
		baseFormat string
		opts       []string
	}{
		{"v2", "qcow2", []string{"-o", "compat=0.10"}},
		{"v3", "qcow2", []string{"-o", "compat=1.1"}},
		{"raw-base", "raw", nil},
		{"cluster512", "qcow2", []string{"-o", "cluster_size=512"}},
		{"cluster4k", "qcow2", []string{"-o", "cluster_size=4096"}},
		{"cluster2M", "qcow2", []string{"-o", "cluster_size=2M"}},
		{"zstd-lazy-refcount1", "qcow2", []string{"-o", "compression_type=zstd,lazy_refcounts=on,refcount_bits=1"}},
		{"refcount64-extl2", "qcow2", []string{"-o", "refcount_bits=64,extended_l2=on"}},
		{"v2-cluster4k", "qcow2", []string{"-o", "compat=0.10,cluster_size=4096"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			top := makeChain(t, t.TempDir(), 3, tc.baseFormat, tc.opts...)
			compareChain(t, top, "qcow2", chain.Policy{})
		})
	}
}

// TestCrossCheckRawSizes: a raw file's virtual size is QEMU's, rounded up
// to whole 512-byte sectors, alone and as the base of an overlay.
func TestCrossCheckRawSizes(t *testing.T) {
	for _, size := range []int64{0, 1, 511, 512, 513, 4095, 65537, 196616, 1<<20 + 3} {
		t.Run(fmt.Sprint(size), func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			base := filepath.Join(dir, "base.raw")
			if err := os.WriteFile(base, make([]byte, size), 0o644); err != nil {
				t.Fatal(err)
			}
			compareChain(t, base, "raw", chain.Policy{})
			top := filepath.Join(dir, "top.qcow2")
			qemuImg(t, "create", "-q", "-f", "qcow2", "-F", "raw", "-b", "base.raw", top)
			c := compareChain(t, top, "qcow2", chain.Policy{})
			if want := (uint64(size) + 511) / 512 * 512; c.Base().VirtualSize != want {
				t.Errorf("raw of %d bytes: virtual size %d, want %d", size, c.Base().VirtualSize, want)
			}
		})
	}
}

func TestCrossCheckReferences(t *testing.T) {
	root := t.TempDir()
	a, b, c := filepath.Join(root, "a"), filepath.Join(root, "b"), filepath.Join(root, "b", "c")
	for _, d := range []string{a, c} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	qemuImg(t, "create", "-q", "-f", "raw", filepath.Join(a, "base.raw"), "16M")
	// ../ reference, an absolute reference and a subfolder reference.
	qemuImg(t, "create", "-q", "-f", "qcow2", "-F", "raw", "-b", "../a/base.raw", filepath.Join(b, "mid.qcow2"))
	qemuImg(t, "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", filepath.Join(b, "mid.qcow2"), filepath.Join(c, "upper.qcow2"))
	qemuImg(t, "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", "c/upper.qcow2", filepath.Join(b, "top.qcow2"))
	got := compareChain(t, filepath.Join(b, "top.qcow2"), "qcow2", chain.Policy{Roots: []string{root}})
	wantPaths := []string{
		b + "/top.qcow2",
		b + "/c/upper.qcow2",
		b + "/mid.qcow2",
		b + "/../a/base.raw", // as QEMU forms it: not cleaned
	}
	for i, l := range got.Layers {
		if l.Path != wantPaths[i] {
			t.Errorf("layer %d path %s, want %s", i, l.Path, wantPaths[i])
		}
	}
	if got.Base().RealPath != filepath.Join(a, "base.raw") {
		t.Errorf("base real path %s", got.Base().RealPath)
	}
}

func TestCrossCheckInternalSnapshotsAndData(t *testing.T) {
	dir := t.TempDir()
	top := makeChain(t, dir, 2, "qcow2")
	base := filepath.Join(dir, "base.qcow2")
	qemuIO := needTool(t, "qemu-io")
	for i, img := range []string{base, top} {
		for j := range 3 {
			run(t, qemuIO, "-f", "qcow2", "-c", fmt.Sprintf("write -P 0x%02x %dM 1M", 0x10*(i+1)+j, j), img)
			qemuImg(t, "snapshot", "-c", fmt.Sprintf("snap-%d-%d", i, j), img)
		}
	}
	// A long name and a deleted snapshot leave a table with gaps in ids.
	qemuImg(t, "snapshot", "-c", strings.Repeat("n", 500), top)
	qemuImg(t, "snapshot", "-d", "snap-1-1", top)
	c := compareChain(t, top, "qcow2", chain.Policy{})
	if n := len(c.Top().Snapshots()); n != 3 {
		t.Fatalf("top has %d snapshots, want 3", n)
	}
}

// TestCrossCheckPatchedSnapshotFields sets the snapshot fields an offline
// qemu-img cannot (VM state size, VM clock, icount) by patching a real table
// entry, then checks both readers agree on them.
func TestCrossCheckPatchedSnapshotFields(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "s.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", img, "8M")
	qemuImg(t, "snapshot", "-c", "withstate", img)
	f, err := os.OpenFile(img, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h, err := chain.ParseHeader(f)
	if err != nil {
		t.Fatal(err)
	}
	off := int64(h.SnapshotsOffset)
	patch := func(at int64, v any) {
		if _, err := f.Seek(off+at, 0); err != nil {
			t.Fatal(err)
		}
		if err := binary.Write(f, binary.BigEndian, v); err != nil {
			t.Fatal(err)
		}
	}
	patch(24, uint64(12_345_678_901)) // vm_clock_nsec
	patch(32, uint32(0x1000))         // vm_state_size (32-bit, superseded below)
	patch(40, uint64(5<<32))          // vm_state_size_large
	patch(56, uint64(424242))         // icount
	f.Close()
	c := compareChain(t, img, "qcow2", chain.Policy{})
	s := c.Top().Snapshots()[0]
	if s.VMStateSize != 5<<32 || s.VMClockNsec != 12_345_678_901 || s.ICount == nil || *s.ICount != 424242 {
		t.Fatalf("patched snapshot read back as %+v", s)
	}
}

func TestCrossCheckFeatures(t *testing.T) {
	dir := t.TempDir()
	bm := filepath.Join(dir, "bitmaps.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", bm, "8M")
	qemuImg(t, "bitmap", "--add", bm, "b0")
	qemuImg(t, "bitmap", "--add", "-g", "128k", bm, "b1")
	compareChain(t, bm, "qcow2", chain.Policy{})

	// Legacy AES: LUKS key setup times PBKDF2 with getrusage, which fails
	// on some virtual machines ("Unable to get accurate CPU usage"); the
	// LUKS header extension is covered by TestValidCraftedHeader.
	enc := filepath.Join(dir, "aes.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", "--object", "secret,id=sec0,data=123456",
		"-o", "encrypt.format=aes,encrypt.key-secret=sec0", enc, "8M")
	if c := compareChain(t, enc, "qcow2", chain.Policy{}); c.Top().Qcow2.CryptMethod != chain.CryptAES {
		t.Errorf("crypt method %d, want AES", c.Top().Qcow2.CryptMethod)
	}

	df := filepath.Join(dir, "datafile.qcow2")
	qemuImg(t, "create", "-q", "-f", "raw", filepath.Join(dir, "datafile.raw"), "8M")
	qemuImg(t, "create", "-q", "-f", "qcow2", "-o", "data_file=datafile.raw,data_file_raw=on", df, "8M")
	compareChain(t, df, "qcow2", chain.Policy{AllowDataFile: true})
}

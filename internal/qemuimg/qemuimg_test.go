package qemuimg

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/xlsnap/xlsnap/chain"
	"github.com/xlsnap/xlsnap/errdefs"
)

const mib = 1 << 20

func requireTools(t *testing.T) {
	t.Helper()
	for _, tool := range []string{"qemu-img", "qemu-io"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not installed", tool)
		}
	}
}

// qemuIO runs qemu-io commands on a qcow2 image and returns output and exit code.
func qemuIO(t *testing.T, path string, cmds ...string) (string, int) {
	t.Helper()
	args := []string{"-f", "qcow2"}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	out, err := exec.Command("qemu-io", append(args, path)...).CombinedOutput()
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return string(out), ee.ExitCode()
	}
	if err != nil {
		t.Fatalf("qemu-io: %v", err)
	}
	return string(out), 0
}

func mustIO(t *testing.T, path string, cmds ...string) {
	t.Helper()
	out, code := qemuIO(t, path, cmds...)
	if code != 0 || strings.Contains(out, "failed") {
		t.Fatalf("qemu-io %q on %s: exit %d: %s", cmds, path, code, out)
	}
}

// assertPattern checks that [off, off+len) of path reads as pattern.
func assertPattern(t *testing.T, path, readCmd string) {
	t.Helper()
	out, code := qemuIO(t, path, readCmd)
	if code != 0 || strings.Contains(out, "Pattern verification failed") {
		t.Fatalf("%s on %s: exit %d: %s", readCmd, path, code, out)
	}
}

func create(t *testing.T, r *Runner, o CreateOptions) {
	t.Helper()
	if err := r.Create(context.Background(), o); err != nil {
		t.Fatalf("Create(%+v): %v", o, err)
	}
}

func TestCreateAndInfo(t *testing.T) {
	requireTools(t)
	ctx := context.Background()
	dir := t.TempDir()
	var r Runner

	raw := filepath.Join(dir, "base.raw")
	v2 := filepath.Join(dir, "v2.qcow2")
	v3 := filepath.Join(dir, "v3.qcow2")
	onRaw := filepath.Join(dir, "onraw.qcow2")
	create(t, &r, CreateOptions{Path: raw, Format: "raw", Size: 4 * mib})
	create(t, &r, CreateOptions{Path: v2, Format: "qcow2", Size: 8 * mib,
		Options: map[string]string{"compat": "0.10", "cluster_size": "65536"}})
	create(t, &r, CreateOptions{Path: v3, Format: "qcow2", Backing: v2, BackingFormat: "qcow2",
		Options: map[string]string{"cluster_size": "131072"}})
	create(t, &r, CreateOptions{Path: onRaw, Format: "qcow2", Backing: raw, BackingFormat: "raw"})

	infos, err := r.Info(ctx, v3, "qcow2", false)
	if err != nil {
		t.Fatal(err)
	}
	if len(infos) != 1 {
		t.Fatalf("got %d infos, want 1", len(infos))
	}
	got := infos[0]
	if got.Filename != v3 || got.Format != "qcow2" || got.VirtualSize != 8*mib || got.ClusterSize != 131072 {
		t.Errorf("overlay info = %+v", got)
	}
	if got.BackingFilename != v2 || got.FullBackingFilename != v2 || got.BackingFilenameFormat != "qcow2" {
		t.Errorf("overlay backing = %q %q %q", got.BackingFilename, got.FullBackingFilename, got.BackingFilenameFormat)
	}
	if got.ActualSize <= 0 || got.DirtyFlag || got.Encrypted {
		t.Errorf("overlay actual size/flags = %+v", got)
	}
	fs := got.FormatSpecific
	if fs == nil || fs.Type != "qcow2" || fs.Data.Compat != "1.1" || fs.Data.RefcountBits != 16 ||
		fs.Data.CompressionType != "zlib" || fs.Data.Corrupt || fs.Data.LazyRefcounts {
		t.Errorf("overlay format-specific = %+v", fs)
	}

	backing, err := r.Info(ctx, v3, "qcow2", true)
	if err != nil {
		t.Fatal(err)
	}
	if len(backing) != 2 || backing[0].Filename != v3 || backing[1].Filename != v2 {
		t.Fatalf("backing = %+v", backing)
	}
	base := backing[1]
	if base.Format != "qcow2" || base.VirtualSize != 8*mib || base.ClusterSize != 65536 ||
		base.BackingFilename != "" || base.FormatSpecific == nil || base.FormatSpecific.Data.Compat != "0.10" {
		t.Errorf("base info = %+v", base)
	}

	backing, err = r.Info(ctx, onRaw, "qcow2", true)
	if err != nil {
		t.Fatal(err)
	}
	if len(backing) != 2 || backing[0].VirtualSize != 4*mib || backing[0].BackingFilenameFormat != "raw" ||
		backing[1].Format != "raw" || backing[1].Filename != raw || backing[1].FormatSpecific != nil {
		t.Errorf("backing on raw = %+v", backing)
	}

	rawInfo, err := r.Info(ctx, raw, "raw", false)
	if err != nil {
		t.Fatal(err)
	}
	if rawInfo[0].Format != "raw" || rawInfo[0].VirtualSize != 4*mib {
		t.Errorf("raw info = %+v", rawInfo[0])
	}
}

func TestCreateInvalidArgs(t *testing.T) {
	requireTools(t)
	ctx := context.Background()
	dir := t.TempDir()
	var r Runner
	base := filepath.Join(dir, "base.qcow2")
	create(t, &r, CreateOptions{Path: base, Format: "qcow2", Size: mib})

	cases := map[string]CreateOptions{
		"backing without format": {Path: filepath.Join(dir, "a.qcow2"), Format: "qcow2", Backing: base},
		"leading dash":           {Path: "-a.qcow2", Format: "qcow2", Size: mib},
		"colon":                  {Path: filepath.Join(dir, "nbd:a"), Format: "qcow2", Size: mib},
		"no format":              {Path: filepath.Join(dir, "b.img"), Size: mib},
		"negative size":          {Path: filepath.Join(dir, "c.img"), Format: "raw", Size: -1},
		"bad option name":        {Path: filepath.Join(dir, "d.img"), Format: "qcow2", Size: mib, Options: map[string]string{"a,b": "1"}},
	}
	for name, o := range cases {
		if err := r.Create(ctx, o); !errors.Is(err, ErrInvalidArg) {
			t.Errorf("%s: err = %v, want ErrInvalidArg", name, err)
		}
		if _, err := os.Stat(o.Path); err == nil {
			t.Errorf("%s: %s was created", name, o.Path)
		}
	}

	// Rejected by qemu-img itself, classified from its message.
	err := r.Create(ctx, CreateOptions{Path: filepath.Join(dir, "e.qcow2"), Format: "qcow2", Size: mib,
		Options: map[string]string{"compat": "5"}})
	if !errors.Is(err, ErrInvalidArg) || !strings.Contains(err.Error(), "does not accept value") {
		t.Errorf("bad compat: err = %v", err)
	}
	err = r.Create(ctx, CreateOptions{Path: filepath.Join(dir, "f.img"), Format: "nosuchfmt", Size: mib})
	if !errors.Is(err, ErrInvalidArg) || !strings.Contains(err.Error(), "Unknown file format 'nosuchfmt'") {
		t.Errorf("unknown format: err = %v", err)
	}
}

func snapshotNames(t *testing.T, r *Runner, path string) []string {
	t.Helper()
	snaps, err := r.SnapshotList(context.Background(), path, "qcow2")
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, s := range snaps {
		names = append(names, s.Name)
	}
	return names
}

func TestSnapshots(t *testing.T) {
	requireTools(t)
	ctx := context.Background()
	var r Runner
	img := filepath.Join(t.TempDir(), "img,with,commas.qcow2")
	create(t, &r, CreateOptions{Path: img, Format: "qcow2", Size: 4 * mib})

	if names := snapshotNames(t, &r, img); names != nil {
		t.Fatalf("new image has snapshots %q", names)
	}
	if err := r.SnapshotCreate(ctx, img, "qcow2", "clean"); err != nil {
		t.Fatal(err)
	}
	mustIO(t, img, "write -P 0xab 0 1M")
	if err := r.SnapshotCreate(ctx, img, "qcow2", "written"); err != nil {
		t.Fatal(err)
	}
	snaps, err := r.SnapshotList(ctx, img, "qcow2")
	if err != nil {
		t.Fatal(err)
	}
	if len(snaps) != 2 || snaps[0].Name != "clean" || snaps[1].Name != "written" ||
		snaps[0].ID != "1" || snaps[1].ID != "2" || snaps[0].DateSec == 0 {
		t.Fatalf("snapshots = %+v", snaps)
	}

	if err := r.SnapshotApply(ctx, img, "qcow2", "clean"); err != nil {
		t.Fatal(err)
	}
	assertPattern(t, img, "read -P 0 0 1M")
	if err := r.SnapshotApply(ctx, img, "qcow2", "written"); err != nil {
		t.Fatal(err)
	}
	assertPattern(t, img, "read -P 0xab 0 1M")

	if err := r.SnapshotDelete(ctx, img, "qcow2", "clean"); err != nil {
		t.Fatal(err)
	}
	if names := snapshotNames(t, &r, img); !slices.Equal(names, []string{"written"}) {
		t.Fatalf("after delete: %q", names)
	}
	if err := r.SnapshotApply(ctx, img, "qcow2", "clean"); err == nil {
		t.Fatal("applying a deleted snapshot succeeded")
	}
	if err := r.SnapshotCreate(ctx, img, "qcow2", ""); !errors.Is(err, ErrInvalidArg) {
		t.Fatalf("empty name: err = %v", err)
	}
}

func TestCommit(t *testing.T) {
	requireTools(t)
	ctx := context.Background()
	dir := t.TempDir()
	var r Runner
	base := filepath.Join(dir, "base.qcow2")
	top := filepath.Join(dir, "top.qcow2")
	create(t, &r, CreateOptions{Path: base, Format: "qcow2", Size: 4 * mib, Options: map[string]string{"compat": "0.10"}})
	create(t, &r, CreateOptions{Path: top, Format: "qcow2", Backing: base, BackingFormat: "qcow2"})
	mustIO(t, top, "write -P 0xab 0 1M")

	// Before the commit the base must not hold the data, or the test proves nothing.
	if out, code := qemuIO(t, base, "read -P 0xab 0 1M"); code == 0 || !strings.Contains(out, "Pattern verification failed") {
		t.Fatalf("base already has pattern: exit %d: %s", code, out)
	}
	if err := r.Commit(ctx, CommitOptions{Path: top, Format: "qcow2"}); err != nil {
		t.Fatal(err)
	}
	assertPattern(t, base, "read -P 0xab 0 1M")
	if n, err := chain.Allocated(top, chain.FormatQcow2); err != nil || n != 0 {
		t.Fatalf("top after commit (emptied): %d bytes, %v", n, err)
	}

	// -d keeps the top's data.
	mustIO(t, top, "write -P 0xcd 1M 1M")
	if err := r.Commit(ctx, CommitOptions{Path: top, Format: "qcow2", Drop: true}); err != nil {
		t.Fatal(err)
	}
	assertPattern(t, base, "read -P 0xcd 1M 1M")
	if n, err := chain.Allocated(top, chain.FormatQcow2); err != nil || n != mib {
		t.Fatalf("top after commit -d: %d bytes, %v", n, err)
	}
}

func TestCommitBaseInChain(t *testing.T) {
	requireTools(t)
	ctx := context.Background()
	dir := t.TempDir()
	var r Runner
	base := filepath.Join(dir, "base.qcow2")
	mid := filepath.Join(dir, "mid.qcow2")
	top := filepath.Join(dir, "top.qcow2")
	create(t, &r, CreateOptions{Path: base, Format: "qcow2", Size: 4 * mib})
	create(t, &r, CreateOptions{Path: mid, Format: "qcow2", Backing: base, BackingFormat: "qcow2"})
	create(t, &r, CreateOptions{Path: top, Format: "qcow2", Backing: mid, BackingFormat: "qcow2"})
	mustIO(t, mid, "write -P 0x11 0 1M")
	mustIO(t, top, "write -P 0x22 1M 1M")

	if err := r.Commit(ctx, CommitOptions{Path: top, Format: "qcow2", Base: base}); err != nil {
		t.Fatal(err)
	}
	assertPattern(t, base, "read -P 0x11 0 1M")
	assertPattern(t, base, "read -P 0x22 1M 1M")
}

func TestCommitProgress(t *testing.T) {
	requireTools(t)
	ctx := context.Background()
	dir := t.TempDir()
	var r Runner
	base := filepath.Join(dir, "base.qcow2")
	top := filepath.Join(dir, "top.qcow2")
	create(t, &r, CreateOptions{Path: base, Format: "qcow2", Size: 32 * mib})
	create(t, &r, CreateOptions{Path: top, Format: "qcow2", Backing: base, BackingFormat: "qcow2"})
	// Interleaved extents make qemu-img report several steps.
	var cmds []string
	for off := 0; off < 32; off += 2 {
		cmds = append(cmds, "write -P 0x5a "+strconv.Itoa(off)+"M 1M")
	}
	mustIO(t, top, cmds...)

	var got []float64
	err := r.Commit(ctx, CommitOptions{Path: top, Format: "qcow2", Progress: func(p float64) { got = append(got, p) }})
	if err != nil {
		t.Fatal(err)
	}
	if len(got) < 3 {
		t.Fatalf("progress = %v, want at least 3 updates", got)
	}
	if !slices.IsSorted(got) || got[len(got)-1] != 100 || got[0] < 0 {
		t.Fatalf("progress = %v, want increasing values ending at 100", got)
	}
	assertPattern(t, base, "read -P 0x5a 30M 1M")
}

func TestParseProgress(t *testing.T) {
	cases := map[string]float64{"    (12.34/100%)": 12.34, "(100.00/100%)": 100, "(0.00/100%)": 0}
	for in, want := range cases {
		if p, ok := parseProgress(in); !ok || p != want {
			t.Errorf("parseProgress(%q) = %v, %v", in, p, ok)
		}
	}
	for _, in := range []string{"", "Image committed.", "(x/100%)", "(5/50%)"} {
		if _, ok := parseProgress(in); ok {
			t.Errorf("parseProgress(%q) accepted", in)
		}
	}
}

func TestRebase(t *testing.T) {
	requireTools(t)
	ctx := context.Background()
	dir := t.TempDir()
	var r Runner
	base := filepath.Join(dir, "base.qcow2")
	top := filepath.Join(dir, "top.qcow2")
	create(t, &r, CreateOptions{Path: base, Format: "qcow2", Size: 4 * mib})
	mustIO(t, base, "write -P 0xab 0 1M")
	create(t, &r, CreateOptions{Path: top, Format: "qcow2", Backing: base, BackingFormat: "qcow2"})
	mustIO(t, top, "write -P 0xcd 1M 1M")

	// Unsafe: point at a byte-identical copy; only the header changes.
	cp := filepath.Join(dir, "copy.qcow2")
	data, err := os.ReadFile(base)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(cp, data, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := r.Rebase(ctx, RebaseOptions{Path: top, Format: "qcow2", Backing: cp, BackingFormat: "qcow2", Unsafe: true}); err != nil {
		t.Fatal(err)
	}
	info, err := r.Info(ctx, top, "qcow2", false)
	if err != nil {
		t.Fatal(err)
	}
	if info[0].BackingFilename != cp || info[0].BackingFilenameFormat != "qcow2" {
		t.Fatalf("after unsafe rebase: backing %q (%q)", info[0].BackingFilename, info[0].BackingFilenameFormat)
	}
	if n, err := chain.Allocated(top, chain.FormatQcow2); err != nil || n != mib {
		t.Fatalf("unsafe rebase copied data: %d bytes, %v", n, err)
	}

	// Safe removal of the backing file copies its data into top.
	var progress []float64
	err = r.Rebase(ctx, RebaseOptions{Path: top, Format: "qcow2", Progress: func(p float64) { progress = append(progress, p) }})
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(cp); err != nil {
		t.Fatal(err)
	}
	backing, err := r.Info(ctx, top, "qcow2", true)
	if err != nil {
		t.Fatal(err)
	}
	if len(backing) != 1 || backing[0].BackingFilename != "" || backing[0].BackingFilenameFormat != "" {
		t.Fatalf("after safe rebase: %+v", backing)
	}
	assertPattern(t, top, "read -P 0xab 0 1M")
	assertPattern(t, top, "read -P 0xcd 1M 1M")
	assertPattern(t, top, "read -P 0 2M 2M")
	if len(progress) == 0 || progress[len(progress)-1] != 100 {
		t.Errorf("rebase progress = %v", progress)
	}

	if err := r.Rebase(ctx, RebaseOptions{Path: top, Format: "qcow2", Backing: base}); !errors.Is(err, ErrInvalidArg) {
		t.Errorf("backing without format: err = %v", err)
	}
}

// setRefcount patches the 16-bit refcount of cluster idx in a fresh qcow2
// image whose refcount table has one block.
func setRefcount(t *testing.T, path string, idx int64, val uint16) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	read := func(off int64, n int) []byte {
		b := make([]byte, n)
		if _, err := f.ReadAt(b, off); err != nil {
			t.Fatal(err)
		}
		return b
	}
	hdr := read(0, 72)
	if binary.BigEndian.Uint32(hdr[0:]) != 0x514649fb {
		t.Fatal("not a qcow2 image")
	}
	if bits := binary.BigEndian.Uint32(hdr[20:]); bits != 16 {
		t.Fatalf("cluster_bits = %d, test assumes 64k clusters", bits)
	}
	rtOff := int64(binary.BigEndian.Uint64(hdr[48:]))
	blockOff := int64(binary.BigEndian.Uint64(read(rtOff, 8)))
	b := make([]byte, 2)
	binary.BigEndian.PutUint16(b, val)
	if _, err := f.WriteAt(b, blockOff+2*idx); err != nil {
		t.Fatal(err)
	}
}

func TestCheck(t *testing.T) {
	requireTools(t)
	ctx := context.Background()
	dir := t.TempDir()
	var r Runner

	clean := filepath.Join(dir, "clean.qcow2")
	create(t, &r, CreateOptions{Path: clean, Format: "qcow2", Size: 4 * mib})
	mustIO(t, clean, "write -P 1 0 1M")
	res, err := r.Check(ctx, clean, "qcow2")
	if err != nil {
		t.Fatal(err)
	}
	if res.Filename != clean || res.Format != "qcow2" || res.Corruptions != 0 || res.Leaks != 0 ||
		res.CheckErrors != 0 || res.AllocatedClusters != 16 || res.TotalClusters != 64 || res.ImageEndOffset <= mib {
		t.Fatalf("clean check = %+v", res)
	}

	// Zero the refcount of the L1 table cluster: a corruption (exit 2).
	corrupt := filepath.Join(dir, "corrupt.qcow2")
	create(t, &r, CreateOptions{Path: corrupt, Format: "qcow2", Size: 4 * mib})
	hdr := make([]byte, 48)
	f, err := os.Open(corrupt)
	if err != nil {
		t.Fatal(err)
	}
	_, err = f.ReadAt(hdr, 0)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	l1Cluster := int64(binary.BigEndian.Uint64(hdr[40:])) >> 16
	setRefcount(t, corrupt, l1Cluster, 0)
	res, err = r.Check(ctx, corrupt, "qcow2")
	var qe *Error
	if !errors.Is(err, ErrCheckFailed) || !errors.As(err, &qe) || qe.ExitCode != 2 {
		t.Fatalf("corrupt check err = %v", err)
	}
	if res.Corruptions != 1 || res.Leaks != 0 || !strings.Contains(err.Error(), "refcount=0 reference=1") {
		t.Fatalf("corrupt check = %+v, %v", res, err)
	}

	// Append a cluster and give it a refcount nothing references: a leak (exit 3).
	leak := filepath.Join(dir, "leak.qcow2")
	create(t, &r, CreateOptions{Path: leak, Format: "qcow2", Size: 4 * mib})
	st, err := os.Stat(leak)
	if err != nil {
		t.Fatal(err)
	}
	next := (st.Size() + 65535) >> 16
	if err := os.Truncate(leak, (next+1)<<16); err != nil {
		t.Fatal(err)
	}
	setRefcount(t, leak, next, 1)
	res, err = r.Check(ctx, leak, "qcow2")
	if !errors.Is(err, ErrCheckFailed) || !errors.As(err, &qe) || qe.ExitCode != 3 {
		t.Fatalf("leak check err = %v", err)
	}
	if res.Leaks != 1 || res.Corruptions != 0 {
		t.Fatalf("leak check = %+v", res)
	}

	// raw cannot be checked: an error, but not an unhealthy image.
	raw := filepath.Join(dir, "x.raw")
	create(t, &r, CreateOptions{Path: raw, Format: "raw", Size: mib})
	_, err = r.Check(ctx, raw, "raw")
	if err == nil || errors.Is(err, ErrCheckFailed) || !strings.Contains(err.Error(), "does not support checks") {
		t.Fatalf("raw check err = %v", err)
	}
	_, err = r.Check(ctx, filepath.Join(dir, "missing.qcow2"), "qcow2")
	if !errors.Is(err, ErrNotFound) || errors.Is(err, ErrCheckFailed) {
		t.Fatalf("missing check err = %v", err)
	}
}

func TestErrors(t *testing.T) {
	requireTools(t)
	ctx := context.Background()
	dir := t.TempDir()
	var r Runner
	missing := filepath.Join(dir, "missing.qcow2")

	_, err := r.Info(ctx, missing, "qcow2", false)
	var qe *Error
	if !errors.Is(err, ErrNotFound) || !errors.As(err, &qe) {
		t.Fatalf("missing: err = %v", err)
	}
	if qe.ExitCode != 1 || qe.Args[0] != "info" || !strings.Contains(err.Error(), "qemu-img: Could not open '"+missing+"'") ||
		!strings.Contains(err.Error(), "No such file or directory") {
		t.Fatalf("missing: %#v / %q", qe, err.Error())
	}

	raw := filepath.Join(dir, "x.raw")
	create(t, &r, CreateOptions{Path: raw, Format: "raw", Size: mib})
	_, err = r.Info(ctx, raw, "qcow2", false)
	if err == nil || !strings.Contains(err.Error(), "Image is not in qcow2 format") || errors.Is(err, ErrNotFound) {
		t.Fatalf("wrong format: err = %v", err)
	}

	for _, p := range []string{"-U", "", "file:" + raw} {
		if _, err := r.Info(ctx, p, "raw", false); !errors.Is(err, ErrInvalidArg) {
			t.Errorf("Info(%q): err = %v", p, err)
		}
	}
	if _, err := r.Info(ctx, raw, "", false); !errors.Is(err, ErrInvalidArg) {
		t.Errorf("empty format: err = %v", err)
	}

	bad := Runner{Path: filepath.Join(dir, "no-qemu-img")}
	if _, err := bad.Info(ctx, raw, "raw", false); err == nil || errors.As(err, &qe) {
		t.Errorf("missing binary: err = %v", err)
	}
}

func TestErrorClassification(t *testing.T) {
	cases := []struct {
		e    Error
		want error
	}{
		{Error{Args: []string{"commit"}, ExitCode: 1, Stderr: "qemu-img: error while writing: No space left on device"}, ErrNoSpace},
		{Error{Args: []string{"info"}, ExitCode: 1, Stderr: "qemu-img: Could not open 'a': Failed to get shared \"write\" lock"}, ErrLocked},
		{Error{Args: []string{"check"}, ExitCode: 3, Stderr: "Leaked cluster 4 refcount=1 reference=0"}, ErrCheckFailed},
		{Error{Args: []string{"check"}, ExitCode: 1, Stderr: "qemu-img: Could not open 'a': No such file or directory"}, ErrNotFound},
		{Error{Args: []string{"check"}, ExitCode: 63, Stderr: "qemu-img: This image format does not support checks"}, errdefs.ErrOperationFailed},
	}
	for _, c := range cases {
		if got := c.e.Unwrap(); got != c.want {
			t.Errorf("%q: Unwrap = %v, want %v", c.e.Stderr, got, c.want)
		}
	}
	long := &Error{Args: []string{"check"}, ExitCode: 2, Stderr: "a\nb\nc\nd\ne"}
	if got, want := long.Error(), "qemu-img check: exit status 2: a; b; c; ..."; got != want {
		t.Errorf("Error() = %q, want %q", got, want)
	}
}

func TestLocked(t *testing.T) {
	requireTools(t)
	var r Runner
	img := filepath.Join(t.TempDir(), "l.qcow2")
	create(t, &r, CreateOptions{Path: img, Format: "qcow2", Size: mib})

	// qemu-io holds the write lock while it waits for commands on stdin.
	holder := exec.Command("qemu-io", "-f", "qcow2", img)
	stdin, err := holder.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := holder.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := holder.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		stdin.Close()
		_ = holder.Wait()
	}()
	if _, err := stdin.Write([]byte("read 0 512\n")); err != nil {
		t.Fatal(err)
	}
	sc := bufio.NewScanner(stdout)
	for sc.Scan() && !strings.Contains(sc.Text(), "read 512/512") {
	}

	err = r.SnapshotCreate(context.Background(), img, "qcow2", "s")
	if !errors.Is(err, ErrLocked) || !strings.Contains(err.Error(), "lock") {
		t.Fatalf("err = %v, want ErrLocked", err)
	}
	// info uses -U, so it still works.
	if _, err := r.Info(context.Background(), img, "qcow2", false); err != nil {
		t.Fatalf("info on locked image: %v", err)
	}
}

func TestContextCancel(t *testing.T) {
	requireTools(t)
	dir := t.TempDir()
	var r Runner

	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	err := r.Create(ctx, CreateOptions{Path: filepath.Join(dir, "c.raw"), Format: "raw", Size: mib})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("pre-cancelled: err = %v", err)
	}

	// Opening a FIFO blocks until a writer appears, so qemu-img hangs until killed.
	fifo := filepath.Join(dir, "fifo")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	ctx, cancel = context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err = r.Info(ctx, fifo, "raw", false)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("blocked info: err = %v", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("cancel took %v", d)
	}
}

// TestSameLayer: a layer and its copy match; a copy written to differs;
// the backing files are left out (a copy whose header names another
// backing file still matches its layer).
func TestSameLayer(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	run := func(args ...string) {
		t.Helper()
		if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
			t.Fatalf("%v: %v\n%s", args, err, out)
		}
	}
	base, other := filepath.Join(dir, "base,1.qcow2"), filepath.Join(dir, "other.qcow2")
	run("qemu-img", "create", "-q", "-f", "qcow2", base, "4M")
	run("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 1M", base)
	run("qemu-img", "create", "-q", "-f", "qcow2", other, "4M")
	run("qemu-io", "-f", "qcow2", "-c", "write -P 0x22 0 1M", other)
	top := filepath.Join(dir, "top.qcow2")
	run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
	run("qemu-io", "-f", "qcow2", "-c", "write -P 0x33 1M 1M", top)
	cp := filepath.Join(dir, "copy.qcow2")
	run("cp", top, cp)
	pre := filepath.Join(dir, "pre.qcow2")
	run("cp", top, pre)
	run("qemu-img", "rebase", "-u", "-f", "qcow2", "-b", other, "-F", "qcow2", cp)
	var r Runner
	if err := r.SameLayer(ctx, top, cp, "qcow2"); err != nil {
		t.Fatalf("a layer and its copy on another backing file: %v", err)
	}
	// A sparse copy (zero data clusters become holes in the file) is a
	// copy still.
	run("qemu-io", "-f", "qcow2", "-c", "write -P 0 2M 1M", top)
	sparse := filepath.Join(dir, "sparse.qcow2")
	run("cp", "--sparse=always", top, sparse)
	if err := r.SameLayer(ctx, top, sparse, "qcow2"); err != nil {
		t.Fatalf("a sparse copy: %v", err)
	}
	run("qemu-io", "-f", "qcow2", "-c", "write -P 0x44 2M 512", cp)
	if err := r.SameLayer(ctx, top, cp, "qcow2"); !errors.Is(err, ErrDiffer) {
		t.Fatalf("a copy written to: %v, want ErrDiffer", err)
	}
	// A copy that lost a cluster of zeros would read its backing file
	// there: the data alone (zeros either way) cannot tell.
	if err := r.SameLayer(ctx, top, pre, "qcow2"); !errors.Is(err, ErrDiffer) {
		t.Fatalf("a copy without a cluster the layer holds: %v, want ErrDiffer", err)
	}
	if err := r.SameLayer(ctx, top, filepath.Join(dir, "gone.qcow2"), "qcow2"); err == nil || errors.Is(err, ErrDiffer) {
		t.Fatalf("a missing copy: %v, want qemu-img's error", err)
	}
	if err := r.SameLayer(ctx, top, cp, ""); !errors.Is(err, ErrInvalidArg) {
		t.Fatalf("no format: %v, want ErrInvalidArg", err)
	}
}

package driver_test

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/xlsnap/xlsnap/driver"
	"github.com/xlsnap/xlsnap/storage/metastore"
	"github.com/xlsnap/xlsnap/xenlight"
	"github.com/xlsnap/xlsnap/xenlight/qemu"
	"github.com/xlsnap/xlsnap/xenlight/qemutest"
)

const mib = 1 << 20

// holdEnv is a folder source with one domain, vm, whose disks are
// images in pool; the definitions (and, for a running domain, its QMP
// socket) live in defs.
type holdEnv struct {
	t                 *testing.T
	ctx               context.Context
	pool, defs, state string
	h                 xenlight.Hypervisor
	images            []string
	d                 *driver.Driver
	qemu              *qemutest.Process
}

// newHoldEnv defines vm with disks xvda, xvdb, ... on the images named
// (made by the caller, in pool) and opens a driver on it; with running,
// a real QEMU device model serves them.
func newHoldEnv(t *testing.T, running bool, images ...string) *holdEnv {
	t.Helper()
	e := &holdEnv{t: t, ctx: context.Background(), state: t.TempDir()}
	var err error
	if e.pool, err = filepath.EvalSymlinks(t.TempDir()); err != nil {
		t.Fatal(err)
	}
	e.defs = t.TempDir()
	if running {
		// The socket path must stay short.
		sock := qemutest.SocketPath(t, "vm.qmp")
		e.defs = filepath.Dir(sock)
		e.h = qemu.New(func(domain string) string { return filepath.Join(e.defs, domain+".qmp") })
		t.Cleanup(func() {
			if t.Failed() && e.qemu != nil {
				t.Logf("QEMU: %s", e.qemu.Stderr())
			}
		})
	}
	e.images = images
	return e
}

// start writes the definition, starts QEMU for a running domain, and
// opens the driver.
func (e *holdEnv) start(running bool) {
	e.t.Helper()
	var disks strings.Builder
	var qd []qemutest.Disk
	for i, img := range e.images {
		target := fmt.Sprintf("xvd%c", 'a'+i)
		fmt.Fprintf(&disks, "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='%s'/><target dev='%s'/></disk>\n", e.path(img), target)
		qd = append(qd, qemutest.Disk{NodeName: target, Path: e.path(img), Format: "qcow2"})
	}
	def := fmt.Sprintf(`<domain type='xen'><name>vm</name><uuid>5b1f3c2a-9d4e-4f60-8a19-7e2f3b4c6d71</uuid><memory>262144</memory><os><type>linux</type></os><devices>
%s</devices></domain>`, disks.String())
	if err := os.WriteFile(filepath.Join(e.defs, "vm.xml"), []byte(def), 0o644); err != nil {
		e.t.Fatal(err)
	}
	if running {
		e.qemu = qemutest.Start(e.t, filepath.Join(e.defs, "vm.qmp"), qd)
	}
	e.d = e.open()
}

// open opens a driver on the same definitions and state folder: what
// another process would see.
func (e *holdEnv) open() *driver.Driver {
	e.t.Helper()
	src, err := driver.NewDirSource(e.defs)
	if err != nil {
		e.t.Fatal(err)
	}
	d, err := driver.Open(e.ctx, driver.Config{StateDir: e.state, Source: src, Pools: []string{e.pool}, Hypervisor: e.h})
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { d.Close() })
	return d
}

func (e *holdEnv) path(name string) string { return filepath.Join(e.pool, name) }

func (e *holdEnv) run(name string, args ...string) string {
	e.t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		e.t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// image makes name (qcow2, 16 MiB, on backing when not "") and writes
// pattern over 1 MiB at off.
func (e *holdEnv) image(name, backing string, pattern byte, off int) {
	e.t.Helper()
	args := []string{"create", "-q", "-f", "qcow2"}
	if backing != "" {
		args = append(args, "-F", "qcow2", "-b", e.path(backing))
	}
	e.run("qemu-img", append(args, e.path(name), "16M")...)
	e.run("qemu-io", "-f", "qcow2", "-c", fmt.Sprintf("write -P 0x%02x %d %d", pattern, off, mib), e.path(name))
}

// expect reads pattern over 1 MiB at off through the chain of image.
func (e *holdEnv) expect(image string, pattern byte, off int) {
	e.t.Helper()
	out, err := exec.Command("qemu-io", "-r", "-U", "-f", "qcow2", "-c", fmt.Sprintf("read -P 0x%02x %d %d", pattern, off, mib), image).CombinedOutput()
	if err != nil || strings.Contains(string(out), "Pattern verification failed") || strings.Contains(string(out), "error") {
		e.t.Fatalf("%s at %d: want 0x%02x: %v\n%s", image, off, pattern, err, out)
	}
}

// chain is the disk's recorded chain as DiskList gives it.
func (e *holdEnv) chain(d *driver.Driver, target string) driver.DiskInfo {
	e.t.Helper()
	disks, err := d.DiskList(e.ctx, "vm")
	if err != nil {
		e.t.Fatal(err)
	}
	for _, di := range disks {
		if di.Target == target {
			return di
		}
	}
	e.t.Fatalf("no disk %s in %+v", target, disks)
	return driver.DiskInfo{}
}

func (e *holdEnv) key() string {
	e.t.Helper()
	key, err := e.d.DomainKey(e.ctx, "vm")
	if err != nil {
		e.t.Fatal(err)
	}
	return key
}

// hold is the hold the domain's record carries, nil for none.
func (e *holdEnv) hold() *metastore.Hold {
	e.t.Helper()
	h, _, err := e.d.Storage().HoldOf(e.ctx, e.key())
	if err != nil {
		e.t.Fatal(err)
	}
	return h
}

// snapshotState is everything a refused call must leave as it was: the
// pool's files (name, size, content hash, in order) and the store's
// records of every domain and snapshot, as text.
func (e *holdEnv) snapshotState() string {
	e.t.Helper()
	var b strings.Builder
	var files []string
	filepath.Walk(e.pool, func(p string, fi os.FileInfo, err error) error {
		if err == nil && fi.Mode().IsRegular() {
			files = append(files, p)
		}
		return err
	})
	sort.Strings(files)
	for _, p := range files {
		data, err := os.ReadFile(p)
		if err != nil {
			e.t.Fatal(err)
		}
		sum := sha256.Sum256(data)
		fmt.Fprintf(&b, "%s %d %s\n", p, len(data), hex.EncodeToString(sum[:]))
	}
	err := e.d.Storage().Store().View(e.ctx, func(tx metastore.Tx) error {
		names, err := tx.DomainNames()
		if err != nil {
			return err
		}
		for _, n := range names {
			d, err := tx.Domain(n)
			if err != nil {
				return err
			}
			raw, _ := json.Marshal(d)
			fmt.Fprintf(&b, "%s\n", raw)
			snaps, err := tx.Snapshots(n)
			if err != nil {
				return err
			}
			for _, s := range snaps {
				full, err := tx.Snapshot(n, s.Name)
				if err != nil {
					return err
				}
				raw, _ := json.Marshal(full)
				fmt.Fprintf(&b, "%s\n", raw)
			}
		}
		return nil
	})
	if err != nil {
		e.t.Fatal(err)
	}
	def, err := os.ReadFile(filepath.Join(e.defs, "vm.xml"))
	if err != nil {
		e.t.Fatal(err)
	}
	b.Write(def)
	return b.String()
}

// refused asserts ChainChanging refuses plan on disk with code and a
// message holding want, and changes nothing: files, records, definition.
func (e *holdEnv) refused(disk string, plan driver.ChainEdit, code driver.ErrorNumber, want string) {
	e.t.Helper()
	before := e.snapshotState()
	h, err := e.d.ChainChanging(e.ctx, "vm", disk, plan, time.Minute)
	if err == nil || driver.Code(err) != code || !strings.Contains(err.Error(), want) {
		e.t.Fatalf("ChainChanging %+v: %+v, %v (code %d); want code %d, %q", plan, h, err, driver.Code(err), code, want)
	}
	if after := e.snapshotState(); after != before {
		e.t.Fatalf("refused ChainChanging %+v changed something:\nbefore %s\nafter  %s", plan, before, after)
	}
}

// threeLayers makes base (0x11 at 0) <- mid (0x22 at 1M) <- top (0x33
// at 2M), the toolstack's own chain, for vm's disk xvda (shut off).
func threeLayers(t *testing.T) *holdEnv {
	e := newHoldEnv(t, false, "top.qcow2")
	e.image("base.qcow2", "", 0x11, 0)
	e.image("mid.qcow2", "base.qcow2", 0x22, mib)
	e.image("top.qcow2", "mid.qcow2", 0x33, 2*mib)
	e.start(false)
	return e
}

// TestChainChangingRefusals: every refusal of a shut-off domain's
// planned edit, each with its code, each leaving files, records and the
// definition as they were, and no hold.
func TestChainChangingRefusals(t *testing.T) {
	e := threeLayers(t)
	// xlsnap's own snapshot s1 holds its state in top.qcow2.
	if _, err := e.d.SnapshotCreateXML(e.ctx, "vm", "<domainsnapshot><name>s1</name></domainsnapshot>", driver.CreateDiskOnly); err != nil {
		t.Fatal(err)
	}
	top, mid, base, s1 := e.path("top.qcow2"), e.path("mid.qcow2"), e.path("base.qcow2"), e.path("top.s1")
	if got := e.chain(e.d, "xvda").Chain; !slices.Equal(got, []string{s1, top, mid, base}) {
		t.Fatalf("chain %v", got)
	}
	stray := e.path("stray.qcow2")
	e.run("qemu-img", "create", "-q", "-f", "qcow2", stray, "16M")
	outside := filepath.Join(t.TempDir(), "base.qcow2")

	bad := driver.ErrNumInvalidArg
	e.refused("xvda", driver.ChainEdit{}, bad, "names no image")
	e.refused("xvdz", driver.ChainEdit{Rewrites: []string{base}}, bad, "disk 'xvdz' not found")
	e.refused("xvda", driver.ChainEdit{Rewrites: []string{stray}}, bad, "stray.qcow2 is no image of the chain of disk xvda")
	e.refused("xvda", driver.ChainEdit{Moves: []driver.Move{{From: stray, To: e.path("x.qcow2")}}}, bad, "is no image of the chain")
	e.refused("xvda", driver.ChainEdit{Commits: []string{base}}, bad, "has no backing file")
	e.refused("xvda", driver.ChainEdit{Pulls: []string{s1}}, bad, "no image above it")
	e.refused("xvda", driver.ChainEdit{Commits: []string{mid}, Rewrites: []string{mid}}, bad, "named twice")
	e.refused("xvda", driver.ChainEdit{Commits: []string{mid}, Rewrites: []string{base}}, bad, "writes "+base)
	e.refused("xvda", driver.ChainEdit{Moves: []driver.Move{{From: base, To: mid}}}, bad, "onto "+mid)
	e.refused("xvda", driver.ChainEdit{Moves: []driver.Move{{From: base, To: outside}}}, driver.ErrNumConfigUnsupported, "outside the pools")
	if _, err := e.d.ChainChanging(e.ctx, "vm", "xvda", driver.ChainEdit{Rewrites: []string{base}}, 0); driver.Code(err) != bad {
		t.Fatalf("a hold of 0 s: %v", err)
	}

	state := driver.ErrNumOperationInvalid
	// The active layer: the definition names it.
	e.refused("xvda", driver.ChainEdit{Moves: []driver.Move{{From: s1, To: e.path("new.s1")}}}, state, "which its definition names")
	e.refused("xvda", driver.ChainEdit{Commits: []string{s1}}, state, "blockcommit --active")
	// top.qcow2 is s1's state: a commit of it would lose it.
	e.refused("xvda", driver.ChainEdit{Commits: []string{top}}, state, "snapshot s1 of domain vm")
	e.refused("xvda", driver.ChainEdit{Commits: []string{top}}, state, "snapshot-delete")
	// A linked clone reads base: nothing may write or rewrite it.
	clone := e.path("clone.qcow2")
	e.run("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", base, clone)
	e.refused("xvda", driver.ChainEdit{Commits: []string{mid}}, state, "overlay "+clone)
	e.refused("xvda", driver.ChainEdit{Rewrites: []string{base}}, state, "overlay "+clone)
	// and a clone of mid would lose it to a pull.
	clone2 := e.path("clone2.qcow2")
	e.run("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", mid, clone2)
	e.refused("xvda", driver.ChainEdit{Pulls: []string{mid}}, state, "overlay "+clone2)
	// Internal snapshots in the image a pull rewrites see through to mid.
	os.Remove(clone2)
	e.run("qemu-img", "snapshot", "-c", "inner", top)
	e.refused("xvda", driver.ChainEdit{Pulls: []string{mid}}, state, "internal snapshot")
	if h := e.hold(); h != nil {
		t.Fatalf("a hold after refusals: %+v", h)
	}
}

// TestChainChangingHoldsWriters: a hold taken by one driver makes a
// second (another process's view of the same state folder) wait with
// every write, until the rescan of the disk, while reads go on; a
// writer whose context ends first fails with VIR_ERR_OPERATION_TIMEOUT
// naming the hold; a second announcement is refused at once; the rescan
// with the move releases the hold, the waiting snapshot then runs on
// the moved base, and every layer reads back.
func TestChainChangingHoldsWriters(t *testing.T) {
	e := newHoldEnv(t, false, "top.qcow2", "b.qcow2")
	e.image("base.qcow2", "", 0x11, 0)
	e.image("top.qcow2", "base.qcow2", 0x33, 2*mib)
	e.image("b.qcow2", "", 0x44, 0)
	e.start(false)
	top, base := e.path("top.qcow2"), e.path("base.qcow2")
	if err := os.Mkdir(e.path("moved"), 0o755); err != nil {
		t.Fatal(err)
	}
	newBase := e.path("moved/base.qcow2")
	h, err := e.d.ChainChanging(e.ctx, "vm", "xvda", driver.ChainEdit{Moves: []driver.Move{{From: base, To: newBase}}}, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	host, _ := os.Hostname()
	if h.Domain != "vm" || h.Disk != "xvda" || h.Host != host || len(h.ID) != 16 || time.Until(h.Until) < 50*time.Second ||
		!slices.Equal(h.Chain, []string{top, base}) || len(h.Checked) != 1 || !strings.HasPrefix(h.Checked[0], "move "+base+" to "+newBase+": a backing layer") {
		t.Fatalf("hold %+v", h)
	}
	if rec := e.hold(); rec == nil || rec.ID != h.ID || rec.Disk != "xvda" || !rec.Until.Equal(h.Until) {
		t.Fatalf("recorded hold %+v, want %+v", rec, h)
	}

	other := e.open()
	// Reads go on.
	rctx, cancel := context.WithTimeout(e.ctx, 10*time.Second)
	defer cancel()
	if _, err := other.ListAllSnapshots(rctx, "vm", 0); err != nil {
		t.Fatalf("list during the hold: %v", err)
	}
	if di := e.chain(other, "xvda"); !strings.Contains(di.Pending, "held for an outside edit") || !slices.Equal(di.Chain, []string{top, base}) {
		t.Fatalf("DiskList during the hold: %+v", di)
	}
	if _, err := other.Check(rctx, false); err != nil {
		t.Fatalf("check during the hold: %v", err)
	}
	// A second announcement, of either disk, is refused at once.
	for _, disk := range []string{"xvda", "xvdb"} {
		_, err := other.ChainChanging(rctx, "vm", disk, driver.ChainEdit{Rewrites: []string{base}}, time.Minute)
		var held *driver.HeldError
		if !errors.As(err, &held) || held.Hold.ID != h.ID || held.Err != nil || driver.Code(err) != driver.ErrNumOperationTimeout {
			t.Fatalf("a second ChainChanging of %s: %v", disk, err)
		}
	}
	// A writer that gives up: 68, naming the hold. The rescan of another
	// disk is a writer too.
	for _, write := range []func(ctx context.Context) error{
		func(ctx context.Context) error {
			_, err := other.SnapshotCreateXML(ctx, "vm", "<domainsnapshot><name>early</name></domainsnapshot>", driver.CreateDiskOnly)
			return err
		},
		func(ctx context.Context) error { return other.ChainChanged(ctx, "vm", "xvdb") },
	} {
		before := e.snapshotState()
		wctx, wcancel := context.WithTimeout(e.ctx, 300*time.Millisecond)
		err := write(wctx)
		wcancel()
		var held *driver.HeldError
		if !errors.As(err, &held) || !errors.Is(err, driver.ErrBusy) || !errors.Is(err, context.DeadlineExceeded) ||
			driver.Code(err) != driver.ErrNumOperationTimeout || !strings.Contains(err.Error(), "cannot acquire state change lock (held by chain-changing of disk xvda of domain vm: hold "+h.ID) {
			t.Fatalf("a write during the hold: %v (code %d)", err, driver.Code(err))
		}
		if e.snapshotState() != before {
			t.Fatal("a write that waited out its context changed something")
		}
	}
	// A writer with no deadline of its own waits as long as libvirt waits
	// for a domain's job (HoldWait), then fails with 68; one cancelled
	// is aborted (78), in words that say so.
	defer func(w time.Duration) { driver.HoldWait = w }(driver.HoldWait)
	driver.HoldWait = 200 * time.Millisecond
	_, err = other.SnapshotCreateXML(e.ctx, "vm", "<domainsnapshot><name>early</name></domainsnapshot>", driver.CreateDiskOnly)
	if held := (*driver.HeldError)(nil); !errors.As(err, &held) || held.Err != nil || driver.Code(err) != driver.ErrNumOperationTimeout ||
		!strings.HasPrefix(err.Error(), "Timed out during operation: cannot acquire state change lock (held by chain-changing") {
		t.Fatalf("a writer past HoldWait: %v (code %d)", err, driver.Code(err))
	}
	cctx, ccancel := context.WithCancel(e.ctx)
	time.AfterFunc(50*time.Millisecond, ccancel)
	_, err = other.SnapshotCreateXML(cctx, "vm", "<domainsnapshot><name>early</name></domainsnapshot>", driver.CreateDiskOnly)
	if driver.Code(err) != driver.ErrNumOperationAborted || !strings.HasPrefix(err.Error(), "operation aborted while waiting") {
		t.Fatalf("a cancelled writer: %v (code %d)", err, driver.Code(err))
	}
	driver.HoldWait = time.Minute
	// One that waits runs once the hold ends.
	done := make(chan error, 1)
	go func() {
		_, err := other.SnapshotCreateXML(e.ctx, "vm", "<domainsnapshot><name>s1</name></domainsnapshot>", driver.CreateDiskOnly)
		done <- err
	}()
	select {
	case err := <-done:
		t.Fatalf("a snapshot ran during the hold: %v", err)
	case <-time.After(300 * time.Millisecond):
	}
	// The toolstack's edit (a copy, the overlay repointed), then the
	// second phase.
	e.run("cp", base, newBase)
	e.run("qemu-img", "rebase", "-q", "-u", "-f", "qcow2", "-F", "qcow2", "-b", newBase, top)
	// check --repair in the middle of the edit reports the hold and
	// mends nothing: the chain on disk is half of an announced edit.
	before := e.snapshotState()
	problems, err := other.Check(e.ctx, true)
	if err != nil {
		t.Fatal(err)
	}
	held := false
	for _, p := range problems {
		held = held || p.Kind == driver.ProblemHeld && p.Disk == "xvda" && strings.Contains(p.Detail, h.ID)
		if p.Fixed {
			t.Fatalf("check --repair during the hold mended %+v", p)
		}
	}
	if !held || e.snapshotState() != before || e.hold() == nil {
		t.Fatalf("check --repair during the hold: %+v (records changed: %v)", problems, e.snapshotState() != before)
	}
	if di := e.chain(other, "xvda"); !slices.Equal(di.Chain, []string{top, base}) {
		t.Fatalf("the records after check --repair during the hold: %+v", di)
	}
	if err := e.d.ChainChanged(e.ctx, "vm", "xvda", driver.Move{From: base, To: newBase}); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("the snapshot that waited: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the snapshot still waits after the rescan")
	}
	if rec := e.hold(); rec != nil {
		t.Fatalf("hold after the rescan: %+v", rec)
	}
	if err := os.Remove(base); err != nil {
		t.Fatal(err)
	}
	s1 := e.path("top.s1")
	if got := e.chain(e.d, "xvda").Chain; !slices.Equal(got, []string{s1, top, newBase}) {
		t.Fatalf("chain after the move and the snapshot: %v", got)
	}
	e.expect(s1, 0x11, 0)
	e.expect(s1, 0x33, 2*mib)
	e.expect(top, 0x11, 0) // s1's state, through the moved base
	problems, err = e.d.Check(e.ctx, false)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		if !p.Kind.Informational() {
			t.Fatalf("check after the move: %+v", problems)
		}
	}
}

// TestChainChangingExpired: a hold past its expiry stops no writer, and
// the next writer clears it; a new announcement replaces it too.
func TestChainChangingExpired(t *testing.T) {
	e := threeLayers(t)
	base := e.path("base.qcow2")
	if _, err := e.d.ChainChanging(e.ctx, "vm", "xvda", driver.ChainEdit{Rewrites: []string{base}}, 50*time.Millisecond); err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond)
	h2, err := e.open().ChainChanging(e.ctx, "vm", "xvda", driver.ChainEdit{Rewrites: []string{base}}, 50*time.Millisecond)
	if err != nil {
		t.Fatalf("an announcement over an expired hold: %v", err)
	}
	time.Sleep(100 * time.Millisecond)
	if rec := e.hold(); rec == nil || rec.ID != h2.ID {
		t.Fatalf("the record holds %+v, want the second hold", rec)
	}
	ctx, cancel := context.WithTimeout(e.ctx, 10*time.Second)
	defer cancel()
	if _, err := e.open().SnapshotCreateXML(ctx, "vm", "<domainsnapshot><name>s1</name></domainsnapshot>", driver.CreateDiskOnly); err != nil {
		t.Fatalf("a snapshot after the hold expired: %v", err)
	}
	if rec := e.hold(); rec != nil {
		t.Fatalf("the expired hold is still recorded: %+v", rec)
	}
}

// TestChainChangingMerges: the merges a shut-off domain may have made
// outside, each announced, made with qemu-img and rescanned: a pull of
// a middle layer into the layer above, then a commit of a middle layer
// into its base. Afterwards the merged image is out of the records
// (check clean, also after a hold that lapsed before the rescan), and
// every byte reads back.
func TestChainChangingMerges(t *testing.T) {
	e := newHoldEnv(t, false, "top.qcow2")
	e.image("base.qcow2", "", 0x11, 0)
	e.image("m1.qcow2", "base.qcow2", 0x22, mib)
	e.image("m2.qcow2", "m1.qcow2", 0x23, 3*mib)
	e.image("top.qcow2", "m2.qcow2", 0x33, 2*mib)
	e.start(false)
	top, m1, m2, base := e.path("top.qcow2"), e.path("m1.qcow2"), e.path("m2.qcow2"), e.path("base.qcow2")
	clean := func(what string) {
		t.Helper()
		problems, err := e.d.Check(e.ctx, false)
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range problems {
			if !p.Kind.Informational() {
				t.Fatalf("check after %s: %+v", what, problems)
			}
		}
		key := e.key()
		rec, err := e.d.Storage().Domain(e.ctx, key)
		if err != nil {
			t.Fatal(err)
		}
		for p := range rec.Images {
			if _, err := os.Stat(p); err != nil {
				t.Fatalf("after %s the records name %s: %v", what, p, err)
			}
		}
		for _, c := range []struct {
			p   byte
			off int
		}{{0x11, 0}, {0x22, mib}, {0x33, 2 * mib}, {0x23, 3 * mib}} {
			e.expect(top, c.p, c.off)
		}
	}

	// Pull m2 into top.
	h, err := e.d.ChainChanging(e.ctx, "vm", "xvda", driver.ChainEdit{Pulls: []string{m2}}, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	if want := "pull " + m2 + " into " + top; len(h.Checked) != 1 || !strings.HasPrefix(h.Checked[0], want) {
		t.Fatalf("checked %q, want %q", h.Checked, want)
	}
	e.run("qemu-img", "rebase", "-q", "-f", "qcow2", "-F", "qcow2", "-b", m1, top)
	if err := os.Remove(m2); err != nil {
		t.Fatal(err)
	}
	if err := e.d.ChainChanged(e.ctx, "vm", "xvda"); err != nil {
		t.Fatal(err)
	}
	if got := e.chain(e.d, "xvda").Chain; !slices.Equal(got, []string{top, m1, base}) {
		t.Fatalf("chain after the pull: %v", got)
	}
	clean("the pull")

	// Commit m1 into base, under a hold that lapses before the rescan:
	// the rescan still ends it, and takes m1 out of the records.
	if _, err := e.d.ChainChanging(e.ctx, "vm", "xvda", driver.ChainEdit{Commits: []string{m1}}, time.Millisecond); err != nil {
		t.Fatal(err)
	}
	time.Sleep(10 * time.Millisecond)
	e.run("qemu-img", "commit", "-q", "-f", "qcow2", m1)
	e.run("qemu-img", "rebase", "-q", "-u", "-f", "qcow2", "-F", "qcow2", "-b", base, top)
	if err := os.Remove(m1); err != nil {
		t.Fatal(err)
	}
	if err := e.d.ChainChanged(e.ctx, "vm", "xvda"); err != nil {
		t.Fatal(err)
	}
	if got := e.chain(e.d, "xvda").Chain; !slices.Equal(got, []string{top, base}) {
		t.Fatalf("chain after the commit: %v", got)
	}
	clean("the commit")
	if rec := e.hold(); rec != nil {
		t.Fatalf("hold after the rescans: %+v", rec)
	}
}

// TestChainChangedReleasesOnFailure: a rescan that fails still ends the
// hold of its disk (the toolstack's edit is over either way); a writer
// then runs at once.
func TestChainChangedReleasesOnFailure(t *testing.T) {
	e := threeLayers(t)
	base := e.path("base.qcow2")
	if _, err := e.d.ChainChanging(e.ctx, "vm", "xvda", driver.ChainEdit{Rewrites: []string{base}}, time.Hour); err != nil {
		t.Fatal(err)
	}
	err := e.d.ChainChanged(e.ctx, "vm", "xvda", driver.Move{From: e.path("nothing.qcow2"), To: e.path("other.qcow2")})
	if driver.Code(err) != driver.ErrNumInvalidArg {
		t.Fatalf("a rescan with a move of nothing: %v", err)
	}
	if rec := e.hold(); rec != nil {
		t.Fatalf("hold after the failed rescan: %+v", rec)
	}
	ctx, cancel := context.WithTimeout(e.ctx, 10*time.Second)
	defer cancel()
	if _, err := e.open().SnapshotCreateXML(ctx, "vm", "<domainsnapshot><name>s1</name></domainsnapshot>", driver.CreateDiskOnly); err != nil {
		t.Fatal(err)
	}
}

// TestChainChangingRunning: a running domain (a real QEMU device model)
// whose disk reads s2 <- s1 <- base, made by live snapshots. The device
// model writes s2 and the guest reads every layer: a move of s2 and any
// merge or header rewrite are refused, with xlsnap's own commands named,
// nothing changed (files, records, the device model's chain). A copy of
// the base is allowed: held, a live snapshot waits; the rescan with the
// move switches the device model to the copy, the old base goes, the
// guest's data reads back.
func TestChainChangingRunning(t *testing.T) {
	e := newHoldEnv(t, true, "vm-xvda.qcow2")
	e.run("qemu-img", "create", "-q", "-f", "qcow2", e.path("vm-xvda.qcow2"), "16M")
	e.start(true)
	m, err := e.h.DeviceModel(e.ctx, "vm")
	if err != nil {
		t.Fatal(err)
	}
	chains := func() []xenlight.DiskChain {
		t.Helper()
		c, err := xenlight.Chains(e.ctx, m)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	write := func(pattern byte, off int) {
		t.Helper()
		c := chains()
		if len(c) != 1 {
			t.Fatalf("device model chains %+v", c)
		}
		if err := qemutest.GuestWrite(e.ctx, m, c[0].Node, pattern, off, mib); err != nil {
			t.Fatal(err)
		}
	}
	// One monitor client at a time: the driver connects on its own.
	write(0x11, 0)
	m.Disconnect()
	for _, s := range []string{"s1", "s2"} {
		if _, err := e.d.SnapshotCreateXML(e.ctx, "vm", "<domainsnapshot><name>"+s+"</name></domainsnapshot>", driver.CreateDiskOnly); err != nil {
			t.Fatal(err)
		}
	}
	s2, s1, base := e.path("vm-xvda.s2"), e.path("vm-xvda.s1"), e.path("vm-xvda.qcow2")
	if got := e.chain(e.d, "xvda").Chain; !slices.Equal(got, []string{s2, s1, base}) {
		t.Fatalf("chain %v", got)
	}
	state := driver.ErrNumOperationInvalid
	e.refused("xvda", driver.ChainEdit{Moves: []driver.Move{{From: s2, To: e.path("new.s2")}}}, state, "the running domain vm writes on disk xvda")
	e.refused("xvda", driver.ChainEdit{Commits: []string{s1}}, state, "blockcommit or blockpull")
	e.refused("xvda", driver.ChainEdit{Pulls: []string{s1}}, state, "snapshot-delete")
	e.refused("xvda", driver.ChainEdit{Rewrites: []string{base}}, state, "only it may rewrite the header")
	e.refused("xvda", driver.ChainEdit{Rewrites: []string{e.path("vm-xvda.none")}}, driver.ErrNumInvalidArg, "is no image of the chain")

	if err := os.Mkdir(e.path("moved"), 0o755); err != nil {
		t.Fatal(err)
	}
	newBase := e.path("moved/vm-xvda.qcow2")
	h, err := e.d.ChainChanging(e.ctx, "vm", "xvda", driver.ChainEdit{Moves: []driver.Move{{From: base, To: newBase}}}, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	if len(h.Checked) != 1 || !strings.Contains(h.Checked[0], "switches the device model to it") {
		t.Fatalf("checked %q", h.Checked)
	}
	wctx, cancel := context.WithTimeout(e.ctx, 300*time.Millisecond)
	_, err = e.open().SnapshotCreateXML(wctx, "vm", "<domainsnapshot><name>s3</name></domainsnapshot>", driver.CreateDiskOnly)
	cancel()
	if driver.Code(err) != driver.ErrNumOperationTimeout || !errors.Is(err, driver.ErrBusy) {
		t.Fatalf("a live snapshot during the hold: %v", err)
	}
	e.run("cp", base, newBase)
	if err := e.d.ChainChanged(e.ctx, "vm", "xvda", driver.Move{From: base, To: newBase}); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(base); err != nil {
		t.Fatal(err)
	}
	if m, err = e.h.DeviceModel(e.ctx, "vm"); err != nil {
		t.Fatal(err)
	}
	defer m.Disconnect()
	want := []string{s2, s1, newBase}
	if c := chains(); len(c) != 1 || !slices.Equal(c[0].Files, want) {
		t.Fatalf("the device model reads %+v, want %v", c, want)
	}
	write(0x12, mib)
	e.expect(s2, 0x11, 0)
	e.expect(s2, 0x12, mib)
	if rec := e.hold(); rec != nil {
		t.Fatalf("hold after the rescan: %+v", rec)
	}
}

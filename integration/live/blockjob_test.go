package live

import (
	"encoding/json"
	"errors"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sync/atomic"
	"testing"

	"github.com/xlsnap/xlsnap/driver"
	"github.com/xlsnap/xlsnap/storage"
	"github.com/xlsnap/xlsnap/storage/storagetest"
	"github.com/xlsnap/xlsnap/xenlight"
	"github.com/xlsnap/xlsnap/xenlight/qemu"
	"github.com/xlsnap/xlsnap/xenlight/qemutest"
)

// layer takes a disk-only snapshot of both disks that records nothing
// (NO_METADATA): one new layer each, through the device model, as
// libvirt's users grow a chain before a blockcommit.
func (e *env) layer(name string) {
	e.t.Helper()
	if _, err := e.d.SnapshotCreateXML(e.ctx, "vm", "<domainsnapshot><name>"+name+"</name></domainsnapshot>",
		driver.CreateDiskOnly|driver.CreateNoMetadata); err != nil {
		e.t.Fatalf("%v\n%s", err, e.qemu.Stderr())
	}
}

// liveChain asserts xvda's chain: the records', the device model's (both
// by file name) and qemu-img's reading of the active image's headers.
func (e *env) liveChain(want ...string) {
	e.t.Helper()
	names := func(paths []string) []string {
		var out []string
		for _, p := range paths {
			out = append(out, filepath.Base(p))
		}
		return out
	}
	rec := e.disk("xvda").Chain
	if got := names(rec); !slices.Equal(got, want) {
		e.t.Fatalf("recorded chain %v, want %v", got, want)
	}
	e.expectChains()
	out, err := exec.Command("qemu-img", "info", "-U", "--backing-chain", "--output=json", "-f", "qcow2", rec[0]).Output()
	if err != nil {
		e.t.Fatal(err)
	}
	var infos []struct{ Filename string }
	if err := json.Unmarshal(out, &infos); err != nil {
		e.t.Fatal(err)
	}
	var onDisk []string
	for _, i := range infos {
		onDisk = append(onDisk, i.Filename)
	}
	if got := names(onDisk); !slices.Equal(got, want) {
		e.t.Fatalf("the headers on disk chain %v, want %v", got, want)
	}
}

// seedLive writes 0x11 at 0 into vm-xvda.qcow2, takes layer a, writes
// 0x22 at 1 MiB, takes layer b, writes 0x33 at 2 MiB: all through the
// device model, which the guest's view of xvda must keep.
func (e *env) seedLive(names ...string) {
	e.t.Helper()
	e.write("xvda", 0x11, 0)
	e.write("xvdb", 0x51, 0)
	for i, n := range names {
		e.layer(n)
		e.write("xvda", byte(0x22+0x11*i), (i+1)*mib)
	}
}

func (e *env) expectSeed(layers int) {
	e.t.Helper()
	e.expect("xvda", 0x11, 0)
	for i := 0; i < layers; i++ {
		e.expect("xvda", byte(0x22+0x11*i), (i+1)*mib)
	}
	e.expect("xvdb", 0x51, 0)
}

// defined is the image vm.xml names for xvda.
func (e *env) defined() string {
	e.t.Helper()
	return e.disk("xvda").Source
}

// TestLiveBlockCommitPivot: the active layer and the one below it are
// committed into the base by the device model (an active commit through
// an image between); after the pivot QEMU writes the base, the
// definition names it and the layers above are gone.
func TestLiveBlockCommitPivot(t *testing.T) {
	e := newEnv(t)
	e.seedLive("a", "b")
	e.liveChain("vm-xvda.b", "vm-xvda.a", "vm-xvda.qcow2")
	r, err := e.d.BlockCommit(e.ctx, "vm", "xvda", "", "", 0, driver.BlockCommitActive)
	if err != nil {
		t.Fatalf("%v\n%s", err, e.qemu.Stderr())
	}
	if r.Active != e.path("vm-xvda.qcow2") || !slices.Equal(r.Removed, []string{e.path("vm-xvda.b"), e.path("vm-xvda.a")}) {
		t.Fatalf("report %+v", r)
	}
	e.liveChain("vm-xvda.qcow2")
	if e.defined() != e.path("vm-xvda.qcow2") {
		t.Fatalf("vm.xml names %s", e.defined())
	}
	e.expectSeed(2)
	// The guest writes the base now.
	e.write("xvda", 0x44, 3*mib)
	storagetest.ExpectImage(t, e.path("vm-xvda.qcow2"), "qcow2", 0x44, 3*mib, mib)
	for _, gone := range []string{"vm-xvda.a", "vm-xvda.b"} {
		if _, err := os.Stat(e.path(gone)); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("%s after the commit: %v", gone, err)
		}
	}
	if problems, err := e.d.Storage().Check(e.ctx); err != nil || faults(problems) {
		t.Fatalf("check: %+v %v", problems, err)
	}
}

// TestLiveBlockCommitMiddle: a commit below the active layer, past an
// image between; QEMU rewrites the active layer's backing reference.
func TestLiveBlockCommitMiddle(t *testing.T) {
	e := newEnv(t)
	e.seedLive("a", "b", "c")
	r, err := e.d.BlockCommit(e.ctx, "vm", "xvda", e.path("vm-xvda.qcow2"), e.path("vm-xvda.b"), 0, 0)
	if err != nil {
		t.Fatalf("%v\n%s", err, e.qemu.Stderr())
	}
	if r.Active != e.path("vm-xvda.c") || !slices.Equal(r.Removed, []string{e.path("vm-xvda.b"), e.path("vm-xvda.a")}) {
		t.Fatalf("report %+v", r)
	}
	e.liveChain("vm-xvda.c", "vm-xvda.qcow2")
	e.expectSeed(3)
	storagetest.ExpectImage(t, e.path("vm-xvda.qcow2"), "qcow2", 0x33, 2*mib, mib)
	storagetest.Run(t, "qemu-img", "check", "-q", "-U", "-f", "qcow2", e.path("vm-xvda.qcow2"))
}

// TestLiveBlockPull: a partial pull, then a whole one, by block-stream
// jobs; the layers pulled away that nothing needs are removed, the
// user's base kept.
func TestLiveBlockPull(t *testing.T) {
	e := newEnv(t)
	e.seedLive("a", "b", "c")
	r, err := e.d.BlockRebase(e.ctx, "vm", "xvda", e.path("vm-xvda.a"), 0, 0)
	if err != nil {
		t.Fatalf("%v\n%s", err, e.qemu.Stderr())
	}
	if !slices.Equal(r.Removed, []string{e.path("vm-xvda.b")}) {
		t.Fatalf("report %+v", r)
	}
	e.liveChain("vm-xvda.c", "vm-xvda.a", "vm-xvda.qcow2")
	e.expectSeed(3)
	if r, err = e.d.BlockPull(e.ctx, "vm", "xvda", 0, 0); err != nil {
		t.Fatalf("%v\n%s", err, e.qemu.Stderr())
	}
	if !slices.Equal(r.Removed, []string{e.path("vm-xvda.a")}) || !slices.Equal(r.Kept, []string{e.path("vm-xvda.qcow2")}) {
		t.Fatalf("report %+v", r)
	}
	e.liveChain("vm-xvda.c")
	e.expectSeed(3)
	storagetest.Run(t, "qemu-img", "check", "-q", "-U", "-f", "qcow2", e.path("vm-xvda.c"))
	if problems, err := e.d.Storage().Check(e.ctx); err != nil || faults(problems) {
		t.Fatalf("check: %+v %v", problems, err)
	}
}

// TestLiveBlockCommitRefused: a commit into a snapshot's state image is
// refused before the device model is asked anything that changes it:
// the device model's chains, the files and the records are as before,
// and the snapshot still reads its data.
func TestLiveBlockCommitRefused(t *testing.T) {
	e := newEnv(t)
	e.write("xvda", 0x61, 0)
	if _, err := e.d.SnapshotCreateXML(e.ctx, "vm", "<domainsnapshot><name>s1</name></domainsnapshot>", driver.CreateDiskOnly); err != nil {
		t.Fatal(err)
	}
	e.write("xvda", 0x62, 0)
	before, chains := e.files(), e.chains()
	_, err := e.d.BlockCommit(e.ctx, "vm", "xvda", "", "", 0, driver.BlockCommitActive)
	var ce *storage.ConflictError
	if !errors.As(err, &ce) || driver.Code(err) != driver.ErrNumOperationInvalid || ce.Conflicts[0].Image != e.path("vm-xvda.qcow2") {
		t.Fatalf("commit into s1's state: %v", err)
	}
	if after := e.files(); !slices.Equal(after, before) {
		t.Fatalf("files %v -> %v", before, after)
	}
	if now := e.chains(); !slices.EqualFunc(now, chains, func(a, b xenlight.DiskChain) bool { return a.Node == b.Node && slices.Equal(a.Files, b.Files) }) {
		t.Fatalf("device model chains %+v -> %+v", chains, now)
	}
	storagetest.ExpectImage(t, e.path("vm-xvda.qcow2"), "qcow2", 0x61, 0, mib)
	e.expect("xvda", 0x62, 0)
}

// TestLiveCrashBlockJobs kills xlsnap (SIGKILL) at every point of a live
// active commit with its pivot and of a live pull; the next call on the
// running domain recovers from what the device model shows. Each time
// the chains recorded, defined and held by the device model are the
// same, the job is done or not begun, the data reads back and check
// finds nothing.
func TestLiveCrashBlockJobs(t *testing.T) {
	for _, tc := range []struct {
		op            string
		points        []string
		before, after []string
		kept          string // the user's image a whole pull leaves outside the chain
	}{
		{"blockcommit", []string{"begin", "intent-written", "step0-live-commit", "steps-done", "committed", "definition", "defined", "cleanup0", "cleanup1"},
			[]string{"vm-xvda.b", "vm-xvda.a", "vm-xvda.qcow2"}, []string{"vm-xvda.qcow2"}, ""},
		{"blockpull", []string{"begin", "intent-written", "step0-live-stream", "steps-done", "committed", "cleanup0"},
			[]string{"vm-xvda.b", "vm-xvda.a", "vm-xvda.qcow2"}, []string{"vm-xvda.b"}, "vm-xvda.qcow2"},
	} {
		for _, point := range tc.points {
			t.Run(tc.op+"/"+point, func(t *testing.T) {
				e := newEnv(t)
				state := t.TempDir()
				e.openState(state)
				e.seedLive("a", "b")
				e.d.Close()
				e.crashAt(state, tc.op, tc.op+"/"+point)
				e.openState(state)
				var got []string
				for _, p := range e.disk("xvda").Chain {
					got = append(got, filepath.Base(p))
				}
				if !slices.Equal(got, tc.after) && !slices.Equal(got, tc.before) {
					t.Fatalf("after recovery: chain %v, want %v or %v", got, tc.before, tc.after)
				}
				e.liveChain(got...)
				if got[0] != filepath.Base(e.defined()) {
					t.Fatalf("vm.xml names %s, the chain is %v", e.defined(), got)
				}
				e.expectSeed(2)
				if problems, err := e.d.Storage().Check(e.ctx); err != nil || faults(problems) {
					t.Fatalf("check after recovery: %+v %v", problems, err)
				}
				for _, f := range e.files() {
					p := e.path(f)
					if ext := filepath.Ext(f); ext != ".xml" && ext != ".qmp" && f != tc.kept && !slices.Contains(e.disk("xvda").Chain, p) && !slices.Contains(e.disk("xvdb").Chain, p) {
						t.Fatalf("%s left outside every chain", f)
					}
				}
			})
		}
	}
}

// countingProxy passes a device model's QMP socket through and counts
// the connections made to it.
type countingProxy struct {
	sock  string
	conns atomic.Int32
}

func newCountingProxy(t *testing.T, upstream string) *countingProxy {
	t.Helper()
	p := &countingProxy{sock: qemutest.SocketPath(t, "proxy.qmp")}
	l, err := net.Listen("unix", p.sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			p.conns.Add(1)
			up, err := net.Dial("unix", upstream)
			if err != nil {
				c.Close()
				continue
			}
			go func() { io.Copy(up, c); up.Close() }()
			go func() { io.Copy(c, up); c.Close() }()
		}
	}()
	return p
}

// TestLiveMergeConnections: a live delete and a live blockcommit each
// open two QMP connections: the domain's state, then one held for the
// planning queries and the block job (xenlight.Live.Hold), where each
// call used to open its own.
func TestLiveMergeConnections(t *testing.T) {
	e := newEnv(t)
	proxy := newCountingProxy(t, e.path("vm.qmp"))
	e.h = qemu.New(func(string) string { return proxy.sock })
	e.openState(t.TempDir())
	d := e.d
	e.write("xvda", 0x11, 0)
	if _, err := d.SnapshotCreateXML(e.ctx, "vm", "<domainsnapshot><name>s1</name></domainsnapshot>", driver.CreateDiskOnly); err != nil {
		t.Fatal(err)
	}
	e.write("xvda", 0x12, mib)
	if _, err := d.SnapshotCreateXML(e.ctx, "vm", "<domainsnapshot><name>x</name></domainsnapshot>", driver.CreateDiskOnly|driver.CreateNoMetadata); err != nil {
		t.Fatal(err)
	}
	for _, op := range []struct {
		name string
		do   func() error
	}{
		{"blockcommit", func() error {
			_, err := d.BlockCommit(e.ctx, "vm", "xvda", "", "", 0, driver.BlockCommitActive|driver.BlockCommitShallow)
			return err
		}},
		{"delete", func() error { _, err := d.SnapshotDelete(e.ctx, "vm", "s1", 0); return err }},
	} {
		proxy.conns.Store(0)
		if err := op.do(); err != nil {
			t.Fatalf("%s: %v\n%s", op.name, err, e.qemu.Stderr())
		}
		if n := proxy.conns.Load(); n != 2 {
			t.Errorf("%s opened %d QMP connections, want 2 (the state, then one held)", op.name, n)
		}
	}
	if got := e.disk("xvda").Chain; len(got) != 1 {
		t.Fatalf("xvda after the commit and the delete: %v", got)
	}
	e.expect("xvda", 0x11, 0)
	e.expect("xvda", 0x12, mib)
}

// faults reports a finding that is a fault: the seed's NO_METADATA
// layers are what no snapshot needs, which check lists as coalescible.
func faults(problems []storage.Problem) bool {
	return slices.ContainsFunc(problems, func(p storage.Problem) bool { return !p.Kind.Informational() })
}

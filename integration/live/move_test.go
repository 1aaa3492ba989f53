package live

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/xlsnap/xlsnap/driver"
	"github.com/xlsnap/xlsnap/errdefs"
	"github.com/xlsnap/xlsnap/storage/storagetest"
	"github.com/xlsnap/xlsnap/xenlight"
)

// TestMoveBackingFilesLive is the storage admin's case of the rescan
// hook: a running domain's backing images (the base and a middle layer)
// are copied to other storage, the hook is told of each move, and from
// then on the device model reads the new files (query-block), the old
// ones can be removed at once, the guest writes on, and after it stops
// the headers name the new files and every snapshot and the current
// state read back their data.
func TestMoveBackingFilesLive(t *testing.T) {
	e := newEnv(t)
	e.write("xvda", 0x11, 0)
	if _, err := e.d.SnapshotCreateXML(e.ctx, "vm", "<domainsnapshot><name>s1</name></domainsnapshot>", driver.CreateDiskOnly); err != nil {
		t.Fatal(err)
	}
	e.write("xvda", 0x12, mib)
	if _, err := e.d.SnapshotCreateXML(e.ctx, "vm", "<domainsnapshot><name>s2</name></domainsnapshot>", driver.CreateDiskOnly); err != nil {
		t.Fatal(err)
	}
	e.write("xvda", 0x13, 2*mib)
	top, mid, base := e.path("vm-xvda.s2"), e.path("vm-xvda.s1"), e.path("vm-xvda.qcow2")
	if got := e.disk("xvda").Chain; !slices.Equal(got, []string{top, mid, base}) {
		t.Fatalf("xvda chain %v", got)
	}
	if err := os.Mkdir(e.path("moved"), 0o755); err != nil {
		t.Fatal(err)
	}
	newMid, newBase := e.path("moved/vm-xvda.s1"), e.path("moved/vm-xvda.qcow2")
	storagetest.CopyFile(t, base, newBase)
	storagetest.CopyFile(t, mid, newMid)

	if err := e.d.ChainChanged(e.ctx, "vm", "xvda", driver.Move{From: base, To: newBase}, driver.Move{From: mid, To: newMid}); err != nil {
		t.Fatalf("rescan with the moves: %v\n%s", err, e.qemu.Stderr())
	}
	want := []string{top, newMid, newBase}
	if got := e.disk("xvda").Chain; !slices.Equal(got, want) {
		t.Fatalf("recorded chain after the moves %v, want %v", got, want)
	}
	e.expectChains() // query-block: both disks read exactly their recorded chains
	// A second rescan finds nothing to do.
	if err := e.d.ChainChanged(e.ctx, "vm", "xvda"); err != nil {
		t.Fatalf("rescan after the switch: %v", err)
	}
	for _, p := range []string{base, mid} {
		if err := os.Remove(p); err != nil {
			t.Fatal(err)
		}
	}
	e.write("xvda", 0x14, 3*mib)
	e.expect("xvda", 0x11, 0)
	e.expect("xvda", 0x12, mib)
	e.expect("xvda", 0x13, 2*mib)
	e.expect("xvda", 0x14, 3*mib)

	if err := e.h.Destroy(e.ctx, "vm"); err != nil {
		t.Fatal(err)
	}
	// The headers name the new files: qemu-img follows them alone.
	out := storagetest.Run(t, "qemu-img", "info", "--backing-chain", "-f", "qcow2", top)
	var chain []string
	for _, line := range strings.Split(out, "\n") {
		if p, ok := strings.CutPrefix(line, "image: "); ok {
			chain = append(chain, p)
		}
	}
	if !slices.Equal(chain, want) {
		t.Fatalf("qemu-img info --backing-chain %s: %v, want %v\n%s", top, chain, want, out)
	}
	for _, p := range want {
		storagetest.Run(t, "qemu-img", "check", "-q", "-f", "qcow2", p)
	}
	storagetest.ExpectImage(t, top, "qcow2", 0x14, 3*mib, mib)

	// Every snapshot reads its data through the new files.
	revert := func(name string) {
		t.Helper()
		if err := e.d.RevertToSnapshot(e.ctx, "vm", name, 0); err != nil {
			t.Fatalf("revert to %s: %v", name, err)
		}
	}
	revert("s1")
	e.expect("xvda", 0x11, 0)
	e.expect("xvda", 0x00, mib)
	if got := e.disk("xvda").Chain; len(got) != 2 || got[1] != newBase {
		t.Fatalf("after the revert to s1 xvda reads %v, want a new layer on %s", got, newBase)
	}
	revert("s2")
	e.expect("xvda", 0x11, 0)
	e.expect("xvda", 0x12, mib)
	e.expect("xvda", 0x00, 2*mib)
	if got := e.disk("xvda").Chain; len(got) != 3 || got[1] != newMid || got[2] != newBase {
		t.Fatalf("after the revert to s2 xvda reads %v, want a new layer on %s, %s", got, newMid, newBase)
	}
	problems, err := e.d.Storage().Check(e.ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		if !p.Kind.Informational() {
			t.Fatalf("check after the moves: %+v", problems)
		}
	}
}

// TestMoveBaseLiveAndRefusals: only the base moves, so the layer above
// it, which stays, must come to name the copy (its header rewritten by
// the device model, which holds it); a copy that differs from its layer
// and a move of the layer the guest writes are refused, and nothing
// changes: the device model, the records and the files are as before.
func TestMoveBaseLiveAndRefusals(t *testing.T) {
	e := newEnv(t)
	e.write("xvda", 0x21, 0)
	if _, err := e.d.SnapshotCreateXML(e.ctx, "vm", "<domainsnapshot><name>s1</name></domainsnapshot>", driver.CreateDiskOnly); err != nil {
		t.Fatal(err)
	}
	e.write("xvda", 0x22, mib)
	if _, err := e.d.SnapshotCreateXML(e.ctx, "vm", "<domainsnapshot><name>s2</name></domainsnapshot>", driver.CreateDiskOnly); err != nil {
		t.Fatal(err)
	}
	top, mid, base := e.path("vm-xvda.s2"), e.path("vm-xvda.s1"), e.path("vm-xvda.qcow2")
	before := e.disk("xvda").Chain
	if err := os.Mkdir(e.path("other"), 0o755); err != nil {
		t.Fatal(err)
	}
	newBase := e.path("other/vm-xvda.qcow2")
	storagetest.CopyFile(t, base, newBase)
	unchanged := func(what string) {
		t.Helper()
		if got := e.disk("xvda").Chain; !slices.Equal(got, before) {
			t.Fatalf("%s: recorded chain %v, want %v", what, got, before)
		}
		e.expectChains()
	}

	// A "copy" that is not one.
	bad := e.path("other/bad.qcow2")
	storagetest.CopyFile(t, base, bad)
	storagetest.Run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0x66 2M 4k", bad)
	err := e.d.ChainChanged(e.ctx, "vm", "xvda", driver.Move{From: base, To: bad})
	if !errors.Is(err, errdefs.ErrInvalidArg) || driver.Code(err) != errdefs.CodeInvalidArg {
		t.Fatalf("a copy that differs: %v, want ErrInvalidArg", err)
	}
	unchanged("after the refused copy")
	// A copy outside every pool: refused before the device model or a
	// header is touched.
	outside := filepath.Join(t.TempDir(), "vm-xvda.qcow2")
	storagetest.CopyFile(t, base, outside)
	err = e.d.ChainChanged(e.ctx, "vm", "xvda", driver.Move{From: base, To: outside})
	if !errors.Is(err, errdefs.ErrUnsafeBacking) {
		t.Fatalf("a copy outside the pools: %v, want ErrUnsafeBacking", err)
	}
	unchanged("after the refused copy outside the pools")
	if h := storagetest.Run(t, "qemu-img", "info", "-U", "-f", "qcow2", mid); !strings.Contains(h, "backing file: "+base+"\n") {
		t.Fatalf("%s after the refused copy:\n%s", mid, h)
	}
	// The layer the guest writes cannot move.
	err = e.d.ChainChanged(e.ctx, "vm", "xvda", driver.Move{From: top, To: e.path("other/top.qcow2")})
	if !errors.Is(err, errdefs.ErrOperationInvalid) {
		t.Fatalf("a move of the active layer: %v, want ErrOperationInvalid", err)
	}
	unchanged("after the refused move of the active layer")

	if err := e.d.ChainChanged(e.ctx, "vm", "xvda", driver.Move{From: base, To: newBase}); err != nil {
		t.Fatalf("rescan with the base moved: %v\n%s", err, e.qemu.Stderr())
	}
	want := []string{top, mid, newBase}
	if got := e.disk("xvda").Chain; !slices.Equal(got, want) {
		t.Fatalf("recorded chain %v, want %v", got, want)
	}
	e.expectChains()
	if err := os.Remove(base); err != nil {
		t.Fatal(err)
	}
	e.write("xvda", 0x23, 2*mib)
	if err := e.h.Destroy(e.ctx, "vm"); err != nil {
		t.Fatal(err)
	}
	// s1's overlay stayed where it was; its header names the copy now.
	h := storagetest.Run(t, "qemu-img", "info", "-f", "qcow2", mid)
	if !strings.Contains(h, "backing file: "+newBase+"\n") {
		t.Fatalf("%s after the move:\n%s", mid, h)
	}
	storagetest.ExpectImage(t, top, "qcow2", 0x21, 0, mib)
	storagetest.ExpectImage(t, top, "qcow2", 0x22, mib, mib)
	storagetest.ExpectImage(t, top, "qcow2", 0x23, 2*mib, mib)
	if err := e.d.RevertToSnapshot(e.ctx, "vm", "s1", 0); err != nil {
		t.Fatal(err)
	}
	e.expect("xvda", 0x21, 0)
	e.expect("xvda", 0x00, mib)
}

// TestVerifyLive: the check every live operation ends with passes on the
// recorded chains and names the disk that differs otherwise.
func TestVerifyLive(t *testing.T) {
	e := newEnv(t)
	live := xenlight.NewLive(e.h, "vm")
	want := map[string][]string{"xvda": e.disk("xvda").Chain, "xvdb": e.disk("xvdb").Chain}
	if err := live.Verify(e.ctx, want); err != nil {
		t.Fatalf("the recorded chains: %v", err)
	}
	want["xvdb"] = []string{e.path("vm-xvdb.qcow2"), e.path("elsewhere.qcow2")}
	var me *xenlight.MismatchError
	if err := live.Verify(e.ctx, want); !errors.As(err, &me) || me.Disk != "xvdb" || !slices.Equal(me.DeviceModel, []string{e.path("vm-xvdb.qcow2")}) {
		t.Fatalf("a chain the device model does not read: %v, want a MismatchError on xvdb", err)
	}
}

// TestMoveLayersFromTwoProcesses: the base, then the layer above it, of
// a running domain moved by two xlsnap processes, one after the other:
// each names the nodes it adds to the one device model, which outlives
// both (a name a second process made again was "Duplicate nodes with
// node-name"). Both moves are followed, and the data reads back.
func TestMoveLayersFromTwoProcesses(t *testing.T) {
	e := newEnv(t)
	state := t.TempDir()
	e.openState(state)
	e.write("xvda", 0x31, 0)
	for _, s := range []string{"s1", "s2"} {
		if _, err := e.d.SnapshotCreateXML(e.ctx, "vm", "<domainsnapshot><name>"+s+"</name></domainsnapshot>", driver.CreateDiskOnly); err != nil {
			t.Fatal(err)
		}
	}
	e.write("xvda", 0x32, mib)
	e.d.Close()
	top, mid, base := e.path("vm-xvda.s2"), e.path("vm-xvda.s1"), e.path("vm-xvda.qcow2")
	if err := os.Mkdir(e.path("other"), 0o755); err != nil {
		t.Fatal(err)
	}
	newBase, newMid := e.path("other/vm-xvda.qcow2"), e.path("other/vm-xvda.s1")
	storagetest.CopyFile(t, base, newBase)
	e.inProcess(state, "rescan", "XLSNAP_LIVE_MOVE="+base+"="+newBase)
	storagetest.CopyFile(t, mid, newMid)
	e.inProcess(state, "rescan", "XLSNAP_LIVE_MOVE="+mid+"="+newMid)
	e.openState(state)
	if got, want := e.disk("xvda").Chain, []string{top, newMid, newBase}; !slices.Equal(got, want) {
		t.Fatalf("recorded chain %v, want %v", got, want)
	}
	e.expectChains()
	for _, f := range []string{base, mid} {
		if err := os.Remove(f); err != nil {
			t.Fatal(err)
		}
	}
	// The device model holds no removed file open: the old nodes are
	// closed, so their space and storage are free at once.
	fds, err := filepath.Glob(fmt.Sprintf("/proc/%d/fd/*", e.qemu.Cmd.Process.Pid))
	if err != nil || len(fds) == 0 {
		t.Fatalf("the device model's open files: %v", err)
	}
	for _, fd := range fds {
		if target, _ := os.Readlink(fd); strings.HasSuffix(target, " (deleted)") {
			t.Fatalf("the device model still holds %s open", target)
		}
	}
	e.write("xvda", 0x33, 2*mib)
	if err := e.h.Destroy(e.ctx, "vm"); err != nil {
		t.Fatal(err)
	}
	storagetest.ExpectImage(t, top, "qcow2", 0x31, 0, mib)
	storagetest.ExpectImage(t, top, "qcow2", 0x32, mib, mib)
	storagetest.ExpectImage(t, top, "qcow2", 0x33, 2*mib, mib)
	storagetest.ExpectImage(t, newMid, "qcow2", 0x31, 0, mib)
	storagetest.ExpectImage(t, newMid, "qcow2", 0x00, mib, mib)
}

// TestMoveRunningBaseWithMv: a running domain's base moved with mv, not
// copied: the overlay above still names the old file, which only the
// device model may rewrite. The announcement says to copy; the rescan
// fails closed, saying why and what to do; once the file is put back and
// copied, the same rescan follows it.
func TestMoveRunningBaseWithMv(t *testing.T) {
	e := newEnv(t)
	e.write("xvda", 0x41, 0)
	if _, err := e.d.SnapshotCreateXML(e.ctx, "vm", "<domainsnapshot><name>s1</name></domainsnapshot>", driver.CreateDiskOnly); err != nil {
		t.Fatal(err)
	}
	top, base := e.path("vm-xvda.s1"), e.path("vm-xvda.qcow2")
	if err := os.Mkdir(e.path("other"), 0o755); err != nil {
		t.Fatal(err)
	}
	newBase := e.path("other/vm-xvda.qcow2")
	h, err := e.d.ChainChanging(e.ctx, "vm", "xvda", driver.ChainEdit{Moves: []driver.Move{{From: base, To: newBase}}}, time.Minute)
	if err != nil || len(h.Checked) != 1 || !strings.Contains(h.Checked[0], "copy it (cp, not mv") {
		t.Fatalf("announcing the move: %+v %v", h, err)
	}
	if err := os.Rename(base, newBase); err != nil {
		t.Fatal(err)
	}
	err = e.d.ChainChanged(e.ctx, "vm", "xvda", driver.Move{From: base, To: newBase})
	if !errors.Is(err, driver.ErrChainBroken) || !strings.Contains(err.Error(), "copied, not moved") {
		t.Fatalf("rescan after mv: %v", err)
	}
	if err := os.Rename(newBase, base); err != nil {
		t.Fatal(err)
	}
	storagetest.CopyFile(t, base, newBase)
	if err := e.d.ChainChanged(e.ctx, "vm", "xvda", driver.Move{From: base, To: newBase}); err != nil {
		t.Fatalf("rescan after the copy: %v", err)
	}
	if got := e.disk("xvda").Chain; !slices.Equal(got, []string{top, newBase}) {
		t.Fatalf("recorded chain %v", got)
	}
	e.expectChains()
	e.expect("xvda", 0x41, 0)
}

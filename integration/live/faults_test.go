package live

import (
	"context"
	"os"
	"slices"
	"testing"
	"time"

	"github.com/xlsnap/xlsnap/driver"
	"github.com/xlsnap/xlsnap/errdefs"
	"github.com/xlsnap/xlsnap/xenlight/qemutest"
)

// proxied puts a qemutest.Proxy between the driver and e's device model:
// QEMU's socket moves aside (it stays bound to its inode, so QEMU keeps
// answering there) and the proxy takes its name.
func proxied(e *env) *qemutest.Proxy {
	e.t.Helper()
	real := e.path("vm.real.qmp")
	if err := os.Rename(e.path("vm.qmp"), real); err != nil {
		e.t.Fatal(err)
	}
	return qemutest.StartProxy(e.t, e.path("vm.qmp"), real)
}

// settled is the first call after a fault: it must succeed, having
// finished or undone what the fault interrupted (the journal), with the
// device model reading exactly the recorded chains.
func (e *env) settled() []string {
	e.t.Helper()
	names := e.firstCallAfter("the fault")
	e.expectChains()
	return names
}

// firstCallAfter reads the domain (which finishes or undoes what the
// journal holds) and returns its snapshots' names; any error fails.
func (e *env) firstCallAfter(what string) []string {
	e.t.Helper()
	if _, err := e.d.DiskList(e.ctx, "vm"); err != nil {
		e.t.Fatalf("the call after %s: %v", what, err)
	}
	list, err := e.d.ListAllSnapshots(e.ctx, "vm", 0)
	if err != nil {
		e.t.Fatal(err)
	}
	var names []string
	for _, s := range list {
		names = append(names, s.Name)
	}
	return names
}

func TestFaultQMPClosedMidTransaction(t *testing.T) {
	e := newEnv(t)
	p := proxied(e)
	e.write("xvda", 0x31, 0)
	e.write("xvdb", 0x41, 0)
	p.CutAfter(`"transaction"`, nil)
	_, err := e.d.SnapshotCreateXML(e.ctx, "vm", "<domainsnapshot><name>f1</name></domainsnapshot>", driver.CreateDiskOnly)
	if err == nil || p.Cuts() != 1 {
		t.Fatalf("a connection cut mid-transaction: %v (cuts %d), want an error", err, p.Cuts())
	}
	t.Logf("the cut call: %v (code %d)", err, driver.Code(err))
	if driver.Code(err) == errdefs.CodeInternal {
		t.Fatalf("untyped error: %v", err)
	}
	names := e.settled()
	t.Logf("after recovery: snapshots %v, xvda %v", names, e.disk("xvda").Chain)
	// QEMU ran the transaction: recovery finishes the snapshot.
	if !slices.Equal(names, []string{"f1"}) || len(e.disk("xvda").Chain) != 2 {
		t.Fatalf("after recovery: snapshots %v, xvda chain %v; want f1 and a new layer", names, e.disk("xvda").Chain)
	}
	e.write("xvda", 0x32, mib)
	e.expect("xvda", 0x31, 0)
	e.expect("xvda", 0x32, mib)
	e.expect("xvdb", 0x41, 0)
}

func TestFaultQMPClosedMidCommit(t *testing.T) {
	e := newEnv(t)
	e.write("xvda", 0x51, 0)
	if _, err := e.d.SnapshotCreateXML(e.ctx, "vm", "<domainsnapshot><name>c1</name></domainsnapshot>", driver.CreateDiskOnly); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 16; i++ {
		e.write("xvda", byte(0x60+i), (1+i)*mib)
	}
	p := proxied(e)
	p.CutAfter(`"block-commit"`, nil)
	_, err := e.d.SnapshotDelete(e.ctx, "vm", "c1", 0)
	if err == nil || p.Cuts() != 1 {
		t.Fatalf("a connection cut mid-commit: %v (cuts %d), want an error", err, p.Cuts())
	}
	t.Logf("the cut call: %v (code %d)", err, driver.Code(err))
	names := e.settled()
	t.Logf("after recovery: snapshots %v, xvda %v", names, e.disk("xvda").Chain)
	if len(names) != 0 || len(e.disk("xvda").Chain) != 1 {
		t.Fatalf("after recovery: snapshots %v, xvda chain %v; want c1 deleted, one layer", names, e.disk("xvda").Chain)
	}
	e.expect("xvda", 0x51, 0)
	for i := 0; i < 16; i++ {
		e.expect("xvda", byte(0x60+i), (1+i)*mib)
	}
}

// TestFaultDeviceModelStopsAnswering: a device model that stops (SIGSTOP)
// cannot hang a call that has a deadline: it ends with the context's
// error (68), and once the device model answers again the next call
// finds everything consistent.
func TestFaultDeviceModelStopsAnswering(t *testing.T) {
	e := newEnv(t)
	e.write("xvda", 0x71, 0)
	if err := e.qemu.Cmd.Process.Signal(sigStop); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(e.ctx, 2*time.Second)
	defer cancel()
	t0 := time.Now()
	_, err := e.d.SnapshotCreateXML(ctx, "vm", "<domainsnapshot><name>h1</name></domainsnapshot>", driver.CreateDiskOnly)
	if err == nil || driver.Code(err) != errdefs.CodeOperationTimeout {
		t.Fatalf("a snapshot with a stopped device model: %v (code %d), want the deadline's error (68)", err, driver.Code(err))
	}
	if d := time.Since(t0); d > 10*time.Second {
		t.Fatalf("the call took %v past its 2 s deadline", d)
	}
	if err := e.qemu.Cmd.Process.Signal(sigCont); err != nil {
		t.Fatal(err)
	}
	names := e.settled()
	t.Logf("after the device model answers again: snapshots %v", names)
	if len(names) != 0 || len(e.disk("xvda").Chain) != 1 {
		t.Fatalf("snapshots %v, xvda chain %v: want nothing changed", names, e.disk("xvda").Chain)
	}
	e.expect("xvda", 0x71, 0)
}

package live

// The pivot of an active commit (a snapshot delete's, blockcommit
// --active --pivot's) on a real QEMU whose guest runs (cont), around
// faults: the device model SIGKILLed at each point of the pivot, the QMP
// connection cut in it, xlsnap SIGKILLed in it. The guest writes through
// its own device before, during (after READY) and after the pivot; every
// write reads back once the next call recovered, the chain is exact and
// qemu-img check clean, and a guest the pivot paused runs again.

import (
	"testing"

	"github.com/xlsnap/xlsnap/driver"
)

// guestStatus is QEMU's run state of vm's guest.
func (e *env) guestStatus() string {
	e.t.Helper()
	m, err := e.h.DeviceModel(e.ctx, "vm")
	if err != nil {
		e.t.Fatal(err)
	}
	defer m.Disconnect()
	var st struct {
		Status string `json:"status"`
	}
	if err := m.Execute(e.ctx, "query-status", nil, &st); err != nil {
		e.t.Fatal(err)
	}
	return st.Status
}

// run starts the guest (qemutest starts QEMU with -S: prelaunch).
func (e *env) run() {
	e.t.Helper()
	if err := e.h.Resume(e.ctx, "vm"); err != nil {
		e.t.Fatal(err)
	}
	if st := e.guestStatus(); st != "running" {
		e.t.Fatalf("the guest is %s after cont", st)
	}
}

// seedPivot writes xvda's base (0x81 at 0) and xvdb's (0x41 at 0), takes
// the disk-only snapshot k1, and writes the overlays: xvda 0x91 at 0 and
// 0x92 at 1 MiB, xvdb 0x42 at 1 MiB. Deleting k1 commits both overlays
// down: two active commits, each with its pivot.
func (e *env) seedPivot() {
	e.t.Helper()
	e.write("xvda", 0x81, 0)
	e.write("xvdb", 0x41, 0)
	if _, err := e.d.SnapshotCreateXML(e.ctx, "vm", "<domainsnapshot><name>k1</name></domainsnapshot>", driver.CreateDiskOnly); err != nil {
		e.t.Fatal(err)
	}
	e.write("xvda", 0x91, 0)
	e.write("xvda", 0x92, mib)
	e.write("xvdb", 0x42, mib)
}

// The guest's writes during the job (at READY, before the driver hears
// it: into the overlay and, mirrored, the base) and after the pivot
// (into the base alone).
var (
	duringJob = []string{guestWrite("dev0", 0xa1, 2*mib), guestWrite("dev0", 0xa2, 0), guestFlush("dev0")}
	postPivot = []string{guestWrite("dev0", 0xb1, 0), guestWrite("dev0", 0xb2, 3*mib), guestFlush("dev0")}
)

// TestFaultDeviceModelKilledAtPivot: a snapshot delete's device model is
// SIGKILLed at the pivot of its first active commit: once QEMU carried
// out job-complete and pivoted, and the guest wrote the base (the answer
// never reaching the driver); once QEMU carried out the pivot's cont and
// the guest wrote; and before job-complete reached QEMU, the mark made
// (the guest running, and never started: then only the pivot's own flush
// of the base makes the writes mirrored since READY durable). The next
// call finishes the delete offline: the marked commit is not redone (the
// guest's 0xb1 at 0, written after the pivot, would be lost under the
// stale overlay's 0xa2), the other disk's unmarked one is.
func TestFaultDeviceModelKilledAtPivot(t *testing.T) {
	for _, tc := range []struct {
		name    string
		running bool
		match   []string
		point   killPoint
		await   string
		guest   []string
		xvda    []byte // at 0, 1, 2, 3 MiB
	}{
		{"complete-unanswered", true, []string{`"job-complete"`}, killUnanswered, "BLOCK_JOB_COMPLETED", postPivot,
			[]byte{0xb1, 0x92, 0xa1, 0xb2}},
		{"cont-unanswered", true, []string{`"execute":"cont"`}, killUnanswered, "", postPivot,
			[]byte{0xb1, 0x92, 0xa1, 0xb2}},
		{"complete-before", true, []string{`"job-complete"`}, killBefore, "", nil,
			[]byte{0xa2, 0x92, 0xa1, 0}},
		{"complete-before-prelaunch", false, []string{`"job-complete"`}, killBefore, "", nil,
			[]byte{0xa2, 0x92, 0xa1, 0}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t)
			e.seedPivot()
			if tc.running {
				e.run()
			}
			k := (&killer{match: tc.match, point: tc.point, await: tc.await, guest: tc.guest,
				earlyAt: "BLOCK_JOB_READY", early: duringJob}).start(e)
			_, err := e.d.SnapshotDelete(e.ctx, "vm", "k1", 0)
			expectKilledCall(t, err)
			k.wait()
			if names := e.afterKill(); len(names) != 0 {
				t.Fatalf("after recovery: snapshots %v, want k1 deleted", names)
			}
			e.offChain("xvda", "vm-xvda.qcow2")
			e.offChain("xvdb", "vm-xvdb.qcow2")
			e.gone("vm-xvda.k1", "vm-xvdb.k1")
			if e.defined() != e.path("vm-xvda.qcow2") {
				t.Fatalf("vm.xml names %s", e.defined())
			}
			for i, p := range tc.xvda {
				e.expect("xvda", p, i*mib)
			}
			e.expect("xvdb", 0x41, 0)
			e.expect("xvdb", 0x42, mib)
		})
	}
}

// TestFaultQMPClosedMidPivot: the QMP connection is cut as the pivot's
// stop, and as its job-complete, reach QEMU (which carries them out):
// the device model lives on, so the pivot is settled on a new connection
// (the job adopted, or found pivoted) within the same call, which
// succeeds, and the guest the pivot paused runs again.
func TestFaultQMPClosedMidPivot(t *testing.T) {
	for _, cut := range []string{`"execute":"stop"`, `"job-complete"`} {
		t.Run(cut, func(t *testing.T) {
			e := newEnv(t)
			e.seedPivot()
			e.run()
			p := proxied(e)
			p.CutAfter(cut, nil)
			if _, err := e.d.SnapshotDelete(e.ctx, "vm", "k1", 0); err != nil {
				t.Fatalf("a delete whose pivot lost its connection: %v", err)
			}
			if p.Cuts() != 1 {
				t.Fatalf("%d cuts", p.Cuts())
			}
			if names := e.settled(); len(names) != 0 {
				t.Fatalf("snapshots %v, want k1 deleted", names)
			}
			if st := e.guestStatus(); st != "running" {
				t.Fatalf("the guest is %s after the pivot, want running", st)
			}
			e.liveChain("vm-xvda.qcow2")
			e.expect("xvda", 0x91, 0)
			e.expect("xvda", 0x92, mib)
			e.expect("xvdb", 0x41, 0)
			e.expect("xvdb", 0x42, mib)
		})
	}
}

// TestLiveCrashMidPivot: xlsnap is SIGKILLed in the pivot of a
// blockcommit --active --pivot, once the mark is made (the guest paused,
// the job ready, job-complete never sent) and once QEMU pivoted (the
// guest still paused). The next call recovers through the device model:
// it adopts the job with the mark (or finds the pivot done) and resumes
// the guest the dead process paused.
func TestLiveCrashMidPivot(t *testing.T) {
	// pivot-paused: the guest paused, no mark yet (the record says
	// pausing, so recovery resumes it and the commit is made anew).
	for _, point := range []string{"pivot-paused", "pivot-marked", "pivot-done"} {
		t.Run(point, func(t *testing.T) {
			e := newEnv(t)
			state := t.TempDir()
			e.openState(state)
			e.seedLive("a", "b")
			e.run()
			e.d.Close()
			e.crashAt(state, "blockcommit", "blockcommit/step0-live-commit/"+point)
			if st := e.guestStatus(); st != "paused" {
				t.Fatalf("the guest is %s once xlsnap died in the pivot, want paused", st)
			}
			e.openState(state)
			e.liveChain("vm-xvda.qcow2")
			if st := e.guestStatus(); st != "running" {
				t.Fatalf("the guest is %s after recovery, want running", st)
			}
			if e.defined() != e.path("vm-xvda.qcow2") {
				t.Fatalf("vm.xml names %s", e.defined())
			}
			e.expectSeed(2)
			if problems, err := e.d.Storage().Check(e.ctx); err != nil || faults(problems) {
				t.Fatalf("check after recovery: %+v %v", problems, err)
			}
			e.gone("vm-xvda.a", "vm-xvda.b")
		})
	}
}

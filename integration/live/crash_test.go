package live

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"

	"github.com/xlsnap/xlsnap/driver"
	"github.com/xlsnap/xlsnap/xenlight/qemu"
)

// TestMain lets a test run one driver operation in a process of its own
// (re-executing the test binary), so a crash point can kill it with
// SIGKILL half-way through a live operation.
func TestMain(m *testing.M) {
	if os.Getenv("XLSNAP_LIVE_HELPER") == "1" {
		os.Exit(liveHelper())
	}
	os.Exit(m.Run())
}

// liveHelper opens the driver on the folder and state given and runs the
// operation named by XLSNAP_LIVE_OP on domain vm.
func liveHelper() int {
	ctx := context.Background()
	dir, state := os.Getenv("XLSNAP_LIVE_DIR"), os.Getenv("XLSNAP_LIVE_STATE")
	src, err := driver.NewDirSource(dir)
	if err != nil {
		return 2
	}
	h := qemu.New(func(domain string) string { return filepath.Join(dir, domain+".qmp") })
	d, err := driver.Open(ctx, driver.Config{StateDir: state, Source: src, Hypervisor: h})
	if err != nil {
		return 3
	}
	defer d.Close()
	switch os.Getenv("XLSNAP_LIVE_OP") {
	case "snapshot":
		_, err = d.SnapshotCreateXML(ctx, "vm", "<domainsnapshot><name>s1</name></domainsnapshot>", driver.CreateDiskOnly)
	case "delete":
		_, err = d.SnapshotDelete(ctx, "vm", "s1", 0)
	case "blockcommit":
		_, err = d.BlockCommit(ctx, "vm", "xvda", "", "", 0, driver.BlockCommitActive)
	case "blockpull":
		_, err = d.BlockPull(ctx, "vm", "xvda", 0, 0)
	case "rescan":
		from, to, _ := strings.Cut(os.Getenv("XLSNAP_LIVE_MOVE"), "=")
		err = d.ChainChanged(ctx, "vm", "xvda", driver.Move{From: from, To: to})
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 4
	}
	return 0
}

// inProcess runs an operation in a helper process of its own, as a
// separate xlsnap command would, and fails the test if it fails.
func (e *env) inProcess(state, op string, env ...string) {
	e.t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(append(os.Environ(), "XLSNAP_LIVE_HELPER=1", "XLSNAP_LIVE_DIR="+e.dir, "XLSNAP_LIVE_STATE="+state,
		"XLSNAP_LIVE_OP="+op), env...)
	if out, err := cmd.CombinedOutput(); err != nil {
		e.t.Fatalf("helper %s: %v\n%s", op, err, out)
	}
}

// crashAt runs an operation in a helper process that kills itself at the
// crash point, and asserts it died that way.
func (e *env) crashAt(state, op, point string) {
	e.t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "XLSNAP_LIVE_HELPER=1", "XLSNAP_LIVE_DIR="+e.dir, "XLSNAP_LIVE_STATE="+state,
		"XLSNAP_LIVE_OP="+op, "XLSNAP_CRASH_AT="+point)
	err := cmd.Run()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
		e.t.Fatalf("helper %s at %s: %v, want death by SIGKILL", op, point, err)
	}
}

// openState opens a driver on a given state folder, as the next xlsnap
// process would after a crash.
func (e *env) openState(state string) {
	e.t.Helper()
	e.d.Close()
	src, err := driver.NewDirSource(e.dir)
	if err != nil {
		e.t.Fatal(err)
	}
	if e.d, err = driver.Open(e.ctx, driver.Config{StateDir: state, Source: src, Hypervisor: e.h}); err != nil {
		e.t.Fatal(err)
	}
}

// TestLiveCrashRecovery kills xlsnap around the QMP transaction of a live
// snapshot and the block job of a live merge. Recovery reads the outcome
// from the device model: a transaction that never ran is undone (no
// overlay left), one that ran is finished (metadata catches up with what
// the device model writes), and a merge past its point of no return is
// finished. Every time, the recorded chains are exactly the device
// model's and the guest's data reads back.
func TestLiveCrashRecovery(t *testing.T) {
	cases := []struct {
		op, point string
		snapshot  bool // whether s1 exists after recovery
		layers    int  // xvda's chain length after recovery
	}{
		{"snapshot", "snapshot/intent-written", false, 1},
		{"snapshot", "snapshot/steps-done", true, 2},
		// vm-xvda.qcow2 is the user's: a live merge commits down into it,
		// which cannot be undone, so even a kill before the job started
		// is finished.
		{"delete", "delete/intent-written", false, 1},
		{"delete", "delete/steps-done", false, 1},
	}
	for _, tc := range cases {
		t.Run(tc.point, func(t *testing.T) {
			e := newEnv(t)
			state := t.TempDir()
			e.openState(state)
			e.write("xvda", 0x71, 0)
			if tc.op == "delete" {
				if _, err := e.d.SnapshotCreateXML(e.ctx, "vm", "<domainsnapshot><name>s1</name></domainsnapshot>", driver.CreateDiskOnly); err != nil {
					t.Fatal(err)
				}
				e.write("xvda", 0x72, mib)
			}
			e.d.Close()
			e.crashAt(state, tc.op, tc.point)
			e.openState(state)
			// The first call on the active domain recovers it.
			chainA := e.disk("xvda").Chain
			list, err := e.d.ListAllSnapshots(e.ctx, "vm", 0)
			if err != nil {
				t.Fatal(err)
			}
			if got := len(list) == 1; got != tc.snapshot || len(chainA) != tc.layers {
				t.Fatalf("after recovery: snapshots %v, xvda chain %v; want snapshot=%v, %d layers", list, chainA, tc.snapshot, tc.layers)
			}
			e.expectChains()
			e.expect("xvda", 0x71, 0)
			if tc.op == "delete" {
				e.expect("xvda", 0x72, mib)
			}
			problems, err := e.d.Storage().Check(e.ctx)
			if err != nil || len(problems) != 0 {
				t.Fatalf("check after recovery: %+v %v", problems, err)
			}
			entries, err := os.ReadDir(e.dir)
			if err != nil {
				t.Fatal(err)
			}
			for _, en := range entries {
				p := filepath.Join(e.dir, en.Name())
				if filepath.Ext(p) == ".xml" || filepath.Ext(p) == ".qmp" {
					continue
				}
				if !slices.Contains(e.disk("xvda").Chain, p) && !slices.Contains(e.disk("xvdb").Chain, p) {
					t.Fatalf("file %s left outside every chain", en.Name())
				}
			}
		})
	}
}

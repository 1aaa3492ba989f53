package integration

import (
	"context"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/xlsnap/xlsnap/driver"
	"github.com/xlsnap/xlsnap/storage"
)

// TestChainChanged: an outside `qemu-img rebase` drops a layer from a
// disk's chain; Check reports the difference, ChainChanged rescans it,
// publishes the change, and every snapshot still reverts to its data.
func TestChainChanged(t *testing.T) {
	both(t, nil, func(t *testing.T, e *env) {
		e.write(0)
		e.snap("s1", driver.CreateDiskOnly)
		e.write(1)
		e.snap("s2", driver.CreateDiskOnly)
		e.write(2)
		e.expectChain("vda", "vda.s2", "vda.s1", "vda.qcow2")
		subCtx, stop := context.WithCancel(e.ctx)
		defer stop()
		events, err := e.d.Subscribe(subCtx)
		if err != nil {
			t.Fatal(err)
		}

		// vda.s2 takes vda.s1's data and is rebased onto vda.qcow2.
		run(t, "qemu-img", "rebase", "-f", "qcow2", "-b", e.path("vda.qcow2"), "-F", "qcow2", e.path("vda.s2"))
		e.expectData()
		problems, err := e.d.Storage().Check(e.ctx)
		if err != nil {
			t.Fatal(err)
		}
		if len(problems) != 1 || problems[0].Kind != storage.ProblemChainDiffers || problems[0].Disk != "vda" || problems[0].Domain != e.dom {
			t.Fatalf("Check after the rebase: %+v, want one chain-differs on vda", problems)
		}

		if err := e.d.ChainChanged(e.ctx, e.dom, "vda"); err != nil {
			t.Fatalf("ChainChanged: %v", err)
		}
		ev := waitEvent(t, events, "rescan")
		wantBefore := []string{e.path("vda.s2"), e.path("vda.s1"), e.path("vda.qcow2")}
		wantAfter := []string{e.path("vda.s2"), e.path("vda.qcow2")}
		if ev.Domain != e.dom || ev.Disk != "vda" || !slices.Equal(ev.After, wantAfter) {
			t.Fatalf("event %+v, want vda → %v", ev, wantAfter)
		}
		t.Run("event-before", func(t *testing.T) {
			if !slices.Equal(ev.Before, wantBefore) {
				t.Fatalf("ChainChanged's event has Before %v, want %v: the driver's sync (DefineDomain) recorded the new chain silently before the rescan", ev.Before, wantBefore)
			}
		})
		e.expectChain("vda", "vda.s2", "vda.qcow2")
		e.expectChain("vdb", "vdb.s2", "vdb.s1", "vdb.qcow2")
		e.verify()
		if problems, _ := e.d.Storage().Check(e.ctx); len(problems) > 0 {
			t.Fatalf("Check after ChainChanged: %+v", problems)
		}
		// A rescan of an unchanged disk changes nothing.
		if err := e.d.ChainChanged(e.ctx, e.dom, "vdb"); err != nil {
			t.Fatal(err)
		}
		e.expectChain("vdb", "vdb.s2", "vdb.s1", "vdb.qcow2")

		e.revert("s2", 0)
		e.expectChain("vda", "vda.s2-1", "vda.s1", "vda.qcow2")
		e.write(3)
		e.revert("s1", 0)
		e.expectChain("vda", "vda.s1-1", "vda.qcow2")
		e.write(3)
		e.del("s1", 0)
		e.del("s2", 0)
		e.finish()
	})
}

// waitEvent waits for the next chain event with the given reason.
func waitEvent(t *testing.T, events <-chan driver.ChainEvent, reason driver.ChainReason) driver.ChainEvent {
	t.Helper()
	timeout := time.After(10 * time.Second)
	for {
		select {
		case ev, ok := <-events:
			if !ok {
				t.Fatal("the event channel closed")
			}
			if ev.Reason == reason {
				return ev
			}
		case <-timeout:
			t.Fatalf("no %q event", reason)
		}
	}
}

// TestOperatorRepointsDisk: an operator adds a layer outside xlsnap and
// points the definition at it; the driver adopts it, snapshots on top of
// it, and reverts across it.
func TestOperatorRepointsDisk(t *testing.T) {
	both(t, nil, func(t *testing.T, e *env) {
		e.write(0)
		e.snap("s1", driver.CreateDiskOnly)
		e.write(1)
		run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", e.path("vda.s1"), "-F", "qcow2", e.path("manual.qcow2"))
		e.setDefinition(strings.Replace(e.definitionXML(), e.path("vda.s1"), e.path("manual.qcow2"), 1))
		e.write(2) // into manual.qcow2 (the definition says so)
		if _, err := e.d.DiskList(e.ctx, e.dom); err != nil {
			t.Fatal(err)
		}
		e.expectChain("vda", "manual.qcow2", "vda.s1", "vda.qcow2")
		e.verify()

		e.snap("s2", driver.CreateDiskOnly)
		e.expectChain("vda", "manual.s2", "manual.qcow2", "vda.s1", "vda.qcow2")
		e.write(3)
		e.revert("s1", 0)
		e.expectChain("vda", "vda.s1-1", "vda.qcow2")
		e.revert("s2", 0)
		e.expectChain("vda", "manual.s2", "manual.qcow2", "vda.s1", "vda.qcow2")
		e.write(0)
		e.del("s1", 0)
		e.del("s2", 0)
		e.finish()
	})
}

// setDefinition replaces the definition behind the driver's back, as an
// operator would (virsh define, or editing the file).
func (e *env) setDefinition(doc string) {
	e.t.Helper()
	switch e.kind {
	case dirSource:
		if err := os.WriteFile(e.defDir+"/"+e.dom+".xml", []byte(doc), 0o644); err != nil {
			e.t.Fatal(err)
		}
	default:
		dom, err := e.lv.Conn().DomainDefineXML(doc)
		if err != nil {
			e.t.Fatal(err)
		}
		dom.Free()
	}
}

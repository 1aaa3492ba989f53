package integration

import (
	"fmt"
	"sync"
	"testing"

	"github.com/xlsnap/xlsnap/driver"
)

// TestConcurrentCreates: snapshots of one domain requested at once are
// serialised: every one succeeds, they form one line (each the parent of
// the next), the chain has one overlay per snapshot, and the definition
// read straight from the source names the active layer once they are all
// done.
func TestConcurrentCreates(t *testing.T) {
	const n = 8
	both(t, nil, func(t *testing.T, e *env) {
		e.write(0)
		var wg sync.WaitGroup
		errs := make([]error, n)
		for i := range n {
			wg.Add(1)
			go func() {
				defer wg.Done()
				_, errs[i] = e.d.SnapshotCreateXML(e.ctx, e.dom, snapXML(fmt.Sprintf("c%d", i)), driver.CreateDiskOnly)
			}()
		}
		wg.Wait()
		for i, err := range errs {
			if err != nil {
				t.Fatalf("c%d: %v", i, err)
			}
		}
		list, err := e.d.ListAllSnapshots(e.ctx, e.dom, driver.ListTopological)
		if err != nil {
			t.Fatal(err)
		}
		if len(list) != n {
			t.Fatalf("%d snapshots, want %d", len(list), n)
		}
		for i, s := range list {
			if i == 0 && s.Parent != "" || i > 0 && s.Parent != list[i-1].Name {
				t.Fatalf("snapshot %s has parent %q: not one line %v", s.Name, s.Parent, names(list))
			}
			e.saved[s.Name] = map[string]content{"vda": e.now["vda"], "vdb": e.now["vdb"]}
		}
		e.expectCurrent(list[n-1].Name)
		t.Run("definition", func(t *testing.T) {
			rec, err := e.d.Storage().Domain(e.ctx, e.key())
			if err != nil {
				t.Fatal(err)
			}
			for _, disk := range e.disks {
				if file, _ := e.defDisk(disk); file != rec.Disk(disk).Active {
					t.Fatalf("after concurrent creates the definition has %s on %s, storage on %s: the definition is rewritten outside the domain's lock", disk, file, rec.Disk(disk).Active)
				}
			}
		})
		// The next call repairs a stale definition (sync), so go on.
		for _, disk := range e.disks {
			want := []string{}
			for i := n - 1; i >= 0; i-- {
				want = append(want, disk+"."+list[i].Name)
			}
			if _, err := e.d.DiskList(e.ctx, e.dom); err != nil {
				t.Fatal(err)
			}
			e.expectChain(disk, append(want, disk+".qcow2")...)
		}
		e.write(1)
		e.revert(list[n/2].Name, 0)
		e.del(list[0].Name, driver.DeleteChildren)
		e.finish()
	})
}

// TestConcurrentDomains: operations on different domains of one driver
// (one source, one state folder) run in parallel without disturbing each
// other's chains, data or definitions.
func TestConcurrentDomains(t *testing.T) {
	t.Parallel()
	for _, kind := range sources {
		t.Run(string(kind), func(t *testing.T) {
			t.Parallel()
			envs := newEnvs(t, kind, 4)
			for _, e := range envs {
				e.write(0)
			}
			var wg sync.WaitGroup
			for _, e := range envs {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for i := range 3 {
						if _, err := e.d.SnapshotCreateXML(e.ctx, e.dom, snapXML(fmt.Sprintf("s%d", i)), driver.CreateDiskOnly); err != nil {
							t.Errorf("%s: %v", e.dom, err)
							return
						}
					}
					if err := e.d.RevertToSnapshot(e.ctx, e.dom, "s1", 0); err != nil {
						t.Errorf("%s: %v", e.dom, err)
						return
					}
					if _, err := e.d.SnapshotDelete(e.ctx, e.dom, "s0", driver.DeleteChildren); err != nil {
						t.Errorf("%s: %v", e.dom, err)
					}
				}()
			}
			wg.Wait()
			if t.Failed() {
				return
			}
			for _, e := range envs {
				e.expectList(0)
				e.expectCurrent("")
				for _, disk := range e.disks {
					if c := e.chainOf(disk); len(c) != 1 {
						t.Fatalf("%s: %s's chain %v, want one image", e.dom, disk, c)
					}
					e.expectChain(disk, e.chainOf(disk)...)
				}
				e.finish()
			}
		})
	}
}

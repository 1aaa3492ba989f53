package storage_test

import (
	"errors"
	"strings"
	"testing"

	"github.com/xlsnap/xlsnap/errdefs"
	"github.com/xlsnap/xlsnap/storage"
	"github.com/xlsnap/xlsnap/storage/metastore"
	"github.com/xlsnap/xlsnap/storage/storagetest"
)

// TestDeleteRefusesClaimedImages writes, straight into the store, records
// that conflict as an attacker's redefine once made them: a second
// snapshot claiming an external snapshot's state image, with its overlay
// or without. Deleting either snapshot must refuse to merge (the merge
// would write the overlay's data into the other's state image), change no
// image, and leave the other snapshot's data readable; once one record is
// gone with metadata only, the other deletes normally.
func TestDeleteRefusesClaimedImages(t *testing.T) {
	t.Parallel()
	const mib = 1 << 20
	for _, tc := range []struct {
		name  string
		claim func(e1 metastore.SnapshotDisk) metastore.SnapshotDisk
	}{
		{"state-and-overlay", func(d metastore.SnapshotDisk) metastore.SnapshotDisk { return d }},
		{"state-only", func(d metastore.SnapshotDisk) metastore.SnapshotDisk {
			d.Overlay = ""
			return d
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			e := concEnv(t)
			e.NewDomain("vm", "vda")
			e.Write("vm", "vda", 0x11, 0, mib)
			if _, err := e.M.CreateSnapshot(e.Ctx, "vm", storage.SnapshotSpec{Name: "e1", DomainXML: "<domain/>",
				Disks: []storage.SnapshotDiskSpec{{Target: "vda", Mode: storage.DiskExternal}}}); err != nil {
				t.Fatal(err)
			}
			e.Write("vm", "vda", 0x22, 0, mib)
			e1, err := e.M.Snapshot(e.Ctx, "vm", "e1")
			if err != nil {
				t.Fatal(err)
			}
			state := e1.Disks[0]
			e.M.Close()
			store, err := metastore.OpenBolt(e.Ctx, storage.StoreFile(e.StateDir))
			if err != nil {
				t.Fatal(err)
			}
			err = store.Update(e.Ctx, func(tx metastore.Tx) error {
				return tx.PutSnapshot("vm", &metastore.Snapshot{Name: "copy", State: "disk-snapshot", Created: e1.Created,
					DomainXML: "<domain/>", Disks: []metastore.SnapshotDisk{tc.claim(state)}})
			})
			if cerr := store.Close(); err == nil {
				err = cerr
			}
			if err != nil {
				t.Fatal(err)
			}
			e.Reopen()
			before := e.Chain("vm", "vda")
			for _, name := range []string{"copy", "e1"} {
				_, err := e.M.DeleteSnapshot(e.Ctx, "vm", name, storage.DeleteOptions{})
				if !errors.Is(err, errdefs.ErrOperationFailed) || !strings.Contains(err.Error(), "snapshot ") {
					t.Fatalf("delete %s with a conflicting record: %v, want a refusal naming the other snapshot", name, err)
				}
				storagetest.ExpectImage(t, state.Image, state.Format, 0x11, 0, mib)
				e.Expect("vm", "vda", 0x22, 0, mib)
				if got := e.Chain("vm", "vda"); strings.Join(got, " ") != strings.Join(before, " ") {
					t.Fatalf("refused delete of %s changed the chain: %v -> %v", name, before, got)
				}
			}
			if _, err := e.M.DeleteSnapshot(e.Ctx, "vm", "copy", storage.DeleteOptions{MetadataOnly: true}); err != nil {
				t.Fatal(err)
			}
			if _, err := e.M.DeleteSnapshot(e.Ctx, "vm", "e1", storage.DeleteOptions{}); err != nil {
				t.Fatalf("delete e1 once the conflict is gone: %v", err)
			}
			e.Expect("vm", "vda", 0x22, 0, mib)
		})
	}
}

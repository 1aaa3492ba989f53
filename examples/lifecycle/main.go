// Command lifecycle is what a toolstack author copies: open xlsnap's
// driver on a folder of libvirt domain XML files, then snapshot, list,
// revert and delete a shut-off domain's disks. Each run ends with every
// disk on one layer again, however often it runs: the delete merges the
// snapshot's images, and the layer the internal snapshot kept goes with
// it. A run cut short leaves its snapshots; the next run deletes them
// first.
//
//	go run ./examples/lifecycle -domains /path/to/xml/folder -state /tmp/xlsnap-state DOMAIN
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log"
	"os"

	"github.com/xlsnap/xlsnap/driver"
)

func main() {
	domains := flag.String("domains", ".", "folder of NAME.xml domain definitions")
	state := flag.String("state", os.TempDir()+"/xlsnap-example", "xlsnap's state folder")
	flag.Parse()
	if flag.NArg() != 1 {
		log.Fatal("usage: lifecycle [-domains DIR] [-state DIR] DOMAIN")
	}
	if err := run(context.Background(), *domains, *state, flag.Arg(0)); err != nil {
		// A toolstack returns the libvirt error code unchanged.
		log.Fatalf("%v (libvirt error code %d)", err, driver.Code(err))
	}
}

func run(ctx context.Context, domains, state, domain string) error {
	src, err := driver.NewDirSource(domains)
	if err != nil {
		return err
	}
	d, err := driver.Open(ctx, driver.Config{StateDir: state, Source: src})
	if err != nil {
		return err
	}
	defer d.Close()

	// A run cut short left its snapshot (and its child): delete them
	// first. A toolstack tells "not there" from a failure by the error.
	report, err := d.SnapshotDelete(ctx, domain, "before-upgrade", driver.DeleteChildren)
	switch {
	case err == nil:
		fmt.Printf("deleted %v, left by an earlier run\n", report.Deleted)
	case !errors.Is(err, driver.ErrNoSnapshot):
		return err
	}

	// A disk-only snapshot: an overlay on every disk, disks switched to it.
	snap, err := d.CreateSnapshot(ctx, domain, driver.SnapshotRequest{Name: "before-upgrade"}, driver.CreateDiskOnly)
	if err != nil {
		return err
	}
	fmt.Printf("created %s\n", snap.Name)

	// The same through libvirt's XML: an internal snapshot of the overlays.
	if _, err := d.SnapshotCreateXML(ctx, domain, "<domainsnapshot><name>checkpoint</name></domainsnapshot>", 0); err != nil {
		return err
	}

	list, err := d.ListAllSnapshots(ctx, domain, driver.ListTopological)
	if err != nil {
		return err
	}
	for _, s := range list {
		fmt.Printf("snapshot %s (parent %q)\n", s.Name, s.Parent)
	}

	if err := d.RevertToSnapshot(ctx, domain, "before-upgrade", 0); err != nil {
		return err
	}
	fmt.Println("reverted to before-upgrade")

	// Deleting it with its child merges the overlays away: the internal
	// snapshot goes first, then the external one's images merge.
	report, err = d.SnapshotDelete(ctx, domain, "before-upgrade", driver.DeleteChildren)
	if err != nil {
		return err
	}
	for _, r := range report.Disks {
		fmt.Printf("deleted %s on %s: %s\n", r.Snapshot, r.Disk, r.Action)
	}
	for _, m := range report.Coalesced {
		fmt.Printf("merged the freed layer %s on %s\n", m.Layer, m.Disk)
	}
	disks, err := d.DiskList(ctx, domain)
	if err != nil {
		return err
	}
	for _, disk := range disks {
		fmt.Printf("%s now writes to %s\n", disk.Target, disk.Source)
	}
	return nil
}

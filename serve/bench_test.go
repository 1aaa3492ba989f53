package serve

import (
	"context"
	"fmt"
	"testing"

	libvirt "github.com/digitalocean/go-libvirt"

	"github.com/xlsnap/xlsnap/driver"
)

// BenchmarkSnapshotCall is the cost of libvirt's remote protocol on a
// snapshot call: the driver's call made directly ("native") against the
// same call through xlsnap serve's socket with go-libvirt's client
// ("socket"), so make bench prints socket ÷ native. Two calls: a query
// (dumpxml, where the protocol is most of the work) and a create with its
// delete (a disk-only snapshot on a folder: qemu-img and the metadata
// store's transactions dominate).
func BenchmarkSnapshotCall(b *testing.B) {
	rw, _, d := testServerDriver(b)
	l := goClient(b, rw)
	ctx := context.Background()
	dom, err := l.DomainLookupByName("web")
	if err != nil {
		b.Fatal(err)
	}
	// Each delete merges the new overlay into the chain, which keeps its
	// length, but the overlay's file stays behind as the active image: a
	// new name for every create.
	n := 0
	next := func() (name, doc string) {
		n++
		name = fmt.Sprintf("s%d", n)
		return name, "<domainsnapshot><name>" + name + "</name></domainsnapshot>"
	}
	if _, err := d.SnapshotCreateXML(ctx, "web", "<domainsnapshot><name>base</name></domainsnapshot>", driver.CreateDiskOnly); err != nil {
		b.Fatal(err)
	}
	b.Run("dumpxml/native", func(b *testing.B) {
		for b.Loop() {
			if _, err := d.SnapshotGetXMLDesc(ctx, "web", "base", 0); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("dumpxml/socket", func(b *testing.B) {
		snap := libvirt.DomainSnapshot{Name: "base", Dom: dom}
		for b.Loop() {
			if _, err := l.DomainSnapshotGetXMLDesc(snap, 0); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("create-delete/native", func(b *testing.B) {
		for b.Loop() {
			name, doc := next()
			if _, err := d.SnapshotCreateXML(ctx, "web", doc, driver.CreateDiskOnly); err != nil {
				b.Fatal(err)
			}
			if _, err := d.SnapshotDelete(ctx, "web", name, 0); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("create-delete/socket", func(b *testing.B) {
		for b.Loop() {
			_, doc := next()
			s, err := l.DomainSnapshotCreateXML(dom, doc, uint32(driver.CreateDiskOnly))
			if err != nil {
				b.Fatal(err)
			}
			if err := l.DomainSnapshotDelete(s, 0); err != nil {
				b.Fatal(err)
			}
		}
	})
}

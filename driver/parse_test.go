package driver

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/xlsnap/xlsnap/errdefs"
)

// TestParseSnapshotFirstWins: libvirt reads each child of
// <domainsnapshot> with an XPath lookup that takes the first, so of two
// <description> (or <name>, <memory>, <disks>) elements the first counts.
func TestParseSnapshotFirstWins(t *testing.T) {
	doc, err := parseSnapshot(context.Background(), `<domainsnapshot><name>a</name><description>first</description>
<memory snapshot='no'/><name>b</name><description>second <b>bold</b></description><memory snapshot='internal'/>
<disks><disk name='vda' snapshot='internal'/></disks><disks><disk name='vdb'/></disks></domainsnapshot>`, false)
	if err != nil {
		t.Fatal(err)
	}
	if doc.Name != "a" || doc.Description != "first" || doc.Memory.Snapshot != "no" || len(doc.Disks.Disks) != 1 || doc.Disks.Disks[0].Name != "vda" {
		t.Fatalf("got name %q, description %q, memory %+v, disks %+v; want the first of each", doc.Name, doc.Description, doc.Memory, doc.Disks)
	}
}

// TestParseSnapshotSize: virsh sends XML files of up to 10 MiB
// (VSH_MAX_XML_FILE); a 5 MB document is taken, one past MaxSnapshotXML
// is not.
func TestParseSnapshotSize(t *testing.T) {
	wrap := func(n int) string {
		head, tail := "<domainsnapshot><name>h</name><description>", "</description></domainsnapshot>"
		return head + strings.Repeat("x", n-len(head)-len(tail)) + tail
	}
	if MaxSnapshotXML != 10<<20 {
		t.Fatalf("MaxSnapshotXML is %d, want virsh's 10 MiB", MaxSnapshotXML)
	}
	if _, err := parseSnapshot(context.Background(), wrap(5_000_000), false); err != nil {
		t.Fatalf("a 5 MB document: %v", err)
	}
	if _, err := parseSnapshot(context.Background(), wrap(MaxSnapshotXML+1), false); !errors.Is(err, errdefs.ErrXMLDetail) {
		t.Fatalf("a document past the limit: %v", err)
	}
}

// FuzzParseSnapshot: the driver's snapshot XML parser never panics, fails
// only with errors of the vocabulary (never an untyped or internal one),
// and a document it takes renders (as dumpxml renders it) to a document it
// takes again and renders the same.
func FuzzParseSnapshot(f *testing.F) {
	for _, seed := range []string{
		"<domainsnapshot><name>s</name><description>d &amp; e</description><memory snapshot='no'/></domainsnapshot>",
		"<domainsnapshot><name>s</name><memory snapshot='external' file='/m'/><disks><disk name='vda' snapshot='external'><source file='/o'/></disk></disks></domainsnapshot>",
		"<domainsnapshot><name>s</name><memory snapshot='bogus'/></domainsnapshot>",
		"<notasnapshot/>",
		"<domainsnapshot><name>&x;</name></domainsnapshot>",
	} {
		f.Add(seed)
	}
	ctx := context.Background()
	f.Fuzz(func(t *testing.T, in string) {
		doc, err := parseSnapshot(ctx, in, false)
		if err != nil {
			var typed *errdefs.Error
			if !errors.As(err, &typed) || errdefs.CodeOf(err) == errdefs.CodeInternal {
				t.Fatalf("%q: error %v (%T) is not of the vocabulary", in, err, err)
			}
			return
		}
		render := func(x string) string {
			t.Helper()
			d, err := parseSnapshot(ctx, x, false)
			if err != nil {
				t.Fatalf("%q, rendered from %q, does not parse: %v", x, in, err)
			}
			raw, err := d.Marshal()
			if err != nil {
				t.Fatalf("marshal of %q: %v", x, err)
			}
			out, err := libvirtStyle(raw)
			if err != nil {
				t.Fatalf("formatting %q: %v", raw, err)
			}
			return out
		}
		raw, err := doc.Marshal()
		if err != nil {
			return // a value encoding/xml cannot write back; nothing to compare
		}
		first, err := libvirtStyle(raw)
		if err != nil {
			t.Fatalf("formatting %q: %v", raw, err)
		}
		if second := render(first); second != first {
			t.Fatalf("unstable:\n%s\nbecame\n%s", first, second)
		}
	})
}

package domxml

import (
	"slices"
	"strings"
	"testing"

	"libvirt.org/go/libvirtxml"
)

func TestDisks(t *testing.T) {
	const doc = `<domain type='xen'><name>g</name><devices>
<disk type='file' device='disk' snapshot='internal'><driver name='qemu' type='qcow2'/><source file='/pool/g.qcow2'/><target dev='xvda'/></disk>
<disk type='block' device='disk'><driver name='qemu' type='raw'/><source dev='/dev/vg/g'/><target dev='xvdb'/></disk>
<disk type='file' device='cdrom'><source file='/iso/x.iso'/><target dev='xvdc'/></disk>
<disk type='file'><source file='/pool/untyped.img'/><target dev='xvdd'/></disk>
<disk type='file' device='disk'><target dev='xvde'/></disk>
<disk type='network' device='disk'><source protocol='nbd' name='x'><host name='h'/></source><target dev='xvdf'/></disk>
</devices></domain>`
	var d libvirtxml.Domain
	if err := d.Unmarshal(doc); err != nil {
		t.Fatal(err)
	}
	want := []Disk{
		{Target: "xvda", File: "/pool/g.qcow2", Format: "qcow2", Snapshot: "internal"},
		{Target: "xvdb", Block: "/dev/vg/g", Format: "raw"},
		{Target: "xvdd", File: "/pool/untyped.img", Format: DefaultFormat}, // never probed
		{Target: "xvde"},
		{Target: "xvdf"},
	}
	if got := Disks(&d); !slices.Equal(got, want) {
		t.Fatalf("Disks:\n got %+v\nwant %+v", got, want)
	}
	// A definition without devices has no disks (and does not panic).
	if got := Disks(&libvirtxml.Domain{Name: "g"}); got != nil {
		t.Fatalf("no devices: %+v", got)
	}
}

func TestMoveSources(t *testing.T) {
	const doc = `<domain type='xen'><name>g</name><devices>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/pool/top.qcow2'/>
<backingStore type='file'><format type='qcow2'/><source file='/pool/base.qcow2'/><backingStore/></backingStore><target dev='xvda'/></disk>
<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='/pool/b.img'/><target dev='xvdb'/></disk>
</devices></domain>`
	out, changed, err := MoveSources(doc, map[string]string{"/elsewhere.qcow2": "/x"})
	if err != nil || changed || out != doc {
		t.Fatalf("no moved file named: changed %v, err %v, document rewritten: %v", changed, err, out != doc)
	}
	out, changed, err = MoveSources(doc, map[string]string{"/pool/base.qcow2": "/new/base.qcow2", "/pool/b.img": "/new/b.img"})
	if err != nil || !changed {
		t.Fatalf("changed %v, err %v", changed, err)
	}
	var d libvirtxml.Domain
	if err := d.Unmarshal(out); err != nil {
		t.Fatal(err)
	}
	disks := d.Devices.Disks
	if got := []string{disks[0].Source.File.File, disks[0].BackingStore.Source.File.File, disks[1].Source.File.File}; !slices.Equal(got, []string{"/pool/top.qcow2", "/new/base.qcow2", "/new/b.img"}) {
		t.Fatalf("sources after the move: %v\n%s", got, out)
	}
	if disks[1].Driver.Type != "raw" || disks[0].Target.Dev != "xvda" {
		t.Fatalf("the rest of the definition changed:\n%s", out)
	}
	if _, _, err := MoveSources("<domain", map[string]string{"a": "b"}); err == nil {
		t.Fatal("a broken definition was taken")
	}
}

// FuzzMoveSources: any document either fails to parse or comes back
// parseable, unchanged byte for byte when it names no moved file, and
// naming the new file where it did. (A second pass is not asked to
// change nothing: libvirtxml does not render every odd document the
// same way twice, and only documents libvirt or the driver wrote are
// ever moved.)
func FuzzMoveSources(f *testing.F) {
	f.Add(`<domain><devices><disk><source file='/a'/><target dev='xvda'/></disk></devices></domain>`, "/a", "/b")
	f.Add(`<domain><devices><disk><source file='/t'/><backingStore><source file='/a'/></backingStore></disk></devices></domain>`, "/a", "/c")
	f.Fuzz(func(t *testing.T, doc, from, to string) {
		if from == to || to == "" {
			return // moves are checked before: a file goes somewhere
		}
		out, changed, err := MoveSources(doc, map[string]string{from: to})
		if err != nil {
			return
		}
		if !changed {
			if out != doc {
				t.Fatal("unchanged, yet rewritten")
			}
			return
		}
		var d libvirtxml.Domain
		if err := d.Unmarshal(out); err != nil {
			t.Fatalf("its own output does not parse: %v\n%s", err, out)
		}
		if !strings.Contains(out, "file=") {
			t.Fatalf("a move left no file source:\n%s", out)
		}
	})
}

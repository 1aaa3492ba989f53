package domxml

import (
	"slices"
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

package libvirt

import (
	"bytes"
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/xlsnap/xlsnap/errdefs"
)

// libxlImage lays a save image out as libvirt's libxl driver writes it
// (libxlDoDomainSave): the 64-byte header, the XML with its NUL, then
// libxl's stream.
func libxlImage(t *testing.T, xml string, stream []byte) string {
	t.Helper()
	var b bytes.Buffer
	b.WriteString("libvirt-xml\n \x00 \r")
	binary.Write(&b, binary.NativeEndian, uint32(2))
	binary.Write(&b, binary.NativeEndian, uint32(len(xml)+1))
	b.Write(make([]byte, 40))
	b.WriteString(xml)
	b.WriteByte(0)
	b.Write(stream)
	p := filepath.Join(t.TempDir(), "dom.save")
	if err := os.WriteFile(p, b.Bytes(), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestRedefineLibxlImage(t *testing.T) {
	stream := bytes.Repeat([]byte("Xen libxl stream\x00\xff"), 100000)
	p := libxlImage(t, "<domain type='xen'><name>g</name><source file='/pool/g.qcow2'/></domain>", stream)
	const newXML = "<domain type='xen'><name>g</name><source file='/pool/g.snap1.qcow2'/><!-- longer than before --></domain>"
	if err := redefineLibxlImage(p, newXML); err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	if string(got[:16]) != "libvirt-xml\n \x00 \r" || binary.NativeEndian.Uint32(got[16:]) != 2 {
		t.Fatalf("magic or version changed: %q", got[:20])
	}
	n := binary.NativeEndian.Uint32(got[20:])
	if int(n) != len(newXML)+1 || string(got[64:64+n]) != newXML+"\x00" {
		t.Fatalf("XML length %d, XML %q", n, got[64:64+n])
	}
	if !bytes.Equal(got[64+n:], stream) {
		t.Fatal("libxl's stream changed")
	}
	if fi, _ := os.Stat(p); fi.Mode().Perm() != 0o600 {
		t.Errorf("mode %v, want 0600 as libvirt writes it", fi.Mode().Perm())
	}
	if left, _ := filepath.Glob(filepath.Join(filepath.Dir(p), ".*")); len(left) != 0 {
		t.Errorf("temporary files left: %v", left)
	}
}

// TestRedefineLibxlImageRefuses: anything but libvirt's libxl image is
// left as it was.
func TestRedefineLibxlImageRefuses(t *testing.T) {
	dir := t.TempDir()
	qemuSave := filepath.Join(dir, "qemu.save")
	os.WriteFile(qemuSave, append([]byte("LibvirtQemudSave"), make([]byte, 200)...), 0o600)
	huge := libxlImage(t, "<domain/>", []byte("stream"))
	b, _ := os.ReadFile(huge)
	binary.NativeEndian.PutUint32(b[20:], 1<<30)
	os.WriteFile(huge, b, 0o600)
	short := filepath.Join(dir, "short.save")
	os.WriteFile(short, []byte("libvirt-xml\n \x00 \r"), 0o600)

	for name, tc := range map[string]struct {
		path, xml string
		want      error
	}{
		"QEMU driver's image": {qemuSave, "<domain/>", errNotLibxlImage},
		"XML length 1 GiB":    {huge, "<domain/>", errNotLibxlImage},
		"truncated header":    {short, "<domain/>", errNotLibxlImage},
		"NUL in the XML":      {libxlImage(t, "<domain/>", []byte("s")), "<domain>\x00</domain>", errdefs.ErrInvalidArg},
		"missing":             {filepath.Join(dir, "none"), "<domain/>", os.ErrNotExist},
	} {
		before, _ := os.ReadFile(tc.path)
		if err := redefineLibxlImage(tc.path, tc.xml); !errors.Is(err, tc.want) {
			t.Errorf("%s: %v, want %v", name, err, tc.want)
		}
		if after, _ := os.ReadFile(tc.path); !bytes.Equal(before, after) {
			t.Errorf("%s: the image changed", name)
		}
	}
	if left, _ := filepath.Glob(filepath.Join(dir, ".*")); len(left) != 0 {
		t.Errorf("temporary files left: %v", left)
	}
}

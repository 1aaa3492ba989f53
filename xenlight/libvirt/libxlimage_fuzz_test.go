package libvirt

import (
	"bytes"
	"encoding/binary"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// FuzzRedefineLibxlImage: any file is either refused and left as it was,
// or rewritten with the new definition and the stream after the old XML
// kept byte for byte.
func FuzzRedefineLibxlImage(f *testing.F) {
	h := libxlSaveHeader{Magic: libxlSaveMagic, Version: 2, XMLLen: 6}
	var good bytes.Buffer
	binary.Write(&good, binary.NativeEndian, h)
	good.WriteString("<dom/\x00STREAM")
	f.Add(good.Bytes(), "<domain/>")
	f.Add(good.Bytes()[:70], "<domain/>")
	f.Add([]byte("libvirt-xml\n \x00 \r"), "")
	f.Fuzz(func(t *testing.T, data []byte, def string) {
		path := filepath.Join(t.TempDir(), "vm.save")
		if err := os.WriteFile(path, data, 0o600); err != nil {
			t.Fatal(err)
		}
		err := redefineLibxlImage(path, def)
		got, rerr := os.ReadFile(path)
		if rerr != nil {
			t.Fatal(rerr)
		}
		if err != nil {
			if !bytes.Equal(got, data) {
				t.Fatalf("refused (%v) but the file changed", err)
			}
			return
		}
		var in, out libxlSaveHeader
		hs := binary.Size(in)
		binary.Read(bytes.NewReader(data), binary.NativeEndian, &in)
		if binary.Read(bytes.NewReader(got), binary.NativeEndian, &out) != nil || out.Magic != libxlSaveMagic {
			t.Fatal("rewritten image has no header")
		}
		stream := data[hs+int(in.XMLLen):]
		want := append([]byte(def), 0)
		if int(out.XMLLen) != len(want) || !bytes.Equal(got[hs:hs+len(want)], want) || !bytes.Equal(got[hs+len(want):], stream) {
			t.Fatalf("rewritten image: XML length %d, rest differs", out.XMLLen)
		}
		if strings.ContainsRune(def, 0) {
			t.Fatal("a definition with a NUL byte was written")
		}
	})
}

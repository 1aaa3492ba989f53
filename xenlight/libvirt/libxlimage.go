package libvirt

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/xlsnap/xlsnap/errdefs"
	"github.com/xlsnap/xlsnap/internal/fsutil"
)

// libvirt's libxl driver saves a domain as a 64-byte header, the domain
// XML (NUL-terminated) and libxl's stream, and restores it onto the disks
// that XML names. It takes no other definition at restore time (no dxml,
// no virDomainSaveImageDefineXML), so after a snapshot has moved the
// domain onto new overlays the XML in the image must be replaced, or the
// restored domain writes into what is now a backing file.
var libxlSaveMagic = [16]byte([]byte("libvirt-xml\n \x00 \r"))

// libxlMaxXML bounds the XML read from an image's header: libvirt's
// domain XML is kilobytes; a header claiming more is not one.
const libxlMaxXML = 16 << 20

type libxlSaveHeader struct {
	Magic   [16]byte
	Version uint32
	XMLLen  uint32 // with the NUL
	Unused  [10]uint32
}

// errNotLibxlImage: the file is not a save image of libvirt's libxl
// driver.
var errNotLibxlImage = errors.New("not a save image of libvirt's libxl driver")

// redefineLibxlImage replaces the domain XML in a save image of libvirt's
// libxl driver with definition, keeping libxl's stream byte for byte. The
// new image is written beside the old one, synced, and renamed over it:
// a crash leaves the old image or the new one, never a mix.
func redefineLibxlImage(path, definition string) (err error) {
	in, err := os.Open(path)
	if err != nil {
		return err
	}
	defer in.Close()
	var h libxlSaveHeader
	if err := binary.Read(in, binary.NativeEndian, &h); err != nil || h.Magic != libxlSaveMagic {
		return fmt.Errorf("%w: %s", errNotLibxlImage, path)
	}
	if h.XMLLen == 0 || h.XMLLen > libxlMaxXML {
		return fmt.Errorf("%w: %s: XML length %d", errNotLibxlImage, path, h.XMLLen)
	}
	// Only the length is checked: the old XML is skipped, not trusted. A
	// file that ends inside it has no stream to keep: refused, not
	// rewritten into another broken image.
	fi, err := in.Stat()
	if err != nil {
		return err
	}
	if int64(binary.Size(h))+int64(h.XMLLen) > fi.Size() {
		return fmt.Errorf("%w: %s: XML length %d beyond the end of the file", errNotLibxlImage, path, h.XMLLen)
	}
	if _, err := in.Seek(int64(h.XMLLen), io.SeekCurrent); err != nil {
		return err
	}
	xml := append([]byte(definition), 0)
	if bytes.IndexByte(xml, 0) != len(xml)-1 {
		return fmt.Errorf("%w: the definition holds a NUL byte", errdefs.ErrInvalidArg)
	}
	h.XMLLen = uint32(len(xml))

	out, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			out.Close()
			os.Remove(out.Name())
		}
	}()
	if err := binary.Write(out, binary.NativeEndian, h); err != nil {
		return err
	}
	if _, err := out.Write(xml); err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		return err
	}
	if err := out.Sync(); err != nil {
		return err
	}
	if err := out.Close(); err != nil {
		return err
	}
	if err := os.Rename(out.Name(), path); err != nil {
		return err
	}
	return fsutil.SyncDir(filepath.Dir(path))
}

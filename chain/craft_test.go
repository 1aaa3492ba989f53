package chain_test

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"testing"
)

// crafted describes a qcow2 image built byte by byte, so a test can say
// exactly which field is hostile.
type crafted struct {
	version       uint32
	clusterBits   uint32
	size          uint64
	backing       string
	backingFormat string
	backingOffset uint64 // 0: right after the extensions
	backingLen    uint32 // 0: len(backing)
	incompat      uint64
	autoclear     uint64
	refcountOrder uint32
	headerLength  uint32
	compression   uint8
	nbSnapshots   uint32
	snapOffset    uint64
	snapTable     []byte
	extensions    []extension
	fileSize      int // pad the file to this size
}

type extension struct {
	typ  uint32
	data []byte
	// length overrides the stored length (to lie about it) when non-zero.
	length uint32
}

func newCrafted() crafted {
	return crafted{version: 3, clusterBits: 16, size: 1 << 20, refcountOrder: 4, headerLength: 112}
}

func (c crafted) withBacking(ref, format string) crafted {
	c.backing, c.backingFormat = ref, format
	return c
}

func (c crafted) bytes() []byte {
	be := binary.BigEndian
	hl := c.headerLength
	if c.version == 2 {
		hl = 72
	}
	if hl > 4096 {
		hl = 112 // a lying header length: store it, but lay out a normal header
	}
	buf := make([]byte, hl)
	copy(buf, "QFI\xfb")
	be.PutUint32(buf[4:], c.version)
	be.PutUint32(buf[20:], c.clusterBits)
	be.PutUint64(buf[24:], c.size)
	be.PutUint32(buf[60:], c.nbSnapshots)
	be.PutUint64(buf[64:], c.snapOffset)
	if c.version >= 3 && hl >= 104 {
		be.PutUint64(buf[72:], c.incompat)
		be.PutUint64(buf[88:], c.autoclear)
		be.PutUint32(buf[96:], c.refcountOrder)
		be.PutUint32(buf[100:], c.headerLength)
		if hl > 104 {
			buf[104] = c.compression
		}
	}
	exts := c.extensions
	if c.backingFormat != "" {
		exts = append([]extension{{typ: 0xe2792aca, data: []byte(c.backingFormat)}}, exts...)
	}
	for _, e := range exts {
		var h [8]byte
		be.PutUint32(h[:], e.typ)
		l := uint32(len(e.data))
		if e.length != 0 {
			l = e.length
		}
		be.PutUint32(h[4:], l)
		buf = append(buf, h[:]...)
		buf = append(buf, e.data...)
		for len(buf)%8 != 0 {
			buf = append(buf, 0)
		}
	}
	buf = append(buf, make([]byte, 8)...) // end of extensions
	if c.backing != "" || c.backingLen != 0 {
		off := c.backingOffset
		if off == 0 {
			off = uint64(len(buf))
		}
		l := c.backingLen
		if l == 0 {
			l = uint32(len(c.backing))
		}
		be.PutUint64(buf[8:], off)
		be.PutUint32(buf[16:], l)
		if uint64(len(buf)) < off {
			buf = append(buf, make([]byte, off-uint64(len(buf)))...)
		}
		buf = append(buf[:off], c.backing...)
	}
	if c.snapTable != nil {
		if uint64(len(buf)) < c.snapOffset {
			buf = append(buf, make([]byte, c.snapOffset-uint64(len(buf)))...)
		}
		buf = append(buf[:c.snapOffset], c.snapTable...)
	}
	if len(buf) < c.fileSize {
		buf = append(buf, make([]byte, c.fileSize-len(buf))...)
	}
	return buf
}

// snapshotEntry encodes one snapshot table entry.
func snapshotEntry(id, name string, extraLen uint32, extra []byte) []byte {
	be := binary.BigEndian
	e := make([]byte, 40)
	be.PutUint16(e[12:], uint16(len(id)))
	be.PutUint16(e[14:], uint16(len(name)))
	be.PutUint32(e[36:], extraLen)
	e = append(e, extra...)
	e = append(e, id...)
	e = append(e, name...)
	for len(e)%8 != 0 {
		e = append(e, 0)
	}
	return e
}

func bytesReader(b []byte) *bytes.Reader { return bytes.NewReader(b) }

// Shape of a snapshot-bomb layer: entries whose ID and name are each the
// longest qcow2 allows, as many as fit under QEMU's 64 MiB table limit.
// The names are zeros left as holes, so a layer is 64 MiB long but only
// its entry headers (one block each) take disk space.
const (
	bombNameLen   = 65535
	bombEntryLen  = 40 + 2*bombNameLen + 2 // padded to 8 bytes
	bombEntries   = 64 << 20 / bombEntryLen
	bombTableOff  = 1 << 16
	bombLayerSize = bombTableOff + bombEntries*bombEntryLen
)

// writeSnapshotBomb writes dir/name as a sparse qcow2 image whose snapshot
// table holds bombEntries maximal entries, over backing (qcow2) if set.
func writeSnapshotBomb(t testing.TB, dir, name, backing string) string {
	t.Helper()
	cr := newCrafted()
	if backing != "" {
		cr = cr.withBacking(backing, "qcow2")
	}
	cr.nbSnapshots, cr.snapOffset = bombEntries, bombTableOff
	path := filepath.Join(dir, name)
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.Write(cr.bytes()); err != nil {
		t.Fatal(err)
	}
	entry := snapshotEntry("", "", 0, nil)[:40]
	binary.BigEndian.PutUint16(entry[12:], bombNameLen)
	binary.BigEndian.PutUint16(entry[14:], bombNameLen)
	for i := int64(0); i < bombEntries; i++ {
		if _, err := f.WriteAt(entry, bombTableOff+i*bombEntryLen); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Truncate(bombLayerSize); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	return path
}

// writeSnapshotBombChain writes a chain of n snapshot-bomb layers into dir
// and returns its top.
func writeSnapshotBombChain(t testing.TB, dir string, n int) string {
	t.Helper()
	prev := ""
	for i := range n {
		name := fmt.Sprintf("bomb%d.qcow2", i)
		writeSnapshotBomb(t, dir, name, prev)
		prev = name
	}
	return filepath.Join(dir, prev)
}

// hugeHeaderLength is a small file whose header claims the largest header
// length its 2 MiB clusters allow; the file is just over one first read
// long, so a reader that trusts the claim reads (and allocates) past it.
func hugeHeaderLength() []byte {
	cr := newCrafted()
	cr.clusterBits, cr.headerLength, cr.fileSize = 21, 2<<20, 4216
	return cr.bytes()
}

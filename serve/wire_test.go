package serve

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"testing"

	libvirt "github.com/digitalocean/go-libvirt"
	"github.com/digitalocean/go-libvirt/socket"
)

// rawPacket is a packet as bytes, its length word saying n (not the real
// length when the test lies about it).
func rawPacket(n uint32, words []uint32, body []byte) []byte {
	var b bytes.Buffer
	binary.Write(&b, binary.BigEndian, n)
	for _, w := range words {
		binary.Write(&b, binary.BigEndian, w)
	}
	b.Write(body)
	return b.Bytes()
}

func TestReadPacketBounds(t *testing.T) {
	hdr := []uint32{ProgramRemote, ProtocolVersion, procAuthList, socket.Call, 1, socket.StatusOK}
	for _, tc := range []struct {
		name string
		in   []byte
		want error
	}{
		{"empty", nil, io.EOF},
		{"cut length", []byte{0, 0}, io.ErrUnexpectedEOF},
		{"shorter than a header", rawPacket(27, hdr[:5], nil), ErrMalformed},
		{"over libvirt's limit", rawPacket(MessageMax+lenWord+1, hdr, nil), ErrMalformed},
		{"cut body", rawPacket(40, hdr, []byte{1, 2}), io.ErrUnexpectedEOF},
		{"unknown type", rawPacket(28, []uint32{ProgramRemote, 1, 1, 7, 1, 0}, nil), ErrMalformed},
		{"unknown status", rawPacket(28, []uint32{ProgramRemote, 1, 1, 0, 1, 3}, nil), ErrMalformed},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ReadPacket(bytes.NewReader(tc.in))
			if !errors.Is(err, tc.want) {
				t.Fatalf("ReadPacket = %v, want %v", err, tc.want)
			}
		})
	}
	// The largest packet libvirt sends is taken.
	big := rawPacket(MessageMax+lenWord, hdr, make([]byte, MessageMax-headerSize))
	p, err := ReadPacket(bytes.NewReader(big))
	if err != nil || len(p.Body) != MessageMax-headerSize {
		t.Fatalf("largest packet: %v", err)
	}
}

func TestPacketRoundTrip(t *testing.T) {
	body, err := encodeRet(&libvirt.DomainLookupByNameRet{Dom: libvirt.Domain{Name: "web", ID: -1}})
	if err != nil {
		t.Fatal(err)
	}
	p := &Packet{Header: socket.Header{Program: ProgramRemote, Version: 1, Procedure: procDomainLookupByName, Type: socket.Reply, Serial: 7}, Body: body}
	q, err := ReadPacket(bytes.NewReader(p.Encode()))
	if err != nil || q.Header != p.Header || !bytes.Equal(q.Body, body) {
		t.Fatalf("round trip: %+v, %v", q, err)
	}
	var ret libvirt.DomainLookupByNameRet
	if err := decodeArgs(q.Body, &ret); err != nil || ret.Dom.Name != "web" || ret.Dom.ID != -1 {
		t.Fatalf("decoded %+v, %v", ret, err)
	}
	// Bytes after the arguments are refused.
	if err := decodeArgs(append(body, 0, 0, 0, 0), &ret); !errors.Is(err, ErrMalformed) {
		t.Fatalf("trailing bytes: %v", err)
	}
}

// FuzzPacket feeds arbitrary bytes to the packet reader and to the
// argument decoders of the served calls: nothing may panic or allocate
// past the packet's own size, and what is read is written back the same.
func FuzzPacket(f *testing.F) {
	hdr := []uint32{ProgramRemote, ProtocolVersion, procDomainSnapshotCreateXML, socket.Call, 3, socket.StatusOK}
	args, _ := encodeRet(&libvirt.DomainSnapshotCreateXMLArgs{Dom: libvirt.Domain{Name: "web"}, XMLDesc: "<domainsnapshot/>", Flags: 16})
	f.Add(rawPacket(uint32(28+len(args)), hdr, args))
	f.Add(rawPacket(28, []uint32{ProgramKeepalive, 1, procPing, socket.Message, 0, 0}, nil))
	f.Add(rawPacket(32, hdr, []byte{0xff, 0xff, 0xff, 0xff}))
	f.Fuzz(func(t *testing.T, in []byte) {
		p, err := ReadPacket(bytes.NewReader(in))
		if err != nil {
			return
		}
		out := p.Encode()
		if !bytes.Equal(out, in[:len(out)]) {
			t.Fatalf("re-encoded packet differs")
		}
		for _, v := range []any{
			&libvirt.DomainSnapshotCreateXMLArgs{}, &libvirt.DomainListAllSnapshotsArgs{},
			&libvirt.ConnectOpenArgs{}, &libvirt.DomainLookupByUUIDArgs{},
			&libvirt.DomainSnapshotListNamesArgs{}, &libvirt.ConnectListAllDomainsArgs{},
		} {
			decodeArgs(p.Body, v)
		}
		decodeConnectOpen(p.Body)
	})
}

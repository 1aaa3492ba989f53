package serve

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"

	"github.com/davecgh/go-xdr/xdr2"
	libvirt "github.com/digitalocean/go-libvirt"
	"github.com/digitalocean/go-libvirt/socket"
)

// The numbers below are libvirt's RPC ABI (src/rpc/virnetprotocol.x,
// src/remote/remote_protocol.x, src/rpc/virkeepaliveprotocol.x).
// go-libvirt keeps its copies of them in an internal package, so the few
// this server needs are named here.
const (
	// ProgramRemote is REMOTE_PROGRAM, the program of every libvirt API
	// call; ProtocolVersion is REMOTE_PROTOCOL_VERSION.
	ProgramRemote   = 0x20008086
	ProtocolVersion = 1
	// ProgramKeepalive is KEEPALIVE_PROGRAM ("keep"); its PING and PONG
	// travel as VIR_NET_MESSAGE packets without a body.
	ProgramKeepalive = 0x6b656570
	keepaliveVersion = 1
	procPing         = 1
	procPong         = 2

	// MessageMax is VIR_NET_MESSAGE_MAX: the largest packet libvirt
	// accepts, header and body, not counting the 4-byte length word.
	MessageMax = 32 << 20
	// lenWord is VIR_NET_MESSAGE_LEN_MAX, the length word's own size,
	// which the length it holds includes.
	lenWord = 4
	// headerSize is VIR_NET_MESSAGE_HEADER_XDR_LEN: six 4-byte words.
	headerSize = 24
	// stringMax is REMOTE_STRING_MAX, the longest string an argument may
	// hold; listMax is REMOTE_DOMAIN_LIST_MAX (= ..._SNAPSHOT_LIST_MAX).
	stringMax = 4 << 20
	listMax   = 16384

	// typeStreamHole is VIR_NET_STREAM_HOLE, the last message type
	// libvirt defines; go-libvirt's socket package stops at
	// ReplyWithFDs.
	typeStreamHole = 6
)

// ErrMalformed is a packet the server cannot take as libvirt's: a length
// outside libvirt's bounds, a header no client sends. The connection it
// came on is closed; other clients never see it.
var ErrMalformed = errors.New("malformed libvirt RPC packet")

// Packet is one libvirt RPC message: go-libvirt's header and the XDR body
// that follows it.
type Packet struct {
	socket.Header
	Body []byte
}

// ReadPacket reads one packet, refusing lengths libvirt's own reader
// refuses (virNetMessageDecodeLength) before allocating anything, and
// header fields no peer may send (virNetMessageDecodeHeader's checks).
// The body is read in full or not at all.
//
// Errors: io.EOF at a clean end between packets; io.ErrUnexpectedEOF for
// a packet cut short; ErrMalformed for bounds and header values.
func ReadPacket(r io.Reader) (*Packet, error) {
	var lw [lenWord]byte
	if _, err := io.ReadFull(r, lw[:]); err != nil {
		return nil, err
	}
	n := binary.BigEndian.Uint32(lw[:])
	if n < lenWord+headerSize {
		return nil, fmt.Errorf("%w: packet of %d bytes is shorter than a header", ErrMalformed, n)
	}
	if n-lenWord > MessageMax {
		return nil, fmt.Errorf("%w: packet of %d bytes is over libvirt's limit of %d", ErrMalformed, n, MessageMax+lenWord)
	}
	buf := make([]byte, n-lenWord)
	if _, err := io.ReadFull(r, buf); err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return nil, err
	}
	return parsePacket(buf)
}

// parsePacket splits a packet (without its length word) into header and
// body.
func parsePacket(buf []byte) (*Packet, error) {
	if len(buf) < headerSize {
		return nil, fmt.Errorf("%w: %d bytes is shorter than a header", ErrMalformed, len(buf))
	}
	be := binary.BigEndian
	p := &Packet{Body: buf[headerSize:]}
	p.Program = be.Uint32(buf[0:])
	p.Version = be.Uint32(buf[4:])
	p.Procedure = be.Uint32(buf[8:])
	p.Type = be.Uint32(buf[12:])
	p.Serial = int32(be.Uint32(buf[16:]))
	p.Status = be.Uint32(buf[20:])
	if p.Type > typeStreamHole {
		return nil, fmt.Errorf("%w: message type %d", ErrMalformed, p.Type)
	}
	if p.Status > socket.StatusContinue {
		return nil, fmt.Errorf("%w: message status %d", ErrMalformed, p.Status)
	}
	return p, nil
}

// Encode is the packet on the wire, length word included.
func (p *Packet) Encode() []byte {
	be := binary.BigEndian
	out := make([]byte, lenWord+headerSize, lenWord+headerSize+len(p.Body))
	be.PutUint32(out[0:], uint32(lenWord+headerSize+len(p.Body)))
	be.PutUint32(out[4:], p.Program)
	be.PutUint32(out[8:], p.Version)
	be.PutUint32(out[12:], p.Procedure)
	be.PutUint32(out[16:], p.Type)
	be.PutUint32(out[20:], uint32(p.Serial))
	be.PutUint32(out[24:], p.Status)
	return append(out, p.Body...)
}

// decodeArgs reads a call's arguments into v, one of go-libvirt's
// generated remote_*_args structures. Strings and arrays are bounded by
// the body (a length larger than what is left fails before allocation)
// and by REMOTE_STRING_MAX; bytes left over are refused, as libvirt's
// xdr filters leave none.
func decodeArgs(body []byte, v any) error {
	r := bytes.NewReader(body)
	if _, err := xdr.UnmarshalLimited(r, v, uint(min(len(body), stringMax))); err != nil {
		return fmt.Errorf("%w: arguments: %w", ErrMalformed, err)
	}
	if r.Len() != 0 {
		return fmt.Errorf("%w: arguments: %d bytes left over", ErrMalformed, r.Len())
	}
	return nil
}

// encodeRet is a reply body: v, a go-libvirt remote_*_ret structure, in
// XDR; nil is the empty body of a call that returns nothing.
func encodeRet(v any) ([]byte, error) {
	if v == nil {
		return nil, nil
	}
	var b bytes.Buffer
	if _, err := xdr.Marshal(&b, v); err != nil {
		return nil, err
	}
	return b.Bytes(), nil
}

// decodeConnectOpen reads remote_connect_open_args. Its name is an XDR
// optional string, whose leading boolean libvirtd reads as glibc's
// xdr_bool does: any non-zero word is true. go-libvirt's client sends
// 0x01000000 there, so the generic array decoding (a count) cannot be
// used for it.
func decodeConnectOpen(body []byte) (*libvirt.ConnectOpenArgs, error) {
	r := bytes.NewReader(body)
	d := xdr.NewDecoderLimited(r, uint(min(len(body), stringMax)))
	present, _, err := d.DecodeUint()
	if err != nil {
		return nil, fmt.Errorf("%w: arguments: %w", ErrMalformed, err)
	}
	a := &libvirt.ConnectOpenArgs{}
	if present != 0 {
		name, _, err := d.DecodeString()
		if err != nil {
			return nil, fmt.Errorf("%w: arguments: %w", ErrMalformed, err)
		}
		a.Name = libvirt.OptString{name}
	}
	flags, _, err := d.DecodeUint()
	if err != nil {
		return nil, fmt.Errorf("%w: arguments: %w", ErrMalformed, err)
	}
	a.Flags = libvirt.ConnectFlags(flags)
	if r.Len() != 0 {
		return nil, fmt.Errorf("%w: arguments: %d bytes left over", ErrMalformed, r.Len())
	}
	return a, nil
}

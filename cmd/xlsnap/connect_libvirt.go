//go:build cgo

package main

import (
	"github.com/xlsnap/xlsnap/driver"
	"github.com/xlsnap/xlsnap/driver/libvirtsource"
	"github.com/xlsnap/xlsnap/xenlight"
	xlvirt "github.com/xlsnap/xlsnap/xenlight/libvirt"
)

// openLibvirt connects to a libvirt URI in this process: a cgo build
// (go build, go run, go test, bin/xlsnap-libvirt) links libvirt's C
// library, and so pays for loading it at every start, whatever the URI.
func openLibvirt(uri string) (driver.DomainSource, xenlight.Hypervisor, func(), error) {
	src, err := libvirtsource.Open(uri)
	if err != nil {
		return nil, nil, nil, err
	}
	// Active domains of a libvirt connection go through libvirt too.
	return src, xlvirt.New(src.Conn()), func() { src.Close() }, nil
}

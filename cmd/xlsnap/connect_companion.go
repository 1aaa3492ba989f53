//go:build !cgo

package main

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"

	"github.com/xlsnap/xlsnap/driver"
	"github.com/xlsnap/xlsnap/xenlight"
)

// CompanionMissingError: this xlsnap was built without cgo, so without
// libvirt, and the companion that holds libvirt is not where it should
// be.
type CompanionMissingError struct {
	URI  string
	Path string // where the companion was looked for
	Err  error
}

func (e *CompanionMissingError) Error() string {
	return fmt.Sprintf("%v: --connect %s needs libvirt; this xlsnap is built without it, and its companion %s cannot run: %v (make build and make install put it beside xlsnap)",
		driver.ErrUnsupported, e.URI, e.Path, e.Err)
}

// Unwrap makes the error an unsupported configuration, for errors.Is and
// its libvirt code.
func (e *CompanionMissingError) Unwrap() error { return driver.ErrUnsupported }

// openLibvirt hands the whole command to xlsnap-libvirt, beside this
// executable, in place of this process (same arguments, environment and
// descriptors, so its output and exit code are the command's). A libvirt
// URI is the only thing this build cannot serve, and loading libvirt's C
// library and its ~60 dependencies would cost every other command (folder
// sources, chain) most of its run time; the source is opened before a
// command reads or writes anything, so nothing has happened yet to hand
// over.
func openLibvirt(uri string) (driver.DomainSource, xenlight.Hypervisor, func(), error) {
	self, err := os.Executable()
	if err != nil {
		return nil, nil, nil, &CompanionMissingError{URI: uri, Path: companionName, Err: err}
	}
	path := filepath.Join(filepath.Dir(self), companionName)
	if path == self {
		// A companion built without cgo would hand itself the command
		// forever.
		return nil, nil, nil, &CompanionMissingError{URI: uri, Path: path, Err: errors.New("it is itself built without cgo")}
	}
	argv := append([]string{path}, os.Args[1:]...)
	err = syscall.Exec(path, argv, os.Environ())
	// Exec returns only when it failed.
	return nil, nil, nil, &CompanionMissingError{URI: uri, Path: path, Err: err}
}

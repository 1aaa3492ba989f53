//go:build !cgo

package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"

	"github.com/xlsnap/xlsnap/driver"
	"github.com/xlsnap/xlsnap/storage/metastore"
)

// openEtcd hands the whole command to the companion, the full build
// beside this executable, which links the etcd client: linking it here
// would add its gRPC and protobuf start-up (about 2 ms, and 9 MB) to every
// command, chain included. Nothing has been read or written yet.
func openEtcd(_ context.Context, cfg etcdConfig) (metastore.Store, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, etcdCompanionErr(companionName, err)
	}
	path := filepath.Join(filepath.Dir(self), companionName)
	if path == self {
		return nil, etcdCompanionErr(path, errors.New("it is itself built without cgo"))
	}
	argv := append([]string{path}, os.Args[1:]...)
	err = syscall.Exec(path, argv, os.Environ())
	return nil, etcdCompanionErr(path, err)
}

func etcdCompanionErr(path string, err error) error {
	return fmt.Errorf("%w: --metadata-store etcd:// needs the etcd client; this xlsnap is built without it, and its companion %s cannot run: %v (make build and make install put it beside xlsnap)",
		driver.ErrUnsupported, path, err)
}

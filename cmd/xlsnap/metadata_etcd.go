//go:build cgo

package main

import (
	"context"

	"github.com/xlsnap/xlsnap/storage/metastore"
	"github.com/xlsnap/xlsnap/storage/metastore/etcdstore"
)

// openEtcd opens the cluster store. The etcd client (gRPC) lives only in
// this, the full build: linked into the lean bin/xlsnap it would cost
// every command's start (metadata_companion.go).
func openEtcd(ctx context.Context, cfg etcdConfig) (metastore.Store, error) {
	return etcdstore.Open(ctx, etcdstore.Config{Endpoints: cfg.Endpoints, Prefix: cfg.Prefix, TLS: cfg.TLS, Host: cfg.Host,
		LockTTL: cfg.LockTTL})
}

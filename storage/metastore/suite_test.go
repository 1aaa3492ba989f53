package metastore_test

import (
	"context"
	"path/filepath"
	"testing"

	"github.com/xlsnap/xlsnap/storage/metastore"
	"github.com/xlsnap/xlsnap/storage/metastore/metastoretest"
)

func TestBoltSuite(t *testing.T) {
	metastoretest.RunSuite(t, func(t *testing.T) (metastore.Store, func() metastore.Store) {
		path := filepath.Join(t.TempDir(), "xlsnap.db")
		open := func() metastore.Store {
			b, err := metastore.OpenBolt(context.Background(), path)
			if err != nil {
				t.Fatal(err)
			}
			return b
		}
		return open(), open
	})
}

package dir_test

import (
	"testing"

	"github.com/xlsnap/xlsnap/storage"
	"github.com/xlsnap/xlsnap/storage/backend/dir"
	"github.com/xlsnap/xlsnap/storage/storagetest"
)

func TestConformance(t *testing.T) {
	storage.Register("dir", dir.New)
	storagetest.Suite(t, "dir")
}

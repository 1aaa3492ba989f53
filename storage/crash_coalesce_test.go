package storage_test

import (
	"os"
	"os/exec"
	"testing"

	"github.com/xlsnap/xlsnap/storage"
	"github.com/xlsnap/xlsnap/storage/backend/dir"
)

// Crash tests of coalescing, on crash_test.go's machinery: the helper
// process is killed at every crash point of a coalesce, alone or after
// the delete that freed the layer; recovery must leave each merge done
// completely or not at all, every snapshot's data intact.

func crashNoMeta(name string, modes ...storage.DiskMode) crashAct {
	return crashAct{kind: "snapshot-nometa", name: name, modes: modes}
}

func coalesceCrashScenarios() []crashScenario {
	ext, in, no := storage.DiskExternal, storage.DiskInternal, storage.DiskNone
	coalesce := crashAct{kind: "coalesce"}
	both := []string{"vm-vda.qcow2", "vm-vdb.qcow2"}
	return []crashScenario{
		{
			// vda's base (4 MiB) holds more than the NO_METADATA overlay on
			// it (1 MiB): the overlay is committed down into the user's
			// image, which cannot be undone.
			name:       "coalesce-commit-down",
			setup:      []crashAct{crashWrite(0xa1, 0, 4), crashNoMeta("b", ext, no), crashWrite(0xa2, 0, 1)},
			op:         coalesce,
			prefix:     "coalesce",
			subOps:     []crashSubOp{{do: coalesce, forwardFrom: "intent-written"}},
			finalFiles: both,
		},
		{
			// The base (1 MiB) holds less than the overlay (4 MiB): the
			// overlay is rebased onto nothing with the base's data (undoable),
			// then takes the user's name (the point of no return).
			name:       "coalesce-pull-up",
			setup:      []crashAct{crashWrite(0xb1, 0, 1), crashNoMeta("b", ext, no), crashWrite(0xb2, 1, 4)},
			op:         coalesce,
			prefix:     "coalesce",
			subOps:     []crashSubOp{{do: coalesce, forwardFrom: "step1-link"}},
			finalFiles: both,
		},
		{
			// s1's images could not merge while vm-vda.s1 held i1; the delete
			// of i1 frees them, and the same call commits vm-vda.s1 down
			// (the base holds 4 MiB, the overlay 2). vdb took no part in s1:
			// its i1 is in its only image, and nothing of it merges.
			name: "delete-frees-layer",
			setup: []crashAct{crashWrite(0xc1, 0, 4), crashSnap("s1", ext, no), crashWrite(0xc2, 1, 2),
				crashSnap("i1", in, in), crashWrite(0xc3, 2, 1), crashDelete("s1")},
			op:     crashDelete("i1"),
			prefix: "delete",
			subOps: []crashSubOp{
				{do: crashAct{kind: "delete-uncoalesced", name: "i1"}, forwardFrom: "intent-written"},
				{do: coalesce, forwardFrom: "intent-written", prefix: "coalesce"},
			},
			finalFiles: both,
		},
	}
}

func TestCrashCoalesce(t *testing.T) {
	if os.Getenv(crashEnvAt) != "" || os.Getenv(crashEnvOp) != "" {
		t.Skip("crash switches set in the test process itself")
	}
	for _, tool := range []string{"qemu-img", "qemu-io"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("crash tests need %s: %v", tool, err)
		}
	}
	storage.Register("dir", dir.New)
	for _, sc := range coalesceCrashScenarios() {
		t.Run(sc.name, func(t *testing.T) {
			t.Parallel()
			testCrashScenario(t, &sc)
		})
	}
}

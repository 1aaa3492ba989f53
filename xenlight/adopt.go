package xenlight

import (
	"context"
	"fmt"
	"hash/fnv"

	"github.com/xlsnap/xlsnap/xenlight/qmp"
)

// jobPrefix begins the ID of every job nodeName names for what: the
// same in every process, so a later call finds an earlier one's job.
func jobPrefix(what string) string {
	h := fnv.New32a()
	h.Write([]byte(what))
	return fmt.Sprintf("xl%08x", h.Sum32())
}

// adopt is for a job that could not start: a job an earlier call
// started on what and lost (its QMP connection dropped; QEMU ran on) may
// hold the node. That job is let finish (completed through pivot if it
// waits ready: an active commit), and adopt reports whether the chains
// then show the work done (isDone). Asked only after a failed start, it
// costs the usual path nothing.
func adopt(ctx context.Context, m *qmp.Monitor, what string, progress func(float64), pivot *qmp.Pivot, isDone func([]DiskChain) bool) (bool, error) {
	found, err := m.AdoptJob(ctx, jobPrefix(what), percent(progress), pivot)
	if err != nil || !found {
		return false, err
	}
	chains, err := Chains(ctx, m)
	if err != nil {
		return false, err
	}
	return isDone(chains), nil
}

package qmp

import (
	"context"
	"fmt"
	"strings"
	"time"
)

// AdoptJob takes over a block job an earlier connection started and lost
// (QEMU runs a job on when its client goes): the job whose ID starts with
// prefix is completed if it waits ready (an active commit: through pivot
// if set, see Pivot; else with job-complete at once), and waited for
// until QEMU reports it over. It reports whether there was one. A job
// that ended while no one listened leaves no result, so the caller reads
// the outcome from the chain. ctx bounds the wait, but not a pivot once
// begun (milliseconds); the job is not cancelled when it ends (recovery
// will adopt it again).
func (m *Monitor) AdoptJob(ctx context.Context, prefix string, progress func(done, total int64), pivot *Pivot) (bool, error) {
	evCtx, stop := context.WithCancel(context.Background())
	defer stop()
	events, err := m.Events(evCtx)
	if err != nil {
		return false, err
	}
	type jobInfo struct {
		ID      string `json:"id"`
		Status  string `json:"status"`
		Current int64  `json:"current-progress"`
		Total   int64  `json:"total-progress"`
	}
	find := func() (*jobInfo, error) {
		var jobs []jobInfo
		if err := m.Execute(ctx, "query-jobs", nil, &jobs); err != nil {
			return nil, err
		}
		for i := range jobs {
			if strings.HasPrefix(jobs[i].ID, prefix) {
				return &jobs[i], nil
			}
		}
		return nil, nil
	}
	j, err := find()
	if err != nil || j == nil {
		return false, err
	}
	id := j.ID
	completed := false
	tick := time.NewTicker(progressEvery)
	defer tick.Stop()
	for {
		switch j.Status {
		case "ready":
			if pivot != nil {
				return true, m.pivot(ctx, id, pivot, events)
			}
			if !completed {
				if err := m.Execute(ctx, "job-complete", map[string]any{"id": id}, nil); err != nil {
					return true, err
				}
				completed = true
			}
		case "concluded":
			// Kept only where auto-dismiss is off, which xlsnap never
			// sets: dismiss it so it holds no node.
			return true, m.Execute(ctx, "job-dismiss", map[string]any{"id": id}, nil)
		}
		if progress != nil {
			progress(j.Current, j.Total)
		}
		select {
		case ev, ok := <-events:
			if !ok {
				return true, m.closeErr()
			}
			if evID, _ := ev.Data["device"].(string); evID == id {
				switch ev.Event {
				case "BLOCK_JOB_COMPLETED":
					if msg, ok := ev.Data["error"].(string); ok {
						return true, fmt.Errorf("%w %s: %s", ErrJobFailed, id, msg)
					}
					return true, nil
				case "BLOCK_JOB_CANCELLED":
					return true, fmt.Errorf("%w: %s", ErrJobCancelled, id)
				}
			}
		case <-tick.C:
		case <-ctx.Done():
			return true, ctx.Err()
		}
		// An event missed between the query and the subscription's
		// start is made up for by asking again.
		if j, err = find(); err != nil {
			return true, err
		}
		if j == nil {
			return true, nil
		}
	}
}

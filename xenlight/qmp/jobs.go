package qmp

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/xlsnap/xlsnap/errdefs"
	"github.com/xlsnap/xlsnap/internal/crashpoint"
)

// ErrJobFailed: a block job ended with an error; ErrJobCancelled: someone
// else cancelled it (cancelled by ctx, RunJob returns ctx's error). Both
// wrap errdefs.ErrOperationFailed.
var (
	ErrJobFailed    = fmt.Errorf("%w: block job", errdefs.ErrOperationFailed)
	ErrJobCancelled = fmt.Errorf("%w: block job cancelled", errdefs.ErrOperationFailed)
)

// progressEvery is how often a running job's offset is read for progress;
// QEMU sends no progress events, only the final ones.
const progressEvery = 100 * time.Millisecond

// Job reports a block job's progress.
type Job struct {
	ID string
	// Progress, if set, is called with the bytes done and the total.
	Progress func(done, total int64)
	// Pivot, if set, is how the job is completed once ready (an active
	// commit): see Pivot. Without it, job-complete is sent at once.
	Pivot *Pivot
}

// RunJob starts a block job (block-commit, block-stream, ...: command with
// args, which must include "job-id": job.ID) and waits until it is over.
// Events are subscribed to before the job starts, so none is missed. A
// job that becomes ready (an active commit) is completed, through
// job.Pivot if set. If ctx ends before that, the job is cancelled and
// RunJob waits for QEMU to confirm before returning; the pivot itself
// (milliseconds) is not cut short.
func (m *Monitor) RunJob(ctx context.Context, job Job, command string, args map[string]any) error {
	evCtx, stop := context.WithCancel(context.Background())
	defer stop()
	events, err := m.Events(evCtx)
	if err != nil {
		return err
	}
	// Commands inside the job's life must not be cut by ctx: a reply lost
	// mid-way closes the connection. ctx's end is handled by job-cancel.
	bg := context.WithoutCancel(ctx)
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := m.Execute(bg, command, args, nil); err != nil {
		return err
	}
	// The job runs in the device model from here, with or without us.
	crashpoint.Within(ctx, "job-started")
	tick := time.NewTicker(progressEvery)
	defer tick.Stop()
	cancelled := false
	done := ctx.Done()
	for {
		select {
		case ev, ok := <-events:
			if !ok {
				return m.closeErr()
			}
			if id, _ := ev.Data["device"].(string); id != job.ID {
				if id2, _ := ev.Data["id"].(string); id2 != job.ID {
					continue
				}
			}
			switch ev.Event {
			case "BLOCK_JOB_READY":
				if job.Pivot != nil {
					return m.pivot(ctx, job.ID, job.Pivot, events)
				}
				if err := m.Execute(bg, "job-complete", map[string]any{"id": job.ID}, nil); err != nil {
					return err
				}
			case "BLOCK_JOB_COMPLETED":
				if cancelled {
					return ctx.Err()
				}
				if msg, ok := ev.Data["error"].(string); ok {
					return fmt.Errorf("%w %s: %s", ErrJobFailed, job.ID, msg)
				}
				if job.Progress != nil {
					total := int64(num(ev.Data["len"]))
					job.Progress(total, total)
				}
				return nil
			case "BLOCK_JOB_CANCELLED":
				if cancelled {
					return ctx.Err()
				}
				return fmt.Errorf("%w: %s", ErrJobCancelled, job.ID)
			}
		case <-tick.C:
			if job.Progress == nil || cancelled {
				continue
			}
			var jobs []struct {
				ID      string `json:"id"`
				Current int64  `json:"current-progress"`
				Total   int64  `json:"total-progress"`
			}
			if err := m.Execute(bg, "query-jobs", nil, &jobs); err != nil {
				return err
			}
			for _, j := range jobs {
				if j.ID == job.ID {
					job.Progress(j.Current, j.Total)
				}
			}
		case <-done:
			cancelled, done = true, nil
			// The cancel must reach QEMU even though ctx is over.
			if err := m.Execute(bg, "job-cancel", map[string]any{"id": job.ID}, nil); err != nil {
				return errors.Join(ctx.Err(), err)
			}
		}
	}
}

func num(v any) float64 {
	f, _ := v.(float64)
	return f
}

package storage

import "context"

// Progress reports a long step (a merge) as it runs: the operation, the
// disk, the image being written and the percentage done.
type Progress func(op, disk, image string, percent float64)

type progressKey struct{}

// WithProgress makes long steps run under ctx report to fn.
func WithProgress(ctx context.Context, fn Progress) context.Context {
	return context.WithValue(ctx, progressKey{}, fn)
}

// progressFor returns the per-step callback for a step, or nil.
func progressFor(ctx context.Context, op string, st step) func(float64) {
	fn, _ := ctx.Value(progressKey{}).(Progress)
	if fn == nil {
		return nil
	}
	return func(p float64) { fn(op, st.Disk, st.Path, p) }
}

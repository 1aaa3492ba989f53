package qemuimg

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"

	"github.com/xlsnap/xlsnap/errdefs"
)

// ErrDiffer is a compare whose images hold different data.
var ErrDiffer = fmt.Errorf("qemuimg: %w: the images differ", errdefs.ErrInvalidArg)

// SameLayer reports whether two images of one format hold the same data
// in themselves, their backing files left out (backing=null: a copy of a
// layer is compared with the layer, not with what either header names):
// the same guest-visible data (qemu-img compare) and the same clusters
// present in the layer (qemu-img map), since a cluster absent from a copy
// would read its backing file where the layer reads its own. Holes a
// sparse copy made in the file do not count (compare's strict mode
// would). Both are opened read-only and shared (-U), as a running domain
// may hold them, on json: specifications that name every driver, so
// nothing is probed. It returns nil when they match, ErrDiffer
// (VIR_ERR_INVALID_ARG 8) when they do not, and qemu-img's *Error when a
// run failed.
func (r *Runner) SameLayer(ctx context.Context, a, b, format string) error {
	if err := validate(a, format); err != nil {
		return err
	}
	if err := validatePath(b); err != nil {
		return err
	}
	sa, err := layerSpec(a, format)
	if err != nil {
		return err
	}
	sb, err := layerSpec(b, format)
	if err != nil {
		return err
	}
	_, err = r.run(ctx, []string{"compare", "-U", "-q", "-f", format, "-F", format, sa, sb}, nil)
	var e *Error
	if errors.As(err, &e) && e.ExitCode == 1 {
		return fmt.Errorf("%w: %s and %s hold different data", ErrDiffer, a, b)
	}
	if err != nil {
		return err
	}
	pa, err := r.present(ctx, sa, format)
	if err != nil {
		return err
	}
	pb, err := r.present(ctx, sb, format)
	if err != nil {
		return err
	}
	if !slices.Equal(pa, pb) {
		return fmt.Errorf("%w: %s and %s hold different clusters", ErrDiffer, a, b)
	}
	return nil
}

// layerSpec is a json: specification of one layer alone: its driver and
// its file's named, its backing file left out.
func layerSpec(p, format string) (string, error) {
	o := map[string]any{"driver": format, "file": map[string]any{"driver": "file", "filename": p}}
	if format != "raw" {
		o["backing"] = nil
	}
	js, err := json.Marshal(o)
	return "json:" + string(js), err
}

// present lists the ranges the layer itself holds ([start, end) pairs,
// adjacent ones joined), from qemu-img map.
func (r *Runner) present(ctx context.Context, spec, format string) ([][2]int64, error) {
	out, err := r.run(ctx, []string{"map", "-U", "--output=json", "-f", format, spec}, nil)
	if err != nil {
		return nil, err
	}
	var m []struct {
		Start   int64 `json:"start"`
		Length  int64 `json:"length"`
		Present bool  `json:"present"`
	}
	if err := json.Unmarshal(out, &m); err != nil {
		return nil, fmt.Errorf("%w: qemu-img map: %v", errdefs.ErrOperationFailed, err)
	}
	var ranges [][2]int64
	for _, e := range m {
		if !e.Present {
			continue
		}
		if n := len(ranges); n > 0 && ranges[n-1][1] == e.Start {
			ranges[n-1][1] += e.Length
			continue
		}
		ranges = append(ranges, [2]int64{e.Start, e.Start + e.Length})
	}
	return ranges, nil
}

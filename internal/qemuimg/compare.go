package qemuimg

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"

	"github.com/xlsnap/xlsnap/errdefs"
)

// ErrDiffer is a compare whose images hold different data.
var ErrDiffer = fmt.Errorf("qemuimg: %w: the images differ", errdefs.ErrInvalidArg)

// SameLayer reports whether two images of one format hold the same data
// in themselves, their backing files left out (backing=null: a copy of a
// layer is compared with the layer, not with what either header names):
// qemu-img compare on json: specifications, strict about allocation
// too (-s: a hole in the copy would read the backing file), both
// opened read-only and shared (-U), as a running domain may hold them.
// It returns nil when they match, ErrDiffer (VIR_ERR_INVALID_ARG 8)
// when they do not, and qemu-img's *Error when the compare failed.
func (r *Runner) SameLayer(ctx context.Context, a, b, format string) error {
	if err := validate(a, format); err != nil {
		return err
	}
	if err := validatePath(b); err != nil {
		return err
	}
	// json: names the driver of each image and of its file, so nothing
	// is probed, and is the one syntax with a null backing.
	spec := func(p string) (string, error) {
		o := map[string]any{"driver": format, "file": map[string]any{"driver": "file", "filename": p}}
		if format != "raw" {
			o["backing"] = nil
		}
		js, err := json.Marshal(o)
		return "json:" + string(js), err
	}
	sa, err := spec(a)
	if err != nil {
		return err
	}
	sb, err := spec(b)
	if err != nil {
		return err
	}
	_, err = r.run(ctx, []string{"compare", "-U", "-q", "-s", "-f", format, "-F", format, sa, sb}, nil)
	var e *Error
	if errors.As(err, &e) && e.ExitCode == 1 {
		return fmt.Errorf("%w: %s and %s", ErrDiffer, a, b)
	}
	return err
}

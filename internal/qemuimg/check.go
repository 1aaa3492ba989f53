package qemuimg

import (
	"context"
	"encoding/json"
	"fmt"
)

// CheckResult is qemu-img check --output=json.
type CheckResult struct {
	Filename           string `json:"filename"`
	Format             string `json:"format"`
	CheckErrors        int64  `json:"check-errors"`
	Corruptions        int64  `json:"corruptions"`
	Leaks              int64  `json:"leaks"`
	CorruptionsFixed   int64  `json:"corruptions-fixed"`
	LeaksFixed         int64  `json:"leaks-fixed"`
	ImageEndOffset     int64  `json:"image-end-offset"`
	TotalClusters      int64  `json:"total-clusters"`
	AllocatedClusters  int64  `json:"allocated-clusters"`
	FragmentedClusters int64  `json:"fragmented-clusters"`
	CompressedClusters int64  `json:"compressed-clusters"`
}

// RepairLeaks runs qemu-img check -r leaks: it frees clusters no table
// references (what a killed commit or rebase leaves), and never touches
// what a table does reference. The image must not be in use.
func (r *Runner) RepairLeaks(ctx context.Context, path, format string) (CheckResult, error) {
	return r.check(ctx, path, format, "-r", "leaks")
}

// Check runs qemu-img check. If the image has corruptions or leaks it returns
// the parsed result together with an *Error that unwraps to ErrCheckFailed;
// any other error means the check itself could not be done.
func (r *Runner) Check(ctx context.Context, path, format string) (CheckResult, error) {
	return r.check(ctx, path, format, "-U")
}

// check runs qemu-img check with extra options and parses its report.
func (r *Runner) check(ctx context.Context, path, format string, opts ...string) (CheckResult, error) {
	if err := validate(path, format); err != nil {
		return CheckResult{}, err
	}
	args := append(append([]string{"check", "--output=json"}, opts...), "-f", format, path)
	out, err := r.run(ctx, args, nil)
	var res CheckResult
	if jerr := json.Unmarshal(out, &res); jerr != nil {
		if err != nil {
			return CheckResult{}, err
		}
		return CheckResult{}, fmt.Errorf("qemuimg: parse check output: %w", jerr)
	}
	return res, err
}

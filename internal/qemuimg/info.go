package qemuimg

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
)

// ImageInfo is one image from qemu-img info --output=json.
type ImageInfo struct {
	Filename              string          `json:"filename"`
	Format                string          `json:"format"`
	VirtualSize           int64           `json:"virtual-size"`
	ActualSize            int64           `json:"actual-size"`
	ClusterSize           int64           `json:"cluster-size"`
	BackingFilename       string          `json:"backing-filename"`
	FullBackingFilename   string          `json:"full-backing-filename"`
	BackingFilenameFormat string          `json:"backing-filename-format"`
	DirtyFlag             bool            `json:"dirty-flag"`
	Encrypted             bool            `json:"encrypted"`
	Snapshots             []SnapshotInfo  `json:"snapshots"`
	FormatSpecific        *FormatSpecific `json:"format-specific"`
}

// SnapshotInfo is an internal snapshot.
type SnapshotInfo struct {
	ID          string `json:"id"`
	Name        string `json:"name"`
	VMStateSize int64  `json:"vm-state-size"`
	DateSec     int64  `json:"date-sec"`
	DateNsec    int64  `json:"date-nsec"`
	VMClockSec  int64  `json:"vm-clock-sec"`
	VMClockNsec int64  `json:"vm-clock-nsec"`
	ICount      *int64 `json:"icount"` // absent when not recorded
}

// FormatSpecific holds driver-specific info; Data is decoded for qcow2.
type FormatSpecific struct {
	Type string             `json:"type"`
	Data FormatSpecificData `json:"data"`
}

// FormatSpecificData is the qcow2 "data" object. Fields a compat=0.10 image
// lacks (e.g. lazy-refcounts) are left zero.
type FormatSpecificData struct {
	Compat          string `json:"compat"`
	CompressionType string `json:"compression-type"`
	LazyRefcounts   bool   `json:"lazy-refcounts"`
	RefcountBits    int    `json:"refcount-bits"`
	Corrupt         bool   `json:"corrupt"`
	ExtendedL2      bool   `json:"extended-l2"`
	DataFile        string `json:"data-file"`
	DataFileRaw     bool   `json:"data-file-raw"`
}

// Info runs qemu-img info. With backingChain it returns the image followed by
// its backing files, otherwise exactly one element. -U lets it read images
// that a running VM has locked.
func (r *Runner) Info(ctx context.Context, path, format string, backingChain bool) ([]ImageInfo, error) {
	if err := validate(path, format); err != nil {
		return nil, err
	}
	args := []string{"info", "--output=json", "-U", "-f", format}
	if backingChain {
		args = append(args, "--backing-chain")
	}
	out, err := r.run(ctx, append(args, path), nil)
	if err != nil {
		return nil, err
	}
	// qemu-img prints an array only with --backing-chain.
	if out = bytes.TrimSpace(out); len(out) > 0 && out[0] == '[' {
		var infos []ImageInfo
		if err := json.Unmarshal(out, &infos); err != nil {
			return nil, fmt.Errorf("qemuimg: parse info output: %w", err)
		}
		return infos, nil
	}
	var info ImageInfo
	if err := json.Unmarshal(out, &info); err != nil {
		return nil, fmt.Errorf("qemuimg: parse info output: %w", err)
	}
	return []ImageInfo{info}, nil
}

// SnapshotList returns the image's internal snapshots (nil if none).
func (r *Runner) SnapshotList(ctx context.Context, path, format string) ([]SnapshotInfo, error) {
	infos, err := r.Info(ctx, path, format, false)
	if err != nil {
		return nil, err
	}
	return infos[0].Snapshots, nil
}

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

// Check runs qemu-img check. If the image has corruptions or leaks it returns
// the parsed result together with an *Error that unwraps to ErrCheckFailed;
// any other error means the check itself could not be done.
func (r *Runner) Check(ctx context.Context, path, format string) (CheckResult, error) {
	if err := validate(path, format); err != nil {
		return CheckResult{}, err
	}
	out, err := r.run(ctx, []string{"check", "--output=json", "-U", "-f", format, path}, nil)
	var res CheckResult
	if jerr := json.Unmarshal(out, &res); jerr != nil {
		if err != nil {
			return CheckResult{}, err
		}
		return CheckResult{}, fmt.Errorf("qemuimg: parse check output: %w", jerr)
	}
	return res, err
}

// MeasureResult is qemu-img measure --output=json, in bytes.
type MeasureResult struct {
	Required       int64 `json:"required"`
	FullyAllocated int64 `json:"fully-allocated"`
}

// Measure reports the size a conversion of path to outFormat would need.
func (r *Runner) Measure(ctx context.Context, path, format, outFormat string) (MeasureResult, error) {
	if err := validate(path, format); err != nil {
		return MeasureResult{}, err
	}
	if err := validateFormat(outFormat); err != nil {
		return MeasureResult{}, err
	}
	out, err := r.run(ctx, []string{"measure", "--output=json", "-f", format, "-O", outFormat, path}, nil)
	if err != nil {
		return MeasureResult{}, err
	}
	var res MeasureResult
	if err := json.Unmarshal(out, &res); err != nil {
		return MeasureResult{}, fmt.Errorf("qemuimg: parse measure output: %w", err)
	}
	return res, nil
}

// MapEntry is one extent from qemu-img map --output=json.
type MapEntry struct {
	Start   int64  `json:"start"`
	Length  int64  `json:"length"`
	Depth   int    `json:"depth"` // 0 is the image itself, 1 its backing file, ...
	Present bool   `json:"present"`
	Zero    bool   `json:"zero"`
	Data    bool   `json:"data"`
	Offset  *int64 `json:"offset"` // host offset, absent when not mappable
}

// Map returns the allocation map of path and its backing chain.
func (r *Runner) Map(ctx context.Context, path, format string) ([]MapEntry, error) {
	if err := validate(path, format); err != nil {
		return nil, err
	}
	out, err := r.run(ctx, []string{"map", "--output=json", "-f", format, path}, nil)
	if err != nil {
		return nil, err
	}
	var entries []MapEntry
	if err := json.Unmarshal(out, &entries); err != nil {
		return nil, fmt.Errorf("qemuimg: parse map output: %w", err)
	}
	return entries, nil
}

// AllocatedBytes returns the guest bytes holding data in path's own layer,
// excluding its backing files; use it to compare the cost of merge directions.
func (r *Runner) AllocatedBytes(ctx context.Context, path, format string) (int64, error) {
	entries, err := r.Map(ctx, path, format)
	if err != nil {
		return 0, err
	}
	var n int64
	for _, e := range entries {
		if e.Data && e.Depth == 0 {
			n += e.Length
		}
	}
	return n, nil
}

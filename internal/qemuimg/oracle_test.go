package qemuimg

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
)

// qemu-img info is the tests' oracle for what the runner's operations
// did; xlsnap itself reads images natively (package chain).

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

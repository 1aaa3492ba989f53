package qemuimg

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"
)

// CreateOptions describes a new image for Runner.Create.
type CreateOptions struct {
	Path   string
	Format string
	// Size in bytes. With Backing set, 0 inherits the backing image's size.
	Size          int64
	Backing       string // optional backing file, stored in the image as given
	BackingFormat string // required when Backing is set
	// Options are passed with -o, e.g. {"compat": "0.10", "cluster_size": "65536"}.
	Options map[string]string
}

// Create runs qemu-img create.
func (r *Runner) Create(ctx context.Context, o CreateOptions) error {
	if err := validate(o.Path, o.Format); err != nil {
		return err
	}
	if o.Size < 0 {
		return fmt.Errorf("%w: negative size %d", ErrInvalidArg, o.Size)
	}
	args := []string{"create", "-f", o.Format}
	if o.Backing != "" {
		if err := validate(o.Backing, o.BackingFormat); err != nil {
			return fmt.Errorf("backing: %w", err)
		}
		args = append(args, "-b", o.Backing, "-F", o.BackingFormat)
	}
	if len(o.Options) > 0 {
		opts, err := encodeOptions(o.Options)
		if err != nil {
			return err
		}
		args = append(args, "-o", opts)
	}
	args = append(args, o.Path)
	if o.Backing == "" || o.Size > 0 {
		args = append(args, strconv.FormatInt(o.Size, 10))
	}
	_, err := r.run(ctx, args, nil)
	return err
}

// encodeOptions builds a deterministic -o string; qemu escapes ',' in values as ",,".
func encodeOptions(m map[string]string) (string, error) {
	parts := make([]string, 0, len(m))
	for _, k := range slices.Sorted(maps.Keys(m)) {
		if k == "" || strings.ContainsAny(k, ",=") {
			return "", fmt.Errorf("%w: option name %q", ErrInvalidArg, k)
		}
		parts = append(parts, k+"="+strings.ReplaceAll(m[k], ",", ",,"))
	}
	return strings.Join(parts, ","), nil
}

// CommitOptions describes a Runner.Commit.
type CommitOptions struct {
	Path   string
	Format string
	// Base selects the image in Path's backing chain to commit into; default is
	// the immediate backing file. qemu-img implies Drop when Base is set.
	Base string
	// Drop skips emptying Path after the commit (-d).
	Drop bool
	// Progress, if set, receives percentages 0..100 from qemu-img -p.
	Progress func(percent float64)
}

// Commit runs qemu-img commit, writing Path's data into its backing chain.
// The backing format comes from Path's header, so images must record it.
func (r *Runner) Commit(ctx context.Context, o CommitOptions) error {
	if err := validate(o.Path, o.Format); err != nil {
		return err
	}
	args := []string{"commit", "-f", o.Format}
	if o.Base != "" {
		if err := validatePath(o.Base); err != nil {
			return fmt.Errorf("base: %w", err)
		}
		args = append(args, "-b", o.Base)
	}
	if o.Drop {
		args = append(args, "-d")
	}
	if o.Progress != nil {
		args = append(args, "-p")
	}
	_, err := r.run(ctx, append(args, o.Path), o.Progress)
	return err
}

// RebaseOptions describes a Runner.Rebase.
type RebaseOptions struct {
	Path   string
	Format string
	// Backing is the new backing file; "" removes it, copying the old backing
	// data into Path unless Unsafe.
	Backing       string
	BackingFormat string // required when Backing is set
	// Unsafe only rewrites the header (-u); the caller guarantees the contents match.
	Unsafe   bool
	Progress func(percent float64)
}

// Rebase runs qemu-img rebase.
func (r *Runner) Rebase(ctx context.Context, o RebaseOptions) error {
	if err := validate(o.Path, o.Format); err != nil {
		return err
	}
	args := []string{"rebase", "-f", o.Format}
	if o.Unsafe {
		args = append(args, "-u")
	}
	if o.Progress != nil {
		args = append(args, "-p")
	}
	args = append(args, "-b", o.Backing)
	if o.Backing != "" {
		if err := validate(o.Backing, o.BackingFormat); err != nil {
			return fmt.Errorf("backing: %w", err)
		}
		args = append(args, "-F", o.BackingFormat)
	}
	_, err := r.run(ctx, append(args, o.Path), o.Progress)
	return err
}

// SnapshotCreate creates an internal snapshot.
func (r *Runner) SnapshotCreate(ctx context.Context, path, format, name string) error {
	return r.snapshot(ctx, "-c", path, format, name)
}

// SnapshotApply reverts the image to an internal snapshot. qemu-img looks
// name up as a snapshot ID first, then as a name.
func (r *Runner) SnapshotApply(ctx context.Context, path, format, name string) error {
	return r.snapshot(ctx, "-a", path, format, name)
}

// SnapshotDelete deletes an internal snapshot, matched like SnapshotApply.
func (r *Runner) SnapshotDelete(ctx context.Context, path, format, name string) error {
	return r.snapshot(ctx, "-d", path, format, name)
}

// snapshot uses --image-opts because qemu-img snapshot has no -f and would
// otherwise probe the format.
func (r *Runner) snapshot(ctx context.Context, op, path, format, name string) error {
	if err := validate(path, format); err != nil {
		return err
	}
	if name == "" {
		return fmt.Errorf("%w: empty snapshot name", ErrInvalidArg)
	}
	opts := "driver=" + format + ",file.filename=" + strings.ReplaceAll(path, ",", ",,")
	_, err := r.run(ctx, []string{"snapshot", "--image-opts", op, name, opts}, nil)
	return err
}

// ConvertOptions describes a Runner.Convert.
type ConvertOptions struct {
	Src, SrcFormat string
	// Snapshot reads Src as it was at this internal snapshot (by name).
	Snapshot       string
	Dst, DstFormat string
	// Backing makes Dst an overlay of Backing; only what Src's top layer
	// holds is copied, so Backing must show what Src's backing shows.
	Backing, BackingFormat string
	Progress               func(percent float64)
}

// Convert runs qemu-img convert into a new image.
func (r *Runner) Convert(ctx context.Context, o ConvertOptions) error {
	if err := validate(o.Src, o.SrcFormat); err != nil {
		return fmt.Errorf("source: %w", err)
	}
	if err := validate(o.Dst, o.DstFormat); err != nil {
		return err
	}
	args := []string{"convert", "-f", o.SrcFormat, "-O", o.DstFormat}
	if o.Snapshot != "" {
		args = append(args, "-l", "snapshot.name="+strings.ReplaceAll(o.Snapshot, ",", ",,"))
	}
	if o.Backing != "" {
		if err := validate(o.Backing, o.BackingFormat); err != nil {
			return fmt.Errorf("backing: %w", err)
		}
		args = append(args, "-B", o.Backing, "-F", o.BackingFormat)
	}
	if o.Progress != nil {
		args = append(args, "-p")
	}
	_, err := r.run(ctx, append(args, o.Src, o.Dst), o.Progress)
	return err
}

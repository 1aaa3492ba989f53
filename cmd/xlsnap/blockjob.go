package main

import (
	"context"
	"fmt"
	"io"

	"github.com/spf13/cobra"

	"github.com/xlsnap/xlsnap/driver"
	"github.com/xlsnap/xlsnap/errdefs"
	"github.com/xlsnap/xlsnap/storage"
)

// virsh's blockcommit and blockpull (tools/virsh-domain.c: cmdBlockcommit,
// cmdBlockpull): the same options, checks and lines. xlsnap runs every
// job to its end before the command returns (it keeps no job behind a
// process), so --wait changes only what is printed: without it the line
// of a job started, as virsh prints it; with it virsh's line for a job
// done. An active commit ends with the pivot: --active needs --pivot.

// blockJobOpts are the options the two commands share.
type blockJobOpts struct {
	domain, path, base          string
	wait, verbose, async, bytes bool
	keepRelative                bool
	bandwidth, timeout          uint64
}

func (o *blockJobOpts) register(cmd *cobra.Command, baseHelp string) {
	f := cmd.Flags()
	f.StringVar(&o.path, "path", "", "the disk: its target (xvda) or its active image's path")
	f.StringVar(&o.base, "base", "", baseHelp)
	f.Uint64Var(&o.bandwidth, "bandwidth", 0, "bandwidth limit in MiB/s (not supported: 0 only)")
	f.BoolVar(&o.bytes, "bytes", false, "the bandwidth limit is in bytes/s rather than MiB/s")
	f.BoolVar(&o.verbose, "verbose", false, "with --wait, display the progress on stderr, as virsh does")
	f.Uint64Var(&o.timeout, "timeout", 0, "abort if the job exceeds timeout seconds (not supported)")
	f.BoolVar(&o.async, "async", false, "with --wait, don't wait for cancel to finish (not supported)")
	f.BoolVar(&o.keepRelative, "keep-relative", false, "keep the backing chain relatively referenced (not supported: xlsnap writes absolute references)")
}

// unsupported refuses what virsh takes and xlsnap's jobs cannot do:
// a job cut short by a timeout (xlsnap would finish it at the next call
// instead of aborting it), a bandwidth limit, relative references.
func (o *blockJobOpts) unsupported(cmd *cobra.Command) error {
	for _, name := range []string{"timeout", "async", "keep-relative"} {
		if cmd.Flags().Changed(name) {
			return &cliError{msg: fmt.Sprintf("unsupported configuration: --%s: xlsnap runs each block job to its end", name),
				err: errdefs.ErrUnsupported}
		}
	}
	return nil
}

// progress is how the job reports: virsh's line with --verbose, else
// the --progress machinery of xlsnap's other merges.
func (a *app) blockProgress(cmd *cobra.Command, verbose bool, label string) (storage.Progress, func(), error) {
	if !verbose {
		p, err := a.progressFn(cmd)
		return p, func() {}, err
	}
	w := cmd.ErrOrStderr()
	last := -1
	p := func(op, disk, image string, percent float64) {
		// virsh's virshPrintJobProgress: never 100 before the end.
		n := min(int(percent), 99)
		if n != last {
			last = n
			fmt.Fprintf(w, "\r%s: [%3d %%]", label, n)
		}
	}
	return p, func() { fmt.Fprintf(w, "\r%s: [%3d %%]", label, 100) }, nil
}

// blockJobJSON is what blockcommit and blockpull print under --json.
type blockJobJSON struct {
	Domain  string   `json:"domain"`
	Disk    string   `json:"disk"`
	Top     string   `json:"top"`
	Base    string   `json:"base"`
	Active  string   `json:"active"`
	Chain   []string `json:"chain"`
	Removed []string `json:"removed"`
	Kept    []string `json:"kept"`
	Pivoted bool     `json:"pivoted"`
}

func blockJobToJSON(domain string, r *driver.BlockJobReport, pivoted bool) blockJobJSON {
	nonNil := func(s []string) []string {
		if s == nil {
			return []string{}
		}
		return s
	}
	return blockJobJSON{Domain: domain, Disk: r.Disk, Top: r.Top, Base: r.Base, Active: r.Active, Chain: nonNil(r.Chain),
		Removed: nonNil(r.Removed), Kept: nonNil(r.Kept), Pivoted: pivoted}
}

func (a *app) blockCommitCmd() *cobra.Command {
	var o blockJobOpts
	var top string
	var shallow, active, pivot, keepOverlay, del bool
	cmd := &cobra.Command{
		Use:   "blockcommit DOMAIN DISK [--base PATH] [--top PATH] [--shallow] [--active] [--pivot] [--wait] [--verbose]",
		Short: "Start a block commit operation.",
		Long: `Commit changes from a snapshot down to its backing image (virsh's blockcommit).

The data of --top (default: the active layer) and of every image between it
and --base (default: the bottom of the chain; with --shallow, top's backing
image) goes into base, and those images leave the disk's chain. On a shut-off
domain this is qemu-img commit; on a running one, a block job of its device
model. Refused, before anything changes, when base or an image leaving the
chain holds data a snapshot, another image or another domain reads.

Committing the active layer needs --pivot (or --active --pivot): the disk
then writes to base, and the definition names it. libvirt's --active without
--pivot leaves a job in its synchronized phase for a later blockjob; xlsnap
keeps no job past a command and refuses it, as it refuses --keep-overlay.
Images xlsnap created that leave the chain are removed once nothing uses
them; the user's stay. xlsnap runs the job to its end before it returns:
without --wait it prints virsh's "Block Commit started" all the same.`,
	}
	check := func() error {
		if err := exclusive(cmd, "pivot", "keep-overlay"); err != nil {
			return err
		}
		blocking := o.wait || pivot || keepOverlay || o.timeout > 0
		if !blocking && o.verbose {
			return usagef("--verbose requires at least one of --timeout, --wait, --pivot, or --keep-overlay")
		}
		if !blocking && o.async {
			return usagef("--async requires at least one of --timeout, --wait, --pivot, or --keep-overlay")
		}
		return o.unsupported(cmd)
	}
	a.domainCmd(cmd, &o.domain, []string{"path"}, func() []string { return []string{"path"} }, check, func(ctx context.Context, d *driver.Driver) error {
		if _, err := d.DomainKey(ctx, o.domain); err != nil {
			return err
		}
		if keepOverlay {
			return &cliError{msg: "unsupported configuration: --keep-overlay: xlsnap ends an active commit with the pivot only (use --pivot)",
				err: errdefs.ErrUnsupported}
		}
		if active && !pivot {
			return &cliError{msg: "unsupported configuration: --active without --pivot would leave the job in its synchronized phase for a later blockjob --pivot; " +
				"xlsnap keeps no job past a command: add --pivot", err: errdefs.ErrUnsupported}
		}
		var flags driver.BlockCommitFlags
		for _, b := range []struct {
			on   bool
			flag driver.BlockCommitFlags
		}{{shallow, driver.BlockCommitShallow}, {del, driver.BlockCommitDelete}, {active || pivot, driver.BlockCommitActive},
			{o.bytes, driver.BlockCommitBandwidthBytes}} {
			if b.on {
				flags |= b.flag
			}
		}
		p, done, err := a.blockProgress(cmd, o.verbose, "Block commit")
		if err != nil {
			return err
		}
		r, err := d.BlockCommit(storage.WithProgress(ctx, p), o.domain, o.path, o.base, top, o.bandwidth, flags)
		if err != nil {
			return err
		}
		done()
		w := cmd.OutOrStdout()
		if a.json {
			return writeJSON(w, blockJobToJSON(o.domain, r, pivot))
		}
		return blockJobLine(w, o.wait || pivot, map[bool]string{true: "Successfully pivoted", false: "Commit complete"}[pivot], "Block Commit started")
	})
	o.register(cmd, "path of base file to commit into (default bottom of chain)")
	f := cmd.Flags()
	f.StringVar(&top, "top", "", "path of top file to commit from (default top of chain)")
	f.BoolVar(&shallow, "shallow", false, "use backing file of top as base")
	f.BoolVar(&active, "active", false, "trigger two-stage active commit of top file (needs --pivot here)")
	f.BoolVar(&del, "delete", false, "delete files that were successfully committed (not supported: xlsnap removes its own images once unused)")
	f.BoolVar(&o.wait, "wait", false, "wait for job to complete (xlsnap always does: changes what is printed)")
	f.BoolVar(&pivot, "pivot", false, "implies --active --wait, pivot when commit is synced")
	f.BoolVar(&keepOverlay, "keep-overlay", false, "implies --active --wait, quit when commit is synced (not supported)")
	return cmd
}

func (a *app) blockPullCmd() *cobra.Command {
	var o blockJobOpts
	cmd := &cobra.Command{
		Use:   "blockpull DOMAIN DISK [--base PATH] [--wait] [--verbose]",
		Short: "Populate a disk from its backing image.",
		Long: `Populate a disk from its backing image (virsh's blockpull).

The data of every image below the disk's active layer, down to --base (which
becomes its backing image; without --base the whole chain, and the active
layer then stands alone), is copied into the active layer: qemu-img rebase on
a shut-off domain, a block-stream job of its device model on a running one.
What the guest reads does not change. The images that left the chain stay
while a snapshot or another user reads them; those xlsnap created that
nothing needs are removed, the user's kept. xlsnap runs the job to its end
before it returns: without --wait it prints virsh's "Block Pull started".`,
	}
	check := func() error {
		for _, opt := range []string{"verbose", "async"} {
			if cmd.Flags().Changed(opt) && !o.wait {
				return usagef("Option --wait is required by option --%s", opt)
			}
		}
		return o.unsupported(cmd)
	}
	a.domainCmd(cmd, &o.domain, []string{"path"}, func() []string { return []string{"path"} }, check, func(ctx context.Context, d *driver.Driver) error {
		if _, err := d.DomainKey(ctx, o.domain); err != nil {
			return err
		}
		p, done, err := a.blockProgress(cmd, o.verbose, "Block Pull")
		if err != nil {
			return err
		}
		ctx = storage.WithProgress(ctx, p)
		var r *driver.BlockJobReport
		if o.base != "" { // virsh calls virDomainBlockRebase then
			var flags driver.BlockRebaseFlags
			if o.bytes {
				flags |= driver.BlockRebaseBandwidthBytes
			}
			r, err = d.BlockRebase(ctx, o.domain, o.path, o.base, o.bandwidth, flags)
		} else {
			var flags driver.BlockPullFlags
			if o.bytes {
				flags |= driver.BlockPullBandwidthBytes
			}
			r, err = d.BlockPull(ctx, o.domain, o.path, o.bandwidth, flags)
		}
		if err != nil {
			return err
		}
		done()
		w := cmd.OutOrStdout()
		if a.json {
			return writeJSON(w, blockJobToJSON(o.domain, r, false))
		}
		return blockJobLine(w, o.wait, "Pull complete", "Block Pull started")
	})
	o.register(cmd, "path of backing file in chain for a partial pull")
	cmd.Flags().BoolVar(&o.wait, "wait", false, "wait for job to finish (xlsnap always does: changes what is printed)")
	return cmd
}

// blockJobLine prints virsh's closing line: for a job waited for, after
// the progress line's end ("\n%s"); for one started, alone; then the
// blank line virsh ends every command with.
func blockJobLine(w io.Writer, waited bool, done, started string) error {
	var err error
	if waited {
		_, err = fmt.Fprintf(w, "\n%s\n", done)
	} else {
		_, err = fmt.Fprintf(w, "%s\n", started)
	}
	return err
}

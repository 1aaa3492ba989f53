package main

import (
	"fmt"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/xlsnap/xlsnap/driver"
)

// holdJSON is chain-changing's output with --json (docs/json.md).
type holdJSON struct {
	Domain  string   `json:"domain"`
	Disk    string   `json:"disk"`
	ID      string   `json:"id"`
	Host    string   `json:"host"`
	Until   string   `json:"until"`
	Chain   []string `json:"chain"`
	Checked []string `json:"checked"`
}

// defaultHold is how long chain-changing holds a domain without
// --timeout: long enough to copy a large base, short enough that a
// toolstack that died mid-edit does not keep the domain for long.
const defaultHold = 600

// chainChangingCmd is the first phase of the two-phase hook (rescan is
// the second): the toolstack says what it is about to do to a disk's
// chain; xlsnap checks it and holds the domain until the rescan.
func (g *globals) chainChangingCmd() *cobra.Command {
	var moving, committing, pulling, rewriting []string
	var timeout int
	cmd := &cobra.Command{
		Use:   "chain-changing DOMAIN DISK [--moving OLD=NEW]... [--committing IMAGE]... [--pulling IMAGE]... [--rewriting IMAGE]... [--timeout SECONDS]",
		Short: "A disk's chain is about to be edited outside xlsnap: check the edit, hold the domain until rescan",
		Long: `Announce an edit of a disk's chain that the toolstack is about to make
itself, before it touches anything: xlsnap checks that the edit is safe for
the domain and everything else that reads the images, then holds the domain
until 'xlsnap rescan DOMAIN DISK' (the second phase, from any process or host
sharing the metadata) or until --timeout SECONDS pass (default 600, at most
86400). While held, every command that changes the domain waits; reads go on.

  --moving OLD=NEW   an image (or a folder of images) of the chain is copied
                     or moved to NEW
  --committing IMAGE IMAGE's data is committed into its backing image
                     (qemu-img commit), which then backs the image above
  --pulling IMAGE    IMAGE's data is pulled into the image above it (qemu-img
                     rebase of that image onto IMAGE's backing image)
  --rewriting IMAGE  IMAGE's header is rewritten in place (qemu-img amend,
                     rebase -u)

Refused, and nothing held: any change of a running domain's active layer (the
device model writes it) and every merge or header rewrite of a running
domain (merge with snapshot-delete, blockcommit or blockpull instead: they go
through the device model); a move or merge of a shut-off domain's active
layer; a merge or rewrite that would change what a snapshot, another image
or another domain reads; an image that is not in the disk's chain.`,
		Args: cobra.ExactArgs(2),
		RunE: g.withDriver(func(cmd *cobra.Command, d *driver.Driver, args []string) error {
			if timeout <= 0 {
				return usagef("timeout must be positive")
			}
			var plan driver.ChainEdit
			for _, m := range moving {
				from, to, ok := strings.Cut(m, "=")
				if !ok || from == "" || to == "" {
					return fmt.Errorf("%w: --moving %q: want OLD=NEW", driver.ErrInvalidArg, m)
				}
				plan.Moves = append(plan.Moves, driver.Move{From: from, To: to})
			}
			plan.Commits, plan.Pulls, plan.Rewrites = committing, pulling, rewriting
			h, err := d.ChainChanging(cmd.Context(), args[0], args[1], plan, time.Duration(timeout)*time.Second)
			if err != nil {
				return err
			}
			w := cmd.OutOrStdout()
			if g.json {
				return writeJSON(w, holdJSON{Domain: args[0], Disk: h.Disk, ID: h.ID, Host: h.Host,
					Until: h.Until.UTC().Format(time.RFC3339), Chain: orEmpty(h.Chain), Checked: orEmpty(h.Checked)})
			}
			for _, c := range h.Checked {
				fmt.Fprintf(w, "Checked: %s\n", c)
			}
			rescan := []string{"xlsnap", "rescan", args[0], h.Disk}
			for _, m := range moving {
				rescan = append(rescan, "--moved", m)
			}
			_, err = fmt.Fprintf(w, "Chain of disk %s of domain %s held until %s (hold %s); run '%s' when the edit is done\n",
				h.Disk, args[0], h.Until.UTC().Format(time.RFC3339), h.ID, strings.Join(rescan, " "))
			return err
		}),
	}
	cmd.Flags().StringArrayVar(&moving, "moving", nil, "an image or folder of the chain is copied or moved from OLD to NEW (repeatable)")
	cmd.Flags().StringArrayVar(&committing, "committing", nil, "IMAGE is committed into its backing image and leaves the chain (repeatable)")
	cmd.Flags().StringArrayVar(&pulling, "pulling", nil, "IMAGE is pulled into the image above it and leaves the chain (repeatable)")
	cmd.Flags().StringArrayVar(&rewriting, "rewriting", nil, "IMAGE's header is rewritten in place (repeatable)")
	cmd.Flags().IntVar(&timeout, "timeout", defaultHold, "release the hold after SECONDS if no rescan came")
	return cmd
}

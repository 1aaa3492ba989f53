package main

import (
	"fmt"
	"io"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/xlsnap/xlsnap/chain"
)

type chainLayerJSON struct {
	Path          string              `json:"path"`
	Format        string              `json:"format"`
	VirtualSize   uint64              `json:"virtual_size"`
	Backing       string              `json:"backing"`
	BackingFormat string              `json:"backing_format"`
	Snapshots     []chainSnapshotJSON `json:"snapshots"`
}

type chainSnapshotJSON struct {
	ID          string `json:"id"`
	Name        string `json:"name"`
	VMStateSize uint64 `json:"vm_state_size"`
	Date        string `json:"date"`
}

func (a *app) chainCmd() *cobra.Command {
	var (
		format string
		policy chain.Policy
	)
	cmd := &cobra.Command{
		Use:   "chain [--root DIR]... [--allow-probe] IMAGE",
		Short: "Print an image's backing chain, top to base, refusing unsafe references",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			policy.Snapshots = true // each layer's internal snapshots are printed
			c, err := chain.Walk(cmd.Context(), args[0], chain.Format(format), policy)
			if err != nil {
				return err
			}
			if a.json {
				return writeChainJSON(cmd.OutOrStdout(), c)
			}
			return writeChainText(cmd.OutOrStdout(), c)
		},
	}
	f := cmd.Flags()
	f.StringVar(&format, "format", "", "format of IMAGE (default: detected; backing formats are never guessed)")
	f.StringArrayVar(&policy.Roots, "root", nil, "folder backing files must resolve into (repeatable; default: IMAGE's folder)")
	f.BoolVar(&policy.AllowProbe, "allow-probe", false, "allow backing references that name no format")
	f.BoolVar(&policy.AllowProtocol, "allow-protocol", false, "allow json: and protocol backing references (the chain ends there)")
	f.BoolVar(&policy.AllowDataFile, "allow-data-file", false, "allow qcow2 external data files inside the roots")
	f.IntVar(&policy.MaxDepth, "max-depth", chain.DefaultMaxDepth, "refuse chains with more layers")
	f.Int64Var(&policy.MaxSnapshotBytes, "max-snapshot-bytes", chain.DefaultMaxSnapshotBytes, "refuse chains whose internal snapshot tables hold more bytes in all")
	return cmd
}

func writeChainJSON(w io.Writer, c *chain.Chain) error {
	layers := make([]chainLayerJSON, 0, len(c.Layers))
	for _, l := range c.Layers {
		j := chainLayerJSON{
			Path: l.Path, Format: l.Format.String(), VirtualSize: l.VirtualSize,
			Backing: l.BackingRef, BackingFormat: l.BackingFormat,
			Snapshots: []chainSnapshotJSON{},
		}
		for _, s := range l.Snapshots() {
			j.Snapshots = append(j.Snapshots, chainSnapshotJSON{ID: s.ID, Name: s.Name, VMStateSize: s.VMStateSize,
				Date: rfc3339(time.Unix(int64(s.DateSec), 0))})
		}
		layers = append(layers, j)
	}
	return writeJSON(w, layers)
}

func writeChainText(w io.Writer, c *chain.Chain) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	for i, l := range c.Layers {
		fmt.Fprintf(tw, "%d\t%s\n", i, l.Path)
		fmt.Fprintf(tw, "\tformat:\t%s\n", l.Format)
		fmt.Fprintf(tw, "\tvirtual size:\t%d\n", l.VirtualSize)
		if l.BackingRef != "" {
			fmt.Fprintf(tw, "\tbacking:\t%s (%s)\n", l.BackingRef, orNone(l.BackingFormat))
		}
		for _, s := range l.Snapshots() {
			fmt.Fprintf(tw, "\tsnapshot:\t%s %s vm-state=%d %s\n", s.ID, s.Name, s.VMStateSize,
				time.Unix(int64(s.DateSec), 0).UTC().Format(time.RFC3339))
		}
	}
	return tw.Flush()
}

func orNone(s string) string {
	if s == "" {
		return "format not given"
	}
	return s
}

package main

import (
	"context"
	"encoding/xml"
	"fmt"
	"strings"

	"github.com/spf13/cobra"

	"github.com/xlsnap/xlsnap/driver"
	"github.com/xlsnap/xlsnap/storage"
)

func (a *app) domblklistCmd() *cobra.Command {
	var domain string
	var details bool
	cmd := &cobra.Command{Use: "domblklist DOMAIN [--details] [--inactive]", Short: "List a domain's disks and their active images"}
	a.domainCmd(cmd, &domain, nil, nil, nil, func(ctx context.Context, d *driver.Driver) error {
		// DiskList first: it finishes what a crash left, so the
		// definition read below is the one that stands.
		disks, err := d.DiskList(ctx, domain)
		if err != nil {
			return err
		}
		if a.json {
			return writeJSON(cmd.OutOrStdout(), blocksToJSON(disks))
		}
		rows, err := a.diskRows(ctx, domain, details)
		if err != nil {
			return err
		}
		if len(disks) > 0 && disks[0].Pending != "" {
			fmt.Fprintf(cmd.ErrOrStderr(), "note: %s\n", disks[0].Pending)
		}
		header := []string{"Target", "Source"}
		if details {
			header = []string{"Type", "Device", "Target", "Source"}
		}
		return writeTable(cmd.OutOrStdout(), header, rows)
	})
	cmd.Flags().BoolVar(&details, "details", false, "add each disk's type and device")
	// xlsnap reads and keeps the persistent definition only; the live
	// one of an active domain names the same images.
	cmd.Flags().Bool("inactive", false, "the persistent definition (what xlsnap always reads)")
	return cmd
}

// definedDisk is what domblklist shows of a disk of the definition: all
// of them, as virsh shows them, not only the file disks xlsnap snapshots.
type definedDisk struct {
	Type   string `xml:"type,attr"`
	Device string `xml:"device,attr"`
	Source struct {
		File   string `xml:"file,attr"`
		Dev    string `xml:"dev,attr"`
		Dir    string `xml:"dir,attr"`
		Name   string `xml:"name,attr"`
		Volume string `xml:"volume,attr"`
	} `xml:"source"`
	Target struct {
		Dev string `xml:"dev,attr"`
	} `xml:"target"`
}

// diskRows reads the domain's definition from the source and makes
// domblklist's rows: a disk without a source shows "-", as in virsh.
func (a *app) diskRows(ctx context.Context, domain string, details bool) ([][]string, error) {
	src, _, done, err := a.source()
	if err != nil {
		return nil, err
	}
	defer done()
	sd, err := src.Domain(ctx, domain)
	if err != nil {
		return nil, err
	}
	var def struct {
		Disks []definedDisk `xml:"devices>disk"`
	}
	if err := xml.Unmarshal([]byte(sd.XML), &def); err != nil {
		return nil, fmt.Errorf("%w: domain XML: %w", driver.ErrXML, err)
	}
	var rows [][]string
	for _, dk := range def.Disks {
		source := "-"
		for _, s := range []string{dk.Source.File, dk.Source.Dev, dk.Source.Dir, dk.Source.Name, dk.Source.Volume} {
			if s != "" {
				source = s
				break
			}
		}
		row := []string{dk.Target.Dev, source}
		if details {
			// libvirt's defaults for a definition that leaves them out.
			kind, device := dk.Type, dk.Device
			if kind == "" {
				kind = "file"
			}
			if device == "" {
				device = "disk"
			}
			row = append([]string{kind, device}, row...)
		}
		rows = append(rows, row)
	}
	return rows, nil
}

func (g *globals) checkCmd() *cobra.Command {
	var repair, restore, force bool
	cmd := &cobra.Command{Use: "check [--repair | --restore [--force]]", Short: "Compare metadata with the disks (and mend what is safe)", Args: cobra.NoArgs}
	check := g.withDriver(func(cmd *cobra.Command, d *driver.Driver, args []string) error {
		problems, err := d.Check(cmd.Context(), repair)
		if err != nil {
			return err
		}
		w := cmd.OutOrStdout()
		if g.json {
			if err := writeJSON(w, problemsToJSON(problems)); err != nil {
				return err
			}
		} else {
			for _, p := range problems {
				state := ""
				if p.Fixed && p.Note != "" {
					state = " [fixed: " + p.Note + "]"
				} else if p.Fixed {
					state = " [fixed]"
				} else if p.Note != "" {
					state = " [" + p.Note + "]"
				}
				fmt.Fprintf(w, "%s %s %s %s: %s%s\n", p.Kind, p.Domain, p.Disk, p.Path, p.Detail, state)
			}
		}
		n := 0
		for _, p := range problems {
			if !p.Fixed && !p.Kind.Informational() {
				n++
			}
		}
		if n > 0 {
			return problemsFound{n}
		}
		if !g.json {
			fmt.Fprintln(w, "no problems found")
		}
		return nil
	})
	cmd.RunE = func(cmd *cobra.Command, args []string) error {
		if restore {
			return g.restore(cmd, force)
		}
		if force {
			return fmt.Errorf("%w: --force goes with --restore", driver.ErrInvalidArg)
		}
		return check(cmd, args)
	}
	cmd.Flags().BoolVar(&repair, "repair", false, "finish pending operations and rescan changed chains (no image is removed)")
	cmd.Flags().BoolVar(&restore, "restore", false, "put back the copy of a damaged metadata store kept after the last operation (the damaged file is kept)")
	cmd.Flags().BoolVar(&force, "force", false, "with --restore: replace the store even if it is not damaged")
	cmd.MarkFlagsMutuallyExclusive("repair", "restore")
	return cmd
}

// restore runs without the driver: opening it fails on a damaged store.
func (g *globals) restore(cmd *cobra.Command, force bool) error {
	r, err := storage.RestoreStore(cmd.Context(), g.stateDir, force)
	if err != nil {
		return err
	}
	w := cmd.OutOrStdout()
	if g.json {
		return writeJSON(w, restoreJSON{Store: r.Store, Backup: r.Backup, SetAside: r.SetAside, Reason: r.Reason})
	}
	fmt.Fprintf(w, "Reason: %s\n", r.Reason)
	if r.SetAside != "" {
		fmt.Fprintf(w, "Kept the replaced store as %s\n", r.SetAside)
	}
	fmt.Fprintf(w, "Restored %s from %s (the state after the last committed operation)\n", r.Store, r.Backup)
	fmt.Fprintln(w, "Run xlsnap check: an operation after that copy may have left images no record names")
	return nil
}

func (g *globals) rescanCmd() *cobra.Command {
	var moved []string
	cmd := &cobra.Command{
		Use: "rescan DOMAIN DISK [--moved OLD=NEW]...", Short: "A disk's chain changed outside xlsnap: rescan it", Args: cobra.ExactArgs(2),
		RunE: g.withDriver(func(cmd *cobra.Command, d *driver.Driver, args []string) error {
			var moves []driver.Move
			for _, m := range moved {
				from, to, ok := strings.Cut(m, "=")
				if !ok || from == "" || to == "" {
					return fmt.Errorf("%w: --moved %q: want OLD=NEW", driver.ErrInvalidArg, m)
				}
				moves = append(moves, driver.Move{From: from, To: to})
			}
			if err := d.ChainChanged(cmd.Context(), args[0], args[1], moves...); err != nil {
				return err
			}
			disks, err := d.DiskList(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			if g.json {
				return writeJSON(cmd.OutOrStdout(), blocksToJSON(disks))
			}
			_, err = fmt.Fprintf(cmd.OutOrStdout(), "Domain %s disk %s rescanned\n", args[0], args[1])
			return err
		}),
	}
	cmd.Flags().StringArrayVar(&moved, "moved", nil, "an image of the chain was moved from OLD to NEW (repeatable); snapshot records follow")
	return cmd
}

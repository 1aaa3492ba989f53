package main

import (
	"fmt"

	"github.com/spf13/cobra"

	"github.com/xlsnap/xlsnap/driver"
	"github.com/xlsnap/xlsnap/errdefs"
	"github.com/xlsnap/xlsnap/storage"
)

// coalesceJSON is coalesce.
type coalesceJSON struct {
	DryRun bool        `json:"dry_run"`
	Merges []mergeJSON `json:"merges"`
}

// mergeJSON is one layer merged away, by coalesce or by a delete.
type mergeJSON struct {
	Domain  string `json:"domain"`
	Disk    string `json:"disk"`
	Layer   string `json:"layer"`
	Action  string `json:"action"`
	Kept    string `json:"kept"`
	Removed string `json:"removed"`
}

func mergesToJSON(merges []driver.Merge) []mergeJSON {
	out := []mergeJSON{}
	for _, m := range merges {
		out = append(out, mergeJSON{Domain: m.Domain, Disk: m.Disk, Layer: m.Layer, Action: string(m.Action), Kept: m.Kept, Removed: m.Removed})
	}
	return out
}

// coalesceCmd is xlsnap's own (virsh merges only when told which layers,
// with blockcommit and blockpull): merge away every layer nothing needs.
func (a *app) coalesceCmd() *cobra.Command {
	var dryRun bool
	cmd := &cobra.Command{
		Use:   "coalesce [DOMAIN] [--dry-run]",
		Short: "Merge away the layers no snapshot, image or domain needs (every domain's, or one's)",
		Long: "Merge away the layers no snapshot, image or domain needs: no disk writes them and no snapshot holds its state\n" +
			"in them. Each merges with its only child in the cheaper direction, through the device model for a running domain,\n" +
			"as a snapshot-delete merges. A delete or revert already merges what it frees; this is for what is left (a\n" +
			"NO_METADATA snapshot's base, a clone's base once the clone is gone). check lists what it would merge.",
		Args: cobra.MaximumNArgs(1),
	}
	cmd.RunE = a.withDriver(func(cmd *cobra.Command, d *driver.Driver, args []string) error {
		domain := ""
		if len(args) == 1 {
			domain = args[0]
		}
		var flags driver.CoalesceFlags
		if dryRun {
			flags |= driver.CoalesceDryRun
		}
		p, err := a.progressFn(cmd)
		if err != nil {
			return err
		}
		report, err := d.Coalesce(storage.WithProgress(cmd.Context(), p), domain, flags)
		if domain != "" && errdefs.CodeOf(err) == errdefs.CodeNoDomain {
			return &cliError{msg: fmt.Sprintf("failed to get domain '%s'", domain), err: err}
		}
		// What was merged before a failure is printed with it.
		if report == nil {
			return err
		}
		w := cmd.OutOrStdout()
		if a.json {
			if jerr := writeJSON(w, coalesceJSON{DryRun: report.DryRun, Merges: mergesToJSON(report.Merges)}); jerr != nil {
				return jerr
			}
			return err
		}
		// What stays is named last: the layer nothing needed may be the
		// file that stays (a commit down keeps its name).
		verb := "merged into"
		if report.DryRun {
			verb = "would be merged into"
		}
		for _, m := range report.Merges {
			fmt.Fprintf(w, "Domain %s disk %s: %s %s %s (%s; %s was needed by nothing)\n", m.Domain, m.Disk, m.Removed, verb, m.Kept, m.Action, m.Layer)
		}
		n := len(report.Merges)
		switch {
		case n == 0 && report.DryRun:
			fmt.Fprintln(w, "Nothing to merge")
		case n == 0:
			fmt.Fprintln(w, "Nothing merged")
		case report.DryRun:
			fmt.Fprintf(w, "%d layer%s would be merged away\n", n, plural(n))
		default:
			fmt.Fprintf(w, "%d layer%s merged away\n", n, plural(n))
		}
		return err
	})
	cmd.ValidArgsFunction = func(cmd *cobra.Command, args []string, toComplete string) ([]string, cobra.ShellCompDirective) {
		if len(args) > 0 {
			return nil, cobra.ShellCompDirectiveNoFileComp
		}
		return a.completeDomain(cmd, args, toComplete)
	}
	cmd.Flags().BoolVar(&dryRun, "dry-run", false, "change nothing: list what would be merged (each merge judged as if it were the only one)")
	return cmd
}

func plural(n int) string {
	if n == 1 {
		return ""
	}
	return "s"
}

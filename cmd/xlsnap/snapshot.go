package main

import (
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/mattn/go-isatty"
	"github.com/schollz/progressbar/v3"
	"github.com/spf13/cobra"
	"libvirt.org/go/libvirtxml"

	"github.com/xlsnap/xlsnap/driver"
	"github.com/xlsnap/xlsnap/storage"
)

// snapshotJSON is a snapshot as --json prints it.
type snapshotJSON struct {
	Name        string     `json:"name"`
	Description string     `json:"description,omitempty"`
	Parent      string     `json:"parent,omitempty"`
	Current     bool       `json:"current"`
	State       string     `json:"state"`
	Created     int64      `json:"creation_time"`
	Location    string     `json:"location"`
	Memory      string     `json:"memory,omitempty"`
	Disks       []diskJSON `json:"disks"`
}

type diskJSON struct {
	Target  string `json:"target"`
	Mode    string `json:"snapshot"`
	Image   string `json:"image,omitempty"`
	Overlay string `json:"overlay,omitempty"`
}

func location(s *driver.Snapshot) string {
	if driver.IsExternal(s) {
		return "external"
	}
	return "internal"
}

func toJSON(s *driver.Snapshot, current string) snapshotJSON {
	j := snapshotJSON{Name: s.Name, Description: s.Description, Parent: s.Parent, Current: s.Name == current,
		State: s.State, Created: s.Created.Unix(), Location: location(s), Memory: s.Memory, Disks: []diskJSON{}}
	for _, sd := range s.Disks {
		j.Disks = append(j.Disks, diskJSON{Target: sd.Target, Mode: string(sd.Mode), Image: sd.Image, Overlay: sd.Overlay})
	}
	return j
}

func (g *globals) snapshotCommands() []*cobra.Command {
	return []*cobra.Command{
		g.createAsCmd(), g.createCmd(), g.listCmd(), g.infoCmd(), g.dumpXMLCmd(),
		g.currentCmd(), g.parentCmd(), g.revertCmd(), g.deleteCmd(),
	}
}

type createOpts struct {
	diskOnly, live, atomic, noMetadata, reuseExternal, halt, quiesce bool
	redefine, current, validate, printXML                            bool
}

func (o *createOpts) register(cmd *cobra.Command, redefine bool) {
	f := cmd.Flags()
	f.BoolVar(&o.diskOnly, "disk-only", false, "disk state only (external by default)")
	f.BoolVar(&o.live, "live", false, "take the snapshot while the domain runs")
	f.BoolVar(&o.atomic, "atomic", false, "all disks or none (always the case here)")
	f.BoolVar(&o.noMetadata, "no-metadata", false, "change the disks, record no snapshot")
	f.BoolVar(&o.reuseExternal, "reuse-external", false, "use existing overlay files")
	f.BoolVar(&o.halt, "halt", false, "halt the domain after the snapshot")
	f.BoolVar(&o.quiesce, "quiesce", false, "quiesce guest file systems (unsupported)")
	if redefine {
		f.BoolVar(&o.redefine, "redefine", false, "record a snapshot from its XML without touching disks")
		f.BoolVar(&o.current, "current", false, "with --redefine, make it the current snapshot")
		f.BoolVar(&o.validate, "validate", false, "validate the XML")
	} else {
		f.BoolVar(&o.printXML, "print-xml", false, "print the snapshot XML instead of creating it")
	}
}

func (o *createOpts) flags() driver.CreateFlags {
	var f driver.CreateFlags
	for _, b := range []struct {
		on   bool
		flag driver.CreateFlags
	}{
		{o.diskOnly, driver.CreateDiskOnly}, {o.live, driver.CreateLive}, {o.atomic, driver.CreateAtomic},
		{o.noMetadata, driver.CreateNoMetadata}, {o.reuseExternal, driver.CreateReuseExt}, {o.halt, driver.CreateHalt},
		{o.quiesce, driver.CreateQuiesce}, {o.redefine, driver.CreateRedefine}, {o.current, driver.CreateCurrent},
		{o.validate, driver.CreateValidate},
	} {
		if b.on {
			f |= b.flag
		}
	}
	return f
}

func (g *globals) reportCreated(w io.Writer, s *driver.Snapshot, noMetadata bool) error {
	if g.json {
		return writeJSON(w, toJSON(s, s.Name))
	}
	if noMetadata {
		_, err := fmt.Fprintf(w, "Domain snapshot %s created (no metadata)\n", s.Name)
		return err
	}
	_, err := fmt.Fprintf(w, "Domain snapshot %s created\n", s.Name)
	return err
}

func (g *globals) createAsCmd() *cobra.Command {
	var o createOpts
	var description, memspec string
	var diskspecs []string
	cmd := &cobra.Command{
		Use:   "snapshot-create-as DOMAIN [NAME]",
		Short: "Create a snapshot from a name and options",
		Args:  cobra.RangeArgs(1, 2),
	}
	cmd.RunE = func(cmd *cobra.Command, args []string) error {
		doc := &libvirtxml.DomainSnapshot{Description: description}
		if len(args) == 2 {
			doc.Name = args[1]
		}
		if memspec != "" {
			m, err := parseMemspec(memspec)
			if err != nil {
				return err
			}
			doc.Memory = m
		}
		for _, ds := range diskspecs {
			disk, err := parseDiskspec(ds)
			if err != nil {
				return err
			}
			if doc.Disks == nil {
				doc.Disks = &libvirtxml.DomainSnapshotDisks{}
			}
			doc.Disks.Disks = append(doc.Disks.Disks, disk)
		}
		xmlDesc, err := doc.Marshal()
		if err != nil {
			return err
		}
		if o.printXML {
			_, err := fmt.Fprintln(cmd.OutOrStdout(), xmlDesc)
			return err
		}
		return g.withDriver(func(cmd *cobra.Command, d *driver.Driver, args []string) error {
			s, err := d.SnapshotCreateXML(cmd.Context(), args[0], xmlDesc, o.flags())
			if err != nil {
				return err
			}
			return g.reportCreated(cmd.OutOrStdout(), s, o.noMetadata)
		})(cmd, args)
	}
	o.register(cmd, false)
	f := cmd.Flags()
	f.StringVar(&description, "description", "", "description of the snapshot")
	f.StringVar(&memspec, "memspec", "", "memory state: [file=]PATH[,snapshot=external|no]")
	f.StringArrayVar(&diskspecs, "diskspec", nil, "DISK[,snapshot=external|internal|no][,file=PATH][,driver=FMT] (repeatable)")
	return cmd
}

// parseMemspec reads virsh's --memspec.
func parseMemspec(spec string) (*libvirtxml.DomainSnapshotMemory, error) {
	m := &libvirtxml.DomainSnapshotMemory{Snapshot: "external"}
	for _, part := range strings.Split(spec, ",") {
		k, v, ok := strings.Cut(part, "=")
		switch {
		case !ok:
			m.File = part
		case k == "file":
			m.File = v
		case k == "snapshot":
			m.Snapshot = v
		default:
			return nil, fmt.Errorf("%w: --memspec: unknown key %q", driver.ErrInvalidArg, k)
		}
	}
	if m.Snapshot == "no" {
		m.File = ""
	}
	return m, nil
}

// parseDiskspec reads virsh's --diskspec.
func parseDiskspec(spec string) (libvirtxml.DomainSnapshotDisk, error) {
	parts := strings.Split(spec, ",")
	disk := libvirtxml.DomainSnapshotDisk{Name: parts[0]}
	if disk.Name == "" {
		return disk, fmt.Errorf("%w: --diskspec %q names no disk", driver.ErrInvalidArg, spec)
	}
	for _, part := range parts[1:] {
		k, v, _ := strings.Cut(part, "=")
		switch k {
		case "snapshot":
			disk.Snapshot = v
		case "file":
			disk.Source = &libvirtxml.DomainDiskSource{File: &libvirtxml.DomainDiskSourceFile{File: v}}
		case "driver":
			disk.Driver = &libvirtxml.DomainDiskDriver{Type: v}
		default:
			return disk, fmt.Errorf("%w: --diskspec %q: unknown key %q", driver.ErrInvalidArg, spec, k)
		}
	}
	return disk, nil
}

func (g *globals) createCmd() *cobra.Command {
	var o createOpts
	cmd := &cobra.Command{
		Use:   "snapshot-create DOMAIN [XMLFILE]",
		Short: "Create a snapshot from domain snapshot XML (empty: all defaults)",
		Args:  cobra.RangeArgs(1, 2),
	}
	cmd.RunE = g.withDriver(func(cmd *cobra.Command, d *driver.Driver, args []string) error {
		xmlDesc := "<domainsnapshot/>"
		if len(args) == 2 {
			b, err := os.ReadFile(args[1])
			if err != nil {
				return err
			}
			xmlDesc = string(b)
		}
		s, err := d.SnapshotCreateXML(cmd.Context(), args[0], xmlDesc, o.flags())
		if err != nil {
			return err
		}
		if o.redefine && !g.json {
			_, err := fmt.Fprintf(cmd.OutOrStdout(), "Domain snapshot %s defined from '%s'\n", s.Name, args[1])
			return err
		}
		return g.reportCreated(cmd.OutOrStdout(), s, o.noMetadata)
	})
	o.register(cmd, true)
	return cmd
}

func (g *globals) listCmd() *cobra.Command {
	var tree, parent, roots, leaves, noLeaves, internal, external, names, topological, inactive, active, diskOnly bool
	cmd := &cobra.Command{
		Use:   "snapshot-list DOMAIN",
		Short: "List a domain's snapshots",
		Args:  cobra.ExactArgs(1),
	}
	cmd.RunE = g.withDriver(func(cmd *cobra.Command, d *driver.Driver, args []string) error {
		var flags driver.ListFlags
		for _, b := range []struct {
			on   bool
			flag driver.ListFlags
		}{
			{roots, driver.ListRoots}, {leaves, driver.ListLeaves}, {noLeaves, driver.ListNoLeaves},
			{internal, driver.ListInternal}, {external, driver.ListExternal}, {topological, driver.ListTopological},
			{inactive, driver.ListInactive}, {active, driver.ListActive}, {diskOnly, driver.ListDiskOnly},
		} {
			if b.on {
				flags |= b.flag
			}
		}
		if tree {
			flags |= driver.ListTopological
		}
		list, err := d.ListAllSnapshots(cmd.Context(), args[0], flags)
		if err != nil {
			return err
		}
		current := ""
		if c, err := d.SnapshotCurrent(cmd.Context(), args[0], 0); err == nil {
			current = c.Name
		}
		w := cmd.OutOrStdout()
		switch {
		case g.json:
			out := []snapshotJSON{}
			for _, s := range list {
				out = append(out, toJSON(s, current))
			}
			return writeJSON(w, out)
		case tree:
			return printTree(w, list)
		case names:
			for _, s := range list {
				fmt.Fprintln(w, s.Name)
			}
			return nil
		}
		tw := tabwriter.NewWriter(w, 0, 4, 3, ' ', 0)
		if parent {
			fmt.Fprintln(tw, " Name\tCreation Time\tState\tParent")
		} else {
			fmt.Fprintln(tw, " Name\tCreation Time\tState")
		}
		fmt.Fprintln(tw, strings.Repeat("-", 60))
		for _, s := range list {
			line := fmt.Sprintf(" %s\t%s\t%s", s.Name, s.Created.Local().Format("2006-01-02 15:04:05 -0700"), s.State)
			if parent {
				line += "\t" + s.Parent
			}
			fmt.Fprintln(tw, line)
		}
		return tw.Flush()
	})
	f := cmd.Flags()
	f.BoolVar(&tree, "tree", false, "print the snapshots as a tree")
	f.BoolVar(&parent, "parent", false, "add a column with each snapshot's parent")
	f.BoolVar(&roots, "roots", false, "only snapshots without a parent")
	f.BoolVar(&leaves, "leaves", false, "only snapshots without children")
	f.BoolVar(&noLeaves, "no-leaves", false, "only snapshots with children")
	f.BoolVar(&internal, "internal", false, "only internal snapshots")
	f.BoolVar(&external, "external", false, "only external snapshots")
	f.BoolVar(&names, "name", false, "print names only")
	f.BoolVar(&topological, "topological", false, "parents before children")
	f.BoolVar(&inactive, "inactive", false, "only snapshots of a shut-off domain")
	f.BoolVar(&active, "active", false, "only snapshots of a running domain")
	f.BoolVar(&diskOnly, "disk-only", false, "only disk-only snapshots of a running domain")
	return cmd
}

// printTree prints virsh's --tree: names with branches, roots first.
func printTree(w io.Writer, list []*driver.Snapshot) error {
	children := map[string][]string{}
	have := map[string]bool{}
	for _, s := range list {
		have[s.Name] = true
	}
	var roots []string
	for _, s := range list {
		if s.Parent == "" || !have[s.Parent] {
			roots = append(roots, s.Name)
		} else {
			children[s.Parent] = append(children[s.Parent], s.Name)
		}
	}
	var walk func(name, prefix string, last bool, root bool)
	walk = func(name, prefix string, last bool, root bool) {
		if root {
			fmt.Fprintln(w, name)
		} else {
			branch := "├─ "
			if last {
				branch = "└─ "
			}
			fmt.Fprintln(w, prefix+branch+name)
			if last {
				prefix += "   "
			} else {
				prefix += "│  "
			}
		}
		kids := children[name]
		for i, k := range kids {
			walk(k, prefix, i == len(kids)-1, false)
		}
	}
	for _, r := range roots {
		walk(r, "", true, true)
	}
	return nil
}

func (g *globals) snapshotArg(cmd *cobra.Command, d *driver.Driver, args []string, current bool) (*driver.Snapshot, error) {
	if current {
		return d.SnapshotCurrent(cmd.Context(), args[0], 0)
	}
	if len(args) < 2 {
		return nil, fmt.Errorf("%w: name a snapshot or use --current", driver.ErrInvalidArg)
	}
	return d.SnapshotLookupByName(cmd.Context(), args[0], args[1], 0)
}

func (g *globals) infoCmd() *cobra.Command {
	var current bool
	cmd := &cobra.Command{Use: "snapshot-info DOMAIN [NAME|--current]", Short: "Show a snapshot's details", Args: cobra.RangeArgs(1, 2)}
	cmd.RunE = g.withDriver(func(cmd *cobra.Command, d *driver.Driver, args []string) error {
		s, err := g.snapshotArg(cmd, d, args, current)
		if err != nil {
			return err
		}
		ctx := cmd.Context()
		isCur, err := d.SnapshotIsCurrent(ctx, args[0], s.Name, 0)
		if err != nil {
			return err
		}
		kids, err := d.SnapshotNumChildren(ctx, args[0], s.Name, 0)
		if err != nil {
			return err
		}
		desc, err := d.SnapshotNumChildren(ctx, args[0], s.Name, driver.ListDescendants)
		if err != nil {
			return err
		}
		if g.json {
			curName := ""
			if isCur {
				curName = s.Name
			}
			return writeJSON(cmd.OutOrStdout(), struct {
				snapshotJSON
				Domain      string `json:"domain"`
				Children    int    `json:"children"`
				Descendants int    `json:"descendants"`
			}{toJSON(s, curName), args[0], kids, desc})
		}
		tw := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 1, ' ', 0)
		parent := s.Parent
		if parent == "" {
			parent = "-"
		}
		for _, kv := range [][2]string{
			{"Name:", s.Name}, {"Domain:", args[0]}, {"Current:", yesNo(isCur)}, {"State:", s.State},
			{"Location:", location(s)}, {"Parent:", parent}, {"Children:", fmt.Sprint(kids)},
			{"Descendants:", fmt.Sprint(desc)}, {"Metadata:", "yes"},
		} {
			fmt.Fprintf(tw, "%s\t%s\n", kv[0], kv[1])
		}
		return tw.Flush()
	})
	cmd.Flags().BoolVar(&current, "current", false, "the current snapshot")
	return cmd
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}

func (g *globals) dumpXMLCmd() *cobra.Command {
	return &cobra.Command{
		Use: "snapshot-dumpxml DOMAIN NAME", Short: "Print a snapshot's XML", Args: cobra.ExactArgs(2),
		RunE: g.withDriver(func(cmd *cobra.Command, d *driver.Driver, args []string) error {
			doc, err := d.SnapshotGetXMLDesc(cmd.Context(), args[0], args[1], 0)
			if err != nil {
				return err
			}
			_, err = fmt.Fprintln(cmd.OutOrStdout(), doc)
			return err
		}),
	}
}

func (g *globals) currentCmd() *cobra.Command {
	var name bool
	cmd := &cobra.Command{Use: "snapshot-current DOMAIN", Short: "Print the current snapshot's XML (or name)", Args: cobra.ExactArgs(1)}
	cmd.RunE = g.withDriver(func(cmd *cobra.Command, d *driver.Driver, args []string) error {
		s, err := d.SnapshotCurrent(cmd.Context(), args[0], 0)
		if err != nil {
			return err
		}
		switch {
		case g.json:
			return writeJSON(cmd.OutOrStdout(), toJSON(s, s.Name))
		case name:
			_, err = fmt.Fprintln(cmd.OutOrStdout(), s.Name)
			return err
		}
		doc, err := d.SnapshotGetXMLDesc(cmd.Context(), args[0], s.Name, 0)
		if err != nil {
			return err
		}
		_, err = fmt.Fprintln(cmd.OutOrStdout(), doc)
		return err
	})
	cmd.Flags().BoolVar(&name, "name", false, "print the name only")
	return cmd
}

func (g *globals) parentCmd() *cobra.Command {
	var current bool
	cmd := &cobra.Command{Use: "snapshot-parent DOMAIN [NAME|--current]", Short: "Print a snapshot's parent", Args: cobra.RangeArgs(1, 2)}
	cmd.RunE = g.withDriver(func(cmd *cobra.Command, d *driver.Driver, args []string) error {
		s, err := g.snapshotArg(cmd, d, args, current)
		if err != nil {
			return err
		}
		p, err := d.SnapshotGetParent(cmd.Context(), args[0], s.Name, 0)
		if err != nil {
			return err
		}
		if g.json {
			return writeJSON(cmd.OutOrStdout(), toJSON(p, ""))
		}
		_, err = fmt.Fprintln(cmd.OutOrStdout(), p.Name)
		return err
	})
	cmd.Flags().BoolVar(&current, "current", false, "the current snapshot's parent")
	return cmd
}

func (g *globals) revertCmd() *cobra.Command {
	var running, paused, force bool
	cmd := &cobra.Command{Use: "snapshot-revert DOMAIN NAME", Short: "Revert a domain to a snapshot", Args: cobra.ExactArgs(2)}
	cmd.RunE = g.withDriver(func(cmd *cobra.Command, d *driver.Driver, args []string) error {
		var flags driver.RevertFlags
		if running {
			flags |= driver.RevertRunning
		}
		if paused {
			flags |= driver.RevertPaused
		}
		if force {
			flags |= driver.RevertForce
		}
		ctx := storage.WithProgress(cmd.Context(), progressBar(cmd))
		if err := d.RevertToSnapshot(ctx, args[0], args[1], flags); err != nil {
			return err
		}
		if g.json {
			return writeJSON(cmd.OutOrStdout(), map[string]string{"domain": args[0], "reverted_to": args[1]})
		}
		_, err := fmt.Fprintf(cmd.OutOrStdout(), "Domain %s reverted to snapshot %s\n", args[0], args[1])
		return err
	})
	f := cmd.Flags()
	f.BoolVar(&running, "running", false, "start the domain after the revert")
	f.BoolVar(&paused, "paused", false, "start the domain paused after the revert")
	f.BoolVar(&force, "force", false, "revert even where it is risky")
	return cmd
}

func (g *globals) deleteCmd() *cobra.Command {
	var children, childrenOnly, metadata bool
	cmd := &cobra.Command{Use: "snapshot-delete DOMAIN NAME", Short: "Delete a snapshot, merging its images", Args: cobra.ExactArgs(2)}
	cmd.RunE = g.withDriver(func(cmd *cobra.Command, d *driver.Driver, args []string) error {
		var flags driver.DeleteFlags
		if children {
			flags |= driver.DeleteChildren
		}
		if childrenOnly {
			flags |= driver.DeleteChildrenOnly
		}
		if metadata {
			flags |= driver.DeleteMetadataOnly
		}
		ctx := storage.WithProgress(cmd.Context(), progressBar(cmd))
		report, err := d.SnapshotDelete(ctx, args[0], args[1], flags)
		if err != nil {
			return err
		}
		w := cmd.OutOrStdout()
		if g.json {
			return writeJSON(w, report)
		}
		switch {
		case childrenOnly:
			fmt.Fprintf(w, "Domain snapshot %s children deleted\n", args[1])
		case children:
			fmt.Fprintf(w, "Domain snapshot %s and its children deleted\n", args[1])
		default:
			fmt.Fprintf(w, "Domain snapshot %s deleted\n", args[1])
		}
		for _, r := range report.Disks {
			fmt.Fprintf(w, "  %s/%s: %s", r.Snapshot, r.Disk, r.Action)
			if r.Removed != "" {
				fmt.Fprintf(w, " (%s into %s)", r.Removed, r.Kept)
			} else if r.Kept != "" && len(r.Users) > 0 {
				fmt.Fprintf(w, " (kept %s: also used by %s)", r.Kept, storage.DescribeUsers(r.Users))
			} else if r.Kept != "" {
				fmt.Fprintf(w, " (kept %s)", r.Kept)
			}
			fmt.Fprintln(w)
		}
		for _, p := range report.Collected {
			fmt.Fprintf(w, "  removed unused image %s\n", p)
		}
		return nil
	})
	f := cmd.Flags()
	f.BoolVar(&children, "children", false, "delete the snapshot and all its descendants")
	f.BoolVar(&childrenOnly, "children-only", false, "delete the descendants only")
	f.BoolVar(&metadata, "metadata", false, "forget the snapshot, leave the images as they are")
	return cmd
}

// progressBar draws merges as a bar when stdout is a terminal
// (schollz/progressbar: a maintained, dependency-light bar).
func progressBar(cmd *cobra.Command) storage.Progress {
	f, ok := cmd.OutOrStdout().(*os.File)
	if !ok || !isatty.IsTerminal(f.Fd()) {
		return nil
	}
	var bar *progressbar.ProgressBar
	var image string
	return func(op, disk, img string, percent float64) {
		if bar == nil || img != image {
			image = img
			bar = progressbar.NewOptions(100, progressbar.OptionSetWriter(f),
				progressbar.OptionSetDescription(fmt.Sprintf("%s %s", op, disk)),
				progressbar.OptionThrottle(100*time.Millisecond), progressbar.OptionClearOnFinish())
		}
		bar.Set(int(percent))
	}
}

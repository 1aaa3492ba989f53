package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/schollz/progressbar/v3"
	"github.com/spf13/cobra"

	"github.com/xlsnap/xlsnap/driver"
	"github.com/xlsnap/xlsnap/errdefs"
	"github.com/xlsnap/xlsnap/storage"
)

func (a *app) snapshotCommands() []*cobra.Command {
	return []*cobra.Command{
		a.createAsCmd(), a.createCmd(), a.listCmd(), a.infoCmd(), a.dumpXMLCmd(),
		a.currentCmd(), a.parentCmd(), a.revertCmd(), a.deleteCmd(),
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
	f.BoolVar(&o.validate, "validate", false, "validate the XML against libvirt's schema")
	if redefine {
		f.BoolVar(&o.redefine, "redefine", false, "record a snapshot from its XML without touching disks")
		f.BoolVar(&o.current, "current", false, "with --redefine, make it the current snapshot")
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

// reportCreated prints virsh's line (naming the XML file it came from,
// if any), or the snapshot as JSON.
func (a *app) reportCreated(ctx context.Context, w io.Writer, d *driver.Driver, domain string, s *driver.Snapshot, noMetadata bool, from string) error {
	if a.json {
		current := ""
		if cur, err := d.SnapshotCurrent(ctx, domain, 0); err == nil {
			current = cur.Name
		}
		return writeJSON(w, toJSON(domain, s, current))
	}
	if noMetadata {
		_, err := fmt.Fprintf(w, "Domain snapshot %s created (no metadata)\n", s.Name)
		return err
	}
	if from != "" {
		_, err := fmt.Fprintf(w, "Domain snapshot %s created from '%s'\n", s.Name, from)
		return err
	}
	_, err := fmt.Fprintf(w, "Domain snapshot %s created\n", s.Name)
	return err
}

func (a *app) createAsCmd() *cobra.Command {
	var o createOpts
	var domain, name, description, memspec string
	var diskspecs []string
	cmd := &cobra.Command{
		Use:   "snapshot-create-as DOMAIN [NAME [DESCRIPTION]]",
		Short: "Create a snapshot from a name and options",
	}
	a.domainCmd(cmd, &domain, []string{"name", "description", "diskspec"}, nil, nil, func(ctx context.Context, d *driver.Driver) error {
		// virsh finds the domain before it reads anything else.
		if _, err := d.DomainKey(ctx, domain); err != nil {
			return err
		}
		var mem *memSpec
		if memspec != "" {
			m, err := parseMemspec(memspec)
			if err != nil {
				return err
			}
			mem = m
		}
		var disks []*diskSpec
		for _, ds := range diskspecs {
			disk, err := parseDiskspec(ds)
			if err != nil {
				return err
			}
			disks = append(disks, disk)
		}
		xmlDesc := snapshotXML(name, description, mem, disks)
		w := cmd.OutOrStdout()
		if o.printXML {
			if a.json {
				return writeJSON(w, xmlJSON{Domain: domain, Name: name, XML: xmlDesc})
			}
			_, err := fmt.Fprintf(w, "%s\n\n\n", xmlDesc)
			return err
		}
		s, err := d.SnapshotCreateXML(ctx, domain, xmlDesc, o.flags())
		if err != nil {
			return err
		}
		return a.reportCreated(ctx, w, d, domain, s, o.noMetadata, "")
	})
	o.register(cmd, false)
	f := cmd.Flags()
	f.StringVar(&name, "name", "", "name of the snapshot (default: the creation time)")
	f.StringVar(&description, "description", "", "description of the snapshot")
	f.StringVar(&memspec, "memspec", "", "memory state: [file=]PATH[,snapshot=external|no]")
	f.StringArrayVar(&diskspecs, "diskspec", nil, "DISK[,snapshot=external|internal|no][,file=PATH][,driver=FMT] (repeatable)")
	return cmd
}

func (a *app) createCmd() *cobra.Command {
	var o createOpts
	var domain, xmlFile string
	cmd := &cobra.Command{
		Use:   "snapshot-create DOMAIN [XMLFILE]",
		Short: "Create a snapshot from domain snapshot XML (none: all defaults)",
	}
	a.domainCmd(cmd, &domain, []string{"xmlfile"}, nil, nil, func(ctx context.Context, d *driver.Driver) error {
		if _, err := d.DomainKey(ctx, domain); err != nil {
			return err // virsh finds the domain before it reads the file
		}
		xmlDesc := "<domainsnapshot/>"
		if xmlFile != "" {
			b, err := readFile(xmlFile)
			if err != nil {
				return err
			}
			xmlDesc = string(b)
		}
		s, err := d.SnapshotCreateXML(ctx, domain, xmlDesc, o.flags())
		if err != nil {
			return err
		}
		return a.reportCreated(ctx, cmd.OutOrStdout(), d, domain, s, o.noMetadata, xmlFile)
	})
	cmd.Flags().StringVar(&xmlFile, "xmlfile", "", "domain snapshot XML")
	o.register(cmd, true)
	return cmd
}

// snapshotCmd is a command on one snapshot of a domain, named or
// --current, looked up (with virsh's messages) before body runs. With
// needsName the name is an operand the command requires, as virsh's
// snapshot-dumpxml does (it has no --current; xlsnap's takes one in its
// place); else a missing or doubled choice is refused as virsh refuses
// it, once the domain is found.
func (a *app) snapshotCmd(cmd *cobra.Command, needsName bool, body func(ctx context.Context, d *driver.Driver, domain string, s *driver.Snapshot) error) {
	var domain, name string
	var current bool
	var needs func() []string
	if needsName {
		needs = func() []string {
			if current {
				return nil
			}
			return []string{"snapshotname"}
		}
	}
	a.domainCmd(cmd, &domain, []string{"snapshotname"}, needs, nil,
		func(ctx context.Context, d *driver.Driver) error {
			if err := snapshotOrCurrent(cmd, current); err != nil {
				if _, derr := d.DomainKey(ctx, domain); derr != nil {
					return derr
				}
				return err
			}
			s, err := lookup(ctx, d, domain, name, current)
			if err != nil {
				return err
			}
			return body(ctx, d, domain, s)
		})
	cmd.Flags().StringVar(&name, "snapshotname", "", "the snapshot (or the second operand)")
	cmd.Flags().BoolVar(&current, "current", false, "the current snapshot")
}

func (a *app) infoCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "snapshot-info DOMAIN [NAME|--current]", Short: "Show a snapshot's details"}
	a.snapshotCmd(cmd, false, func(ctx context.Context, d *driver.Driver, domain string, s *driver.Snapshot) error {
		isCur, err := d.SnapshotIsCurrent(ctx, domain, s.Name, 0)
		if err != nil {
			return err
		}
		kids, err := d.SnapshotNumChildren(ctx, domain, s.Name, 0)
		if err != nil {
			return err
		}
		desc, err := d.SnapshotNumChildren(ctx, domain, s.Name, driver.ListDescendants)
		if err != nil {
			return err
		}
		w := cmd.OutOrStdout()
		if a.json {
			curName := ""
			if isCur {
				curName = s.Name
			}
			return writeJSON(w, infoJSON{snapshotJSON: toJSON(domain, s, curName), NumChildren: kids, NumDescendants: desc, Metadata: true})
		}
		parent := s.Parent
		if parent == "" {
			parent = "-"
		}
		for _, kv := range [][2]string{
			{"Name:", s.Name}, {"Domain:", domain}, {"Current:", yesNo(isCur)}, {"State:", s.State},
			{"Location:", location(s)}, {"Parent:", parent}, {"Children:", fmt.Sprint(kids)},
			{"Descendants:", fmt.Sprint(desc)}, {"Metadata:", "yes"},
		} {
			fmt.Fprintf(w, "%-15s %s\n", kv[0], kv[1])
		}
		_, err = fmt.Fprintln(w)
		return err
	})
	return cmd
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}

func (a *app) dumpXMLCmd() *cobra.Command {
	var secure bool
	cmd := &cobra.Command{Use: "snapshot-dumpxml DOMAIN [NAME|--current] [--security-info]", Short: "Print a snapshot's XML"}
	a.snapshotCmd(cmd, true, func(ctx context.Context, d *driver.Driver, domain string, s *driver.Snapshot) error {
		return a.printXML(ctx, cmd.OutOrStdout(), d, domain, s.Name, secure)
	})
	cmd.Flags().BoolVar(&secure, "security-info", false, "include security-sensitive information")
	return cmd
}

// printXML prints a snapshot's XML as virsh does (a blank line after), or
// as xmlJSON.
func (a *app) printXML(ctx context.Context, w io.Writer, d *driver.Driver, domain, name string, secure bool) error {
	var flags driver.XMLFlags
	if secure {
		flags |= driver.XMLSecure
	}
	doc, err := d.SnapshotGetXMLDesc(ctx, domain, name, flags)
	if err != nil {
		return err
	}
	if a.json {
		return writeJSON(w, xmlJSON{Domain: domain, Name: name, XML: doc})
	}
	_, err = fmt.Fprintf(w, "%s\n\n", doc)
	return err
}

func (a *app) currentCmd() *cobra.Command {
	var domain, setName string
	var name, secure bool
	cmd := &cobra.Command{
		Use:   "snapshot-current DOMAIN [NAME] [--name] [--security-info]",
		Short: "Print the current snapshot's XML (or name), or with NAME make that snapshot current",
	}
	check := func() error { return exclusive(cmd, "name", "snapshotname") }
	a.domainCmd(cmd, &domain, []string{"snapshotname"}, nil, check, func(ctx context.Context, d *driver.Driver) error {
		w := cmd.OutOrStdout()
		if cmd.Flags().Changed("snapshotname") {
			// As virsh does it: redefine the snapshot's own XML as current.
			s, err := lookup(ctx, d, domain, setName, false)
			if err != nil {
				return err
			}
			doc, err := d.SnapshotGetXMLDesc(ctx, domain, s.Name, driver.XMLSecure)
			if err != nil {
				return err
			}
			s, err = d.SnapshotCreateXML(ctx, domain, doc, driver.CreateRedefine|driver.CreateCurrent)
			if err != nil {
				return err
			}
			if a.json {
				return writeJSON(w, toJSON(domain, s, s.Name))
			}
			_, err = fmt.Fprintf(w, "Snapshot %s set as current\n", s.Name)
			return err
		}
		s, err := d.SnapshotCurrent(ctx, domain, 0)
		if errdefs.CodeOf(err) == errdefs.CodeNoDomainSnapshot {
			// virsh asks first, and says it in its own words.
			return &cliError{msg: fmt.Sprintf("domain '%s' has no current snapshot", domain), err: err}
		}
		if err != nil {
			return err
		}
		switch {
		case a.json:
			return writeJSON(w, toJSON(domain, s, s.Name))
		case name:
			_, err = fmt.Fprintln(w, s.Name)
			return err
		}
		return a.printXML(ctx, w, d, domain, s.Name, secure)
	})
	f := cmd.Flags()
	f.StringVar(&setName, "snapshotname", "", "make this snapshot the current one")
	f.BoolVar(&name, "name", false, "print the name only")
	f.BoolVar(&secure, "security-info", false, "include security-sensitive information")
	return cmd
}

func (a *app) parentCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "snapshot-parent DOMAIN [NAME|--current]", Short: "Print a snapshot's parent"}
	a.snapshotCmd(cmd, false, func(ctx context.Context, d *driver.Driver, domain string, s *driver.Snapshot) error {
		if s.Parent == "" {
			return &cliError{msg: fmt.Sprintf("snapshot '%s' has no parent", s.Name), err: errdefs.ErrNoSnapshot}
		}
		p, err := d.SnapshotGetParent(ctx, domain, s.Name, 0)
		if err != nil {
			return err
		}
		if a.json {
			current := ""
			if cur, err := d.SnapshotCurrent(ctx, domain, 0); err == nil {
				current = cur.Name
			}
			return writeJSON(cmd.OutOrStdout(), toJSON(domain, p, current))
		}
		_, err = fmt.Fprintln(cmd.OutOrStdout(), p.Name)
		return err
	})
	return cmd
}

func (a *app) revertCmd() *cobra.Command {
	var running, paused, force bool
	cmd := &cobra.Command{Use: "snapshot-revert DOMAIN [NAME|--current]", Short: "Revert a domain to a snapshot"}
	a.snapshotCmd(cmd, false, func(ctx context.Context, d *driver.Driver, domain string, s *driver.Snapshot) error {
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
		p, err := a.progressFn(cmd)
		if err != nil {
			return err
		}
		if err := d.RevertToSnapshot(storage.WithProgress(ctx, p), domain, s.Name, flags); err != nil {
			return err
		}
		if a.json {
			return writeJSON(cmd.OutOrStdout(), revertJSON{Domain: domain, Snapshot: s.Name})
		}
		_, err = fmt.Fprintf(cmd.OutOrStdout(), "Domain snapshot %s reverted\n\n", s.Name)
		return err
	})
	f := cmd.Flags()
	f.BoolVar(&running, "running", false, "start the domain after the revert")
	f.BoolVar(&paused, "paused", false, "start the domain paused after the revert")
	f.BoolVar(&force, "force", false, "revert even where it is risky")
	return cmd
}

func (a *app) deleteCmd() *cobra.Command {
	var children, childrenOnly, metadata bool
	cmd := &cobra.Command{Use: "snapshot-delete DOMAIN [NAME|--current]", Short: "Delete a snapshot, merging its images"}
	a.snapshotCmd(cmd, false, func(ctx context.Context, d *driver.Driver, domain string, s *driver.Snapshot) error {
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
		p, err := a.progressFn(cmd)
		if err != nil {
			return err
		}
		report, err := d.SnapshotDelete(storage.WithProgress(ctx, p), domain, s.Name, flags)
		if err != nil {
			return err
		}
		w := cmd.OutOrStdout()
		if a.json {
			return writeJSON(w, deleteToJSON(domain, s.Name, report))
		}
		if childrenOnly {
			fmt.Fprintf(w, "Domain snapshot %s children deleted\n", s.Name)
		} else {
			fmt.Fprintf(w, "Domain snapshot %s deleted\n", s.Name)
		}
		// What each disk did is xlsnap's own: virsh has no merges to
		// report. It sits before virsh's closing blank line.
		for _, r := range report.Disks {
			fmt.Fprintf(w, "  %s/%s: %s", r.Snapshot, r.Disk, r.Action)
			if r.Removed != "" {
				fmt.Fprintf(w, " (%s into %s)", r.Removed, r.Kept)
			} else if r.Kept != "" && len(r.Users) > 0 {
				fmt.Fprintf(w, " (kept %s: also used by %s)", r.Kept, driver.DescribeUsers(r.Users))
			} else if r.Kept != "" {
				fmt.Fprintf(w, " (kept %s)", r.Kept)
			}
			fmt.Fprintln(w)
		}
		for _, p := range report.Collected {
			fmt.Fprintf(w, "  removed unused image %s\n", p)
		}
		for _, m := range report.Coalesced {
			fmt.Fprintf(w, "  %s: freed layer %s: %s merged into %s (%s)\n", m.Disk, m.Layer, m.Removed, m.Kept, m.Action)
		}
		_, err = fmt.Fprintln(w)
		return err
	})
	f := cmd.Flags()
	f.BoolVar(&children, "children", false, "delete the snapshot and all its descendants")
	f.BoolVar(&childrenOnly, "children-only", false, "delete the descendants only")
	f.BoolVar(&metadata, "metadata", false, "forget the snapshot, leave the images as they are")
	return cmd
}

// progressFn picks how merges report progress (--progress): JSON lines
// for scripts, a bar for people, on stderr so stdout stays the result.
func (a *app) progressFn(cmd *cobra.Command) (storage.Progress, error) {
	mode := a.progress
	if mode == "auto" {
		switch {
		case a.json && !isTerminal(os.Stderr):
			mode = "json"
		case isTerminal(os.Stderr):
			mode = "bar"
		default:
			mode = "none"
		}
	}
	switch mode {
	case "json":
		return progressJSONLines(cmd.ErrOrStderr()), nil
	case "bar":
		return progressBar(cmd.ErrOrStderr()), nil
	case "none":
		return nil, nil
	}
	return nil, usagef("--progress %q: want auto, bar, json or none", a.progress)
}

// progressBar draws merges as a bar (schollz/progressbar: a maintained,
// dependency-light bar).
func progressBar(w io.Writer) storage.Progress {
	var bar *progressbar.ProgressBar
	var image string
	return func(op, disk, img string, percent float64) {
		if bar == nil || img != image {
			image = img
			bar = progressbar.NewOptions(100, progressbar.OptionSetWriter(w),
				progressbar.OptionSetDescription(fmt.Sprintf("%s %s", op, disk)),
				progressbar.OptionThrottle(100*time.Millisecond), progressbar.OptionClearOnFinish())
		}
		bar.Set(int(percent))
	}
}

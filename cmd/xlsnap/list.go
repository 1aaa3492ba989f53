package main

import (
	"context"
	"fmt"
	"io"
	"strings"
	"unicode/utf8"

	"github.com/spf13/cobra"

	"github.com/xlsnap/xlsnap/driver"
)

// listOpts are snapshot-list's options, virsh's names.
type listOpts struct {
	domain, from                                          string
	parent, roots, leaves, noLeaves, metadata, noMetadata bool
	inactive, active, diskOnly, internal, external        bool
	tree, current, descendants, name, topological         bool
}

// treeFilters are the filters virsh refuses with --tree, in the order it
// checks them.
var treeFilters = []string{"leaves", "no-leaves", "inactive", "active", "disk-only", "internal", "external"}

// check refuses what virsh refuses, with its words, in its order.
func (o *listOpts) check(cmd *cobra.Command) error {
	for _, pair := range [][2]string{{"tree", "name"}, {"parent", "roots"}, {"parent", "tree"}, {"roots", "tree"}, {"roots", "from"}, {"roots", "current"}} {
		if err := exclusive(cmd, pair[0], pair[1]); err != nil {
			return err
		}
	}
	if cmd.Flags().Changed("from") && o.current {
		return usagef("--from and --current are mutually exclusive")
	}
	if o.descendants && !cmd.Flags().Changed("from") && !o.current {
		return usagef("--descendants requires either --from or --current")
	}
	if o.tree {
		for _, f := range treeFilters {
			if on, _ := cmd.Flags().GetBool(f); on {
				return usagef("--%s and --tree are mutually exclusive", f)
			}
		}
	}
	return nil
}

func (o *listOpts) flags() driver.ListFlags {
	var flags driver.ListFlags
	for _, b := range []struct {
		on   bool
		flag driver.ListFlags
	}{
		{o.roots, driver.ListRoots}, {o.leaves, driver.ListLeaves}, {o.noLeaves, driver.ListNoLeaves},
		{o.metadata, driver.ListMetadata}, {o.noMetadata, driver.ListNoMetadata},
		{o.internal, driver.ListInternal}, {o.external, driver.ListExternal}, {o.topological, driver.ListTopological},
		{o.inactive, driver.ListInactive}, {o.active, driver.ListActive}, {o.diskOnly, driver.ListDiskOnly},
	} {
		if b.on {
			flags |= b.flag
		}
	}
	return flags
}

// collect lists what the options select, in virsh's order: by name
// (as strcasecmp compares) unless --topological, and, for a tree from a
// snapshot, that snapshot first as the tree's root.
func (o *listOpts) collect(ctx context.Context, d *driver.Driver) ([]*driver.Snapshot, error) {
	from := o.from
	if o.current {
		cur, err := lookup(ctx, d, o.domain, "", true)
		if err != nil {
			return nil, err
		}
		from = cur.Name
	}
	var list []*driver.Snapshot
	if from == "" {
		all, err := d.ListAllSnapshots(ctx, o.domain, o.flags())
		if err != nil {
			return nil, err
		}
		list = all
	} else {
		top, err := lookup(ctx, d, o.domain, from, false)
		if err != nil {
			return nil, err
		}
		flags := o.flags()
		if o.descendants {
			flags |= driver.ListDescendants
		}
		kids, err := d.SnapshotListAllChildren(ctx, o.domain, from, flags)
		if err != nil {
			return nil, err
		}
		if o.tree {
			list = append(list, top)
		}
		list = append(list, kids...)
	}
	if !o.topological {
		driver.SortByName(list)
	}
	return list, nil
}

func (a *app) listCmd() *cobra.Command {
	var o listOpts
	cmd := &cobra.Command{Use: "snapshot-list DOMAIN", Short: "List a domain's snapshots"}
	a.domainCmd(cmd, &o.domain, []string{"from"}, nil, func() error { return o.check(cmd) }, func(ctx context.Context, d *driver.Driver) error {
		list, err := o.collect(ctx, d)
		if err != nil {
			return err
		}
		current := ""
		if c, err := d.SnapshotCurrent(ctx, o.domain, 0); err == nil {
			current = c.Name
		}
		w := cmd.OutOrStdout()
		switch {
		case a.json && o.tree:
			return writeJSON(w, treeToJSON(o.domain, driver.Tree(list), current))
		case a.json && o.name:
			names := []string{}
			for _, s := range list {
				names = append(names, s.Name)
			}
			return writeJSON(w, names)
		case a.json:
			out := []snapshotJSON{}
			for _, s := range list {
				out = append(out, toJSON(o.domain, s, current))
			}
			return writeJSON(w, out)
		case o.tree:
			return writeTree(w, driver.Tree(list))
		case o.name:
			for _, s := range list {
				fmt.Fprintln(w, s.Name)
			}
			_, err := fmt.Fprintln(w)
			return err
		}
		header := []string{"Name", "Creation Time", "State"}
		if o.parent {
			header = append(header, "Parent")
		}
		var rows [][]string
		for _, s := range list {
			row := []string{s.Name, s.Created.Local().Format("2006-01-02 15:04:05 -0700"), s.State}
			if o.parent {
				row = append(row, s.Parent)
			}
			rows = append(rows, row)
		}
		return writeTable(w, header, rows)
	})
	f := cmd.Flags()
	f.BoolVar(&o.parent, "parent", false, "add a column with each snapshot's parent")
	f.BoolVar(&o.roots, "roots", false, "only snapshots without a parent")
	f.BoolVar(&o.leaves, "leaves", false, "only snapshots without children")
	f.BoolVar(&o.noLeaves, "no-leaves", false, "only snapshots with children")
	f.BoolVar(&o.metadata, "metadata", false, "only snapshots with metadata (all of xlsnap's)")
	f.BoolVar(&o.noMetadata, "no-metadata", false, "only snapshots without metadata (none of xlsnap's)")
	f.BoolVar(&o.inactive, "inactive", false, "only snapshots of a shut-off domain")
	f.BoolVar(&o.active, "active", false, "only snapshots of a running domain")
	f.BoolVar(&o.diskOnly, "disk-only", false, "only disk-only snapshots of a running domain")
	f.BoolVar(&o.internal, "internal", false, "only internal snapshots")
	f.BoolVar(&o.external, "external", false, "only external snapshots")
	f.BoolVar(&o.tree, "tree", false, "print the snapshots as a tree")
	f.StringVar(&o.from, "from", "", "only the children of this snapshot")
	f.BoolVar(&o.current, "current", false, "only the children of the current snapshot")
	f.BoolVar(&o.descendants, "descendants", false, "with --from or --current, all descendants, not only children")
	f.BoolVar(&o.name, "name", false, "print names only")
	f.BoolVar(&o.topological, "topological", false, "parents before children, not by name")
	return cmd
}

// writeTree draws virsh's --tree: a root at the margin; under a snapshot
// with children a "|" line, then each child as "+- NAME", the column of a
// child that has later siblings kept by "|"; after the last snapshot of a
// branch, a line of its indent; a blank line at the end.
func writeTree(w io.Writer, roots []*driver.TreeNode) error {
	var node func(n *driver.TreeNode, indent string, root, last bool)
	node = func(n *driver.TreeNode, indent string, root, last bool) {
		under := indent
		if root {
			fmt.Fprintf(w, "%s\n", n.Snapshot.Name)
		} else {
			fmt.Fprintf(w, "%s+- %s\n", indent, n.Snapshot.Name)
			if last {
				under += "  "
			} else {
				under += "| "
			}
		}
		kids := n.Children
		if len(kids) == 0 {
			if last {
				fmt.Fprintf(w, "%s\n", under)
			}
			return
		}
		fmt.Fprintf(w, "%s  |\n", under)
		for i, k := range kids {
			node(k, under+"  ", false, i == len(kids)-1)
		}
	}
	for _, r := range roots {
		node(r, "", true, true)
	}
	_, err := fmt.Fprintln(w)
	return err
}

func treeToJSON(domain string, nodes []*driver.TreeNode, current string) []treeJSON {
	out := []treeJSON{}
	for _, n := range nodes {
		out = append(out, treeJSON{snapshotJSON: toJSON(domain, n.Snapshot, current), Children: treeToJSON(domain, n.Children, current)})
	}
	return out
}

// writeTable prints virsh's table: a leading space, columns as wide as
// their widest cell and three spaces apart (the last one unpadded), a rule
// as long as the columns with their gaps, and a blank line at the end.
func writeTable(w io.Writer, header []string, rows [][]string) error {
	widths := make([]int, len(header))
	for _, row := range append([][]string{header}, rows...) {
		for i, cell := range row {
			widths[i] = max(widths[i], utf8.RuneCountInString(cell))
		}
	}
	line := func(row []string) {
		var b strings.Builder
		for i, cell := range row {
			b.WriteString(" ")
			b.WriteString(cell)
			if i < len(row)-1 {
				b.WriteString(strings.Repeat(" ", widths[i]-utf8.RuneCountInString(cell)+2))
			}
		}
		fmt.Fprintln(w, b.String())
	}
	line(header)
	rule := 0
	for _, n := range widths {
		rule += n + 3
	}
	fmt.Fprintln(w, strings.Repeat("-", rule))
	for _, row := range rows {
		line(row)
	}
	_, err := fmt.Fprintln(w)
	return err
}

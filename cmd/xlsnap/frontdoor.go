package main

import (
	"runtime/debug"
	"strings"

	"github.com/spf13/cobra"
)

// frontDoor adds what a packaged command needs around the tree newRoot
// built: --version, the man pages make install generates (man.go) and
// completion of domain and snapshot names (cobra's own completion
// command generates the shell scripts).
func (g *globals) frontDoor(root *cobra.Command) {
	root.Version = version()
	addManCommand(root)
	for _, cmd := range root.Commands() {
		if cmd.ValidArgsFunction != nil {
			continue // the command completes its arguments itself
		}
		name := cmd.Name()
		switch {
		case snapshotNamed[name]:
			cmd.ValidArgsFunction = g.completeDomainThenSnapshot
		case strings.HasPrefix(name, "snapshot-") || name == "domblklist" || name == "rescan":
			cmd.ValidArgsFunction = g.completeDomain
		}
	}
}

// snapshotNamed are the commands whose second argument names an existing
// snapshot of the domain their first names.
var snapshotNamed = map[string]bool{"snapshot-revert": true, "snapshot-delete": true, "snapshot-info": true,
	"snapshot-dumpxml": true, "snapshot-parent": true, "snapshot-current": true}

// buildVersion is set by make build (-ldflags -X main.buildVersion=…,
// from git describe): go stamps no VCS data where -buildvcs=false, or
// outside a checkout.
var buildVersion string

// version is the build's: make build's, else the module version go
// stamped (the release for go install …@vX.Y.Z, a pseudo-version for go
// build in a checkout), else the commit go recorded.
func version() string {
	if buildVersion != "" {
		return buildVersion
	}
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return "(devel)"
	}
	if v := bi.Main.Version; v != "" && v != "(devel)" {
		return v
	}
	for _, s := range bi.Settings {
		if s.Key == "vcs.revision" {
			return "(devel) " + s.Value
		}
	}
	return "(devel)"
}

// completeDomain completes the first argument with the source's domains.
func (g *globals) completeDomain(cmd *cobra.Command, args []string, toComplete string) ([]string, cobra.ShellCompDirective) {
	if len(args) > 0 {
		return nil, cobra.ShellCompDirectiveNoFileComp
	}
	src, _, done, err := g.source()
	if err != nil {
		cobra.CompDebugln(err.Error(), true)
		return nil, cobra.ShellCompDirectiveError
	}
	defer done()
	names, err := src.Domains(cmd.Context())
	if err != nil {
		cobra.CompDebugln(err.Error(), true)
		return nil, cobra.ShellCompDirectiveError
	}
	return withPrefix(names, toComplete), cobra.ShellCompDirectiveNoFileComp
}

// completeDomainThenSnapshot completes a domain, then its snapshots'
// names, read as snapshot-list reads them.
func (g *globals) completeDomainThenSnapshot(cmd *cobra.Command, args []string, toComplete string) ([]string, cobra.ShellCompDirective) {
	if len(args) != 1 {
		return g.completeDomain(cmd, args, toComplete)
	}
	d, done, err := g.open(cmd.Context())
	if err != nil {
		cobra.CompDebugln(err.Error(), true)
		return nil, cobra.ShellCompDirectiveError
	}
	defer done()
	snaps, err := d.ListAllSnapshots(cmd.Context(), args[0], 0)
	if err != nil {
		cobra.CompDebugln(err.Error(), true)
		return nil, cobra.ShellCompDirectiveError
	}
	names := make([]string, 0, len(snaps))
	for _, s := range snaps {
		names = append(names, s.Name)
	}
	return withPrefix(names, toComplete), cobra.ShellCompDirectiveNoFileComp
}

func withPrefix(names []string, prefix string) []string {
	out := names[:0]
	for _, n := range names {
		if strings.HasPrefix(n, prefix) {
			out = append(out, n)
		}
	}
	return out
}

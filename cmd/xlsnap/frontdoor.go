package main

import (
	"runtime/debug"
	"strings"

	"github.com/spf13/cobra"
)

// frontDoor adds what a packaged command needs around the tree newRoot
// built: --version, the man pages make install generates (man.go) and
// completion of domain and snapshot names (cobra's own completion
// command generates the shell scripts), positional or named.
func (g *globals) frontDoor(root *cobra.Command) {
	root.Version = version()
	addManCommand(root)
	for _, cmd := range root.Commands() {
		if cmd.ValidArgsFunction != nil {
			continue // the command completes its arguments itself
		}
		if ops, ok := cmd.Annotations[operandsKey]; ok {
			names := strings.Split(ops, ",")
			cmd.ValidArgsFunction = func(cmd *cobra.Command, args []string, toComplete string) ([]string, cobra.ShellCompDirective) {
				_, next := assignOperands(cmd, args, names)
				return g.completeOption(cmd, args, names, next, toComplete)
			}
			for _, n := range names {
				if completes[n] != "" {
					cmd.RegisterFlagCompletionFunc(n, func(cmd *cobra.Command, args []string, toComplete string) ([]string, cobra.ShellCompDirective) {
						return g.completeOption(cmd, args, names, n, toComplete)
					})
				}
			}
			continue
		}
		if cmd.Name() == "rescan" || cmd.Name() == "chain-changing" {
			cmd.ValidArgsFunction = g.completeDomain
		}
	}
}

// completes says what each operand option names: a domain, or a
// snapshot of the command's domain; a file is left to the shell.
var completes = map[string]string{"domain": "domain", "snapshotname": "snapshot", "from": "snapshot", "xmlfile": "file"}

// completeOption completes the value of option opt (given by name or as
// the next operand), the domain being whatever --domain or the operands
// already say.
func (g *globals) completeOption(cmd *cobra.Command, args, names []string, opt, toComplete string) ([]string, cobra.ShellCompDirective) {
	switch completes[opt] {
	case "domain":
		return g.completeDomain(cmd, nil, toComplete)
	case "snapshot":
		got, _ := assignOperands(cmd, args, names)
		domain := got["domain"]
		if cmd.Flags().Changed("domain") {
			domain, _ = cmd.Flags().GetString("domain")
		}
		if domain == "" {
			return nil, cobra.ShellCompDirectiveNoFileComp
		}
		return g.completeSnapshot(cmd, domain, toComplete)
	case "file":
		return nil, cobra.ShellCompDirectiveDefault
	}
	return nil, cobra.ShellCompDirectiveNoFileComp
}

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

// completeSnapshot completes the domain's snapshots' names, read as
// snapshot-list reads them.
func (g *globals) completeSnapshot(cmd *cobra.Command, domain, toComplete string) ([]string, cobra.ShellCompDirective) {
	d, done, err := g.open(cmd.Context())
	if err != nil {
		cobra.CompDebugln(err.Error(), true)
		return nil, cobra.ShellCompDirectiveError
	}
	defer done()
	snaps, err := d.ListAllSnapshots(cmd.Context(), domain, 0)
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

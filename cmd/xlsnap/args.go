package main

import (
	"context"
	"fmt"
	"os"
	"strings"

	"github.com/mattn/go-isatty"
	"github.com/spf13/cobra"

	"github.com/xlsnap/xlsnap/driver"
	"github.com/xlsnap/xlsnap/errdefs"
)

// operands gives each bare argument to the first of the named options
// not already given by its flag, in order, so "snapshot-info web s1",
// "snapshot-info --domain web s1" and "snapshot-info s1 --domain web"...
// mean what they mean to virsh. A repeatable option (virsh's argv
// option, snapshot-create-as's --diskspec: always the last name) is never
// used up: it takes every argument left.
func operands(cmd *cobra.Command, args []string, names ...string) error {
next:
	for _, a := range args {
		for _, n := range names {
			if !cmd.Flags().Changed(n) || repeatable(cmd, n) {
				if err := cmd.Flags().Set(n, a); err != nil {
					return usagef("%v", err)
				}
				continue next
			}
		}
		return usagef("unexpected data '%s'", a)
	}
	return nil
}

// operandsKey annotates a command with its operand options, in order.
const operandsKey = "xlsnap-operands"

// assignOperands is what operands would set, without setting it: each
// option's value from the arguments, keyed by option name, and the
// option the next argument would fill ("" when none would).
func assignOperands(cmd *cobra.Command, args []string, names []string) (map[string]string, string) {
	got := map[string]string{}
	free := func(n string) bool {
		_, taken := got[n]
		return (!cmd.Flags().Changed(n) && !taken) || repeatable(cmd, n)
	}
next:
	for _, a := range args {
		for _, n := range names {
			if free(n) {
				got[n] = a
				continue next
			}
		}
	}
	for _, n := range names {
		if free(n) {
			return got, n
		}
	}
	return got, ""
}

func repeatable(cmd *cobra.Command, name string) bool {
	f := cmd.Flags().Lookup(name)
	return f != nil && strings.HasSuffix(f.Value.Type(), "Array")
}

// required refuses a command whose operands are missing, as virsh does
// before it runs anything: one error line for each.
func required(cmd *cobra.Command, names ...string) error {
	var missing []error
	for _, n := range names {
		if !cmd.Flags().Changed(n) {
			missing = append(missing, usagef("command '%s' requires <%s> option", cmd.Name(), n))
		}
	}
	if len(missing) == 0 {
		return nil
	}
	return errorLines(missing)
}

// exclusive refuses two options together, in virsh's words.
func exclusive(cmd *cobra.Command, a, b string) error {
	if cmd.Flags().Changed(a) && cmd.Flags().Changed(b) {
		return usagef("Options --%s and --%s are mutually exclusive", a, b)
	}
	return nil
}

// domainCmd is a command on one domain: its operands are resolved, the
// ones it cannot do without (--domain, and those needs names) required,
// and the rest checked (check) before the driver opens; a domain the
// source does not have is reported as virsh reports it.
func (a *app) domainCmd(cmd *cobra.Command, domain *string, names []string, needs func() []string, check func() error,
	body func(ctx context.Context, d *driver.Driver) error) {
	cmd.Args = cobra.ArbitraryArgs
	cmd.Flags().StringVar(domain, "domain", "", "the domain (or the first operand)")
	names = append([]string{"domain"}, names...)
	// Completion reads the operands' order from here (frontdoor.go).
	cmd.Annotations = map[string]string{operandsKey: strings.Join(names, ",")}
	cmd.RunE = func(cmd *cobra.Command, args []string) error {
		if err := operands(cmd, args, names...); err != nil {
			return err
		}
		need := []string{"domain"}
		if needs != nil {
			need = append(need, needs()...)
		}
		if err := required(cmd, need...); err != nil {
			return err
		}
		if check != nil {
			if err := check(); err != nil {
				return err
			}
		}
		err := a.withDriver(func(cmd *cobra.Command, d *driver.Driver, _ []string) error {
			return body(cmd.Context(), d)
		})(cmd, []string{*domain})
		if errdefs.CodeOf(err) == errdefs.CodeNoDomain {
			return &cliError{msg: fmt.Sprintf("failed to get domain '%s'", *domain), err: err}
		}
		return err
	}
}

// lookup finds a snapshot by name, or the current one, with libvirt's
// messages (as virsh prints them) for a name that is not there and a
// domain with no current snapshot.
func lookup(ctx context.Context, d *driver.Driver, domain, name string, current bool) (*driver.Snapshot, error) {
	if current {
		s, err := d.SnapshotCurrent(ctx, domain, 0)
		if errdefs.CodeOf(err) == errdefs.CodeNoDomainSnapshot {
			return nil, &cliError{msg: "Domain snapshot not found: the domain does not have a current snapshot", err: err}
		}
		return s, err
	}
	s, err := d.SnapshotLookupByName(ctx, domain, name, 0)
	if errdefs.CodeOf(err) == errdefs.CodeNoDomainSnapshot {
		return nil, &cliError{msg: fmt.Sprintf("Domain snapshot not found: no domain snapshot with matching name '%s'", name), err: err}
	}
	return s, err
}

// snapshotOrCurrent checks virsh's pair: a snapshot name or --current,
// one of them and not both.
func snapshotOrCurrent(cmd *cobra.Command, current bool) error {
	named := cmd.Flags().Changed("snapshotname")
	switch {
	case named && current:
		return usagef("--snapshotname and --current are mutually exclusive")
	case !named && !current:
		return usagef("--snapshotname or --current is required")
	}
	return nil
}

func isTerminal(f *os.File) bool { return isatty.IsTerminal(f.Fd()) }

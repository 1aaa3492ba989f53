// Command xlsnap is a virsh-like front end to xlsnap's domain snapshots
// for Xen toolstacks.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"slices"
	"strings"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/xlsnap/xlsnap/errdefs"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	root, a := newRoot()
	err := root.ExecuteContext(ctx)
	stop()
	if err != nil {
		// --json is honoured even when the flags did not parse, so a
		// script always gets an object.
		os.Exit(reportError(os.Stderr, a.json || slices.Contains(os.Args[1:], "--json"), err))
	}
	os.Exit(exitOK)
}

const exitCodesHelp = `Exit codes:
  0  the command did what it was asked
  1  it failed: one "error: " line on stderr (with --json, an object
     {"error": {"code": N, "name": "VIR_ERR_...", "message": "..."}}
     carrying libvirt's error code)
  2  check found problems (listed on stdout); nothing failed
`

// app is the state every command shares: the connection options
// (globals) and how output is printed.
type app struct {
	*globals
	progress string
}

// newRoot builds the command tree; cobra gives virsh-style subcommands and
// GNU flags without a hand-written parser.
func newRoot() (*cobra.Command, *app) {
	root := &cobra.Command{
		Use:           "xlsnap",
		Short:         "Domain snapshots for Xen toolstacks, the virsh way",
		Long:          "Domain snapshots for Xen toolstacks, the virsh way.\n\n" + exitCodesHelp,
		SilenceUsage:  true,
		SilenceErrors: true,
		// Without a command, the help; with one cobra does not know,
		// virsh's error.
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) > 0 {
				return usagef("unknown command: '%s'", args[0])
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error { return cmd.Help() },
	}
	a := &app{globals: &globals{}}
	a.register(root)
	root.PersistentFlags().StringVar(&a.progress, "progress", "auto",
		"progress of long jobs on stderr: bar, json (one object a line), none, or auto (json under --json when stderr is no terminal, a bar on a terminal)")
	root.SetFlagErrorFunc(flagError)
	root.AddCommand(a.chainCmd())
	root.AddCommand(a.snapshotCommands()...)
	root.AddCommand(a.domblklistCmd(), a.checkCmd(), a.rescanCmd(), a.chainChangingCmd(), a.coalesceCmd())
	root.AddCommand(a.blockCommitCmd(), a.blockPullCmd())
	root.AddCommand(a.serveCmd())
	root.AddCommand(a.eventsCmd())
	for _, c := range root.Commands() {
		c.SetUsageTemplate(c.UsageTemplate() + "\n" + exitCodesHelp)
	}
	a.frontDoor(root)
	return root, a
}

// flagError words pflag's complaints as virsh does.
func flagError(cmd *cobra.Command, err error) error {
	if opt, ok := strings.CutPrefix(err.Error(), "unknown flag: "); ok {
		return usagef("command '%s' doesn't support option %s", cmd.Name(), opt)
	}
	return usagef("%v", err)
}

// cliError is a failure the command words itself, as virsh words its own
// checks and lookups; it keeps the library's error for errors.Is and for
// libvirt's code.
type cliError struct {
	msg string
	err error
}

func (e *cliError) Error() string { return e.msg }
func (e *cliError) Unwrap() error { return e.err }

// errorLines are failures virsh reports together, one "error: " line
// each (such as every operand a command lacks).
type errorLines []error

func (e errorLines) Error() string   { return errors.Join(e...).Error() }
func (e errorLines) Unwrap() []error { return e }

// usagef is a wrong use of the command: libvirt's invalid argument.
func usagef(format string, args ...any) error {
	return &cliError{msg: fmt.Sprintf(format, args...), err: errdefs.ErrInvalidArg}
}

// Command xlsnap is a virsh-like front end to xlsnap's domain snapshots
// for Xen toolstacks.
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := newRoot().ExecuteContext(ctx); err != nil {
		fmt.Fprintf(os.Stderr, "xlsnap: %v\n", err)
		os.Exit(1)
	}
}

// newRoot builds the command tree; cobra gives virsh-style subcommands and
// GNU flags without a hand-written parser.
func newRoot() *cobra.Command {
	root := &cobra.Command{
		Use:           "xlsnap",
		Short:         "Domain snapshots for Xen toolstacks, the virsh way",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	g := &globals{}
	g.register(root)
	root.AddCommand(newChainCmd())
	root.AddCommand(g.snapshotCommands()...)
	root.AddCommand(g.domblklistCmd(), g.checkCmd(), g.rescanCmd())
	g.frontDoor(root)
	return root
}

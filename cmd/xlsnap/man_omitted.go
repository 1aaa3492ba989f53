//go:build !xlsnap_man

package main

import "github.com/spf13/cobra"

// addManCommand: the man page generator is only in builds tagged
// xlsnap_man (man.go says why).
func addManCommand(*cobra.Command) {}

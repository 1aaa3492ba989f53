//go:build xlsnap_man

package main

import (
	"os"

	"github.com/spf13/cobra"
	"github.com/spf13/cobra/doc"
)

// addManCommand adds the hidden __man DIR that make install runs from a
// build with the tag xlsnap_man. cobra/doc drags in a Markdown and a YAML
// library whose package initialisation alone costs about a millisecond, a
// third of a chain command's run, so the installed binaries leave it out.
func addManCommand(root *cobra.Command) {
	root.AddCommand(&cobra.Command{
		Use:    "__man DIR",
		Short:  "Write a man page for xlsnap and each of its commands into DIR",
		Hidden: true,
		Args:   cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			// No date of generation in the pages (SOURCE_DATE_EPOCH sets
			// the header's), so a rebuild of one version is byte-identical.
			root.DisableAutoGenTag = true
			if err := os.MkdirAll(args[0], 0o755); err != nil {
				return err
			}
			return doc.GenManTree(root, &doc.GenManHeader{Title: "XLSNAP", Section: "1", Source: "xlsnap " + root.Version}, args[0])
		},
	})
}

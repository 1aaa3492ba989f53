package main

import (
	"slices"
	"strings"
	"testing"
)

// complete runs the shells' completion request and returns the
// candidates (cobra prints one a line, then :DIRECTIVE).
func (c *cli) complete(args ...string) []string {
	c.t.Helper()
	out := c.ok(append([]string{"__complete"}, args...)...)
	var got []string
	for line := range strings.Lines(out) {
		if line = strings.TrimSpace(line); line != "" && !strings.HasPrefix(line, ":") {
			got = append(got, line)
		}
	}
	return got
}

// TestCompletion: the shells complete a domain, then its snapshots'
// names, on the commands that take them.
func TestCompletion(t *testing.T) {
	c := newCLI(t)
	c.ok("snapshot-create-as", "vm", "before", "--disk-only")
	c.ok("snapshot-create-as", "vm", "after", "--disk-only")
	for _, tc := range []struct {
		args []string
		want []string
	}{
		{[]string{"snapshot-revert", ""}, []string{"vm"}},
		{[]string{"snapshot-list", "v"}, []string{"vm"}},
		{[]string{"domblklist", "x"}, nil},
		{[]string{"snapshot-revert", "vm", ""}, []string{"before", "after"}},
		{[]string{"snapshot-delete", "vm", "b"}, []string{"before"}},
		{[]string{"snapshot-dumpxml", "vm", ""}, []string{"before", "after"}},
		{[]string{"snapshot-revert", "vm", "before", ""}, nil},
		// Named forms, and operands after a named option: each value is
		// completed as the option it fills.
		{[]string{"snapshot-info", "--domain", ""}, []string{"vm"}},
		{[]string{"snapshot-info", "--domain", "vm", "--snapshotname", ""}, []string{"before", "after"}},
		{[]string{"snapshot-info", "--snapshotname", "", "vm"}, []string{"vm"}},
		{[]string{"snapshot-info", "--domain", "vm", ""}, []string{"before", "after"}},
		{[]string{"snapshot-info", "--domain", "vm", "before", ""}, nil},
		{[]string{"snapshot-list", "vm", "--from", "a"}, []string{"after"}},
		{[]string{"snapshot-list", "vm", ""}, []string{"before", "after"}},
		{[]string{"snapshot-list", "--domain", "vm", "--from", ""}, []string{"before", "after"}},
		{[]string{"snapshot-current", "vm", ""}, []string{"before", "after"}},
		{[]string{"snapshot-create-as", "vm", ""}, nil},
		{[]string{"snapshot-info", "--snapshotname", ""}, nil}, // no domain yet
	} {
		// The shells sort the candidates; the order is not the command's.
		got := c.complete(tc.args...)
		slices.Sort(got)
		slices.Sort(tc.want)
		if !slices.Equal(got, tc.want) {
			t.Errorf("xlsnap __complete %q: %q, want %q", tc.args, got, tc.want)
		}
	}
}

func TestVersion(t *testing.T) {
	stdout, stderr, code := runXlsnap(t, "--version")
	if code != 0 || !strings.HasPrefix(stdout, "xlsnap version ") || len(strings.TrimSpace(stdout)) <= len("xlsnap version") {
		t.Errorf("--version: exit %d, stdout %q, stderr %q", code, stdout, stderr)
	}
}

package main

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"testing"
)

// TestMain lets a test run the real command, exit code and all, by
// re-executing the test binary with XLSNAP_RUN_MAIN set.
func TestMain(m *testing.M) {
	if os.Getenv("XLSNAP_RUN_MAIN") == "1" {
		main()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// runXlsnap runs the command as a process and returns stdout, stderr and
// the exit code.
func runXlsnap(t *testing.T, args ...string) (string, string, int) {
	t.Helper()
	cmd := exec.CommandContext(context.Background(), os.Args[0], args...)
	cmd.Env = append(os.Environ(), "XLSNAP_RUN_MAIN=1")
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return stdout.String(), stderr.String(), code
}

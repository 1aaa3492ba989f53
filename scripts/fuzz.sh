#!/usr/bin/env bash
# Runs every Fuzz target in the module for the given time each.
# The minimiser is held to a few attempts per input: left at its default
# (a minute) it spent short runs shrinking the 64 KiB seeds instead of
# fuzzing. A failure still shows the whole input that failed.
set -euo pipefail
fuzztime=${1:-10s}
minimizetime=${FUZZMINIMIZETIME:-10x}
for pkg in $(go list ./...); do
  dir=$(go list -f '{{.Dir}}' "$pkg")
  for target in $(grep -ho '^func Fuzz[A-Za-z0-9_]*' "$dir"/*_test.go 2>/dev/null | sed 's/^func //'); do
    echo "fuzz: $pkg $target ($fuzztime)"
    go test -run '^$' -fuzz "^${target}\$" -fuzztime "$fuzztime" -fuzzminimizetime "$minimizetime" "$pkg"
  done
done

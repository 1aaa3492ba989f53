#!/usr/bin/env bash
# Runs every Fuzz target in the module for the given time each.
# The minimiser is held to a few attempts per input: left at its default
# (a minute) it spent short runs shrinking the 64 KiB seeds instead of
# fuzzing. A failure still shows the whole input that failed.
#
# Go 1.26's fuzz coordinator can fail a target with a bare "context
# deadline exceeded" when -fuzztime ends while a worker is mid-call
# (golang/go#75804, fixed in Go 1.27): no input failed, none is written.
# Such a run counts only if it left a failing input in testdata/fuzz;
# otherwise the target's corpus is replayed (go test -run) to be sure,
# and the run goes on.
set -euo pipefail
fuzztime=${1:-10s}
minimizetime=${FUZZMINIMIZETIME:-10x}
for pkg in $(go list ./...); do
  dir=$(go list -f '{{.Dir}}' "$pkg")
  for target in $(grep -ho '^func Fuzz[A-Za-z0-9_]*' "$dir"/*_test.go 2>/dev/null | sed 's/^func //'); do
    echo "fuzz: $pkg $target ($fuzztime)"
    corpus="$dir/testdata/fuzz/$target"
    before=$(ls "$corpus" 2>/dev/null | sort || true)
    out=$(mktemp)
    if go test -run '^$' -fuzz "^${target}\$" -fuzztime "$fuzztime" -fuzzminimizetime "$minimizetime" "$pkg" 2>&1 | tee "$out"; then
      rm -f "$out"
      continue
    fi
    after=$(ls "$corpus" 2>/dev/null | sort || true)
    if [ "$before" = "$after" ] && grep -q '^    context deadline exceeded$' "$out" && ! grep -q 'Failing input written' "$out"; then
      echo "fuzz: $target: the coordinator's shutdown race (golang/go#75804), no failing input; replaying the corpus"
      rm -f "$out"
      go test -count=1 -run "^${target}\$" "$pkg"
      continue
    fi
    rm -f "$out"
    exit 1
  done
done

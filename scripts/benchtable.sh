#!/usr/bin/env bash
# Reads `go test -bench` output on stdin, passes it through, then prints
# every native/baseline pair (sub-benchmarks NAME/native and NAME/<tool>)
# as a table with the ratio baseline ÷ native.
set -euo pipefail
tee /dev/stderr | awk '
/^Benchmark/ {
  name = $1; sub(/-[0-9]+$/, "", name)
  for (i = 2; i <= NF; i++) if ($(i+1) == "ns/op") ns = $i
  n = split(name, parts, "/")
  kind = parts[n]; key = substr(name, 1, length(name) - length(kind) - 1)
  if (kind == "native") { native[key] = ns; order[++count] = key }
  else { base[key] = ns; baseName[key] = kind }
}
END {
  if (count == 0) exit
  printf "\n%-32s %14s %14s %10s\n", "benchmark", "xlsnap", "baseline", "ratio"
  for (i = 1; i <= count; i++) {
    k = order[i]
    if (!(k in base)) continue
    printf "%-32s %11.1f µs %11.1f µs %9.2f×  (vs %s)\n", k, native[k] / 1000, base[k] / 1000, base[k] / native[k], baseName[k]
  }
}' 1>&2

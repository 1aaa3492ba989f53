#!/usr/bin/env bash
# make install-check: runs make install into a throw-away DESTDIR and
# checks that every file is in place and works: both binaries (the lean
# one printing its version), a man page per command, and the three shells'
# completion scripts.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=$(mktemp -d /tmp/xlsnap-install.XXXXXX)
trap 'rm -rf "$dest"' EXIT
make -s install DESTDIR="$dest" PREFIX=/usr >/dev/null
fail=0
need() { [ -s "$dest/$1" ] || { echo "install-check: missing $1" >&2; fail=1; }; }
need usr/bin/xlsnap
need usr/bin/xlsnap-libvirt
need usr/share/man/man1/xlsnap.1
for cmd in chain chain-changing check domblklist rescan snapshot-create snapshot-create-as snapshot-current snapshot-delete \
	snapshot-dumpxml snapshot-info snapshot-list snapshot-parent snapshot-revert; do
	need "usr/share/man/man1/xlsnap-$cmd.1"
done
need usr/share/bash-completion/completions/xlsnap
need usr/share/zsh/site-functions/_xlsnap
need usr/share/fish/vendor_completions.d/xlsnap.fish
[ -x "$dest/usr/bin/xlsnap" ] && [ -x "$dest/usr/bin/xlsnap-libvirt" ] || { echo "install-check: binaries not executable" >&2; fail=1; }
"$dest/usr/bin/xlsnap" --version | grep -q '^xlsnap version .' || { echo "install-check: xlsnap --version prints no version" >&2; fail=1; }
grep -q '__complete' "$dest/usr/share/bash-completion/completions/xlsnap" || { echo "install-check: bash completion does not call xlsnap __complete" >&2; fail=1; }
[ "$fail" = 0 ] && echo "install-check: ok ($(find "$dest" -type f | wc -l) files)"
exit "$fail"

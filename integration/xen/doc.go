// Package xen is xlsnap's Xen test bed: a real Xen 4.17 with a PV dom0,
// booted under QEMU's software emulation (see run.sh), and tests that run
// inside that dom0 against PV guests whose qdisk qcow2 disks keep
// writing known records (build tags xen and libxl; `make test-xen`).
// Without the tags only this file builds.
package xen

// Package libxl is the xenlight back end that drives active Xen domains
// through libxenlight itself (cgo, build tag libxl; Debian's libxen-dev):
// pause and unpause, memory save (xl save, with -c's checkpoint) and
// restore onto repointed disks, destroy, and the device model's QMP
// socket that libxl opens for every domain. Without the tag only the
// pure Go parts build: the errors, libxl's JSON domain configuration
// helpers and xl's save-file header.
package libxl

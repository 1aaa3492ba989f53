package libvirt

// SessionDaemon is sessionDaemon for the driver's tests in package
// libvirt_test (the driver's libvirt source imports this package).
var SessionDaemon = sessionDaemon

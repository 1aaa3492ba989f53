package libvirt

// SessionDaemon and QEMUDomainXML are sessionDaemon and qemuDomainXML for
// the driver's tests in package libvirt_test (the driver's libvirt source
// imports this package).
var (
	SessionDaemon = sessionDaemon
	QEMUDomainXML = qemuDomainXML
)

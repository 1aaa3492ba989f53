package libvirt

// SessionDaemon, StartSession, QEMUDomainXML and QEMUDomainQMPXML are
// sessionDaemon, startSession, qemuDomainXML and qemuDomainQMPXML for the
// driver's tests in package libvirt_test (the driver's libvirt source
// imports this package).
var (
	SessionDaemon    = sessionDaemon
	StartSession     = startSession
	QEMUDomainXML    = qemuDomainXML
	QEMUDomainQMPXML = qemuDomainQMPXML
)

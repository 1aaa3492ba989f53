package live

import "syscall"

var sigStop, sigCont = syscall.SIGSTOP, syscall.SIGCONT

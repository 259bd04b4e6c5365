// vdierror.h - stand-in declarations of the VDI error codes on Linux.
//
// Written for vdistream's stand-in libsqlvdi.so from Microsoft's public Linux header
// `samples/features/sqlvdi-linux/vdierror.h` in github.com/microsoft/sql-server-samples:
// the same macros and values. On Linux MAKE_HRESULT yields an int, so 0x80770003 is
// returned as the negative int -2139684861.
#ifndef VDIERROR_H_
#define VDIERROR_H_

// Build an int result from severity, facility and code (COM's layout).
#define MAKE_HRESULT(sev, fac, code) \
    ((int) (((unsigned long)(sev) << 31) | ((unsigned long)(fac) << 16) | ((unsigned long)(code))) )

// All VDI errors carry the prefix 0x8077; callers test results with SUCCEEDED/FAILED.
#define VD_ERROR(code) MAKE_HRESULT(1, 0x77, code)

#define VD_E_NOTOPEN        VD_ERROR(2)  /* 0x80770002 the object was not open */
#define VD_E_TIMEOUT        VD_ERROR(3)  /* 0x80770003 the wait interval elapsed */
#define VD_E_ABORT          VD_ERROR(4)  /* 0x80770004 an abort allows only termination */
#define VD_E_SECURITY       VD_ERROR(5)  /* 0x80770005 security environment failed */
#define VD_E_INVALID        VD_ERROR(6)  /* 0x80770006 invalid parameter */
#define VD_E_INSTANCE_NAME  VD_ERROR(7)  /* 0x80770007 instance name not recognised */
#define VD_E_NOTSUPPORTED   VD_ERROR(9)  /* 0x80770009 configuration invalid */
#define VD_E_MEMORY         VD_ERROR(10) /* 0x8077000a out of memory */
#define VD_E_UNEXPECTED     VD_ERROR(11) /* 0x8077000b unexpected internal error */
#define VD_E_PROTOCOL       VD_ERROR(12) /* 0x8077000c call not valid in this state */
#define VD_E_OPEN           VD_ERROR(13) /* 0x8077000d all devices are open */
#define VD_E_CLOSE          VD_ERROR(14) /* 0x8077000e the object is now closed */
#define VD_E_BUSY           VD_ERROR(15) /* 0x8077000f the resource is busy */

#endif

// vdss.h - the flat C API of libsqlvdi_standin_server.so (vdistream's stand-in of the server
// side of SQL Server's VDI), as fixed by Contract A. Results are vdierror.h codes (0 = ok).
// Timeouts are milliseconds; a negative value waits forever.
#pragma once

#include <stdint.h>

#include "vdi.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct vdss_set vdss_set;

/* Waits for the client's Create of `set_name`; VD_E_NOTOPEN on timeout. */
int vdss_open(const char* set_name, int timeout_ms, vdss_set** out);
/* The configuration the client passed to Create. */
int vdss_client_config(vdss_set* s, VDConfig* out);
/* Opens a device by a VIRTUAL_DEVICE name (before vdss_configure); index in *index_out. */
int vdss_open_device(vdss_set* s, const char* name, int* index_out);
/* Creates the buffer area and publishes the final configuration (GetConfiguration returns). */
int vdss_configure(vdss_set* s, const VDConfig* final_cfg, uint64_t buffer_area_bytes);
/* The buffer area in the server's mapping (NULL before vdss_configure). */
uint8_t* vdss_buffer_base(vdss_set* s);
/* Queues a command; Read/Write carry [buffer_offset, +size) of the buffer area.
   VD_E_BUSY when the device's ring is full. */
int vdss_send(vdss_set* s, int device, int code, int size, int64_t position,
              uint64_t buffer_offset, uint32_t* tag_out);
/* Next completion of that device, in completion order; VD_E_TIMEOUT; VD_E_ABORT once the
   set is aborted (either side, or the client process gone). */
int vdss_wait(vdss_set* s, int device, int timeout_ms, uint32_t* tag, int* completion,
              uint32_t* bytes, int64_t* position);
/* Closes a device: the client's GetCommand returns VD_E_CLOSE once its queue is empty. */
int vdss_close_device(vdss_set* s, int device);
int vdss_signal_abort(vdss_set* s);
/* 1 while the client process exists, 0 once it is gone. */
int vdss_client_alive(vdss_set* s);
/* Unmaps, unlinks what the server created, frees. With devices still open: abort, then
   VD_E_PROTOCOL (spec 5.3); the set is released either way. */
int vdss_close(vdss_set* s);

#ifdef __cplusplus
}
#endif

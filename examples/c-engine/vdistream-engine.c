/*
 * vdistream-engine: an example engine ("server" in VDI terms) in C that opens a
 * virtual device set published by vdistream, backs standard input up into it or
 * restores the set's stream to standard output.
 *
 * Written from the wire protocol alone (docs/transport.md, "the vdistream set
 * transport, version 1"): no vdistream code is used or needed. C99, libc and Linux
 * headers only:
 *
 *     cc -O2 -Wall -Wextra -Werror -o vdistream-engine vdistream-engine.c
 *
 *     vdistream-engine backup NAME [--dir DIR] [--instance I] [--chunk BYTES]
 *                                  [--depth N] [--timeout SECONDS]
 *     vdistream-engine restore NAME [same options]
 *
 * The stream layout: every device's stream starts with a 512-byte header (magic
 * "VDCENG01", format version, chunk size, device index, device count, a random stream
 * id of the backup; see "the stream header" below). Then standard input is cut into
 * chunks of --chunk bytes (the last one may be shorter); chunk k is written to device
 * k % N, where N is the device count from WELCOME's VDConfig. A restore reads and
 * checks every header first (the chunk size comes from them: --chunk is for backups),
 * then reads chunk-sized READs round-robin in the same order and stops at the first
 * short read, HANDLE_EOF or NO_DATA_DETECTED; another device that still has a chunk
 * after that end means a truncated stream, an error.
 * Buffers are mapped from the set's memfd segments: stdin is read straight into them
 * and stdout written straight from them (zero copy across the two processes).
 *
 * Structure: one thread, blocking I/O driven by poll(2). Requests with a REPLY are
 * sent one at a time (request()); commands are sent without waiting (send_command())
 * and tracked by id until their COMPLETION. Whatever we wait for, every record that
 * arrives meanwhile is dispatched (handle_record()): COMPLETION, STATE and SEGMENT
 * records may come at any time, even between a request and its REPLY.
 *
 * Exit status: 0 on success, 1 on any failure (one line on stderr naming the set and,
 * when there is one, the device), 2 on a usage error.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

/* ---- protocol constants (docs/transport.md §2) -------------------------------- */

#define PROTOCOL_VERSION 1u
#define HEADER_SIZE 16u
#define MAX_RECORD 4096u
#define MAX_MESSAGE 65536u
#define SEGMENT_ALIGNMENT 65536u /* every segment is mapped at such a boundary */ /* a message carries one or more records back to back */
#define NO_DEVICE 0xFFFFFFFFu
#define NO_SEGMENT 0xFFFFFFFFu
#define VDCONFIG_SIZE 44u

enum record_type {
    R_WELCOME = 0x0001,
    R_REFUSED = 0x0002,
    R_REPLY = 0x0003,
    R_SEGMENT = 0x0004,
    R_COMPLETION = 0x0005,
    R_STATE = 0x0006,
    R_BEGIN_CONFIGURATION = 0x0011,
    R_REQUEST_BUFFERS = 0x0012,
    R_END_CONFIGURATION = 0x0013,
    R_QUERY_AVAILABLE_BUFFERS = 0x0014,
    R_OPEN_DEVICE = 0x0015,
    R_ALLOCATE_BUFFER = 0x0016,
    R_FREE_BUFFER = 0x0017,
    R_SEND_COMMAND = 0x0018,
    R_CLOSE_DEVICE = 0x0019,
    R_SIGNAL_ABORT = 0x001A,
    R_CLOSE = 0x001B
};

enum server_state {
    S_DNE = 0,
    S_CONNECTED = 1,
    S_CONFIGURABLE = 2,
    S_INITIALIZING = 3,
    S_ACTIVE = 4,
    S_NORMALLY_TERMINATED = 5,
    S_ABORTED = 6
};

/* VDConfig fields, in record order */
enum { C_DEVICE_COUNT, C_FEATURES, C_PREFIX_ZONE_SIZE, C_ALIGNMENT, C_SOFT_FILE_MARK_BLOCK_SIZE,
       C_EOM_WARNING_SIZE, C_SERVER_TIMEOUT_MS, C_BLOCK_SIZE, C_MAX_IO_DEPTH,
       C_MAX_TRANSFER_SIZE, C_BUFFER_AREA_SIZE, C_FIELDS };

/* VDF_* feature bits (the VDI headers' values) */
#define VDF_WRITE_MEDIA 0x10000u
#define VDF_READ_MEDIA 0x20000u
#define VDF_COMPLETE_ENABLED 0x40000u

/* VDC_* command codes */
#define VDC_READ 1u
#define VDC_WRITE 2u
#define VDC_CLEAR_ERROR 3u
#define VDC_FLUSH 12u
#define VDC_COMPLETE 19u

/* Win32 completion codes */
#define ERROR_SUCCESS 0u
#define ERROR_HANDLE_EOF 38u
#define ERROR_NO_DATA_DETECTED 1104u
#define ERROR_IO_DEVICE 1117u
#define ERROR_OPERATION_ABORTED 995u


/* engine choices */
#define BLOCK_SIZE 512u
#define TRANSFER_UNIT 65536u
#define TRANSFER_MAX (4u * 1024u * 1024u)
#define DEFAULT_CHUNK (256u * 1024u)
#define DEFAULT_DEPTH 3u
#define MAX_DEPTH 16u
#define WELCOME_TIMEOUT_MS 60000
#define GOODBYE_TIMEOUT_MS 2000

/* ---- state --------------------------------------------------------------------- */

struct segment {
    unsigned char *addr;    /* the memfd's first byte, at a 64 KiB boundary */
    uint64_t length;
    void *reserved;         /* the whole range reserved for it (what munmap releases) */
    size_t span;
};

struct cmd {                /* one SEND_COMMAND until its COMPLETION */
    uint32_t id;            /* 0 when not in flight */
    uint32_t device;
    uint32_t code;
    uint32_t size;
    int done;
    uint32_t completion;
    uint32_t transferred;
    int64_t position;
};

struct slot {               /* one buffer of one device, reused round after round */
    uint32_t segment;
    uint64_t offset;
    unsigned char *data;
    int used;               /* cmd was sent and its completion not yet checked */
    struct cmd cmd;
};

struct device {
    char name[128];
    uint32_t index;         /* from OPEN_DEVICE's REPLY */
    uint64_t offset;        /* bytes written to / read from this device's stream */
    int errored;            /* a command completed with a failure (needs CLEAR_ERROR) */
    int ended;              /* restore: a READ found the end of this device's stream */
    struct slot *slots;
    struct slot head;       /* restore: the buffer the stream header is read into */
    struct cmd ctl;         /* FLUSH / COMPLETE / CLEAR_ERROR */
};

struct reply {
    uint32_t hresult;
    uint32_t state;
    uint64_t value0;
    uint64_t value1;
    unsigned char tail[MAX_RECORD];
    size_t tail_len;
};

static const char *program = "vdistream-engine";
static const char *set_name = "";
static int sock = -1;
static int connected;        /* WELCOME received: the set is ours to abort */
static int lost;             /* the connection is gone */
static int failing;          /* fail() is running: no recursion */
static uint32_t state = S_DNE;
static uint32_t config[C_FIELDS];
static uint32_t final_config[C_FIELDS];
static uint32_t device_count;
static struct device *devices;
static struct segment *segments;
static uint32_t segment_count;
static uint32_t next_id = 1;
static int timeout_ms = -1;  /* per wait for the client; -1: none */

static struct cmd **inflight; /* commands sent and not completed */
static size_t inflight_count, inflight_cap;

static uint32_t expect_id;   /* the request waiting for its REPLY, 0 if none */
static int reply_ready;
static struct reply the_reply;

static volatile sig_atomic_t interrupted;

/* ---- little-endian fields -------------------------------------------------------- */

static void put16(unsigned char *p, uint16_t v) { p[0] = (unsigned char)v; p[1] = (unsigned char)(v >> 8); }
static void put32(unsigned char *p, uint32_t v) { for (int i = 0; i < 4; i++) p[i] = (unsigned char)(v >> (8 * i)); }
static void put64(unsigned char *p, uint64_t v) { for (int i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i)); }
static uint16_t get16(const unsigned char *p) { return (uint16_t)(p[0] | (p[1] << 8)); }
static uint32_t get32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static uint64_t get64(const unsigned char *p) { return (uint64_t)get32(p) | (uint64_t)get32(p + 4) << 32; }

/* ---- names for messages ------------------------------------------------------------ */

static const char *state_name(uint32_t s)
{
    static const char *names[] = {"DNE", "CONNECTED", "CONFIGURABLE", "INITIALIZING",
                                  "ACTIVE", "NORMALLY_TERMINATED", "ABORTED"};
    return s < sizeof names / sizeof *names ? names[s] : "unknown state";
}

static const char *cause_name(uint32_t c)
{
    static const char *names[] = {"none", "client", "server", "server-timeout", "process-death"};
    return c < sizeof names / sizeof *names ? names[c] : "unknown cause";
}

static const char *hresult_name(uint32_t hr)
{
    switch (hr) {
    case 0: return "NOERROR";
    case 0x80770002u: return "VD_E_NOTOPEN";
    case 0x80770003u: return "VD_E_TIMEOUT";
    case 0x80770004u: return "VD_E_ABORT";
    case 0x80770005u: return "VD_E_SECURITY";
    case 0x80770006u: return "VD_E_INVALID";
    case 0x80770007u: return "VD_E_INSTANCE_NAME";
    case 0x80770009u: return "VD_E_NOTSUPPORTED";
    case 0x8077000Au: return "VD_E_MEMORY";
    case 0x8077000Bu: return "VD_E_UNEXPECTED";
    case 0x8077000Cu: return "VD_E_PROTOCOL";
    case 0x8077000Du: return "VD_E_OPEN";
    case 0x8077000Eu: return "VD_E_CLOSE";
    case 0x8077000Fu: return "VD_E_BUSY";
    default: return "unknown HRESULT";
    }
}

static const char *completion_name(uint32_t c)
{
    switch (c) {
    case 0: return "SUCCESS";
    case 6: return "INVALID_HANDLE";
    case 29: return "WRITE_FAULT";
    case 30: return "READ_FAULT";
    case 38: return "HANDLE_EOF";
    case 39: return "HANDLE_DISK_FULL";
    case 50: return "NOT_SUPPORTED";
    case 112: return "DISK_FULL";
    case 995: return "OPERATION_ABORTED";
    case 1100: return "END_OF_MEDIA";
    case 1101: return "FILEMARK_DETECTED";
    case 1104: return "NO_DATA_DETECTED";
    case 1117: return "IO_DEVICE";
    case 1129: return "EOM_OVERFLOW";
    case 1450: return "NO_SYSTEM_RESOURCES";
    default: return "Win32 error";
    }
}

static const char *command_name(uint32_t code)
{
    switch (code) {
    case VDC_READ: return "READ";
    case VDC_WRITE: return "WRITE";
    case VDC_CLEAR_ERROR: return "CLEAR_ERROR";
    case VDC_FLUSH: return "FLUSH";
    case VDC_COMPLETE: return "COMPLETE";
    default: return "command";
    }
}

/* Printable copy of a text field (UTF-8 passes through; control bytes become '?'). */
static const char *text(const unsigned char *p, size_t n)
{
    static char buf[MAX_RECORD + 1];
    size_t i;
    for (i = 0; i < n && i < MAX_RECORD; i++)
        buf[i] = (p[i] < 0x20 || p[i] == 0x7f) ? '?' : (char)p[i];
    buf[i] = '\0';
    return buf;
}

/* ---- failure ------------------------------------------------------------------------- */

static int send_record(uint16_t type, uint32_t id, uint32_t device, const unsigned char *body,
                       size_t body_len);
static void goodbye(int abort_first);
static uint32_t new_id(void);

/* One line on stderr, "vdistream-engine: set 'NAME'[ device 'D']: message". */
static void vreport(const char *device, const char *fmt, va_list ap)
{
    char message[2048];
    vsnprintf(message, sizeof message, fmt, ap);
    if (device)
        fprintf(stderr, "%s: set '%s' device '%s': %s\n", program, set_name, device, message);
    else
        fprintf(stderr, "%s: set '%s': %s\n", program, set_name, message);
    fflush(stderr);
}

/* We failed: abort the set (SIGNAL_ABORT), CLOSE it, exit 1. `device` may be NULL. */
static void fail_device(const char *device, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vreport(device, fmt, ap);
    va_end(ap);
    if (!failing) {
        failing = 1;
        goodbye(state != S_ABORTED);
    }
    exit(1);
}

#define fail(...) fail_device(NULL, __VA_ARGS__)

/* The set was aborted by the client (STATE 6): nothing to abort, only CLOSE. */
static void client_aborted(uint32_t cause, const unsigned char *reason, size_t n)
{
    fprintf(stderr, "%s: set '%s' was aborted (cause: %s): %s\n", program, set_name,
            cause_name(cause), n ? text(reason, n) : "no reason given");
    fflush(stderr);
    state = S_ABORTED;
    if (!failing) {
        failing = 1;
        goodbye(0);
    }
    exit(1);
}

static void connection_lost(const char *how)
{
    lost = 1;
    fail("lost the connection to the client (%s): the set is aborted", how);
}

/* After a failure: optionally SIGNAL_ABORT, then CLOSE and wait a little for its REPLY
 * (or the client's disconnect), so that the client learns at once and frees the name. */
static void goodbye(int abort_first)
{
    if (sock < 0 || lost || !connected)
        return;
    if (abort_first)
        send_record(R_SIGNAL_ABORT, 0, NO_DEVICE, NULL, 0);
    uint32_t id = new_id();
    if (send_record(R_CLOSE, id, NO_DEVICE, NULL, 0) < 0)
        return;
    struct timespec start, now;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (;;) {
        clock_gettime(CLOCK_MONOTONIC, &now);
        long elapsed = (now.tv_sec - start.tv_sec) * 1000L + (now.tv_nsec - start.tv_nsec) / 1000000L;
        if (elapsed >= GOODBYE_TIMEOUT_MS)
            return;
        struct pollfd p = {.fd = sock, .events = POLLIN};
        int r = poll(&p, 1, (int)(GOODBYE_TIMEOUT_MS - elapsed));
        if (r <= 0)
            return;
        static unsigned char buf[MAX_MESSAGE];
        union {
            char buf[CMSG_SPACE(sizeof(int) * 4)];
            struct cmsghdr align;
        } control;
        struct iovec iov = {.iov_base = buf, .iov_len = sizeof buf};
        struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1,
                             .msg_control = control.buf, .msg_controllen = sizeof control.buf};
        ssize_t n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
        if (n <= 0)
            return;
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c))
            if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS)
                for (size_t j = 0; j < (c->cmsg_len - CMSG_LEN(0)) / sizeof(int); j++) {
                    int fd;
                    memcpy(&fd, CMSG_DATA(c) + j * sizeof(int), sizeof fd);
                    close(fd);
                }
        for (size_t at = 0; at + HEADER_SIZE <= (size_t)n;) { /* any record of the message */
            uint32_t len = get32(buf + at + 4);
            if (get16(buf + at) == R_REPLY && get32(buf + at + 8) == id)
                return;
            if (len < HEADER_SIZE)
                break;
            at += len;
        }
    }
}

static void on_signal(int sig) { interrupted = sig; }

static void check_interrupted(void)
{
    if (interrupted)
        fail("interrupted by signal %d (%s)", (int)interrupted, strsignal((int)interrupted));
}

/* ---- records out -------------------------------------------------------------------- */

/* Send one record; -1 (and `lost` set) when the connection is gone. */
static int send_record(uint16_t type, uint32_t id, uint32_t device, const unsigned char *body,
                       size_t body_len)
{
    unsigned char buf[MAX_RECORD];
    size_t len = HEADER_SIZE + body_len;
    if (len > MAX_RECORD)
        fail("internal error: a record of %zu bytes is too long", len);
    put16(buf, type);
    put16(buf + 2, 0);
    put32(buf + 4, (uint32_t)len);
    put32(buf + 8, id);
    put32(buf + 12, device);
    if (body_len)
        memcpy(buf + HEADER_SIZE, body, body_len);
    for (;;) {
        ssize_t n = send(sock, buf, len, MSG_NOSIGNAL);
        if (n == (ssize_t)len)
            return 0;
        if (n < 0 && errno == EINTR)
            continue;
        lost = 1;
        return -1;
    }
}

static void send_or_die(uint16_t type, uint32_t id, uint32_t device, const unsigned char *body,
                        size_t body_len)
{
    if (send_record(type, id, device, body, body_len) < 0)
        connection_lost(strerror(errno));
}

static uint32_t new_id(void)
{
    uint32_t id = next_id++;
    if (next_id == 0)
        next_id = 1; /* ids are never 0; 2^32 records later, the old ones are long answered */
    return id;
}

/* ---- records in ---------------------------------------------------------------------- */

struct record {
    unsigned char buf[MAX_RECORD];
    size_t len;
    uint16_t type;
    uint32_t id;
    uint32_t device;
    int fd; /* the SEGMENT's memfd, -1 otherwise */
};

static void protocol_error(const char *fmt, ...)
{
    char message[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(message, sizeof message, fmt, ap);
    va_end(ap);
    fail("protocol violation by the client: %s", message);
}

/* The last message received and how far its records were taken: a message carries one
 * or more records back to back (a message with a descriptor carries exactly one). */
static unsigned char message[MAX_MESSAGE];
static size_t message_len, message_at;

static int message_pending(void) { return message_at < message_len; }

/* The next record of the current message into `r`, with `fd` (the message's memfd, -1). */
static void take_record(struct record *r, int fd)
{
    size_t left = message_len - message_at;
    const unsigned char *at = message + message_at;
    if (left < HEADER_SIZE) {
        if (fd >= 0)
            close(fd);
        protocol_error("a message ends %zu bytes into a record header", left);
    }
    uint32_t len = get32(at + 4);
    if (len < HEADER_SIZE || len > MAX_RECORD || len > left) {
        if (fd >= 0)
            close(fd);
        protocol_error("record type 0x%04x says %" PRIu32 " bytes, %zu are left in its message",
                       get16(at), len, left);
    }
    memcpy(r->buf, at, len);
    r->len = len;
    message_at += len;
    r->type = get16(r->buf);
    r->id = get32(r->buf + 8);
    r->device = get32(r->buf + 12);
    r->fd = fd;
}

/* Wait for one record. Returns 0 after `wait_ms` (-1: forever) without one. */
static int receive(struct record *r, int wait_ms)
{
    if (message_pending()) {
        take_record(r, -1);
        return 1;
    }
    for (;;) {
        check_interrupted();
        struct pollfd p = {.fd = sock, .events = POLLIN};
        int ready = poll(&p, 1, wait_ms);
        if (ready < 0) {
            if (errno == EINTR)
                continue;
            fail("poll: %s", strerror(errno));
        }
        if (ready == 0)
            return 0;
        break;
    }
    union {
        char buf[CMSG_SPACE(sizeof(int) * 4)];
        struct cmsghdr align;
    } control;
    struct iovec iov = {.iov_base = message, .iov_len = sizeof message};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1,
                         .msg_control = control.buf, .msg_controllen = sizeof control.buf};
    ssize_t n;
    do
        n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
    while (n < 0 && errno == EINTR);
    if (n == 0)
        connection_lost("end of file");
    if (n < 0)
        connection_lost(strerror(errno));
    int fds[4], nfds = 0;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c))
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
            size_t k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
            for (size_t j = 0; j < k; j++) {
                int fd;
                memcpy(&fd, CMSG_DATA(c) + j * sizeof(int), sizeof fd);
                if (nfds < 4)
                    fds[nfds++] = fd;
                else
                    close(fd); /* cannot happen: the control buffer holds 4 */
            }
        }
    message_len = (size_t)n;
    message_at = 0;
    if (msg.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) {
        for (int i = 0; i < nfds; i++)
            close(fds[i]);
        message_len = 0;
        protocol_error("a message longer than %u bytes or with too many descriptors",
                       MAX_MESSAGE);
    }
    if (nfds > 1 || (nfds == 1 && (message_len < HEADER_SIZE || get16(message) != R_SEGMENT ||
                                   get32(message + 4) != message_len))) {
        for (int i = 0; i < nfds; i++)
            close(fds[i]);
        message_len = 0;
        protocol_error("%d file descriptors came with a message that is not one SEGMENT", nfds);
    }
    take_record(r, nfds ? fds[0] : -1);
    if (r->type == R_SEGMENT && r->fd < 0)
        protocol_error("SEGMENT record without its file descriptor");
    return 1;
}

static void need(const struct record *r, size_t len, const char *what)
{
    if (r->len < len)
        protocol_error("%s record of %zu bytes, expected at least %zu", what, r->len, len);
}

static void raise_state(uint32_t s)
{
    /* The mirrored state only moves forward (CONNECTED .. ABORTED are in that order). */
    if (s > state && s <= S_ABORTED)
        state = s;
}

static void on_segment(struct record *r)
{
    if (r->len != 32) {
        if (r->fd >= 0)
            close(r->fd);
        protocol_error("SEGMENT record of %zu bytes, expected 32", r->len);
    }
    if (r->fd < 0)
        protocol_error("SEGMENT record without its file descriptor");
    uint32_t index = get32(r->buf + 16);
    uint64_t length = get64(r->buf + 24);
    if (index > 1u << 20 || length == 0 || length > SIZE_MAX) {
        close(r->fd);
        protocol_error("SEGMENT %" PRIu32 " of %" PRIu64 " bytes", index, length);
    }
    if (index >= segment_count) {
        struct segment *grown = realloc(segments, sizeof *segments * (index + 1));
        if (!grown)
            fail("out of memory");
        memset(grown + segment_count, 0, sizeof *grown * (index + 1 - segment_count));
        segments = grown;
        segment_count = index + 1;
    }
    if (segments[index].addr) {
        close(r->fd);
        protocol_error("SEGMENT %" PRIu32 " sent twice", index);
    }
    /* Map it at a 64 KiB boundary, as the client does, so that the alignment of every
     * buffer (the client lays them out by offset) holds here too: reserve the range with
     * room to spare, then map the memfd over its aligned part. */
    size_t span = (size_t)length + SEGMENT_ALIGNMENT;
    void *reserved = mmap(NULL, span, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    void *addr = MAP_FAILED;
    if (reserved != MAP_FAILED) {
        uintptr_t aligned = ((uintptr_t)reserved + SEGMENT_ALIGNMENT - 1) &
                            ~(uintptr_t)(SEGMENT_ALIGNMENT - 1);
        addr = mmap((void *)aligned, (size_t)length, PROT_READ | PROT_WRITE,
                    MAP_SHARED | MAP_FIXED, r->fd, 0);
    }
    int saved = errno;
    close(r->fd); /* the mapping keeps the memory; the descriptor is no longer needed */
    if (addr == MAP_FAILED) {
        if (reserved != MAP_FAILED)
            munmap(reserved, span);
        fail("mapping buffer segment %" PRIu32 " (%" PRIu64 " bytes): %s", index, length,
             strerror(saved));
    }
    segments[index].addr = addr;
    segments[index].length = length;
    segments[index].reserved = reserved;
    segments[index].span = span;
}

static void on_completion(const struct record *r)
{
    if (r->len != 32)
        protocol_error("COMPLETION record of %zu bytes, expected 32", r->len);
    for (size_t i = 0; i < inflight_count; i++) {
        struct cmd *c = inflight[i];
        if (c->id != r->id)
            continue;
        if (c->device != r->device)
            protocol_error("COMPLETION of command %" PRIu32 " names device %" PRIu32
                           ", it was sent to %" PRIu32, r->id, r->device, c->device);
        c->completion = get32(r->buf + 16);
        c->transferred = get32(r->buf + 20);
        c->position = (int64_t)get64(r->buf + 24);
        c->done = 1;
        c->id = 0;
        inflight[i] = inflight[--inflight_count];
        return;
    }
    protocol_error("COMPLETION for id %" PRIu32 ", which is no outstanding command", r->id);
}

/* Dispatch one record: whatever we are waiting for, anything may arrive. */
static void handle_record(struct record *r)
{
    switch (r->type) {
    case R_REPLY:
        need(r, 40, "REPLY");
        if (!expect_id || r->id != expect_id)
            protocol_error("REPLY for id %" PRIu32 ", expected %" PRIu32, r->id, expect_id);
        the_reply.hresult = get32(r->buf + 16);
        the_reply.state = get32(r->buf + 20);
        the_reply.value0 = get64(r->buf + 24);
        the_reply.value1 = get64(r->buf + 32);
        the_reply.tail_len = r->len - 40;
        memcpy(the_reply.tail, r->buf + 40, the_reply.tail_len);
        reply_ready = 1;
        expect_id = 0;
        if (the_reply.state == S_ABORTED)
            state = S_ABORTED;
        else
            raise_state(the_reply.state);
        break;
    case R_COMPLETION:
        on_completion(r);
        break;
    case R_STATE:
        need(r, 24, "STATE");
        if (get32(r->buf + 16) == S_ABORTED)
            client_aborted(get32(r->buf + 20), r->buf + 24, r->len - 24);
        raise_state(get32(r->buf + 16));
        break;
    case R_SEGMENT:
        on_segment(r);
        break;
    case R_WELCOME:
    case R_REFUSED:
        protocol_error("a second %s record", r->type == R_WELCOME ? "WELCOME" : "REFUSED");
        break;
    default:
        protocol_error("unknown record type 0x%04x", r->type);
    }
}

/* Handle records until *flag is set (a REPLY, a COMPLETION, ACTIVE...). */
static void pump_until(const int *flag, const char *what)
{
    struct record r;
    while (!*flag) {
        if (!receive(&r, timeout_ms))
            fail("no answer from the client within %d ms while waiting for %s", timeout_ms, what);
        handle_record(&r);
    }
}

/* ---- requests and commands ------------------------------------------------------------ */

/* Send a request and wait for its REPLY; any failure HRESULT is fatal. */
static const struct reply *request(uint16_t type, uint32_t device, const unsigned char *body,
                                   size_t body_len, const char *what, const char *device_name)
{
    uint32_t id = new_id();
    expect_id = id;
    reply_ready = 0;
    send_or_die(type, id, device, body, body_len);
    pump_until(&reply_ready, what);
    if (the_reply.hresult != 0)
        fail_device(device_name, "%s failed: %s (0x%08" PRIX32 "): %s", what,
                    hresult_name(the_reply.hresult), the_reply.hresult,
                    the_reply.tail_len ? text(the_reply.tail, the_reply.tail_len) : "no message");
    return &the_reply;
}

static void send_command(struct cmd *c, const struct device *d, uint32_t code, uint32_t size,
                         int64_t position, uint32_t segment, uint64_t offset)
{
    if (inflight_count == inflight_cap) {
        size_t cap = inflight_cap ? inflight_cap * 2 : 64;
        struct cmd **grown = realloc(inflight, cap * sizeof *grown);
        if (!grown)
            fail("out of memory");
        inflight = grown;
        inflight_cap = cap;
    }
    c->id = new_id();
    c->device = d->index;
    c->code = code;
    c->size = size;
    c->done = 0;
    inflight[inflight_count++] = c;
    unsigned char body[32];
    put32(body, code);
    put32(body + 4, size);
    put64(body + 8, (uint64_t)position);
    put32(body + 16, segment);
    put32(body + 20, 0);
    put64(body + 24, offset);
    send_or_die(R_SEND_COMMAND, c->id, d->index, body, sizeof body);
}

static void wait_command(struct cmd *c)
{
    char what[64];
    snprintf(what, sizeof what, "the completion of a %s", command_name(c->code));
    pump_until(&c->done, what);
}

/* A command completed other than as expected: abort, naming the device. */
static void command_failed(const struct device *d, const struct cmd *c)
{
    if (c->completion == ERROR_OPERATION_ABORTED)
        fail_device(d->name, "%s completed with OPERATION_ABORTED (995): the set was aborted",
                    command_name(c->code));
    fail_device(d->name, "%s of %" PRIu32 " bytes failed with completion %" PRIu32 " (%s)",
                command_name(c->code), c->size, c->completion, completion_name(c->completion));
}

/* Send `code` (no buffer) to every device, then check every completion is SUCCESS. */
static void command_on_every_device(uint32_t code)
{
    for (uint32_t i = 0; i < device_count; i++)
        send_command(&devices[i].ctl, &devices[i], code, 0, 0, NO_SEGMENT, 0);
    for (uint32_t i = 0; i < device_count; i++) {
        wait_command(&devices[i].ctl);
        if (devices[i].ctl.completion != ERROR_SUCCESS)
            command_failed(&devices[i], &devices[i].ctl);
    }
}

/* ---- session steps ------------------------------------------------------------------- */

static void connect_set(const char *dir, const char *instance)
{
    struct sockaddr_un addr;
    memset(&addr, 0, sizeof addr);
    addr.sun_family = AF_UNIX;
    char lower[256] = "";
    if (instance) {
        size_t n = strlen(instance);
        if (n == 0 || n >= sizeof lower || strchr(instance, '/'))
            fail("bad instance name '%s'", instance);
        for (size_t i = 0; i <= n; i++)
            lower[i] = (instance[i] >= 'A' && instance[i] <= 'Z') ? (char)(instance[i] + 32) : instance[i];
    }
    int n = instance ? snprintf(addr.sun_path, sizeof addr.sun_path, "%s/%s/%s.sock", dir, lower, set_name)
                     : snprintf(addr.sun_path, sizeof addr.sun_path, "%s/%s.sock", dir, set_name);
    if (n < 0 || (size_t)n >= sizeof addr.sun_path)
        fail("the socket path %s/%s.sock is longer than %zu bytes", dir, set_name,
             sizeof addr.sun_path - 1);
    sock = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (sock < 0)
        fail("socket: %s", strerror(errno));
    int rc;
    do
        rc = connect(sock, (struct sockaddr *)&addr, sizeof addr);
    while (rc < 0 && errno == EINTR);
    if (rc < 0) {
        if (errno == ENOENT || errno == ECONNREFUSED)
            fail("no virtual device set named '%s' is published in %s (%s: %s)", set_name,
                 instance ? addr.sun_path : dir, addr.sun_path, strerror(errno));
        fail("cannot connect to %s: %s", addr.sun_path, strerror(errno));
    }
}

static void welcome(void)
{
    struct record r;
    if (!receive(&r, WELCOME_TIMEOUT_MS))
        fail("the client sent no WELCOME within %d s", WELCOME_TIMEOUT_MS / 1000);
    if (r.type == R_REFUSED) {
        need(&r, 20, "REFUSED");
        uint32_t hr = get32(r.buf + 16);
        fail("the client refused the connection: %s (0x%08" PRIX32 "): %s", hresult_name(hr), hr,
             r.len > 20 ? text(r.buf + 20, r.len - 20) : "no reason given");
    }
    if (r.type != R_WELCOME)
        protocol_error("the first record is type 0x%04x, not WELCOME", r.type);
    need(&r, 70, "WELCOME");
    connected = 1;
    state = S_CONNECTED;
    if (get32(r.buf + 16) != PROTOCOL_VERSION)
        fail("the client speaks protocol version %" PRIu32 ", this engine version %u",
             get32(r.buf + 16), PROTOCOL_VERSION);
    for (int i = 0; i < C_FIELDS; i++)
        config[i] = get32(r.buf + 24 + 4 * i);
    size_t name_len = get16(r.buf + 68);
    need(&r, 70 + name_len + 2, "WELCOME");
    size_t job_len = get16(r.buf + 70 + name_len);
    if (r.len != 72 + name_len + job_len)
        protocol_error("WELCOME of %zu bytes, its fields make %zu", r.len, 72 + name_len + job_len);
    device_count = config[C_DEVICE_COUNT];
    if (device_count < 1 || device_count > 64)
        protocol_error("WELCOME's VDConfig has device_count %" PRIu32, device_count);
}

/* REQUEST_BUFFERS: `count` buffers of `size` bytes. During the configuration they are
 * part of the area END_CONFIGURATION maps; after it, the area grows by one SEGMENT
 * (it arrives before the REPLY). */
static void request_buffers(uint32_t size, uint32_t count)
{
    unsigned char body[12];
    put32(body, size);
    put32(body + 4, 0);
    put32(body + 8, count);
    request(R_REQUEST_BUFFERS, NO_DEVICE, body, sizeof body, "REQUEST_BUFFERS", NULL);
}

/* BEGIN_CONFIGURATION, REQUEST_BUFFERS (`count` buffers of `size` bytes),
 * END_CONFIGURATION; every SEGMENT that arrives meanwhile is mapped. */
static void configure(uint32_t features, uint32_t max_transfer, uint32_t size, uint32_t count)
{
    unsigned char body[28];
    put32(body, features);
    put32(body + 4, BLOCK_SIZE);
    put32(body + 8, 0);             /* alignment: the block size */
    put32(body + 12, max_transfer);
    put64(body + 16, (uint64_t)(timeout_ms < 0 ? -1 : (int64_t)timeout_ms));
    put32(body + 24, 1);            /* honour_complete */
    request(R_BEGIN_CONFIGURATION, NO_DEVICE, body, sizeof body, "BEGIN_CONFIGURATION", NULL);
    request_buffers(size, count);
    const struct reply *rep = request(R_END_CONFIGURATION, NO_DEVICE, NULL, 0, "END_CONFIGURATION", NULL);
    if (rep->tail_len != VDCONFIG_SIZE)
        protocol_error("END_CONFIGURATION's REPLY carries %zu bytes of VDConfig, expected 44",
                       rep->tail_len);
    for (int i = 0; i < C_FIELDS; i++)
        final_config[i] = get32(rep->tail + 4 * i);
    if (segment_count == 0)
        protocol_error("END_CONFIGURATION's REPLY came without any SEGMENT");
}

static void open_devices(uint32_t depth)
{
    devices = calloc(device_count, sizeof *devices);
    if (!devices)
        fail("out of memory");
    for (uint32_t i = 0; i < device_count; i++) {
        struct device *d = &devices[i];
        /* The set's device names: NAME, NAME1, NAME2, ... (as SQL Server names them) */
        if (i == 0)
            snprintf(d->name, sizeof d->name, "%s", set_name);
        else
            snprintf(d->name, sizeof d->name, "%s%" PRIu32, set_name, i);
        const struct reply *rep = request(R_OPEN_DEVICE, NO_DEVICE, (const unsigned char *)d->name,
                                          strlen(d->name), "OPEN_DEVICE", d->name);
        if (rep->value0 >= device_count)
            protocol_error("OPEN_DEVICE gave device index %" PRIu64 " of %" PRIu32, rep->value0,
                           device_count);
        d->index = (uint32_t)rep->value0;
        d->slots = calloc(depth, sizeof *d->slots);
        if (!d->slots)
            fail("out of memory");
    }
    /* The set is ACTIVE once the client opened every device too: it sends STATE (4). */
    struct record r;
    while (state < S_ACTIVE) {
        if (!receive(&r, timeout_ms))
            fail("the set did not become active within %d ms (the client has not opened "
                 "every device)", timeout_ms);
        handle_record(&r);
    }
    if (state != S_ACTIVE)
        fail("the set is %s, not ACTIVE, after opening every device", state_name(state));
}

/* One buffer of `size` bytes: its (segment, offset) and its address in our mapping. */
static void allocate_buffer(struct slot *s, uint32_t size)
{
    unsigned char body[8];
    put32(body, size);
    put32(body + 4, 0);
    const struct reply *rep = request(R_ALLOCATE_BUFFER, NO_DEVICE, body, sizeof body,
                                      "ALLOCATE_BUFFER", NULL);
    if (rep->value0 >= segment_count || !segments[rep->value0].addr)
        protocol_error("ALLOCATE_BUFFER gave segment %" PRIu64 ", which was never sent",
                       rep->value0);
    const struct segment *seg = &segments[rep->value0];
    if (rep->value1 > seg->length || seg->length - rep->value1 < size)
        protocol_error("ALLOCATE_BUFFER gave offset %" PRIu64 " in segment %" PRIu64
                       " of %" PRIu64 " bytes for %" PRIu32 " bytes",
                       rep->value1, rep->value0, seg->length, size);
    s->segment = (uint32_t)rep->value0;
    s->offset = rep->value1;
    s->data = seg->addr + rep->value1;
}

static void free_buffer(const struct slot *s)
{
    unsigned char body[16];
    put32(body, s->segment);
    put32(body + 4, 0);
    put64(body + 8, s->offset);
    send_or_die(R_FREE_BUFFER, 0, NO_DEVICE, body, sizeof body);
}

static void allocate_buffers(uint32_t chunk, uint32_t depth)
{
    for (uint32_t i = 0; i < device_count; i++)
        for (uint32_t j = 0; j < depth; j++)
            allocate_buffer(&devices[i].slots[j], chunk);
}

static void free_buffers(uint32_t depth)
{
    for (uint32_t i = 0; i < device_count; i++)
        for (uint32_t j = 0; j < depth; j++)
            free_buffer(&devices[i].slots[j]);
}

static void close_all(void)
{
    for (uint32_t i = 0; i < device_count; i++)
        request(R_CLOSE_DEVICE, devices[i].index, NULL, 0, "CLOSE_DEVICE", devices[i].name);
    request(R_CLOSE, NO_DEVICE, NULL, 0, "CLOSE", NULL);
    close(sock);
    sock = -1;
    for (uint32_t i = 0; i < segment_count; i++)
        if (segments[i].addr)
            munmap(segments[i].reserved, segments[i].span);
}

/* Wait until `fd` is ready for `events`, handling the client's records meanwhile (an
 * abort must not wait for a slow producer or consumer). */
static void wait_fd(int fd, short events)
{
    for (;;) {
        check_interrupted();
        while (message_pending()) { /* records left in the last message come first */
            struct record r;
            take_record(&r, -1);
            handle_record(&r);
        }
        struct pollfd p[2] = {{.fd = fd, .events = events}, {.fd = sock, .events = POLLIN}};
        int ready = poll(p, 2, -1);
        if (ready < 0) {
            if (errno == EINTR)
                continue;
            fail("poll: %s", strerror(errno));
        }
        if (p[1].revents) {
            struct record r;
            if (receive(&r, 0))
                handle_record(&r);
        }
        if (p[0].revents)
            return;
    }
}

/* ---- the stream header ---------------------------------------------------------------
 *
 * Every device's stream starts with one 512-byte block (the block size), written as its
 * own WRITE at position 0 and read as its own READ; the chunks follow at 512, 512 + chunk,
 * ... so they stay block-aligned. All integers little-endian:
 *
 *     off size field
 *     0   8    magic          "VDCENG01"
 *     8   4    version        STREAM_VERSION (1)
 *     12  4    header size    512
 *     16  4    chunk size     bytes per chunk (--chunk of the backup)
 *     20  4    device index   this device's place in the set: 0 for NAME, i for NAME<i>
 *     24  4    device count   devices of the backup's set
 *     28  4    reserved       0
 *     32  16   stream id      random, the same on every device of one backup
 *     48  464  reserved       0
 */

#define STREAM_MAGIC "VDCENG01"
#define STREAM_VERSION 1u
#define STREAM_HEADER_SIZE 512u /* one block: BLOCK_SIZE */
#define STREAM_ID_SIZE 16u

static unsigned char stream_id[STREAM_ID_SIZE];

struct stream_header {
    uint32_t version, header_size, chunk, index, count;
    unsigned char id[STREAM_ID_SIZE];
};

static const char *hex(const unsigned char *p, size_t n)
{
    static char buf[2][2 * STREAM_ID_SIZE + 1];
    static int which;
    char *out = buf[which ^= 1];
    for (size_t i = 0; i < n && i < STREAM_ID_SIZE; i++)
        snprintf(out + 2 * i, 3, "%02x", p[i]);
    return out;
}

static void new_stream_id(void)
{
    size_t got = 0;
    while (got < sizeof stream_id) {
        ssize_t n = getrandom(stream_id + got, sizeof stream_id - got, 0);
        if (n > 0)
            got += (size_t)n;
        else if (n < 0 && errno != EINTR)
            fail("getrandom: %s", strerror(errno));
    }
}

static void put_header(unsigned char *p, uint32_t chunk, uint32_t index)
{
    memset(p, 0, STREAM_HEADER_SIZE);
    memcpy(p, STREAM_MAGIC, 8);
    put32(p + 8, STREAM_VERSION);
    put32(p + 12, STREAM_HEADER_SIZE);
    put32(p + 16, chunk);
    put32(p + 20, index);
    put32(p + 24, device_count);
    memcpy(p + 32, stream_id, STREAM_ID_SIZE);
}

/* Check device `i`'s header (read into its head buffer by a READ that transferred `n`
 * bytes) on its own, then against device 0's (`first`, NULL for device 0 itself). */
static void check_header(uint32_t i, uint32_t n, struct stream_header *h,
                         const struct stream_header *first)
{
    const struct device *d = &devices[i];
    const unsigned char *p = d->head.data;
    if (n < STREAM_HEADER_SIZE)
        fail_device(d->name, "no stream header: the device's stream has %" PRIu32 " bytes, less "
                    "than the %u-byte header (an empty or truncated device, or not a stream "
                    "vdistream-engine wrote)", n, STREAM_HEADER_SIZE);
    if (memcmp(p, STREAM_MAGIC, 8) != 0)
        fail_device(d->name, "no stream header: the stream does not start with \"" STREAM_MAGIC
                    "\" (not a stream vdistream-engine wrote, or one from before stream headers)");
    h->version = get32(p + 8);
    h->header_size = get32(p + 12);
    h->chunk = get32(p + 16);
    h->index = get32(p + 20);
    h->count = get32(p + 24);
    memcpy(h->id, p + 32, STREAM_ID_SIZE);
    if (h->version != STREAM_VERSION)
        fail_device(d->name, "the stream header is format version %" PRIu32 ", this engine reads "
                    "version %u", h->version, STREAM_VERSION);
    if (h->header_size != STREAM_HEADER_SIZE || h->chunk < BLOCK_SIZE || h->chunk % BLOCK_SIZE ||
        h->chunk > TRANSFER_MAX || h->count < 1 || h->index >= h->count)
        fail_device(d->name, "bad stream header (header size %" PRIu32 ", chunk size %" PRIu32
                    ", device %" PRIu32 " of %" PRIu32 ")", h->header_size, h->chunk, h->index,
                    h->count);
    if (h->count != device_count)
        fail_device(d->name, "the backup was written over %" PRIu32 " device(s), the set has %"
                    PRIu32 ": restore with the backup's device count", h->count, device_count);
    if (first && memcmp(h->id, first->id, STREAM_ID_SIZE) != 0)
        fail_device(d->name, "the device holds another backup's stream (stream id %s, device "
                    "'%s' has stream id %s)", hex(h->id, STREAM_ID_SIZE), devices[0].name,
                    hex(first->id, STREAM_ID_SIZE));
    if (h->index != i)
        fail_device(d->name, "the device holds the stream of the backup's device %" PRIu32
                    ", not of device %" PRIu32 " (devices swapped or renamed?)", h->index, i);
    if (first && h->chunk != first->chunk)
        fail_device(d->name, "bad stream header: chunk size %" PRIu32 ", device '%s' says %" PRIu32,
                    h->chunk, devices[0].name, first->chunk);
}

/* ---- backup ------------------------------------------------------------------------- */

/* Fill `buf` from standard input, straight into the shared buffer; returns the byte
 * count (< size only at the end of the input). */
static uint32_t fill(unsigned char *buf, uint32_t size, int *eof)
{
    uint32_t got = 0;
    while (got < size && !*eof) {
        wait_fd(STDIN_FILENO, POLLIN);
        ssize_t n = read(STDIN_FILENO, buf + got, size - got);
        if (n > 0)
            got += (uint32_t)n;
        else if (n == 0)
            *eof = 1;
        else if (errno != EINTR && errno != EAGAIN)
            fail("reading standard input: %s", strerror(errno));
    }
    return got;
}

static void check_write(struct device *d, struct slot *s)
{
    wait_command(&s->cmd);
    if (s->cmd.completion != ERROR_SUCCESS)
        command_failed(d, &s->cmd);
    if (s->cmd.transferred != s->cmd.size)
        fail_device(d->name, "WRITE of %" PRIu32 " bytes completed with SUCCESS but transferred %" PRIu32,
                    s->cmd.size, s->cmd.transferred);
    s->used = 0;
}

static int backup(uint32_t chunk, uint32_t depth)
{
    new_stream_id();
    configure(VDF_WRITE_MEDIA, (chunk + TRANSFER_UNIT - 1) / TRANSFER_UNIT * TRANSFER_UNIT, chunk,
              device_count * depth);
    open_devices(depth);
    allocate_buffers(chunk, depth);
    /* Each device's header, written in place in its last buffer (the first chunks go
     * to buffer 0: with depth > 1 they need not wait for the header's WRITE). */
    for (uint32_t i = 0; i < device_count; i++) {
        struct device *d = &devices[i];
        struct slot *s = &d->slots[depth - 1];
        put_header(s->data, chunk, i);
        s->used = 1;
        send_command(&s->cmd, d, VDC_WRITE, STREAM_HEADER_SIZE, 0, s->segment, s->offset);
        d->offset = STREAM_HEADER_SIZE;
    }
    int eof = 0;
    uint64_t total = 0;
    for (uint64_t k = 0; !eof; k++) {
        struct device *d = &devices[k % device_count];
        struct slot *s = &d->slots[(k / device_count) % depth];
        if (s->used)
            check_write(d, s); /* the buffer's previous WRITE must be done before we refill it */
        uint32_t size = fill(s->data, chunk, &eof);
        if (size == 0)
            break;
        s->used = 1;
        send_command(&s->cmd, d, VDC_WRITE, size, (int64_t)d->offset, s->segment, s->offset);
        d->offset += size;
        total += size;
    }
    for (uint32_t i = 0; i < device_count; i++)
        for (uint32_t j = 0; j < depth; j++)
            if (devices[i].slots[j].used)
                check_write(&devices[i], &devices[i].slots[j]);
    command_on_every_device(VDC_FLUSH);
    if (final_config[C_FEATURES] & VDF_COMPLETE_ENABLED)
        command_on_every_device(VDC_COMPLETE);
    free_buffers(depth);
    close_all();
    fprintf(stderr, "%s: set '%s': backed up %" PRIu64 " bytes over %" PRIu32 " device(s) in %"
            PRIu32 "-byte chunks (stream id %s)\n", program, set_name, total, device_count, chunk,
            hex(stream_id, STREAM_ID_SIZE));
    return 0;
}

/* ---- restore ------------------------------------------------------------------------ */

static int is_end(uint32_t completion)
{
    return completion == ERROR_HANDLE_EOF || completion == ERROR_NO_DATA_DETECTED;
}

static void emit(const unsigned char *p, uint32_t n)
{
    while (n > 0) {
        wait_fd(STDOUT_FILENO, POLLOUT);
        ssize_t w = write(STDOUT_FILENO, p, n);
        if (w > 0) {
            p += w;
            n -= (uint32_t)w;
        } else if (w < 0 && errno != EINTR && errno != EAGAIN) {
            fail("writing standard output: %s", strerror(errno));
        }
    }
}

static void read_chunk(struct device *d, struct slot *s, uint32_t chunk)
{
    s->used = 1;
    send_command(&s->cmd, d, VDC_READ, chunk, (int64_t)d->offset, s->segment, s->offset);
    d->offset += chunk; /* the position of the next READ, if this one is full */
}

/* CLEAR_ERROR on every device the end left in the error state (spec §3.4). */
static void clear_errors(void)
{
    for (uint32_t i = 0; i < device_count; i++)
        if (devices[i].errored)
            send_command(&devices[i].ctl, &devices[i], VDC_CLEAR_ERROR, 0, 0, NO_SEGMENT, 0);
    for (uint32_t i = 0; i < device_count; i++)
        if (devices[i].errored) {
            wait_command(&devices[i].ctl);
            if (devices[i].ctl.completion != ERROR_SUCCESS)
                command_failed(&devices[i], &devices[i].ctl);
            devices[i].errored = 0;
        }
}

/* One READ of one block per device, all outstanding at once, into a block-sized buffer
 * of its own; every header is checked before any data is written out. Returns the
 * backup's chunk size. */
static uint32_t read_headers(void)
{
    for (uint32_t i = 0; i < device_count; i++)
        allocate_buffer(&devices[i].head, STREAM_HEADER_SIZE);
    for (uint32_t i = 0; i < device_count; i++) {
        struct slot *h = &devices[i].head;
        send_command(&h->cmd, &devices[i], VDC_READ, STREAM_HEADER_SIZE, 0, h->segment, h->offset);
    }
    struct stream_header first, other;
    for (uint32_t i = 0; i < device_count; i++) {
        struct device *d = &devices[i];
        struct cmd *c = &d->head.cmd;
        wait_command(c);
        if (c->completion != ERROR_SUCCESS && !is_end(c->completion))
            command_failed(d, c);
        if (c->transferred > c->size)
            protocol_error("READ of %" PRIu32 " bytes transferred %" PRIu32, c->size, c->transferred);
        if (c->completion != ERROR_SUCCESS)
            d->errored = d->ended = 1; /* a stream of its header alone (an empty backup) */
        check_header(i, c->transferred, i ? &other : &first, i ? &first : NULL);
        d->offset = STREAM_HEADER_SIZE;
    }
    memcpy(stream_id, first.id, STREAM_ID_SIZE);
    for (uint32_t i = 0; i < device_count; i++)
        free_buffer(&devices[i].head);
    clear_errors(); /* so that their next READs find the end again, not IO_DEVICE */
    return first.chunk;
}

static int restore(uint32_t depth)
{
    configure(VDF_READ_MEDIA, TRANSFER_MAX, STREAM_HEADER_SIZE, device_count);
    open_devices(depth);
    uint32_t chunk = read_headers();
    request_buffers(chunk, device_count * depth); /* the area grows by one segment */
    allocate_buffers(chunk, depth);
    uint64_t window = (uint64_t)device_count * depth;
    for (uint64_t k = 0; k < window; k++)
        read_chunk(&devices[k % device_count], &devices[k % device_count].slots[k / device_count],
                   chunk);
    uint64_t total = 0, k = 0;
    struct cmd *last = NULL;
    /* In stream order: chunk k is on device k % N, in its buffer (k / N) % depth. */
    for (;; k++) {
        struct device *d = &devices[k % device_count];
        struct slot *s = &d->slots[(k / device_count) % depth];
        wait_command(&s->cmd);
        s->used = 0;
        struct cmd *c = &s->cmd;
        uint32_t code = c->completion;
        if (code == ERROR_IO_DEVICE && d->ended && c->transferred == 0)
            code = ERROR_HANDLE_EOF; /* a READ queued behind its device's end */
        if (code != ERROR_SUCCESS && !is_end(code))
            command_failed(d, c);
        if (c->transferred > c->size)
            protocol_error("READ of %" PRIu32 " bytes transferred %" PRIu32, c->size, c->transferred);
        if (code != ERROR_SUCCESS)
            d->errored = d->ended = 1; /* a full chunk may still end its device: go on */
        if (c->transferred < c->size) {
            last = c; /* chunk k is the stream's last: written out once the others agree */
            break;
        }
        emit(s->data, c->transferred);
        total += c->transferred;
        read_chunk(d, s, chunk); /* chunk k + window: the same device, the same buffer */
    }
    /* The reads sent past the end: each must find the end too (HANDLE_EOF or
     * NO_DATA_DETECTED, or IO_DEVICE for those the client dropped after its device's
     * end), with no data. They cover the next chunk of every other device: data there
     * means the device of chunk k ended early, i.e. its stream is truncated. */
    struct device *ended = &devices[k % device_count];
    for (uint64_t j = k + 1; j < k + window; j++) {
        struct device *d = &devices[j % device_count];
        struct slot *s = &d->slots[(j / device_count) % depth];
        if (!s->used)
            continue;
        wait_command(&s->cmd);
        s->used = 0;
        struct cmd *c = &s->cmd;
        if (c->completion == ERROR_SUCCESS && c->transferred == 0)
            continue;
        if (c->completion == ERROR_SUCCESS || (is_end(c->completion) && c->transferred > 0)) {
            if (d == ended)
                fail_device(d->name, "the device has data after the end of its stream (chunk %"
                            PRIu64 " ended it, chunk %" PRIu64 " has %" PRIu32 " bytes)", k, j,
                            c->transferred);
            fail_device(ended->name, "the device's stream is truncated: it ends in chunk %" PRIu64
                        " (%" PRIu32 " of %" PRIu32 " bytes) but device '%s' still has chunk %"
                        PRIu64, k, last->transferred, chunk, d->name, j);
        }
        if (!is_end(c->completion) && c->completion != ERROR_IO_DEVICE)
            command_failed(d, c);
        d->errored = 1;
    }
    emit(ended->slots[(k / device_count) % depth].data, last->transferred);
    total += last->transferred;
    clear_errors(); /* leave the error state the end put the devices in, then close */
    free_buffers(depth);
    close_all();
    fprintf(stderr, "%s: set '%s': restored %" PRIu64 " bytes from %" PRIu32 " device(s) in %"
            PRIu32 "-byte chunks (stream id %s)\n", program, set_name, total, device_count, chunk,
            hex(stream_id, STREAM_ID_SIZE));
    return 0;
}

/* ---- main ---------------------------------------------------------------------------- */

static void usage(const char *why)
{
    if (why)
        fprintf(stderr, "%s: %s\n", program, why);
    fprintf(stderr,
            "usage: %s backup|restore NAME [--dir DIR] [--instance INSTANCE] [--chunk BYTES]\n"
            "       [--depth N] [--timeout SECONDS]\n"
            "  backup:  write standard input into the virtual device set NAME\n"
            "  restore: read the set NAME's stream to standard output\n"
            "  --dir DIR        runtime directory (default: $VDISTREAM_RUNTIME_DIR,\n"
            "                   $XDG_RUNTIME_DIR/vdistream, /tmp/vdistream-<uid>)\n"
            "  --chunk BYTES    backup: bytes per WRITE, a multiple of 512 up to 4 MiB\n"
            "                   (default %u); a restore takes it from the stream headers\n"
            "  --depth N        buffers (outstanding commands) per device, 1..%u (default %u)\n"
            "  --timeout SECS   longest wait for the client's answer (default: none)\n",
            program, DEFAULT_CHUNK, MAX_DEPTH, DEFAULT_DEPTH);
    exit(2);
}

static unsigned long number(const char *option, const char *value, unsigned long min,
                            unsigned long max)
{
    char *end;
    errno = 0;
    unsigned long v = strtoul(value, &end, 10);
    if (errno || end == value || *end || value[0] == '-' || v < min || v > max) {
        char why[256];
        snprintf(why, sizeof why, "%s: '%s' is not a number in %lu..%lu", option, value, min,
                 max);
        usage(why);
    }
    return v;
}

static const char *runtime_dir(void)
{
    static char buf[4096];
    const char *v = getenv("VDISTREAM_RUNTIME_DIR");
    if (v && *v)
        return v;
    v = getenv("XDG_RUNTIME_DIR");
    if (v && *v) {
        snprintf(buf, sizeof buf, "%s/vdistream", v);
        return buf;
    }
    snprintf(buf, sizeof buf, "/tmp/vdistream-%lu", (unsigned long)getuid());
    return buf;
}

int main(int argc, char **argv)
{
    if (argc < 3)
        usage(argc == 2 && (!strcmp(argv[1], "-h") || !strcmp(argv[1], "--help")) ? NULL
                                                                               : "missing arguments");
    const char *mode = argv[1];
    if (strcmp(mode, "backup") && strcmp(mode, "restore"))
        usage("the first argument must be backup or restore");
    set_name = argv[2];
    const char *dir = NULL, *instance = NULL;
    uint32_t chunk = DEFAULT_CHUNK, depth = DEFAULT_DEPTH;
    for (int i = 3; i < argc; i++) {
        const char *opt = argv[i];
        if (i + 1 >= argc)
            usage("an option is missing its value");
        const char *val = argv[++i];
        if (!strcmp(opt, "--dir"))
            dir = val;
        else if (!strcmp(opt, "--instance"))
            instance = val;
        else if (!strcmp(opt, "--chunk"))
            chunk = (uint32_t)number(opt, val, 0, TRANSFER_MAX);
        else if (!strcmp(opt, "--depth"))
            depth = (uint32_t)number(opt, val, 1, MAX_DEPTH);
        else if (!strcmp(opt, "--timeout"))
            timeout_ms = (int)number(opt, val, 0, INT_MAX / 1000) * 1000;
        else
            usage("unknown option");
    }
    if (chunk < BLOCK_SIZE || chunk % BLOCK_SIZE)
        usage("--chunk must be a multiple of 512 bytes, at most 4 MiB");
    if (depth < 1)
        usage("--depth must be at least 1");
    if (timeout_ms == 0)
        timeout_ms = -1;
    size_t name_len = strlen(set_name);
    if (name_len < 1 || name_len > 100 || strchr(set_name, '/') || strchr(set_name, '\\') ||
        set_name[0] == '.')
        usage("the set name must be 1..100 bytes without '/' or '\\', not starting with '.'");

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = SIG_IGN;
    sigaction(SIGPIPE, &sa, NULL); /* a closed stdout or socket is an error return, not death */
    sa.sa_handler = on_signal;     /* no SA_RESTART: poll() returns EINTR and we abort the set */
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGHUP, &sa, NULL);

    connect_set(dir ? dir : runtime_dir(), instance);
    welcome();
    return !strcmp(mode, "backup") ? backup(chunk, depth) : restore(depth); /* restore: chunk from the headers */
}

// standin.h - internal to vdistream's stand-in libsqlvdi.so and its server library.
//
// The shared-memory protocol between the client library (libsqlvdi.so, what a backup
// application links) and the server library (libsqlvdi_standin_server.so, what the
// stand-in SQL Server calls). It is our own design, not Microsoft's: the public Linux
// documentation only says that shared memory is POSIX shared memory and semaphores are
// POSIX semaphores. Per set there are two segments:
//   /sqlvdi-standin.<set>          control: created by the client's Create (mode 0660 less
//                                  the umask, like the real objects), holds the configs,
//                                  the device table, per-device command rings, the peers'
//                                  pids and the abort flag; process-shared semaphores and
//                                  a robust process-shared mutex live inside it.
//   /sqlvdi-standin.<set>.buffers  buffer area: created by the server in vdss_configure;
//                                  commands carry offsets into it, each side maps it.
// Every wait is sliced (kSliceMs) and re-checks the abort flag and the peer's liveness,
// so the death of either process aborts the set within one slice.
#pragma once

#include "vdi.h"
#include "vdierror.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <semaphore.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <string>

// The public header's layouts, as the ABI note (and our Python binding) relies on them.
static_assert(sizeof(VDConfig) == 44, "VDConfig must be 44 bytes");
static_assert(sizeof(VDC_Command) == 24, "VDC_Command must be 24 bytes");
static_assert(sizeof(VDS_Command) == 56, "VDS_Command must be 56 bytes");
static_assert(offsetof(VDC_Command, buffer) == 16, "VDC_Command.buffer at offset 16");
static_assert(offsetof(VDConfig, bufferAreaSize) == 40, "VDConfig.bufferAreaSize at 40");

namespace standin {

constexpr uint32_t kMagic = 0x53534456u;  // "VDSS", written last when a segment is ready
constexpr uint32_t kVersion = 1;
constexpr int kMaxDevices = 64;           // deviceCount 1..64 (spec 2.1)
constexpr int kRing = 128;                // outstanding commands per device
constexpr size_t kSetNameMax = 128;       // bytes with the NUL
constexpr size_t kDeviceNameMax = 160;
constexpr int kSliceMs = 20;              // <= 50 ms: abort and peer death latency
constexpr int kAbortPosts = 64;           // posts per semaphore to wake every waiter
constexpr int kInitGraceSeconds = 5;      // a segment without magic older than this is debris
constexpr const char* kPrefix = "/sqlvdi-standin.";
constexpr const char* kBufferSuffix = ".buffers";

enum SlotState : uint32_t { kFree = 0, kQueued = 1, kDelivered = 2, kCompleted = 3 };
enum SetState : uint32_t { kCreated = 0, kConfigured = 1 };

struct Peer {
    int32_t pid;         // 0: not attached
    uint32_t detached;   // 1 once the side called its Close: its exit is no longer death
    uint64_t start;      // /proc/<pid>/stat starttime: guards against pid reuse
};

struct Slot {
    uint32_t state;
    uint32_t tag;
    int32_t code;
    int32_t size;
    int64_t position;
    uint64_t offset;      // into the buffer area (Read/Write only)
    int32_t completion;
    uint32_t bytes;
    int64_t out_position;
};

struct Device {
    char name[kDeviceNameMax];
    uint32_t server_open;
    uint32_t client_open;
    uint32_t server_closed;
    uint32_t next_tag;
    uint32_t pend_head, pend_count;  // FIFO of slot indices sent, not yet delivered
    uint32_t done_head, done_count;  // FIFO of slot indices completed, not yet collected
    uint32_t pend[kRing];
    uint32_t done[kRing];
    sem_t cmd_sem;   // client waits: a command was queued, the device closed, or abort
    sem_t done_sem;  // server waits: a completion arrived, or abort
    Slot slots[kRing];
};

struct Control {
    // Fixed first fields: the debris sweep reads them without trusting the rest.
    uint32_t magic;
    uint32_t version;
    Peer client;
    Peer server;
    pthread_mutex_t lock;  // robust, process-shared: guards everything below
    sem_t config_sem;      // client waits in GetConfiguration
    uint32_t state;
    uint32_t aborted;
    uint32_t device_count;
    uint32_t reserved;
    VDConfig client_cfg;
    VDConfig final_cfg;
    uint64_t buffer_bytes;
    char set_name[kSetNameMax];
    Device devices[kMaxDevices];
};

// ---- names ----------------------------------------------------------------------------

inline bool ends_with(const char* s, const char* suffix) {
    size_t n = strlen(s), m = strlen(suffix);
    return n >= m && strcmp(s + n - m, suffix) == 0;
}

// A set name must fit the segment names and must not be mistaken for another set's
// buffer area ("x.buffers" would be set "x"'s buffers).
inline bool valid_set_name(const char* name) {
    if (name == nullptr) return false;
    size_t n = strnlen(name, kSetNameMax);
    if (n == 0 || n >= kSetNameMax) return false;
    if (strchr(name, '/') != nullptr) return false;
    if (ends_with(name, kBufferSuffix)) return false;
    return true;
}

inline std::string control_name(const char* set) { return std::string(kPrefix) + set; }
inline std::string buffer_name(const char* set) {
    return std::string(kPrefix) + set + kBufferSuffix;
}

// ---- time and waiting -----------------------------------------------------------------

inline int64_t now_ms() {
    timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return int64_t(ts.tv_sec) * 1000 + ts.tv_nsec / 1000000;
}

// Deadline in monotonic ms, or -1 for forever (negative timeouts and INFINITE as a DWORD).
inline int64_t deadline_after(int64_t timeout_ms) {
    if (timeout_ms < 0 || timeout_ms >= int64_t(0xFFFFFFFFu)) return -1;
    return now_ms() + timeout_ms;
}

// Waits on `sem` for at most one slice, never past the deadline; false when the deadline
// has passed (the caller then reports a timeout after its last check).
inline bool wait_slice(sem_t* sem, int64_t deadline) {
    int64_t slice = kSliceMs;
    if (deadline >= 0) {
        int64_t left = deadline - now_ms();
        if (left <= 0) return false;
        if (left < slice) slice = left;
    }
    timespec abs;
    clock_gettime(CLOCK_MONOTONIC, &abs);
    abs.tv_nsec += long(slice % 1000) * 1000000L;
    abs.tv_sec += slice / 1000 + abs.tv_nsec / 1000000000L;
    abs.tv_nsec %= 1000000000L;
    while (sem_clockwait(sem, CLOCK_MONOTONIC, &abs) == -1 && errno == EINTR) {
    }
    return true;
}

inline void sleep_ms(int ms) {
    timespec ts{ms / 1000, long(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) == -1 && errno == EINTR) {
    }
}

// ---- processes ------------------------------------------------------------------------

// Reads state and starttime of a process from /proc; false when it does not exist.
inline bool proc_stat(pid_t pid, char* state, uint64_t* start) {
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/stat", int(pid));
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return false;
    char buf[1024];
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return false;
    buf[n] = 0;
    char* p = strrchr(buf, ')');  // the command name may contain spaces and parentheses
    if (p == nullptr || p[1] == 0) return false;
    p += 2;
    *state = *p;
    // Fields after the name: 3 state ... 22 starttime.
    for (int field = 3; field < 22 && p != nullptr; ++field) {
        p = strchr(p, ' ');
        if (p != nullptr) ++p;
    }
    *start = p != nullptr ? strtoull(p, nullptr, 10) : 0;
    return true;
}

inline uint64_t self_start() {
    char state;
    uint64_t start = 0;
    return proc_stat(getpid(), &state, &start) ? start : 0;
}

// A zombie counts as dead (its parent may not have reaped it yet), and so does a new
// process that reuses the pid.
inline bool process_alive(pid_t pid, uint64_t start) {
    if (pid <= 0) return true;
    char state = 0;
    uint64_t now_start = 0;
    if (!proc_stat(pid, &state, &now_start)) {
        return kill(pid, 0) == 0 || errno == EPERM;
    }
    if (state == 'Z' || state == 'X') return false;
    if (start != 0 && now_start != 0 && start != now_start) return false;
    return true;
}

// A peer that is attached, has not closed, and whose process is gone.
inline bool peer_dead(const Peer& p) {
    return p.pid != 0 && p.detached == 0 && !process_alive(p.pid, p.start);
}

// ---- the control segment --------------------------------------------------------------

class Lock {
public:
    explicit Lock(Control* c) : c_(c) {
        if (pthread_mutex_lock(&c_->lock) == EOWNERDEAD) pthread_mutex_consistent(&c_->lock);
    }
    ~Lock() { pthread_mutex_unlock(&c_->lock); }
    Lock(const Lock&) = delete;
    Lock& operator=(const Lock&) = delete;

private:
    Control* c_;
};

inline void post_n(sem_t* s, int n) {
    for (int i = 0; i < n; ++i) sem_post(s);
}

// Wakes every waiter of either side; they re-check the state under the lock.
inline void wake_all(Control* c) {
    post_n(&c->config_sem, kAbortPosts);
    for (int i = 0; i < kMaxDevices; ++i) {
        post_n(&c->devices[i].cmd_sem, kAbortPosts);
        post_n(&c->devices[i].done_sem, kAbortPosts);
    }
}

inline void trigger_abort(Control* c) {
    {
        Lock l(c);
        c->aborted = 1;
    }
    wake_all(c);
}

inline Control* map_control(int fd) {
    void* p = mmap(nullptr, sizeof(Control), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    return p == MAP_FAILED ? nullptr : static_cast<Control*>(p);
}

inline void unmap_control(Control* c) {
    if (c != nullptr) munmap(c, sizeof(Control));
}

inline bool control_ready(const Control* c) {
    return __atomic_load_n(&c->magic, __ATOMIC_ACQUIRE) == kMagic && c->version == kVersion;
}

// Debris: a set whose creator and server are both gone (or both closed), or a segment
// that never became ready and is older than the grace period.
inline bool stale_segment(const char* shm_name) {
    int fd = shm_open(shm_name, O_RDONLY | O_CLOEXEC, 0);
    if (fd < 0) return false;
    struct stat st;
    bool stale = false;
    if (fstat(fd, &st) == 0) {
        bool old = time(nullptr) - st.st_ctime > kInitGraceSeconds;
        if (size_t(st.st_size) < offsetof(Control, lock)) {
            stale = old;
        } else {
            void* p = mmap(nullptr, offsetof(Control, lock), PROT_READ, MAP_SHARED, fd, 0);
            if (p != MAP_FAILED) {
                const Control* c = static_cast<const Control*>(p);
                uint32_t magic = __atomic_load_n(&c->magic, __ATOMIC_ACQUIRE);
                if (magic != kMagic) {
                    stale = old;
                } else {
                    bool client_gone = c->client.detached || !process_alive(c->client.pid,
                                                                            c->client.start);
                    bool server_gone = c->server.pid == 0 || c->server.detached ||
                                       !process_alive(c->server.pid, c->server.start);
                    stale = client_gone && server_gone;
                }
                munmap(p, offsetof(Control, lock));
            }
        }
    }
    close(fd);
    return stale;
}

// Removes the segments of every stale set (as Create must: "Create removes segments of
// sets whose creator and server are both dead"). Segments we may not open are skipped.
inline void sweep_debris() {
    DIR* dir = opendir("/dev/shm");
    if (dir == nullptr) return;
    const char* prefix = kPrefix + 1;  // without the leading '/'
    size_t plen = strlen(prefix);
    while (dirent* e = readdir(dir)) {
        if (strncmp(e->d_name, prefix, plen) != 0 || ends_with(e->d_name, kBufferSuffix)) continue;
        std::string name = std::string("/") + e->d_name;
        if (stale_segment(name.c_str())) {
            shm_unlink(name.c_str());
            shm_unlink((name + kBufferSuffix).c_str());
        }
    }
    closedir(dir);
}

inline bool valid_device(const Control* c, int device) {
    return device >= 0 && device < int(c->device_count) && device < kMaxDevices;
}

inline bool is_data_command(int32_t code) { return code == VDC_Read || code == VDC_Write; }

}  // namespace standin

// client.cpp - vdistream's stand-in of libsqlvdi.so, the VDI client library of SQL Server
// on Linux: ClientVirtualDeviceSet and ClientVirtualDevice as declared in vdi.h (from
// Microsoft's public header). Behaviour follows the VDI specification as summarised in
// vdistream's spec (vdi.md sections 3-5 and 8); the transport is standin.h's.
// Only the 12 members listed in sqlvdi.map are exported.
#include "standin.h"

#include <mutex>
#include <new>
#include <vector>

using namespace standin;

// Process-local state of a set opened by this process (as creator or secondary).
class CVDS {
public:
    Control* ctl = nullptr;
    bool primary = false;
    std::string set_name;
    std::mutex mapping_lock;  // guards the lazy mapping of the buffer area
    uint8_t* buf = nullptr;
    size_t buf_size = 0;
    std::vector<ClientVirtualDevice*> devices;
};

// Process-local state of one device: the library owns the VDC_Command handed out.
class CVD {
public:
    CVDS* set = nullptr;
    int index = 0;
    VDC_Command cmds[kRing] = {};
    uint32_t tags[kRing] = {};
};

namespace {

// Server side attached, not closed, and its process gone: abort (spec 5.4).
bool server_died(Control* c) {
    Peer server;
    {
        Lock l(c);
        server = c->server;
    }
    if (!peer_dead(server)) return false;
    trigger_abort(c);
    return true;
}

// Maps the buffer area the server created; on failure logs as the real library does
// (spec 5.4, issue #752) and aborts the set.
int map_buffers(CVDS* s) {
    std::lock_guard<std::mutex> g(s->mapping_lock);
    if (s->buf != nullptr) return 0;
    std::string name = buffer_name(s->set_name.c_str());
    int fd = shm_open(name.c_str(), O_RDWR | O_CLOEXEC, 0);
    int err = errno;
    struct stat st;
    void* p = MAP_FAILED;
    if (fd >= 0) {
        if (fstat(fd, &st) == 0 && st.st_size > 0) {
            p = mmap(nullptr, size_t(st.st_size), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        }
        err = p == MAP_FAILED ? (errno != 0 ? errno : EINVAL) : 0;
        close(fd);
    }
    if (p == MAP_FAILED) {
        fprintf(stderr, "SQLVDI: Host_%s_SQLVDIMemoryName_0: Open(hBufferMemory): error %d\n",
                s->set_name.c_str(), err);
        fflush(stderr);
        trigger_abort(s->ctl);
        return VD_E_ABORT;
    }
    s->buf = static_cast<uint8_t*>(p);
    s->buf_size = size_t(st.st_size);
    return 0;
}

// Client-settable feature bits of the public header; anything else is not a configuration
// a client can ask for (CreateEx: VD_E_NOTSUPPORTED).
constexpr uint32_t kClientFeatures =
    VDF_Removable | VDF_Rewind | VDF_Position | VDF_SkipBlocks | VDF_ReversePosition |
    VDF_Discard | VDF_FileMarks | VDF_RandomAccess | VDF_SnapshotPrepare | VDF_EnumFrozenFiles |
    VDF_VSSWriter | VDF_RequestComplete | VDF_LatchStats;

bool valid_config(const VDConfig* cfg) {
    if (cfg->deviceCount < 1 || cfg->deviceCount > uint32_t(kMaxDevices)) return false;
    if ((cfg->features & ~kClientFeatures) != 0) return false;
    if (cfg->alignment != 0 &&
        ((cfg->alignment & (cfg->alignment - 1)) != 0 || cfg->alignment > 65536)) {
        return false;
    }
    return true;
}

bool init_semaphores(Control* c) {
    if (sem_init(&c->config_sem, 1, 0) != 0) return false;
    for (int i = 0; i < kMaxDevices; ++i) {
        if (sem_init(&c->devices[i].cmd_sem, 1, 0) != 0) return false;
        if (sem_init(&c->devices[i].done_sem, 1, 0) != 0) return false;
    }
    return true;
}

bool init_mutex(Control* c) {
    pthread_mutexattr_t a;
    if (pthread_mutexattr_init(&a) != 0) return false;
    bool ok = pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED) == 0 &&
              pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST) == 0 &&
              pthread_mutex_init(&c->lock, &a) == 0;
    pthread_mutexattr_destroy(&a);
    return ok;
}

// Maps a handle from GetBufferHandle: bit 30 set, 17 bits of the command's tag, the
// device (6 bits) and the slot (7 bits). It stays valid while that command is outstanding,
// in every process of the set (the offset is looked up, not the address).
constexpr int kSlotBits = 7, kDeviceBits = 6, kTagBits = 17;
static_assert((1 << kSlotBits) == kRing, "slot bits match the ring");
static_assert((1 << kDeviceBits) == kMaxDevices, "device bits match the table");

unsigned int make_handle(uint32_t tag, int device, int slot) {
    return (1u << 30) | ((tag & ((1u << kTagBits) - 1)) << (kSlotBits + kDeviceBits)) |
           (unsigned(device) << kSlotBits) | unsigned(slot);
}

}  // namespace

// ---- ClientVirtualDevice ------------------------------------------------------------------

ClientVirtualDevice::ClientVirtualDevice() : cvd(nullptr) {}

ClientVirtualDevice::~ClientVirtualDevice() { delete cvd; }

int ClientVirtualDevice::GetCommand(time_t timeOut, VDC_Command** ppCmd) {
    if (ppCmd == nullptr) return VD_E_INVALID;
    *ppCmd = nullptr;
    if (cvd == nullptr || cvd->set == nullptr || cvd->set->ctl == nullptr) return VD_E_PROTOCOL;
    Control* c = cvd->set->ctl;
    Device* d = &c->devices[cvd->index];
    int64_t deadline = deadline_after(int64_t(timeOut));
    for (;;) {
        {
            Lock l(c);
            if (c->aborted) return VD_E_ABORT;
            if (d->pend_count > 0) {
                uint32_t slot = d->pend[d->pend_head];
                d->pend_head = (d->pend_head + 1) % kRing;
                d->pend_count -= 1;
                Slot* s = &d->slots[slot];
                s->state = kDelivered;
                VDC_Command* cmd = &cvd->cmds[slot];
                cmd->commandCode = s->code;
                cmd->size = s->size;
                cmd->position = s->position;
                cmd->buffer = is_data_command(s->code) ? cvd->set->buf + s->offset : nullptr;
                cvd->tags[slot] = s->tag;
                *ppCmd = cmd;
                return 0;
            }
            if (d->server_closed) return VD_E_CLOSE;
        }
        if (server_died(c)) return VD_E_ABORT;
        if (!wait_slice(&d->cmd_sem, deadline)) return VD_E_TIMEOUT;
    }
}

int ClientVirtualDevice::CompleteCommand(VDC_Command* pCmd, int completionCode,
                                         unsigned long bytesTransferred, int64_t position) {
    if (cvd == nullptr || cvd->set == nullptr || cvd->set->ctl == nullptr) return VD_E_PROTOCOL;
    if (pCmd < cvd->cmds || pCmd >= cvd->cmds + kRing) return VD_E_INVALID;
    size_t slot = size_t(pCmd - cvd->cmds);
    Control* c = cvd->set->ctl;
    Device* d = &c->devices[cvd->index];
    {
        Lock l(c);
        if (c->aborted) return VD_E_ABORT;  // spec 5.1: completions after abort are ignored
        Slot* s = &d->slots[slot];
        if (s->state != kDelivered || s->tag != cvd->tags[slot]) return VD_E_INVALID;
        s->completion = completionCode;
        s->bytes = bytesTransferred > 0xFFFFFFFFul ? 0xFFFFFFFFu : uint32_t(bytesTransferred);
        s->out_position = position;
        s->state = kCompleted;
        d->done[(d->done_head + d->done_count) % kRing] = uint32_t(slot);
        d->done_count += 1;
    }
    sem_post(&d->done_sem);
    return 0;
}

// ---- ClientVirtualDeviceSet ---------------------------------------------------------------

ClientVirtualDeviceSet::ClientVirtualDeviceSet() : cvds(nullptr) {}

ClientVirtualDeviceSet::~ClientVirtualDeviceSet() {
    if (cvds != nullptr) Close();
}

int ClientVirtualDeviceSet::Create(char* name, VDConfig* cfg) {
    if (cvds != nullptr) return VD_E_PROTOCOL;
    if (name == nullptr || cfg == nullptr || !valid_set_name(name)) return VD_E_INVALID;
    if (!valid_config(cfg)) return VD_E_NOTSUPPORTED;
    sweep_debris();
    std::string shm = control_name(name);
    // 0660 filtered by the umask, as the real library's objects are (sample PR #238).
    int fd = shm_open(shm.c_str(), O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC, 0660);
    if (fd < 0) {
        if (errno == EEXIST) return VD_E_BUSY;
        if (errno == EACCES) return VD_E_SECURITY;
        if (errno == EINVAL || errno == ENAMETOOLONG) return VD_E_INVALID;
        return VD_E_UNEXPECTED;
    }
    Control* c = nullptr;
    if (ftruncate(fd, sizeof(Control)) == 0) c = map_control(fd);
    close(fd);
    CVDS* s = c != nullptr ? new (std::nothrow) CVDS() : nullptr;
    if (s == nullptr || !init_mutex(c) || !init_semaphores(c)) {
        delete s;
        unmap_control(c);
        shm_unlink(shm.c_str());
        return c == nullptr ? VD_E_MEMORY : VD_E_UNEXPECTED;
    }
    c->version = kVersion;
    c->client.pid = int32_t(getpid());
    c->client.start = self_start();
    c->client_cfg = *cfg;
    snprintf(c->set_name, sizeof c->set_name, "%s", name);
    __atomic_store_n(&c->magic, kMagic, __ATOMIC_RELEASE);
    s->ctl = c;
    s->primary = true;
    s->set_name = name;
    cvds = s;
    return 0;
}

int ClientVirtualDeviceSet::GetConfiguration(time_t timeout, VDConfig* cfg) {
    if (cvds == nullptr) return VD_E_PROTOCOL;
    if (cfg == nullptr) return VD_E_INVALID;
    Control* c = cvds->ctl;
    int64_t deadline = deadline_after(int64_t(timeout));
    for (;;) {
        {
            Lock l(c);
            if (c->aborted) return VD_E_ABORT;
            if (c->state == kConfigured) {
                *cfg = c->final_cfg;
                return 0;
            }
        }
        if (server_died(c)) return VD_E_ABORT;
        if (!wait_slice(&c->config_sem, deadline)) return VD_E_TIMEOUT;
    }
}

int ClientVirtualDeviceSet::OpenDevice(char* name, ClientVirtualDevice** ppVirtualDevice) {
    if (ppVirtualDevice != nullptr) *ppVirtualDevice = nullptr;
    if (cvds == nullptr) return VD_E_PROTOCOL;
    if (name == nullptr || ppVirtualDevice == nullptr) return VD_E_INVALID;
    Control* c = cvds->ctl;
    int index = -1;
    {
        Lock l(c);
        if (c->aborted) return VD_E_ABORT;
        if (c->state != kConfigured) return VD_E_PROTOCOL;
        for (int i = 0; i < int(c->device_count); ++i) {
            if (strncmp(c->devices[i].name, name, kDeviceNameMax) == 0) index = i;
        }
        if (index < 0) return VD_E_INVALID;
        if (c->devices[index].client_open) return VD_E_OPEN;
    }
    int rc = map_buffers(cvds);
    if (rc != 0) return rc;
    CVD* d = new (std::nothrow) CVD();
    ClientVirtualDevice* vd = d != nullptr ? new (std::nothrow) ClientVirtualDevice() : nullptr;
    if (vd == nullptr) {
        delete d;
        return VD_E_MEMORY;
    }
    d->set = cvds;
    d->index = index;
    vd->cvd = d;
    {
        Lock l(c);
        rc = c->aborted ? VD_E_ABORT : c->devices[index].client_open ? VD_E_OPEN : 0;
        if (rc == 0) c->devices[index].client_open = 1;
    }
    if (rc != 0) {
        delete vd;
        return rc;
    }
    {
        std::lock_guard<std::mutex> g(cvds->mapping_lock);
        cvds->devices.push_back(vd);
    }
    *ppVirtualDevice = vd;
    return 0;
}

int ClientVirtualDeviceSet::Close() {
    if (cvds == nullptr) return VD_E_PROTOCOL;
    Control* c = cvds->ctl;
    int rc = 0;
    bool abort_now = false;
    {
        Lock l(c);
        // A secondary only lets go of its mappings: the set is the primary's (spec 4.2).
        if (cvds->primary && !c->aborted) {
            bool terminated = c->state == kConfigured;
            bool open_devices = false;
            for (int i = 0; i < int(c->device_count); ++i) {
                if (!c->devices[i].server_closed) {
                    terminated = false;
                    if (c->devices[i].client_open) open_devices = true;
                }
            }
            // Not normally terminated: the server must not wait for us (spec 5.3).
            if (!terminated) {
                c->aborted = 1;
                abort_now = true;
                if (open_devices) rc = VD_E_OPEN;
            }
        }
        if (cvds->primary) c->client.detached = 1;
    }
    if (abort_now) wake_all(c);
    for (ClientVirtualDevice* vd : cvds->devices) delete vd;
    if (cvds->buf != nullptr) munmap(cvds->buf, cvds->buf_size);
    unmap_control(c);
    if (cvds->primary) {
        shm_unlink(control_name(cvds->set_name.c_str()).c_str());
        // The server may be gone; a name nobody can open any more is debris either way.
        shm_unlink(buffer_name(cvds->set_name.c_str()).c_str());
    }
    delete cvds;
    cvds = nullptr;
    return rc;
}

int ClientVirtualDeviceSet::SignalAbort() {
    if (cvds == nullptr) return VD_E_PROTOCOL;
    trigger_abort(cvds->ctl);
    return 0;
}

int ClientVirtualDeviceSet::OpenInSecondary(char* setName) {
    if (cvds != nullptr) return VD_E_PROTOCOL;
    if (setName == nullptr || !valid_set_name(setName)) return VD_E_INVALID;
    int fd = shm_open(control_name(setName).c_str(), O_RDWR | O_CLOEXEC, 0);
    if (fd < 0) return errno == EACCES ? VD_E_SECURITY : VD_E_PROTOCOL;
    struct stat st;
    Control* c = nullptr;
    if (fstat(fd, &st) == 0 && size_t(st.st_size) >= sizeof(Control)) c = map_control(fd);
    close(fd);
    if (c == nullptr || !control_ready(c)) {
        unmap_control(c);
        return VD_E_PROTOCOL;
    }
    int rc = 0;
    {
        Lock l(c);
        if (c->aborted) rc = VD_E_ABORT;
        else if (c->state != kConfigured) rc = VD_E_PROTOCOL;  // primary not configured yet
    }
    CVDS* s = rc == 0 ? new (std::nothrow) CVDS() : nullptr;
    if (s == nullptr) {
        unmap_control(c);
        return rc != 0 ? rc : VD_E_MEMORY;
    }
    s->ctl = c;
    s->primary = false;
    s->set_name = setName;
    cvds = s;
    return 0;
}

int ClientVirtualDeviceSet::GetBufferHandle(uint8_t* pBuffer, unsigned int* pBufferHandle) {
    if (cvds == nullptr) return VD_E_PROTOCOL;
    if (pBuffer == nullptr || pBufferHandle == nullptr || cvds->buf == nullptr) {
        return VD_E_INVALID;
    }
    if (pBuffer < cvds->buf || pBuffer >= cvds->buf + cvds->buf_size) return VD_E_INVALID;
    uint64_t offset = uint64_t(pBuffer - cvds->buf);
    Control* c = cvds->ctl;
    Lock l(c);
    for (int d = 0; d < int(c->device_count); ++d) {
        for (int i = 0; i < kRing; ++i) {
            const Slot& s = c->devices[d].slots[i];
            if (s.state == kDelivered && is_data_command(s.code) && s.offset == offset) {
                *pBufferHandle = make_handle(s.tag, d, i);
                return 0;
            }
        }
    }
    return VD_E_INVALID;
}

int ClientVirtualDeviceSet::MapBufferHandle(int dwBuffer, uint8_t** ppBuffer) {
    if (cvds == nullptr) return VD_E_PROTOCOL;
    if (ppBuffer == nullptr) return VD_E_INVALID;
    *ppBuffer = nullptr;
    unsigned h = unsigned(dwBuffer);
    if (dwBuffer < 0 || (h & (1u << 30)) == 0) return VD_E_INVALID;
    int slot = int(h & ((1u << kSlotBits) - 1));
    int device = int((h >> kSlotBits) & ((1u << kDeviceBits) - 1));
    uint32_t tag = (h >> (kSlotBits + kDeviceBits)) & ((1u << kTagBits) - 1);
    uint64_t offset = 0;
    {
        Control* c = cvds->ctl;
        Lock l(c);
        if (!valid_device(c, device)) return VD_E_INVALID;
        const Slot& s = c->devices[device].slots[slot];
        if (s.state != kDelivered || !is_data_command(s.code) ||
            (s.tag & ((1u << kTagBits) - 1)) != tag) {
            return VD_E_INVALID;
        }
        offset = s.offset;
    }
    int rc = map_buffers(cvds);  // a secondary may not have mapped the area yet
    if (rc != 0) return rc;
    *ppBuffer = cvds->buf + offset;
    return 0;
}

// Public in the header but undocumented, and not exported by this stand-in (sqlvdi.map).
void ClientVirtualDeviceSet::RegisterDeviceClosed() {}

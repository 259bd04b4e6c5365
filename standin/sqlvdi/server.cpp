// server.cpp - libsqlvdi_standin_server.so: the server side of vdistream's stand-in VDI
// library, a flat C API (vdss_*) that the stand-in SQL Server drives through ctypes.
// It plays what SQL Server's IServerVirtualDeviceSet2 does (spec vdi.md 1.7, 4.3, 5):
// open the set a client created, open its devices by the VIRTUAL_DEVICE names, publish
// the final configuration and the buffer area, send commands and collect completions.
// Transport and layout: standin.h. Only the vdss_* functions are exported (server.map).
#include "standin.h"
#include "vdss.h"

#include <new>

using namespace standin;

struct vdss_set {  // opaque to callers (vdss.h)
    Control* ctl = nullptr;
    std::string set_name;
    uint8_t* buf = nullptr;
    size_t buf_size = 0;
    bool created_buffers = false;
};

namespace {

constexpr int kOpenPollMs = 5;  // vdss_open polls for the client's segment to appear

bool client_died(Control* c) {
    Peer client;
    {
        Lock l(c);
        client = c->client;
    }
    if (!peer_dead(client)) return false;
    trigger_abort(c);
    return true;
}

// Opens and maps a ready control segment; 0, or the errno that stopped it (EAGAIN: the
// segment exists but its creator has not finished initialising it).
int try_open(const std::string& shm, Control** out) {
    int fd = shm_open(shm.c_str(), O_RDWR | O_CLOEXEC, 0);
    if (fd < 0) return errno;
    struct stat st;
    Control* c = nullptr;
    if (fstat(fd, &st) == 0 && size_t(st.st_size) >= sizeof(Control)) c = map_control(fd);
    close(fd);
    if (c == nullptr || !control_ready(c)) {
        unmap_control(c);
        return EAGAIN;
    }
    *out = c;
    return 0;
}

}  // namespace

extern "C" {

int vdss_open(const char* set_name, int timeout_ms, vdss_set** out) {
    if (out == nullptr) return VD_E_INVALID;
    *out = nullptr;
    if (!valid_set_name(set_name)) return VD_E_INVALID;
    std::string shm = control_name(set_name);
    int64_t deadline = deadline_after(timeout_ms);
    Control* c = nullptr;
    for (;;) {
        int err = try_open(shm, &c);
        if (err == 0) {
            Peer client;
            {
                Lock l(c);
                client = c->client;
            }
            // A dead client's segment is debris, not the set we wait for: the next Create
            // removes it and makes a new one.
            if (!client.detached && process_alive(client.pid, client.start)) break;
            unmap_control(c);
            c = nullptr;
            err = ENOENT;
        }
        if (err == EACCES) return VD_E_SECURITY;
        if (err != ENOENT && err != EAGAIN) return VD_E_UNEXPECTED;
        if (deadline >= 0 && now_ms() >= deadline) return VD_E_NOTOPEN;
        sleep_ms(kOpenPollMs);
    }
    int rc = 0;
    {
        Lock l(c);
        if (c->aborted) {
            rc = VD_E_ABORT;
        } else if (c->server.pid != 0 && !c->server.detached &&
                   process_alive(c->server.pid, c->server.start)) {
            rc = VD_E_BUSY;  // another server already serves this set
        } else {
            c->server.pid = int32_t(getpid());
            c->server.start = self_start();
            c->server.detached = 0;
        }
    }
    vdss_set* s = rc == 0 ? new (std::nothrow) vdss_set() : nullptr;
    if (s == nullptr) {
        unmap_control(c);
        return rc != 0 ? rc : VD_E_MEMORY;
    }
    s->ctl = c;
    s->set_name = set_name;
    *out = s;
    return 0;
}

int vdss_client_config(vdss_set* s, VDConfig* out) {
    if (s == nullptr || out == nullptr) return VD_E_INVALID;
    Lock l(s->ctl);
    *out = s->ctl->client_cfg;
    return 0;
}

int vdss_open_device(vdss_set* s, const char* name, int* index_out) {
    if (s == nullptr || name == nullptr || index_out == nullptr) return VD_E_INVALID;
    size_t n = strnlen(name, kDeviceNameMax);
    if (n == 0 || n >= kDeviceNameMax) return VD_E_INVALID;
    Control* c = s->ctl;
    Lock l(c);
    if (c->aborted) return VD_E_ABORT;
    if (c->state != kCreated) return VD_E_PROTOCOL;
    // More VIRTUAL_DEVICE clauses than the client's deviceCount cannot be served.
    if (c->device_count >= c->client_cfg.deviceCount) return VD_E_INVALID;
    for (uint32_t i = 0; i < c->device_count; ++i) {
        if (strncmp(c->devices[i].name, name, kDeviceNameMax) == 0) return VD_E_INVALID;
    }
    int index = int(c->device_count);
    Device* d = &c->devices[index];
    memcpy(d->name, name, n + 1);
    d->server_open = 1;
    c->device_count += 1;
    *index_out = index;
    return 0;
}

int vdss_configure(vdss_set* s, const VDConfig* final_cfg, uint64_t buffer_area_bytes) {
    if (s == nullptr || final_cfg == nullptr || buffer_area_bytes == 0) return VD_E_INVALID;
    Control* c = s->ctl;
    {
        Lock l(c);
        if (c->aborted) return VD_E_ABORT;
        if (c->state != kCreated || c->device_count == 0) return VD_E_PROTOCOL;
    }
    std::string shm = buffer_name(s->set_name.c_str());
    int fd = -1;
    for (int attempt = 0; attempt < 2 && fd < 0; ++attempt) {
        // 0660 less the umask, as SQL Server's own objects (owner mssql:mssql).
        fd = shm_open(shm.c_str(), O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC, 0660);
        if (fd < 0 && errno == EEXIST) shm_unlink(shm.c_str());  // debris of an old set
    }
    if (fd < 0) return errno == EACCES ? VD_E_SECURITY : VD_E_UNEXPECTED;
    void* p = MAP_FAILED;
    if (ftruncate(fd, off_t(buffer_area_bytes)) == 0) {
        p = mmap(nullptr, size_t(buffer_area_bytes), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    }
    close(fd);
    if (p == MAP_FAILED) {
        shm_unlink(shm.c_str());
        return VD_E_MEMORY;
    }
    s->buf = static_cast<uint8_t*>(p);
    s->buf_size = size_t(buffer_area_bytes);
    s->created_buffers = true;
    {
        Lock l(c);
        if (c->aborted) return VD_E_ABORT;
        c->final_cfg = *final_cfg;
        c->buffer_bytes = buffer_area_bytes;
        c->state = kConfigured;
    }
    post_n(&c->config_sem, kAbortPosts);
    return 0;
}

uint8_t* vdss_buffer_base(vdss_set* s) { return s != nullptr ? s->buf : nullptr; }

int vdss_send(vdss_set* s, int device, int code, int size, int64_t position,
              uint64_t buffer_offset, uint32_t* tag_out) {
    if (s == nullptr) return VD_E_INVALID;
    Control* c = s->ctl;
    if (client_died(c)) return VD_E_ABORT;
    Device* d = nullptr;
    {
        Lock l(c);
        if (c->aborted) return VD_E_ABORT;
        if (c->state != kConfigured) return VD_E_PROTOCOL;
        if (!valid_device(c, device)) return VD_E_INVALID;
        d = &c->devices[device];
        if (d->server_closed) return VD_E_PROTOCOL;
        if (is_data_command(code) &&
            (size < 0 || buffer_offset > c->buffer_bytes ||
             uint64_t(size) > c->buffer_bytes - buffer_offset)) {
            return VD_E_INVALID;
        }
        int slot = -1;
        for (int i = 0; i < kRing && slot < 0; ++i) {
            if (d->slots[i].state == kFree) slot = i;
        }
        if (slot < 0) return VD_E_BUSY;  // the spec's VD_E_QUEUE_FULL has BUSY's value
        d->next_tag = d->next_tag + 1 == 0 ? 1 : d->next_tag + 1;
        Slot* sl = &d->slots[slot];
        sl->state = kQueued;
        sl->tag = d->next_tag;
        sl->code = code;
        sl->size = size;
        sl->position = position;
        sl->offset = is_data_command(code) ? buffer_offset : 0;
        sl->completion = 0;
        sl->bytes = 0;
        sl->out_position = 0;
        d->pend[(d->pend_head + d->pend_count) % kRing] = uint32_t(slot);
        d->pend_count += 1;
        if (tag_out != nullptr) *tag_out = sl->tag;
    }
    sem_post(&d->cmd_sem);
    return 0;
}

int vdss_wait(vdss_set* s, int device, int timeout_ms, uint32_t* tag, int* completion,
              uint32_t* bytes, int64_t* position) {
    if (s == nullptr) return VD_E_INVALID;
    Control* c = s->ctl;
    Device* d = nullptr;
    {
        Lock l(c);
        if (!valid_device(c, device)) return VD_E_INVALID;
        d = &c->devices[device];
    }
    int64_t deadline = deadline_after(timeout_ms);
    for (;;) {
        {
            Lock l(c);
            if (c->aborted) return VD_E_ABORT;
            if (d->done_count > 0) {
                uint32_t slot = d->done[d->done_head];
                d->done_head = (d->done_head + 1) % kRing;
                d->done_count -= 1;
                Slot* sl = &d->slots[slot];
                if (tag != nullptr) *tag = sl->tag;
                if (completion != nullptr) *completion = sl->completion;
                if (bytes != nullptr) *bytes = sl->bytes;
                if (position != nullptr) *position = sl->out_position;
                sl->state = kFree;
                return 0;
            }
        }
        if (client_died(c)) return VD_E_ABORT;
        if (!wait_slice(&d->done_sem, deadline)) return VD_E_TIMEOUT;
    }
}

int vdss_close_device(vdss_set* s, int device) {
    if (s == nullptr) return VD_E_INVALID;
    Control* c = s->ctl;
    Device* d = nullptr;
    {
        Lock l(c);
        if (c->aborted) return VD_E_ABORT;  // spec 5.1: CloseDevice after abort does nothing
        if (!valid_device(c, device)) return VD_E_INVALID;
        d = &c->devices[device];
        d->server_closed = 1;
    }
    post_n(&d->cmd_sem, kAbortPosts);
    return 0;
}

int vdss_signal_abort(vdss_set* s) {
    if (s == nullptr) return VD_E_INVALID;
    trigger_abort(s->ctl);
    return 0;
}

int vdss_client_alive(vdss_set* s) {
    if (s == nullptr) return 0;
    Peer client;
    {
        Lock l(s->ctl);
        client = s->ctl->client;
    }
    return process_alive(client.pid, client.start) ? 1 : 0;
}

int vdss_close(vdss_set* s) {
    if (s == nullptr) return VD_E_INVALID;
    Control* c = s->ctl;
    int rc = 0;
    bool abort_now = false;
    bool client_gone = false;
    {
        Lock l(c);
        if (!c->aborted) {
            for (uint32_t i = 0; i < c->device_count; ++i) {
                if (!c->devices[i].server_closed) abort_now = true;
            }
            if (c->state != kConfigured) abort_now = true;
            // Server Close with open devices: VD_E_PROTOCOL after abort processing (5.3).
            if (abort_now) {
                c->aborted = 1;
                if (c->device_count > 0 && c->state == kConfigured) rc = VD_E_PROTOCOL;
            }
        }
        c->server.detached = 1;
        client_gone = c->client.detached || !process_alive(c->client.pid, c->client.start);
    }
    if (abort_now) wake_all(c);
    if (s->buf != nullptr) munmap(s->buf, s->buf_size);
    if (s->created_buffers) shm_unlink(buffer_name(s->set_name.c_str()).c_str());
    unmap_control(c);
    // The client normally removes its segment; if it is gone, nobody else will.
    if (client_gone) shm_unlink(control_name(s->set_name.c_str()).c_str());
    delete s;
    return rc;
}

}  // extern "C"

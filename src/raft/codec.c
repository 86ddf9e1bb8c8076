/*
 * codec.c: the wire (and store) encoding of Raft messages and log entries.
 *
 * Big-endian, written with struct buf and read with struct cursor (lib/buf.h).
 * Layout of a message, version 1:
 *   u8 version, u8 type, u8 flags, u8 reject,
 *   u64 from, to, term, index, log_term, commit, hint, ctx,
 *   u32 n_entries, n x entry,
 *   u64 snap.index, snap.term, snap.size, bytes snap.conf,
 *   u64 offset, bytes data
 * entry: u64 term, index, client_id, seq, u8 type, bytes data
 * (bytes = u32 length + the bytes). An entry on its own is u8 version + entry.
 * Decoders take untrusted input: every count is checked against what the
 * remaining bytes can hold before anything is allocated.
 */
#include "config.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "lib/buf.h"
#include "lib/util.h"
#include "raft/raft.h"

#define ENTRY_MIN_BYTES (4 * 8 + 1 + 4)
#define CONF_MAX_BYTES  (5 + RAFT_MAX_MEMBERS * (8 + 1 + 4 + RAFT_MAX_CONTEXT))

static int entry_put(const struct raft_entry *e, struct buf *b)
{
    if (e->len > RAFT_CODEC_MAX_DATA || (e->len > 0 && e->data == NULL) ||
        e->type > RAFT_ENTRY_CONF)
        return -EINVAL;
    buf_put_u64(b, e->term);
    buf_put_u64(b, e->index);
    buf_put_u64(b, e->client_id);
    buf_put_u64(b, e->seq);
    buf_put_u8(b, e->type);
    buf_put_bytes(b, e->data, e->len);
    return 0;
}

static uint8_t *copy_out(const uint8_t *p, size_t n)
{
    if (n == 0 || p == NULL)
        return NULL;
    uint8_t *d = pb_xmalloc(n);
    memcpy(d, p, n);
    return d;
}

static bool entry_get(struct cursor *c, struct raft_entry *e)
{
    size_t n = 0;
    e->term = cursor_u64(c);
    e->index = cursor_u64(c);
    e->client_id = cursor_u64(c);
    e->seq = cursor_u64(c);
    e->type = cursor_u8(c);
    const uint8_t *p = cursor_bytes(c, RAFT_CODEC_MAX_DATA, &n);
    if (!cursor_ok(c) || e->type > RAFT_ENTRY_CONF) {
        e->data = NULL;
        e->len = 0;
        return false;
    }
    e->data = copy_out(p, n);
    e->len = n;
    return true;
}

int raft_msg_encode(const struct raft_msg *m, struct buf *b)
{
    if (m->type < RAFT_MSG_PROP || m->type > RAFT_MSG_TYPE_MAX ||
        m->n_entries > RAFT_CODEC_MAX_ENTRIES || (m->n_entries > 0 && m->entries == NULL) ||
        m->len > RAFT_CODEC_MAX_DATA || (m->len > 0 && m->data == NULL) ||
        m->snap.conf_len > CONF_MAX_BYTES || (m->snap.conf_len > 0 && m->snap.conf == NULL))
        return -EINVAL;
    size_t start = b->len;
    /* one allocation for the whole message (an append of megabytes would
     * otherwise grow, and copy, the buffer several times) */
    size_t need = 4 + 8 * 8 + 4 + 8 * 3 + 4 + m->snap.conf_len + 8 + 4 + m->len;
    for (size_t i = 0; i < m->n_entries; i++)
        need += ENTRY_MIN_BYTES + PB_MIN(m->entries[i].len, (size_t)RAFT_CODEC_MAX_DATA);
    buf_reserve(b, need);
    buf_put_u8(b, RAFT_CODEC_VERSION);
    buf_put_u8(b, m->type);
    buf_put_u8(b, m->flags);
    buf_put_u8(b, m->reject ? 1 : 0);
    buf_put_u64(b, m->from);
    buf_put_u64(b, m->to);
    buf_put_u64(b, m->term);
    buf_put_u64(b, m->index);
    buf_put_u64(b, m->log_term);
    buf_put_u64(b, m->commit);
    buf_put_u64(b, m->hint);
    buf_put_u64(b, m->ctx);
    buf_put_u32(b, (uint32_t)m->n_entries);
    for (size_t i = 0; i < m->n_entries; i++) {
        if (entry_put(&m->entries[i], b) != 0) {
            b->len = start;
            return -EINVAL;
        }
    }
    buf_put_u64(b, m->snap.index);
    buf_put_u64(b, m->snap.term);
    buf_put_u64(b, m->snap.size);
    buf_put_bytes(b, m->snap.conf, m->snap.conf_len);
    buf_put_u64(b, m->offset);
    buf_put_bytes(b, m->data, m->len);
    return 0;
}

void raft_msg_clear(struct raft_msg *m)
{
    for (size_t i = 0; i < m->n_entries; i++)
        free(m->entries[i].data);
    free(m->entries);
    free((void *)(uintptr_t)m->snap.conf);
    free((void *)(uintptr_t)m->data);
    memset(m, 0, sizeof(*m));
}

int raft_msg_decode(const uint8_t *p, size_t len, struct raft_msg *m)
{
    struct cursor c;
    size_t n;
    memset(m, 0, sizeof(*m));
    if (p == NULL || len == 0)
        return -EINVAL;
    cursor_init(&c, p, len);
    uint8_t version = cursor_u8(&c);
    if (cursor_ok(&c) && version != RAFT_CODEC_VERSION)
        return -EPROTO;
    m->type = cursor_u8(&c);
    m->flags = cursor_u8(&c);
    uint8_t reject = cursor_u8(&c);
    m->reject = reject != 0;
    m->from = cursor_u64(&c);
    m->to = cursor_u64(&c);
    m->term = cursor_u64(&c);
    m->index = cursor_u64(&c);
    m->log_term = cursor_u64(&c);
    m->commit = cursor_u64(&c);
    m->hint = cursor_u64(&c);
    m->ctx = cursor_u64(&c);
    uint32_t count = cursor_u32(&c);
    if (!cursor_ok(&c) || m->type < RAFT_MSG_PROP || m->type > RAFT_MSG_TYPE_MAX || reject > 1 ||
        count > RAFT_CODEC_MAX_ENTRIES || count > cursor_remaining(&c) / ENTRY_MIN_BYTES)
        goto bad;
    if (count > 0) {
        m->entries = pb_xcalloc(count, sizeof(*m->entries));
        for (uint32_t i = 0; i < count; i++) {
            if (!entry_get(&c, &m->entries[i]))
                goto bad;
            m->n_entries = i + 1;
        }
    }
    m->snap.index = cursor_u64(&c);
    m->snap.term = cursor_u64(&c);
    m->snap.size = cursor_u64(&c);
    const uint8_t *conf = cursor_bytes(&c, CONF_MAX_BYTES, &n);
    if (!cursor_ok(&c))
        goto bad;
    m->snap.conf = copy_out(conf, n);
    m->snap.conf_len = n;
    m->offset = cursor_u64(&c);
    const uint8_t *data = cursor_bytes(&c, RAFT_CODEC_MAX_DATA, &n);
    if (!cursor_ok(&c) || cursor_remaining(&c) != 0)
        goto bad;
    m->data = copy_out(data, n);
    m->len = n;
    return 0;
bad:
    raft_msg_clear(m);
    return -EINVAL;
}

int raft_entry_encode(const struct raft_entry *e, struct buf *b)
{
    size_t start = b->len;
    buf_put_u8(b, RAFT_CODEC_VERSION);
    if (entry_put(e, b) != 0) {
        b->len = start;
        return -EINVAL;
    }
    return 0;
}

int raft_entry_decode(const uint8_t *p, size_t len, struct raft_entry *e)
{
    struct cursor c;
    memset(e, 0, sizeof(*e));
    if (p == NULL || len == 0)
        return -EINVAL;
    cursor_init(&c, p, len);
    if (cursor_u8(&c) != RAFT_CODEC_VERSION)
        return cursor_ok(&c) ? -EPROTO : -EINVAL;
    if (!entry_get(&c, e) || cursor_remaining(&c) != 0) {
        free(e->data);
        memset(e, 0, sizeof(*e));
        return -EINVAL;
    }
    return 0;
}

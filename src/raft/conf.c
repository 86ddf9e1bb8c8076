/*
 * conf.c: Raft cluster configurations: copy, lookup, and the versioned
 * encoding carried in RAFT_ENTRY_CONF entries and snapshot metadata.
 *
 * Encoding (big-endian, struct buf / struct cursor):
 *   u8 version (1), u32 n, n x { u64 id, u8 role, u32 ctx_len, ctx bytes }
 * Decoding accepts untrusted bytes: every field is bounds-checked, ids must
 * be non-zero and unique, trailing bytes are an error.
 */
#include "config.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "lib/buf.h"
#include "lib/util.h"
#include "raft/raft.h"

#define RAFT_CONF_VERSION 1

void raft_conf_clear(struct raft_conf *conf)
{
    for (size_t i = 0; i < conf->n; i++)
        free(conf->members[i].ctx);
    memset(conf, 0, sizeof(*conf));
}

const struct raft_member *raft_conf_find(const struct raft_conf *conf, uint64_t id)
{
    for (size_t i = 0; i < conf->n; i++)
        if (conf->members[i].id == id)
            return &conf->members[i];
    return NULL;
}

static uint8_t *dup_bytes(const void *p, size_t n)
{
    if (n == 0)
        return NULL;
    uint8_t *q = pb_xmalloc(n);
    memcpy(q, p, n);
    return q;
}

int raft_conf_copy(struct raft_conf *dst, const struct raft_conf *src)
{
    struct raft_conf tmp;
    if (src->n > RAFT_MAX_MEMBERS)
        return -EINVAL;
    memset(&tmp, 0, sizeof(tmp));
    for (size_t i = 0; i < src->n; i++) {
        const struct raft_member *m = &src->members[i];
        tmp.members[i].id = m->id;
        tmp.members[i].role = m->role;
        tmp.members[i].ctx = dup_bytes(m->ctx, m->ctx_len);
        tmp.members[i].ctx_len = m->ctx_len;
    }
    tmp.n = src->n;
    *dst = tmp;
    return 0;
}

static bool conf_valid(const struct raft_conf *conf)
{
    if (conf->n > RAFT_MAX_MEMBERS)
        return false;
    for (size_t i = 0; i < conf->n; i++) {
        const struct raft_member *m = &conf->members[i];
        if (m->id == RAFT_NONE || m->role > RAFT_LEARNER || m->ctx_len > RAFT_MAX_CONTEXT)
            return false;
        for (size_t j = 0; j < i; j++)
            if (conf->members[j].id == m->id)
                return false;
    }
    return true;
}

int raft_conf_encode(const struct raft_conf *conf, uint8_t **out, size_t *len)
{
    struct buf b = BUF_INIT;
    if (!conf_valid(conf))
        return -EINVAL;
    buf_put_u8(&b, RAFT_CONF_VERSION);
    buf_put_u32(&b, (uint32_t)conf->n);
    for (size_t i = 0; i < conf->n; i++) {
        buf_put_u64(&b, conf->members[i].id);
        buf_put_u8(&b, conf->members[i].role);
        buf_put_bytes(&b, conf->members[i].ctx, conf->members[i].ctx_len);
    }
    *out = buf_steal(&b, len);
    return 0;
}

int raft_conf_decode(const uint8_t *p, size_t len, struct raft_conf *conf)
{
    struct cursor c;
    struct raft_conf tmp;
    memset(&tmp, 0, sizeof(tmp));
    cursor_init(&c, p, len);
    if (cursor_u8(&c) != RAFT_CONF_VERSION)
        return -EINVAL;
    uint32_t n = cursor_u32(&c);
    if (!cursor_ok(&c) || n > RAFT_MAX_MEMBERS)
        return -EINVAL;
    for (uint32_t i = 0; i < n && cursor_ok(&c); i++) {
        struct raft_member *m = &tmp.members[i];
        size_t ctx_len = 0;
        m->id = cursor_u64(&c);
        m->role = cursor_u8(&c);
        const uint8_t *ctx = cursor_bytes(&c, RAFT_MAX_CONTEXT, &ctx_len);
        if (!cursor_ok(&c))
            break;
        m->ctx = dup_bytes(ctx, ctx_len);
        m->ctx_len = ctx_len;
        tmp.n = i + 1;
    }
    if (!cursor_ok(&c) || cursor_remaining(&c) != 0 || tmp.n != n || !conf_valid(&tmp)) {
        raft_conf_clear(&tmp);
        return -EINVAL;
    }
    *conf = tmp;
    return 0;
}

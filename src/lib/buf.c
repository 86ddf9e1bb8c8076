/*
 * buf.c: byte buffers and bounds-checked cursors (see buf.h).
 */
#include "config.h"

#include "lib/buf.h"
#include "lib/util.h"

#include <stdlib.h>
#include <string.h>

void buf_init(struct buf *b)
{
    b->data = NULL;
    b->len = 0;
    b->cap = 0;
}

void buf_free(struct buf *b)
{
    free(b->data);
    buf_init(b);
}

void buf_reset(struct buf *b)
{
    b->len = 0;
}

uint8_t *buf_reserve(struct buf *b, size_t n)
{
    if (b->cap - b->len < n) {
        size_t cap = b->cap ? b->cap : 64;
        while (cap - b->len < n) {
            if (cap > SIZE_MAX / 2)
                cap = b->len + n;
            else
                cap *= 2;
        }
        b->data = pb_xrealloc(b->data, cap);
        b->cap = cap;
    }
    return b->data + b->len;
}

void buf_put(struct buf *b, const void *p, size_t n)
{
    if (n == 0)
        return;
    memcpy(buf_reserve(b, n), p, n);
    b->len += n;
}

void buf_put_u8(struct buf *b, uint8_t v)
{
    buf_put(b, &v, 1);
}

void buf_put_u16(struct buf *b, uint16_t v)
{
    uint8_t x[2] = {(uint8_t)(v >> 8), (uint8_t)v};
    buf_put(b, x, 2);
}

void buf_put_u32(struct buf *b, uint32_t v)
{
    uint8_t x[4];
    pb_store_u32(x, v);
    buf_put(b, x, 4);
}

void buf_put_u64(struct buf *b, uint64_t v)
{
    uint8_t x[8];
    pb_store_u64(x, v);
    buf_put(b, x, 8);
}

void buf_put_bytes(struct buf *b, const void *p, size_t n)
{
    buf_put_u32(b, (uint32_t)n);
    buf_put(b, p, n);
}

void buf_put_str(struct buf *b, const char *s)
{
    buf_put_bytes(b, s, strlen(s));
}

uint8_t *buf_steal(struct buf *b, size_t *len)
{
    uint8_t *p = b->data;
    if (len != NULL)
        *len = b->len;
    buf_init(b);
    return p;
}

void pb_store_u32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

uint32_t pb_load_u32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | (uint32_t)p[3];
}

void pb_store_u64(uint8_t *p, uint64_t v)
{
    pb_store_u32(p, (uint32_t)(v >> 32));
    pb_store_u32(p + 4, (uint32_t)v);
}

uint64_t pb_load_u64(const uint8_t *p)
{
    return (uint64_t)pb_load_u32(p) << 32 | pb_load_u32(p + 4);
}

void cursor_init(struct cursor *c, const void *p, size_t len)
{
    c->p = p;
    c->len = len;
    c->off = 0;
    c->failed = false;
}

bool cursor_ok(const struct cursor *c)
{
    return !c->failed;
}

size_t cursor_remaining(const struct cursor *c)
{
    return c->failed ? 0 : c->len - c->off;
}

void cursor_fail(struct cursor *c)
{
    c->failed = true;
}

const uint8_t *cursor_take(struct cursor *c, size_t n)
{
    if (c->failed || c->len - c->off < n) {
        c->failed = true;
        return NULL;
    }
    const uint8_t *p = c->p + c->off;
    c->off += n;
    return p;
}

uint8_t cursor_u8(struct cursor *c)
{
    const uint8_t *p = cursor_take(c, 1);
    return p ? p[0] : 0;
}

uint16_t cursor_u16(struct cursor *c)
{
    const uint8_t *p = cursor_take(c, 2);
    return p ? (uint16_t)(p[0] << 8 | p[1]) : 0;
}

uint32_t cursor_u32(struct cursor *c)
{
    const uint8_t *p = cursor_take(c, 4);
    return p ? pb_load_u32(p) : 0;
}

uint64_t cursor_u64(struct cursor *c)
{
    const uint8_t *p = cursor_take(c, 8);
    return p ? pb_load_u64(p) : 0;
}

const uint8_t *cursor_bytes(struct cursor *c, size_t max, size_t *n)
{
    uint32_t len = cursor_u32(c);
    if (c->failed || len > max) {
        c->failed = true;
        *n = 0;
        return NULL;
    }
    const uint8_t *p = cursor_take(c, len);
    *n = p ? len : 0;
    return p;
}

char *cursor_str(struct cursor *c, size_t max)
{
    size_t n;
    const uint8_t *p = cursor_bytes(c, max, &n);
    if (p == NULL)
        return NULL;
    if (memchr(p, '\0', n) != NULL) {
        c->failed = true;
        return NULL;
    }
    char *s = pb_xmalloc(n + 1);
    memcpy(s, p, n);
    s[n] = '\0';
    return s;
}

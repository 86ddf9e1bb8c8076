/*
 * buf.h: growable byte buffers and bounds-checked cursors for binary codecs.
 *
 * Every wire and disk format in pickbox is written with struct buf (big-endian
 * integers, length-prefixed byte strings) and read back with struct cursor.
 * A cursor never reads past its end: the first short read marks it failed, all
 * later reads return zeros, and the decoder checks cursor_ok() once at the end.
 * This keeps decoders of untrusted input short and free of overreads.
 */
#ifndef PICKBOX_LIB_BUF_H
#define PICKBOX_LIB_BUF_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct buf {
    uint8_t *data; /* owned; NULL while empty */
    size_t len;
    size_t cap;
};

#define BUF_INIT                                                                                   \
    {                                                                                              \
        NULL, 0, 0                                                                                 \
    }

void buf_init(struct buf *b);
void buf_free(struct buf *b);
void buf_reset(struct buf *b); /* len = 0, keeps memory */
/* Makes room for n more bytes and returns a pointer to them (len unchanged). */
uint8_t *buf_reserve(struct buf *b, size_t n);
void buf_put(struct buf *b, const void *p, size_t n);
void buf_put_u8(struct buf *b, uint8_t v);
void buf_put_u16(struct buf *b, uint16_t v);
void buf_put_u32(struct buf *b, uint32_t v);
void buf_put_u64(struct buf *b, uint64_t v);
/* u32 length, then the bytes. */
void buf_put_bytes(struct buf *b, const void *p, size_t n);
/* u32 length, then the bytes of a NUL-terminated string (without the NUL). */
void buf_put_str(struct buf *b, const char *s);
/* Hands the bytes to the caller (free() them) and resets b. */
uint8_t *buf_steal(struct buf *b, size_t *len);

/* Big-endian helpers for fixed headers. */
void pb_store_u32(uint8_t *p, uint32_t v);
uint32_t pb_load_u32(const uint8_t *p);
void pb_store_u64(uint8_t *p, uint64_t v);
uint64_t pb_load_u64(const uint8_t *p);

struct cursor {
    const uint8_t *p;
    size_t len;
    size_t off;
    bool failed;
};

void cursor_init(struct cursor *c, const void *p, size_t len);
bool cursor_ok(const struct cursor *c);
size_t cursor_remaining(const struct cursor *c);
uint8_t cursor_u8(struct cursor *c);
uint16_t cursor_u16(struct cursor *c);
uint32_t cursor_u32(struct cursor *c);
uint64_t cursor_u64(struct cursor *c);
/* Returns a pointer to the next n bytes inside the input, or NULL (and fails). */
const uint8_t *cursor_take(struct cursor *c, size_t n);
/* Reads a u32 length (at most max) and returns a pointer to that many bytes
 * inside the input; *n gets the length. NULL and failed on any violation. */
const uint8_t *cursor_bytes(struct cursor *c, size_t max, size_t *n);
/* Like cursor_bytes() but copies into a new NUL-terminated string that must
 * contain no NUL byte; caller frees. NULL and failed on any violation. */
char *cursor_str(struct cursor *c, size_t max);
/* Marks the cursor failed (a decoder found a semantic violation). */
void cursor_fail(struct cursor *c);

#endif

/*
 * chunker.c: FastCDC-style content-defined chunking (see chunker.h).
 *
 * After Xia et al., "FastCDC: a Fast and Efficient Content-Defined Chunking
 * Approach for Data Deduplication" (USENIX ATC 2016): a gear hash
 * h = (h << 1) + G[byte], cut-point skipping below the minimum size, and
 * normalized chunking (level 2: 2 more mask bits than log2(avg) before the
 * average size, 2 fewer after). The mask takes the hash's top bits: with the
 * shift-left gear hash, bit k depends on the last k+1 bytes only, so the top
 * bits see a 64-byte window.
 */
#include "config.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fsm/chunker.h"
#include "lib/util.h"

/* log2(FSM_CHUNK_AVG) = 16; level-2 normalization. */
#define MASK_SMALL (~0ULL << (64 - 18)) /* before the average: harder */
#define MASK_LARGE (~0ULL << (64 - 14)) /* after the average: easier */
/* Hashing starts this many bytes before the minimum size so that the window
 * is full when the first cut point may be taken. */
#define GEAR_WINDOW 64
#define SKIP_TO     (FSM_CHUNK_MIN - GEAR_WINDOW)
/* The gear table's seed: "pickbox1". Changing it changes every boundary. */
#define GEAR_SEED 0x7069636b626f7831ULL

static uint64_t splitmix64(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

void fsm_chunker_init(struct fsm_chunker *c, fsm_chunk_fn fn, void *arg)
{
    uint64_t s = GEAR_SEED;
    memset(c, 0, sizeof(*c));
    for (int i = 0; i < 256; i++)
        c->gear[i] = splitmix64(&s);
    c->buf = pb_xmalloc(FSM_CHUNK_MAX);
    c->fn = fn;
    c->arg = arg;
}

void fsm_chunker_free(struct fsm_chunker *c)
{
    free(c->buf);
    c->buf = NULL;
}

/* Emits the chunk of c->len bytes at data (c->buf, or the caller's input
 * when the whole chunk lies in it). */
static int emit_from(struct fsm_chunker *c, const uint8_t *data)
{
    struct fsm_chunk ch;
    if (fsm_sha256(data, c->len, ch.id) < 0)
        return -EIO;
    ch.offset = c->offset;
    ch.len = c->len;
    ch.data = data;
    c->offset += c->len;
    c->len = 0;
    c->hash = 0;
    return c->fn(c->arg, &ch);
}

static int emit(struct fsm_chunker *c)
{
    return emit_from(c, c->buf);
}

/*
 * Scans up to n bytes of p as the continuation of the pending chunk (of
 * c->len bytes). Returns how many bytes belong to the pending chunk; *cut
 * says whether the chunk ends after them.
 */
static size_t scan(struct fsm_chunker *c, const uint8_t *p, size_t n, bool *cut)
{
    size_t len = c->len, i = 0;
    uint64_t h = c->hash;
    *cut = false;
    if (len < SKIP_TO) { /* cut-point skipping: no hashing at all */
        size_t k = PB_MIN(n, SKIP_TO - len);
        i = k;
        len += k;
    }
    /* window fill up to the minimum size: hash, never cut */
    for (; i < n && len < FSM_CHUNK_MIN; i++, len++)
        h = (h << 1) + c->gear[p[i]];
    /* before the average: the harder mask */
    for (; i < n && len < FSM_CHUNK_AVG; i++) {
        h = (h << 1) + c->gear[p[i]];
        len++;
        if ((h & MASK_SMALL) == 0) {
            *cut = true;
            i++;
            goto out;
        }
    }
    /* after the average: the easier mask, and a hard stop at the maximum */
    for (; i < n && len < FSM_CHUNK_MAX; i++) {
        h = (h << 1) + c->gear[p[i]];
        len++;
        if ((h & MASK_LARGE) == 0) {
            *cut = true;
            i++;
            goto out;
        }
    }
    if (len == FSM_CHUNK_MAX)
        *cut = true;
out:
    c->hash = h;
    return i;
}

int fsm_chunker_feed(struct fsm_chunker *c, const void *p, size_t n)
{
    const uint8_t *q = p;
    while (n > 0) {
        bool cut;
        bool whole = c->len == 0; /* a chunk starting in this input */
        size_t k = scan(c, q, n, &cut);
        if (cut && whole) {
            /* it ends in it too: hashed and handed on in place, not copied */
            c->len = (uint32_t)k;
            int rc = emit_from(c, q);
            if (rc != 0)
                return rc;
            q += k;
            n -= k;
            continue;
        }
        memcpy(c->buf + c->len, q, k);
        c->len += (uint32_t)k;
        q += k;
        n -= k;
        if (cut) {
            int rc = emit(c);
            if (rc != 0)
                return rc;
        }
    }
    return 0;
}

int fsm_chunker_finish(struct fsm_chunker *c)
{
    int rc = 0;
    if (c->len > 0)
        rc = emit(c);
    c->len = 0;
    c->hash = 0;
    c->offset = 0;
    return rc;
}

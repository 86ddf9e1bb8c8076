/*
 * chunker.h: content-defined chunking of file contents (FastCDC style) with
 * SHA-256 chunk ids.
 *
 * A file's content is cut where a rolling gear hash of the last 64 bytes hits
 * a mask, so boundaries depend on content, not offsets: inserting bytes in the
 * middle of a file changes the chunk(s) around the insertion and nothing else,
 * and only those chunks travel. Chunks are at least FSM_CHUNK_MIN bytes
 * (except the last one of a file) and at most FSM_CHUNK_MAX; "normalized
 * chunking" (a harder mask before FSM_CHUNK_AVG, an easier one after) keeps
 * sizes close to the average.
 *
 * Sizes 16 KiB / 64 KiB / 256 KiB: small enough that an edit re-sends little
 * and identical regions of different files dedup; large enough that one
 * chunk reference (36 bytes in an op) is ~0.05% of the data it names and a
 * 1 GiB file is ~16k references (~590 KB of op), which keeps state.db's
 * chunk table and the ops of big files moderate. (Syncthing uses fixed blocks
 * of 128 KiB and more; restic uses 512 KiB..8 MiB; for a sync tool whose ops
 * travel through a Raft log the smaller end is the better trade.)
 *
 * The boundaries are part of the replicated format (FSM_CHUNKER_VERSION):
 * the gear table is generated from a fixed seed and never changes within a
 * version. Memory is bounded (one FSM_CHUNK_MAX buffer) however large the
 * input is. A chunker is used by one thread at a time.
 */
#ifndef PICKBOX_FSM_CHUNKER_H
#define PICKBOX_FSM_CHUNKER_H

#include <stddef.h>
#include <stdint.h>

#include "fsm/op.h"

#define FSM_CHUNKER_VERSION 1
#define FSM_CHUNK_MIN       (16u * 1024u)
#define FSM_CHUNK_AVG       (64u * 1024u)
#define FSM_CHUNK_MAX       FSM_CHUNK_MAX_LEN /* 256 KiB */

/* One chunk as it is emitted. data points into the chunker's buffer, or into
 * the input of fsm_chunker_feed() when the chunk lies wholly in it, and is
 * valid only during the callback. */
struct fsm_chunk {
    uint8_t id[FSM_CHUNK_ID_LEN]; /* SHA-256 of data */
    uint64_t offset;              /* of the chunk in the stream */
    uint32_t len;
    const uint8_t *data;
};

/* Called for each chunk, in stream order. Return 0 to go on; anything else
 * stops the chunker, which returns that value. */
typedef int (*fsm_chunk_fn)(void *arg, const struct fsm_chunk *c);

struct fsm_chunker {
    uint64_t gear[256];
    uint8_t *buf; /* FSM_CHUNK_MAX bytes: the pending chunk */
    uint32_t len;
    uint64_t hash;
    uint64_t offset;
    fsm_chunk_fn fn;
    void *arg;
};

/* Prepares c (allocates its buffer). fn is called for every chunk. */
void fsm_chunker_init(struct fsm_chunker *c, fsm_chunk_fn fn, void *arg);
/* Frees c's buffer. */
void fsm_chunker_free(struct fsm_chunker *c);

/* Feeds n bytes; emits every chunk completed by them. Returns 0, fn's
 * nonzero value, or -EIO if hashing fails. The cut points do not depend on
 * how the stream is split into feeds. */
int fsm_chunker_feed(struct fsm_chunker *c, const void *p, size_t n);

/* Ends the stream: emits the last (possibly short) chunk, if any, and resets
 * c for a new stream. An empty stream has no chunks. */
int fsm_chunker_finish(struct fsm_chunker *c);

#endif

/*
 * op.h: the operations of the replicated tree and their binary encoding.
 *
 * An op is what the watcher proposes and every node applies in log order:
 * PUT (a file's new content), DELETE, RENAME, MKDIR, SYMLINK, SETATTR,
 * BATCH (many of those in one log entry, applied in order), CHUNKS (chunk
 * bytes only, for a PUT whose new bytes do not fit in one entry; it precedes
 * the PUT that references them) and REFS (only the ids and lengths of chunks
 * whose bytes the writer pushed to the peers beside the log, D13: applying it
 * adds their chunk rows; it precedes the PUT that references them). The encoding is
 * the payload of a Raft log entry, so it is a persistent format: it starts
 * with a format version byte and never changes meaning for a given version.
 *
 * Paths are byte strings relative to the tree root ("a/b/c.txt"). pickbox is
 * faithful to bytes: any byte except NUL and '/' may appear in a name, valid
 * UTF-8 or not (Linux file names are bytes; refusing or normalising names that
 * a user can create would make the watcher unable to replicate them, and
 * normalising would make two distinct local names collide). See
 * fsm_path_valid() for the names that are refused.
 *
 * Decoding takes untrusted bytes (a peer, a log read back from disk): it never
 * crashes, bounds every length before allocating, and validates paths, node
 * ids and the chunk list, so an op that decodes is structurally sound.
 */
#ifndef PICKBOX_FSM_OP_H
#define PICKBOX_FSM_OP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "lib/buf.h"
#include "lib/error.h"

/* The newest op format this build reads. Every op is written in format 1
 * except REFS, which exists only from format 2 on: an older node (it reads
 * format 1) meeting a REFS entry stops applying, naming both versions,
 * instead of taking it for a malformed entry and skipping it (the writer
 * uses REFS only once every member speaks peer protocol 2, doc/upgrades.md). */
#define FSM_OP_FORMAT_VERSION 2
#define FSM_OP_FORMAT_MIN     1

#define FSM_PATH_MAX      4096           /* bytes of a relative path, without NUL */
#define FSM_NAME_MAX      255            /* bytes of one path component */
#define FSM_NODE_MAX      64             /* bytes of a node id */
#define FSM_CHUNK_ID_LEN  32             /* SHA-256 */
#define FSM_CHUNK_MAX_LEN (256u * 1024u) /* must equal the chunker's maximum */
/* Chunk references in one PUT: 2^20 x 64 KiB average = 64 GiB files. */
#define FSM_OP_MAX_CHUNKS (1u << 20)
/* Whole encoded op (including any chunk bytes it carries). A PUT whose new
 * chunks do not fit is split by the proposer into several entries that carry
 * only bytes (see DESIGN.md section 6); this cap bounds one log entry. */
#define FSM_OP_MAX_BYTES (64u * 1024u * 1024u)
#define FSM_BATCH_MAX    4096 /* ops in one BATCH */
#define FSM_MODE_MASK    07777u

/* Names the tree never replicates: the root marker directory and temp files. */
#define FSM_MARKER_NAME  ".pickbox"
#define FSM_TMP_PREFIX   ".pickbox.tmp."
#define FSM_CONFLICT_TAG ".pickbox-conflict-"

/* What a path names. NONE: nothing (absent), also "must not exist" in an
 * expectation. Hard links, devices, FIFOs and sockets are never replicated. */
enum fsm_kind {
    FSM_KIND_NONE = 0,
    FSM_KIND_FILE = 1,
    FSM_KIND_DIR = 2,
    FSM_KIND_SYMLINK = 3,
    FSM_KIND_OTHER = 4, /* found on disk only: device, FIFO, socket */
};

enum fsm_op_type {
    FSM_OP_PUT = 1,
    FSM_OP_DELETE = 2,
    FSM_OP_RENAME = 3,
    FSM_OP_MKDIR = 4,
    FSM_OP_SYMLINK = 5,
    FSM_OP_SETATTR = 6,
    FSM_OP_BATCH = 7,
    FSM_OP_CHUNKS = 8, /* only chunk bytes, for a PUT too large for one entry */
    FSM_OP_REFS = 9,   /* only chunk ids + lengths (bytes pushed beside the log, D13) */
};

/* Chunk references in one REFS op (36 bytes each on the wire: ~147 KiB). */
#define FSM_OP_MAX_REFS 4096u

/* A reference to one chunk of a file's content, in file order. */
struct fsm_chunk_ref {
    uint8_t id[FSM_CHUNK_ID_LEN]; /* SHA-256 of the chunk's bytes */
    uint32_t len;                 /* 1..FSM_CHUNK_MAX_LEN */
};

/* Bytes of a chunk the proposer believes the cluster lacks. */
struct fsm_chunk_data {
    uint8_t id[FSM_CHUNK_ID_LEN];
    uint8_t *data; /* owned by the op */
    uint32_t len;
};

/* SETATTR field selectors. */
#define FSM_ATTR_MODE  0x1u
#define FSM_ATTR_MTIME 0x2u

/*
 * One operation. Every op names the node it was proposed on (origin; used to
 * name conflict copies) and the version of its path that the proposer had
 * seen when it made the change (base: the log index of the op that last
 * changed the path, 0 when the proposer saw no such path). All strings and
 * arrays are owned by the op; fsm_op_free() releases them.
 */
struct fsm_op {
    enum fsm_op_type type;
    char *origin; /* node id */
    char *path;   /* every type except BATCH, CHUNKS and REFS (NULL there) */
    uint64_t base;
    union {
        struct {
            uint32_t mode; /* permission bits, <= 07777 */
            int64_t mtime_ns;
            uint64_t size; /* == sum of refs[i].len */
            struct fsm_chunk_ref *refs;
            uint32_t n_refs;
            struct fsm_chunk_data *data; /* each id appears in refs */
            uint32_t n_data;
        } put;
        struct {
            bool is_dir;
        } del;
        struct {
            char *to;
            uint64_t base_to; /* version of `to` seen by the proposer, 0 if absent */
        } rename;
        struct {
            uint32_t mode;
            int64_t mtime_ns;
        } mkdir;
        struct {
            char *target; /* 1..FSM_PATH_MAX bytes, no NUL; never followed */
            int64_t mtime_ns;
        } symlink;
        struct {
            uint32_t fields; /* FSM_ATTR_* */
            uint32_t mode;
            int64_t mtime_ns;
        } setattr;
        struct {
            struct fsm_op *ops; /* no nested BATCH, no CHUNKS, no REFS */
            uint32_t n_ops;
        } batch;
        struct {
            struct fsm_chunk_data *data;
            uint32_t n_data;
        } chunks;
        struct {
            struct fsm_chunk_ref *refs; /* 1..FSM_OP_MAX_REFS, ids distinct */
            uint32_t n_refs;
        } refs;
    } u;
};

/* Zeroes op (all pointers NULL); fsm_op_free() on such an op is a no-op. */
void fsm_op_init(struct fsm_op *op);
/* Releases everything op owns and re-initialises it. */
void fsm_op_free(struct fsm_op *op);

/* Appends the encoding of op to out. The op must be valid (fsm_op_validate();
 * an invalid op encodes to bytes that fsm_op_decode() refuses).
 * Returns 0, or -EMSGSIZE if the encoding would exceed FSM_OP_MAX_BYTES
 * (out is then left as it was). */
int fsm_op_encode(const struct fsm_op *op, struct buf *out);

/* Decodes len bytes into op (initialised by this function; on success the
 * caller owns it and frees it with fsm_op_free()). Returns 0, or -EINVAL for
 * any malformed input (truncated, trailing bytes, unknown type, lengths over
 * the limits, an invalid path or node id, inconsistent chunk list),
 * -EPROTONOSUPPORT for an unknown format version, -EMSGSIZE if len exceeds
 * FSM_OP_MAX_BYTES. err (may be NULL) says what was wrong. On error op is
 * left initialised and empty. Never reads outside [p, p+len). */
int fsm_op_decode(const void *p, size_t len, struct fsm_op *op, struct pb_error *err);

/* Checks the invariants decode enforces on an op built in memory (by the
 * watcher) before it is encoded. Returns 0 or -EINVAL with err filled. */
int fsm_op_validate(const struct fsm_op *op, struct pb_error *err);

/* Checks that every carried chunk's bytes hash to its id (SHA-256). Decode
 * does not do this (it is the expensive part); the applier must before it
 * stores the bytes. Returns 0, -EBADMSG on a mismatch, -EIO if libcrypto
 * fails. */
int fsm_op_verify_chunks(const struct fsm_op *op, struct pb_error *err);

/* SHA-256 over the ordered chunk reference list (id || u32 len each): the
 * identity of a file's content, used to compare contents without chunks.
 * Returns 0 or -EIO. An empty file has the hash of the empty list. */
int fsm_content_hash(const struct fsm_chunk_ref *refs, uint32_t n, uint8_t out[FSM_CHUNK_ID_LEN]);

/* SHA-256 of buffer (len bytes). Returns 0 or -EIO. */
int fsm_sha256(const void *p, size_t len, uint8_t out[FSM_CHUNK_ID_LEN]);

/*
 * True if path may name an entry of the tree:
 *   - 1..FSM_PATH_MAX bytes, no NUL (a C string), relative (no leading '/'),
 *     no trailing '/', no empty component ("a//b"), no "." or ".." component;
 *   - every component 1..FSM_NAME_MAX bytes;
 *   - first component is not ".pickbox" (the root marker, never replicated);
 *   - no component starts with ".pickbox.tmp." (pickbox's own temp files);
 *   - any other byte is allowed, including non-UTF-8 and control bytes.
 * Names that contain ".pickbox-conflict-" are allowed: a conflict copy is an
 * ordinary file that people edit, rename and delete.
 */
bool fsm_path_valid(const char *path);

/* Like fsm_path_valid() for a string of len bytes that may contain NUL. */
bool fsm_path_valid_n(const char *path, size_t len);

/* True if s is a valid node id: 1..FSM_NODE_MAX of [A-Za-z0-9._-], not
 * starting with '.' or '-' (the same rule as the daemon's node_id; the id
 * becomes part of conflict-copy file names, so it must be a safe name). */
bool fsm_node_valid(const char *s);

/* "PUT", "DELETE", ... for logs. */
const char *fsm_op_type_name(enum fsm_op_type t);

#endif

/*
 * push.h: a big file's chunk bytes pushed by the writer straight to its
 * peers, beside the Raft log (doc/decisions.md D13). The writer stores each
 * batch locally, pushes it to every peer whose link is up, and once the
 * writer plus the peers that acknowledged every batch make a majority of the
 * voters it proposes a REFS entry naming the chunks (id, length), then the
 * PUT: the log carries ~36 bytes per chunk instead of its bytes, and the
 * leader relays none of them. A peer that missed bytes fetches them after the
 * PUT applies (fetch.h), as after a snapshot.
 *
 * Protocol (owner message types, big-endian):
 *   PUSH      (bulk class) u8 version (1), u64 push_id, u32 batch,
 *             u16 n (1..PUSH_BATCH_MAX), n x (32 id, u32 len, len bytes);
 *             at most PUSH_FRAME_BYTES of chunk bytes
 *   PUSH_ACK  (control class) u8 version (1), u64 push_id, u32 batch,
 *             u8 status (enum push_status)
 * A receiver verifies every chunk (1 <= len <= PUSH_CHUNK_MAX, SHA-256 equal
 * to its id) before storing anything: a frame with one bad chunk is rejected
 * whole (logged, counted, acknowledged REJECTED), never stored. Good chunks
 * are stored with statedb_chunk_data_put_many() (durable on return, without a
 * chunk row: "pushed" bytes) and then acknowledged STORED. Bytes that no
 * committed REFS ever named are removed after PUSH_UNROWED_MAX_AGE_MS
 * (push_tick, every PUSH_COLLECT_EVERY_MS).
 *
 * Sender: one push at a time (the replica's big-file job). Each peer of the
 * push has a window of PUSH_WINDOW_BYTES of bytes sent and not acknowledged
 * (under the transport's 16 MiB bulk queue), which paces the job; a peer
 * whose link goes down, whose queue is full, that rejects a batch or does not
 * acknowledge within PUSH_ACK_TIMEOUT_MS leaves the push (it fetches later).
 *
 * Tests: PICKBOX_TEST_PUSH_CRASH=N makes the N-th PUSH this process stores
 * kill it (SIGKILL) once the bytes are in its pack and before their index
 * commits (tests/integration/test_tree_push_crash.py).
 *
 * Threading: the event loop's thread only.
 */
#ifndef PICKBOX_DAEMON_PUSH_H
#define PICKBOX_DAEMON_PUSH_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "lib/error.h"
#include "store/statedb.h"

#define PUSH_VERSION            1
#define PUSH_FRAME_BYTES        (4u * 1024u * 1024u) /* chunk bytes in one PUSH */
#define PUSH_BATCH_MAX          1024                 /* chunks in one PUSH */
#define PUSH_CHUNK_MAX          (256u * 1024u)       /* the chunker's maximum */
#define PUSH_WINDOW_BYTES       (12u * 1024u * 1024u)
#define PUSH_ACK_TIMEOUT_MS     10000u
#define PUSH_MAX_PEERS          16
#define PUSH_COLLECT_EVERY_MS   (10u * 60u * 1000u)
#define PUSH_UNROWED_MAX_AGE_MS (60u * 60u * 1000u)

enum push_status {
    PUSH_STORED = 0,   /* every chunk of the frame is stored durably */
    PUSH_REJECTED = 1, /* malformed, or a chunk failed verification: nothing stored */
    PUSH_FAILED = 2,   /* not stored (no state machine here, storage error) */
};

struct push_ops {
    void *arg;
    /* Sends a PUSH (ack = false, bulk class) or a PUSH_ACK (control class)
     * to node_id; data is copied. 0 or -errno (the peer then leaves the
     * push). */
    int (*send)(void *arg, uint64_t node_id, bool ack, const void *data, size_t len);
};

/* A peer to push to. */
struct push_peer {
    uint64_t id;
    bool voter;
};

/* Where the current push stands. */
struct push_progress {
    bool active;
    size_t peers;           /* peers the push started with */
    size_t left;            /* of which left it (down, rejected, timed out) */
    size_t complete;        /* peers still in it that acknowledged every batch sent */
    size_t voters_complete; /* of which voters */
    size_t voters_in;       /* voters still in it (complete or not) */
    uint64_t batches;       /* batches sent */
};

struct push_stats {
    uint64_t sent_frames, sent_bytes;         /* PUSH frames and their chunk bytes, per peer */
    uint64_t acked_frames, acked_bytes;       /* acknowledged STORED by peers */
    uint64_t received_frames, received_bytes; /* PUSH frames stored here */
    uint64_t rejected_frames;                 /* PUSH frames rejected here */
    uint64_t failed_frames;                   /* PUSH frames not stored here (no state, storage) */
    uint64_t peers_left;                      /* peers that left a push */
    uint64_t unrowed_collected;               /* pushed chunks never named, removed */
};

/* A pusher (idle). ops is copied. Free with push_free(). */
struct push *push_new(const struct push_ops *ops);
void push_free(struct push *p);

/* Starts a push to n peers (n <= PUSH_MAX_PEERS; 0 is fine: the writer
 * alone) with a fresh push id, forgetting any previous one (whose late acks
 * are then ignored). A peer listed twice is one peer (counted once).
 * -EINVAL if n is too large. */
int push_start(struct push *p, const struct push_peer *peers, size_t n, uint64_t now_ms);

/* fn(arg) is called (from the loop) whenever an acknowledgement or a peer
 * leaving changed the current push, so the writer goes on at once; NULL
 * removes it. */
void push_set_observer(struct push *p, void (*fn)(void *arg), void *arg);

/* Forgets the current push (no-op when idle). */
void push_stop(struct push *p);

/* True if bytes more may be sent now: every peer still in the push has that
 * much room in its window (a peer with nothing unacknowledged always has). */
bool push_room(const struct push *p, size_t bytes);

/* Sends n chunks (verified by the caller; each <= PUSH_CHUNK_MAX) to every
 * peer still in the push, in PUSH frames of at most PUSH_FRAME_BYTES. A peer
 * whose send fails leaves the push. -EINVAL when idle. */
int push_send(struct push *p, const struct statedb_chunk_in *in, size_t n, uint64_t now_ms);

void push_progress_get(const struct push *p, struct push_progress *out);

/* The configuration may have changed since push_start(): cur[0..n) are the
 * other members now (as cluster_push_targets() gives them). A peer of the
 * push absent from cur, or there as a learner, stops counting as a voter;
 * one now a voter counts as one. So the majority is always counted among
 * the current voters (a removed or demoted peer never makes up for a voter
 * added meanwhile). No-op when idle. */
void push_set_voters(struct push *p, const struct push_peer *cur, size_t n);

/* While held (a file's REFS entries are proposed and not applied yet),
 * push_tick() does not remove pushed bytes without a row: the writer's own
 * copy must survive until its REFS entry names it, however long the
 * cluster takes to commit it. */
void push_hold_collect(struct push *p, bool hold);

/* A PUSH_ACK from peer `from` (malformed or stale ones are ignored). */
void push_on_ack(struct push *p, uint64_t from, const uint8_t *data, size_t len, uint64_t now_ms);

/* Peer node_id's link went down: it leaves the current push. */
void push_peer_down(struct push *p, uint64_t node_id);

/* Times out silent peers; every PUSH_COLLECT_EVERY_MS removes pushed bytes
 * older than PUSH_UNROWED_MAX_AGE_MS that no row names (db may be NULL). */
void push_tick(struct push *p, struct statedb *db, uint64_t now_ms);

/* A PUSH from peer `from`: verified, stored into db (NULL: not stored, acked
 * FAILED), acknowledged. Never stores a chunk that fails verification.
 * Returns how many of the chunks stored some file already references (its
 * PUT applied before the bytes came: the caller repairs the tree). */
size_t push_on_push(struct push *p, struct statedb *db, uint64_t from, const uint8_t *data,
                    size_t len);

/* Decodes and verifies a PUSH payload: *id, *batch, and up to max chunks
 * into out (pointing into data). 0; -EPROTO (malformed), -EBADMSG (a chunk
 * does not hash to its id) or -EIO, with err filled. Exposed for tests. */
int push_decode(const uint8_t *data, size_t len, uint64_t *id, uint32_t *batch,
                struct statedb_chunk_in *out, size_t max, size_t *n, struct pb_error *err);

void push_get_stats(const struct push *p, struct push_stats *out);

#endif

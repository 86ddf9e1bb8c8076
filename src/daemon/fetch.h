/*
 * fetch.h: the node-local chunk fetcher. A snapshot carries chunk metadata,
 * not chunk bytes (statedb.h), so after installing one (and at startup) a
 * node may hold chunk rows whose bytes it lacks; the files made of them wait
 * in the tree (fsm_apply_repair() skips them). The fetcher asks peers for
 * those bytes, verifies each chunk's SHA-256 against its id before storing
 * it (sm_chunk_store), and re-runs the repair so the files appear.
 *
 * Protocol (two owner message types of the bulk class, big-endian):
 *   request  u8 version (1), u64 req_id, u16 n (1..FETCH_BATCH_MAX),
 *            n x (32 id, u32 len)
 *   reply    u8 version (1), u64 req_id, u16 n, n x (32 id, u8 status,
 *            status 0: u32 len + len bytes), status 1: not here, 2: not now
 *            (the reply's byte budget is spent)
 * One request is in flight at a time, at most FETCH_BATCH_MAX chunks and
 * FETCH_BATCH_BYTES bytes; peers are tried in the order the owner gives
 * (the leader first), each one for what the previous ones did not have; a
 * peer that does not answer within FETCH_TIMEOUT_MS is skipped. A chunk no
 * peer holds (collected everywhere because its file was overwritten: a later
 * log entry replaces the file) is not an error: it is reported and retried
 * with exponential backoff. A reply item that is unsolicited, of the wrong
 * length or whose hash differs from its id is rejected with a log line and
 * never stored. Serving reads at most FETCH_BATCH_BYTES from state.db per
 * request, on the loop.
 *
 * Threading: the event loop's thread. The sm is passed to every call (the
 * daemon may replace it when it resets to join).
 */
#ifndef PICKBOX_DAEMON_FETCH_H
#define PICKBOX_DAEMON_FETCH_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct fetch;
struct sm;

#define FETCH_VERSION     1
#define FETCH_BATCH_MAX   64
#define FETCH_BATCH_BYTES (4u * 1024u * 1024u)
#define FETCH_TIMEOUT_MS  10000u
#define FETCH_BACKOFF_MIN 1000u
#define FETCH_BACKOFF_MAX 60000u
/* Largest chunk accepted (the chunker's maximum, FSM_CHUNK_MAX_LEN). */
#define FETCH_CHUNK_MAX (256u * 1024u)

enum fetch_status {
    FETCH_HERE = 0,
    FETCH_ABSENT = 1,
    FETCH_LATER = 2,
};

struct fetch_ops {
    void *arg;
    /* Sends a request (reply = false) or a reply to node_id in the bulk
     * class; data is copied. 0 or -errno (the peer is then skipped). */
    int (*send)(void *arg, uint64_t node_id, bool reply, const void *data, size_t len);
    /* Fills up to max peers to ask, in order (the leader first, only peers
     * whose link is up); returns how many. */
    size_t (*peers)(void *arg, uint64_t *ids, size_t max);
};

struct fetch_stats {
    bool active;          /* a pass is running */
    uint64_t missing;     /* referenced chunks without bytes, at the last look */
    uint64_t requests;    /* requests sent */
    uint64_t rejected;    /* reply items rejected (hash, length, unsolicited) */
    uint64_t unavailable; /* chunks no peer had, in the last pass */
    uint64_t served_chunks, served_bytes;
};

/* A fetcher (idle). ops is copied. Free with fetch_free(). */
struct fetch *fetch_new(const struct fetch_ops *ops);
void fetch_free(struct fetch *f);

/* Drives it: starts a pass when sm_chunks_wanted() or a retry is due, times
 * out a silent peer. Call it every tick. */
void fetch_tick(struct fetch *f, struct sm *sm, uint64_t now_ms);

/* A request from peer `from`: answered from sm's state.db (bounded work).
 * Malformed requests are dropped with a log line. */
void fetch_on_request(struct fetch *f, struct sm *sm, uint64_t from, const uint8_t *p, size_t len);

/* A reply from peer `from`: verified items are stored; the rest of the
 * batch goes to the next peer. */
void fetch_on_reply(struct fetch *f, struct sm *sm, uint64_t from, const uint8_t *p, size_t len,
                    uint64_t now_ms);

/* A peer's link came up: a retry that waits for its backoff runs at the
 * next tick (and the backoff starts again from its minimum). */
void fetch_peer_up(struct fetch *f);

void fetch_get_stats(const struct fetch *f, struct fetch_stats *out);

#endif

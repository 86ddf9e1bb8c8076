/*
 * raft.h: the Raft consensus algorithm as a pure, deterministic state machine.
 *
 * The core does no I/O, reads no clock, has no globals and calls no rand():
 * time is raft_tick() calls, randomness comes from a seed in the config, the
 * log lives in memory (every entry since the last compaction point) and the
 * application persists what the core asks it to. One struct raft per node.
 *
 * The loop the application runs (etcd-io/raft shape):
 *
 *   inputs:  raft_step(msg) for every peer message, raft_tick() every tick,
 *            raft_propose() / raft_change_conf() / raft_transfer_leader() /
 *            raft_read_index() for local requests, raft_snapshot_taken()
 *   output:  if (raft_ready(r, &rd)) {
 *              1. send rd.msgs (may go out before the persist, §10.2.1)
 *              2. persist, as one atomic write: the snapshot chunk
 *                 (rd.chunk), the snapshot install (rd.snapshot, see below),
 *                 rd.entries (delete every entry >= entries[0].index first,
 *                 then append) and rd.hs when rd.hs_changed (term, vote and
 *                 commit in one record; fsync needed only when rd.must_sync)
 *              3. only once that persist is durable: send
 *                 rd.msgs_after_persist (votes, append acknowledgements ...)
 *              4. apply rd.committed to the state machine, in order
 *              5. raft_advance(r, &rd)
 *            }
 *            (if the persist fails: raft_persist_failed(r, &rd) instead of 3-5)
 *   Between raft_ready() and raft_advance() the core is frozen: every other
 *   call on it returns -EBUSY (queue inputs meanwhile). Every pointer in rd
 *   points into memory the core owns and stays valid until raft_advance().
 *   If the node crashes before the persist completed, nothing of rd counts:
 *   restart from what is on disk with raft_restore().
 *
 * Ownership. Everything passed in (messages, proposal data, configurations,
 * contexts, restore state) is copied: the caller keeps its buffers. Entry
 * payloads belong to the core's in-memory log; rd.entries, rd.committed and
 * the entries of outgoing messages point into it, which is why the core is
 * frozen until raft_advance(). Received snapshot chunks are copied into a
 * core buffer exposed as rd.chunk. The leader counts itself in a quorum only
 * up to its persisted index (raft_advance), so even a single-node cluster
 * never commits what is not on its disk.
 *
 * Snapshots. The application produces a snapshot of its state machine at an
 * applied index, keeps it, and calls raft_snapshot_taken(); the core then
 * compacts its in-memory log (keeping cfg.snapshot_trailing entries) and
 * will send that snapshot to lagging peers in chunks: an outgoing
 * RAFT_MSG_SNAP has data == NULL and asks for bytes [offset, offset+len) of
 * the snapshot at snap.index; the application (or its transport) fills them
 * in before sending. Receiving, the core hands each chunk to persist in
 * rd.chunk (offset 0 starts a new staging area) and, after the last chunk,
 * rd.snapshot: install the staged snapshot into the state machine, record
 * its meta, and delete every log entry <= snapshot->index, and the whole log
 * when rd.snapshot_keep_log is false (Figure 13, rules 6-7). Transfers resume
 * from the receiver's offset after a lost chunk (a new leader or a restart
 * starts over at offset 0).
 *
 * Membership. A configuration is a list of members (id, voter or learner,
 * opaque context bytes that the core keeps for the application: the daemon
 * stores name and address there). It lives in RAFT_ENTRY_CONF entries
 * (encoded by the core) and takes effect when appended. Changes are single
 * server, one at a time, and only after the leader committed an entry of its
 * term (dissertation errata). New servers join as learners; promotion is
 * refused until the learner has caught up.
 *
 * Exactly-once. The core does NOT deduplicate: a retried proposal is a new
 * entry. Entries carry (client_id, seq) and the state machine keeps a session
 * table {client_id -> highest seq applied} inside its own state (so it is in
 * snapshots and survives restarts); an entry whose seq is not above the
 * session's is skipped at apply time. Each client has one op in flight and
 * uses seq = last acknowledged + 1. tests/sim proves this under retries.
 * Why apply-side (dissertation §6.3): the dedup state must be part of the
 * replicated state (snapshots, restarts, every node deciding alike), and
 * session expiry is application policy; the core only carries the key.
 *
 * Threading: none; a struct raft is used by one thread at a time.
 * Errors: functions return 0 or a negative errno. -EBUSY: frozen (between
 * ready and advance) or a conflicting operation in flight; -EPERM: this node
 * is not the leader (where leadership is required); -EAGAIN: try again later
 * (no leader known, learner still catching up, leader has not committed in
 * its term yet); -EINVAL: bad argument.
 */
#ifndef PICKBOX_RAFT_RAFT_H
#define PICKBOX_RAFT_RAFT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define RAFT_NONE        0    /* "no node" id */
#define RAFT_MAX_MEMBERS 32   /* members (voters + learners) in a configuration */
#define RAFT_MAX_CONTEXT 1024 /* bytes of per-member context */

enum raft_role {
    RAFT_FOLLOWER = 0,
    RAFT_PRE_CANDIDATE,
    RAFT_CANDIDATE,
    RAFT_LEADER,
};

enum raft_entry_type {
    RAFT_ENTRY_NORMAL = 0, /* application command */
    RAFT_ENTRY_NOOP = 1,   /* appended by every new leader (§6.4, §5.4.2) */
    RAFT_ENTRY_CONF = 2,   /* a full configuration, encoded by the core */
    /* NOOP and CONF entries also reach rd.committed: the state machine only
     * records their index as applied. */
};

struct raft_entry {
    uint64_t term;
    uint64_t index;
    uint64_t client_id; /* 0 = not a client op; see "Exactly-once" above */
    uint64_t seq;
    uint8_t type; /* enum raft_entry_type */
    uint8_t *data;
    size_t len;
};

enum raft_member_role {
    RAFT_VOTER = 0,
    RAFT_LEARNER = 1,
};

struct raft_member {
    uint64_t id;
    uint8_t role; /* enum raft_member_role */
    uint8_t *ctx; /* opaque application context (name, address ...) */
    size_t ctx_len;
};

struct raft_conf {
    struct raft_member members[RAFT_MAX_MEMBERS];
    size_t n;
};

/* Persistent state other than the log. */
struct raft_hard_state {
    uint64_t term;
    uint64_t vote;
    uint64_t commit;
};

/* What the log before a snapshot boiled down to. conf is the configuration
 * in effect at index, encoded (raft_conf_encode); keep it opaque. */
struct raft_snapshot_meta {
    uint64_t index;
    uint64_t term;
    uint64_t size; /* bytes of snapshot data (application defined) */
    const uint8_t *conf;
    size_t conf_len;
};

enum raft_msg_type {
    RAFT_MSG_PROP = 1, /* follower forwards proposals to the leader */
    RAFT_MSG_APP,      /* AppendEntries */
    RAFT_MSG_APP_RESP, /* index = last matching index or rejected index */
    RAFT_MSG_VOTE,     /* RequestVote: index/log_term = last entry */
    RAFT_MSG_VOTE_RESP,
    RAFT_MSG_PREVOTE, /* §9.6, term = the term the sender would use */
    RAFT_MSG_PREVOTE_RESP,
    RAFT_MSG_HEARTBEAT, /* commit, ctx = ReadIndex round */
    RAFT_MSG_HEARTBEAT_RESP,
    RAFT_MSG_SNAP,        /* one chunk of InstallSnapshot */
    RAFT_MSG_SNAP_RESP,   /* offset = bytes received so far */
    RAFT_MSG_TIMEOUT_NOW, /* leadership transfer: campaign now (§3.10) */
    RAFT_MSG_READ_INDEX,  /* follower asks the leader for a read index */
    RAFT_MSG_READ_INDEX_RESP,
};
#define RAFT_MSG_TYPE_MAX RAFT_MSG_READ_INDEX_RESP

#define RAFT_MSG_FLAG_TRANSFER 0x1 /* VOTE: campaign after TimeoutNow, ignores stickiness */
#define RAFT_MSG_FLAG_DONE     0x2 /* SNAP / SNAP_RESP: last chunk */

/* A peer message. Fields not used by a type are zero. */
struct raft_msg {
    uint8_t type; /* enum raft_msg_type */
    uint8_t flags;
    bool reject;
    uint64_t from;
    uint64_t to;
    uint64_t term;
    uint64_t index;    /* APP: prev index; VOTE: last index; APP_RESP; SNAP: snap index */
    uint64_t log_term; /* APP: prev term; VOTE: last term; APP_RESP reject: hint term */
    uint64_t commit;
    uint64_t hint;              /* APP_RESP reject: follower's probe hint index */
    uint64_t ctx;               /* ReadIndex context / round */
    struct raft_entry *entries; /* APP, PROP */
    size_t n_entries;
    /* SNAP and SNAP_RESP */
    struct raft_snapshot_meta snap;
    uint64_t offset;
    const uint8_t *data; /* NULL in outgoing SNAP: the application fills it */
    size_t len;
};

/* A snapshot chunk to stage (received from the leader). */
struct raft_snapshot_chunk {
    uint64_t index;
    uint64_t term;
    uint64_t offset; /* 0 = discard any staged data and start over */
    const uint8_t *data;
    size_t len;
};

/* A completed ReadIndex request: the state machine may answer the read
 * identified by ctx once it has applied up to index. */
struct raft_read_state {
    uint64_t ctx;
    uint64_t index;
};

struct raft_ready {
    struct raft_hard_state hs;
    bool hs_changed;
    bool must_sync; /* term, vote, entries or snapshot changed: fsync before step 3 */
    const struct raft_entry *entries;
    size_t n_entries;
    const struct raft_snapshot_chunk *chunk;
    const struct raft_snapshot_meta *snapshot;
    bool snapshot_keep_log;
    const struct raft_msg *msgs;
    size_t n_msgs;
    const struct raft_msg *msgs_after_persist;
    size_t n_msgs_after_persist;
    const struct raft_entry *committed;
    size_t n_committed;
    const struct raft_read_state *reads;
    size_t n_reads;
};

struct raft_config {
    uint64_t id;                  /* this node, != RAFT_NONE */
    uint64_t seed;                /* PRNG seed (election timeouts) */
    unsigned election_tick;       /* T: timeouts are drawn from [T, 2T); default 10 */
    unsigned heartbeat_tick;      /* default 1 */
    size_t max_msg_bytes;         /* entry bytes per AppendEntries (at least one entry); 1 MiB */
    unsigned max_inflight_msgs;   /* per peer in replicate state; default 64 */
    size_t max_inflight_bytes;    /* per peer; default 8 MiB */
    size_t max_uncommitted_bytes; /* leader refuses proposals beyond (-ENOBUFS); 64 MiB */
    size_t snapshot_chunk_bytes;  /* default 1 MiB */
    uint64_t snapshot_trailing;   /* entries kept behind a snapshot; default 128 */
    uint64_t catchup_max_lag;     /* learner promotable when this close; default 64 */
    bool disable_pre_vote;        /* both default on; switches exist for tests only */
    bool disable_check_quorum;
};

/* State a node restarts from, as persisted. entries are contiguous and start
 * at or before snapshot->index + 1 (or 1 without a snapshot). applied is how
 * far the state machine got (at least the snapshot index). A partially
 * staged incoming snapshot is not resumed across a restart (discard it). */
struct raft_restore_state {
    struct raft_hard_state hs;
    const struct raft_snapshot_meta *snapshot; /* NULL = none */
    const struct raft_entry *entries;
    size_t n_entries;
    uint64_t applied;
};

struct raft_peer_status {
    uint64_t id;
    const uint8_t *ctx; /* member context (points into the core, see below) */
    size_t ctx_len;
    uint8_t role;  /* enum raft_member_role */
    uint8_t state; /* enum raft_progress_state, leader only */
    uint64_t match;
    uint64_t next;
    bool recent_active;
};

enum raft_progress_state {
    RAFT_PROGRESS_PROBE = 0,
    RAFT_PROGRESS_REPLICATE,
    RAFT_PROGRESS_SNAPSHOT,
};

struct raft_status {
    uint64_t id;
    enum raft_role role;
    uint64_t term;
    uint64_t vote;
    uint64_t leader;
    uint64_t commit;
    uint64_t applied;
    uint64_t persisted; /* last index durably stored */
    uint64_t first_index;
    uint64_t last_index;
    uint64_t snapshot_index;
    uint64_t transferee;                             /* leadership transfer target, or RAFT_NONE */
    struct raft_peer_status peers[RAFT_MAX_MEMBERS]; /* leader: progress; else conf only */
    size_t n_peers;
};

struct raft;

/* Fills cfg with defaults (and id). */
void raft_config_init(struct raft_config *cfg, uint64_t id);

/* Creates a node with an empty log. Returns NULL on a bad config (id 0,
 * heartbeat_tick >= election_tick). Free with raft_free(). Then either
 * raft_bootstrap() (first start of a founding member), raft_restore()
 * (restart), or nothing (a joining node waits to be sent the log). */
struct raft *raft_new(const struct raft_config *cfg);
void raft_free(struct raft *r);

/* First start of a new cluster: every founding member calls this with the
 * same configuration; it becomes entry 1 (term 1) in the next ready.
 * -EINVAL if the node already has state or conf is invalid. */
int raft_bootstrap(struct raft *r, const struct raft_conf *conf);

/* Loads persisted state (copied) into a node fresh from raft_new().
 * -EINVAL on inconsistent input: entries not contiguous or not reaching the
 * snapshot, an entry at the snapshot index with another term, a commit or
 * applied index beyond the log (durable data was lost: fail loudly rather
 * than diverge), an undecodable snapshot configuration. */
int raft_restore(struct raft *r, const struct raft_restore_state *st);

/* Advances time by one tick: elections, heartbeats, check-quorum. */
int raft_tick(struct raft *r);

/* Feeds a peer message (not kept: the core copies what it needs). Messages
 * for another node, of unknown type, or from an unexpected sender are
 * dropped with 0; they never crash the core. */
int raft_step(struct raft *r, const struct raft_msg *m);

/* raft_step() for a message that owns its buffers the way raft_msg_decode()
 * leaves them (every entry's data from malloc()): the entry bytes the core
 * keeps in its log are taken instead of copied, their pointers in m set to
 * NULL. Free m with raft_msg_clear() as usual. */
int raft_step_take(struct raft *r, struct raft_msg *m);

/* Proposes a command (data copied). On the leader *index gets its log
 * index; on a follower the proposal is forwarded to the known leader and
 * *index is 0 (it may be lost: retry with the same client_id/seq).
 * -EAGAIN no leader known, -EBUSY leadership transfer in progress,
 * -ENOBUFS too many uncommitted bytes. index may be NULL. */
int raft_propose(struct raft *r, uint64_t client_id, uint64_t seq, const void *data, size_t len,
                 uint64_t *index);
/* raft_propose() without the copy: on success (0) data, which must come
 * from malloc(), belongs to the core; on an error it stays the caller's. */
int raft_propose_take(struct raft *r, uint64_t client_id, uint64_t seq, void *data, size_t len,
                      uint64_t *index);

enum raft_conf_change {
    RAFT_CONF_ADD_LEARNER = 1,
    RAFT_CONF_PROMOTE,
    RAFT_CONF_REMOVE,
};

/* Leader only: single-server change. ctx (copied) is the new member's
 * context for ADD_LEARNER (ignored otherwise). -EPERM not leader, -EBUSY a
 * change is still uncommitted or a transfer runs, -EAGAIN no current-term
 * entry committed yet or learner not caught up, -EEXIST / -ENOENT membership,
 * -EINVAL bad argument. The leader may remove itself: it steps down once
 * the change commits. */
int raft_change_conf(struct raft *r, enum raft_conf_change type, uint64_t id, const void *ctx,
                     size_t ctx_len);

/* Leader only: hands leadership to the voter target (TimeoutNow once it has
 * caught up). Proposals are refused meanwhile; aborted after an election
 * timeout. -EPERM, -EINVAL (not a voter / self), -EBUSY. */
int raft_transfer_leader(struct raft *r, uint64_t target);

/* Linearizable read barrier (§6.4). The result comes back in a later
 * rd.reads with the same ctx: serve the read once the state machine applied
 * up to its index. On a follower the request goes to the leader. Requests
 * are dropped, without an answer, on a leadership change or a lost message:
 * time out and retry. -EAGAIN no leader known or the leader has not
 * committed in its term yet. */
int raft_read_index(struct raft *r, uint64_t ctx);

/* The application took a snapshot of its state machine at index (<= applied)
 * of size bytes; from now on it must be able to serve its chunks. The core
 * compacts its log and fills *meta (pointers valid until the next call on r)
 * and *compact_to: log entries <= compact_to may be deleted from disk.
 * Transfers of the previous snapshot restart with this one, so take
 * snapshots less often than a transfer to the slowest peer takes.
 * -EINVAL if index is not applied or older than the current snapshot. */
int raft_snapshot_taken(struct raft *r, uint64_t index, uint64_t size,
                        struct raft_snapshot_meta *meta, uint64_t *compact_to);

/* True if there is output; fills rd and freezes the core until advance. */
bool raft_ready(struct raft *r, struct raft_ready *rd);

/* The application persisted, sent and applied everything in rd. */
void raft_advance(struct raft *r, const struct raft_ready *rd);

/* The persist of rd failed and was rolled back (nothing of it is on disk),
 * e.g. SQLITE_FULL or an I/O error. Instead of steps 3-5: nothing of
 * rd.msgs_after_persist is sent and nothing of rd.committed is applied. The
 * core unfreezes, keeps the entries, hard state, chunk and snapshot install
 * pending (the next ready presents them again: retry with a backoff), drops
 * the after-persist messages and read states, and steps down if it led. */
void raft_persist_failed(struct raft *r, const struct raft_ready *rd);

/* Introspection for `status`. Pointers inside st (member contexts) and the
 * ones returned below point into the core: valid until the next call that
 * takes a non-const struct raft. */
void raft_status(const struct raft *r, struct raft_status *st);
/* Configuration in effect (the latest appended, committed or not). */
const struct raft_conf *raft_conf(const struct raft *r);
/* Entry at index if still in the in-memory log, else NULL. */
const struct raft_entry *raft_entry_at(const struct raft *r, uint64_t index);
uint64_t raft_term(const struct raft *r);
/* The commit index (what raft_status() says, without filling a status). */
uint64_t raft_commit(const struct raft *r);
enum raft_role raft_role(const struct raft *r);
uint64_t raft_leader(const struct raft *r);
const char *raft_role_name(enum raft_role role);
const char *raft_msg_type_name(uint8_t type);

/* Configuration encoding (as carried in CONF entries and snapshot meta).
 * raft_conf_encode allocates *out (free()). raft_conf_decode validates
 * untrusted bytes: -EINVAL on anything malformed; free with
 * raft_conf_clear(). */
int raft_conf_encode(const struct raft_conf *conf, uint8_t **out, size_t *len);
int raft_conf_decode(const uint8_t *p, size_t len, struct raft_conf *conf);
void raft_conf_clear(struct raft_conf *conf);
int raft_conf_copy(struct raft_conf *dst, const struct raft_conf *src);
/* Member with id, or NULL. */
const struct raft_member *raft_conf_find(const struct raft_conf *conf, uint64_t id);

/* ---- Wire codec (codec.c): versioned, bounds-checked, for the network
 * layer and the store. Encoding appends to b. A SNAP message must carry its
 * chunk (data != NULL or len == 0). Decoding validates untrusted bytes and
 * never reads past len; on success the message owns copies of everything
 * (free with raft_msg_clear()); -EINVAL on malformed input, -EPROTO on an
 * unknown version. Limits: RAFT_CODEC_MAX_ENTRIES entries per message,
 * RAFT_CODEC_MAX_DATA bytes per entry or chunk. */
#define RAFT_CODEC_VERSION     1
#define RAFT_CODEC_MAX_ENTRIES 65536
#define RAFT_CODEC_MAX_DATA    (64u << 20)

struct buf;
int raft_msg_encode(const struct raft_msg *m, struct buf *b);
int raft_msg_decode(const uint8_t *p, size_t len, struct raft_msg *m);
void raft_msg_clear(struct raft_msg *m);
/* One entry (for the store's log rows): same rules. raft_entry_decode
 * allocates e->data (free() it). */
int raft_entry_encode(const struct raft_entry *e, struct buf *b);
int raft_entry_decode(const uint8_t *p, size_t len, struct raft_entry *e);

#endif

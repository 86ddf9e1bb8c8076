/*
 * check_sm.c: unit tests for the daemon's state machine adapter (sm.c):
 * probes are counted no-ops, fsm ops apply exactly once into state.db and
 * the tree, the applied index survives a reopen, snapshots travel through
 * statedb's stream into another node's state.db and tree, and a tree that
 * lost its marker stops applying until it is back. The chunk fetcher
 * (fetch.c): a snapshot carries no chunk bytes, the receiver fetches them
 * from peers in order, rejects bad replies, backs off when no peer has
 * them, and materializes the file once they are here.
 */
#include <config.h>

#include <check.h>
#include <errno.h>
#include <event2/event.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "daemon/fetch.h"
#include "daemon/sm.h"
#include "fsm/op.h"
#include "lib/buf.h"
#include "lib/util.h"
#include "raft/raft.h"
#include "store/statedb.h"

static char tmp[64];

static void setup(void)
{
    snprintf(tmp, sizeof(tmp), "/tmp/check_sm.XXXXXX");
    ck_assert_ptr_nonnull(mkdtemp(tmp));
}

static void teardown(void)
{
    char *cmd = pb_xasprintf("rm -rf '%s'", tmp);
    ck_assert_int_eq(system(cmd), 0);
    free(cmd);
}

static int applied_count;

static void on_applied(void *arg, const struct raft_entry *e)
{
    (void)arg;
    (void)e;
    applied_count++;
}

static struct raft_entry ent(uint64_t index, uint8_t type, uint64_t cid, uint64_t seq)
{
    struct raft_entry e = {.term = 1, .index = index, .client_id = cid, .seq = seq, .type = type};
    return e;
}

/* An encoded MKDIR of path (the caller frees b). */
static struct raft_entry ent_mkdir(uint64_t index, uint64_t cid, uint64_t seq, const char *path,
                                   struct buf *b)
{
    struct fsm_op op;
    fsm_op_init(&op);
    op.type = FSM_OP_MKDIR;
    op.origin = pb_xstrdup("n1");
    op.path = pb_xstrdup(path);
    op.u.mkdir.mode = 0755;
    op.u.mkdir.mtime_ns = 1000000000;
    ck_assert_int_eq(fsm_op_encode(&op, b), 0);
    fsm_op_free(&op);
    struct raft_entry e = ent(index, RAFT_ENTRY_NORMAL, cid, seq);
    e.data = b->data;
    e.len = b->len;
    return e;
}

static char *mkdirs(const char *name)
{
    char *d = pb_xasprintf("%s/%s", tmp, name);
    ck_assert_int_eq(mkdir(d, 0700), 0);
    return d;
}

static bool is_dir(const char *tree, const char *path)
{
    char *p = pb_xasprintf("%s/%s", tree, path);
    struct stat st;
    bool ok = lstat(p, &st) == 0 && S_ISDIR(st.st_mode);
    free(p);
    return ok;
}

/* A copy of sm's current snapshot (read back from snapshot.pbs). */
static uint8_t *snap_copy(struct sm *sm, size_t *len)
{
    *len = (size_t)sm_snapshot_size(sm);
    ck_assert_uint_gt(*len, 0);
    uint8_t *p = pb_xmalloc(*len + 1);
    size_t n = 0;
    ck_assert_int_eq(sm_snapshot_read(sm, 0, p, *len + 1, &n), 0);
    ck_assert_uint_eq(n, *len);
    /* pieces at an offset, and past the end */
    uint8_t piece[7];
    ck_assert_int_eq(sm_snapshot_read(sm, 3, piece, sizeof(piece), &n), 0);
    ck_assert_uint_eq(n, sizeof(piece));
    ck_assert_int_eq(memcmp(piece, p + 3, sizeof(piece)), 0);
    ck_assert_int_eq(sm_snapshot_read(sm, *len, piece, sizeof(piece), &n), 0);
    ck_assert_uint_eq(n, 0);
    return p;
}

START_TEST(test_sm_apply_probes_and_ops)
{
    struct pb_error err;
    char *state = mkdirs("state"), *tree = mkdirs("tree");
    struct sm *sm;
    ck_assert_int_eq(sm_open(&sm, state, tree, &err), 0);
    ck_assert_ptr_null(sm_tree_error(sm));
    ck_assert_uint_eq(sm_applied(sm), 0);
    struct buf b1 = BUF_INIT, b2 = BUF_INIT;
    static const uint8_t zeros[16];
    struct raft_entry e[] = {
            ent(1, RAFT_ENTRY_CONF, 0, 0),
            ent(2, RAFT_ENTRY_NORMAL, 7, 1), /* probe, empty */
            ent(3, RAFT_ENTRY_NORMAL, 7, 1), /* probe again: a no-op too */
            ent_mkdir(4, 9, 5, "d", &b1),
            ent_mkdir(5, 9, 5, "e", &b2), /* a retry of seq 5: skipped */
            ent(6, RAFT_ENTRY_NOOP, 0, 0),
            ent(7, RAFT_ENTRY_NORMAL, 8, 1), /* probe with zero bytes */
    };
    e[6].data = (uint8_t *)(uintptr_t)zeros;
    e[6].len = sizeof(zeros);
    applied_count = 0;
    ck_assert_int_eq(sm_apply(sm, e, 4, on_applied, NULL, &err), 0);
    ck_assert_int_eq(applied_count, 3);
    ck_assert_int_eq(sm_apply(sm, e + 4, 3, on_applied, NULL, &err), 0);
    ck_assert_int_eq(applied_count, 4); /* the duplicate is not reported */
    ck_assert_uint_eq(sm_applied(sm), 7);
    ck_assert_uint_eq(sm_session_seq(sm, 9), 5);
    ck_assert_uint_eq(sm_session_seq(sm, 7), 0); /* probes keep no session */
    ck_assert(is_dir(tree, "d"));
    ck_assert(!is_dir(tree, "e"));
    /* Already applied entries are ignored; a gap is refused. */
    ck_assert_int_eq(sm_apply(sm, e, 7, on_applied, NULL, &err), 0);
    ck_assert_int_eq(applied_count, 4);
    struct raft_entry gap = ent(9, RAFT_ENTRY_NOOP, 0, 0);
    ck_assert_int_eq(sm_apply(sm, &gap, 1, NULL, NULL, &err), -EINVAL);
    sm_close(sm);
    ck_assert_int_eq(sm_open(&sm, state, tree, &err), 0);
    ck_assert_uint_eq(sm_applied(sm), 7);
    ck_assert_uint_eq(sm_session_seq(sm, 9), 5);
    sm_close(sm);
    buf_free(&b1);
    buf_free(&b2);
    free(state);
    free(tree);
}
END_TEST

START_TEST(test_sm_snapshot)
{
    struct pb_error err;
    char *sa = mkdirs("sa"), *ta = mkdirs("ta"), *sb = mkdirs("sb"), *tb = mkdirs("tb");
    struct sm *a, *b;
    ck_assert_int_eq(sm_open(&a, sa, ta, &err), 0);
    ck_assert_int_eq(sm_open(&b, sb, tb, &err), 0);
    struct buf b1 = BUF_INIT;
    struct raft_entry e[] = {ent(1, RAFT_ENTRY_NOOP, 0, 0), ent_mkdir(2, 6, 3, "x", &b1)};
    ck_assert_int_eq(sm_apply(a, e, 2, NULL, NULL, &err), 0);
    uint64_t size = 0;
    ck_assert_int_eq(sm_snapshot_take(a, 1, &size, &err), 0);
    ck_assert_uint_eq(sm_snapshot_index(a), 2);
    size_t len;
    uint8_t *data = snap_copy(a, &len);
    ck_assert_uint_eq(len, size);

    uint8_t *bad = pb_xmalloc(len);
    memcpy(bad, data, len);
    bad[0] ^= 1;
    ck_assert_int_eq(sm_snapshot_install(b, 2, 1, bad, len, &err), -EINVAL);
    ck_assert_int_eq(sm_snapshot_install(b, 3, 1, data, len, &err), -EINVAL); /* wrong index */
    ck_assert_int_lt(sm_snapshot_install(b, 2, 1, data, len - 1, &err), 0);
    ck_assert_uint_eq(sm_applied(b), 0);
    ck_assert(!is_dir(tb, "x"));
    free(bad);

    ck_assert_int_eq(sm_snapshot_install(b, 2, 1, data, len, &err), 0);
    ck_assert_uint_eq(sm_applied(b), 2);
    ck_assert_uint_eq(sm_session_seq(b, 6), 3);
    ck_assert(is_dir(tb, "x"));
    sm_close(b);
    ck_assert_int_eq(sm_open(&b, sb, tb, &err), 0);
    ck_assert_uint_eq(sm_applied(b), 2);
    ck_assert_uint_eq(sm_snapshot_index(b), 2);
    size_t blen;
    uint8_t *bdata = snap_copy(b, &blen);
    ck_assert_uint_eq(blen, len);
    ck_assert_int_eq(memcmp(bdata, data, len), 0);
    free(bdata);
    free(data);
    /* A retried op the snapshot covers stays applied once. */
    struct buf b2 = BUF_INIT;
    struct raft_entry retry = ent_mkdir(3, 6, 3, "y", &b2);
    applied_count = 0;
    ck_assert_int_eq(sm_apply(b, &retry, 1, on_applied, NULL, &err), 0);
    ck_assert_int_eq(applied_count, 0);
    ck_assert(!is_dir(tb, "y"));
    sm_close(a);
    sm_close(b);
    buf_free(&b1);
    buf_free(&b2);
    free(sa);
    free(ta);
    free(sb);
    free(tb);
}
END_TEST

START_TEST(test_sm_tree_lost_marker)
{
    struct pb_error err;
    char *state = mkdirs("state"), *tree = mkdirs("tree");
    struct sm *sm;
    ck_assert_int_eq(sm_open(&sm, state, tree, &err), 0);
    struct buf b1 = BUF_INIT, b2 = BUF_INIT;
    struct raft_entry e1 = ent_mkdir(1, 4, 1, "a", &b1);
    ck_assert_int_eq(sm_apply(sm, &e1, 1, NULL, NULL, &err), 0);
    sm_close(sm);
    /* The tree lost its marker (unmounted, replaced): the node opens,
     * says why, and applies nothing. */
    char *cmd = pb_xasprintf("rm -rf '%s/.pickbox'", tree);
    ck_assert_int_eq(system(cmd), 0);
    free(cmd);
    ck_assert_int_eq(sm_open(&sm, state, tree, &err), 0);
    ck_assert_ptr_nonnull(sm_tree_error(sm));
    ck_assert_ptr_null(sm_tree(sm));
    struct raft_entry e2 = ent_mkdir(2, 4, 2, "b", &b2);
    ck_assert_int_eq(sm_apply(sm, &e2, 1, NULL, NULL, &err), -ENOMEDIUM);
    ck_assert_uint_eq(sm_applied(sm), 1);
    ck_assert(!is_dir(tree, "b"));
    /* The marker is back: it repairs and goes on. */
    char *marker = pb_xasprintf("%s/.pickbox", tree);
    ck_assert_int_eq(mkdir(marker, 0700), 0);
    free(marker);
    ck_assert_int_eq(sm_apply(sm, &e2, 1, NULL, NULL, &err), 0);
    ck_assert_ptr_null(sm_tree_error(sm));
    ck_assert(is_dir(tree, "a"));
    ck_assert(is_dir(tree, "b"));
    sm_close(sm);
    buf_free(&b1);
    buf_free(&b2);
    free(state);
    free(tree);
}
END_TEST

/* A snapshot.pbs of an older stream format (before an upgrade) is not kept
 * (peers would refuse it): a new one is taken at open. */
START_TEST(test_sm_snapshot_old_format)
{
    struct pb_error err;
    char *state = mkdirs("state"), *tree = mkdirs("tree");
    struct sm *sm;
    ck_assert_int_eq(sm_open(&sm, state, tree, &err), 0);
    struct buf b1 = BUF_INIT;
    struct raft_entry e[] = {ent(1, RAFT_ENTRY_NOOP, 0, 0), ent_mkdir(2, 6, 3, "x", &b1)};
    ck_assert_int_eq(sm_apply(sm, e, 2, NULL, NULL, &err), 0);
    uint64_t size;
    ck_assert_int_eq(sm_snapshot_take(sm, 1, &size, &err), 0);
    sm_close(sm);
    /* blob: "PBS2", u64 index, u64 term, then the H record's u32 len, 'H',
     * "PBSD", u32 format */
    char *path = pb_xasprintf("%s/%s", state, SM_SNAP_NAME);
    FILE *f = fopen(path, "r+b");
    ck_assert_ptr_nonnull(f);
    ck_assert_int_eq(fseek(f, 20 + 9, SEEK_SET), 0);
    static const uint8_t one[4] = {0, 0, 0, 1};
    ck_assert_uint_eq(fwrite(one, 1, 4, f), 4);
    fclose(f);
    free(path);
    ck_assert_int_eq(sm_open(&sm, state, tree, &err), 0);
    ck_assert_uint_eq(sm_snapshot_index(sm), 2);
    size_t len;
    uint8_t *p = snap_copy(sm, &len);
    ck_assert_uint_gt(len, 20 + 13);
    ck_assert_uint_eq(pb_load_u32(p + 20 + 9), STATEDB_SNAP_FORMAT);
    free(p);
    sm_close(sm);
    buf_free(&b1);
    free(state);
    free(tree);
}
END_TEST

/* ---- the chunk fetcher ---- */

/* Messages the fetchers sent, delivered by hand. */
struct msg {
    uint64_t from, to;
    bool reply;
    uint8_t *data;
    size_t len;
};
static struct msg msgs[16];
static size_t n_msgs;

struct endpoint {
    uint64_t id;
    uint64_t peers[4];
    size_t n_peers;
};

static int t_send(void *arg, uint64_t node_id, bool reply, const void *data, size_t len)
{
    struct endpoint *ep = arg;
    ck_assert_uint_lt(n_msgs, 16);
    msgs[n_msgs].from = ep->id;
    msgs[n_msgs].to = node_id;
    msgs[n_msgs].reply = reply;
    msgs[n_msgs].data = pb_xmalloc(len);
    memcpy(msgs[n_msgs].data, data, len);
    msgs[n_msgs].len = len;
    n_msgs++;
    return 0;
}

static size_t t_peers(void *arg, uint64_t *ids, size_t max)
{
    struct endpoint *ep = arg;
    size_t n = PB_MIN(max, ep->n_peers);
    memcpy(ids, ep->peers, n * sizeof(*ids));
    return n;
}

/* Takes the one queued message (the caller frees its data). */
static struct msg take_msg(uint64_t to, bool reply)
{
    ck_assert_uint_eq(n_msgs, 1);
    ck_assert_uint_eq(msgs[0].to, to);
    ck_assert(msgs[0].reply == reply);
    n_msgs = 0;
    return msgs[0];
}

static struct raft_entry ent_put(uint64_t index, const char *path, const uint8_t *c1, uint32_t l1,
                                 const uint8_t *c2, uint32_t l2, struct buf *b)
{
    struct fsm_op op;
    fsm_op_init(&op);
    op.type = FSM_OP_PUT;
    op.origin = pb_xstrdup("n1");
    op.path = pb_xstrdup(path);
    op.u.put.mode = 0644;
    op.u.put.mtime_ns = 1000000000;
    op.u.put.size = l1 + l2;
    op.u.put.n_refs = op.u.put.n_data = 2;
    op.u.put.refs = pb_xcalloc(2, sizeof(*op.u.put.refs));
    op.u.put.data = pb_xcalloc(2, sizeof(*op.u.put.data));
    const uint8_t *c[2] = {c1, c2};
    uint32_t l[2] = {l1, l2};
    for (int i = 0; i < 2; i++) {
        ck_assert_int_eq(fsm_sha256(c[i], l[i], op.u.put.refs[i].id), 0);
        op.u.put.refs[i].len = l[i];
        memcpy(op.u.put.data[i].id, op.u.put.refs[i].id, FSM_CHUNK_ID_LEN);
        op.u.put.data[i].data = pb_xmalloc(l[i]);
        memcpy(op.u.put.data[i].data, c[i], l[i]);
        op.u.put.data[i].len = l[i];
    }
    ck_assert_int_eq(fsm_op_encode(&op, b), 0);
    fsm_op_free(&op);
    struct raft_entry e = ent(index, RAFT_ENTRY_NORMAL, 5, 1);
    e.data = b->data;
    e.len = b->len;
    return e;
}

static bool file_is(const char *tree, const char *path, const uint8_t *p, size_t len)
{
    char *fp = pb_xasprintf("%s/%s", tree, path);
    FILE *f = fopen(fp, "rb");
    free(fp);
    if (f == NULL)
        return false;
    uint8_t *got = pb_xmalloc(len + 1);
    size_t n = fread(got, 1, len + 1, f);
    fclose(f);
    bool same = n == len && memcmp(got, p, len) == 0;
    free(got);
    return same;
}

static uint64_t missing(struct sm *sm)
{
    struct statedb_status st;
    ck_assert_int_eq(statedb_status_get(sm_statedb(sm), 1, 2, &st), 0);
    return st.missing;
}

START_TEST(test_sm_fetch)
{
    struct pb_error err;
    char *sa = mkdirs("sa"), *ta = mkdirs("ta"), *sb = mkdirs("sb"), *tb = mkdirs("tb");
    char *sc = mkdirs("sc"), *tc = mkdirs("tc");
    struct sm *a, *b, *c; /* A has the file, B installs A's snapshot, C is empty */
    ck_assert_int_eq(sm_open(&a, sa, ta, &err), 0);
    ck_assert_int_eq(sm_open(&b, sb, tb, &err), 0);
    ck_assert_int_eq(sm_open(&c, sc, tc, &err), 0);
    uint8_t content[3000];
    for (size_t i = 0; i < sizeof(content); i++)
        content[i] = (uint8_t)(i * 13 + 1);
    struct buf b1 = BUF_INIT;
    struct raft_entry e[] = {ent(1, RAFT_ENTRY_NOOP, 0, 0),
                             ent_put(2, "f", content, 1000, content + 1000, 2000, &b1)};
    ck_assert_int_eq(sm_apply(a, e, 2, NULL, NULL, &err), 0);
    ck_assert(file_is(ta, "f", content, sizeof(content)));
    uint64_t size;
    ck_assert_int_eq(sm_snapshot_take(a, 1, &size, &err), 0);
    ck_assert_uint_lt(size, 1000); /* metadata: smaller than the file */
    size_t len;
    uint8_t *snap = snap_copy(a, &len);
    ck_assert_int_eq(sm_snapshot_install(b, 2, 1, snap, len, &err), 0);
    free(snap);
    ck_assert(!file_is(tb, "f", content, sizeof(content))); /* waits for the bytes */
    ck_assert_uint_eq(missing(b), 2);

    struct endpoint ea = {.id = 1}, eb = {.id = 2, .peers = {3, 1}, .n_peers = 2}, ec = {.id = 3};
    struct fetch_ops oa = {&ea, t_send, t_peers}, ob = {&eb, t_send, t_peers},
                     oc = {&ec, t_send, t_peers};
    struct fetch *fa = fetch_new(&oa), *fb = fetch_new(&ob), *fc = fetch_new(&oc);
    ck_assert(sm_chunks_wanted(a)); /* after open: once */
    ck_assert(!sm_chunks_wanted(a));
    n_msgs = 0;

    /* a malformed request gets no answer */
    static const uint8_t junk[5] = {1, 2, 3, 4, 5};
    fetch_on_request(fa, a, 2, junk, sizeof(junk));
    ck_assert_uint_eq(n_msgs, 0);

    /* pass 1: C (first) has nothing; A's reply has one chunk's bytes
     * altered: it is rejected, the other one stored */
    fetch_tick(fb, b, 1000);
    struct msg m = take_msg(3, false);
    fetch_on_request(fc, c, 2, m.data, m.len);
    free(m.data);
    m = take_msg(2, true);
    fetch_on_reply(fb, b, 3, m.data, m.len, 1001);
    free(m.data);
    m = take_msg(1, false);
    fetch_on_request(fa, a, 2, m.data, m.len);
    free(m.data);
    m = take_msg(2, true);
    /* reply: u8 version, u64 req, u16 n, then 32 id, u8 status, u32 len, data */
    ck_assert_uint_gt(m.len, 11 + 37 + 1000);
    m.data[11 + 37 + 10] ^= 0x80; /* the first item's bytes (whichever chunk) */
    fetch_on_reply(fb, b, 1, m.data, m.len, 1002);
    free(m.data);
    struct fetch_stats fs;
    fetch_get_stats(fb, &fs);
    ck_assert_uint_eq(fs.rejected, 1);
    ck_assert(!fs.active);
    ck_assert_uint_eq(fs.requests, 2);
    ck_assert_uint_eq(fs.unavailable, 1);
    ck_assert_uint_eq(missing(b), 1);
    ck_assert_uint_eq(n_msgs, 0);
    fetch_tick(fb, b, 1500); /* backing off */
    ck_assert_uint_eq(n_msgs, 0);

    /* pass 2: A's reply claims a huge chunk: dropped, nothing stored */
    fetch_tick(fb, b, 2100);
    m = take_msg(3, false);
    fetch_on_request(fc, c, 2, m.data, m.len);
    free(m.data);
    m = take_msg(2, true);
    fetch_on_reply(fb, b, 3, m.data, m.len, 2101);
    free(m.data);
    m = take_msg(1, false);
    uint64_t req = pb_load_u64(m.data + 1);
    struct buf r = BUF_INIT;
    buf_put_u8(&r, FETCH_VERSION);
    buf_put_u64(&r, req);
    buf_put_u16(&r, 1);
    buf_put(&r, m.data + 11, 32);
    buf_put_u8(&r, FETCH_HERE);
    buf_put_u32(&r, 0xfffffff0u);
    free(m.data);
    fetch_on_reply(fb, b, 1, r.data, r.len, 2102);
    buf_free(&r);
    fetch_get_stats(fb, &fs);
    ck_assert_uint_eq(fs.rejected, 2);
    ck_assert_uint_eq(missing(b), 1);
    ck_assert(!file_is(tb, "f", content, sizeof(content)));

    /* pass 3 (backing off longer, but a peer's link comes up): A answers
     * properly; the file appears */
    fetch_tick(fb, b, 3000);
    ck_assert_uint_eq(n_msgs, 0);
    fetch_peer_up(fb); /* a link came up: retry now */
    fetch_tick(fb, b, 3001);
    m = take_msg(3, false);
    fetch_on_request(fc, c, 2, m.data, m.len);
    free(m.data);
    m = take_msg(2, true);
    fetch_on_reply(fb, b, 3, m.data, m.len, 4201);
    free(m.data);
    m = take_msg(1, false);
    fetch_on_request(fa, a, 2, m.data, m.len);
    free(m.data);
    m = take_msg(2, true);
    /* the same reply from a peer that was not asked is ignored */
    fetch_on_reply(fb, b, 3, m.data, m.len, 4202);
    ck_assert_uint_eq(missing(b), 1);
    /* A's reply gains an item nobody asked for: rejected, the rest stored */
    struct buf r2 = BUF_INIT;
    buf_put(&r2, m.data, m.len);
    ck_assert_int_eq(r2.data[10], 1); /* u16 n at offset 9: one chunk asked for */
    r2.data[10] = 2;
    uint8_t stray[32];
    memset(stray, 0xee, sizeof(stray));
    buf_put(&r2, stray, sizeof(stray));
    buf_put_u8(&r2, FETCH_HERE);
    buf_put_bytes(&r2, "abcd", 4);
    free(m.data);
    fetch_on_reply(fb, b, 1, r2.data, r2.len, 4202);
    buf_free(&r2);
    fetch_get_stats(fb, &fs);
    ck_assert_uint_eq(fs.rejected, 3);
    ck_assert_int_eq(statedb_chunk_data_has(sm_statedb(b), stray), 0);
    ck_assert_uint_eq(missing(b), 0);
    ck_assert(file_is(tb, "f", content, sizeof(content)));
    uint64_t chunks, bytes;
    sm_fetch_counters(b, &chunks, &bytes);
    ck_assert_uint_eq(chunks, 2);
    ck_assert_uint_eq(bytes, sizeof(content));
    fetch_get_stats(fa, &fs);
    ck_assert_uint_eq(fs.served_chunks, 3); /* 2 in pass 1, 1 in pass 3 */
    fetch_get_stats(fb, &fs);
    ck_assert(!fs.active);
    ck_assert_uint_eq(fs.missing, 0);
    fetch_tick(fb, b, 100000); /* nothing left: idle */
    ck_assert_uint_eq(n_msgs, 0);

    fetch_free(fa);
    fetch_free(fb);
    fetch_free(fc);
    sm_close(a);
    sm_close(b);
    sm_close(c);
    buf_free(&b1);
    free(sa);
    free(ta);
    free(sb);
    free(tb);
    free(sc);
    free(tc);
}
END_TEST

/* An encoded PUT of len bytes of pattern c at path, carrying its chunks
 * (50,000 bytes each). */
static struct raft_entry ent_put_big(uint64_t index, const char *path, uint8_t c, size_t len,
                                     struct buf *b)
{
    enum { CH = 50000 };
    struct fsm_op op;
    fsm_op_init(&op);
    op.type = FSM_OP_PUT;
    op.origin = pb_xstrdup("n1");
    op.path = pb_xstrdup(path);
    op.base = index > 1 ? index - 1 : 0;
    op.u.put.mode = 0644;
    op.u.put.mtime_ns = 1000000000;
    op.u.put.size = len;
    uint32_t n = (uint32_t)((len + CH - 1) / CH);
    op.u.put.n_refs = op.u.put.n_data = n;
    op.u.put.refs = pb_xcalloc(n, sizeof(struct fsm_chunk_ref));
    op.u.put.data = pb_xcalloc(n, sizeof(struct fsm_chunk_data));
    for (uint32_t i = 0; i < n; i++) {
        size_t l = PB_MIN((size_t)CH, len - (size_t)i * CH);
        uint8_t *d = pb_xmalloc(l);
        memset(d, c, l);
        d[0] = (uint8_t)i; /* distinct chunks */
        op.u.put.refs[i].len = op.u.put.data[i].len = (uint32_t)l;
        ck_assert_int_eq(fsm_sha256(d, l, op.u.put.refs[i].id), 0);
        memcpy(op.u.put.data[i].id, op.u.put.refs[i].id, FSM_CHUNK_ID_LEN);
        op.u.put.data[i].data = d;
    }
    ck_assert_int_eq(fsm_op_encode(&op, b), 0);
    fsm_op_free(&op);
    struct raft_entry e = ent(index, RAFT_ENTRY_NORMAL, 0, 0);
    e.data = b->data;
    e.len = b->len;
    return e;
}

/* The size of tree/path, or -1 when absent; *c gets its last byte. */
static long file_size(const char *tree, const char *path, uint8_t *c)
{
    char *p = pb_xasprintf("%s/%s", tree, path);
    int fd = open(p, O_RDONLY | O_CLOEXEC);
    free(p);
    if (fd < 0)
        return -1;
    struct stat st;
    ck_assert_int_eq(fstat(fd, &st), 0);
    if (st.st_size > 0)
        ck_assert_int_eq(pread(fd, c, 1, st.st_size - 1), 1);
    close(fd);
    return (long)st.st_size;
}

/* With a loop (sm_set_loop()), a big PUT is applied (the index moves) but
 * its file is written by the background writer and completed on the
 * loop: until then sm_writing() counts it and sm_materialized() stays
 * below it (what sync waits for). A stop before completion leaves the old
 * file; the repair at the next open writes the new one. */
START_TEST(test_sm_bigwrite_on_loop)
{
    struct pb_error err;
    char *state = mkdirs("state"), *tree = mkdirs("tree");
    setenv("PICKBOX_TEST_BIGWRITE_BYTES", "100000", 1);
    struct sm *sm;
    ck_assert_int_eq(sm_open(&sm, state, tree, &err), 0);
    unsetenv("PICKBOX_TEST_BIGWRITE_BYTES");
    struct event_base *base = event_base_new();
    ck_assert_ptr_nonnull(base);
    sm_set_loop(sm, base);
    struct buf b1 = BUF_INIT, b2 = BUF_INIT, b3 = BUF_INIT;
    struct raft_entry e[] = {ent_put_big(1, "big", 'a', 300000, &b1),
                             ent_put_big(2, "small", 's', 5000, &b2),
                             ent_put_big(3, "big", 'b', 250000, &b3)};
    uint8_t c = 0;
    ck_assert_int_eq(sm_apply(sm, e, 2, NULL, NULL, &err), 0);
    ck_assert_uint_eq(sm_applied(sm), 2);
    ck_assert_uint_eq(sm_writing(sm), 1);
    ck_assert_uint_eq(sm_materialized(sm), 0);
    ck_assert_int_eq(file_size(tree, "small", &c), 5000); /* small files as before */
    ck_assert_int_eq(file_size(tree, "big", &c), -1);
    uint64_t deadline = pb_now_ms() + 20000;
    while (sm_writing(sm) > 0 && pb_now_ms() < deadline) {
        struct timeval tv = {1, 0};
        event_base_loopexit(base, &tv);
        event_base_loop(base, EVLOOP_ONCE);
    }
    ck_assert_uint_eq(sm_writing(sm), 0);
    ck_assert_uint_eq(sm_materialized(sm), 2);
    ck_assert_int_eq(file_size(tree, "big", &c), 300000);
    ck_assert_int_eq(c, 'a');
    /* the next version, and a stop before it is completed */
    ck_assert_int_eq(sm_apply(sm, e + 2, 1, NULL, NULL, &err), 0);
    ck_assert_uint_eq(sm_materialized(sm), 2);
    sm_close(sm);
    ck_assert_int_eq(file_size(tree, "big", &c), 300000);
    ck_assert_int_eq(sm_open(&sm, state, tree, &err), 0); /* the repair writes it */
    ck_assert_uint_eq(sm_materialized(sm), 3);
    ck_assert_int_eq(file_size(tree, "big", &c), 250000);
    ck_assert_int_eq(c, 'b');
    sm_close(sm);
    event_base_free(base);
    buf_free(&b1);
    buf_free(&b2);
    buf_free(&b3);
    free(state);
    free(tree);
}
END_TEST

static Suite *sm_suite(void)
{
    Suite *s = suite_create("sm");
    TCase *tc = tcase_create("sm");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 30);
    tcase_add_test(tc, test_sm_apply_probes_and_ops);
    tcase_add_test(tc, test_sm_snapshot);
    tcase_add_test(tc, test_sm_tree_lost_marker);
    tcase_add_test(tc, test_sm_fetch);
    tcase_add_test(tc, test_sm_snapshot_old_format);
    tcase_add_test(tc, test_sm_bigwrite_on_loop);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(sm_suite());
    srunner_run_all(sr, CK_ENV);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}

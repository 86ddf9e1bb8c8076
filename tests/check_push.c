/*
 * check_push.c: unit tests for the chunk pusher (src/daemon/push.c, D13).
 * The receiver verifies every chunk of a PUSH before storing anything (a
 * corrupt, truncated or oversized frame is rejected, counted and answered
 * REJECTED, nothing stored) and acknowledges a good one STORED once its
 * bytes are in state.db without a row; the sender keeps a window of
 * unacknowledged bytes per peer, counts a peer complete once it acknowledged
 * every batch, and drops a peer that rejects, goes down or stays silent.
 * Pushed bytes that no row names are collected after their grace period.
 */
#include <config.h>

#include <check.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "daemon/push.h"
#include "fsm/op.h"
#include "lib/buf.h"
#include "lib/util.h"
#include "store/statedb.h"

static char tmp[64];

static void setup(void)
{
    snprintf(tmp, sizeof(tmp), "/tmp/check_push.XXXXXX");
    ck_assert_ptr_nonnull(mkdtemp(tmp));
}

static void teardown(void)
{
    char *cmd = pb_xasprintf("rm -rf '%s'", tmp);
    ck_assert_int_eq(system(cmd), 0);
    free(cmd);
}

/* What the pusher sent: the last message per kind, and counts. */
struct sent {
    uint64_t to[64];
    bool ack[64];
    struct buf msg[64];
    size_t n;
    int fail_to; /* node id whose sends fail (-ENOBUFS), 0: none */
};

static int cap_send(void *arg, uint64_t node_id, bool ack, const void *data, size_t len)
{
    struct sent *s = arg;
    if (s->fail_to != 0 && node_id == (uint64_t)s->fail_to)
        return -ENOBUFS;
    ck_assert_uint_lt(s->n, 64);
    s->to[s->n] = node_id;
    s->ack[s->n] = ack;
    buf_init(&s->msg[s->n]);
    buf_put(&s->msg[s->n], data, len);
    s->n++;
    return 0;
}

static void sent_free(struct sent *s)
{
    for (size_t i = 0; i < s->n; i++)
        buf_free(&s->msg[i]);
    s->n = 0;
}

struct chunk {
    uint8_t id[32];
    uint8_t data[3000];
    uint32_t len;
};

static void chunk_make(struct chunk *c, uint8_t seed, uint32_t len)
{
    for (uint32_t i = 0; i < len; i++)
        c->data[i] = (uint8_t)(seed * 31 + i * 7);
    c->len = len;
    ck_assert_int_eq(fsm_sha256(c->data, len, c->id), 0);
}

static struct statedb *db_open(void)
{
    struct statedb *db;
    struct pb_error err;
    char *path = pb_xasprintf("%s/%s", tmp, STATEDB_NAME);
    ck_assert_int_eq(statedb_open(path, &db, &err), 0);
    free(path);
    return db;
}

/* A PUSH frame of n chunks as a sender builds it (through push_send). */
static void frame_of(const struct chunk *c, size_t n, struct buf *out)
{
    struct sent s = {.n = 0};
    struct push_ops ops = {.arg = &s, .send = cap_send};
    struct push *p = push_new(&ops);
    struct push_peer peer = {.id = 9, .voter = true};
    ck_assert_int_eq(push_start(p, &peer, 1, 1000), 0);
    struct statedb_chunk_in in[8];
    for (size_t i = 0; i < n; i++) {
        in[i].id = c[i].id;
        in[i].data = c[i].data;
        in[i].len = c[i].len;
    }
    ck_assert_int_eq(push_send(p, in, n, 1000), 0);
    ck_assert_uint_eq(s.n, 1);
    ck_assert(!s.ack[0]);
    buf_init(out);
    buf_put(out, s.msg[0].data, s.msg[0].len);
    sent_free(&s);
    push_free(p);
}

static uint8_t ack_status(const struct buf *b)
{
    ck_assert_uint_eq(b->len, 14);
    ck_assert_uint_eq(b->data[0], PUSH_VERSION);
    return b->data[13];
}

START_TEST(test_receive_good_and_corrupt)
{
    struct statedb *db = db_open();
    struct chunk c[3];
    chunk_make(&c[0], 1, 3000);
    chunk_make(&c[1], 2, 1000);
    chunk_make(&c[2], 3, 17);
    struct buf f;
    frame_of(c, 3, &f);

    struct sent s = {.n = 0};
    struct push_ops ops = {.arg = &s, .send = cap_send};
    struct push *rx = push_new(&ops);

    /* one flipped byte in the second chunk's bytes: rejected, nothing stored */
    struct buf bad = BUF_INIT;
    buf_put(&bad, f.data, f.len);
    bad.data[bad.len - 17 - 36 - 10] ^= 0x40;
    push_on_push(rx, db, 7, bad.data, bad.len);
    ck_assert_uint_eq(s.n, 1);
    ck_assert(s.ack[0]);
    ck_assert_uint_eq(s.to[0], 7);
    ck_assert_uint_eq(ack_status(&s.msg[0]), PUSH_REJECTED);
    for (int i = 0; i < 3; i++)
        ck_assert_int_eq(statedb_chunk_data_has(db, c[i].id), 0);
    struct pb_error err;
    uint64_t id;
    uint32_t batch;
    struct statedb_chunk_in in[8];
    size_t n;
    ck_assert_int_eq(push_decode(bad.data, bad.len, &id, &batch, in, 8, &n, &err), -EBADMSG);
    ck_assert_ptr_nonnull(strstr(err.msg, "chunk 1"));

    /* truncated, trailing bytes, a length over the maximum, a wrong version */
    ck_assert_int_eq(push_decode(f.data, f.len - 1, &id, &batch, in, 8, &n, &err), -EPROTO);
    buf_reset(&bad);
    buf_put(&bad, f.data, f.len);
    buf_put_u8(&bad, 0);
    ck_assert_int_eq(push_decode(bad.data, bad.len, &id, &batch, in, 8, &n, &err), -EPROTO);
    buf_reset(&bad);
    buf_put(&bad, f.data, f.len);
    pb_store_u32(bad.data + 15 + 32, PUSH_CHUNK_MAX + 1);
    ck_assert_int_eq(push_decode(bad.data, bad.len, &id, &batch, in, 8, &n, &err), -EPROTO);
    buf_reset(&bad);
    buf_put(&bad, f.data, f.len);
    bad.data[0] = 9;
    ck_assert_int_eq(push_decode(bad.data, bad.len, &id, &batch, in, 8, &n, &err), -EPROTO);
    push_on_push(rx, db, 7, bad.data, bad.len);
    push_on_push(rx, db, 7, bad.data, 3); /* no header: not even answered */
    ck_assert_uint_eq(s.n, 2);
    ck_assert_uint_eq(ack_status(&s.msg[1]), PUSH_REJECTED);
    struct push_stats st;
    push_get_stats(rx, &st);
    ck_assert_uint_eq(st.rejected_frames, 3);
    ck_assert_uint_eq(st.received_frames, 0);

    /* the good frame: stored without a row, acknowledged STORED; no file
     * references them yet (nothing to repair) */
    ck_assert_uint_eq(push_on_push(rx, db, 7, f.data, f.len), 0);
    ck_assert_uint_eq(s.n, 3);
    ck_assert_uint_eq(ack_status(&s.msg[2]), PUSH_STORED);
    for (int i = 0; i < 3; i++) {
        ck_assert_int_eq(statedb_chunk_data_has(db, c[i].id), 1);
        ck_assert_int_eq(statedb_chunk_has(db, c[i].id), 0);
    }
    push_get_stats(rx, &st);
    ck_assert_uint_eq(st.received_frames, 1);
    ck_assert_uint_eq(st.received_bytes, 4017);
    /* without a state machine: FAILED, nothing stored */
    push_on_push(rx, NULL, 7, f.data, f.len);
    ck_assert_uint_eq(ack_status(&s.msg[3]), PUSH_FAILED);

    /* a row named one of them (REFS): it stays; the others are collected
     * once older than the grace period (the first look starts their age) */
    ck_assert_int_eq(statedb_chunk_row_put(db, c[0].id, c[0].len, 100), 0);
    ck_assert_int_eq(statedb_chunk_row_put(db, c[0].id, c[0].len + 1, 100), -EINVAL);
    uint64_t gone = 99;
    ck_assert_int_eq(statedb_chunk_data_collect_unrowed(db, 1000, 5000, &gone), 0);
    ck_assert_uint_eq(gone, 0);
    ck_assert_int_eq(statedb_chunk_data_collect_unrowed(db, 7000, 5000, &gone), 0);
    ck_assert_uint_eq(gone, 2);
    ck_assert_int_eq(statedb_chunk_data_has(db, c[0].id), 1);
    ck_assert_int_eq(statedb_chunk_data_has(db, c[1].id), 0);
    ck_assert_int_eq(statedb_chunk_data_has(db, c[2].id), 0);

    buf_free(&bad);
    buf_free(&f);
    sent_free(&s);
    push_free(rx);
    statedb_close(db);
}
END_TEST

static void ack(struct push *p, uint64_t from, const struct buf *frame, uint8_t status)
{
    uint8_t a[14];
    a[0] = PUSH_VERSION;
    memcpy(a + 1, frame->data + 1, 8 + 4); /* push id, batch */
    a[13] = status;
    push_on_ack(p, from, a, sizeof(a), 2000);
}

START_TEST(test_sender_window_and_majority)
{
    struct sent s = {.n = 0};
    struct push_ops ops = {.arg = &s, .send = cap_send};
    struct push *p = push_new(&ops);
    struct push_peer peers[3] = {{2, true}, {3, true}, {4, false}};
    ck_assert(!push_room(p, 1)); /* idle */
    ck_assert_int_eq(push_start(p, peers, 3, 1000), 0);
    ck_assert(push_room(p, PUSH_WINDOW_BYTES + 1)); /* nothing in flight */
    struct chunk c;
    chunk_make(&c, 5, 3000);
    struct statedb_chunk_in in = {c.id, c.data, c.len};
    ck_assert_int_eq(push_send(p, &in, 1, 1000), 0);
    ck_assert_uint_eq(s.n, 3);
    ck_assert(push_room(p, PUSH_WINDOW_BYTES - 3000));
    ck_assert(!push_room(p, PUSH_WINDOW_BYTES - 2999));
    struct push_progress pg;
    push_progress_get(p, &pg);
    ck_assert_uint_eq(pg.complete, 0);
    ck_assert_uint_eq(pg.voters_in, 2);

    ack(p, 2, &s.msg[0], PUSH_STORED);
    ack(p, 2, &s.msg[0], PUSH_STORED); /* twice: out of order, it leaves */
    push_progress_get(p, &pg);
    ck_assert_uint_eq(pg.left, 1);
    ack(p, 3, &s.msg[1], PUSH_STORED);
    ack(p, 99, &s.msg[1], PUSH_STORED); /* not in the push: ignored */
    push_progress_get(p, &pg);
    ck_assert_uint_eq(pg.complete, 1);
    ck_assert_uint_eq(pg.voters_complete, 1);
    /* the learner rejects: it leaves */
    ack(p, 4, &s.msg[2], PUSH_REJECTED);
    push_progress_get(p, &pg);
    ck_assert_uint_eq(pg.left, 2);
    ck_assert_uint_eq(pg.voters_in, 1);

    /* a second batch: only node 3 gets it; a silent peer times out */
    sent_free(&s);
    ck_assert_int_eq(push_send(p, &in, 1, 3000), 0);
    ck_assert_uint_eq(s.n, 1);
    ck_assert_uint_eq(s.to[0], 3);
    push_progress_get(p, &pg);
    ck_assert_uint_eq(pg.complete, 0);
    push_tick(p, NULL, 3000 + PUSH_ACK_TIMEOUT_MS - 1);
    push_progress_get(p, &pg);
    ck_assert_uint_eq(pg.left, 2);
    push_tick(p, NULL, 3000 + PUSH_ACK_TIMEOUT_MS);
    push_progress_get(p, &pg);
    ck_assert_uint_eq(pg.left, 3);

    /* a new push: acks of the old one are ignored; a failed send leaves */
    struct buf old = BUF_INIT;
    buf_put(&old, s.msg[0].data, s.msg[0].len);
    sent_free(&s);
    ck_assert_int_eq(push_start(p, peers, 2, 5000), 0);
    s.fail_to = 3;
    ck_assert_int_eq(push_send(p, &in, 1, 5000), 0);
    ack(p, 2, &old, PUSH_STORED);
    push_progress_get(p, &pg);
    ck_assert_uint_eq(pg.complete, 0);
    ck_assert_uint_eq(pg.left, 1);
    push_peer_down(p, 2);
    push_progress_get(p, &pg);
    ck_assert_uint_eq(pg.left, 2);
    struct push_stats st;
    push_get_stats(p, &st);
    ck_assert_uint_eq(st.acked_frames, 2);
    ck_assert_uint_eq(st.acked_bytes, 6000);
    ck_assert_uint_eq(st.peers_left, 5);
    push_stop(p);
    push_progress_get(p, &pg);
    ck_assert(!pg.active);
    buf_free(&old);
    sent_free(&s);
    push_free(p);
}
END_TEST

/* Many chunks go out in frames of at most PUSH_FRAME_BYTES. */
START_TEST(test_sender_splits_frames)
{
    struct sent s = {.n = 0};
    struct push_ops ops = {.arg = &s, .send = cap_send};
    struct push *p = push_new(&ops);
    struct push_peer peer = {2, true};
    ck_assert_int_eq(push_start(p, &peer, 1, 0), 0);
    size_t n = 40;
    uint8_t *big = pb_xcalloc(PUSH_CHUNK_MAX, 1);
    struct statedb_chunk_in *in = pb_xcalloc(n, sizeof(*in));
    uint8_t id[32] = {0};
    for (size_t i = 0; i < n; i++) {
        in[i].id = id;
        in[i].data = big;
        in[i].len = PUSH_CHUNK_MAX;
    }
    ck_assert_int_eq(push_send(p, in, n, 0), 0);
    /* 16 chunks of 256 KiB fill a frame: 16 + 16 + 8 */
    ck_assert_uint_eq(s.n, 3);
    ck_assert_uint_eq(pb_load_u32(s.msg[2].data + 9), 2); /* batch numbers */
    in[0].len = 0;
    ck_assert_int_eq(push_send(p, in, 1, 0), -EINVAL);
    free(in);
    free(big);
    sent_free(&s);
    push_free(p);
}
END_TEST

/* The majority is counted among the voters of the configuration now: a peer
 * removed or demoted since the push started stops counting, one promoted
 * starts; a peer listed twice is one peer. */
START_TEST(test_sender_counts_current_voters)
{
    struct sent s = {.n = 0};
    struct push_ops ops = {.arg = &s, .send = cap_send};
    struct push *p = push_new(&ops);
    struct push_peer peers[4] = {{2, true}, {3, true}, {4, false}, {3, true}};
    ck_assert_int_eq(push_start(p, peers, 4, 1000), 0);
    struct chunk c;
    chunk_make(&c, 6, 2000);
    struct statedb_chunk_in in = {c.id, c.data, c.len};
    ck_assert_int_eq(push_send(p, &in, 1, 1000), 0);
    ck_assert_uint_eq(s.n, 3); /* node 3 once */
    for (size_t i = 0; i < s.n; i++)
        ack(p, s.to[i], &s.msg[i], PUSH_STORED);
    struct push_progress pg;
    push_progress_get(p, &pg);
    ck_assert_uint_eq(pg.peers, 3);
    ck_assert_uint_eq(pg.complete, 3);
    ck_assert_uint_eq(pg.voters_complete, 2);
    ck_assert_uint_eq(pg.voters_in, 2);

    /* node 3 removed, node 4 still a learner */
    struct push_peer now1[2] = {{2, true}, {4, false}};
    push_set_voters(p, now1, 2);
    push_progress_get(p, &pg);
    ck_assert_uint_eq(pg.voters_complete, 1);
    ck_assert_uint_eq(pg.voters_in, 1);
    /* node 2 demoted, node 4 promoted, node 3 back as a voter */
    struct push_peer now2[3] = {{2, false}, {4, true}, {3, true}};
    push_set_voters(p, now2, 3);
    push_progress_get(p, &pg);
    ck_assert_uint_eq(pg.voters_complete, 2);
    /* nobody left in the configuration */
    push_set_voters(p, NULL, 0);
    push_progress_get(p, &pg);
    ck_assert_uint_eq(pg.voters_complete, 0);
    ck_assert_uint_eq(pg.voters_in, 0);
    ck_assert_uint_eq(pg.complete, 3);
    sent_free(&s);
    push_free(p);
}
END_TEST

/* The writer's own pushed copy is not collected while its REFS entries
 * wait to commit (held), however long; once released it is. */
START_TEST(test_collect_held)
{
    struct statedb *db = db_open();
    struct chunk c[1];
    chunk_make(&c[0], 7, 1500);
    struct buf f;
    frame_of(c, 1, &f);
    struct sent s = {.n = 0};
    struct push_ops ops = {.arg = &s, .send = cap_send};
    struct push *p = push_new(&ops);
    push_on_push(p, db, 7, f.data, f.len);
    ck_assert_int_eq(statedb_chunk_data_has(db, c[0].id), 1);
    uint64_t t = 1000;
    push_tick(p, db, t); /* the first collection is PUSH_COLLECT_EVERY_MS away */
    t += PUSH_COLLECT_EVERY_MS;
    push_tick(p, db, t); /* starts the bytes' age */
    ck_assert_int_eq(statedb_chunk_data_has(db, c[0].id), 1);
    push_hold_collect(p, true);
    for (int i = 0; i < 20; i++) {
        t += PUSH_COLLECT_EVERY_MS;
        push_tick(p, db, t);
    }
    ck_assert_int_eq(statedb_chunk_data_has(db, c[0].id), 1);
    struct push_stats st;
    push_get_stats(p, &st);
    ck_assert_uint_eq(st.unrowed_collected, 0);
    push_hold_collect(p, false);
    push_tick(p, db, t);
    ck_assert_int_eq(statedb_chunk_data_has(db, c[0].id), 0);
    push_get_stats(p, &st);
    ck_assert_uint_eq(st.unrowed_collected, 1);
    buf_free(&f);
    sent_free(&s);
    push_free(p);
    statedb_close(db);
}
END_TEST

/* Hostile or buggy frames from an authenticated peer: a PUSH of 0 chunks or
 * of more than PUSH_BATCH_MAX is rejected (answered, nothing stored); an
 * ack of an unknown push, a short ack, an ack of a batch never sent change
 * nothing but the last makes the peer leave. */
START_TEST(test_hostile_frames)
{
    struct statedb *db = db_open();
    struct sent s = {.n = 0};
    struct push_ops ops = {.arg = &s, .send = cap_send};
    struct push *p = push_new(&ops);
    struct buf b = BUF_INIT;
    buf_put_u8(&b, PUSH_VERSION);
    buf_put_u64(&b, 42);
    buf_put_u32(&b, 0);
    buf_put_u16(&b, 0);
    ck_assert_uint_eq(push_on_push(p, db, 5, b.data, b.len), 0);
    ck_assert_uint_eq(s.n, 1);
    ck_assert_uint_eq(ack_status(&s.msg[0]), PUSH_REJECTED);
    ck_assert_uint_eq(pb_load_u64(s.msg[0].data + 1), 42);
    b.data[13] = (uint8_t)((PUSH_BATCH_MAX + 1) >> 8);
    b.data[14] = (uint8_t)((PUSH_BATCH_MAX + 1) & 0xff);
    push_on_push(p, db, 5, b.data, b.len);
    ck_assert_uint_eq(s.n, 2);
    ck_assert_uint_eq(ack_status(&s.msg[1]), PUSH_REJECTED);
    struct push_stats st;
    push_get_stats(p, &st);
    ck_assert_uint_eq(st.rejected_frames, 2);
    ck_assert_uint_eq(st.received_frames, 0);
    sent_free(&s);

    struct push_peer peer = {5, true};
    ck_assert_int_eq(push_start(p, &peer, 1, 0), 0);
    struct chunk c;
    chunk_make(&c, 8, 100);
    struct statedb_chunk_in in = {c.id, c.data, c.len};
    ck_assert_int_eq(push_send(p, &in, 1, 0), 0);
    uint8_t a[14];
    memcpy(a, s.msg[0].data, 13);
    a[13] = PUSH_STORED;
    a[1] ^= 1; /* another push id */
    push_on_ack(p, 5, a, sizeof(a), 1);
    push_on_ack(p, 5, s.msg[0].data, 13, 1); /* short */
    struct push_progress pg;
    push_progress_get(p, &pg);
    ck_assert_uint_eq(pg.left, 0);
    ck_assert_uint_eq(pg.complete, 0);
    a[1] ^= 1;
    pb_store_u32(a + 9, 1); /* a batch never sent */
    push_on_ack(p, 5, a, sizeof(a), 1);
    push_progress_get(p, &pg);
    ck_assert_uint_eq(pg.left, 1);
    ck_assert_uint_eq(pg.voters_complete, 0);
    buf_free(&b);
    sent_free(&s);
    push_free(p);
    statedb_close(db);
}
END_TEST

static Suite *push_suite(void)
{
    Suite *s = suite_create("push");
    TCase *tc = tcase_create("push");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, test_receive_good_and_corrupt);
    tcase_add_test(tc, test_sender_window_and_majority);
    tcase_add_test(tc, test_sender_splits_frames);
    tcase_add_test(tc, test_sender_counts_current_voters);
    tcase_add_test(tc, test_collect_held);
    tcase_add_test(tc, test_hostile_frames);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(push_suite());
    srunner_run_all(sr, CK_ENV);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}

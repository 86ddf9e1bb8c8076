/*
 * check_store.c: unit tests for src/store (raft.db).
 *
 * Every test runs in a private temp dir with its own event_base; completions
 * are collected by driving the loop with a deadline. The crash test forks a
 * child that writes batches and is SIGKILLed at random points; the parent
 * replays the same deterministic workload to prove that what survives is
 * exactly a prefix of the batches that includes every acknowledged one.
 */
#include "config.h"

#include <check.h>
#include <errno.h>
#include <event2/event.h>
#include <fcntl.h>
#include <ftw.h>
#include <inttypes.h>
#include <poll.h>
#include <signal.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "lib/log.h"
#include "lib/util.h"
#include "store/crc32c.h"
#include "store/store.h"

#define DEADLINE_MS 20000

struct fx {
    char dir[256];
    struct event_base *base;
    struct store *s;
    struct store_completion done[4096];
    size_t n_done;
};

static void on_complete(void *arg, const struct store_completion *c)
{
    struct fx *f = arg;
    ck_assert_uint_lt(f->n_done, PB_ARRAY_SIZE(f->done));
    f->done[f->n_done++] = *c;
}

static int rm_one(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st;
    (void)flag;
    (void)ftw;
    return remove(path);
}

static void fx_init(struct fx *f)
{
    memset(f, 0, sizeof(*f));
    const char *tmp = getenv("TMPDIR");
    snprintf(f->dir, sizeof(f->dir), "%s/check_store.XXXXXX", tmp ? tmp : "/tmp");
    ck_assert_ptr_nonnull(mkdtemp(f->dir));
    f->base = event_base_new();
    ck_assert_ptr_nonnull(f->base);
}

static int fx_open_err(struct fx *f, bool quick_check, struct pb_error *err)
{
    struct store_options o = {
            .dir = f->dir,
            .base = f->base,
            .on_complete = on_complete,
            .arg = f,
            .quick_check = quick_check,
    };
    return store_open(&f->s, &o, err);
}

static void fx_open(struct fx *f)
{
    struct pb_error err;
    pb_error_clear(&err);
    int rc = fx_open_err(f, false, &err);
    ck_assert_msg(rc == 0, "store_open: %d %s", rc, err.msg);
}

static void fx_close(struct fx *f)
{
    store_close(f->s);
    f->s = NULL;
    f->n_done = 0; /* sequence numbers restart with the next store */
}

static void fx_fini(struct fx *f)
{
    fx_close(f);
    event_base_free(f->base);
    nftw(f->dir, rm_one, 16, FTW_DEPTH | FTW_PHYS);
}

/* Drives the loop until a completion covers seq (or the deadline passes);
 * returns that completion's status. */
static int fx_wait(struct fx *f, uint64_t seq)
{
    uint64_t deadline = pb_now_ms() + DEADLINE_MS;
    for (;;) {
        for (size_t i = 0; i < f->n_done; i++)
            if (f->done[i].first_seq <= seq && seq <= f->done[i].last_seq)
                return f->done[i].status;
        ck_assert_msg(pb_now_ms() < deadline, "no completion for seq %" PRIu64, seq);
        struct timeval tv = {0, 50000};
        event_base_loopexit(f->base, &tv);
        event_base_loop(f->base, EVLOOP_ONCE);
    }
}

/* Deterministic payload of entry (index, term). */
static size_t entry_payload(uint64_t index, uint64_t term, uint8_t *buf, size_t cap)
{
    size_t n =
            (size_t)snprintf((char *)buf, cap, "entry-%" PRIu64 "-term-%" PRIu64 "-", index, term);
    while (n < 40 && n < cap) {
        buf[n] = (uint8_t)('a' + (index + n) % 26);
        n++;
    }
    return n;
}

#define MAX_BATCH 64
struct ebatch {
    struct store_entry e[MAX_BATCH];
    uint8_t data[MAX_BATCH][64];
};

static void make_entries(struct ebatch *b, uint64_t first, size_t n, uint64_t term)
{
    ck_assert_uint_le(n, MAX_BATCH);
    for (size_t i = 0; i < n; i++) {
        b->e[i].index = first + i;
        b->e[i].term = term;
        b->e[i].type = (uint8_t)(i % 3);
        b->e[i].data = b->data[i];
        b->e[i].len = entry_payload(first + i, term, b->data[i], sizeof(b->data[i]));
    }
}

/* Submits and waits; returns the completion status. */
static int fx_commit(struct fx *f, const struct store_batch *b)
{
    uint64_t seq;
    int rc = store_submit(f->s, b, &seq);
    if (rc < 0)
        return rc;
    return fx_wait(f, seq);
}

static int fx_append(struct fx *f, uint64_t first, size_t n, uint64_t term)
{
    struct ebatch eb;
    make_entries(&eb, first, n, term);
    struct store_batch b = {.entries = eb.e, .n_entries = n};
    return fx_commit(f, &b);
}

static int fx_set_hs(struct fx *f, uint64_t term, uint64_t vote)
{
    struct store_hard_state hs = {term, vote};
    struct store_batch b = {.hard_state = &hs};
    return fx_commit(f, &b);
}

static void fx_load(struct fx *f, struct store_state *st)
{
    struct pb_error err;
    pb_error_clear(&err);
    int rc = store_load(f->s, 0, SIZE_MAX, st, &err);
    ck_assert_msg(rc == 0, "store_load: %d %s", rc, err.msg);
}

/* Asserts the log is exactly lo..hi and each entry is (index, term_of(index)). */
static void assert_log(struct fx *f, uint64_t lo, uint64_t hi, const uint64_t *terms)
{
    struct store_state st;
    fx_load(f, &st);
    ck_assert_uint_eq(st.first_index, lo);
    ck_assert_uint_eq(st.last_index, hi);
    ck_assert_uint_eq(st.entries.n, hi + 1 - lo);
    for (size_t i = 0; i < st.entries.n; i++) {
        const struct store_entry *e = &st.entries.v[i];
        uint8_t buf[64];
        ck_assert_uint_eq(e->index, lo + i);
        ck_assert_uint_eq(e->term, terms[e->index]);
        size_t n = entry_payload(e->index, e->term, buf, sizeof(buf));
        ck_assert_uint_eq(e->len, n);
        ck_assert_mem_eq(e->data, buf, n);
    }
    store_state_free(&st);
}

/* Runs raw SQL on raft.db while the store is closed. */
static void raw_sql(struct fx *f, const char *sql)
{
    char path[300];
    snprintf(path, sizeof(path), "%s/raft.db", f->dir);
    sqlite3 *db;
    ck_assert_int_eq(sqlite3_open(path, &db), SQLITE_OK);
    char *msg = NULL;
    int rc = sqlite3_exec(db, sql, NULL, NULL, &msg);
    ck_assert_msg(rc == SQLITE_OK, "%s: %s", sql, msg ? msg : "?");
    sqlite3_close(db);
}

static int reopen_expect_fail(struct fx *f, struct pb_error *err)
{
    pb_error_clear(err);
    int rc = fx_open_err(f, false, err);
    if (rc == 0)
        fx_close(f);
    return rc;
}

START_TEST(test_crc32c)
{
    ck_assert_uint_eq(pb_crc32c(0, "123456789", 9), 0xE3069283u);
    uint8_t buf[1000];
    for (size_t i = 0; i < sizeof(buf); i++)
        buf[i] = (uint8_t)(i * 7 + 3);
    uint32_t whole = pb_crc32c(0, buf, sizeof(buf));
    for (size_t cut = 0; cut < sizeof(buf); cut += 37)
        ck_assert_uint_eq(pb_crc32c(pb_crc32c(0, buf, cut), buf + cut, sizeof(buf) - cut), whole);
    ck_assert_uint_eq(pb_crc32c(0, NULL, 0), 0);
    ck_assert_uint_eq(pb_crc32c_sw(0, "123456789", 9), 0xE3069283u);
}
END_TEST

/* The instruction path (where the CPU has one) agrees with the tables at
 * every length, alignment and starting value. */
START_TEST(test_crc32c_paths_agree)
{
    uint8_t buf[4096 + 16];
    uint64_t x = 0x9E3779B97F4A7C15ull;
    for (size_t i = 0; i < sizeof(buf); i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        buf[i] = (uint8_t)x;
    }
    for (size_t off = 0; off < 9; off++)
        for (size_t len = 0; len < 70; len++)
            ck_assert_uint_eq(pb_crc32c(0, buf + off, len), pb_crc32c_sw(0, buf + off, len));
    uint32_t seed = 0;
    for (size_t len = 1; len + 16 <= sizeof(buf); len = len * 3 + 1) {
        seed = pb_crc32c_sw(seed, buf, 5);
        ck_assert_uint_eq(pb_crc32c(seed, buf + 3, len), pb_crc32c_sw(seed, buf + 3, len));
    }
    ck_assert_uint_eq(pb_crc32c(0, buf, 4096), pb_crc32c_sw(0, buf, 4096));
}
END_TEST

START_TEST(test_create_reopen)
{
    struct fx f;
    fx_init(&f);
    fx_open(&f);
    struct store_state st;
    fx_load(&f, &st);
    uint64_t node_id = st.node_id;
    ck_assert_uint_ne(node_id, 0);
    ck_assert(!st.has_cluster_id);
    ck_assert(!st.has_snapshot);
    ck_assert_uint_eq(st.hard_state.term, 0);
    ck_assert_uint_eq(st.hard_state.vote, 0);
    ck_assert_uint_eq(st.first_index, 1);
    ck_assert_uint_eq(st.last_index, 0);
    ck_assert_uint_eq(st.entries.n, 0);
    store_state_free(&st);

    /* A second opener (another process or a second store) is refused. */
    struct store *other;
    struct store_options o = {.dir = f.dir, .base = f.base};
    struct pb_error err;
    ck_assert_int_eq(store_open(&other, &o, &err), -EBUSY);
    ck_assert_ptr_nonnull(strstr(err.msg, "in use"));

    uint8_t cid[STORE_CLUSTER_ID_LEN];
    for (size_t i = 0; i < sizeof(cid); i++)
        cid[i] = (uint8_t)(0xA0 + i);
    struct store_batch b = {.cluster_id = cid};
    ck_assert_int_eq(fx_commit(&f, &b), 0);
    fx_close(&f);

    fx_open(&f);
    fx_load(&f, &st);
    ck_assert_uint_eq(st.node_id, node_id);
    ck_assert(st.has_cluster_id);
    ck_assert_mem_eq(st.cluster_id, cid, sizeof(cid));
    store_state_free(&st);
    /* The cluster id is set once. */
    ck_assert_int_eq(fx_commit(&f, &b), -EEXIST);
    /* quick_check on request passes on a healthy file. */
    fx_close(&f);
    ck_assert_int_eq(fx_open_err(&f, true, &err), 0);
    fx_fini(&f);
}
END_TEST

/* borrow_entries: the store writes the owner's bytes in place (they must stay
 * until the completion) and the log reads back exactly as if copied. */
START_TEST(test_borrow_entries)
{
    struct fx f;
    fx_init(&f);
    fx_open(&f);
    ck_assert_int_eq(fx_set_hs(&f, 2, 1), 0);
    struct ebatch *eb = pb_xmalloc(sizeof(*eb));
    make_entries(eb, 1, 10, 1);
    struct store_batch b = {.entries = eb->e, .n_entries = 10, .borrow_entries = true};
    uint64_t seq;
    ck_assert_int_eq(store_submit(f.s, &b, &seq), 0);
    ck_assert_int_eq(fx_wait(&f, seq), 0);
    free(eb); /* not used after the completion */
    uint64_t terms[12];
    for (size_t i = 0; i < 12; i++)
        terms[i] = 1;
    assert_log(&f, 1, 10, terms);
    fx_close(&f);
    fx_open(&f);
    assert_log(&f, 1, 10, terms);
    fx_fini(&f);
}
END_TEST

START_TEST(test_hard_state)
{
    struct fx f;
    fx_init(&f);
    fx_open(&f);
    ck_assert_int_eq(fx_set_hs(&f, 5, 2), 0);
    ck_assert_int_eq(fx_set_hs(&f, 5, 2), 0); /* same vote again: fine */

    /* A second, different vote in term 5 is refused and degrades the store. */
    ck_assert_int_eq(fx_set_hs(&f, 5, 3), -EINVAL);
    struct store_health h;
    store_health(f.s, &h);
    ck_assert(h.degraded);
    ck_assert_int_eq(h.code, -EINVAL);
    ck_assert_ptr_nonnull(strstr(h.msg, "second vote"));
    ck_assert_uint_gt(h.since_ms, 0);
    /* Fails fast until retried. */
    uint64_t seq;
    struct store_hard_state hs = {6, 0};
    struct store_batch b = {.hard_state = &hs};
    ck_assert_int_eq(store_submit(f.s, &b, &seq), -EINVAL);
    ck_assert_int_eq(store_retry(f.s), 0);
    store_health(f.s, &h);
    ck_assert(!h.degraded);

    /* The term never goes back. */
    ck_assert_int_eq(fx_set_hs(&f, 4, 0), -EINVAL);
    store_retry(f.s);
    ck_assert_int_eq(fx_set_hs(&f, 6, 0), 0);
    ck_assert_int_eq(fx_set_hs(&f, 6, 3), 0);
    fx_close(&f);

    fx_open(&f);
    struct store_state st;
    fx_load(&f, &st);
    ck_assert_uint_eq(st.hard_state.term, 6);
    ck_assert_uint_eq(st.hard_state.vote, 3);
    store_state_free(&st);
    fx_fini(&f);
}
END_TEST

START_TEST(test_append_truncate)
{
    struct fx f;
    fx_init(&f);
    fx_open(&f);
    uint64_t terms[64] = {0};
    ck_assert_int_eq(fx_set_hs(&f, 2, 1), 0);
    ck_assert_int_eq(fx_append(&f, 1, 10, 1), 0);
    for (int i = 1; i <= 10; i++)
        terms[i] = 1;
    assert_log(&f, 1, 10, terms);

    /* Read with a byte cap: at least one entry, never over the cap after it. */
    struct store_entries es;
    struct pb_error err;
    ck_assert_int_eq(store_read_entries(f.s, 3, 10, 1, &es, &err), 0);
    ck_assert_uint_eq(es.n, 1);
    ck_assert_uint_eq(es.v[0].index, 3);
    store_entries_free(&es);
    ck_assert_int_eq(store_read_entries(f.s, 3, 10, 100, &es, &err), 0);
    ck_assert_uint_eq(es.n, 2); /* 40-byte entries */
    ck_assert_uint_le(es.bytes, 100);
    store_entries_free(&es);
    ck_assert_int_eq(store_read_entries(f.s, 8, 100, SIZE_MAX, &es, &err), 0);
    ck_assert_uint_eq(es.n, 3);
    store_entries_free(&es);

    /* Conflict: truncate from 6 and append 6..8 of term 2, in one batch. */
    struct ebatch eb;
    make_entries(&eb, 6, 3, 2);
    struct store_batch b = {.truncate_from = 6, .entries = eb.e, .n_entries = 3};
    ck_assert_int_eq(fx_commit(&f, &b), 0);
    for (int i = 6; i <= 10; i++)
        terms[i] = i <= 8 ? 2 : 0;
    assert_log(&f, 1, 8, terms);

    /* A "truncation" whose new entry matches the stored one is refused and
     * changes nothing. */
    make_entries(&eb, 6, 2, 2);
    b = (struct store_batch){.truncate_from = 6, .entries = eb.e, .n_entries = 2};
    ck_assert_int_eq(fx_commit(&f, &b), -EINVAL);
    struct store_health h;
    store_health(f.s, &h);
    ck_assert_ptr_nonnull(strstr(h.msg, "matching entry 6"));
    store_retry(f.s);
    assert_log(&f, 1, 8, terms);

    /* Overlap without truncation, a gap, a lower term, a term above the
     * current term, truncation without an entry: all refused. */
    make_entries(&eb, 8, 1, 2);
    b = (struct store_batch){.entries = eb.e, .n_entries = 1};
    ck_assert_int_eq(fx_commit(&f, &b), -EINVAL);
    store_retry(f.s);
    ck_assert_int_eq(fx_append(&f, 10, 1, 2), -EINVAL);
    store_retry(f.s);
    ck_assert_int_eq(fx_append(&f, 9, 1, 1), -EINVAL);
    store_retry(f.s);
    ck_assert_int_eq(fx_append(&f, 9, 1, 3), -EINVAL);
    store_health(f.s, &h);
    ck_assert_ptr_nonnull(strstr(h.msg, "above current term"));
    store_retry(f.s);
    b = (struct store_batch){.truncate_from = 7};
    ck_assert_int_eq(fx_commit(&f, &b), -EINVAL);
    store_retry(f.s);
    assert_log(&f, 1, 8, terms);

    /* Term 3 and its entries in one batch, truncating a conflicting suffix. */
    struct store_hard_state hs = {3, 0};
    make_entries(&eb, 8, 2, 3);
    b = (struct store_batch){
            .hard_state = &hs, .truncate_from = 8, .entries = eb.e, .n_entries = 2};
    ck_assert_int_eq(fx_commit(&f, &b), 0);
    terms[8] = terms[9] = 3;
    assert_log(&f, 1, 9, terms);
    fx_close(&f);
    fx_open(&f);
    assert_log(&f, 1, 9, terms);
    fx_fini(&f);
}
END_TEST

START_TEST(test_group_commit)
{
    struct fx f;
    fx_init(&f);
    fx_open(&f);
    ck_assert_int_eq(fx_set_hs(&f, 1, 0), 0);
    f.n_done = 0;
    enum { N = 300 };
    uint64_t first_seq = 0, seq = 0;
    for (uint64_t i = 1; i <= N; i++) {
        struct ebatch eb;
        make_entries(&eb, i, 1, 1);
        struct store_batch b = {.entries = eb.e, .n_entries = 1};
        ck_assert_int_eq(store_submit(f.s, &b, &seq), 0);
        if (first_seq == 0)
            first_seq = seq;
    }
    /* While the storage thread commits, the reader connection sees a growing
     * committed prefix of the log, never an error or a gap. */
    size_t seen = 0;
    for (int i = 0; i < 50; i++) {
        struct store_entries es;
        struct pb_error err;
        ck_assert_int_eq(store_read_entries(f.s, 1, N, SIZE_MAX, &es, &err), 0);
        ck_assert_uint_ge(es.n, seen);
        for (size_t k = 0; k < es.n; k++)
            ck_assert_uint_eq(es.v[k].index, k + 1);
        seen = es.n;
        store_entries_free(&es);
    }
    ck_assert_int_eq(fx_wait(&f, seq), 0);
    /* In order, contiguous, each completion covering one or more batches;
     * fewer completions than batches means batches shared a commit. */
    uint64_t next = first_seq;
    for (size_t i = 0; i < f.n_done; i++) {
        ck_assert_int_eq(f.done[i].status, 0);
        ck_assert_uint_eq(f.done[i].first_seq, next);
        ck_assert_uint_ge(f.done[i].last_seq, f.done[i].first_seq);
        next = f.done[i].last_seq + 1;
    }
    ck_assert_uint_eq(next, seq + 1);
    ck_assert_uint_lt(f.n_done, N);
    struct store_health h;
    store_health(f.s, &h);
    ck_assert_uint_eq(h.last_persisted_seq, seq);
    /* Fewer transactions than batches: batches shared commits (fsyncs). */
    ck_assert_uint_eq(h.batches, N + 1);
    ck_assert_uint_lt(h.transactions, N / 2);
    uint64_t terms[N + 1];
    for (int i = 0; i <= N; i++)
        terms[i] = 1;
    assert_log(&f, 1, N, terms);
    fx_fini(&f);
}
END_TEST

/* ---- crash safety ------------------------------------------------------ */

#define CRASH_MAX_LOG      (1 << 16)
#define CRASH_MAX_INFLIGHT 16

struct model {
    uint64_t term, vote;
    bool has_snap;
    uint64_t snap_index, snap_term;
    uint64_t first, last;
    uint64_t terms[CRASH_MAX_LOG];
};

struct gen_batch {
    bool has_hs;
    struct store_hard_state hs;
    bool has_chunk;
    struct store_snapshot_chunk chunk;
    uint64_t truncate_from;
    struct ebatch eb;
    size_t n;
    bool has_local;
    struct store_local_snapshot local;
};

static const uint8_t crash_payload[100] = {1, 2, 3};

static uint64_t rng_next(uint64_t *x)
{
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    return *x;
}

/* A random index of the log above the snapshot, or 0 if there is none. */
static uint64_t pick_above_snapshot(const struct model *m, uint64_t *rng)
{
    uint64_t lo = PB_MAX(m->snap_index + 1, m->first);
    if (m->last < lo)
        return 0;
    return lo + rng_next(rng) % (m->last - lo + 1);
}

/* The next batch of the workload from model m (which it advances): new terms
 * and votes, appends, conflict truncations, incoming snapshots (rules 6 and
 * 7) and local snapshots, in the order the store applies them. */
static void gen_next(struct model *m, uint64_t *rng, struct gen_batch *g)
{
    memset(g, 0, sizeof(*g));
    if (m->term == 0 || rng_next(rng) % 6 == 0) {
        m->term++;
        m->vote = rng_next(rng) % 4;
        g->has_hs = true;
        g->hs = (struct store_hard_state){m->term, m->vote};
    }
    uint64_t r = rng_next(rng) % 24;
    if (r == 0 && m->last + 16 < CRASH_MAX_LOG) {
        uint64_t idx = rng_next(rng) % 2 ? pick_above_snapshot(m, rng) : 0;
        uint64_t term;
        if (idx != 0) { /* rule 6: the log has it, keep the suffix */
            term = m->terms[idx];
        } else { /* rule 7: beyond the log, discard it all */
            idx = m->last + 1 + rng_next(rng) % 3;
            term = m->term;
            m->last = idx;
        }
        g->has_chunk = true;
        g->chunk = (struct store_snapshot_chunk){.last_index = idx,
                                                 .last_term = term,
                                                 .membership = "m",
                                                 .membership_len = 1,
                                                 .data = crash_payload,
                                                 .len = sizeof(crash_payload),
                                                 .done = true};
        m->has_snap = true;
        m->snap_index = idx;
        m->snap_term = term;
        m->first = idx + 1;
    }
    uint64_t from = m->last + 1;
    if (m->last > 4 && rng_next(rng) % 5 == 0) {
        uint64_t x = m->last - rng_next(rng) % 4;
        if (x > m->snap_index && m->terms[x] < m->term) {
            g->truncate_from = x;
            from = x;
        }
    }
    g->n = 1 + rng_next(rng) % 6;
    if (from + g->n >= CRASH_MAX_LOG)
        g->n = 0;
    if (g->n == 0)
        g->truncate_from = 0;
    else
        make_entries(&g->eb, from, g->n, m->term);
    for (size_t i = 0; i < g->n; i++)
        m->terms[from + i] = m->term;
    if (g->n > 0)
        m->last = from + g->n - 1;
    if (r == 1) {
        uint64_t idx = pick_above_snapshot(m, rng);
        if (idx != 0) {
            g->has_local = true;
            g->local = (struct store_local_snapshot){idx, m->terms[idx], "l", 1};
            m->has_snap = true;
            m->snap_index = idx;
            m->snap_term = m->terms[idx];
        }
    }
}

static bool model_matches(const struct model *m, const struct store_state *st)
{
    if (st->hard_state.term != m->term || st->hard_state.vote != m->vote)
        return false;
    if (st->has_snapshot != m->has_snap || st->snapshot.last_index != m->snap_index ||
        st->snapshot.last_term != m->snap_term)
        return false;
    /* Compaction runs between batches, independently of them: the first
     * index may be anywhere from the model's up to the snapshot's + 1. */
    uint64_t first_max = PB_MAX(m->first, m->snap_index + 1);
    if (st->first_index < m->first || st->first_index > first_max || st->last_index != m->last ||
        st->entries.n != m->last + 1 - st->first_index)
        return false;
    for (size_t i = 0; i < st->entries.n; i++)
        if (st->entries.v[i].term != m->terms[st->first_index + i])
            return false;
    return true;
}

static void model_from_state(struct model *m, const struct store_state *st)
{
    memset(m, 0, sizeof(*m));
    m->term = st->hard_state.term;
    m->vote = st->hard_state.vote;
    m->has_snap = st->has_snapshot;
    m->snap_index = st->snapshot.last_index;
    m->snap_term = st->snapshot.last_term;
    m->first = st->first_index;
    m->last = st->last_index;
    for (size_t i = 0; i < st->entries.n; i++)
        m->terms[st->entries.v[i].index] = st->entries.v[i].term;
}

struct child_ctx {
    int fd;
    size_t inflight;
};

static void child_on_complete(void *arg, const struct store_completion *c)
{
    struct child_ctx *cc = arg;
    if (c->status != 0)
        _exit(3);
    cc->inflight -= (size_t)(c->last_seq - c->first_seq + 1);
    if (write(cc->fd, &c->last_seq, sizeof(c->last_seq)) != sizeof(c->last_seq))
        _exit(4);
}

/* The child: open, then submit the workload forever (and ask for
 * compactions), reporting acks. */
static void crash_child(const char *dir, uint64_t seed, int fd)
{
    /* Only the ack pipe: the child must not share Check's message channel
     * (an open file description with the test process) or anything else. */
    if (fd > 3)
        close_range(3, (unsigned)fd - 1, 0);
    close_range((unsigned)fd + 1, ~0u, 0);
    log_set_level(LOG_LEVEL_ERR);
    struct event_base *base = event_base_new();
    struct child_ctx cc = {fd, 0};
    struct store_options o = {
            .dir = dir, .base = base, .on_complete = child_on_complete, .arg = &cc};
    struct store *s;
    if (store_open(&s, &o, NULL) < 0)
        _exit(2);
    struct store_state st;
    if (store_load(s, 0, SIZE_MAX, &st, NULL) < 0)
        _exit(2);
    static struct model m;
    model_from_state(&m, &st);
    store_state_free(&st);
    uint64_t rng = seed, crng = seed ^ 0xC0FFEE;
    for (;;) {
        /* Compaction up to (or a little below) the submitted snapshot; the
         * store clamps it to the durable one. */
        if (m.has_snap && rng_next(&crng) % 8 == 0)
            store_compact(s, m.snap_index + 1 - PB_MIN(m.snap_index, rng_next(&crng) % 4));
        while (cc.inflight < CRASH_MAX_INFLIGHT) {
            struct gen_batch g;
            gen_next(&m, &rng, &g);
            struct store_batch b = {.hard_state = g.has_hs ? &g.hs : NULL,
                                    .snapshot_chunk = g.has_chunk ? &g.chunk : NULL,
                                    .truncate_from = g.truncate_from,
                                    .entries = g.eb.e,
                                    .n_entries = g.n,
                                    .local_snapshot = g.has_local ? &g.local : NULL};
            uint64_t seq;
            if (store_submit(s, &b, &seq) < 0)
                _exit(5);
            cc.inflight++;
        }
        event_base_loop(base, EVLOOP_ONCE);
    }
}

START_TEST(test_crash_safety)
{
    struct fx f;
    fx_init(&f);
    uint64_t rng = 0x9E3779B97F4A7C15ull ^ (uint64_t)getpid();
    static struct model m; /* the durable state the parent has verified */
    memset(&m, 0, sizeof(m));
    m.first = 1;
    int iterations = 30, kills_with_acks = 0;
    for (int it = 0; it < iterations; it++) {
        uint64_t seed = rng_next(&rng) | 1;
        unsigned want_acks = (unsigned)(rng_next(&rng) % 40); /* 0: kill at once */
        int p[2];
        ck_assert_int_eq(pipe(p), 0);
        pid_t pid = fork();
        ck_assert_int_ge(pid, 0);
        if (pid == 0) {
            close(p[0]);
            crash_child(f.dir, seed, p[1]);
            _exit(1);
        }
        close(p[1]);
        uint64_t acked = 0, v;
        unsigned got = 0;
        uint64_t deadline = pb_now_ms() + DEADLINE_MS;
        while (got < want_acks) {
            struct pollfd pfd = {.fd = p[0], .events = POLLIN};
            int left = (int)(deadline - PB_MIN(deadline, pb_now_ms()));
            int n = poll(&pfd, 1, left);
            if (n == 0) {
                kill(pid, SIGKILL);
                waitpid(pid, NULL, 0);
                ck_abort_msg("iteration %d: no ack from the child in time", it);
            }
            if (n < 0 || read(p[0], &v, sizeof(v)) != sizeof(v))
                break; /* the child died: its exit status says why */
            acked = v;
            got++;
        }
        kill(pid, SIGKILL);
        int status;
        ck_assert_int_eq(waitpid(pid, &status, 0), pid);
        ck_assert_msg(WIFSIGNALED(status), "child exited with %d", WEXITSTATUS(status));
        while (read(p[0], &v, sizeof(v)) == sizeof(v))
            acked = v; /* acks written before the kill */
        close(p[0]);
        if (acked > 0)
            kills_with_acks++;

        /* Reopen (full validation) and find the batch count the durable state
         * corresponds to: it must be a prefix, and include every ack. */
        fx_open(&f);
        struct store_state st;
        fx_load(&f, &st);
        fx_close(&f);
        static struct model replay;
        replay = m;
        uint64_t r = seed, matched = UINT64_MAX;
        for (uint64_t k = 0; k <= acked + CRASH_MAX_INFLIGHT + 1; k++) {
            if (k >= acked && model_matches(&replay, &st)) {
                matched = k;
                break;
            }
            struct gen_batch g;
            gen_next(&replay, &r, &g);
        }
        ck_assert_msg(matched != UINT64_MAX,
                      "iteration %d: durable state (term %" PRIu64 ", last %" PRIu64
                      ") is not the state after any batch >= acked %" PRIu64,
                      it, st.hard_state.term, st.last_index, acked);
        m = replay;
        store_state_free(&st);
    }
    ck_assert_int_gt(kills_with_acks, 0);
    ck_assert(m.has_snap); /* the workload installed snapshots */
    fx_fini(&f);
}
END_TEST

/* ---- snapshots and compaction ------------------------------------------ */

static int fx_chunk(struct fx *f, uint64_t index, uint64_t term, uint64_t off, const void *data,
                    size_t len, bool done)
{
    struct store_snapshot_chunk c = {
            .last_index = index,
            .last_term = term,
            .membership = "conf:1,2,3",
            .membership_len = 10,
            .offset = off,
            .data = data,
            .len = len,
            .done = done,
    };
    struct store_batch b = {.snapshot_chunk = &c};
    return fx_commit(f, &b);
}

START_TEST(test_snapshot_install)
{
    struct fx f;
    fx_init(&f);
    fx_open(&f);
    uint64_t terms[64] = {0};
    ck_assert_int_eq(fx_set_hs(&f, 1, 0), 0);
    ck_assert_int_eq(fx_append(&f, 1, 10, 1), 0);
    for (int i = 1; i <= 10; i++)
        terms[i] = 1;

    uint8_t payload[700];
    for (size_t i = 0; i < sizeof(payload); i++)
        payload[i] = (uint8_t)(i * 13 + 1);
    uint64_t have;
    ck_assert_int_eq(store_snapshot_staged(f.s, 5, 1, &have), 0);
    ck_assert_uint_eq(have, 0);
    ck_assert_int_eq(fx_chunk(&f, 5, 1, 0, payload, 300, false), 0);
    ck_assert_int_eq(store_snapshot_staged(f.s, 5, 1, &have), 0);
    ck_assert_uint_eq(have, 300);
    ck_assert_int_eq(store_snapshot_staged(f.s, 5, 2, &have), 0);
    ck_assert_uint_eq(have, 0);
    /* A chunk after a gap is refused; staging is kept. */
    ck_assert_int_eq(fx_chunk(&f, 5, 1, 350, payload + 350, 100, false), -EINVAL);
    struct store_health h;
    store_health(f.s, &h);
    ck_assert_ptr_nonnull(strstr(h.msg, "gap"));
    store_retry(f.s);
    ck_assert_int_eq(store_snapshot_staged(f.s, 5, 1, &have), 0);
    ck_assert_uint_eq(have, 300);
    /* Retransmissions: a repeated first chunk changes nothing, an
     * overlapping one adds only its new tail. */
    ck_assert_int_eq(fx_chunk(&f, 5, 1, 0, payload, 300, false), 0);
    ck_assert_int_eq(store_snapshot_staged(f.s, 5, 1, &have), 0);
    ck_assert_uint_eq(have, 300);
    ck_assert_int_eq(fx_chunk(&f, 5, 1, 250, payload + 250, 100, false), 0);
    ck_assert_int_eq(store_snapshot_staged(f.s, 5, 1, &have), 0);
    ck_assert_uint_eq(have, 350);
    /* Resume where the staged bytes end; the last chunk installs (rule 6: the
     * log holds 5/1, so entries after it stay). */
    ck_assert_int_eq(fx_chunk(&f, 5, 1, 350, payload + 350, 250, false), 0);
    ck_assert_int_eq(fx_chunk(&f, 5, 1, 600, payload + 600, 100, true), 0);
    struct store_state st;
    fx_load(&f, &st);
    ck_assert(st.has_snapshot);
    ck_assert_uint_eq(st.snapshot.last_index, 5);
    ck_assert_uint_eq(st.snapshot.last_term, 1);
    ck_assert_uint_eq(st.snapshot.size, sizeof(payload));
    ck_assert_uint_eq(st.snapshot.crc, pb_crc32c(0, payload, sizeof(payload)));
    ck_assert_uint_eq(st.snapshot.membership_len, 10);
    ck_assert_mem_eq(st.snapshot.membership, "conf:1,2,3", 10);
    store_state_free(&st);
    assert_log(&f, 6, 10, terms);
    ck_assert_int_eq(store_snapshot_staged(f.s, 5, 1, &have), 0);
    ck_assert_uint_eq(have, 0); /* complete, not staged */

    /* The payload reads back across chunk boundaries. */
    uint8_t back[sizeof(payload)];
    size_t off = 0, got;
    struct pb_error err;
    while (off < sizeof(back)) {
        ck_assert_int_eq(store_snapshot_read(f.s, 5, off, back + off,
                                             PB_MIN((size_t)123, sizeof(back) - off), &got, &err),
                         0);
        ck_assert_uint_gt(got, 0);
        off += got;
    }
    ck_assert_mem_eq(back, payload, sizeof(payload));
    ck_assert_int_eq(store_snapshot_read(f.s, 5, sizeof(payload), back, 10, &got, &err), 0);
    ck_assert_uint_eq(got, 0);

    /* Entries compacted by the snapshot cannot be read. */
    struct store_entries es;
    ck_assert_int_eq(store_read_entries(f.s, 3, 10, SIZE_MAX, &es, &err), -ENOENT);

    /* A stale snapshot is refused. */
    ck_assert_int_eq(fx_chunk(&f, 4, 1, 0, payload, 10, true), -EINVAL);
    store_retry(f.s);

    /* Rule 7: the log holds index 20 but with another term: drop it all. */
    ck_assert_int_eq(fx_append(&f, 11, 15, 1), 0);
    ck_assert_int_eq(fx_set_hs(&f, 2, 0), 0);
    ck_assert_int_eq(fx_chunk(&f, 20, 2, 0, payload, 50, true), 0);
    fx_load(&f, &st);
    ck_assert_uint_eq(st.snapshot.last_index, 20);
    ck_assert_uint_eq(st.first_index, 21);
    ck_assert_uint_eq(st.last_index, 20);
    ck_assert_uint_eq(st.last_term, 2);
    ck_assert_uint_eq(st.entries.n, 0);
    store_state_free(&st);
    /* The older snapshot and its payload are gone. */
    ck_assert_int_eq(store_snapshot_read(f.s, 5, 0, back, 10, &got, &err), -ENOENT);
    /* The log continues after the snapshot. */
    ck_assert_int_eq(fx_append(&f, 21, 3, 2), 0);
    terms[21] = terms[22] = terms[23] = 2;
    assert_log(&f, 21, 23, terms);

    /* A transfer interrupted by a restart is dropped at open. */
    ck_assert_int_eq(fx_chunk(&f, 30, 2, 0, payload, 100, false), 0);
    ck_assert_int_eq(store_snapshot_staged(f.s, 30, 2, &have), 0);
    ck_assert_uint_eq(have, 100);
    fx_close(&f);
    fx_open(&f);
    ck_assert_int_eq(store_snapshot_staged(f.s, 30, 2, &have), 0);
    ck_assert_uint_eq(have, 0);
    fx_load(&f, &st);
    ck_assert_uint_eq(st.snapshot.last_index, 20);
    ck_assert_uint_eq(st.snapshot.size, 50);
    store_state_free(&st);
    assert_log(&f, 21, 23, terms);
    fx_fini(&f);
}
END_TEST

/* Drives the loop until the first index reaches want (compaction has no
 * completion of its own). */
static void wait_first_index(struct fx *f, uint64_t want)
{
    uint64_t deadline = pb_now_ms() + DEADLINE_MS;
    for (;;) {
        struct store_state st;
        struct pb_error err;
        ck_assert_int_eq(store_load(f->s, UINT64_MAX, 0, &st, &err), 0);
        uint64_t first = st.first_index;
        store_state_free(&st);
        if (first == want)
            return;
        ck_assert_msg(first < want, "first index %" PRIu64 " overshot %" PRIu64, first, want);
        ck_assert_msg(pb_now_ms() < deadline, "compaction stuck at %" PRIu64, first);
        struct timeval tv = {0, 10000};
        event_base_loopexit(f->base, &tv);
        event_base_loop(f->base, EVLOOP_ONCE);
    }
}

START_TEST(test_compaction)
{
    struct fx f;
    fx_init(&f);
    fx_open(&f);
    ck_assert_int_eq(fx_set_hs(&f, 1, 0), 0);
    for (uint64_t i = 1; i <= 6000; i += MAX_BATCH)
        ck_assert_int_eq(fx_append(&f, i, MAX_BATCH, 1), 0);
    uint64_t last = 6000 / MAX_BATCH * MAX_BATCH + MAX_BATCH;
    /* Without a snapshot nothing may be compacted. */
    ck_assert_int_eq(store_compact(f.s, 100), 0);
    struct store_batch barrier = {0};
    ck_assert_int_eq(fx_commit(&f, &barrier), 0);
    ck_assert_int_eq(fx_commit(&f, &barrier), 0); /* a slice would have run before it */
    wait_first_index(&f, 1);

    /* A local snapshot must name an entry of the log. */
    struct store_local_snapshot ls = {.last_index = 5000, .last_term = 2};
    struct store_batch b = {.local_snapshot = &ls};
    ck_assert_int_eq(fx_commit(&f, &b), -EINVAL);
    store_retry(f.s);
    ls.last_term = 1;
    ck_assert_int_eq(fx_commit(&f, &b), 0);

    /* Compaction in slices, between batch transactions. */
    ck_assert_int_eq(store_compact(f.s, 4500), 0);
    ck_assert_int_eq(fx_append(&f, last + 1, 1, 1), 0); /* batches keep flowing */
    wait_first_index(&f, 4500);
    struct store_entries es;
    struct pb_error err;
    ck_assert_int_eq(store_read_entries(f.s, 4499, 4600, SIZE_MAX, &es, &err), -ENOENT);
    ck_assert_int_eq(store_read_entries(f.s, 4500, 4600, SIZE_MAX, &es, &err), 0);
    ck_assert_uint_eq(es.n, 101);
    ck_assert_uint_eq(es.v[0].index, 4500);
    store_entries_free(&es);
    /* Never past the snapshot. */
    ck_assert_int_eq(store_compact(f.s, 100000), 0);
    wait_first_index(&f, 5001);
    fx_close(&f);
    fx_open(&f);
    struct store_state st;
    fx_load(&f, &st);
    ck_assert_uint_eq(st.first_index, 5001);
    ck_assert_uint_eq(st.last_index, last + 1);
    ck_assert_uint_eq(st.snapshot.last_index, 5000);
    ck_assert_uint_eq(st.snapshot.size, 0);
    store_state_free(&st);
    fx_fini(&f);
}
END_TEST

/* ---- corruption, formats, faults ---------------------------------------- */

static void fill_log(struct fx *f, uint64_t n)
{
    fx_open(f);
    ck_assert_int_eq(fx_set_hs(f, 1, 0), 0);
    ck_assert_int_eq(fx_append(f, 1, (size_t)n, 1), 0);
    fx_close(f);
}

START_TEST(test_corrupt_blob_sql)
{
    struct fx f;
    fx_init(&f);
    fill_log(&f, 10);
    raw_sql(&f, "UPDATE raft_log SET data = x'00112233' WHERE idx = 3");
    struct pb_error err;
    ck_assert_int_eq(reopen_expect_fail(&f, &err), -EBADMSG);
    ck_assert_msg(strstr(err.msg, "entry 3") && strstr(err.msg, "checksum"), "%s", err.msg);
    fx_fini(&f);
}
END_TEST

START_TEST(test_corrupt_bytes_on_disk)
{
    struct fx f;
    fx_init(&f);
    fill_log(&f, 10);
    /* Flip one byte of entry 7's payload in the file itself (after a clean
     * close everything is checkpointed into raft.db). */
    char path[300];
    snprintf(path, sizeof(path), "%s/raft.db", f.dir);
    int fd = open(path, O_RDWR);
    ck_assert_int_ge(fd, 0);
    static uint8_t file[1 << 20];
    ssize_t n = read(fd, file, sizeof(file));
    ck_assert_int_gt(n, 0);
    uint8_t want[64];
    size_t wl = entry_payload(7, 1, want, sizeof(want));
    uint8_t *hit = memmem(file, (size_t)n, want, wl);
    ck_assert_ptr_nonnull(hit);
    ck_assert_ptr_null(memmem(hit + 1, (size_t)n - (size_t)(hit + 1 - file), want, wl));
    off_t at = (off_t)(hit - file) + 20;
    uint8_t byte = file[at] ^ 0x01;
    ck_assert_int_eq(pwrite(fd, &byte, 1, at), 1);
    close(fd);
    struct pb_error err;
    ck_assert_int_eq(reopen_expect_fail(&f, &err), -EBADMSG);
    ck_assert_msg(strstr(err.msg, "entry 7") && strstr(err.msg, "checksum"), "%s", err.msg);
    fx_fini(&f);
}
END_TEST

START_TEST(test_quick_check)
{
    struct fx f;
    fx_init(&f);
    fill_log(&f, 10);
    /* Damage the file header's free-page count: every row still reads
     * fine, only a structural check can see it. */
    char path[300];
    snprintf(path, sizeof(path), "%s/raft.db", f.dir);
    int fd = open(path, O_RDWR);
    ck_assert_int_ge(fd, 0);
    const uint8_t seven[4] = {0, 0, 0, 7};
    ck_assert_int_eq(pwrite(fd, seven, 4, 36), 4);
    close(fd);
    struct pb_error err;
    ck_assert_int_eq(fx_open_err(&f, false, &err), 0);
    fx_close(&f);
    pb_error_clear(&err);
    ck_assert_int_eq(fx_open_err(&f, true, &err), -EBADMSG);
    ck_assert_msg(strstr(err.msg, "quick_check"), "%s", err.msg);
    fx_fini(&f);
}
END_TEST

START_TEST(test_corrupt_contiguity)
{
    struct fx f;
    fx_init(&f);
    fill_log(&f, 10);
    raw_sql(&f, "DELETE FROM raft_log WHERE idx = 5");
    struct pb_error err;
    ck_assert_int_eq(reopen_expect_fail(&f, &err), -EBADMSG);
    ck_assert_msg(strstr(err.msg, "not contiguous"), "%s", err.msg);
    fx_fini(&f);
}
END_TEST

START_TEST(test_corrupt_snapshot_gap)
{
    struct fx f;
    fx_init(&f);
    fill_log(&f, 10);
    /* A snapshot at 2 but the log starts at 5: entries 3..4 are lost. */
    raw_sql(&f, "INSERT INTO raft_snapshot VALUES (1, 2, 1, x'', 0, 0, 1);"
                "DELETE FROM raft_log WHERE idx < 5");
    struct pb_error err;
    ck_assert_int_eq(reopen_expect_fail(&f, &err), -EBADMSG);
    ck_assert_msg(strstr(err.msg, "missing"), "%s", err.msg);
    fx_fini(&f);

    fx_init(&f);
    fill_log(&f, 3);
    fx_open(&f);
    ck_assert_int_eq(fx_set_hs(&f, 2, 0), 0);
    ck_assert_int_eq(fx_append(&f, 4, 2, 2), 0);
    fx_close(&f);
    /* A snapshot whose term disagrees with the log entry at its index. */
    raw_sql(&f, "INSERT INTO raft_snapshot VALUES (1, 4, 1, x'', 0, 0, 1)");
    ck_assert_int_eq(reopen_expect_fail(&f, &err), -EBADMSG);
    ck_assert_msg(strstr(err.msg, "entry 4") && strstr(err.msg, "snapshot"), "%s", err.msg);
    fx_fini(&f);
}
END_TEST

START_TEST(test_formats)
{
    struct fx f;
    fx_init(&f);
    fill_log(&f, 2);
    raw_sql(&f, "UPDATE raft_meta SET format = 2");
    struct pb_error err;
    ck_assert_int_eq(reopen_expect_fail(&f, &err), -EPROTONOSUPPORT);
    ck_assert_msg(strstr(err.msg, "format 2") && strstr(err.msg, "format 1"), "%s", err.msg);
    raw_sql(&f, "UPDATE raft_meta SET format = 0");
    ck_assert_int_eq(reopen_expect_fail(&f, &err), -EBADMSG);
    ck_assert_msg(strstr(err.msg, "no migration"), "%s", err.msg);
    raw_sql(&f, "UPDATE raft_meta SET format = 1");
    fx_open(&f);
    fx_close(&f);
    fx_fini(&f);

    /* Not a database at all. */
    fx_init(&f);
    char path[300];
    snprintf(path, sizeof(path), "%s/raft.db", f.dir);
    FILE *fp = fopen(path, "w");
    ck_assert_ptr_nonnull(fp);
    for (int i = 0; i < 1000; i++)
        fputs("garbage ", fp);
    fclose(fp);
    ck_assert_int_eq(reopen_expect_fail(&f, &err), -EBADMSG);
    ck_assert_msg(strstr(err.msg, "not a database"), "%s", err.msg);
    fx_fini(&f);

    /* Another application's SQLite file. */
    fx_init(&f);
    raw_sql(&f, "PRAGMA application_id = 7; CREATE TABLE t (x)");
    ck_assert_int_eq(reopen_expect_fail(&f, &err), -EBADMSG);
    ck_assert_msg(strstr(err.msg, "not a pickbox"), "%s", err.msg);
    fx_fini(&f);
}
END_TEST

static void check_fault(enum store_fault kind, int code)
{
    struct fx f;
    fx_init(&f);
    fx_open(&f);
    uint64_t terms[64] = {0};
    ck_assert_int_eq(fx_set_hs(&f, 1, 0), 0);
    ck_assert_int_eq(fx_append(&f, 1, 5, 1), 0);
    for (int i = 1; i <= 5; i++)
        terms[i] = 1;

    /* Three batches submitted behind one failing transaction: each fails,
     * either in the failed completion or fast at submission. */
    store_fault_inject(f.s, kind, 1);
    f.n_done = 0;
    struct store_hard_state hs = {2, 7};
    int queued = 0;
    for (int i = 0; i < 3; i++) {
        struct ebatch eb;
        uint64_t s_i;
        make_entries(&eb, 6 + 2 * (uint64_t)i, 2, 2);
        struct store_batch b = {.hard_state = i == 0 ? &hs : NULL, .entries = eb.e, .n_entries = 2};
        int rc = store_submit(f.s, &b, &s_i);
        if (i == 0)
            ck_assert_int_eq(rc, 0);
        if (rc == 0) {
            ck_assert_int_eq(fx_wait(&f, s_i), code);
            queued++;
        } else {
            ck_assert_int_eq(rc, code);
        }
    }
    ck_assert_int_ge(queued, 1);
    struct store_health h;
    store_health(f.s, &h);
    ck_assert(h.degraded);
    ck_assert_int_eq(h.code, code);
    ck_assert_uint_gt(strlen(h.msg), 0);
    ck_assert_uint_gt(h.since_ms, 0);
    ck_assert_uint_eq(h.last_persisted_seq, 2); /* hs + append before the fault */
    /* Fails fast, and nothing of the failed batches is visible. */
    uint64_t seq;
    struct store_batch empty = {0};
    ck_assert_int_eq(store_submit(f.s, &empty, &seq), code);
    struct store_state st;
    fx_load(&f, &st);
    ck_assert_uint_eq(st.hard_state.term, 1);
    ck_assert_uint_eq(st.hard_state.vote, 0);
    store_state_free(&st);
    assert_log(&f, 1, 5, terms);

    /* A retry whose probe fails again stays degraded. */
    store_fault_inject(f.s, kind, 1);
    store_retry(f.s);
    ck_assert_int_eq(fx_commit(&f, &empty), code);
    store_health(f.s, &h);
    ck_assert(h.degraded);

    /* Retry, probe, then the same writes succeed. */
    store_retry(f.s);
    ck_assert_int_eq(fx_commit(&f, &empty), 0);
    struct ebatch eb;
    make_entries(&eb, 6, 6, 2);
    struct store_batch b = {.hard_state = &hs, .entries = eb.e, .n_entries = 6};
    ck_assert_int_eq(fx_commit(&f, &b), 0);
    for (int i = 6; i <= 11; i++)
        terms[i] = 2;
    assert_log(&f, 1, 11, terms);
    fx_close(&f);
    fx_open(&f);
    assert_log(&f, 1, 11, terms);
    fx_load(&f, &st);
    ck_assert_uint_eq(st.hard_state.term, 2);
    ck_assert_uint_eq(st.hard_state.vote, 7);
    store_state_free(&st);
    fx_fini(&f);
}

START_TEST(test_fault_full)
{
    check_fault(STORE_FAULT_FULL, -ENOSPC);
}
END_TEST

START_TEST(test_fault_ioerr_write)
{
    check_fault(STORE_FAULT_IOERR_WRITE, -EIO);
}
END_TEST

START_TEST(test_fault_ioerr_fsync)
{
    check_fault(STORE_FAULT_IOERR_FSYNC, -EIO);
}
END_TEST

START_TEST(test_backoff)
{
    ck_assert_uint_eq(store_retry_backoff_ms(0), 100);
    ck_assert_uint_eq(store_retry_backoff_ms(1), 200);
    ck_assert_uint_eq(store_retry_backoff_ms(8), 25600);
    ck_assert_uint_eq(store_retry_backoff_ms(9), 30000);
    ck_assert_uint_eq(store_retry_backoff_ms(1000), 30000);
}
END_TEST

static Suite *store_suite(void)
{
    Suite *s = suite_create("store");
    TCase *tc = tcase_create("core");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_crc32c);
    tcase_add_test(tc, test_crc32c_paths_agree);
    tcase_add_test(tc, test_create_reopen);
    tcase_add_test(tc, test_hard_state);
    tcase_add_test(tc, test_borrow_entries);
    tcase_add_test(tc, test_append_truncate);
    tcase_add_test(tc, test_group_commit);
    tcase_add_test(tc, test_snapshot_install);
    tcase_add_test(tc, test_compaction);
    tcase_add_test(tc, test_corrupt_blob_sql);
    tcase_add_test(tc, test_corrupt_bytes_on_disk);
    tcase_add_test(tc, test_quick_check);
    tcase_add_test(tc, test_corrupt_contiguity);
    tcase_add_test(tc, test_corrupt_snapshot_gap);
    tcase_add_test(tc, test_formats);
    tcase_add_test(tc, test_fault_full);
    tcase_add_test(tc, test_fault_ioerr_write);
    tcase_add_test(tc, test_fault_ioerr_fsync);
    tcase_add_test(tc, test_backoff);
    suite_add_tcase(s, tc);
    TCase *crash = tcase_create("crash");
    tcase_set_timeout(crash, 240);
    tcase_add_test(crash, test_crash_safety);
    suite_add_tcase(s, crash);
    return s;
}

int main(void)
{
    log_set_level(LOG_LEVEL_WARNING);
    SRunner *sr = srunner_create(store_suite());
    srunner_run_all(sr, CK_ENV);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}

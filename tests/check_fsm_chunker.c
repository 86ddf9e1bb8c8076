/*
 * check_fsm_chunker.c: content-defined chunking (src/fsm/chunker):
 * determinism across feed patterns, size bounds, locality of an insertion,
 * empty and one-byte inputs, file descriptors, callback errors.
 */
#include "config.h"

#include <check.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fsm/chunker.h"
#include "lib/util.h"

struct list {
    struct fsm_chunk *v; /* data pointers are not kept */
    size_t n, cap;
    uint64_t total;
    int fail_at; /* return -ECANCELED at this chunk number (1-based), 0: never */
};

static int collect(void *arg, const struct fsm_chunk *c)
{
    struct list *l = arg;
    uint8_t id[FSM_CHUNK_ID_LEN];
    /* the id really is the SHA-256 of the bytes handed out */
    ck_assert_int_eq(fsm_sha256(c->data, c->len, id), 0);
    ck_assert_mem_eq(id, c->id, FSM_CHUNK_ID_LEN);
    ck_assert_uint_eq(c->offset, l->total);
    if (l->n == l->cap) {
        l->cap = l->cap ? 2 * l->cap : 64;
        l->v = pb_xreallocarray(l->v, l->cap, sizeof(*l->v));
    }
    l->v[l->n] = *c;
    l->v[l->n].data = NULL;
    l->n++;
    l->total += c->len;
    if (l->fail_at > 0 && (size_t)l->fail_at == l->n)
        return -ECANCELED;
    return 0;
}

static void list_free(struct list *l)
{
    free(l->v);
    memset(l, 0, sizeof(*l));
}

static uint8_t *random_bytes(size_t n, uint64_t seed)
{
    uint8_t *p = pb_xmalloc(n ? n : 1);
    uint64_t x = seed | 1;
    for (size_t i = 0; i < n; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        p[i] = (uint8_t)(x >> 24);
    }
    return p;
}

static void chunk_buffer(const uint8_t *p, size_t n, struct list *l)
{
    struct fsm_chunker c;
    fsm_chunker_init(&c, collect, l);
    ck_assert_int_eq(fsm_chunker_feed(&c, p, n), 0);
    ck_assert_int_eq(fsm_chunker_finish(&c), 0);
    fsm_chunker_free(&c);
}

static void assert_bounds(const struct list *l, size_t total)
{
    ck_assert_uint_eq(l->total, total);
    for (size_t i = 0; i < l->n; i++) {
        ck_assert_uint_le(l->v[i].len, FSM_CHUNK_MAX);
        ck_assert_uint_ge(l->v[i].len, 1);
        if (i + 1 < l->n)
            ck_assert_uint_ge(l->v[i].len, FSM_CHUNK_MIN);
    }
}

static bool contains(const struct list *l, const uint8_t *id)
{
    for (size_t i = 0; i < l->n; i++)
        if (memcmp(l->v[i].id, id, FSM_CHUNK_ID_LEN) == 0)
            return true;
    return false;
}

/* Chunks of a that b does not have. */
static size_t count_missing(const struct list *a, const struct list *b)
{
    size_t k = 0;
    for (size_t i = 0; i < a->n; i++)
        if (!contains(b, a->v[i].id))
            k++;
    return k;
}

START_TEST(test_chunk_empty_and_one_byte)
{
    struct list l = {0};
    chunk_buffer((const uint8_t *)"", 0, &l);
    ck_assert_uint_eq(l.n, 0);
    list_free(&l);

    chunk_buffer((const uint8_t *)"x", 1, &l);
    ck_assert_uint_eq(l.n, 1);
    ck_assert_uint_eq(l.v[0].len, 1);
    ck_assert_uint_eq(l.v[0].offset, 0);
    uint8_t id[FSM_CHUNK_ID_LEN];
    ck_assert_int_eq(fsm_sha256("x", 1, id), 0);
    ck_assert_mem_eq(l.v[0].id, id, FSM_CHUNK_ID_LEN);
    list_free(&l);

    /* exactly the minimum size and one byte less: one chunk each */
    uint8_t *p = random_bytes(FSM_CHUNK_MIN, 3);
    chunk_buffer(p, FSM_CHUNK_MIN, &l);
    ck_assert_uint_eq(l.n, 1);
    list_free(&l);
    chunk_buffer(p, FSM_CHUNK_MIN - 1, &l);
    ck_assert_uint_eq(l.n, 1);
    list_free(&l);
    free(p);
}
END_TEST

/* The same bytes fed in one piece, in 1-byte-to-7000-byte pieces, and in
 * FSM_CHUNK_MAX blocks (as fsm_propose_step reads a file) give the same
 * chunks. */
START_TEST(test_chunk_deterministic_across_feeds)
{
    size_t n = 8u << 20;
    uint8_t *p = random_bytes(n, 42);
    struct list a = {0}, b = {0}, c = {0};
    chunk_buffer(p, n, &a);
    assert_bounds(&a, n);

    struct fsm_chunker ch;
    fsm_chunker_init(&ch, collect, &b);
    uint64_t x = 7;
    for (size_t off = 0; off < n;) {
        x = x * 6364136223846793005ULL + 1442695040888963407ULL;
        size_t k = PB_MIN(n - off, 1 + (size_t)(x >> 33) % 7000);
        ck_assert_int_eq(fsm_chunker_feed(&ch, p + off, k), 0);
        off += k;
    }
    ck_assert_int_eq(fsm_chunker_finish(&ch), 0);
    /* the chunker is reusable after finish */
    struct list again = {0};
    ch.arg = &again;
    ck_assert_int_eq(fsm_chunker_feed(&ch, p, 100000), 0);
    ck_assert_int_eq(fsm_chunker_finish(&ch), 0);
    ck_assert_uint_eq(again.total, 100000);
    ck_assert_mem_eq(again.v[0].id, a.v[0].id, FSM_CHUNK_ID_LEN);
    fsm_chunker_free(&ch);

    fsm_chunker_init(&ch, collect, &c);
    for (size_t off = 0; off < n; off += FSM_CHUNK_MAX)
        ck_assert_int_eq(fsm_chunker_feed(&ch, p + off, PB_MIN(n - off, FSM_CHUNK_MAX)), 0);
    ck_assert_int_eq(fsm_chunker_finish(&ch), 0);
    fsm_chunker_free(&ch);

    ck_assert_uint_eq(a.n, b.n);
    ck_assert_uint_eq(a.n, c.n);
    for (size_t i = 0; i < a.n; i++) {
        ck_assert_uint_eq(a.v[i].len, b.v[i].len);
        ck_assert_mem_eq(a.v[i].id, b.v[i].id, FSM_CHUNK_ID_LEN);
        ck_assert_mem_eq(a.v[i].id, c.v[i].id, FSM_CHUNK_ID_LEN);
    }
    /* average size near the target (64 KiB): a sanity band */
    double avg = (double)n / (double)a.n;
    ck_assert_msg(avg > 40 * 1024 && avg < 110 * 1024, "average chunk %.0f bytes", avg);
    list_free(&a);
    list_free(&b);
    list_free(&c);
    list_free(&again);
    free(p);
}
END_TEST

/* Inserting 10 bytes in the middle of a large buffer changes 1 or 2 chunks;
 * all others are shared. Checked at several positions. */
START_TEST(test_chunk_insertion_is_local)
{
    size_t n = 16u << 20;
    uint8_t *p = random_bytes(n, 1234);
    uint8_t *q = pb_xmalloc(n + 10);
    struct list a = {0};
    chunk_buffer(p, n, &a);
    static const double where[] = {0.5, 0.25, 0.61803, 0.9, 0.0001};
    for (size_t w = 0; w < PB_ARRAY_SIZE(where); w++) {
        size_t at = (size_t)((double)n * where[w]);
        memcpy(q, p, at);
        memcpy(q + at, "0123456789", 10);
        memcpy(q + at + 10, p + at, n - at);
        struct list b = {0};
        chunk_buffer(q, n + 10, &b);
        assert_bounds(&b, n + 10);
        size_t added = count_missing(&b, &a), lost = count_missing(&a, &b);
        ck_assert_msg(added >= 1 && added <= 2, "insert at %zu: %zu new chunks", at, added);
        ck_assert_msg(lost >= 1 && lost <= 2, "insert at %zu: %zu chunks gone", at, lost);
        list_free(&b);
    }
    list_free(&a);
    free(p);
    free(q);
}
END_TEST

/* Data without cut points (all zeros) is cut at the maximum size. */
START_TEST(test_chunk_max_bound)
{
    size_t n = 3 * FSM_CHUNK_MAX + 5;
    uint8_t *p = pb_xcalloc(1, n);
    struct list l = {0};
    chunk_buffer(p, n, &l);
    assert_bounds(&l, n);
    ck_assert_uint_ge(l.n, 4);
    list_free(&l);
    free(p);
}
END_TEST

START_TEST(test_chunk_callback_error)
{
    size_t n = 2u << 20;
    uint8_t *p = random_bytes(n, 9);
    struct list l = {0};
    l.fail_at = 2;
    struct fsm_chunker c;
    fsm_chunker_init(&c, collect, &l);
    ck_assert_int_eq(fsm_chunker_feed(&c, p, n), -ECANCELED);
    ck_assert_uint_eq(l.n, 2);
    fsm_chunker_free(&c);
    list_free(&l);
    free(p);
}
END_TEST

static Suite *fsm_chunker_suite(void)
{
    Suite *s = suite_create("fsm_chunker");
    TCase *tc = tcase_create("chunker");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_chunk_empty_and_one_byte);
    tcase_add_test(tc, test_chunk_deterministic_across_feeds);
    tcase_add_test(tc, test_chunk_insertion_is_local);
    tcase_add_test(tc, test_chunk_max_bound);
    tcase_add_test(tc, test_chunk_callback_error);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(fsm_chunker_suite());
    srunner_run_all(sr, CK_ENV);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}

/*
 * check_raft.c: regression tests for src/raft, one per bug class.
 *
 * Two harnesses: a tiny hand-driven network over bare cores (struct tc,
 * every message delivered, dropped or rewritten explicitly) for exact
 * interleavings such as Figure 8, and the simulator fixture (tests/sim) with
 * chaos off for scenarios that need time, partitions and crashes.
 */
#include "config.h"

#include <check.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "lib/buf.h"
#include "lib/util.h"
#include "raft/raft.h"
#include "sim/sim.h"

/* ------------------------------------------------------------ harness */

#define TC_MAX 6
#define TC_Q   4096

struct tc {
    struct raft *r[TC_MAX + 1]; /* by id */
    unsigned n;
    struct raft_msg q[TC_Q];
    size_t nq;
    struct raft_ready last[TC_MAX + 1]; /* summary of the last ready per node */
    /* something other than leader replication left before the persist */
    bool early_violation;
    uint64_t read_ctx[TC_MAX + 1]; /* last ReadIndex result per node */
    uint64_t read_index[TC_MAX + 1];
};

static uint8_t *dup_bytes(const void *p, size_t n)
{
    if (n == 0 || p == NULL)
        return NULL;
    uint8_t *d = pb_xmalloc(n);
    memcpy(d, p, n);
    return d;
}

static void msg_copy(struct raft_msg *d, const struct raft_msg *m)
{
    *d = *m;
    d->entries = NULL;
    if (m->n_entries) {
        d->entries = pb_xcalloc(m->n_entries, sizeof(*d->entries));
        for (size_t i = 0; i < m->n_entries; i++) {
            d->entries[i] = m->entries[i];
            d->entries[i].data = dup_bytes(m->entries[i].data, m->entries[i].len);
        }
    }
    d->snap.conf = dup_bytes(m->snap.conf, m->snap.conf_len);
    d->data = dup_bytes(m->data, m->len);
}

static void msg_release(struct raft_msg *m)
{
    for (size_t i = 0; i < m->n_entries; i++)
        free(m->entries[i].data);
    free(m->entries);
    free((void *)(uintptr_t)m->snap.conf);
    free((void *)(uintptr_t)m->data);
}

static struct raft_config tc_cfg(uint64_t id)
{
    struct raft_config cfg;
    raft_config_init(&cfg, id);
    cfg.seed = id * 7919;
    cfg.max_msg_bytes = 1; /* one entry per append: exact control */
    return cfg;
}

static struct raft_conf conf_of(unsigned voters)
{
    struct raft_conf c;
    memset(&c, 0, sizeof(c));
    for (unsigned i = 0; i < voters; i++) {
        c.members[i].id = i + 1;
        c.members[i].role = RAFT_VOTER;
    }
    c.n = voters;
    return c;
}

/* A node restored from a crafted disk: entry 1 is the configuration of
 * voters, entry i (i >= 2) has term terms[i - 2]. */
static struct raft *tc_restore(struct tc *c, uint64_t id, unsigned voters, uint64_t term,
                               uint64_t vote, const uint64_t *terms, size_t n, uint64_t commit)
{
    struct raft_config cfg = tc_cfg(id);
    struct raft *r = raft_new(&cfg);
    struct raft_conf conf = conf_of(voters);
    struct raft_entry ents[32];
    uint8_t *enc;
    size_t len;
    ck_assert_int_eq(raft_conf_encode(&conf, &enc, &len), 0);
    memset(ents, 0, sizeof(ents));
    ents[0] = (struct raft_entry){
            .term = 1, .index = 1, .type = RAFT_ENTRY_CONF, .data = enc, .len = len};
    for (size_t i = 0; i < n; i++)
        ents[i + 1] = (struct raft_entry){.term = terms[i], .index = i + 2, .data = NULL};
    struct raft_restore_state st = {
            .hs = {.term = term, .vote = vote, .commit = commit},
            .entries = ents,
            .n_entries = n + 1,
            .applied = commit,
    };
    ck_assert_int_eq(raft_restore(r, &st), 0);
    free(enc);
    c->r[id] = r;
    if (id > c->n)
        c->n = (unsigned)id;
    return r;
}

static void tc_bootstrap(struct tc *c, unsigned voters)
{
    struct raft_conf conf = conf_of(voters);
    for (unsigned id = 1; id <= voters; id++) {
        struct raft_config cfg = tc_cfg(id);
        cfg.max_msg_bytes = 1 << 20;
        c->r[id] = raft_new(&cfg);
        ck_assert_int_eq(raft_bootstrap(c->r[id], &conf), 0);
    }
    c->n = voters;
}

static void tc_free(struct tc *c)
{
    ck_assert(!c->early_violation);
    for (unsigned i = 0; i <= TC_MAX; i++)
        raft_free(c->r[i]);
    for (size_t i = 0; i < c->nq; i++)
        msg_release(&c->q[i]);
}

/* Runs ready/advance on a node (a perfect, instant disk) and queues its
 * messages. */
static void tc_flush(struct tc *c, uint64_t id)
{
    struct raft_ready rd;
    if (c->r[id] == NULL)
        return;
    while (raft_ready(c->r[id], &rd)) {
        for (size_t i = 0; i < rd.n_msgs; i++) {
            uint8_t t = rd.msgs[i].type;
            if (t != RAFT_MSG_APP && t != RAFT_MSG_HEARTBEAT && t != RAFT_MSG_SNAP &&
                t != RAFT_MSG_TIMEOUT_NOW)
                c->early_violation = true;
            ck_assert_uint_lt(c->nq, TC_Q);
            msg_copy(&c->q[c->nq++], &rd.msgs[i]);
        }
        for (size_t i = 0; i < rd.n_msgs_after_persist; i++) {
            ck_assert_uint_lt(c->nq, TC_Q);
            msg_copy(&c->q[c->nq++], &rd.msgs_after_persist[i]);
        }
        c->last[id] = rd; /* only counts are used: pointers die at advance */
        if (rd.n_reads > 0) {
            c->read_ctx[id] = rd.reads[rd.n_reads - 1].ctx;
            c->read_index[id] = rd.reads[rd.n_reads - 1].index;
        }
        raft_advance(c->r[id], &rd);
    }
}

static void tc_flush_all(struct tc *c)
{
    for (unsigned id = 1; id <= c->n; id++)
        tc_flush(c, id);
}

/* Delivers queued messages matching (from, to, type), 0 = any; others stay. */
static size_t tc_deliver(struct tc *c, uint64_t from, uint64_t to, uint8_t type)
{
    size_t delivered = 0;
    struct raft_msg *batch = pb_xcalloc(TC_Q, sizeof(*batch));
    size_t nb = 0, k = 0;
    for (size_t i = 0; i < c->nq; i++) {
        struct raft_msg *m = &c->q[i];
        if ((from == 0 || m->from == from) && (to == 0 || m->to == to) &&
            (type == 0 || m->type == type))
            batch[nb++] = *m;
        else
            c->q[k++] = *m;
    }
    c->nq = k;
    for (size_t i = 0; i < nb; i++) {
        if (batch[i].to <= TC_MAX && c->r[batch[i].to] != NULL) {
            /* the messages own copies of everything, as decoded ones do */
            raft_step_take(c->r[batch[i].to], &batch[i]);
            delivered++;
        }
        msg_release(&batch[i]);
    }
    free(batch);
    tc_flush_all(c);
    return delivered;
}

static void tc_drop(struct tc *c, uint64_t from, uint64_t to)
{
    size_t k = 0;
    for (size_t i = 0; i < c->nq; i++) {
        struct raft_msg *m = &c->q[i];
        if ((from == 0 || m->from == from) && (to == 0 || m->to == to))
            msg_release(m);
        else
            c->q[k++] = *m;
    }
    c->nq = k;
}

static void tc_tick(struct tc *c, uint64_t id)
{
    ck_assert_int_eq(raft_tick(c->r[id]), 0);
    tc_flush(c, id);
}

/* Ticks id until it starts a (pre-)campaign. */
static void tc_campaign(struct tc *c, uint64_t id)
{
    for (int i = 0; i < 40 && raft_role(c->r[id]) == RAFT_FOLLOWER; i++)
        tc_tick(c, id);
    ck_assert_int_ne(raft_role(c->r[id]), RAFT_FOLLOWER);
}

static uint64_t tc_commit(struct tc *c, uint64_t id)
{
    struct raft_status st;
    raft_status(c->r[id], &st);
    return st.commit;
}

static uint64_t tc_last(struct tc *c, uint64_t id)
{
    struct raft_status st;
    raft_status(c->r[id], &st);
    return st.last_index;
}

/* Everyone talks to everyone for a while. */
static void tc_run(struct tc *c, unsigned ticks)
{
    for (unsigned t = 0; t < ticks; t++) {
        for (unsigned id = 1; id <= c->n; id++)
            if (c->r[id])
                tc_tick(c, id);
        for (int round = 0; round < 10 && c->nq > 0; round++)
            tc_deliver(c, 0, 0, 0);
    }
}

static uint64_t tc_leader(struct tc *c)
{
    uint64_t l = 0;
    for (unsigned id = 1; id <= c->n; id++)
        if (c->r[id] && raft_role(c->r[id]) == RAFT_LEADER)
            l = id;
    return l;
}

/* ------------------------------------------------------------ tests */

/* Cuts queued appends before their first entry of term (it got "lost"). */
static void strip_term(struct tc *c, uint64_t term)
{
    for (size_t k = 0; k < c->nq; k++) {
        struct raft_msg *m = &c->q[k];
        if (m->type != RAFT_MSG_APP)
            continue;
        for (size_t i = 0; i < m->n_entries; i++) {
            if (m->entries[i].term != term)
                continue;
            for (size_t j = i; j < m->n_entries; j++)
                free(m->entries[j].data);
            m->n_entries = i;
            break;
        }
    }
}

/* §5.4.2, Figure 8: a leader must not commit an entry of an older term by
 * counting replicas, because a node holding a later-term entry at that index
 * can still be elected and overwrite it. */
START_TEST(test_figure8)
{
    struct tc c;
    memset(&c, 0, sizeof(c));
    const uint64_t t2[] = {2}, t3[] = {3};
    /* (a)-(b): S1 wrote index 2 in term 2 to S2; S5 wrote index 2 in term 3. */
    tc_restore(&c, 1, 5, 3, 0, t2, 1, 1);
    tc_restore(&c, 2, 5, 3, 0, t2, 1, 1);
    tc_restore(&c, 3, 5, 3, 0, NULL, 0, 1);
    tc_restore(&c, 4, 5, 3, 0, NULL, 0, 1);
    tc_restore(&c, 5, 5, 3, 5, t3, 1, 1);
    /* (c): S1 is elected in term 4 with S2 and S3. */
    tc_campaign(&c, 1);
    tc_drop(&c, 1, 4);
    tc_drop(&c, 1, 5);
    tc_deliver(&c, 1, 2, RAFT_MSG_PREVOTE);
    tc_deliver(&c, 1, 3, RAFT_MSG_PREVOTE);
    tc_deliver(&c, 0, 1, RAFT_MSG_PREVOTE_RESP);
    tc_drop(&c, 1, 4);
    tc_drop(&c, 1, 5);
    tc_deliver(&c, 1, 2, RAFT_MSG_VOTE);
    tc_deliver(&c, 1, 3, RAFT_MSG_VOTE);
    tc_deliver(&c, 0, 1, RAFT_MSG_VOTE_RESP);
    ck_assert_int_eq(raft_role(c.r[1]), RAFT_LEADER);
    ck_assert_uint_eq(raft_term(c.r[1]), 4);
    /* S1 replicates its term-2 entry to S3 (one entry per message), but the
     * term-4 no-op reaches nobody: it is stripped from every append. */
    for (int i = 0; i < 8; i++) {
        tc_tick(&c, 1);
        tc_drop(&c, 1, 4);
        tc_drop(&c, 1, 5);
        strip_term(&c, 4);
        tc_deliver(&c, 1, 2, 0);
        strip_term(&c, 4);
        tc_deliver(&c, 1, 3, 0);
        tc_deliver(&c, 2, 1, 0);
        strip_term(&c, 4);
        tc_deliver(&c, 3, 1, 0);
        strip_term(&c, 4);
    }
    ck_assert_int_eq(raft_role(c.r[1]), RAFT_LEADER);
    ck_assert_uint_eq(tc_last(&c, 3), 2);
    ck_assert_uint_eq(raft_entry_at(c.r[3], 2)->term, 2);
    /* Index 2 (term 2) is on S1, S2, S3: a majority, but not committable. */
    ck_assert_uint_eq(tc_commit(&c, 1), 1);
    /* (d): S1 crashes; S5 (last term 3) wins with S2, S3, S4 and overwrites. */
    raft_free(c.r[1]);
    c.r[1] = NULL;
    tc_drop(&c, 0, 0);
    /* the others notice the leader is gone (their own campaigns are lost) */
    for (int i = 0; i < 10; i++) {
        for (uint64_t id = 2; id <= 4; id++)
            tc_tick(&c, id);
        tc_drop(&c, 0, 0);
    }
    for (int round = 0; round < 3 && raft_role(c.r[5]) != RAFT_LEADER; round++) {
        tc_campaign(&c, 5);
        for (int i = 0; i < 6; i++)
            tc_deliver(&c, 0, 0, 0);
    }
    ck_assert_int_eq(raft_role(c.r[5]), RAFT_LEADER);
    tc_run(&c, 5);
    ck_assert_uint_eq(raft_entry_at(c.r[3], 2)->term, 3);
    ck_assert_uint_eq(raft_entry_at(c.r[2], 2)->term, 3);
    ck_assert_uint_ge(tc_commit(&c, 5), 2);
    tc_free(&c);
}
END_TEST

/* Once the current-term no-op reaches a majority, both commit together. */
START_TEST(test_commit_with_current_term_entry)
{
    struct tc c;
    memset(&c, 0, sizeof(c));
    const uint64_t t2[] = {2};
    tc_restore(&c, 1, 3, 3, 0, t2, 1, 1);
    tc_restore(&c, 2, 3, 3, 0, NULL, 0, 1);
    tc_restore(&c, 3, 3, 3, 0, NULL, 0, 1);
    tc_campaign(&c, 1);
    for (int i = 0; i < 4 && raft_role(c.r[1]) != RAFT_LEADER; i++)
        tc_deliver(&c, 0, 0, 0);
    ck_assert_int_eq(raft_role(c.r[1]), RAFT_LEADER);
    /* dissertation errata: no configuration change before an entry of the
     * leader's term committed */
    ck_assert_uint_lt(tc_commit(&c, 1), 3);
    int rc = raft_change_conf(c.r[1], RAFT_CONF_ADD_LEARNER, 9, NULL, 0);
    ck_assert(rc == -EAGAIN || rc == -EBUSY);
    ck_assert_int_eq(raft_read_index(c.r[1], 1), -EAGAIN);
    for (int i = 0; i < 10; i++)
        tc_deliver(&c, 0, 0, 0);
    ck_assert_uint_eq(tc_commit(&c, 1), 3);
    ck_assert_int_eq(raft_change_conf(c.r[1], RAFT_CONF_ADD_LEARNER, 9, "ctx", 3), 0);
    ck_assert_int_eq(raft_conf_find(raft_conf(c.r[1]), 9)->role, RAFT_LEARNER);
    ck_assert_uint_eq(tc_commit(&c, 2), 3);
    tc_free(&c);
}
END_TEST

/* Dissertation errata: even with every earlier entry committed, a new leader
 * changes the configuration only after its own no-op committed. */
START_TEST(test_conf_change_waits_for_term_commit)
{
    struct tc c;
    memset(&c, 0, sizeof(c));
    const uint64_t t2[] = {2};
    for (uint64_t id = 1; id <= 3; id++)
        tc_restore(&c, id, 3, 3, 0, t2, 1, 2);
    tc_campaign(&c, 1);
    for (int i = 0; i < 4 && raft_role(c.r[1]) != RAFT_LEADER; i++) {
        tc_deliver(&c, 0, 0, RAFT_MSG_PREVOTE);
        tc_deliver(&c, 0, 0, RAFT_MSG_PREVOTE_RESP);
        tc_deliver(&c, 0, 0, RAFT_MSG_VOTE);
        tc_deliver(&c, 0, 0, RAFT_MSG_VOTE_RESP);
    }
    ck_assert_int_eq(raft_role(c.r[1]), RAFT_LEADER);
    ck_assert_uint_eq(tc_commit(&c, 1), 2);
    ck_assert_int_eq(raft_change_conf(c.r[1], RAFT_CONF_REMOVE, 3, NULL, 0), -EAGAIN);
    for (int i = 0; i < 6; i++)
        tc_deliver(&c, 0, 0, 0);
    ck_assert_uint_eq(tc_commit(&c, 1), 3);
    ck_assert_int_eq(raft_change_conf(c.r[1], RAFT_CONF_REMOVE, 3, NULL, 0), 0);
    tc_free(&c);
}
END_TEST

/* A vote is sent only after the hard state holding it was persisted, and
 * term and vote travel in one hard state record. */
START_TEST(test_vote_persisted_before_sent)
{
    struct tc c;
    memset(&c, 0, sizeof(c));
    tc_restore(&c, 1, 3, 1, 0, NULL, 0, 1);
    tc_restore(&c, 2, 3, 1, 0, NULL, 0, 1);
    struct raft_msg v = {
            .type = RAFT_MSG_VOTE, .from = 1, .to = 2, .term = 5, .index = 1, .log_term = 1};
    ck_assert_int_eq(raft_step(c.r[2], &v), 0);
    struct raft_ready rd;
    ck_assert(raft_ready(c.r[2], &rd));
    ck_assert(rd.hs_changed);
    ck_assert(rd.must_sync);
    ck_assert_uint_eq(rd.hs.term, 5);
    ck_assert_uint_eq(rd.hs.vote, 1);
    ck_assert_uint_eq(rd.n_msgs, 0); /* nothing may leave before the persist */
    ck_assert_uint_eq(rd.n_msgs_after_persist, 1);
    ck_assert_int_eq(rd.msgs_after_persist[0].type, RAFT_MSG_VOTE_RESP);
    ck_assert(!rd.msgs_after_persist[0].reject);
    /* Frozen until advance. */
    ck_assert_int_eq(raft_step(c.r[2], &v), -EBUSY);
    ck_assert_int_eq(raft_tick(c.r[2]), -EBUSY);
    /* Crash before the persist completed: restart from the old disk. The
     * vote never left, so voting for another candidate is allowed. */
    raft_free(c.r[2]);
    c.r[2] = NULL;
    tc_restore(&c, 2, 3, 1, 0, NULL, 0, 1);
    struct raft_msg v3 = v;
    v3.from = 3;
    ck_assert_int_eq(raft_step(c.r[2], &v3), 0);
    ck_assert(raft_ready(c.r[2], &rd));
    ck_assert_uint_eq(rd.hs.vote, 3);
    raft_advance(c.r[2], &rd);
    /* Having persisted a vote for 3 in term 5, 1 is refused in term 5. */
    ck_assert_int_eq(raft_step(c.r[2], &v), 0);
    ck_assert(raft_ready(c.r[2], &rd));
    ck_assert_uint_eq(rd.n_msgs_after_persist, 1);
    ck_assert(rd.msgs_after_persist[0].reject);
    raft_advance(c.r[2], &rd);
    /* A candidate's own vote requests also wait for the persist. */
    struct tc d;
    memset(&d, 0, sizeof(d));
    tc_restore(&d, 1, 3, 1, 0, NULL, 0, 1);
    struct raft_msg tn = {.type = RAFT_MSG_TIMEOUT_NOW, .from = 2, .to = 1, .term = 1};
    raft_step(d.r[1], &tn);
    ck_assert_int_eq(raft_role(d.r[1]), RAFT_CANDIDATE);
    ck_assert(raft_ready(d.r[1], &rd));
    ck_assert_uint_eq(rd.n_msgs, 0);
    ck_assert_uint_eq(rd.n_msgs_after_persist, 2);
    ck_assert_uint_eq(rd.hs.term, 2);
    ck_assert_uint_eq(rd.hs.vote, 1);
    raft_advance(d.r[1], &rd);
    tc_free(&d);
    tc_free(&c);
}
END_TEST

/* A failed persist: nothing that depended on it leaves, the next ready
 * retries the same state, and a leader steps down. */
START_TEST(test_persist_failed)
{
    struct tc c;
    memset(&c, 0, sizeof(c));
    tc_restore(&c, 2, 3, 1, 0, NULL, 0, 1);
    struct raft_entry e2 = {.term = 5, .index = 2, .data = (uint8_t *)"x", .len = 1};
    struct raft_msg app = {.type = RAFT_MSG_APP,
                           .from = 1,
                           .to = 2,
                           .term = 5,
                           .index = 1,
                           .log_term = 1,
                           .entries = &e2,
                           .n_entries = 1,
                           .commit = 2};
    raft_step(c.r[2], &app);
    struct raft_ready rd;
    ck_assert(raft_ready(c.r[2], &rd));
    ck_assert_uint_eq(rd.n_entries, 1);
    ck_assert_uint_eq(rd.n_msgs_after_persist, 1);
    ck_assert_uint_eq(rd.n_committed, 1);
    raft_persist_failed(c.r[2], &rd);
    ck_assert(raft_ready(c.r[2], &rd)); /* the same state, again */
    ck_assert(rd.hs_changed);
    ck_assert_uint_eq(rd.hs.term, 5);
    ck_assert_uint_eq(rd.n_entries, 1);
    ck_assert_uint_eq(rd.entries[0].index, 2);
    ck_assert_uint_eq(rd.n_msgs_after_persist, 0); /* that ack is gone for good */
    ck_assert_uint_eq(rd.n_committed, 1);
    raft_advance(c.r[2], &rd);
    ck_assert(!raft_ready(c.r[2], &rd));
    tc_free(&c);

    memset(&c, 0, sizeof(c));
    tc_bootstrap(&c, 3);
    tc_run(&c, 30);
    uint64_t l = tc_leader(&c);
    ck_assert_uint_ne(l, 0);
    ck_assert_int_eq(raft_propose(c.r[l], 1, 1, "y", 1, NULL), 0);
    ck_assert(raft_ready(c.r[l], &rd));
    raft_persist_failed(c.r[l], &rd);
    ck_assert_int_eq(raft_role(c.r[l]), RAFT_FOLLOWER);
    ck_assert(raft_ready(c.r[l], &rd));
    ck_assert_uint_eq(rd.n_entries, 1);
    raft_advance(c.r[l], &rd);
    raft_persist_failed(c.r[l], &rd); /* not frozen: ignored */
    tc_free(&c);
}
END_TEST

/* Pre-vote + check-quorum liveness (etcd #8501 class): a node with a higher
 * term but a stale log must not keep the others from electing a leader. */
START_TEST(test_prevote_checkquorum_liveness)
{
    struct tc c;
    memset(&c, 0, sizeof(c));
    const uint64_t l2[] = {2, 2, 2};
    tc_restore(&c, 1, 3, 2, 0, l2, 3, 1);
    tc_restore(&c, 2, 3, 2, 0, l2, 3, 1);
    tc_restore(&c, 3, 3, 7, 3, NULL, 0, 1);
    tc_run(&c, 100);
    uint64_t l = tc_leader(&c);
    ck_assert(l == 1 || l == 2);
    ck_assert_uint_gt(raft_term(c.r[l]), 7);
    /* and the stale node follows it */
    ck_assert_uint_eq(raft_leader(c.r[3]), l);
    ck_assert_uint_eq(tc_commit(&c, 3), tc_last(&c, l));
    tc_free(&c);
}
END_TEST

/* Responses from an older term are ignored, and acknowledgements queued
 * before a term change or a truncation are never sent. */
START_TEST(test_stale_responses_after_term_change)
{
    struct tc c;
    memset(&c, 0, sizeof(c));
    tc_bootstrap(&c, 3);
    tc_run(&c, 30);
    uint64_t l = tc_leader(&c);
    ck_assert_uint_ne(l, 0);
    uint64_t term = raft_term(c.r[l]);
    uint64_t f = l == 1 ? 2 : 1;
    uint64_t commit = tc_commit(&c, l);
    /* A stale acknowledgement claiming far more than exists. */
    struct raft_msg ack = {
            .type = RAFT_MSG_APP_RESP, .from = f, .to = l, .term = term - 1, .index = 1000};
    raft_step(c.r[l], &ack);
    ck_assert_uint_eq(tc_commit(&c, l), commit);
    ck_assert_int_eq(raft_role(c.r[l]), RAFT_LEADER);
    /* A stale vote response does not make a candidate win. */
    struct tc d;
    memset(&d, 0, sizeof(d));
    tc_restore(&d, 1, 3, 4, 0, NULL, 0, 1);
    tc_campaign(&d, 1);
    ck_assert_int_eq(raft_role(d.r[1]), RAFT_PRE_CANDIDATE);
    for (uint64_t from = 2; from <= 3; from++) {
        struct raft_msg vr = {.type = RAFT_MSG_PREVOTE_RESP, .from = from, .to = 1, .term = 3};
        raft_step(d.r[1], &vr);
    }
    ck_assert_int_eq(raft_role(d.r[1]), RAFT_PRE_CANDIDATE);
    /* Follower: an ack for term 2 queued, then a term-3 leader truncates
     * that entry in the same batch: only the term-3 ack may leave. */
    struct tc e;
    memset(&e, 0, sizeof(e));
    tc_restore(&e, 2, 3, 2, 0, NULL, 0, 1);
    struct raft_entry e2 = {.term = 2, .index = 2};
    struct raft_msg a2 = {.type = RAFT_MSG_APP,
                          .from = 1,
                          .to = 2,
                          .term = 2,
                          .index = 1,
                          .log_term = 1,
                          .entries = &e2,
                          .n_entries = 1,
                          .commit = 1};
    raft_step(e.r[2], &a2);
    struct raft_entry e3 = {.term = 3, .index = 2};
    struct raft_msg a3 = {.type = RAFT_MSG_APP,
                          .from = 3,
                          .to = 2,
                          .term = 3,
                          .index = 1,
                          .log_term = 1,
                          .entries = &e3,
                          .n_entries = 1,
                          .commit = 1};
    raft_step(e.r[2], &a3);
    struct raft_ready rd;
    ck_assert(raft_ready(e.r[2], &rd));
    ck_assert_uint_eq(rd.n_entries, 1);
    ck_assert_uint_eq(rd.entries[0].term, 3);
    ck_assert_uint_eq(rd.n_msgs_after_persist, 1);
    ck_assert_uint_eq(rd.msgs_after_persist[0].term, 3);
    ck_assert_uint_eq(rd.msgs_after_persist[0].to, 3);
    raft_advance(e.r[2], &rd);
    tc_free(&e);
    tc_free(&d);
    tc_free(&c);
}
END_TEST

static struct raft_msg snap_msg(uint64_t index, uint64_t term, const uint8_t *conf, size_t conf_len,
                                const uint8_t *data, size_t len)
{
    struct raft_msg m = {.type = RAFT_MSG_SNAP,
                         .from = 1,
                         .to = 2,
                         .term = 3,
                         .index = index,
                         .log_term = term,
                         .offset = 0,
                         .data = data,
                         .len = len,
                         .flags = RAFT_MSG_FLAG_DONE};
    m.snap.index = index;
    m.snap.term = term;
    m.snap.size = len;
    m.snap.conf = conf;
    m.snap.conf_len = conf_len;
    return m;
}

/* Figure 13 rules 6-7: a snapshot whose last entry conflicts with the log
 * discards the whole log; one that matches keeps the suffix. */
START_TEST(test_snapshot_onto_conflicting_log)
{
    struct raft_conf conf = conf_of(3);
    uint8_t *enc;
    size_t enc_len;
    ck_assert_int_eq(raft_conf_encode(&conf, &enc, &enc_len), 0);
    const uint8_t data[] = "state-machine-bytes";
    const uint64_t terms[] = {2, 2, 2, 2};
    struct raft_ready rd;
    struct raft_status st;

    struct tc c;
    memset(&c, 0, sizeof(c));
    tc_restore(&c, 2, 3, 3, 0, terms, 4, 1);
    struct raft_msg m = snap_msg(3, 3, enc, enc_len, data, sizeof(data));
    raft_step(c.r[2], &m);
    ck_assert(raft_ready(c.r[2], &rd));
    ck_assert_ptr_nonnull(rd.chunk);
    ck_assert_uint_eq(rd.chunk->len, sizeof(data));
    ck_assert_mem_eq(rd.chunk->data, data, sizeof(data));
    ck_assert_ptr_nonnull(rd.snapshot);
    ck_assert_uint_eq(rd.snapshot->index, 3);
    ck_assert(!rd.snapshot_keep_log);
    raft_advance(c.r[2], &rd);
    raft_status(c.r[2], &st);
    ck_assert_uint_eq(st.last_index, 3);
    ck_assert_uint_eq(st.commit, 3);
    ck_assert_uint_eq(st.applied, 3);
    ck_assert_uint_eq(st.snapshot_index, 3);
    ck_assert_ptr_null(raft_entry_at(c.r[2], 4));
    tc_free(&c);

    /* matching: index 3 term 2 is ours, entries 4..5 stay */
    memset(&c, 0, sizeof(c));
    tc_restore(&c, 2, 3, 3, 0, terms, 4, 1);
    m = snap_msg(3, 2, enc, enc_len, data, sizeof(data));
    raft_step(c.r[2], &m);
    ck_assert(raft_ready(c.r[2], &rd));
    ck_assert_ptr_nonnull(rd.snapshot);
    ck_assert(rd.snapshot_keep_log);
    raft_advance(c.r[2], &rd);
    raft_status(c.r[2], &st);
    ck_assert_uint_eq(st.last_index, 5);
    ck_assert_uint_eq(st.first_index, 4);
    tc_free(&c);

    /* chunked and resumable: a chunk after a gap is refused with our offset */
    memset(&c, 0, sizeof(c));
    tc_restore(&c, 2, 3, 3, 0, NULL, 0, 1);
    m = snap_msg(9, 3, enc, enc_len, data, 5);
    m.snap.size = sizeof(data);
    m.flags = 0;
    raft_step(c.r[2], &m);
    ck_assert(raft_ready(c.r[2], &rd));
    ck_assert_ptr_null(rd.snapshot);
    ck_assert_uint_eq(rd.msgs_after_persist[0].offset, 5);
    raft_advance(c.r[2], &rd);
    m.offset = 10;
    m.data = data + 10;
    raft_step(c.r[2], &m);
    ck_assert(raft_ready(c.r[2], &rd));
    ck_assert_ptr_null(rd.chunk);
    ck_assert(rd.msgs_after_persist[0].reject);
    ck_assert_uint_eq(rd.msgs_after_persist[0].offset, 5);
    raft_advance(c.r[2], &rd);
    m.offset = 5;
    m.data = data + 5;
    m.len = sizeof(data) - 5;
    m.flags = RAFT_MSG_FLAG_DONE;
    raft_step(c.r[2], &m);
    ck_assert(raft_ready(c.r[2], &rd));
    ck_assert_ptr_nonnull(rd.chunk);
    ck_assert_uint_eq(rd.chunk->offset, 5);
    ck_assert_ptr_nonnull(rd.snapshot);
    raft_advance(c.r[2], &rd);
    tc_free(&c);
    free(enc);
}
END_TEST

/* A duplicated or reordered (older) append never truncates a log that
 * matches it. */
START_TEST(test_duplicate_append_keeps_log)
{
    struct tc c;
    memset(&c, 0, sizeof(c));
    tc_restore(&c, 2, 3, 2, 0, NULL, 0, 1);
    struct raft_entry ents[3] = {
            {.term = 2, .index = 2}, {.term = 2, .index = 3}, {.term = 2, .index = 4}};
    struct raft_msg full = {.type = RAFT_MSG_APP,
                            .from = 1,
                            .to = 2,
                            .term = 2,
                            .index = 1,
                            .log_term = 1,
                            .entries = ents,
                            .n_entries = 3,
                            .commit = 1};
    raft_step(c.r[2], &full);
    tc_flush(&c, 2);
    ck_assert_uint_eq(tc_last(&c, 2), 4);
    struct raft_msg old = full;
    old.n_entries = 1;
    raft_step(c.r[2], &old);
    tc_flush(&c, 2);
    ck_assert_uint_eq(tc_last(&c, 2), 4);
    ck_assert_uint_eq(c.last[2].n_entries, 0); /* nothing rewritten on disk */
    raft_step(c.r[2], &full);
    tc_flush(&c, 2);
    ck_assert_uint_eq(tc_last(&c, 2), 4);
    /* a heartbeat may not commit past what we hold */
    struct raft_msg hb = {.type = RAFT_MSG_HEARTBEAT, .from = 1, .to = 2, .term = 2, .commit = 99};
    raft_step(c.r[2], &hb);
    tc_flush(&c, 2);
    ck_assert_uint_eq(tc_commit(&c, 2), 4);
    tc_free(&c);
}
END_TEST

/* raft_step_take(): the bytes of entries the log keeps are moved out of the
 * message (not copied); entries it already holds are left to the caller. */
START_TEST(test_step_take_moves_entry_bytes)
{
    struct tc c;
    memset(&c, 0, sizeof(c));
    tc_restore(&c, 2, 3, 2, 0, NULL, 0, 1);
    struct raft_entry ents[2] = {{.term = 2, .index = 2}, {.term = 2, .index = 3}};
    ents[0].data = dup_bytes("first", 5);
    ents[0].len = 5;
    ents[1].data = dup_bytes("second", 6);
    ents[1].len = 6;
    uint8_t *p0 = ents[0].data, *p1 = ents[1].data;
    struct raft_msg m = {.type = RAFT_MSG_APP,
                         .from = 1,
                         .to = 2,
                         .term = 2,
                         .index = 1,
                         .log_term = 1,
                         .entries = ents,
                         .n_entries = 1,
                         .commit = 1};
    ck_assert_int_eq(raft_step_take(c.r[2], &m), 0);
    ck_assert_ptr_null(ents[0].data);
    ck_assert_ptr_eq(raft_entry_at(c.r[2], 2)->data, p0);
    tc_flush(&c, 2);
    /* entry 2 again (held: not taken) and entry 3 (new: taken) */
    ents[0].data = dup_bytes("first", 5);
    m.n_entries = 2;
    ck_assert_int_eq(raft_step_take(c.r[2], &m), 0);
    ck_assert_ptr_nonnull(ents[0].data);
    ck_assert_ptr_null(ents[1].data);
    ck_assert_ptr_eq(raft_entry_at(c.r[2], 2)->data, p0);
    ck_assert_ptr_eq(raft_entry_at(c.r[2], 3)->data, p1);
    ck_assert_mem_eq(raft_entry_at(c.r[2], 3)->data, "second", 6);
    /* plain raft_step copies */
    ck_assert_int_eq(raft_step(c.r[2], &m), 0);
    ck_assert_ptr_nonnull(ents[0].data);
    free(ents[0].data);
    tc_flush(&c, 2);
    ck_assert_uint_eq(tc_last(&c, 2), 3);
    tc_free(&c);
}
END_TEST

/* raft_propose_take(): the leader's log keeps the very buffer; a refused
 * proposal leaves it to the caller. */
START_TEST(test_propose_take)
{
    struct tc c;
    memset(&c, 0, sizeof(c));
    tc_restore(&c, 1, 1, 1, 0, NULL, 0, 1);
    tc_campaign(&c, 1);
    for (int i = 0; i < 4 && raft_role(c.r[1]) != RAFT_LEADER; i++)
        tc_deliver(&c, 0, 0, 0);
    ck_assert_int_eq(raft_role(c.r[1]), RAFT_LEADER);
    uint8_t *p = dup_bytes("payload", 7);
    uint64_t index = 0;
    ck_assert_int_eq(raft_propose_take(c.r[1], 5, 1, p, 7, &index), 0);
    ck_assert_uint_gt(index, 0);
    ck_assert_ptr_eq(raft_entry_at(c.r[1], index)->data, p);
    struct raft_ready rd;
    ck_assert(raft_ready(c.r[1], &rd));
    uint8_t *q = dup_bytes("refused", 7);
    ck_assert_int_eq(raft_propose_take(c.r[1], 5, 2, q, 7, &index), -EBUSY); /* frozen */
    ck_assert_mem_eq(q, "refused", 7);
    free(q);
    raft_advance(c.r[1], &rd);
    tc_flush(&c, 1);
    ck_assert_uint_eq(tc_commit(&c, 1), tc_last(&c, 1));
    tc_free(&c);
}
END_TEST

/* ---- scenarios on the simulator fixture (chaos off) */

static struct sim *quiet_sim(unsigned nodes, uint64_t seed)
{
    struct sim_opts o;
    sim_opts_init(&o, seed, nodes);
    o.chaos = false;
    struct sim *s = sim_new(&o);
    ck_assert_ptr_nonnull(s);
    return s;
}

static void sim_ticks(struct sim *s, unsigned n)
{
    for (unsigned i = 0; i < n; i++)
        ck_assert_msg(sim_tick(s) == 0, "%s", sim_error(s));
}

/* Proposes through slot until acknowledged. */
static void sim_commit_op(struct sim *s, unsigned slot, unsigned client)
{
    uint64_t want = sim_acked(s, client) + 1;
    for (int i = 0; i < 500 && sim_acked(s, client) < want; i++) {
        if (i % 40 == 0)
            sim_propose(s, slot, client);
        sim_ticks(s, 1);
    }
    ck_assert_uint_eq(sim_acked(s, client), want);
}

/* A partitioned follower that rejoins does not disrupt a healthy leader:
 * pre-vote keeps its term from growing while it is alone. */
START_TEST(test_partitioned_node_rejoins_quietly)
{
    struct sim *s = quiet_sim(3, 11);
    unsigned l;
    ck_assert_int_eq(sim_wait_leader(s, 300, &l), 0);
    uint64_t term = raft_term(sim_raft(s, l));
    unsigned f = (l + 1) % 3;
    sim_isolate(s, f, true);
    sim_ticks(s, 200);
    ck_assert_uint_eq(raft_term(sim_raft(s, f)), term);
    sim_isolate(s, f, false);
    sim_ticks(s, 100);
    ck_assert_int_eq(raft_role(sim_raft(s, l)), RAFT_LEADER);
    ck_assert_uint_eq(raft_term(sim_raft(s, l)), term);
    ck_assert_uint_eq(raft_leader(sim_raft(s, f)), sim_id(s, l));
    sim_commit_op(s, f, 0); /* and it forwards proposals again */
    sim_free(s);
}
END_TEST

/* Leader stickiness (§4.2.3): a follower that stops hearing the leader (a
 * one-way partition) campaigns, but the others, who still hear the leader,
 * ignore it even though its log is as good as theirs. */
START_TEST(test_leader_stickiness)
{
    struct sim *s = quiet_sim(3, 17);
    unsigned l;
    ck_assert_int_eq(sim_wait_leader(s, 300, &l), 0);
    sim_commit_op(s, l, 0);
    uint64_t term = raft_term(sim_raft(s, l));
    unsigned f = (l + 1) % 3;
    sim_block(s, l, f, true);
    bool campaigned = false;
    for (int i = 0; i < 150; i++) {
        sim_ticks(s, 1);
        campaigned |= raft_role(sim_raft(s, f)) != RAFT_FOLLOWER;
    }
    ck_assert(campaigned);
    ck_assert_int_eq(raft_role(sim_raft(s, l)), RAFT_LEADER);
    ck_assert_uint_eq(raft_term(sim_raft(s, l)), term);
    ck_assert_uint_eq(raft_term(sim_raft(s, f)), term);
    sim_block(s, l, f, false);
    sim_ticks(s, 20);
    ck_assert_uint_eq(raft_leader(sim_raft(s, f)), sim_id(s, l));
    sim_free(s);
}
END_TEST

/* Check-quorum: a leader cut off from the majority steps down; the rest
 * elect a new one. */
START_TEST(test_check_quorum_steps_down)
{
    struct sim *s = quiet_sim(3, 5);
    unsigned l;
    ck_assert_int_eq(sim_wait_leader(s, 300, &l), 0);
    sim_isolate(s, l, true);
    sim_ticks(s, 60);
    ck_assert_int_ne(raft_role(sim_raft(s, l)), RAFT_LEADER);
    unsigned l2;
    ck_assert_int_eq(sim_wait_leader(s, 300, &l2), 0);
    ck_assert_uint_ne(l2, l);
    sim_isolate(s, l, false);
    sim_ticks(s, 50);
    ck_assert_uint_eq(raft_leader(sim_raft(s, l)), sim_id(s, l2));
    sim_free(s);
}
END_TEST

/* The leader removes itself: it keeps leading until the change commits,
 * then steps down and the others elect a leader without it. */
START_TEST(test_remove_leader)
{
    struct sim *s = quiet_sim(3, 3);
    unsigned l;
    ck_assert_int_eq(sim_wait_leader(s, 300, &l), 0);
    sim_commit_op(s, l, 0);
    struct raft *lr = sim_raft(s, l);
    uint64_t lid = sim_id(s, l);
    ck_assert_int_eq(raft_change_conf(lr, RAFT_CONF_REMOVE, lid, NULL, 0), 0);
    ck_assert_int_eq(raft_change_conf(lr, RAFT_CONF_ADD_LEARNER, 9, NULL, 0), -EBUSY);
    sim_ticks(s, 100);
    ck_assert_int_ne(raft_role(lr), RAFT_LEADER);
    unsigned l2;
    ck_assert_int_eq(sim_wait_leader(s, 300, &l2), 0);
    ck_assert_uint_ne(l2, l);
    ck_assert_ptr_null(raft_conf_find(raft_conf(sim_raft(s, l2)), lid));
    ck_assert_uint_eq(raft_conf(sim_raft(s, l2))->n, 2);
    sim_commit_op(s, l2, 1);
    /* the removed node never campaigns again */
    sim_ticks(s, 200);
    ck_assert_int_eq(raft_role(lr), RAFT_FOLLOWER);
    sim_free(s);
}
END_TEST

/* A learner receives the log but does not vote or campaign; promotion is
 * refused until it caught up, then it becomes a voter. */
START_TEST(test_learner_promotion)
{
    struct sim *s = quiet_sim(3, 21);
    unsigned l;
    ck_assert_int_eq(sim_wait_leader(s, 300, &l), 0);
    struct raft *lr = sim_raft(s, l);
    ck_assert_int_eq(raft_change_conf(lr, RAFT_CONF_PROMOTE, sim_id(s, l), NULL, 0), -EEXIST);
    for (int i = 0; i < 30; i++)
        sim_commit_op(s, l, (unsigned)i % 2);
    int ls = sim_add_learner(s, l);
    ck_assert_int_ge(ls, 0);
    uint64_t lid = sim_id(s, (unsigned)ls);
    /* still uncommitted, and the learner has nothing yet */
    ck_assert_int_eq(raft_change_conf(lr, RAFT_CONF_PROMOTE, lid, NULL, 0), -EBUSY);
    int rc = -EAGAIN;
    unsigned waited = 0;
    for (; waited < 500 && rc != 0; waited++) {
        sim_ticks(s, 1);
        ck_assert_int_ne(raft_role(sim_raft(s, (unsigned)ls)), RAFT_CANDIDATE);
        rc = raft_change_conf(lr, RAFT_CONF_PROMOTE, lid, NULL, 0);
        ck_assert(rc == 0 || rc == -EAGAIN || rc == -EBUSY);
    }
    ck_assert_int_eq(rc, 0);
    ck_assert_uint_gt(waited, 1);
    /* promoted only once it had caught up (lag 3 in the sim's config; the
     * promotion entry itself is one more) */
    struct raft_status ls_st;
    raft_status(lr, &ls_st);
    bool found = false;
    for (size_t i = 0; i < ls_st.n_peers; i++) {
        if (ls_st.peers[i].id != lid)
            continue;
        found = true;
        ck_assert_uint_ge(ls_st.peers[i].match + 3 + 1, ls_st.last_index);
        ck_assert(ls_st.peers[i].recent_active);
        ck_assert_uint_gt(ls_st.peers[i].ctx_len, 0);
    }
    ck_assert(found);
    const struct raft_member *m = raft_conf_find(raft_conf(lr), lid);
    ck_assert_ptr_nonnull(m);
    ck_assert_int_eq(m->role, RAFT_VOTER);
    ck_assert_mem_eq(m->ctx, "n", 1); /* context kept for status */
    sim_commit_op(s, (unsigned)ls, 0);
    struct raft_status st;
    raft_status(lr, &st);
    ck_assert_uint_eq(st.n_peers, 4);
    sim_free(s);
}
END_TEST

/* Leadership transfer with TimeoutNow; proposals are refused meanwhile. */
START_TEST(test_leadership_transfer)
{
    struct sim *s = quiet_sim(3, 8);
    unsigned l;
    ck_assert_int_eq(sim_wait_leader(s, 300, &l), 0);
    unsigned t = (l + 1) % 3;
    struct raft *lr = sim_raft(s, l);
    ck_assert_int_eq(raft_transfer_leader(lr, sim_id(s, l)), -EINVAL);
    ck_assert_int_eq(raft_transfer_leader(lr, sim_id(s, t)), 0);
    ck_assert_int_eq(raft_propose(lr, 1, 1, "x", 1, NULL), -EBUSY);
    sim_ticks(s, 20);
    ck_assert_int_eq(raft_role(sim_raft(s, t)), RAFT_LEADER);
    ck_assert_int_eq(raft_transfer_leader(lr, sim_id(s, t)), -EPERM);
    sim_commit_op(s, l, 0);
    sim_free(s);
}
END_TEST

/* ReadIndex on leader and follower; a read never returns an index below
 * what was committed before it was issued (the sim checks that too). */
START_TEST(test_read_index)
{
    struct tc c;
    memset(&c, 0, sizeof(c));
    tc_bootstrap(&c, 3);
    tc_run(&c, 30);
    uint64_t l = tc_leader(&c), f = l == 1 ? 2 : 1;
    ck_assert_uint_ne(l, 0);
    uint64_t commit = tc_commit(&c, l);
    ck_assert_int_eq(raft_read_index(c.r[l], 42), 0);
    ck_assert_int_eq(raft_read_index(c.r[f], 43), 0);
    for (int i = 0; i < 6; i++)
        tc_deliver(&c, 0, 0, 0);
    ck_assert_uint_eq(c.read_ctx[l], 42);
    ck_assert_uint_eq(c.read_index[l], commit);
    ck_assert_uint_eq(c.read_ctx[f], 43);
    ck_assert_uint_ge(c.read_index[f], commit);
    /* a leader cut off from the others cannot answer */
    ck_assert_int_eq(raft_read_index(c.r[l], 44), 0);
    tc_drop(&c, 0, 0);
    ck_assert_uint_eq(c.read_ctx[l], 42);
    tc_free(&c);

    /* a leader that has not committed in its term refuses */
    memset(&c, 0, sizeof(c));
    tc_restore(&c, 1, 3, 1, 0, NULL, 0, 1);
    tc_restore(&c, 2, 3, 1, 0, NULL, 0, 1);
    tc_campaign(&c, 1);
    for (int i = 0; i < 4 && raft_role(c.r[1]) != RAFT_LEADER; i++) {
        tc_deliver(&c, 1, 2, 0);
        tc_deliver(&c, 2, 1, 0);
    }
    ck_assert_int_eq(raft_role(c.r[1]), RAFT_LEADER);
    ck_assert_int_eq(raft_read_index(c.r[1], 1), -EAGAIN);
    for (int i = 0; i < 3; i++) {
        tc_deliver(&c, 1, 2, 0);
        tc_deliver(&c, 2, 1, 0);
    }
    ck_assert_int_eq(raft_read_index(c.r[1], 2), 0);
    tc_tick(&c, 1);
    for (int i = 0; i < 3; i++) {
        tc_deliver(&c, 1, 2, 0);
        tc_deliver(&c, 2, 1, 0);
    }
    ck_assert_uint_eq(c.read_ctx[1], 2);

    /* single-voter cluster answers at once */
    struct sim *one = quiet_sim(1, 4);
    unsigned l1;
    ck_assert_int_eq(sim_wait_leader(one, 300, &l1), 0);
    ck_assert_int_eq(raft_read_index(sim_raft(one, l1), 5), 0);
    sim_ticks(one, 2);
    sim_free(one);
    tc_free(&c);
}
END_TEST

/* Randomized runs: every client op is applied exactly once even though
 * clients retry through other nodes (the session table drops dups). */
START_TEST(test_sim_exactly_once)
{
    uint64_t dups = 0;
    for (uint64_t seed = 1; seed <= 30; seed++) {
        struct sim_opts o;
        sim_opts_init(&o, seed, 3 + 2 * (seed % 2));
        o.steps = 600;
        struct sim *s = sim_new(&o);
        ck_assert_msg(sim_run(s) == 0, "seed %llu: %s", (unsigned long long)seed, sim_error(s));
        dups += sim_dups_skipped(s);
        sim_free(s);
    }
    ck_assert_uint_gt(dups, 0);
}
END_TEST

/* Crash before a persist completes loses that batch; restart recovers. */
START_TEST(test_crash_restart)
{
    struct sim *s = quiet_sim(3, 2);
    unsigned l;
    ck_assert_int_eq(sim_wait_leader(s, 300, &l), 0);
    sim_commit_op(s, l, 0);
    sim_crash(s, l);
    ck_assert_ptr_null(sim_raft(s, l));
    unsigned l2;
    ck_assert_int_eq(sim_wait_leader(s, 300, &l2), 0);
    sim_commit_op(s, l2, 1);
    sim_restart(s, l);
    sim_ticks(s, 100);
    ck_assert_uint_eq(sim_applied_ops(s, l), 2);
    sim_free(s);
}
END_TEST

/* ---- API and codec */

START_TEST(test_conf_codec)
{
    struct raft_conf c = conf_of(3), d;
    c.members[1].role = RAFT_LEARNER;
    c.members[2].ctx = (uint8_t *)"n3@host:1";
    c.members[2].ctx_len = 9;
    uint8_t *enc;
    size_t len;
    ck_assert_int_eq(raft_conf_encode(&c, &enc, &len), 0);
    ck_assert_int_eq(raft_conf_decode(enc, len, &d), 0);
    ck_assert_uint_eq(d.n, 3);
    ck_assert_int_eq(d.members[1].role, RAFT_LEARNER);
    ck_assert_uint_eq(d.members[2].ctx_len, 9);
    ck_assert_mem_eq(d.members[2].ctx, "n3@host:1", 9);
    ck_assert_ptr_nonnull(raft_conf_find(&d, 3));
    ck_assert_ptr_null(raft_conf_find(&d, 4));
    raft_conf_clear(&d);
    /* every truncation and every single-byte corruption is either refused
     * or decodes to something valid */
    for (size_t i = 0; i < len; i++) {
        ck_assert_int_eq(raft_conf_decode(enc, i, &d), -EINVAL);
        for (int bit = 0; bit < 8; bit++) {
            enc[i] ^= (uint8_t)(1u << bit);
            if (raft_conf_decode(enc, len, &d) == 0)
                raft_conf_clear(&d);
            enc[i] ^= (uint8_t)(1u << bit);
        }
    }
    free(enc);
    /* duplicate ids and id 0 are invalid */
    c.members[1].id = 1;
    ck_assert_int_eq(raft_conf_encode(&c, &enc, &len), -EINVAL);
    c.members[1].id = 0;
    ck_assert_int_eq(raft_conf_encode(&c, &enc, &len), -EINVAL);
}
END_TEST

START_TEST(test_api_errors)
{
    struct raft_config cfg;
    raft_config_init(&cfg, 0);
    ck_assert_ptr_null(raft_new(&cfg));
    raft_config_init(&cfg, 1);
    cfg.heartbeat_tick = cfg.election_tick;
    ck_assert_ptr_null(raft_new(&cfg));
    raft_config_init(&cfg, 1);
    struct raft *r = raft_new(&cfg);
    struct raft_conf empty = conf_of(0);
    ck_assert_int_eq(raft_bootstrap(r, &empty), -EINVAL);
    ck_assert_int_eq(raft_propose(r, 0, 0, "x", 1, NULL), -EAGAIN);
    ck_assert_int_eq(raft_read_index(r, 1), -EAGAIN);
    ck_assert_int_eq(raft_change_conf(r, RAFT_CONF_REMOVE, 2, NULL, 0), -EPERM);
    ck_assert_int_eq(raft_transfer_leader(r, 2), -EPERM);
    ck_assert_int_eq(raft_snapshot_taken(r, 5, 10, NULL, NULL), -EINVAL);
    struct raft_conf one = conf_of(1);
    ck_assert_int_eq(raft_bootstrap(r, &one), 0);
    ck_assert_int_eq(raft_bootstrap(r, &one), -EINVAL);
    struct raft_restore_state st;
    memset(&st, 0, sizeof(st));
    ck_assert_int_eq(raft_restore(r, &st), -EINVAL);
    ck_assert_str_eq(raft_role_name(RAFT_LEADER), "leader");
    ck_assert_str_eq(raft_msg_type_name(RAFT_MSG_APP), "APP");
    ck_assert_str_eq(raft_msg_type_name(200), "?");
    /* a single voter elects itself and commits after the persist */
    struct raft_ready rd;
    for (int i = 0; i < 30 && raft_role(r) != RAFT_LEADER; i++) {
        raft_tick(r);
        while (raft_ready(r, &rd))
            raft_advance(r, &rd);
    }
    ck_assert_int_eq(raft_role(r), RAFT_LEADER);
    uint64_t idx;
    ck_assert_int_eq(raft_propose(r, 1, 1, "abc", 3, &idx), 0);
    ck_assert(raft_ready(r, &rd));
    ck_assert_uint_eq(rd.n_committed, 0); /* not before it is on disk */
    ck_assert_uint_eq(rd.entries[rd.n_entries - 1].index, idx);
    raft_advance(r, &rd);
    ck_assert(raft_ready(r, &rd));
    ck_assert_uint_eq(rd.committed[rd.n_committed - 1].index, idx);
    ck_assert_mem_eq(rd.committed[rd.n_committed - 1].data, "abc", 3);
    raft_advance(r, &rd);
    struct raft_snapshot_meta meta;
    uint64_t compact_to;
    ck_assert_int_eq(raft_snapshot_taken(r, idx, 3, &meta, &compact_to), 0);
    ck_assert_uint_eq(meta.index, idx);
    ck_assert_int_eq(raft_snapshot_taken(r, idx, 3, &meta, &compact_to), -EINVAL);
    ck_assert_int_eq(raft_change_conf(r, RAFT_CONF_REMOVE, 1, NULL, 0), -EINVAL);
    ck_assert_int_eq(raft_change_conf(r, RAFT_CONF_PROMOTE, 7, NULL, 0), -ENOENT);
    ck_assert_int_eq(raft_change_conf(r, 99, 7, NULL, 0), -EINVAL);
    ck_assert_int_eq(raft_change_conf(r, RAFT_CONF_ADD_LEARNER, 1, NULL, 0), -EEXIST);
    ck_assert_int_eq(raft_propose(r, 1, 1, NULL, 3, NULL), -EINVAL);
    struct raft_status sst;
    raft_status(r, &sst);
    ck_assert_int_eq(sst.role, RAFT_LEADER);
    ck_assert_uint_eq(sst.n_peers, 1);
    ck_assert_uint_eq(sst.peers[0].match, idx);
    raft_free(r);
}
END_TEST

/* Garbage from the network never crashes the core. */
START_TEST(test_fuzz_step)
{
    struct tc c;
    memset(&c, 0, sizeof(c));
    tc_bootstrap(&c, 3);
    tc_run(&c, 30);
    uint64_t x = 88172645463325252ULL;
    struct raft_entry ents[4];
    uint8_t bytes[64];
    for (int i = 0; i < 20000; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        struct raft_msg m;
        memset(&m, 0, sizeof(m));
        m.type = (uint8_t)(x % 17);
        m.from = 1 + (x >> 8) % 4;
        m.to = 1 + (x >> 12) % 3;
        m.term = raft_term(c.r[m.to]) + (x >> 16) % 3;
        if (m.term > 0)
            m.term--;
        m.index = (x >> 20) % 8;
        m.log_term = (x >> 24) % 4;
        m.commit = (x >> 28) % 10;
        m.reject = (x >> 32) & 1;
        m.hint = (x >> 33) % 8;
        m.ctx = (x >> 36) % 4;
        m.flags = (uint8_t)((x >> 40) % 4);
        m.offset = (x >> 42) % 8;
        m.n_entries = (x >> 45) % 3;
        for (size_t k = 0; k < m.n_entries; k++) {
            ents[k] = (struct raft_entry){.term = (x >> 47) % 4 + k,
                                          .index = m.index + 1 + k,
                                          .type = (uint8_t)((x >> 50) % 4),
                                          .data = bytes,
                                          .len = (x >> 52) % 8};
        }
        m.entries = ents;
        memset(bytes, (int)(x & 0xff), sizeof(bytes));
        m.data = bytes;
        m.len = (x >> 55) % 8;
        m.snap.index = m.index;
        m.snap.term = m.log_term;
        m.snap.size = m.len + m.offset;
        m.snap.conf = bytes;
        m.snap.conf_len = (x >> 58) % 20;
        raft_step(c.r[m.to], &m);
        tc_flush(&c, m.to);
        tc_drop(&c, 0, 0);
        if (i % 50 == 0)
            tc_run(&c, 1);
    }
    tc_free(&c);
}
END_TEST

START_TEST(test_codec_roundtrip)
{
    struct raft_entry ents[2] = {
            {.term = 3,
             .index = 7,
             .client_id = 9,
             .seq = 4,
             .type = RAFT_ENTRY_NORMAL,
             .data = (uint8_t *)"hello",
             .len = 5},
            {.term = 3, .index = 8, .type = RAFT_ENTRY_NOOP},
    };
    struct raft_msg m = {.type = RAFT_MSG_APP,
                         .flags = RAFT_MSG_FLAG_DONE,
                         .reject = true,
                         .from = 1,
                         .to = 2,
                         .term = 3,
                         .index = 6,
                         .log_term = 2,
                         .commit = 5,
                         .hint = 4,
                         .ctx = 11,
                         .entries = ents,
                         .n_entries = 2,
                         .offset = 17,
                         .data = (const uint8_t *)"chunk",
                         .len = 5};
    m.snap.index = 6;
    m.snap.term = 2;
    m.snap.size = 99;
    m.snap.conf = (const uint8_t *)"conf";
    m.snap.conf_len = 4;
    struct buf b = BUF_INIT;
    ck_assert_int_eq(raft_msg_encode(&m, &b), 0);
    struct raft_msg d;
    ck_assert_int_eq(raft_msg_decode(b.data, b.len, &d), 0);
    ck_assert_int_eq(d.type, m.type);
    ck_assert_int_eq(d.flags, m.flags);
    ck_assert(d.reject);
    ck_assert_uint_eq(d.from, 1);
    ck_assert_uint_eq(d.to, 2);
    ck_assert_uint_eq(d.term, 3);
    ck_assert_uint_eq(d.index, 6);
    ck_assert_uint_eq(d.log_term, 2);
    ck_assert_uint_eq(d.commit, 5);
    ck_assert_uint_eq(d.hint, 4);
    ck_assert_uint_eq(d.ctx, 11);
    ck_assert_uint_eq(d.n_entries, 2);
    ck_assert_uint_eq(d.entries[0].client_id, 9);
    ck_assert_uint_eq(d.entries[0].seq, 4);
    ck_assert_mem_eq(d.entries[0].data, "hello", 5);
    ck_assert_int_eq(d.entries[1].type, RAFT_ENTRY_NOOP);
    ck_assert_uint_eq(d.snap.size, 99);
    ck_assert_mem_eq(d.snap.conf, "conf", 4);
    ck_assert_uint_eq(d.offset, 17);
    ck_assert_mem_eq(d.data, "chunk", 5);
    raft_msg_clear(&d);
    /* every truncation fails cleanly; every bit flip decodes or fails */
    for (size_t i = 0; i < b.len; i++) {
        ck_assert_int_ne(raft_msg_decode(b.data, i, &d), 0);
        for (int bit = 0; bit < 8; bit++) {
            b.data[i] ^= (uint8_t)(1u << bit);
            if (raft_msg_decode(b.data, b.len, &d) == 0)
                raft_msg_clear(&d);
            b.data[i] ^= (uint8_t)(1u << bit);
        }
    }
    b.data[0] = 2;
    ck_assert_int_eq(raft_msg_decode(b.data, b.len, &d), -EPROTO);
    buf_free(&b);
    /* a count that the bytes cannot hold is refused before allocating */
    uint8_t lie[4 + 8 * 8 + 4];
    memset(lie, 0, sizeof(lie));
    lie[0] = RAFT_CODEC_VERSION;
    lie[1] = RAFT_MSG_APP;
    lie[sizeof(lie) - 2] = 0xff;
    ck_assert_int_eq(raft_msg_decode(lie, sizeof(lie), &d), -EINVAL);
    ck_assert_int_eq(raft_msg_decode(NULL, 0, &d), -EINVAL);
    /* encoding refuses what it cannot represent */
    struct raft_msg bad = {.type = RAFT_MSG_SNAP, .len = 5};
    ck_assert_int_eq(raft_msg_encode(&bad, &b), -EINVAL);
    bad.type = 0;
    ck_assert_int_eq(raft_msg_encode(&bad, &b), -EINVAL);
    struct raft_entry be = {.type = 7};
    struct raft_msg bm = {.type = RAFT_MSG_APP, .entries = &be, .n_entries = 1};
    ck_assert_int_eq(raft_msg_encode(&bm, &b), -EINVAL);
    ck_assert_uint_eq(b.len, 0);
    /* entries on their own */
    ck_assert_int_eq(raft_entry_encode(&ents[0], &b), 0);
    struct raft_entry e;
    ck_assert_int_eq(raft_entry_decode(b.data, b.len, &e), 0);
    ck_assert_uint_eq(e.index, 7);
    ck_assert_mem_eq(e.data, "hello", 5);
    free(e.data);
    for (size_t i = 0; i < b.len; i++)
        ck_assert_int_ne(raft_entry_decode(b.data, i, &e), 0);
    b.data[0] = 9;
    ck_assert_int_eq(raft_entry_decode(b.data, b.len, &e), -EPROTO);
    ck_assert_int_eq(raft_entry_encode(&be, &b), -EINVAL);
    buf_free(&b);
}
END_TEST

/* A follower that missed compacted entries catches up by snapshot. */
START_TEST(test_snapshot_catch_up)
{
    struct sim *s = quiet_sim(3, 13);
    unsigned l;
    ck_assert_int_eq(sim_wait_leader(s, 300, &l), 0);
    unsigned f = (l + 1) % 3;
    sim_isolate(s, f, true);
    for (int i = 0; i < 60; i++)
        sim_commit_op(s, l, (unsigned)i % 3);
    struct raft_status st;
    raft_status(sim_raft(s, l), &st);
    ck_assert_uint_gt(st.snapshot_index, 0);
    ck_assert_uint_gt(st.first_index, 2); /* the log was compacted */
    struct sim_stats before, after;
    sim_stats(s, &before);
    sim_isolate(s, f, false);
    sim_ticks(s, 200);
    sim_stats(s, &after);
    ck_assert_uint_gt(after.snapshots_installed, before.snapshots_installed);
    ck_assert_uint_eq(sim_applied_ops(s, f), sim_applied_ops(s, l));
    sim_free(s);
}
END_TEST

/* Restarting from inconsistent persisted state is refused, not guessed. */
START_TEST(test_restore_validation)
{
    struct raft_config cfg;
    raft_config_init(&cfg, 1);
    struct raft_conf conf = conf_of(3);
    uint8_t *enc;
    size_t len;
    ck_assert_int_eq(raft_conf_encode(&conf, &enc, &len), 0);
    struct raft_entry ents[3] = {
            {.term = 1, .index = 5}, {.term = 2, .index = 6}, {.term = 2, .index = 7}};
    struct raft_snapshot_meta snap = {
            .index = 5, .term = 1, .size = 3, .conf = enc, .conf_len = len};
    struct raft_restore_state st = {.hs = {.term = 2, .commit = 6},
                                    .snapshot = &snap,
                                    .entries = ents,
                                    .n_entries = 3,
                                    .applied = 5};
    struct raft *r = raft_new(&cfg);
    ck_assert_int_eq(raft_restore(r, &st), 0); /* trailing entry 5 gives its term */
    struct raft_status rs;
    raft_status(r, &rs);
    ck_assert_uint_eq(rs.first_index, 6);
    ck_assert_uint_eq(rs.last_index, 7);
    ck_assert_uint_eq(rs.commit, 6);
    ck_assert_uint_eq(rs.applied, 5);
    ck_assert_uint_eq(raft_conf(r)->n, 3);
    struct raft_ready rd;
    ck_assert(raft_ready(r, &rd));
    ck_assert_uint_eq(rd.n_committed, 1); /* 6 is committed, not yet applied */
    raft_advance(r, &rd);
    raft_free(r);

    struct raft_restore_state bad = st;
    ents[1].index = 9; /* not contiguous */
    r = raft_new(&cfg);
    ck_assert_int_eq(raft_restore(r, &bad), -EINVAL);
    raft_free(r);
    ents[1].index = 6;
    ents[0].term = 2; /* entry at the snapshot index with another term */
    r = raft_new(&cfg);
    ck_assert_int_eq(raft_restore(r, &bad), -EINVAL);
    raft_free(r);
    ents[0].term = 1;
    bad.hs.commit = 9; /* commit beyond the log */
    r = raft_new(&cfg);
    ck_assert_int_eq(raft_restore(r, &bad), -EINVAL);
    raft_free(r);
    bad = st;
    bad.entries = ents + 2; /* gap after the snapshot */
    bad.n_entries = 1;
    r = raft_new(&cfg);
    ck_assert_int_eq(raft_restore(r, &bad), -EINVAL);
    raft_free(r);
    bad = st;
    snap.conf_len = 2; /* corrupt configuration */
    r = raft_new(&cfg);
    ck_assert_int_eq(raft_restore(r, &bad), -EINVAL);
    raft_free(r);
    snap.conf_len = len;
    bad.hs.term = 1; /* entries from a term above the hard state */
    r = raft_new(&cfg);
    ck_assert_int_eq(raft_restore(r, &bad), -EINVAL);
    raft_free(r);
    /* entries all before the snapshot are dropped */
    bad = st;
    bad.n_entries = 1;
    bad.hs.commit = 5;
    r = raft_new(&cfg);
    ck_assert_int_eq(raft_restore(r, &bad), 0);
    raft_status(r, &rs);
    ck_assert_uint_eq(rs.last_index, 5);
    raft_free(r);
    free(enc);
}
END_TEST

/* A follower with a stale view passes a proposal on, a bounded number of
 * hops. */
START_TEST(test_forwarding_hops)
{
    struct tc c;
    memset(&c, 0, sizeof(c));
    tc_bootstrap(&c, 3);
    tc_run(&c, 30);
    uint64_t l = tc_leader(&c), f = l == 1 ? 2 : 1, g = 6 - l - f;
    ck_assert_uint_ne(l, 0);
    uint64_t last = tc_last(&c, l);
    struct raft_entry e = {.client_id = 3, .seq = 1, .data = (uint8_t *)"op", .len = 2};
    struct raft_msg prop = {
            .type = RAFT_MSG_PROP, .from = f, .to = g, .entries = &e, .n_entries = 1};
    raft_step(c.r[g], &prop);
    tc_flush(&c, g);
    tc_deliver(&c, g, l, RAFT_MSG_PROP);
    ck_assert_uint_eq(tc_last(&c, l), last + 1);
    ck_assert_uint_eq(raft_entry_at(c.r[l], last + 1)->client_id, 3);
    prop.ctx = 2; /* already travelled too far */
    raft_step(c.r[g], &prop);
    tc_flush(&c, g);
    ck_assert_uint_eq(tc_deliver(&c, g, l, RAFT_MSG_PROP), 0);
    tc_free(&c);
}
END_TEST

/* Back-pressure and an unreachable transfer target. */
START_TEST(test_limits_and_transfer_timeout)
{
    struct tc c;
    memset(&c, 0, sizeof(c));
    tc_bootstrap(&c, 3);
    tc_run(&c, 30);
    uint64_t l = tc_leader(&c), t = l == 1 ? 2 : 1;
    ck_assert_uint_ne(l, 0);
    /* transfer to a node that never answers: aborted after a timeout */
    raft_free(c.r[t]);
    c.r[t] = NULL;
    ck_assert_int_eq(raft_transfer_leader(c.r[l], t), 0);
    ck_assert_int_eq(raft_transfer_leader(c.r[l], t), 0);
    ck_assert_int_eq(raft_transfer_leader(c.r[l], 6 - l - t), -EBUSY);
    ck_assert_int_eq(raft_change_conf(c.r[l], RAFT_CONF_REMOVE, t, NULL, 0), -EBUSY);
    tc_run(&c, 12);
    struct raft_status st;
    raft_status(c.r[l], &st);
    ck_assert_int_eq(st.role, RAFT_LEADER);
    ck_assert_uint_eq(st.transferee, RAFT_NONE);
    ck_assert_int_eq(raft_propose(c.r[l], 1, 1, "x", 1, NULL), 0);
    tc_free(&c);

    /* max_uncommitted_bytes */
    struct raft_config cfg;
    raft_config_init(&cfg, 1);
    cfg.max_uncommitted_bytes = 10;
    struct raft *r = raft_new(&cfg);
    struct raft_conf two = conf_of(2);
    raft_bootstrap(r, &two);
    struct raft_msg tn = {.type = RAFT_MSG_TIMEOUT_NOW, .from = 2, .to = 1, .term = 1};
    raft_step(r, &tn);
    struct raft_ready rd;
    while (raft_ready(r, &rd))
        raft_advance(r, &rd);
    struct raft_msg vr = {.type = RAFT_MSG_VOTE_RESP, .from = 2, .to = 1, .term = 2};
    raft_step(r, &vr);
    ck_assert_int_eq(raft_role(r), RAFT_LEADER);
    ck_assert_int_eq(raft_propose(r, 1, 1, "12345678", 8, NULL), 0);
    ck_assert_int_eq(raft_propose(r, 1, 2, "12345678", 8, NULL), -ENOBUFS);
    /* a forwarded proposal beyond the limit is dropped too */
    struct raft_entry pe = {.client_id = 1, .seq = 3, .data = (uint8_t *)"12345678", .len = 8};
    struct raft_msg prop = {
            .type = RAFT_MSG_PROP, .from = 2, .to = 1, .entries = &pe, .n_entries = 1};
    raft_step(r, &prop);
    raft_status(r, &st);
    ck_assert_uint_eq(st.last_index, 3); /* conf, no-op, first proposal */
    while (raft_ready(r, &rd))
        raft_advance(r, &rd);
    raft_free(r);
}
END_TEST

static Suite *raft_suite(void)
{
    Suite *s = suite_create("raft");
    TCase *tc = tcase_create("core");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_figure8);
    tcase_add_test(tc, test_commit_with_current_term_entry);
    tcase_add_test(tc, test_conf_change_waits_for_term_commit);
    tcase_add_test(tc, test_vote_persisted_before_sent);
    tcase_add_test(tc, test_persist_failed);
    tcase_add_test(tc, test_prevote_checkquorum_liveness);
    tcase_add_test(tc, test_stale_responses_after_term_change);
    tcase_add_test(tc, test_snapshot_onto_conflicting_log);
    tcase_add_test(tc, test_duplicate_append_keeps_log);
    tcase_add_test(tc, test_step_take_moves_entry_bytes);
    tcase_add_test(tc, test_propose_take);
    tcase_add_test(tc, test_conf_codec);
    tcase_add_test(tc, test_codec_roundtrip);
    tcase_add_test(tc, test_api_errors);
    tcase_add_test(tc, test_fuzz_step);
    tcase_add_test(tc, test_restore_validation);
    tcase_add_test(tc, test_forwarding_hops);
    tcase_add_test(tc, test_limits_and_transfer_timeout);
    suite_add_tcase(s, tc);
    TCase *ts = tcase_create("sim");
    tcase_set_timeout(ts, 120);
    tcase_add_test(ts, test_partitioned_node_rejoins_quietly);
    tcase_add_test(ts, test_check_quorum_steps_down);
    tcase_add_test(ts, test_leader_stickiness);
    tcase_add_test(ts, test_remove_leader);
    tcase_add_test(ts, test_learner_promotion);
    tcase_add_test(ts, test_leadership_transfer);
    tcase_add_test(ts, test_read_index);
    tcase_add_test(ts, test_sim_exactly_once);
    tcase_add_test(ts, test_crash_restart);
    tcase_add_test(ts, test_snapshot_catch_up);
    suite_add_tcase(s, ts);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(raft_suite());
    srunner_run_all(sr, CK_ENV);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}

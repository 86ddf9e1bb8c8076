/*
 * check_cluster.c: unit tests for the daemon's cluster pieces: the member
 * context codec, the cluster secret (the state machine sm.c has check_sm.c)
 * and the Raft driver (cluster.c) with
 * the real raft core, raft.db and state.db in one process: a lone node
 * bootstraps, commits probes over the control socket and restarts from disk
 * with the same identity and state; storage faults (fsync error, disk full)
 * are reported and recovered from; a waiting probe is proposed again when
 * a snapshot is installed; three nodes in one process on loopback
 * join, promote, forward, fail over and remove a member.
 */
#include <config.h>

#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <event2/event.h>
#include <jansson.h>
#include <sqlite3.h>

#include "ctl/ctl.h"
#include "daemon/cluster.h"
#include "daemon/cluster_int.h"
#include "daemon/nodeconf.h"
#include "daemon/daemon.h"
#include "daemon/listen.h"
#include "daemon/methods.h"
#include "daemon/node.h"
#include "daemon/secret.h"
#include "daemon/sm.h"
#include "lib/buf.h"
#include "lib/util.h"
#include "ctlcall.h"
#include "raft/raft.h"

static char tmp[64];

static void setup(void)
{
    snprintf(tmp, sizeof(tmp), "/tmp/check_cluster.XXXXXX");
    ck_assert_ptr_nonnull(mkdtemp(tmp));
    umask(022);
}

static void teardown(void)
{
    char *cmd = pb_xasprintf("rm -rf '%s'", tmp);
    ck_assert_int_eq(system(cmd), 0);
    free(cmd);
}

/* ---- member context ---- */

START_TEST(test_ctx_roundtrip)
{
    uint8_t *p;
    size_t len;
    ck_assert_int_eq(cluster_ctx_encode("n1", "127.0.0.1:8010", &p, &len), 0);
    char name[65], addr[CLUSTER_ADDR_MAX];
    ck_assert_int_eq(cluster_ctx_decode(p, len, name, addr), 0);
    ck_assert_str_eq(name, "n1");
    ck_assert_str_eq(addr, "127.0.0.1:8010");
    /* Every truncation is refused, never overread. */
    for (size_t i = 0; i < len; i++)
        ck_assert_int_eq(cluster_ctx_decode(p, i, name, addr), -EINVAL);
    /* Another version is refused. */
    p[0] = 2;
    ck_assert_int_eq(cluster_ctx_decode(p, len, name, addr), -EINVAL);
    free(p);
    /* An empty name is refused; an empty address is allowed. */
    ck_assert_int_eq(cluster_ctx_encode("", "x:1", &p, &len), 0);
    ck_assert_int_eq(cluster_ctx_decode(p, len, name, addr), -EINVAL);
    free(p);
    ck_assert_int_eq(cluster_ctx_encode("n2", NULL, &p, &len), 0);
    ck_assert_int_eq(cluster_ctx_decode(p, len, name, addr), 0);
    ck_assert_str_eq(addr, "");
    free(p);
    /* A name with a NUL inside is refused. */
    struct buf b = BUF_INIT;
    buf_put_u8(&b, 1);
    buf_put_bytes(&b, "a\0b", 3);
    buf_put_str(&b, "x:1");
    ck_assert_int_eq(cluster_ctx_decode(b.data, b.len, name, addr), -EINVAL);
    buf_free(&b);
}
END_TEST

/* ---- secret ---- */

START_TEST(test_secret)
{
    struct pb_error err;
    uint8_t *s = NULL;
    size_t len = 0;
    char *path = pb_xasprintf("%s/secret", tmp);
    ck_assert_int_eq(secret_load(path, &s, &len, &err), -ENOENT);
    ck_assert_ptr_nonnull(strstr(err.msg, path));

    ck_assert_int_eq(secret_generate(path, &s, &len, &err), 0);
    ck_assert_uint_eq(len, 2 * SECRET_GEN_BYTES); /* hex, newline not included */
    for (size_t i = 0; i < len; i++)
        ck_assert_ptr_nonnull(strchr("0123456789abcdef", s[i]));
    struct stat st;
    ck_assert_int_eq(stat(path, &st), 0);
    ck_assert_uint_eq(st.st_mode & 0777, 0600);
    uint8_t *again = NULL;
    size_t again_len = 0;
    ck_assert_int_eq(secret_load(path, &again, &again_len, &err), 0);
    ck_assert_uint_eq(again_len, len);
    ck_assert_int_eq(memcmp(again, s, len), 0);
    free(again);
    /* Never overwritten. */
    ck_assert_int_eq(secret_generate(path, &again, &again_len, &err), -EEXIST);
    free(s);

    /* Too short. */
    char *shortp = pb_xasprintf("%s/short", tmp);
    FILE *f = fopen(shortp, "w");
    fputs("tooshort\n", f);
    fclose(f);
    ck_assert_int_eq(secret_load(shortp, &s, &len, &err), -EINVAL);
    ck_assert_ptr_nonnull(strstr(err.msg, "bytes"));
    /* A directory is not a secret. */
    ck_assert_int_eq(secret_load(tmp, &s, &len, &err), -EINVAL);
    free(shortp);
    free(path);
}
END_TEST

/* ---- the driver: a lone node in-process ---- */

static void cfg_fill(struct pb_config *cfg)
{
    memset(cfg, 0, sizeof(*cfg));
    cfg->node_id = pb_xstrdup("n1");
    cfg->bind = pb_xstrdup("127.0.0.1");
    cfg->port = 1;
    cfg->advertise = pb_xstrdup("127.0.0.1:1");
    cfg->data_dir = pb_xasprintf("%s/tree", tmp);
    cfg->state_dir = pb_xasprintf("%s/state", tmp);
    cfg->control_socket = pb_xasprintf("%s/ctl.sock", tmp);
    cfg->log_level = LOG_LEVEL_WARNING;
    cfg->heartbeat_ms = 10;
    cfg->election_timeout_ms = 50;
}

struct node {
    struct daemon d;
    struct pb_config *cfg;
    bool own_base;
};

/* Starts a node on base (a new one when NULL) with the peer listener
 * peer_fd (-1: none). */
static void node_start_on(struct node *n, struct pb_config *cfg, struct event_base *base,
                          int peer_fd)
{
    memset(n, 0, sizeof(*n));
    n->cfg = cfg;
    n->d.cfg = cfg;
    n->d.peer_fd = -1;
    n->own_base = base == NULL;
    n->d.base = base ? base : event_base_new();
    node_state_init(&n->d.node, cfg, pb_now_ms());
    ck_assert_int_eq(mkdir(cfg->state_dir, 0700) == 0 || errno == EEXIST, 1);
    struct cluster_options co = {.cfg = cfg, .base = n->d.base, .peer_fd = peer_fd};
    struct pb_error err;
    pb_error_clear(&err);
    int rc = cluster_open(&n->d.cluster, &co, &err);
    ck_assert_msg(rc == 0, "cluster_open: %s", err.msg);
    size_t nm;
    const struct ctl_method *m = methods_table(&nm);
    n->d.ctl = ctl_server_new(n->d.base, m, nm, &n->d, NULL);
    ck_assert_int_eq(ctl_server_listen_path(n->d.ctl, cfg->control_socket, 0600), 0);
}

static void node_start(struct node *n, struct pb_config *cfg)
{
    node_start_on(n, cfg, NULL, -1);
}

static void node_stop(struct node *n)
{
    cluster_close(n->d.cluster);
    ctl_server_free(n->d.ctl);
    node_state_free(&n->d.node);
    if (n->own_base)
        event_base_free(n->d.base);
}

static json_t *node_status(struct node *n)
{
    json_t *j = ctlcall(n->d.base, n->cfg->control_socket, "{\"id\":1,\"method\":\"status\"}\n");
    json_t *r = json_incref(json_object_get(j, "result"));
    json_decref(j);
    ck_assert_ptr_nonnull(r);
    return r;
}

/* Runs the loop until this lone node is leader (deadline 10 s). */
static void node_wait_leader(struct node *n)
{
    uint64_t deadline = pb_now_ms() + 10000;
    for (;;) {
        json_t *st = node_status(n);
        bool leader = strcmp(json_string_value(json_object_get(st, "role")), "leader") == 0;
        json_decref(st);
        if (leader)
            return;
        ck_assert_msg(pb_now_ms() < deadline, "no leader");
        event_base_loop(n->d.base, EVLOOP_NONBLOCK);
        poll(NULL, 0, 5);
    }
}

static json_int_t node_probe(struct node *n)
{
    json_t *j = ctlcall(n->d.base, n->cfg->control_socket,
                        "{\"id\":2,\"method\":\"probe\",\"params\":{\"size\":100}}\n");
    json_t *r = json_object_get(j, "result");
    ck_assert_msg(r != NULL, "probe failed: %s", json_dumps(j, 0));
    json_int_t index = json_integer_value(json_object_get(r, "index"));
    ck_assert_int_gt(index, 0);
    ck_assert_int_gt(json_integer_value(json_object_get(r, "term")), 0);
    json_decref(j);
    return index;
}

START_TEST(test_cluster_lone_restart)
{
    struct pb_config cfg;
    cfg_fill(&cfg);
    struct node n;
    node_start(&n, &cfg);
    node_wait_leader(&n);
    json_int_t i1 = node_probe(&n);
    json_int_t i2 = node_probe(&n);
    ck_assert_int_eq(i2, i1 + 1);
    json_t *st = node_status(&n);
    ck_assert_int_ge(json_integer_value(json_object_get(st, "applied_index")), i2);
    ck_assert(json_is_true(json_object_get(st, "consensus_running")));
    ck_assert(json_is_false(json_object_get(st, "joining")));
    ck_assert(json_is_null(json_object_get(st, "storage_error")));
    json_t *members = json_object_get(st, "members");
    ck_assert_uint_eq(json_array_size(members), 1);
    ck_assert_str_eq(json_string_value(json_object_get(json_array_get(members, 0), "id")), "n1");
    ck_assert(json_is_true(json_object_get(json_array_get(members, 0), "voter")));
    char *raft_id = pb_xstrdup(json_string_value(json_object_get(st, "raft_id")));
    char *cluster_id = pb_xstrdup(json_string_value(json_object_get(st, "cluster_id")));
    ck_assert_uint_eq(strlen(raft_id), 16);
    ck_assert_uint_eq(strlen(cluster_id), 32);
    json_int_t term = json_integer_value(json_object_get(st, "term"));
    json_decref(st);
    node_stop(&n);

    /* The secret was generated, readable by the owner only. */
    char *secret = pb_xasprintf("%s/secret", cfg.state_dir);
    struct stat sb;
    ck_assert_int_eq(stat(secret, &sb), 0);
    ck_assert_uint_eq(sb.st_mode & 0777, 0600);
    free(secret);

    /* Restart from disk: same identity and state, a new term, probes go on. */
    node_start(&n, &cfg);
    st = node_status(&n);
    ck_assert_str_eq(json_string_value(json_object_get(st, "raft_id")), raft_id);
    ck_assert_str_eq(json_string_value(json_object_get(st, "cluster_id")), cluster_id);
    ck_assert_int_ge(json_integer_value(json_object_get(st, "applied_index")), i2);
    ck_assert_int_ge(json_integer_value(json_object_get(st, "last_index")), i2);
    json_decref(st);
    node_wait_leader(&n);
    json_int_t i3 = node_probe(&n);
    ck_assert_int_gt(i3, i2);
    st = node_status(&n);
    ck_assert_int_gt(json_integer_value(json_object_get(st, "term")), term);
    json_decref(st);

    /* A lone node with only probes in its log may not `join` elsewhere. */
    json_t *j =
            ctlcall(n.d.base, cfg.control_socket,
                    "{\"id\":3,\"method\":\"join\",\"params\":{\"address\":\"127.0.0.1:9\"}}\n");
    ck_assert_str_eq(json_string_value(json_object_get(json_object_get(j, "error"), "code")),
                     "INVALID_PARAMS");
    json_decref(j);
    /* Unknown members, bad params. */
    j = ctlcall(n.d.base, cfg.control_socket,
                "{\"id\":4,\"method\":\"remove\",\"params\":{\"node\":\"nope\"}}\n");
    ck_assert_str_eq(json_string_value(json_object_get(json_object_get(j, "error"), "code")),
                     "INVALID_PARAMS");
    json_decref(j);
    j = ctlcall(n.d.base, cfg.control_socket,
                "{\"id\":5,\"method\":\"probe\",\"params\":{\"size\":70000}}\n");
    ck_assert_str_eq(json_string_value(json_object_get(json_object_get(j, "error"), "code")),
                     "INVALID_PARAMS");
    json_decref(j);
    /* The last voter cannot leave. */
    j = ctlcall(n.d.base, cfg.control_socket, "{\"id\":5,\"method\":\"leave\"}\n");
    ck_assert_str_eq(json_string_value(json_object_get(json_object_get(j, "error"), "code")),
                     "INVALID_PARAMS");
    json_decref(j);
    /* Test hooks are off. */
    j = ctlcall(
            n.d.base, cfg.control_socket,
            "{\"id\":6,\"method\":\"debug_partition\",\"params\":{\"node\":\"x\",\"on\":true}}\n");
    ck_assert_str_eq(json_string_value(json_object_get(json_object_get(j, "error"), "code")),
                     "UNKNOWN_METHOD");
    json_decref(j);
    node_stop(&n);
    free(raft_id);
    free(cluster_id);
    config_free(&cfg);
}
END_TEST

/* Runs n's loop until no ready is in flight (and, with leader, until the
 * driver has seen the core's leader), for at most 10 s. */
static void node_settle(struct node *n, bool leader)
{
    struct cluster *c = n->d.cluster;
    uint64_t deadline = pb_now_ms() + 10000;
    while (c->frozen || c->scheduled || (leader && c->seen_leader != raft_leader(c->raft))) {
        ck_assert_msg(pb_now_ms() < deadline, "the node does not settle");
        event_base_loop(n->d.base, EVLOOP_NONBLOCK);
        poll(NULL, 0, 1);
    }
}

/* Proposals made while the core is frozen (a persist in flight) are queued
 * in order, then fed to the core: none is refused with -EBUSY, none lost,
 * none reordered; and the queue is bounded. */
START_TEST(test_cluster_propose_frozen)
{
    struct pb_config cfg;
    cfg_fill(&cfg);
    struct node n;
    node_start(&n, &cfg);
    node_wait_leader(&n);
    struct cluster *c = n.d.cluster;
    node_settle(&n, false);
    /* payloads starting with 0 are not fsm ops: applied as no-ops */
    static const uint8_t data[3][8] = {{0, 1}, {0, 2}, {0, 3}};
    uint64_t i1 = 0, i2 = 1, i3 = 1;
    ck_assert_int_eq(cluster_propose(c, 77, 1, data[0], sizeof(data[0]), &i1), 0);
    ck_assert_uint_gt(i1, 0);                   /* not frozen: taken by the core at once */
    event_base_loop(n.d.base, EVLOOP_NONBLOCK); /* its ready: the persist is in flight */
    ck_assert(c->frozen);
    ck_assert_int_eq(cluster_propose(c, 77, 2, data[1], sizeof(data[1]), &i2), 0);
    ck_assert_int_eq(cluster_propose(c, 77, 3, data[2], sizeof(data[2]), &i3), 0);
    ck_assert_uint_eq(i2, 0); /* queued: index not known yet */
    ck_assert_uint_eq(i3, 0);
    size_t big_len = (16u << 20) + 1;
    uint8_t *big = pb_xcalloc(1, big_len);
    ck_assert_int_eq(cluster_propose(c, 77, 4, big, big_len, NULL), -EBUSY); /* bounded */
    free(big);
    uint64_t deadline = pb_now_ms() + 10000;
    while (sm_applied(cluster_sm(c)) < i1 + 2) {
        ck_assert_msg(pb_now_ms() < deadline, "queued proposals not applied");
        event_base_loop(n.d.base, EVLOOP_NONBLOCK);
        poll(NULL, 0, 1);
    }
    for (uint64_t k = 0; k < 3; k++) {
        const struct raft_entry *e = raft_entry_at(c->raft, i1 + k);
        ck_assert_ptr_nonnull(e);
        ck_assert_uint_eq(e->client_id, 77);
        ck_assert_uint_eq(e->seq, k + 1);
        ck_assert_uint_eq(e->len, sizeof(data[k]));
        ck_assert_int_eq(memcmp(e->data, data[k], sizeof(data[k])), 0);
    }
    ck_assert_uint_eq(cluster_props_dropped(c), 0);
    node_stop(&n);
    config_free(&cfg);
}
END_TEST

START_TEST(test_cluster_probe_in_snapshot)
{
    /* A probe whose entry lies inside a snapshot the node installs gets no
     * apply callback (probes leave no session): the install proposes it
     * again at once. Here its first proposal is "lost" (its retry set an
     * hour away) and the driver reports an install. */
    struct pb_config cfg;
    cfg_fill(&cfg);
    struct node n;
    node_start(&n, &cfg);
    node_wait_leader(&n);
    struct cluster *c = n.d.cluster;
    /* Settled: no ready in flight, and the driver has seen itself become
     * leader (a leader change would propose the probe again too). */
    node_settle(&n, true);
    cluster_probe(c, NULL, 0, 60000);
    ck_assert_uint_eq(c->n_reqs, 1);
    struct creq *q = c->reqs;
    ck_assert_int_eq(q->kind, CREQ_PROBE);
    uint64_t client_id = ((uint64_t)c->client_prefix << 32) | (uint64_t)(q->slot + 1);
    uint64_t seq = q->seq;
    q->need_action = false;
    q->retry_at_ms = pb_now_ms() + 3600 * 1000;
    uint64_t before = sm_applied(cluster_sm(c));
    cluster_req_snapshot_installed(c);
    uint64_t deadline = pb_now_ms() + 10000;
    while (c->n_reqs > 0) {
        ck_assert_msg(pb_now_ms() < deadline, "the probe was not proposed again");
        event_base_loop(n.d.base, EVLOOP_NONBLOCK);
        poll(NULL, 0, 1);
    }
    /* Answered by its own entry, applied after the install. */
    uint64_t found = 0;
    for (uint64_t i = before + 1; i <= sm_applied(cluster_sm(c)); i++) {
        const struct raft_entry *e = raft_entry_at(c->raft, i);
        if (e != NULL && e->client_id == client_id && e->seq == seq)
            found = i;
    }
    ck_assert_uint_gt(found, before);
    node_stop(&n);
    config_free(&cfg);
}
END_TEST

START_TEST(test_cluster_snapshot_restart)
{
    /* Snapshots every 5 entries: raft.db is compacted and a restart still
     * comes back with every probe applied. */
    setenv("PICKBOX_TEST_SNAPSHOT_EVERY", "5", 1);
    struct pb_config cfg;
    cfg_fill(&cfg);
    struct node n;
    node_start(&n, &cfg);
    node_wait_leader(&n);
    json_int_t last = 0;
    for (int i = 0; i < 22; i++)
        last = node_probe(&n);
    json_t *st = node_status(&n);
    json_int_t snap = json_integer_value(json_object_get(st, "snapshot_index"));
    ck_assert_int_gt(snap, 0);
    ck_assert_int_le(snap, last);
    json_decref(st);
    node_stop(&n);
    node_start(&n, &cfg);
    st = node_status(&n);
    ck_assert_int_ge(json_integer_value(json_object_get(st, "applied_index")), last);
    ck_assert_int_ge(json_integer_value(json_object_get(st, "snapshot_index")), snap);
    json_decref(st);
    node_wait_leader(&n);
    json_t *j = ctlcall(n.d.base, cfg.control_socket, "{\"id\":2,\"method\":\"probe\"}\n");
    json_t *r = json_object_get(j, "result");
    last = json_integer_value(json_object_get(r, "index"));
    json_int_t last_term = json_integer_value(json_object_get(r, "term"));
    json_decref(j);
    node_stop(&n);

    /* A crash between taking a snapshot (state.db) and recording it in
     * raft.db: the restart records it. */
    struct sm *sm;
    struct pb_error err;
    ck_assert_int_eq(sm_open(&sm, cfg.state_dir, cfg.data_dir, &err), 0);
    ck_assert_int_eq(sm_applied(sm), last);
    uint64_t size;
    ck_assert_int_eq(sm_snapshot_take(sm, (uint64_t)last_term, &size, &err), 0);
    sm_close(sm);
    node_start(&n, &cfg);
    st = node_status(&n);
    ck_assert_int_eq(json_integer_value(json_object_get(st, "snapshot_index")), last);
    json_decref(st);
    node_stop(&n);
    node_start(&n, &cfg);
    st = node_status(&n);
    ck_assert_int_eq(json_integer_value(json_object_get(st, "snapshot_index")), last);
    ck_assert_int_ge(json_integer_value(json_object_get(st, "applied_index")), last);
    json_decref(st);
    node_stop(&n);
    unsetenv("PICKBOX_TEST_SNAPSHOT_EVERY");
    config_free(&cfg);
}
END_TEST

START_TEST(test_cluster_join_needs_secret)
{
    struct pb_config cfg;
    cfg_fill(&cfg);
    cfg.join = pb_xstrdup("127.0.0.1:9");
    cfg.secret_file = pb_xasprintf("%s/missing-secret", tmp);
    ck_assert_int_eq(mkdir(cfg.state_dir, 0700), 0);
    struct event_base *base = event_base_new();
    struct cluster_options co = {.cfg = &cfg, .base = base, .peer_fd = -1};
    struct cluster *c = NULL;
    struct pb_error err;
    ck_assert_int_eq(cluster_open(&c, &co, &err), -ENOENT);
    ck_assert_ptr_null(c);
    ck_assert_ptr_nonnull(strstr(err.msg, "--secret-file"));
    /* No secret was generated for a joining node. */
    ck_assert_int_eq(access(cfg.secret_file, F_OK), -1);

    /* With a secret it starts joining: not a member, no cluster id yet. */
    FILE *f = fopen(cfg.secret_file, "w");
    fputs("0123456789abcdef0123456789abcdef\n", f);
    fclose(f);
    ck_assert_int_eq(cluster_open(&c, &co, &err), 0);
    json_t *st = json_object();
    cluster_status_fill(c, st);
    ck_assert(json_is_true(json_object_get(st, "joining")));
    ck_assert(json_is_null(json_object_get(st, "cluster_id")));
    ck_assert_uint_eq(json_array_size(json_object_get(st, "members")), 0);
    ck_assert_str_eq(json_string_value(json_object_get(st, "role")), "follower");
    json_decref(st);
    cluster_close(c);
    event_base_free(base);
    config_free(&cfg);
}
END_TEST

/* Sends a request without waiting for its reply; returns the socket. */
static int send_only(const char *path, const char *line)
{
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un sun = {.sun_family = AF_UNIX};
    memcpy(sun.sun_path, path, strlen(path) + 1);
    ck_assert_int_eq(connect(fd, (struct sockaddr *)&sun, sizeof(sun)), 0);
    ck_assert_int_eq(write(fd, line, strlen(line)), (ssize_t)strlen(line));
    ck_assert_int_eq(fcntl(fd, F_SETFL, O_NONBLOCK), 0);
    return fd;
}

static void storage_fault_case(enum store_fault kind)
{
    struct pb_config cfg;
    cfg_fill(&cfg);
    struct node n;
    node_start(&n, &cfg);
    node_wait_leader(&n);
    json_int_t before = node_probe(&n);

    /* The next three write transactions fail: the batch of the probe and
     * the first two retry probes (100 ms, 200 ms backoff). */
    store_fault_inject(n.d.cluster->store, kind, 3);
    int fd = send_only(cfg.control_socket,
                       "{\"id\":9,\"method\":\"probe\",\"params\":{\"size\":10}}\n");
    /* The error shows in status while the probe waits. */
    uint64_t deadline = pb_now_ms() + 10000;
    bool seen = false;
    while (!seen) {
        ck_assert_msg(pb_now_ms() < deadline, "storage_error never shown");
        event_base_loop(n.d.base, EVLOOP_NONBLOCK);
        json_t *st = node_status(&n);
        json_t *se = json_object_get(st, "storage_error");
        if (json_is_object(se)) {
            seen = true;
            ck_assert(json_is_string(json_object_get(se, "message")));
            ck_assert(json_is_integer(json_object_get(se, "since_s")));
            /* Durable state unknown: it does not act as leader. */
            ck_assert_str_ne(json_string_value(json_object_get(st, "role")), "leader");
        }
        json_decref(st);
        poll(NULL, 0, 2);
    }
    /* It recovers by itself and the waiting probe commits exactly once. */
    char buf[4096];
    size_t len = 0;
    while (memchr(buf, '\n', len) == NULL) {
        ck_assert_msg(pb_now_ms() < deadline, "probe never answered");
        event_base_loop(n.d.base, EVLOOP_NONBLOCK);
        ssize_t r = read(fd, buf + len, sizeof(buf) - 1 - len);
        if (r > 0)
            len += (size_t)r;
        else
            poll(NULL, 0, 2);
    }
    close(fd);
    buf[len] = '\0';
    json_t *j = json_loads(buf, 0, NULL);
    ck_assert_ptr_nonnull(j);
    json_int_t idx = json_integer_value(json_object_get(json_object_get(j, "result"), "index"));
    ck_assert_int_eq(idx, before + 1);
    json_decref(j);
    json_t *st = node_status(&n);
    ck_assert(json_is_null(json_object_get(st, "storage_error")));
    json_decref(st);
    ck_assert_int_gt(node_probe(&n), idx);
    node_stop(&n);

    /* What was acknowledged is on disk. */
    node_start(&n, &cfg);
    st = node_status(&n);
    ck_assert_int_gt(json_integer_value(json_object_get(st, "applied_index")), idx);
    json_decref(st);
    node_stop(&n);
    config_free(&cfg);
}

START_TEST(test_cluster_storage_fsync_error)
{
    storage_fault_case(STORE_FAULT_IOERR_FSYNC);
}
END_TEST

START_TEST(test_cluster_storage_full)
{
    storage_fault_case(STORE_FAULT_FULL);
}
END_TEST

/* ---- three nodes in one process, on loopback ---- */

static const char *str_of(json_t *o, const char *key)
{
    const char *v = json_string_value(json_object_get(o, key));
    return v ? v : "";
}

/* True when every node of nodes[0..n) (skipping NULL) has n_voters voter
 * members, the same leader, and applied at least min_applied. */
static bool formed(struct node **nodes, size_t n, size_t n_voters, json_int_t min_applied)
{
    char leader[65] = "";
    for (size_t i = 0; i < n; i++) {
        if (nodes[i] == NULL)
            continue;
        json_t *st = node_status(nodes[i]);
        json_t *members = json_object_get(st, "members");
        size_t voters = 0;
        for (size_t k = 0; k < json_array_size(members); k++)
            voters += json_is_true(json_object_get(json_array_get(members, k), "voter"));
        bool ok = voters == n_voters && json_is_string(json_object_get(st, "leader_id")) &&
                  json_integer_value(json_object_get(st, "applied_index")) >= min_applied &&
                  (leader[0] == '\0' || strcmp(leader, str_of(st, "leader_id")) == 0);
        if (ok)
            snprintf(leader, sizeof(leader), "%s", str_of(st, "leader_id"));
        json_decref(st);
        if (!ok)
            return false;
    }
    return true;
}

static void wait_formed(struct node **nodes, size_t n, size_t n_voters, json_int_t min_applied)
{
    uint64_t deadline = pb_now_ms() + 20000;
    while (!formed(nodes, n, n_voters, min_applied)) {
        ck_assert_msg(pb_now_ms() < deadline, "the cluster did not form");
        event_base_loop(nodes[0] ? nodes[0]->d.base : nodes[1]->d.base, EVLOOP_NONBLOCK);
        poll(NULL, 0, 5);
    }
}

START_TEST(test_cluster_three_in_process)
{
    struct event_base *base = event_base_new();
    struct pb_config cfg[3];
    struct node nodes[3];
    struct node *np[3];
    struct pb_error err;
    for (int i = 0; i < 3; i++) {
        cfg_fill(&cfg[i]);
        free(cfg[i].node_id);
        cfg[i].node_id = pb_xasprintf("n%d", i + 1);
        free(cfg[i].state_dir);
        cfg[i].state_dir = pb_xasprintf("%s/n%d", tmp, i + 1);
        free(cfg[i].control_socket);
        cfg[i].control_socket = pb_xasprintf("%s/n%d.sock", tmp, i + 1);
        int fd;
        ck_assert_int_eq(listen_tcp("127.0.0.1", 0, &fd, &err), 0);
        struct sockaddr_in sin;
        socklen_t sl = sizeof(sin);
        ck_assert_int_eq(getsockname(fd, (struct sockaddr *)&sin, &sl), 0);
        free(cfg[i].advertise);
        cfg[i].advertise = pb_xasprintf("127.0.0.1:%u", ntohs(sin.sin_port));
        if (i > 0) {
            cfg[i].join = pb_xstrdup(cfg[0].advertise);
            cfg[i].secret_file = pb_xasprintf("%s/n1/secret", tmp);
        }
        node_start_on(&nodes[i], &cfg[i], base, fd);
        np[i] = &nodes[i];
        if (i == 0)
            node_wait_leader(&nodes[0]);
    }
    /* They join as learners, get promoted, and agree on one leader. */
    wait_formed(np, 3, 3, 0);

    /* A probe through a follower is forwarded, committed and applied on
     * every node. */
    json_t *st = node_status(&nodes[0]);
    int leader = str_of(st, "leader_id")[1] - '1';
    json_decref(st);
    int follower = (leader + 1) % 3;
    json_int_t idx = node_probe(&nodes[follower]);
    wait_formed(np, 3, 3, idx);

    /* The leader stops: the other two elect a new one and commit. */
    node_stop(&nodes[leader]);
    np[leader] = NULL;
    int survivor = (leader + 1) % 3;
    uint64_t deadline = pb_now_ms() + 20000;
    json_int_t idx2 = 0;
    while (idx2 == 0) {
        ck_assert_msg(pb_now_ms() < deadline, "no commit after the leader stopped");
        json_t *j = ctlcall(base, cfg[survivor].control_socket,
                            "{\"id\":7,\"method\":\"probe\",\"params\":{\"timeout_s\":0.5}}\n");
        idx2 = json_integer_value(json_object_get(json_object_get(j, "result"), "index"));
        json_decref(j);
    }
    ck_assert_int_gt(idx2, idx);
    /* The survivors still list three voters (the stopped node was not
     * removed) and agree. */
    wait_formed(np, 3, 3, idx2);

    /* remove the stopped node through a follower of the new leader (or the
     * leader itself): two voters remain. */
    char *line = pb_xasprintf("{\"id\":8,\"method\":\"remove\",\"params\":{\"node\":\"n%d\"}}\n",
                              leader + 1);
    json_t *j = ctlcall(base, cfg[survivor].control_socket, line);
    free(line);
    char want[8];
    snprintf(want, sizeof(want), "n%d", leader + 1);
    ck_assert_str_eq(str_of(json_object_get(j, "result"), "removed"), want);
    json_decref(j);
    wait_formed(np, 3, 2, idx2);

    for (int i = 0; i < 3; i++) {
        if (np[i] != NULL)
            node_stop(np[i]);
        config_free(&cfg[i]);
    }
    event_base_free(base);
}
END_TEST

static Suite *cluster_suite(void)
{
    Suite *s = suite_create("cluster");
    TCase *tc = tcase_create("cluster");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_ctx_roundtrip);
    tcase_add_test(tc, test_secret);
    tcase_add_test(tc, test_cluster_lone_restart);
    tcase_add_test(tc, test_cluster_snapshot_restart);
    tcase_add_test(tc, test_cluster_propose_frozen);
    tcase_add_test(tc, test_cluster_probe_in_snapshot);
    tcase_add_test(tc, test_cluster_join_needs_secret);
    tcase_add_test(tc, test_cluster_storage_fsync_error);
    tcase_add_test(tc, test_cluster_storage_full);
    tcase_add_test(tc, test_cluster_three_in_process);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(cluster_suite());
    srunner_run_all(sr, CK_ENV);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}

/*
 * check_net.c: unit tests for src/net: the frame codec, the handshake state
 * machine, the transport over real loopback sockets in one event loop, and
 * name resolution off the loop (resolve.h; a stand-in getaddrinfo() that
 * waits for the test shows the loop running meanwhile).
 *
 * Socket tests never sleep: they run the loop until a condition holds or a
 * deadline passes (and fail on the deadline). Ports come from the kernel
 * (listen on 127.0.0.1:0).
 */
#include "config.h"

#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <event2/event.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>

#include "lib/buf.h"
#include "lib/error.h"
#include "lib/log.h"
#include "lib/util.h"
#include "net/frame.h"
#include "net/handshake.h"
#include "net/net.h"
#include "net/resolve.h"

/* ---- frame codec ---------------------------------------------------- */

static size_t frame_build(uint8_t *out, uint8_t type, uint8_t flags, const void *p, uint32_t len,
                          size_t tag_len)
{
    net_frame_encode_header(out, type, flags, len);
    memcpy(out + NET_FRAME_HDR_LEN, p, len);
    memset(out + NET_FRAME_HDR_LEN + len, 0xAA, tag_len);
    return NET_FRAME_HDR_LEN + len + tag_len;
}

START_TEST(test_frame_roundtrip)
{
    uint8_t buf[64];
    size_t n = frame_build(buf, 42, NET_FRAME_F_BULK | NET_FRAME_F_MORE, "hello", 5, 0);
    ck_assert_uint_eq(n, 13);
    ck_assert_uint_eq(buf[0], NET_FRAME_MAGIC);
    ck_assert_uint_eq(buf[1], NET_FRAME_VERSION);
    struct net_frame f;
    size_t need;
    ck_assert_int_eq(net_frame_decode(buf, n, NET_FRAME_MAX_PAYLOAD, 0, &f, &need, NULL), 13);
    ck_assert_uint_eq(f.type, 42);
    ck_assert_uint_eq(f.flags, NET_FRAME_F_BULK | NET_FRAME_F_MORE);
    ck_assert_uint_eq(f.len, 5);
    ck_assert_mem_eq(f.payload, "hello", 5);
    ck_assert_ptr_null(f.tag);

    /* With a tag; trailing bytes of a next frame are not consumed. */
    n = frame_build(buf, 16, 0, "xy", 2, NET_FRAME_TAG_LEN);
    buf[n] = NET_FRAME_MAGIC;
    ck_assert_int_eq(net_frame_decode(buf, n + 1, 100, NET_FRAME_TAG_LEN, &f, &need, NULL),
                     (long)n);
    ck_assert_ptr_eq(f.tag, buf + NET_FRAME_HDR_LEN + 2);
    ck_assert_uint_eq(f.tag[0], 0xAA);

    /* Empty payload. */
    n = frame_build(buf, 200, 0, "", 0, 0);
    ck_assert_int_eq(net_frame_decode(buf, n, 100, 0, &f, &need, NULL), 8);
    ck_assert_uint_eq(f.len, 0);
}
END_TEST

START_TEST(test_frame_need_more)
{
    uint8_t buf[64];
    size_t n = frame_build(buf, 20, 0, "abcdef", 6, NET_FRAME_TAG_LEN);
    struct net_frame f;
    size_t need;
    for (size_t i = 0; i < n; i++) {
        ck_assert_int_eq(net_frame_decode(buf, i, 100, NET_FRAME_TAG_LEN, &f, &need, NULL), 0);
        ck_assert_uint_eq(need, i < NET_FRAME_HDR_LEN ? NET_FRAME_HDR_LEN : n);
    }
    ck_assert_int_eq(net_frame_decode(buf, n, 100, NET_FRAME_TAG_LEN, &f, &need, NULL), (long)n);
}
END_TEST

START_TEST(test_frame_errors)
{
    uint8_t buf[64];
    struct net_frame f;
    struct pb_error err;
    size_t need;

    frame_build(buf, 20, 0, "a", 1, 0);
    buf[0] = 'G'; /* "GET / HTTP/1.1" */
    ck_assert_int_eq(net_frame_decode(buf, 9, 100, 0, &f, &need, &err), -EPROTO);
    ck_assert_ptr_nonnull(strstr(err.msg, "magic"));

    frame_build(buf, 20, 0, "a", 1, 0);
    buf[1] = 2;
    ck_assert_int_eq(net_frame_decode(buf, 9, 100, 0, &f, &need, &err), -EPROTONOSUPPORT);
    ck_assert_ptr_nonnull(strstr(err.msg, "version 2"));

    frame_build(buf, 0, 0, "a", 1, 0);
    ck_assert_int_eq(net_frame_decode(buf, 9, 100, 0, &f, &need, &err), -EPROTO);

    frame_build(buf, 20, 0x80, "a", 1, 0);
    ck_assert_int_eq(net_frame_decode(buf, 9, 100, 0, &f, &need, &err), -EPROTO);
    ck_assert_ptr_nonnull(strstr(err.msg, "flags"));

    frame_build(buf, 20, NET_FRAME_F_MORE, "a", 1, 0);
    ck_assert_int_eq(net_frame_decode(buf, 9, 100, 0, &f, &need, &err), -EPROTO);

    frame_build(buf, NET_FRAME_AUTH, NET_FRAME_F_BULK, "a", 1, 0);
    ck_assert_int_eq(net_frame_decode(buf, 9, 100, 0, &f, &need, &err), -EPROTO);

    /* An oversized length is refused from the header alone. */
    net_frame_encode_header(buf, 20, 0, 101);
    ck_assert_int_eq(net_frame_decode(buf, NET_FRAME_HDR_LEN, 100, 0, &f, &need, &err), -EMSGSIZE);
    net_frame_encode_header(buf, 20, 0, 0xFFFFFFFFu);
    ck_assert_int_eq(net_frame_decode(buf, NET_FRAME_HDR_LEN, SIZE_MAX, 0, &f, &need, &err),
                     -EMSGSIZE);
    /* max_payload is capped at the protocol's own limit. */
    net_frame_encode_header(buf, 20, 0, NET_FRAME_MAX_PAYLOAD + 1);
    ck_assert_int_eq(net_frame_decode(buf, NET_FRAME_HDR_LEN, SIZE_MAX, 0, &f, &need, &err),
                     -EMSGSIZE);
    net_frame_encode_header(buf, 20, 0, NET_FRAME_MAX_PAYLOAD);
    ck_assert_int_eq(net_frame_decode(buf, NET_FRAME_HDR_LEN, SIZE_MAX, 0, &f, &need, &err), 0);
    ck_assert_uint_eq(need, NET_FRAME_HDR_LEN + NET_FRAME_MAX_PAYLOAD);
}
END_TEST

/* ---- handshake ------------------------------------------------------ */

static const uint8_t SECRET[] = "0123456789abcdef-cluster-secret";
static const uint8_t OTHER_SECRET[] = "0123456789abcdef-cluster-secreT";
static const uint8_t CLUSTER[NET_CLUSTER_ID_LEN] = {1, 2,  3,  4,  5,  6,  7,  8,
                                                    9, 10, 11, 12, 13, 14, 15, 16};

static void local_init(struct net_hs_local *l, uint64_t id, const char *name, const uint8_t *secret,
                       const uint8_t *cluster)
{
    memset(l, 0, sizeof(*l));
    l->node_id = id;
    l->node_name = name;
    l->secret = secret;
    l->secret_len = sizeof(SECRET) - 1;
    if (cluster != NULL) {
        l->has_cluster_id = true;
        memcpy(l->cluster_id, cluster, NET_CLUSTER_ID_LEN);
    }
}

static void nonce_fill(uint8_t *n, uint8_t v)
{
    memset(n, v, NET_NONCE_LEN);
}

/* Feeds msg (type, payload) to hs, returns its result; reply in *reply. */
static int hs_feed(struct net_hs *hs, uint8_t type, const struct buf *msg, struct buf *reply,
                   uint8_t *reply_type, struct pb_error *err)
{
    buf_reset(reply);
    return net_hs_input(hs, type, msg->data, msg->len, reply, reply_type, err);
}

struct hs_run {
    struct net_hs a, b;
    struct buf hello_a, hello_b, auth_a, auth_b;
    int ra_hello, rb_hello, ra_auth, rb_auth;
    struct pb_error ea, eb;
};

/* Runs a full exchange between a (initiator) and b. */
static void hs_run(struct hs_run *r, const struct net_hs_local *la, const struct net_hs_local *lb,
                   uint64_t a_expects)
{
    uint8_t na[NET_NONCE_LEN], nb[NET_NONCE_LEN];
    uint8_t t;
    memset(r, 0, sizeof(*r));
    nonce_fill(na, 0x11);
    nonce_fill(nb, 0x22);
    net_hs_init(&r->a, la, true, a_expects, na);
    net_hs_init(&r->b, lb, false, 0, nb);
    net_hs_hello(&r->a, &r->hello_a);
    net_hs_hello(&r->b, &r->hello_b);
    r->rb_hello = hs_feed(&r->b, NET_FRAME_HELLO, &r->hello_a, &r->auth_b, &t, &r->eb);
    if (r->rb_hello == 0)
        ck_assert_uint_eq(t, NET_FRAME_AUTH);
    r->ra_hello = hs_feed(&r->a, NET_FRAME_HELLO, &r->hello_b, &r->auth_a, &t, &r->ea);
    if (r->ra_hello == 0)
        ck_assert_uint_eq(t, NET_FRAME_AUTH);
    if (r->ra_hello == 0 && r->rb_hello == 0) {
        struct buf scratch = BUF_INIT;
        r->ra_auth = hs_feed(&r->a, NET_FRAME_AUTH, &r->auth_b, &scratch, &t, &r->ea);
        r->rb_auth = hs_feed(&r->b, NET_FRAME_AUTH, &r->auth_a, &scratch, &t, &r->eb);
        buf_free(&scratch);
    }
}

static void hs_run_free(struct hs_run *r)
{
    net_hs_free(&r->a);
    net_hs_free(&r->b);
    buf_free(&r->hello_a);
    buf_free(&r->hello_b);
    buf_free(&r->auth_a);
    buf_free(&r->auth_b);
}

START_TEST(test_hs_success)
{
    struct net_hs_local la, lb;
    struct hs_run r;
    local_init(&la, 1, "alpha", SECRET, CLUSTER);
    local_init(&lb, 2, "beta", SECRET, CLUSTER);
    hs_run(&r, &la, &lb, 2);
    ck_assert_int_eq(r.ra_hello, 0);
    ck_assert_int_eq(r.rb_hello, 0);
    ck_assert_int_eq(r.ra_auth, 0);
    ck_assert_int_eq(r.rb_auth, 0);
    ck_assert_int_eq(r.a.state, NET_HS_DONE);
    ck_assert_int_eq(r.b.state, NET_HS_DONE);
    ck_assert_uint_eq(r.a.peer_id, 2);
    ck_assert_str_eq(r.a.peer_name, "beta");
    ck_assert_uint_eq(r.b.peer_id, 1);
    ck_assert_str_eq(r.b.peer_name, "alpha");
    ck_assert(r.b.peer_has_cluster_id);
    ck_assert_mem_eq(r.b.peer_cluster_id, CLUSTER, NET_CLUSTER_ID_LEN);
    /* Keys pair up crosswise and differ per direction. */
    ck_assert_mem_eq(r.a.key_send, r.b.key_recv, NET_KEY_LEN);
    ck_assert_mem_eq(r.a.key_recv, r.b.key_send, NET_KEY_LEN);
    ck_assert(memcmp(r.a.key_send, r.a.key_recv, NET_KEY_LEN) != 0);
    /* The MACs differ by role. */
    ck_assert_uint_eq(r.auth_a.len, NET_MAC_LEN);
    ck_assert(memcmp(r.auth_a.data, r.auth_b.data, NET_MAC_LEN) != 0);
    /* Nothing more is accepted after DONE. */
    struct buf reply = BUF_INIT;
    uint8_t t;
    ck_assert_int_eq(hs_feed(&r.a, NET_FRAME_AUTH, &r.auth_b, &reply, &t, NULL), -EPROTO);
    buf_free(&reply);
    hs_run_free(&r);
}
END_TEST

START_TEST(test_hs_wrong_secret)
{
    /* _i == 0: the responder has the wrong secret; 1: the initiator. */
    struct net_hs_local la, lb;
    struct hs_run r;
    local_init(&la, 1, "alpha", _i == 1 ? OTHER_SECRET : SECRET, CLUSTER);
    local_init(&lb, 2, "beta", _i == 0 ? OTHER_SECRET : SECRET, CLUSTER);
    hs_run(&r, &la, &lb, 2);
    ck_assert_int_eq(r.ra_hello, 0);
    ck_assert_int_eq(r.rb_hello, 0);
    /* Both ends notice, so both can say so. */
    ck_assert_int_eq(r.ra_auth, -EACCES);
    ck_assert_int_eq(r.rb_auth, -EACCES);
    ck_assert_int_eq(r.a.state, NET_HS_FAILED);
    ck_assert_ptr_nonnull(strstr(r.ea.msg, "secrets differ"));
    ck_assert_ptr_nonnull(strstr(r.eb.msg, "alpha"));
    hs_run_free(&r);
}
END_TEST

START_TEST(test_hs_version_mismatch)
{
    struct net_hs_local la;
    struct net_hs hs;
    uint8_t nonce[NET_NONCE_LEN];
    struct buf hello = BUF_INIT, reply = BUF_INIT;
    struct pb_error err;
    uint8_t t;
    local_init(&la, 1, "alpha", SECRET, CLUSTER);
    nonce_fill(nonce, 1);
    net_hs_init(&hs, &la, false, 0, nonce);
    net_hs_hello(&hs, &reply);
    buf_put_u16(&hello, 3); /* a future node speaking only 3..4 */
    buf_put_u16(&hello, 4);
    buf_put_u64(&hello, 7);
    ck_assert_int_eq(hs_feed(&hs, NET_FRAME_HELLO, &hello, &reply, &t, &err), -EPROTONOSUPPORT);
    ck_assert_ptr_nonnull(strstr(err.msg, "peer speaks 3..4, this node speaks 1..2"));
    ck_assert_uint_eq(t, 0);
    net_hs_free(&hs);

    /* A later node that still speaks 2 is accepted, trailing extensions too. */
    struct net_hs_local lb;
    struct net_hs b;
    local_init(&lb, 2, "beta", SECRET, CLUSTER);
    net_hs_init(&hs, &la, false, 0, nonce);
    nonce_fill(nonce, 2);
    net_hs_init(&b, &lb, true, 0, nonce);
    buf_reset(&hello);
    net_hs_hello(&hs, &reply);
    net_hs_hello(&b, &hello);
    hello.data[3] = 5; /* version_max 5 */
    buf_put(&hello, "ext", 3);
    ck_assert_int_eq(hs_feed(&hs, NET_FRAME_HELLO, &hello, &reply, &t, &err), 0);
    ck_assert_uint_eq(t, NET_FRAME_AUTH);
    ck_assert_uint_eq(hs.version, 2);
    net_hs_free(&hs);
    net_hs_free(&b);
    buf_free(&hello);
    buf_free(&reply);
}
END_TEST

/* A node speaking only version 1 (before D13's push) and one speaking 1..2
 * authenticate and agree on version 1, whoever dials; two 1..2 nodes on 2. */
START_TEST(test_hs_version_mixed)
{
    struct net_hs_local la, lb;
    struct hs_run r;
    local_init(&la, 1, "alpha", SECRET, CLUSTER);
    local_init(&lb, 2, "beta", SECRET, CLUSTER);
    if (_i == 0)
        la.version_max = 1;
    else if (_i == 1)
        lb.version_max = 1;
    hs_run(&r, &la, &lb, 2);
    ck_assert_int_eq(r.a.state, NET_HS_DONE);
    ck_assert_int_eq(r.b.state, NET_HS_DONE);
    unsigned want = _i == 2 ? 2 : 1;
    ck_assert_uint_eq(r.a.version, want);
    ck_assert_uint_eq(r.b.version, want);
    hs_run_free(&r);
}
END_TEST

START_TEST(test_hs_tampered_hello)
{
    /* Someone on the path changes one byte of a HELLO (here the name):
     * both transcripts differ, so both MACs fail. */
    struct net_hs_local la, lb;
    struct net_hs a, b;
    uint8_t na[NET_NONCE_LEN], nb[NET_NONCE_LEN];
    struct buf ha = BUF_INIT, hb = BUF_INIT, aa = BUF_INIT, ab = BUF_INIT, x = BUF_INIT;
    uint8_t t;
    local_init(&la, 1, "alpha", SECRET, CLUSTER);
    local_init(&lb, 2, "beta", SECRET, CLUSTER);
    nonce_fill(na, 3);
    nonce_fill(nb, 4);
    net_hs_init(&a, &la, true, 2, na);
    net_hs_init(&b, &lb, false, 0, nb);
    net_hs_hello(&a, &ha);
    net_hs_hello(&b, &hb);
    ha.data[ha.len - NET_NONCE_LEN - 1] = 'A'; /* "alphA" */
    ck_assert_int_eq(hs_feed(&b, NET_FRAME_HELLO, &ha, &ab, &t, NULL), 0);
    ck_assert_str_eq(b.peer_name, "alphA");
    ck_assert_int_eq(hs_feed(&a, NET_FRAME_HELLO, &hb, &aa, &t, NULL), 0);
    ck_assert_int_eq(hs_feed(&a, NET_FRAME_AUTH, &ab, &x, &t, NULL), -EACCES);
    ck_assert_int_eq(hs_feed(&b, NET_FRAME_AUTH, &aa, &x, &t, NULL), -EACCES);
    net_hs_free(&a);
    net_hs_free(&b);
    buf_free(&ha);
    buf_free(&hb);
    buf_free(&aa);
    buf_free(&ab);
    buf_free(&x);
}
END_TEST

START_TEST(test_hs_replay_and_reflection)
{
    struct net_hs_local la, lb;
    struct hs_run r;
    struct buf reply = BUF_INIT;
    struct pb_error err;
    uint8_t t;
    local_init(&la, 1, "alpha", SECRET, CLUSTER);
    local_init(&lb, 2, "beta", SECRET, CLUSTER);
    hs_run(&r, &la, &lb, 2);
    ck_assert_int_eq(r.rb_auth, 0);

    /* Replay: a recorder of that session connects to b again with a's HELLO
     * and AUTH; b's fresh nonce makes the old AUTH worthless. */
    struct net_hs b2;
    uint8_t nb[NET_NONCE_LEN];
    nonce_fill(nb, 0x33);
    net_hs_init(&b2, &lb, false, 0, nb);
    net_hs_hello(&b2, &reply);
    ck_assert_int_eq(hs_feed(&b2, NET_FRAME_HELLO, &r.hello_a, &reply, &t, &err), 0);
    ck_assert_int_eq(hs_feed(&b2, NET_FRAME_AUTH, &r.auth_a, &reply, &t, &err), -EACCES);
    net_hs_free(&b2);

    /* Same nonce reused by b (a broken RNG) would accept it: the nonce is
     * the only freshness, so this shows the test above is meaningful. */
    nonce_fill(nb, 0x22);
    net_hs_init(&b2, &lb, false, 0, nb);
    net_hs_hello(&b2, &reply);
    ck_assert_int_eq(hs_feed(&b2, NET_FRAME_HELLO, &r.hello_a, &reply, &t, &err), 0);
    ck_assert_int_eq(hs_feed(&b2, NET_FRAME_AUTH, &r.auth_a, &reply, &t, &err), 0);
    net_hs_free(&b2);

    /* Reflection: b's own AUTH sent back to it fails (role label). */
    net_hs_init(&b2, &lb, false, 0, nb);
    net_hs_hello(&b2, &reply);
    ck_assert_int_eq(hs_feed(&b2, NET_FRAME_HELLO, &r.hello_a, &reply, &t, &err), 0);
    struct buf own = BUF_INIT;
    buf_put(&own, reply.data, reply.len);
    ck_assert_int_eq(hs_feed(&b2, NET_FRAME_AUTH, &own, &reply, &t, &err), -EACCES);
    net_hs_free(&b2);

    /* Reflection of the HELLO itself (same nonce) is refused outright. */
    net_hs_init(&b2, &lb, false, 0, nb);
    buf_reset(&own);
    net_hs_hello(&b2, &own);
    ck_assert_int_eq(hs_feed(&b2, NET_FRAME_HELLO, &own, &reply, &t, &err), -EPROTO);
    ck_assert_ptr_nonnull(strstr(err.msg, "reflected"));
    net_hs_free(&b2);
    buf_free(&own);
    buf_free(&reply);
    hs_run_free(&r);
}
END_TEST

START_TEST(test_hs_identity_rules)
{
    struct net_hs_local la, lb;
    struct hs_run r;
    static const uint8_t OTHER_CLUSTER[NET_CLUSTER_ID_LEN] = {9};

    /* Dialed node 3 but node 2 answered. */
    local_init(&la, 1, "alpha", SECRET, CLUSTER);
    local_init(&lb, 2, "beta", SECRET, CLUSTER);
    hs_run(&r, &la, &lb, 3);
    ck_assert_int_eq(r.ra_hello, -ECONNREFUSED);
    ck_assert_ptr_nonnull(strstr(r.ea.msg, "dialed node 3 but node 2 (beta) answered"));
    hs_run_free(&r);

    /* Another cluster. */
    local_init(&lb, 2, "beta", SECRET, OTHER_CLUSTER);
    hs_run(&r, &la, &lb, 0);
    ck_assert_int_eq(r.ra_hello, -ECONNREFUSED);
    ck_assert_int_eq(r.rb_hello, -ECONNREFUSED);
    ck_assert_ptr_nonnull(strstr(r.eb.msg, "another cluster"));
    hs_run_free(&r);

    /* Our own id. */
    local_init(&lb, 1, "beta", SECRET, CLUSTER);
    hs_run(&r, &la, &lb, 0);
    ck_assert_int_eq(r.ra_hello, -ECONNREFUSED);
    ck_assert_ptr_nonnull(strstr(r.ea.msg, "our own node id"));
    hs_run_free(&r);

    /* Node id 0. */
    local_init(&lb, 0, "beta", SECRET, CLUSTER);
    hs_run(&r, &la, &lb, 0);
    ck_assert_int_eq(r.ra_hello, -ECONNREFUSED);
    hs_run_free(&r);

    /* A joining node (no cluster id) with the secret is accepted, and
     * learns the cluster id; the secret is what authorizes it. */
    local_init(&lb, 2, "joiner", SECRET, NULL);
    hs_run(&r, &la, &lb, 0);
    ck_assert_int_eq(r.ra_auth, 0);
    ck_assert_int_eq(r.rb_auth, 0);
    ck_assert(!r.a.peer_has_cluster_id);
    ck_assert(r.b.peer_has_cluster_id);
    ck_assert_mem_eq(r.b.peer_cluster_id, CLUSTER, NET_CLUSTER_ID_LEN);
    hs_run_free(&r);

    /* ... but not without it. */
    local_init(&lb, 2, "joiner", OTHER_SECRET, NULL);
    hs_run(&r, &la, &lb, 0);
    ck_assert_int_eq(r.ra_auth, -EACCES);
    ck_assert_int_eq(r.rb_auth, -EACCES);
    hs_run_free(&r);
}
END_TEST

START_TEST(test_hs_malformed)
{
    struct net_hs_local la;
    struct net_hs hs;
    uint8_t nonce[NET_NONCE_LEN];
    struct buf good = BUF_INIT, m = BUF_INIT, reply = BUF_INIT;
    uint8_t t;
    local_init(&la, 1, "alpha", SECRET, CLUSTER);
    struct net_hs_local lb;
    struct net_hs other;
    local_init(&lb, 2, "beta", SECRET, CLUSTER);
    nonce_fill(nonce, 9);
    net_hs_init(&other, &lb, true, 0, nonce);
    net_hs_hello(&other, &good);
    nonce_fill(nonce, 8);

    /* Every truncation of a valid HELLO is refused. */
    for (size_t i = 0; i < good.len; i++) {
        net_hs_init(&hs, &la, false, 0, nonce);
        net_hs_hello(&hs, &reply);
        buf_reset(&m);
        buf_put(&m, good.data, i);
        ck_assert_int_eq(hs_feed(&hs, NET_FRAME_HELLO, &m, &reply, &t, NULL), -EPROTO);
        ck_assert_int_eq(hs.state, NET_HS_FAILED);
        net_hs_free(&hs);
    }
    /* AUTH before HELLO; HELLO twice; wrong AUTH length; input before start. */
    net_hs_init(&hs, &la, false, 0, nonce);
    ck_assert_int_eq(hs_feed(&hs, NET_FRAME_HELLO, &good, &reply, &t, NULL), -EPROTO);
    net_hs_free(&hs);
    net_hs_init(&hs, &la, false, 0, nonce);
    net_hs_hello(&hs, &reply);
    ck_assert_int_eq(hs_feed(&hs, NET_FRAME_AUTH, &good, &reply, &t, NULL), -EPROTO);
    net_hs_free(&hs);
    net_hs_init(&hs, &la, false, 0, nonce);
    net_hs_hello(&hs, &reply);
    ck_assert_int_eq(hs_feed(&hs, NET_FRAME_HELLO, &good, &reply, &t, NULL), 0);
    ck_assert_int_eq(hs_feed(&hs, NET_FRAME_HELLO, &good, &reply, &t, NULL), -EPROTO);
    net_hs_free(&hs);
    net_hs_init(&hs, &la, false, 0, nonce);
    net_hs_hello(&hs, &reply);
    ck_assert_int_eq(hs_feed(&hs, NET_FRAME_HELLO, &good, &reply, &t, NULL), 0);
    buf_reset(&m);
    buf_put(&m, reply.data, NET_MAC_LEN - 1);
    ck_assert_int_eq(hs_feed(&hs, NET_FRAME_AUTH, &m, &reply, &t, NULL), -EPROTO);
    net_hs_free(&hs);

    /* A name with a control character (it would end up in logs). */
    buf_reset(&m);
    buf_put_u16(&m, 1);
    buf_put_u16(&m, 1);
    buf_put_u64(&m, 2);
    buf_put_bytes(&m, CLUSTER, NET_CLUSTER_ID_LEN);
    buf_put_str(&m, "be\nta");
    buf_put(&m, nonce, NET_NONCE_LEN);
    m.data[m.len - 1] ^= 1;
    struct pb_error err;
    net_hs_init(&hs, &la, false, 0, nonce);
    net_hs_hello(&hs, &reply);
    ck_assert_int_eq(hs_feed(&hs, NET_FRAME_HELLO, &m, &reply, &t, &err), -EPROTO);
    ck_assert_ptr_nonnull(strstr(err.msg, "invalid node name"));
    net_hs_free(&hs);
    /* A cluster id of the wrong length. */
    buf_reset(&m);
    buf_put_u16(&m, 1);
    buf_put_u16(&m, 1);
    buf_put_u64(&m, 2);
    buf_put_bytes(&m, CLUSTER, 8);
    buf_put_str(&m, "beta");
    buf_put(&m, good.data + good.len - NET_NONCE_LEN, NET_NONCE_LEN);
    net_hs_init(&hs, &la, false, 0, nonce);
    net_hs_hello(&hs, &reply);
    ck_assert_int_eq(hs_feed(&hs, NET_FRAME_HELLO, &m, &reply, &t, &err), -EPROTO);
    ck_assert_ptr_nonnull(strstr(err.msg, "malformed HELLO"));
    net_hs_free(&hs);

    ck_assert(net_hs_name_valid("n1", 2));
    ck_assert(!net_hs_name_valid("", 0));
    ck_assert(!net_hs_name_valid("a b", 3));
    net_hs_free(&other);
    buf_free(&good);
    buf_free(&m);
    buf_free(&reply);
}
END_TEST

/* ---- transport over loopback sockets ----------------------------------- */

#define T_MAXN      4
#define T_MAXID     10
#define T_DEADLINE  20000
#define T_CTL       20 /* control message: u32 seq */
#define T_PING      21 /* control message: u64 receiver's bytes_recv at send time */
#define T_BULK      30 /* bulk message: u32 index, then a pattern */
#define T_BLOB      31 /* any size, either class: recorded with a hash */
#define T_BULK_MSG  (1024u * 1024u)
#define T_BULK_MSGS 64u

struct trec {
    uint64_t from;
    uint8_t type;
    uint32_t seq;
    size_t len;
    uint64_t hash;
};

static uint64_t fnv1a(const uint8_t *p, size_t n)
{
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++)
        h = (h ^ p[i]) * 0x100000001b3ull;
    return h;
}

struct tworld;

struct tnode {
    struct tworld *w;
    struct net *net;
    uint64_t id;
    char name[16];
    char addr[32];
    uint16_t port;
    int up[T_MAXID], ups[T_MAXID], downs[T_MAXID];
    struct trec *recs;
    size_t nrecs, cap;
    int drains;
    uint64_t remove_on_frame; /* peer to remove from inside on_frame */
    /* bulk receive side */
    uint64_t bulk_bytes;
    unsigned bulk_msgs;
    bool bulk_bad;
    uint64_t ping_max_delta;
    unsigned pings, pings_during_bulk;
};

struct tworld {
    struct event_base *base;
    struct event *tick;
    struct tnode n[T_MAXN];
    /* bulk test: A pings B from the tick */
    struct tnode *ping_from, *ping_to;
};

static void t_on_frame(void *arg, uint64_t from, uint8_t type, const uint8_t *p, size_t len)
{
    struct tnode *n = arg;
    if (n->remove_on_frame == from) {
        n->remove_on_frame = 0;
        ck_assert_int_eq(net_peer_remove(n->net, from), 0);
    }
    if (type == T_BULK) {
        uint32_t k = len >= 4 ? pb_load_u32(p) : 0;
        if (len != T_BULK_MSG || k != n->bulk_msgs)
            n->bulk_bad = true;
        for (size_t i = 4; i < len && !n->bulk_bad; i++)
            if (p[i] != (uint8_t)(k * 131 + i * 7))
                n->bulk_bad = true;
        n->bulk_bytes += len;
        n->bulk_msgs++;
        return;
    }
    if (type == T_PING) {
        ck_assert_uint_eq(len, 8);
        /* Frame bytes that arrived between the send and the delivery of
         * this ping (frame granularity, not message). */
        uint64_t then = pb_load_u64(p);
        struct net_peer_stats st;
        ck_assert_int_eq(net_peer_stats(n->net, from, &st), 0);
        ck_assert_uint_ge(st.bytes_recv, then);
        if (st.bytes_recv - then > n->ping_max_delta)
            n->ping_max_delta = st.bytes_recv - then;
        n->pings++;
        if (n->bulk_bytes > 0 && n->bulk_bytes < (uint64_t)T_BULK_MSG * T_BULK_MSGS)
            n->pings_during_bulk++;
        return;
    }
    if (n->nrecs == n->cap) {
        n->cap = n->cap ? n->cap * 2 : 64;
        n->recs = pb_xreallocarray(n->recs, n->cap, sizeof(*n->recs));
    }
    n->recs[n->nrecs++] =
            (struct trec){from, type, len >= 4 ? pb_load_u32(p) : UINT32_MAX, len, fnv1a(p, len)};
}

static void t_on_peer_state(void *arg, uint64_t id, bool up)
{
    struct tnode *n = arg;
    ck_assert_uint_lt(id, T_MAXID);
    /* Transitions only, never up twice or down twice in a row. */
    ck_assert_int_eq(n->up[id], up ? 0 : 1);
    n->up[id] = up;
    if (up)
        n->ups[id]++;
    else
        n->downs[id]++;
}

static void t_on_drain(void *arg, uint64_t id)
{
    struct tnode *n = arg;
    n->drains++;
}

static void t_tick(evutil_socket_t fd, short what, void *arg)
{
    struct tworld *w = arg;
    if (w->ping_from != NULL && w->ping_from->up[w->ping_to->id]) {
        uint8_t p[8];
        struct net_peer_stats st;
        ck_assert_int_eq(net_peer_stats(w->ping_to->net, w->ping_from->id, &st), 0);
        pb_store_u64(p, st.bytes_recv);
        int r = net_send(w->ping_from->net, w->ping_to->id, NET_CLASS_CONTROL, T_PING, p, 8);
        ck_assert_int_eq(r, 0);
    }
}

static void w_init(struct tworld *w, unsigned tick_ms)
{
    memset(w, 0, sizeof(*w));
    log_set_level(LOG_LEVEL_WARNING);
    w->base = event_base_new();
    ck_assert_ptr_nonnull(w->base);
    /* Keeps the loop turning so that deadlines are checked. */
    w->tick = event_new(w->base, -1, EV_PERSIST, t_tick, w);
    struct timeval tv = {0, (suseconds_t)tick_ms * 1000};
    event_add(w->tick, &tv);
}

static void node_stop(struct tnode *n)
{
    net_free(n->net);
    n->net = NULL;
    memset(n->up, 0, sizeof(n->up));
}

static void w_free(struct tworld *w)
{
    for (int i = 0; i < T_MAXN; i++) {
        node_stop(&w->n[i]);
        free(w->n[i].recs);
    }
    event_free(w->tick);
    event_base_free(w->base);
}

/* Starts node i with the given id on 127.0.0.1 (port 0: a free one). */
static struct tnode *node_start_cfg(struct tworld *w, int i, uint64_t id, const uint8_t *secret,
                                    const uint8_t *cluster, uint16_t port,
                                    const struct net_config *tweak)
{
    struct tnode *n = &w->n[i];
    struct net_config cfg;
    struct pb_error err;
    if (tweak != NULL)
        cfg = *tweak;
    else
        memset(&cfg, 0, sizeof(cfg));
    n->w = w;
    n->id = id;
    snprintf(n->name, sizeof(n->name), "n%llu", (unsigned long long)id);
    cfg.node_id = id;
    cfg.node_name = n->name;
    cfg.secret = secret;
    cfg.secret_len = sizeof(SECRET) - 1;
    cfg.cluster_id = cluster;
    cfg.cb.on_frame = t_on_frame;
    cfg.cb.on_peer_state = t_on_peer_state;
    cfg.cb.on_drain = t_on_drain;
    cfg.cb_arg = n;
    cfg.seed = id;
    n->net = net_new(w->base, &cfg, &err);
    ck_assert_msg(n->net != NULL, "%s", err.msg);
    char listen[32];
    snprintf(listen, sizeof(listen), "127.0.0.1:%u", (unsigned)port);
    ck_assert_msg(net_listen(n->net, listen, &err) == 0, "%s", err.msg);
    n->port = net_local_port(n->net);
    ck_assert_uint_ne(n->port, 0);
    ck_assert(port == 0 || n->port == port);
    snprintf(n->addr, sizeof(n->addr), "127.0.0.1:%u", (unsigned)n->port);
    return n;
}

static struct tnode *node_start(struct tworld *w, int i, uint64_t id)
{
    return node_start_cfg(w, i, id, SECRET, CLUSTER, 0, NULL);
}

static void node_add(struct tnode *n, const struct tnode *peer)
{
    struct pb_error err;
    ck_assert_msg(net_peer_add(n->net, peer->id, peer->addr, &err) == 0, "%s", err.msg);
}

/* Runs the loop until cond holds; fails the test at the deadline. */
#define WAIT_FOR(w, cond)                                                                          \
    do {                                                                                           \
        uint64_t dl_ = pb_now_ms() + T_DEADLINE;                                                   \
        while (!(cond)) {                                                                          \
            ck_assert_msg(pb_now_ms() < dl_, "timed out waiting for %s", #cond);                   \
            event_base_loop((w)->base, EVLOOP_ONCE);                                               \
        }                                                                                          \
    } while (0)

static struct net_stats nstats(const struct tnode *n)
{
    struct net_stats s;
    net_get_stats(n->net, &s);
    return s;
}

static struct net_peer_stats pstats(const struct tnode *n, uint64_t id)
{
    struct net_peer_stats s;
    ck_assert_int_eq(net_peer_stats(n->net, id, &s), 0);
    return s;
}

static void send_ctl(struct tnode *n, uint64_t to, uint32_t seq)
{
    uint8_t p[12] = {0};
    pb_store_u32(p, seq);
    ck_assert_int_eq(net_send(n->net, to, NET_CLASS_CONTROL, T_CTL, p, sizeof(p)), 0);
}

/* Messages from `from` arrived at n exactly as seq first..first+count-1, in order. */
static void assert_seqs(const struct tnode *n, uint64_t from, uint32_t first, uint32_t count)
{
    uint32_t want = first;
    for (size_t i = 0; i < n->nrecs; i++) {
        if (n->recs[i].from != from)
            continue;
        ck_assert_uint_eq(n->recs[i].type, T_CTL);
        ck_assert_uint_eq(n->recs[i].seq, want);
        want++;
    }
    ck_assert_uint_eq(want, first + count);
}

static size_t count_from(const struct tnode *n, uint64_t from)
{
    size_t c = 0;
    for (size_t i = 0; i < n->nrecs; i++)
        c += n->recs[i].from == from;
    return c;
}

START_TEST(test_net_two_nodes)
{
    struct tworld w;
    w_init(&w, 5);
    struct tnode *a = node_start(&w, 0, 1);
    struct tnode *b = node_start(&w, 1, 2);
    /* Both dial at once: the lower id's connection must win on both ends. */
    node_add(a, b);
    node_add(b, a);
    WAIT_FOR(&w, a->up[2] && b->up[1]);
    for (uint32_t i = 0; i < 300; i++) {
        send_ctl(a, 2, i);
        send_ctl(b, 1, 1000 + i);
    }
    WAIT_FOR(&w, count_from(b, 1) == 300 && count_from(a, 2) == 300);
    assert_seqs(b, 1, 0, 300);
    assert_seqs(a, 2, 1000, 300);
    WAIT_FOR(&w, pstats(a, 2).initiated && !pstats(b, 1).initiated);

    struct net_peer_stats s = pstats(a, 2);
    ck_assert(s.connected);
    ck_assert_str_eq(s.name, "n2");
    ck_assert_str_eq(s.addr, b->addr);
    ck_assert(s.has_cluster_id);
    ck_assert_uint_ge(s.frames_sent, 300);
    ck_assert_uint_ge(s.frames_recv, 300);
    ck_assert_uint_ge(s.bytes_sent, 300 * (NET_FRAME_HDR_LEN + 12 + NET_FRAME_TAG_LEN));
    ck_assert_uint_gt(s.last_contact_ms, 0);
    ck_assert_uint_ge(nstats(a).hs_ok, 1);
    ck_assert_uint_eq(nstats(a).auth_failed, 0);
    uint64_t ids[4];
    ck_assert_uint_eq(net_peer_ids(a->net, ids, 4), 1);
    ck_assert_uint_eq(ids[0], 2);
    w_free(&w);
}
END_TEST

START_TEST(test_net_three_nodes_and_listen_fd)
{
    struct tworld w;
    struct pb_error err;
    w_init(&w, 5);
    struct tnode *a = node_start(&w, 0, 1);
    struct tnode *b = node_start(&w, 1, 2);
    /* c listens on a socket made elsewhere (as systemd would pass it). */
    struct tnode *c = &w.n[2];
    {
        struct net_config cfg;
        memset(&cfg, 0, sizeof(cfg));
        c->w = &w;
        c->id = 3;
        snprintf(c->name, sizeof(c->name), "n3");
        cfg.node_id = 3;
        cfg.node_name = c->name;
        cfg.secret = SECRET;
        cfg.secret_len = sizeof(SECRET) - 1;
        cfg.cluster_id = CLUSTER;
        cfg.cb = (struct net_callbacks){t_on_frame, t_on_peer_state, t_on_drain};
        cfg.cb_arg = c;
        c->net = net_new(w.base, &cfg, &err);
        ck_assert_ptr_nonnull(c->net);
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        struct sockaddr_in sin = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(0x7f000001)};
        ck_assert_int_eq(bind(fd, (struct sockaddr *)&sin, sizeof(sin)), 0);
        ck_assert_int_eq(listen(fd, 16), 0);
        ck_assert_int_eq(net_listen_fd(c->net, fd, &err), 0);
        c->port = net_local_port(c->net);
        snprintf(c->addr, sizeof(c->addr), "127.0.0.1:%u", (unsigned)c->port);
    }
    struct tnode *all[3] = {a, b, c};
    for (int i = 0; i < 3; i++)
        for (int j = 0; j < 3; j++)
            if (i != j)
                node_add(all[i], all[j]);
    WAIT_FOR(&w, a->up[2] && a->up[3] && b->up[1] && b->up[3] && c->up[1] && c->up[2]);
    for (uint32_t k = 0; k < 50; k++)
        for (int i = 0; i < 3; i++)
            for (int j = 0; j < 3; j++)
                if (i != j)
                    send_ctl(all[i], all[j]->id, k);
    WAIT_FOR(&w, a->nrecs == 100 && b->nrecs == 100 && c->nrecs == 100);
    for (int i = 0; i < 3; i++)
        for (int j = 0; j < 3; j++)
            if (i != j)
                assert_seqs(all[j], all[i]->id, 0, 50);
    w_free(&w);
}
END_TEST

START_TEST(test_net_wrong_secret_refused)
{
    struct tworld w;
    w_init(&w, 5);
    struct tnode *a = node_start(&w, 0, 1);
    struct tnode *c = node_start_cfg(&w, 1, 3, OTHER_SECRET, CLUSTER, 0, NULL);
    node_add(c, a);
    node_add(a, c);
    /* Several attempts in both directions, each refused by both ends. */
    WAIT_FOR(&w, nstats(a).auth_failed >= 3 && nstats(c).auth_failed >= 3);
    ck_assert_int_eq(a->ups[3], 0);
    ck_assert_int_eq(c->ups[1], 0);
    ck_assert_int_eq(net_send(c->net, 1, NET_CLASS_CONTROL, T_CTL, "abcd", 4), -ENOTCONN);
    ck_assert_int_eq(net_send(a->net, 3, NET_CLASS_CONTROL, T_CTL, "abcd", 4), -ENOTCONN);
    ck_assert_uint_eq(a->nrecs, 0);
    ck_assert_uint_eq(c->nrecs, 0);
    ck_assert(!pstats(a, 3).connected);
    ck_assert_uint_eq(pstats(a, 3).frames_recv, 0);
    w_free(&w);
}
END_TEST

/* A raw TCP client that speaks the protocol by hand. */
struct raw {
    int fd;
    struct buf in;
    bool closed;
    struct net_hs hs;
    struct net_hs_local local;
    uint64_t seq_recv;
};

static void raw_connect(struct raw *r, uint16_t port)
{
    memset(r, 0, sizeof(*r));
    r->fd = socket(AF_INET, SOCK_STREAM, 0);
    ck_assert_int_ge(r->fd, 0);
    struct sockaddr_in sin = {
            .sin_family = AF_INET, .sin_port = htons(port), .sin_addr.s_addr = htonl(0x7f000001)};
    ck_assert_int_eq(connect(r->fd, (struct sockaddr *)&sin, sizeof(sin)), 0);
    ck_assert_int_eq(fcntl(r->fd, F_SETFL, O_NONBLOCK), 0);
}

static void raw_close(struct raw *r)
{
    close(r->fd);
    buf_free(&r->in);
    net_hs_free(&r->hs);
}

/* Reads what is there; true once the other end closed. */
static bool raw_pump(struct raw *r)
{
    uint8_t tmp[4096];
    for (;;) {
        ssize_t n = recv(r->fd, tmp, sizeof(tmp), 0);
        if (n > 0) {
            buf_put(&r->in, tmp, (size_t)n);
            continue;
        }
        if (n == 0 || (errno != EAGAIN && errno != EINTR))
            r->closed = true;
        return r->closed;
    }
}

/* Takes one complete untagged frame from the input, if there is one. */
static void raw_tag(const uint8_t *key, uint64_t seq, const uint8_t *hdr, const uint8_t *p,
                    size_t len, uint8_t tag[32])
{
    struct buf m = BUF_INIT;
    unsigned tl = 32;
    buf_put_u64(&m, seq);
    buf_put(&m, hdr, NET_FRAME_HDR_LEN);
    buf_put(&m, p, len);
    HMAC(EVP_sha256(), key, NET_KEY_LEN, m.data, m.len, tag, &tl);
    buf_free(&m);
}

/* Takes one complete frame from the input, if there is one; once the
 * handshake is done, checks its tag independently of net.c. */
static bool raw_frame(struct raw *r, uint8_t *type, struct buf *payload)
{
    struct net_frame f;
    size_t need;
    bool tagged = r->hs.state == NET_HS_DONE;
    raw_pump(r);
    long n = net_frame_decode(r->in.data, r->in.len, NET_FRAME_MAX_PAYLOAD,
                              tagged ? NET_FRAME_TAG_LEN : 0, &f, &need, NULL);
    ck_assert_int_ge(n, 0);
    if (n == 0)
        return false;
    if (tagged) {
        uint8_t tag[32];
        raw_tag(r->hs.key_recv, r->seq_recv++, f.hdr, f.payload, f.len, tag);
        ck_assert_mem_eq(tag, f.tag, NET_FRAME_TAG_LEN);
    }
    *type = f.type;
    buf_reset(payload);
    buf_put(payload, f.payload, f.len);
    memmove(r->in.data, r->in.data + n, r->in.len - (size_t)n);
    r->in.len -= (size_t)n;
    return true;
}

static void raw_send_frame(struct raw *r, uint8_t type, uint8_t flags, const void *p, size_t len,
                           const uint8_t *key, uint64_t seq)
{
    struct buf b = BUF_INIT;
    uint8_t hdr[NET_FRAME_HDR_LEN];
    net_frame_encode_header(hdr, type, flags, (uint32_t)len);
    buf_put(&b, hdr, sizeof(hdr));
    buf_put(&b, p, len);
    if (key != NULL) {
        /* The tag computed independently with one-shot HMAC(). */
        uint8_t tag[32];
        raw_tag(key, seq, hdr, p, len, tag);
        buf_put(&b, tag, NET_FRAME_TAG_LEN);
    }
    ck_assert_int_eq(send(r->fd, b.data, b.len, MSG_NOSIGNAL), (ssize_t)b.len);
    buf_free(&b);
}

/* Handshakes as node `id` holding `secret`; returns the final state. */
static int raw_handshake(struct tworld *w, struct raw *r, uint64_t id, const uint8_t *secret,
                         struct buf *extra_after_auth)
{
    uint8_t nonce[NET_NONCE_LEN];
    struct buf msg = BUF_INIT, reply = BUF_INIT;
    uint8_t type = 0, rt = 0;
    local_init(&r->local, id, "raw", secret, CLUSTER);
    nonce_fill(nonce, 0x5A);
    net_hs_init(&r->hs, &r->local, true, 0, nonce);
    net_hs_hello(&r->hs, &msg);
    raw_send_frame(r, NET_FRAME_HELLO, 0, msg.data, msg.len, NULL, 0);
    WAIT_FOR(w, raw_frame(r, &type, &msg));
    ck_assert_uint_eq(type, NET_FRAME_HELLO);
    ck_assert_int_eq(net_hs_input(&r->hs, type, msg.data, msg.len, &reply, &rt, NULL), 0);
    raw_send_frame(r, rt, 0, reply.data, reply.len, NULL, 0);
    if (extra_after_auth != NULL)
        ck_assert_int_eq(send(r->fd, extra_after_auth->data, extra_after_auth->len, MSG_NOSIGNAL),
                         (ssize_t)extra_after_auth->len);
    uint64_t dl = pb_now_ms() + T_DEADLINE;
    while (r->hs.state == NET_HS_WAIT_AUTH) {
        if (raw_frame(r, &type, &msg)) {
            net_hs_input(&r->hs, type, msg.data, msg.len, &reply, &rt, NULL);
            continue;
        }
        if (r->closed)
            break;
        ck_assert(pb_now_ms() < dl);
        event_base_loop(w->base, EVLOOP_ONCE);
    }
    buf_free(&msg);
    buf_free(&reply);
    return r->hs.state;
}

START_TEST(test_net_raw_injection)
{
    struct tworld w;
    struct raw r;
    w_init(&w, 5);
    struct tnode *a = node_start(&w, 0, 1);

    /* 1. An owner frame before any handshake: dropped, never delivered. */
    raw_connect(&r, a->port);
    raw_send_frame(&r, T_CTL, 0, "evil", 4, NULL, 0);
    WAIT_FOR(&w, raw_pump(&r));
    raw_close(&r);

    /* 2. A HELLO from an incompatible version. */
    raw_connect(&r, a->port);
    {
        struct buf h = BUF_INIT;
        buf_put_u16(&h, 9);
        buf_put_u16(&h, 9);
        raw_send_frame(&r, NET_FRAME_HELLO, 0, h.data, h.len, NULL, 0);
        buf_free(&h);
    }
    WAIT_FOR(&w, raw_pump(&r));
    raw_close(&r);

    /* 3. The wrong secret, with an owner frame right behind the AUTH. */
    uint64_t auth_failed = nstats(a).auth_failed;
    raw_connect(&r, a->port);
    {
        struct buf extra = BUF_INIT;
        uint8_t hdr[NET_FRAME_HDR_LEN];
        net_frame_encode_header(hdr, T_CTL, 0, 4);
        buf_put(&extra, hdr, sizeof(hdr));
        buf_put(&extra, "evil", 4);
        buf_put(&extra, SECRET, NET_FRAME_TAG_LEN); /* a junk tag */
        ck_assert_int_eq(raw_handshake(&w, &r, 9, OTHER_SECRET, &extra), NET_HS_FAILED);
        buf_free(&extra);
    }
    WAIT_FOR(&w, raw_pump(&r));
    ck_assert_uint_eq(nstats(a).auth_failed, auth_failed + 1);
    raw_close(&r);
    ck_assert_uint_eq(a->nrecs, 0);
    ck_assert_int_eq(a->ups[9], 0);

    /* 4. The right secret: a correctly tagged frame is delivered (this also
     * checks net.c's tags against an independent HMAC), then the same
     * frame replayed (old sequence number) kills the link undelivered. */
    raw_connect(&r, a->port);
    ck_assert_int_eq(raw_handshake(&w, &r, 9, SECRET, NULL), NET_HS_DONE);
    WAIT_FOR(&w, a->up[9]);
    ck_assert_str_eq(pstats(a, 9).name, "raw");
    uint8_t p[4];
    pb_store_u32(p, 77);
    raw_send_frame(&r, T_CTL, 0, p, 4, r.hs.key_send, 0);
    WAIT_FOR(&w, a->nrecs == 1);
    ck_assert_uint_eq(a->recs[0].seq, 77);
    ck_assert_uint_eq(a->recs[0].from, 9);
    raw_send_frame(&r, T_CTL, 0, p, 4, r.hs.key_send, 0);
    WAIT_FOR(&w, !a->up[9] && raw_pump(&r));
    ck_assert_uint_eq(a->nrecs, 1);
    ck_assert_uint_eq(nstats(a).proto_errors, 1);
    raw_close(&r);

    /* 5. A bit flipped in an authenticated frame's payload. */
    raw_connect(&r, a->port);
    ck_assert_int_eq(raw_handshake(&w, &r, 9, SECRET, NULL), NET_HS_DONE);
    WAIT_FOR(&w, a->up[9]);
    {
        struct buf m = BUF_INIT;
        uint8_t hdr[NET_FRAME_HDR_LEN], tag[32];
        unsigned tl = 32;
        net_frame_encode_header(hdr, T_CTL, 0, 4);
        buf_put_u64(&m, 0);
        buf_put(&m, hdr, sizeof(hdr));
        buf_put(&m, p, 4);
        HMAC(EVP_sha256(), r.hs.key_send, NET_KEY_LEN, m.data, m.len, tag, &tl);
        buf_reset(&m);
        buf_put(&m, hdr, sizeof(hdr));
        buf_put(&m, "\0\0\0\x4e", 4); /* 78, not 77 */
        buf_put(&m, tag, NET_FRAME_TAG_LEN);
        ck_assert_int_eq(send(r.fd, m.data, m.len, MSG_NOSIGNAL), (ssize_t)m.len);
        buf_free(&m);
    }
    WAIT_FOR(&w, !a->up[9] && raw_pump(&r));
    ck_assert_uint_eq(a->nrecs, 1);
    ck_assert_uint_eq(nstats(a).proto_errors, 2);
    raw_close(&r);
    w_free(&w);
}
END_TEST

START_TEST(test_net_retired_link_delivers_until_eof)
{
    struct tworld w;
    struct raw r1, r2;
    struct buf msg = BUF_INIT;
    uint8_t type = 0, p[4];
    w_init(&w, 5);
    struct tnode *a = node_start(&w, 0, 1);
    raw_connect(&r1, a->port);
    ck_assert_int_eq(raw_handshake(&w, &r1, 9, SECRET, NULL), NET_HS_DONE);
    WAIT_FOR(&w, a->up[9]);
    /* Node 9 dials again (both links dialed by 9: the newer wins). The
     * switch is invisible to the owner. */
    raw_connect(&r2, a->port);
    r2.seq_recv = 0;
    ck_assert_int_eq(raw_handshake(&w, &r2, 9, SECRET, NULL), NET_HS_DONE);
    /* a half-closes the retired link once its output is empty... */
    WAIT_FOR(&w, raw_pump(&r1));
    ck_assert_int_eq(a->ups[9], 1);
    ck_assert_int_eq(a->downs[9], 0);
    /* ... but still delivers what 9 sent on it before switching. */
    pb_store_u32(p, 41);
    raw_send_frame(&r1, T_CTL, 0, p, 4, r1.hs.key_send, 0);
    WAIT_FOR(&w, a->nrecs == 1);
    ck_assert_uint_eq(a->recs[0].seq, 41);
    /* New traffic from a goes on the new link only, tagged for it. */
    send_ctl(a, 9, 42);
    WAIT_FOR(&w, raw_frame(&r2, &type, &msg));
    ck_assert_uint_eq(type, T_CTL);
    ck_assert_uint_eq(pb_load_u32(msg.data), 42);
    ck_assert_uint_eq(r1.in.len, 0);
    /* 9 closes the retired link: a stays up on the new one. */
    raw_close(&r1);
    pb_store_u32(p, 43);
    raw_send_frame(&r2, T_CTL, 0, p, 4, r2.hs.key_send, 0);
    WAIT_FOR(&w, a->nrecs == 2);
    ck_assert_uint_eq(a->recs[1].seq, 43);
    ck_assert(a->up[9]);
    ck_assert_int_eq(a->downs[9], 0);
    ck_assert_uint_eq(pstats(a, 9).connects, 2);
    raw_close(&r2);
    WAIT_FOR(&w, !a->up[9]);
    buf_free(&msg);
    w_free(&w);
}
END_TEST

START_TEST(test_net_stall_and_pending_limit)
{
    struct tworld w;
    struct net_config cfg;
    memset(&cfg, 0, sizeof(cfg));
    cfg.handshake_timeout_ms = 200;
    cfg.max_pending = 2;
    w_init(&w, 5);
    struct tnode *a = node_start_cfg(&w, 0, 1, SECRET, CLUSTER, 0, &cfg);
    struct raw r1, r2, r3;
    raw_connect(&r1, a->port);
    raw_connect(&r2, a->port);
    WAIT_FOR(&w, nstats(a).accepted == 2);
    raw_connect(&r3, a->port);
    /* Over the limit: closed at once, before the others time out. */
    WAIT_FOR(&w, raw_pump(&r3));
    ck_assert_uint_eq(nstats(a).refused, 1);
    ck_assert(!raw_pump(&r1));
    /* The silent ones are dropped after the handshake timeout. */
    WAIT_FOR(&w, raw_pump(&r1) && raw_pump(&r2));
    ck_assert_uint_ge(nstats(a).hs_failed, 2);
    /* Room again. */
    struct raw r4;
    raw_connect(&r4, a->port);
    ck_assert_int_eq(raw_handshake(&w, &r4, 9, SECRET, NULL), NET_HS_DONE);
    WAIT_FOR(&w, a->up[9]);
    raw_close(&r1);
    raw_close(&r2);
    raw_close(&r3);
    raw_close(&r4);
    w_free(&w);
}
END_TEST

START_TEST(test_net_stalled_reader_is_bounded_and_dropped)
{
    struct tworld w;
    struct net_config cfg;
    memset(&cfg, 0, sizeof(cfg));
    cfg.control_queue_max = 256 * 1024;
    cfg.sock_buf = 32 * 1024;
    cfg.write_timeout_ms = 300;
    w_init(&w, 5);
    struct tnode *a = node_start_cfg(&w, 0, 1, SECRET, CLUSTER, 0, &cfg);
    /* A peer that authenticates and then never reads. */
    struct raw r;
    memset(&r, 0, sizeof(r));
    r.fd = socket(AF_INET, SOCK_STREAM, 0);
    int small = 32 * 1024;
    setsockopt(r.fd, SOL_SOCKET, SO_RCVBUF, &small, sizeof(small));
    struct sockaddr_in sin = {.sin_family = AF_INET,
                              .sin_port = htons(a->port),
                              .sin_addr.s_addr = htonl(0x7f000001)};
    ck_assert_int_eq(connect(r.fd, (struct sockaddr *)&sin, sizeof(sin)), 0);
    ck_assert_int_eq(fcntl(r.fd, F_SETFL, O_NONBLOCK), 0);
    ck_assert_int_eq(raw_handshake(&w, &r, 9, SECRET, NULL), NET_HS_DONE);
    WAIT_FOR(&w, a->up[9]);

    static uint8_t chunk[16 * 1024];
    ck_assert_int_eq(net_send(a->net, 9, NET_CLASS_BULK, T_BULK, chunk, sizeof(chunk)), 0);
    size_t sent = 0;
    int r_send = 0;
    uint64_t dl = pb_now_ms() + T_DEADLINE;
    while ((r_send = net_send(a->net, 9, NET_CLASS_CONTROL, T_CTL, chunk, sizeof(chunk))) == 0) {
        sent += sizeof(chunk);
        ck_assert(pb_now_ms() < dl);
        event_base_loop(w.base, EVLOOP_NONBLOCK);
    }
    ck_assert_int_eq(r_send, -ENOBUFS);
    ck_assert_uint_ge(pstats(a, 9).out_queued, cfg.control_queue_max - sizeof(chunk));
    fprintf(stderr, "# stalled reader: %zu control bytes accepted before ENOBUFS\n", sent);
    /* The queue limit plus what the two small socket buffers hold. */
    ck_assert_uint_le(sent, 2 * 1024 * 1024);
    ck_assert_uint_ge(sent, cfg.control_queue_max);
    /* The write timeout drops the link and its queues. */
    WAIT_FOR(&w, !a->up[9]);
    ck_assert_uint_eq(pstats(a, 9).bulk_queued, 0);
    ck_assert_int_eq(net_send(a->net, 9, NET_CLASS_CONTROL, T_CTL, "x", 1), -ENOTCONN);
    raw_close(&r);
    w_free(&w);
}
END_TEST

START_TEST(test_net_join_unknown_peer)
{
    struct tworld w;
    w_init(&w, 5);
    struct tnode *a = node_start(&w, 0, 1);
    /* j has no cluster id yet and a has never heard of it. */
    struct tnode *j = node_start_cfg(&w, 1, 5, SECRET, NULL, 0, NULL);
    /* j knows only an address (--join ADDR), not who listens there, and a
     * is not up yet: the seed is retried until it answers. */
    struct pb_error err;
    uint16_t port = a->port;
    node_stop(a);
    ck_assert_int_eq(net_seed_add(j->net, "bad", &err), -EINVAL);
    ck_assert_int_eq(net_seed_add(j->net, a->addr, &err), 0);
    WAIT_FOR(&w, nstats(j).hs_failed >= 2);
    ck_assert_int_eq(j->ups[1], 0);
    a = node_start_cfg(&w, 0, 1, SECRET, CLUSTER, port, NULL);
    WAIT_FOR(&w, a->up[5] && j->up[1]);
    ck_assert_str_eq(pstats(j, 1).addr, a->addr);
    ck_assert_str_eq(pstats(j, 1).name, "n1");
    struct net_peer_stats s = pstats(a, 5);
    ck_assert_str_eq(s.name, "n5");
    ck_assert_str_eq(s.addr, "");
    ck_assert(!s.has_cluster_id);
    s = pstats(j, 1);
    ck_assert(s.has_cluster_id);
    ck_assert_mem_eq(s.cluster_id, CLUSTER, NET_CLUSTER_ID_LEN);
    send_ctl(a, 5, 1);
    send_ctl(j, 1, 2);
    WAIT_FOR(&w, a->nrecs == 1 && j->nrecs == 1);
    ck_assert_uint_eq(j->recs[0].seq, 1);
    ck_assert_uint_eq(a->recs[0].seq, 2);
    net_set_cluster_id(j->net, CLUSTER);

    /* a removes j from inside on_frame: j's link drops; j redials and is
     * accepted again as an unknown peer. */
    a->remove_on_frame = 5;
    send_ctl(j, 1, 3);
    WAIT_FOR(&w, j->downs[1] == 1);
    WAIT_FOR(&w, a->up[5] && j->up[1]);
    ck_assert_uint_eq(a->nrecs, 2);
    ck_assert_int_eq(a->downs[5], 0); /* removal reports nothing */
    w_free(&w);
}
END_TEST

static void bulk_fill(uint8_t *m, uint32_t k)
{
    pb_store_u32(m, k);
    for (size_t i = 4; i < T_BULK_MSG; i++)
        m[i] = (uint8_t)(k * 131 + i * 7);
}

START_TEST(test_net_bulk_does_not_delay_control)
{
    struct tworld w;
    struct net_config cfg;
    memset(&cfg, 0, sizeof(cfg));
    cfg.bulk_queue_max = 8 * T_BULK_MSG;
    cfg.sock_buf = 64 * 1024;
    w_init(&w, 1);
    struct tnode *a = node_start_cfg(&w, 0, 1, SECRET, CLUSTER, 0, &cfg);
    struct tnode *b = node_start_cfg(&w, 1, 2, SECRET, CLUSTER, 0, &cfg);
    node_add(a, b);
    WAIT_FOR(&w, a->up[2] && b->up[1]);
    w.ping_from = a;
    w.ping_to = b;

    uint8_t *m = pb_xmalloc(T_BULK_MSG);
    uint32_t sent = 0;
    unsigned enobufs = 0;
    int drains_seen = -1; /* -1: not blocked */
    uint64_t max_queued = 0;
    uint64_t dl = pb_now_ms() + 4 * T_DEADLINE;
    while (b->bulk_msgs < T_BULK_MSGS) {
        ck_assert_msg(pb_now_ms() < dl, "bulk transfer timed out at %u messages", b->bulk_msgs);
        if (drains_seen >= 0 && a->drains > drains_seen)
            drains_seen = -1;
        while (drains_seen < 0 && sent < T_BULK_MSGS) {
            bulk_fill(m, sent);
            int r = net_send(a->net, 2, NET_CLASS_BULK, T_BULK, m, T_BULK_MSG);
            if (r == -ENOBUFS) {
                enobufs++;
                drains_seen = a->drains;
                break;
            }
            ck_assert_int_eq(r, 0);
            sent++;
        }
        uint64_t q = pstats(a, 2).bulk_queued;
        max_queued = q > max_queued ? q : max_queued;
        event_base_loop(w.base, EVLOOP_ONCE);
    }
    free(m);
    fprintf(stderr,
            "# bulk: %u MiB in %llu ms, %u pings during bulk, max %llu bulk bytes ahead of a "
            "ping, %u ENOBUFS, %d drains, max queued %llu\n",
            T_BULK_MSGS * (T_BULK_MSG >> 20),
            (unsigned long long)(pb_now_ms() - dl + 4 * T_DEADLINE), b->pings_during_bulk,
            (unsigned long long)b->ping_max_delta, enobufs, a->drains,
            (unsigned long long)max_queued);
    ck_assert(!b->bulk_bad);
    ck_assert_uint_eq(b->bulk_bytes, (uint64_t)T_BULK_MSG * T_BULK_MSGS);
    /* Back-pressure happened and the queue stayed bounded. */
    ck_assert_uint_gt(enobufs, 0);
    ck_assert_int_gt(a->drains, 0);
    ck_assert_uint_le(max_queued, cfg.bulk_queue_max);
    /* Control frames kept flowing during the transfer, and each one waited
     * behind at most a few hundred KiB of bulk data (one bulk frame plus the
     * 64 KiB socket buffers), never behind the 8 MiB queue. */
    ck_assert_uint_ge(b->pings_during_bulk, 10);
    ck_assert_msg(b->ping_max_delta <= 1024 * 1024, "a ping waited behind %llu bulk bytes",
                  (unsigned long long)b->ping_max_delta);
    w_free(&w);
}
END_TEST

START_TEST(test_net_size_edges)
{
    struct tworld w;
    w_init(&w, 5);
    struct tnode *a = node_start(&w, 0, 1);
    struct tnode *b = node_start(&w, 1, 2);
    node_add(a, b);
    WAIT_FOR(&w, a->up[2] && b->up[1]);
    static const size_t sizes[] = {
            0, 1, NET_BULK_FRAME - 1, NET_BULK_FRAME, NET_BULK_FRAME + 1, 3 * NET_BULK_FRAME + 17};
    size_t nsizes = sizeof(sizes) / sizeof(sizes[0]);
    uint8_t *blob = pb_xmalloc(3 * NET_BULK_FRAME + 17);
    for (size_t i = 0; i < 3 * NET_BULK_FRAME + 17; i++)
        blob[i] = (uint8_t)(i * 13 + 5);
    /* Bulk at every fragment boundary, control up to the frame limit,
     * interleaved. */
    for (size_t i = 0; i < nsizes; i++) {
        ck_assert_int_eq(net_send(a->net, 2, NET_CLASS_BULK, T_BLOB, blob, sizes[i]), 0);
        if (sizes[i] <= NET_FRAME_MAX_PAYLOAD)
            ck_assert_int_eq(net_send(a->net, 2, NET_CLASS_CONTROL, T_BLOB, blob, sizes[i]), 0);
    }
    size_t nctl = 4; /* sizes up to NET_FRAME_MAX_PAYLOAD */
    WAIT_FOR(&w, b->nrecs == nsizes + nctl);
    /* Each class arrives complete and in order. */
    size_t seen_bulk = 0, seen_ctl = 0;
    for (size_t i = 0; i < b->nrecs; i++) {
        const struct trec *r = &b->recs[i];
        ck_assert_uint_eq(r->type, T_BLOB);
        bool matches_bulk = seen_bulk < nsizes && r->len == sizes[seen_bulk] &&
                            r->hash == fnv1a(blob, sizes[seen_bulk]);
        bool matches_ctl = seen_ctl < nctl && r->len == sizes[seen_ctl] &&
                           r->hash == fnv1a(blob, sizes[seen_ctl]);
        ck_assert(matches_bulk || matches_ctl);
        /* Equal sizes are indistinguishable; prefer control, which leads. */
        if (matches_ctl)
            seen_ctl++;
        else
            seen_bulk++;
    }
    ck_assert_uint_eq(seen_ctl, nctl);
    ck_assert_uint_eq(seen_bulk, nsizes);
    free(blob);
    w_free(&w);
}
END_TEST

/* net_send_take(): the same messages arrive as with net_send(), in order,
 * from buffers the transport took (and frees: ASan and valgrind see a leak
 * otherwise), including on every error path. */
START_TEST(test_net_send_take)
{
    struct tworld w;
    w_init(&w, 5);
    struct tnode *a = node_start(&w, 0, 1);
    struct tnode *b = node_start(&w, 1, 2);
    node_add(a, b);
    WAIT_FOR(&w, a->up[2] && b->up[1]);
    static const size_t sizes[] = {0, 1, NET_BULK_FRAME + 1, 3 * NET_BULK_FRAME + 17,
                                   NET_FRAME_MAX_PAYLOAD};
    size_t nsizes = sizeof(sizes) / sizeof(sizes[0]);
    size_t most = 3 * NET_BULK_FRAME + 17;
    uint8_t *blob = pb_xmalloc(most);
    for (size_t i = 0; i < most; i++)
        blob[i] = (uint8_t)(i * 29 + 1);
    ck_assert_uint_eq(net_peer_bulk_queued(a->net, 2), 0);
    for (size_t i = 0; i < nsizes; i++) {
        uint8_t *d = pb_xmalloc(sizes[i] + 1);
        memcpy(d, blob, sizes[i]);
        ck_assert_int_eq(net_send_take(a->net, 2, NET_CLASS_BULK, T_BLOB, d, sizes[i]), 0);
    }
    /* the multi-frame ones are not wholly handed to the link yet */
    ck_assert_uint_ge(net_peer_bulk_queued(a->net, 2), 3 * NET_BULK_FRAME);
    ck_assert_uint_eq(net_peer_bulk_queued(a->net, 9), 0);
    size_t ctl = NET_FRAME_MAX_PAYLOAD - 3; /* a size no bulk message has */
    uint8_t *d = pb_xmalloc(ctl);
    memcpy(d, blob, ctl);
    ck_assert_int_eq(net_send_take(a->net, 2, NET_CLASS_CONTROL, T_BLOB, d, ctl), 0);
    WAIT_FOR(&w, b->nrecs == nsizes + 1);
    size_t seen_bulk = 0;
    bool seen_ctl = false;
    for (size_t i = 0; i < b->nrecs; i++) {
        const struct trec *r = &b->recs[i];
        ck_assert_uint_eq(r->type, T_BLOB);
        if (r->len == ctl) {
            ck_assert(!seen_ctl);
            ck_assert_uint_eq(r->hash, fnv1a(blob, ctl));
            seen_ctl = true;
            continue;
        }
        ck_assert_uint_lt(seen_bulk, nsizes);
        ck_assert_uint_eq(r->len, sizes[seen_bulk]);
        ck_assert_uint_eq(r->hash, fnv1a(blob, sizes[seen_bulk]));
        seen_bulk++;
    }
    ck_assert(seen_ctl);
    ck_assert_uint_eq(seen_bulk, nsizes);
    ck_assert_uint_eq(net_peer_bulk_queued(a->net, 2), 0);
    /* Errors free what was taken. */
    ck_assert_int_eq(net_send_take(a->net, 7, NET_CLASS_BULK, T_BLOB, pb_xmalloc(8), 8), -ENOENT);
    ck_assert_int_eq(net_send_take(a->net, 2, NET_CLASS_CONTROL, T_BLOB,
                                   pb_xmalloc(NET_FRAME_MAX_PAYLOAD + 1),
                                   NET_FRAME_MAX_PAYLOAD + 1),
                     -EMSGSIZE);
    ck_assert_int_eq(net_send_take(a->net, 2, NET_CLASS_BULK, 1, pb_xmalloc(8), 8), -EINVAL);
    /* A queued message still referenced by the output buffer when the
     * transport goes away is freed with it. */
    d = pb_xmalloc(most);
    memcpy(d, blob, most);
    ck_assert_int_eq(net_send_take(a->net, 2, NET_CLASS_BULK, T_BLOB, d, most), 0);
    free(blob);
    w_free(&w);
}
END_TEST

/* Big bulk fragments are reassembled straight from the input buffer: their
 * tags are checked there too (a flipped bit in the middle of a fragment kills
 * the link, nothing is delivered), and good ones arrive intact. */
START_TEST(test_net_raw_bulk_fragments)
{
    struct tworld w;
    struct raw r;
    w_init(&w, 5);
    struct tnode *a = node_start(&w, 0, 1);
    size_t half = 3 * 64 * 1024 + 5;
    uint8_t *m = pb_xmalloc(2 * half);
    for (size_t i = 0; i < 2 * half; i++)
        m[i] = (uint8_t)(i * 11 + 3);

    raw_connect(&r, a->port);
    ck_assert_int_eq(raw_handshake(&w, &r, 9, SECRET, NULL), NET_HS_DONE);
    WAIT_FOR(&w, a->up[9]);
    raw_send_frame(&r, T_BLOB, NET_FRAME_F_BULK | NET_FRAME_F_MORE, m, half, r.hs.key_send, 0);
    raw_send_frame(&r, T_BLOB, NET_FRAME_F_BULK, m + half, half, r.hs.key_send, 1);
    WAIT_FOR(&w, a->nrecs == 1);
    ck_assert_uint_eq(a->recs[0].len, 2 * half);
    ck_assert_uint_eq(a->recs[0].hash, fnv1a(m, 2 * half));
    uint64_t perr = nstats(a).proto_errors;

    /* The same fragment with one bit flipped after its tag was computed. */
    {
        struct buf b = BUF_INIT;
        uint8_t hdr[NET_FRAME_HDR_LEN], tag[32];
        net_frame_encode_header(hdr, T_BLOB, NET_FRAME_F_BULK | NET_FRAME_F_MORE, (uint32_t)half);
        raw_tag(r.hs.key_send, 2, hdr, m, half, tag);
        buf_put(&b, hdr, sizeof(hdr));
        buf_put(&b, m, half);
        b.data[NET_FRAME_HDR_LEN + half / 2] ^= 0x10;
        buf_put(&b, tag, NET_FRAME_TAG_LEN);
        ck_assert_int_eq(send(r.fd, b.data, b.len, MSG_NOSIGNAL), (ssize_t)b.len);
        buf_free(&b);
    }
    raw_send_frame(&r, T_BLOB, NET_FRAME_F_BULK, m + half, half, r.hs.key_send, 3);
    WAIT_FOR(&w, !a->up[9] && raw_pump(&r));
    ck_assert_uint_eq(nstats(a).proto_errors, perr + 1);
    ck_assert_uint_eq(a->nrecs, 1);
    raw_close(&r);
    free(m);
    w_free(&w);
}
END_TEST

START_TEST(test_net_reconnect_after_restart)
{
    struct tworld w;
    w_init(&w, 5);
    struct tnode *a = node_start(&w, 0, 1);
    struct tnode *b = node_start(&w, 1, 2);
    node_add(a, b);
    WAIT_FOR(&w, a->up[2] && b->up[1]);
    uint16_t port = b->port;
    node_stop(b);
    WAIT_FOR(&w, !a->up[2]);
    ck_assert_int_eq(net_send(a->net, 2, NET_CLASS_CONTROL, T_CTL, "abcd", 4), -ENOTCONN);
    /* b comes back on the same port, knowing nobody: a redials it. */
    b = node_start_cfg(&w, 1, 2, SECRET, CLUSTER, port, NULL);
    WAIT_FOR(&w, a->up[2] && b->up[1]);
    send_ctl(a, 2, 5);
    WAIT_FOR(&w, b->nrecs == 1);
    ck_assert_uint_eq(b->recs[0].seq, 5);
    ck_assert_uint_eq(pstats(a, 2).connects, 2);
    ck_assert_int_eq(a->downs[2], 1);
    w_free(&w);
}
END_TEST

START_TEST(test_net_partition_and_heal)
{
    struct tworld w;
    w_init(&w, 5);
    struct tnode *a = node_start(&w, 0, 1);
    struct tnode *b = node_start(&w, 1, 2);
    struct tnode *c = node_start(&w, 2, 3);
    struct tnode *all[3] = {a, b, c};
    for (int i = 0; i < 3; i++)
        for (int j = 0; j < 3; j++)
            if (i != j)
                node_add(all[i], all[j]);
    WAIT_FOR(&w, a->up[2] && a->up[3] && b->up[1] && b->up[3] && c->up[1] && c->up[2]);

    ck_assert_int_eq(net_set_partition(a->net, 2, true), 0);
    ck_assert(pstats(a, 2).partitioned);
    WAIT_FOR(&w, !a->up[2] && !b->up[1]);
    /* b keeps redialing a and is refused every time. */
    uint64_t failed = nstats(a).hs_failed;
    WAIT_FOR(&w, nstats(a).hs_failed >= failed + 3);
    ck_assert_int_eq(a->ups[2], 1);
    ck_assert_int_eq(b->ups[1], 1);
    ck_assert_int_eq(net_send(a->net, 2, NET_CLASS_CONTROL, T_CTL, "abcd", 4), -ENOTCONN);
    ck_assert_int_eq(net_send(b->net, 1, NET_CLASS_CONTROL, T_CTL, "abcd", 4), -ENOTCONN);
    /* The rest of the cluster is unaffected. */
    send_ctl(a, 3, 1);
    send_ctl(b, 3, 2);
    WAIT_FOR(&w, c->nrecs == 2);

    ck_assert_int_eq(net_set_partition(a->net, 2, false), 0);
    WAIT_FOR(&w, a->up[2] && b->up[1]);
    send_ctl(a, 2, 10);
    send_ctl(b, 1, 11);
    WAIT_FOR(&w, count_from(b, 1) == 1 && count_from(a, 2) == 1);
    ck_assert(!pstats(a, 2).partitioned);
    w_free(&w);
}
END_TEST

START_TEST(test_net_api_errors)
{
    struct tworld w;
    struct pb_error err;
    struct net_config cfg;
    w_init(&w, 5);
    memset(&cfg, 0, sizeof(cfg));
    cfg.node_id = 1;
    cfg.node_name = "n1";
    cfg.secret = SECRET;
    cfg.secret_len = 8;
    ck_assert_ptr_null(net_new(w.base, &cfg, &err));
    ck_assert_ptr_nonnull(strstr(err.msg, "secret"));
    cfg.secret_len = sizeof(SECRET) - 1;
    cfg.node_name = "has space";
    ck_assert_ptr_null(net_new(w.base, &cfg, &err));
    cfg.node_name = "n1";
    cfg.node_id = 0;
    ck_assert_ptr_null(net_new(w.base, &cfg, &err));

    struct tnode *a = node_start(&w, 0, 1);
    ck_assert_int_eq(net_listen(a->net, "127.0.0.1:0", &err), -EBUSY);
    ck_assert_int_eq(net_peer_add(a->net, 2, "nonsense", &err), -EINVAL);
    ck_assert_int_eq(net_peer_add(a->net, 1, "127.0.0.1:1", &err), -EINVAL);
    ck_assert_int_eq(net_peer_add(a->net, 0, "127.0.0.1:1", &err), -EINVAL);
    ck_assert_int_eq(net_send(a->net, 2, NET_CLASS_CONTROL, T_CTL, "x", 1), -ENOENT);
    ck_assert_int_eq(net_peer_add(a->net, 2, "127.0.0.1:1", &err), 0);
    ck_assert_int_eq(net_send(a->net, 2, NET_CLASS_CONTROL, T_CTL, "x", 1), -ENOTCONN);
    ck_assert_int_eq(net_send(a->net, 2, NET_CLASS_CONTROL, NET_FRAME_AUTH, "x", 1), -EINVAL);
    ck_assert_int_eq(net_send(a->net, 2, (enum net_class)7, T_CTL, "x", 1), -EINVAL);
    ck_assert_int_eq(net_send(a->net, 2, NET_CLASS_CONTROL, T_CTL, NULL, 1), -EINVAL);
    ck_assert_int_eq(
            net_send(a->net, 2, NET_CLASS_CONTROL, T_CTL, SECRET, NET_FRAME_MAX_PAYLOAD + 1),
            -EMSGSIZE);
    ck_assert_int_eq(net_send(a->net, 2, NET_CLASS_BULK, T_CTL, SECRET, NET_MSG_MAX + 1),
                     -EMSGSIZE);
    ck_assert_int_eq(net_peer_remove(a->net, 2), 0);
    ck_assert_int_eq(net_peer_remove(a->net, 2), -ENOENT);
    ck_assert_int_eq(net_set_partition(a->net, 1, true), -EINVAL);
    struct net_peer_stats s;
    ck_assert_int_eq(net_peer_stats(a->net, 2, &s), -ENOENT);
    w_free(&w);

    /* A port another transport listens on: a clear error, not a crash. */
    w_init(&w, 5);
    a = node_start(&w, 0, 1);
    memset(&cfg, 0, sizeof(cfg));
    cfg.node_id = 2;
    cfg.node_name = "n2";
    cfg.secret = SECRET;
    cfg.secret_len = sizeof(SECRET) - 1;
    struct net *other = net_new(w.base, &cfg, &err);
    ck_assert_ptr_nonnull(other);
    ck_assert_int_eq(net_listen(other, a->addr, &err), -EADDRINUSE);
    ck_assert_ptr_nonnull(strstr(err.msg, a->addr));
    ck_assert_int_eq(net_listen(other, "127.0.0.1", &err), -EINVAL);
    /* IPv6 literal in brackets with port 0 (skipped where IPv6 is off). */
    if (net_listen(other, "[::1]:0", &err) == 0)
        ck_assert_uint_ne(net_local_port(other), 0);
    else
        ck_assert_uint_eq(net_local_port(other), 0);
    net_free(other);
    w_free(&w);
}
END_TEST

/* ---- name resolution (resolve.h) ------------------------------------ */

struct tres {
    int calls;
    int rc;
    struct sockaddr_storage ss;
};

static void tres_cb(void *arg, int rc, const struct sockaddr *sa, socklen_t len)
{
    struct tres *t = arg;
    t->calls++;
    t->rc = rc;
    if (rc == 0) {
        ck_assert_uint_le(len, sizeof(t->ss));
        memcpy(&t->ss, sa, len);
    }
}

/* "a.b.c.d:port" or "[v6]:port" of ss. */
static const char *tres_str(const struct sockaddr_storage *ss)
{
    static char out[64];
    char host[INET6_ADDRSTRLEN] = "?";
    if (ss->ss_family == AF_INET) {
        const struct sockaddr_in *a = (const struct sockaddr_in *)(const void *)ss;
        inet_ntop(AF_INET, &a->sin_addr, host, sizeof(host));
        snprintf(out, sizeof(out), "%s:%u", host, ntohs(a->sin_port));
    } else if (ss->ss_family == AF_INET6) {
        const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)(const void *)ss;
        inet_ntop(AF_INET6, &a->sin6_addr, host, sizeof(host));
        snprintf(out, sizeof(out), "[%s]:%u", host, ntohs(a->sin6_port));
    } else {
        snprintf(out, sizeof(out), "family %d", ss->ss_family);
    }
    return out;
}

/* Runs base until cond holds (polling: the lookup threads are not events). */
#define POLL_FOR(base, cond)                                                                       \
    do {                                                                                           \
        uint64_t dl_ = pb_now_ms() + T_DEADLINE;                                                   \
        while (!(cond)) {                                                                          \
            ck_assert_msg(pb_now_ms() < dl_, "timed out waiting for %s", #cond);                   \
            event_base_loop((base), EVLOOP_NONBLOCK);                                              \
            poll(NULL, 0, 1);                                                                      \
        }                                                                                          \
    } while (0)

START_TEST(test_resolve_literals)
{
    struct event_base *base = event_base_new();
    struct net_resolve *req = NULL;
    struct sockaddr_storage ss;
    socklen_t len = 0;
    struct tres t = {0};
    ck_assert_int_eq(net_resolve_start(&req, base, "127.0.0.1:8010", 3, &ss, &len, tres_cb, &t), 0);
    ck_assert_ptr_null(req);
    ck_assert_uint_eq(len, sizeof(struct sockaddr_in));
    ck_assert_str_eq(tres_str(&ss), "127.0.0.1:8010");
    ck_assert_int_eq(net_resolve_start(&req, base, "[::1]:9", 0, &ss, &len, tres_cb, &t), 0);
    ck_assert_ptr_null(req);
    ck_assert_str_eq(tres_str(&ss), "[::1]:9");
    ck_assert_int_eq(net_resolve_start(&req, base, "127.0.0.1", 0, &ss, &len, tres_cb, &t),
                     -EINVAL);
    ck_assert_int_eq(net_resolve_start(&req, base, "[::1:9", 0, &ss, &len, tres_cb, &t), -EINVAL);
    ck_assert_int_eq(net_resolve_start(&req, base, "localhost:0", 0, &ss, &len, tres_cb, &t),
                     -EINVAL);
    ck_assert_ptr_null(req);
    ck_assert_uint_eq(net_resolve_running(), 0);
    event_base_loop(base, EVLOOP_NONBLOCK);
    ck_assert_int_eq(t.calls, 0); /* literals never call back */
    event_base_free(base);
}
END_TEST

START_TEST(test_resolve_localhost)
{
    /* A real name, offline: /etc/hosts always has localhost. */
    struct event_base *base = event_base_new();
    struct net_resolve *req = NULL;
    struct sockaddr_storage ss;
    socklen_t len = 0;
    struct tres t = {0};
    ck_assert_int_eq(net_resolve_start(&req, base, "localhost:8011", 0, &ss, &len, tres_cb, &t),
                     -EINPROGRESS);
    ck_assert_ptr_nonnull(req);
    ck_assert_int_eq(t.calls, 0);
    POLL_FOR(base, t.calls == 1);
    ck_assert_int_eq(t.rc, 0);
    const char *got = tres_str(&t.ss);
    ck_assert_msg(strcmp(got, "127.0.0.1:8011") == 0 || strcmp(got, "[::1]:8011") == 0,
                  "localhost is %s", got);
    POLL_FOR(base, net_resolve_running() == 0);
    event_base_free(base);
}
END_TEST

/* A getaddrinfo() that waits for the test: each byte written to
 * slow_pipe[1] answers one lookup: 'a' with 127.0.0.1, 'b' with 127.0.0.1
 * then 127.0.0.2, 'n' with "no such name". */
static int slow_pipe[2];
static atomic_int slow_calls;

static int slow_gai(const char *host, const char *port, const struct addrinfo *hints,
                    struct addrinfo **res)
{
    (void)host;
    atomic_fetch_add(&slow_calls, 1);
    char c = 0;
    if (read(slow_pipe[0], &c, 1) != 1 || c == 'n')
        return EAI_NONAME;
    struct addrinfo h = *hints;
    h.ai_flags = AI_NUMERICHOST | AI_NUMERICSERV;
    int rc = getaddrinfo("127.0.0.1", port, &h, res);
    if (rc == 0 && c == 'b') {
        struct addrinfo *second = NULL;
        rc = getaddrinfo("127.0.0.2", port, &h, &second);
        (*res)->ai_next = second;
    }
    return rc;
}

static void tick_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    (*(int *)arg)++;
}

START_TEST(test_resolve_off_the_loop)
{
    struct event_base *base = event_base_new();
    ck_assert_int_eq(pipe(slow_pipe), 0);
    atomic_store(&slow_calls, 0);
    net_resolve_set_gai(slow_gai);
    struct net_resolve *req = NULL;
    struct sockaddr_storage ss;
    socklen_t len = 0;
    struct tres t = {0};

    /* The lookup hangs in its thread; the loop keeps running timers. */
    ck_assert_int_eq(net_resolve_start(&req, base, "pb-slow.invalid:7", 0, &ss, &len, tres_cb, &t),
                     -EINPROGRESS);
    int ticks = 0;
    struct event *tick = event_new(base, -1, EV_PERSIST, tick_cb, &ticks);
    struct timeval tv = {0, 2000};
    event_add(tick, &tv);
    POLL_FOR(base, atomic_load(&slow_calls) == 1 && ticks >= 5);
    ck_assert_int_eq(t.calls, 0);
    ck_assert_uint_eq(net_resolve_running(), 1);
    ck_assert_int_eq(write(slow_pipe[1], "a", 1), 1);
    POLL_FOR(base, t.calls == 1);
    ck_assert_int_eq(t.rc, 0);
    ck_assert_str_eq(tres_str(&t.ss), "127.0.0.1:7");

    /* pick chooses among the addresses, modulo their number. */
    ck_assert_int_eq(net_resolve_start(&req, base, "pb-two.invalid:8", 3, &ss, &len, tres_cb, &t),
                     -EINPROGRESS);
    ck_assert_int_eq(write(slow_pipe[1], "b", 1), 1);
    POLL_FOR(base, t.calls == 2);
    ck_assert_str_eq(tres_str(&t.ss), "127.0.0.2:8");

    /* No such name. */
    ck_assert_int_eq(net_resolve_start(&req, base, "pb-none.invalid:9", 0, &ss, &len, tres_cb, &t),
                     -EINPROGRESS);
    ck_assert_int_eq(write(slow_pipe[1], "n", 1), 1);
    POLL_FOR(base, t.calls == 3);
    ck_assert_int_eq(t.rc, -ENOENT);

    /* Cancelled while its thread waits: never called back; the thread
     * finishes and frees the rest. */
    ck_assert_int_eq(net_resolve_start(&req, base, "pb-gone.invalid:9", 0, &ss, &len, tres_cb, &t),
                     -EINPROGRESS);
    POLL_FOR(base, atomic_load(&slow_calls) == 4);
    net_resolve_cancel(req);
    ck_assert_int_eq(write(slow_pipe[1], "a", 1), 1);
    POLL_FOR(base, net_resolve_running() == 0);
    for (int i = 0; i < 10; i++)
        event_base_loop(base, EVLOOP_NONBLOCK);
    ck_assert_int_eq(t.calls, 3);

    net_resolve_set_gai(NULL);
    close(slow_pipe[0]);
    close(slow_pipe[1]);
    event_free(tick);
    event_base_free(base);
}
END_TEST

/* Answers every lookup with 127.0.0.1 and moved_port (0: the port asked
 * for), counting the calls. */
static atomic_int moved_calls;
static atomic_int moved_port;

static int moved_gai(const char *host, const char *port, const struct addrinfo *hints,
                     struct addrinfo **res)
{
    (void)host;
    atomic_fetch_add(&moved_calls, 1);
    struct addrinfo h = *hints;
    h.ai_flags = AI_NUMERICHOST | AI_NUMERICSERV;
    char p[8];
    int mp = atomic_load(&moved_port);
    snprintf(p, sizeof(p), "%d", mp);
    return getaddrinfo("127.0.0.1", mp != 0 ? p : port, &h, res);
}

START_TEST(test_net_peer_by_name)
{
    struct tworld w;
    w_init(&w, 5);
    struct tnode *a = node_start(&w, 0, 1);
    struct tnode *b = node_start(&w, 1, 2);
    struct tnode *c = node_start(&w, 2, 3);
    struct pb_error err;

    /* "localhost" through the real resolver. */
    char addr[64];
    snprintf(addr, sizeof(addr), "localhost:%u", (unsigned)c->port);
    ck_assert_int_eq(net_peer_add(a->net, 3, addr, &err), 0);
    WAIT_FOR(&w, a->up[3] && c->up[1]);
    ck_assert_str_eq(pstats(a, 3).addr, addr);

    /* A name whose address moves: it first names a port where nobody
     * listens, then b's. Each redial looks it up again and finds b. */
    int dead = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sin = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t sl = sizeof(sin);
    ck_assert_int_eq(bind(dead, (struct sockaddr *)&sin, sizeof(sin)), 0);
    ck_assert_int_eq(getsockname(dead, (struct sockaddr *)&sin, &sl), 0);
    close(dead); /* nothing listens there now */
    atomic_store(&moved_calls, 0);
    atomic_store(&moved_port, ntohs(sin.sin_port));
    net_resolve_set_gai(moved_gai);
    snprintf(addr, sizeof(addr), "pb-moving.invalid:%u", (unsigned)b->port);
    ck_assert_int_eq(net_peer_add(a->net, 2, addr, &err), 0);
    WAIT_FOR(&w, atomic_load(&moved_calls) >= 2);
    ck_assert(!a->up[2]);
    atomic_store(&moved_port, 0);
    WAIT_FOR(&w, a->up[2] && b->up[1]);
    ck_assert_uint_ge(atomic_load(&moved_calls), 3);
    net_resolve_set_gai(NULL);
    w_free(&w);
    uint64_t dl = pb_now_ms() + T_DEADLINE;
    while (net_resolve_running() > 0) {
        ck_assert_msg(pb_now_ms() < dl, "lookup threads still running");
        poll(NULL, 0, 1);
    }
}
END_TEST

static Suite *net_suite(void)
{
    Suite *s = suite_create("net");
    TCase *tc = tcase_create("frame");
    tcase_add_test(tc, test_frame_roundtrip);
    tcase_add_test(tc, test_frame_need_more);
    tcase_add_test(tc, test_frame_errors);
    suite_add_tcase(s, tc);

    tc = tcase_create("handshake");
    tcase_add_test(tc, test_hs_success);
    tcase_add_loop_test(tc, test_hs_wrong_secret, 0, 2);
    tcase_add_test(tc, test_hs_version_mismatch);
    tcase_add_loop_test(tc, test_hs_version_mixed, 0, 3);
    tcase_add_test(tc, test_hs_tampered_hello);
    tcase_add_test(tc, test_hs_replay_and_reflection);
    tcase_add_test(tc, test_hs_identity_rules);
    tcase_add_test(tc, test_hs_malformed);
    suite_add_tcase(s, tc);

    tc = tcase_create("transport");
    tcase_set_timeout(tc, 300);
    tcase_add_test(tc, test_net_two_nodes);
    tcase_add_test(tc, test_net_three_nodes_and_listen_fd);
    tcase_add_test(tc, test_net_wrong_secret_refused);
    tcase_add_test(tc, test_net_raw_injection);
    tcase_add_test(tc, test_net_retired_link_delivers_until_eof);
    tcase_add_test(tc, test_net_stall_and_pending_limit);
    tcase_add_test(tc, test_net_stalled_reader_is_bounded_and_dropped);
    tcase_add_test(tc, test_net_join_unknown_peer);
    tcase_add_test(tc, test_net_bulk_does_not_delay_control);
    tcase_add_test(tc, test_net_size_edges);
    tcase_add_test(tc, test_net_send_take);
    tcase_add_test(tc, test_net_raw_bulk_fragments);
    tcase_add_test(tc, test_net_reconnect_after_restart);
    tcase_add_test(tc, test_net_partition_and_heal);
    tcase_add_test(tc, test_net_api_errors);
    tcase_add_test(tc, test_net_peer_by_name);
    suite_add_tcase(s, tc);

    tc = tcase_create("resolve");
    tcase_add_test(tc, test_resolve_literals);
    tcase_add_test(tc, test_resolve_localhost);
    tcase_add_test(tc, test_resolve_off_the_loop);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(net_suite());
    srunner_run_all(sr, CK_ENV);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}

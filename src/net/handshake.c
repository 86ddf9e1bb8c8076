/*
 * handshake.c: HELLO / AUTH exchange that proves both ends hold the cluster
 * secret and derives the per-direction frame keys (see handshake.h).
 */
#include "config.h"

#include "net/handshake.h"

#include <assert.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>

#include "lib/log.h"
#include "lib/util.h"
#include "net/frame.h"

#define HS_LABEL "pickbox/net/1"

/* libcrypto fails here only when it cannot allocate: treated like pb_xmalloc(). */
static _Noreturn void hs_crypto_failed(void)
{
    log_err("net: libcrypto failed (out of memory?)");
    abort();
}

/* Appends n bytes to b and returns a pointer to them. */
static uint8_t *hs_reserve(struct buf *b, size_t n)
{
    uint8_t *p = buf_reserve(b, n);
    b->len += n;
    return p;
}

static int hs_fail(struct net_hs *hs, struct pb_error *err, int code, const char *msg)
{
    hs->state = NET_HS_FAILED;
    return pb_error_set(err, code, "handshake: %s", msg);
}

bool net_hs_name_valid(const char *name, size_t len)
{
    if (len == 0 || len > NET_NAME_MAX)
        return false;
    for (size_t i = 0; i < len; i++)
        if (name[i] < 0x21 || name[i] > 0x7e)
            return false;
    return true;
}

void net_hs_init(struct net_hs *hs, const struct net_hs_local *local, bool initiator,
                 uint64_t expect_node_id, const uint8_t nonce[NET_NONCE_LEN])
{
    memset(hs, 0, sizeof(*hs));
    hs->state = NET_HS_START;
    hs->initiator = initiator;
    hs->local = local;
    hs->expect_node_id = expect_node_id;
    memcpy(hs->nonce, nonce, NET_NONCE_LEN);
    buf_init(&hs->hello);
}

void net_hs_free(struct net_hs *hs)
{
    buf_free(&hs->hello);
    OPENSSL_cleanse(hs->key_send, sizeof(hs->key_send));
    OPENSSL_cleanse(hs->key_recv, sizeof(hs->key_recv));
    OPENSSL_cleanse(hs->transcript, sizeof(hs->transcript));
}

static uint16_t hs_version_max(const struct net_hs_local *l)
{
    if (l->version_max < NET_PROTO_VERSION_MIN || l->version_max > NET_PROTO_VERSION)
        return NET_PROTO_VERSION;
    return l->version_max;
}

void net_hs_hello(struct net_hs *hs, struct buf *out)
{
    const struct net_hs_local *l = hs->local;
    buf_reset(&hs->hello);
    buf_put_u16(&hs->hello, NET_PROTO_VERSION_MIN);
    buf_put_u16(&hs->hello, hs_version_max(l));
    buf_put_u64(&hs->hello, l->node_id);
    buf_put_bytes(&hs->hello, l->cluster_id, l->has_cluster_id ? NET_CLUSTER_ID_LEN : 0);
    buf_put_str(&hs->hello, l->node_name);
    buf_put(&hs->hello, hs->nonce, NET_NONCE_LEN);
    buf_put(out, hs->hello.data, hs->hello.len);
    hs->state = NET_HS_WAIT_HELLO;
}

/* out = HMAC-SHA256(secret, HS_LABEL " " label || transcript) */
static void hs_mac(const struct net_hs *hs, const char *label, uint8_t out[32])
{
    static const char prefix[] = HS_LABEL " ";
    uint8_t msg[96];
    size_t pl = sizeof(prefix) - 1;
    size_t ll = strlen(label);
    assert(pl + ll + sizeof(hs->transcript) <= sizeof(msg));
    memcpy(msg, prefix, pl);
    memcpy(msg + pl, label, ll);
    memcpy(msg + pl + ll, hs->transcript, sizeof(hs->transcript));
    unsigned int n = 32;
    if (HMAC(EVP_sha256(), hs->local->secret, (int)hs->local->secret_len, msg,
             pl + ll + sizeof(hs->transcript), out, &n) == NULL)
        hs_crypto_failed();
    OPENSSL_cleanse(msg, sizeof(msg));
}

/* T = SHA-256(HS_LABEL || u32 len || HELLO_initiator || u32 len || HELLO_responder) */
static void hs_transcript(struct net_hs *hs, const uint8_t *peer_hello, size_t peer_len)
{
    const uint8_t *ih = hs->initiator ? hs->hello.data : peer_hello;
    size_t il = hs->initiator ? hs->hello.len : peer_len;
    const uint8_t *rh = hs->initiator ? peer_hello : hs->hello.data;
    size_t rl = hs->initiator ? peer_len : hs->hello.len;
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    uint8_t l[4];
    unsigned int n = sizeof(hs->transcript);
    if (ctx == NULL || EVP_DigestInit_ex(ctx, EVP_sha256(), NULL) != 1)
        hs_crypto_failed();
    EVP_DigestUpdate(ctx, HS_LABEL, strlen(HS_LABEL));
    pb_store_u32(l, (uint32_t)il);
    EVP_DigestUpdate(ctx, l, sizeof(l));
    EVP_DigestUpdate(ctx, ih, il);
    pb_store_u32(l, (uint32_t)rl);
    EVP_DigestUpdate(ctx, l, sizeof(l));
    EVP_DigestUpdate(ctx, rh, rl);
    if (EVP_DigestFinal_ex(ctx, hs->transcript, &n) != 1)
        hs_crypto_failed();
    EVP_MD_CTX_free(ctx);
}

static int hs_on_hello(struct net_hs *hs, const uint8_t *p, size_t len, struct buf *reply,
                       uint8_t *reply_type, struct pb_error *err)
{
    const struct net_hs_local *l = hs->local;
    struct cursor c;
    if (len > NET_HELLO_MAX)
        return hs_fail(hs, err, -EPROTO, "HELLO too large");
    cursor_init(&c, p, len);
    uint16_t vmin = cursor_u16(&c);
    uint16_t vmax = cursor_u16(&c);
    if (!cursor_ok(&c))
        return hs_fail(hs, err, -EPROTO, "malformed HELLO");
    /* the ranges must overlap; the link speaks the highest common version */
    uint16_t mine = hs_version_max(l);
    if (vmin > vmax || vmax < NET_PROTO_VERSION_MIN || vmin > mine) {
        hs->state = NET_HS_FAILED;
        return pb_error_set(
                err, -EPROTONOSUPPORT,
                "handshake: protocol version mismatch: peer speaks %u..%u, this node speaks %u..%u",
                vmin, vmax, NET_PROTO_VERSION_MIN, mine);
    }
    hs->version = PB_MIN(vmax, mine);
    uint64_t id = cursor_u64(&c);
    size_t cid_len;
    const uint8_t *cid = cursor_bytes(&c, NET_CLUSTER_ID_LEN, &cid_len);
    size_t name_len;
    const uint8_t *name = cursor_bytes(&c, NET_NAME_MAX, &name_len);
    const uint8_t *nonce = cursor_take(&c, NET_NONCE_LEN);
    if (!cursor_ok(&c) || (cid_len != 0 && cid_len != NET_CLUSTER_ID_LEN))
        return hs_fail(hs, err, -EPROTO, "malformed HELLO");
    if (!net_hs_name_valid((const char *)name, name_len))
        return hs_fail(hs, err, -EPROTO, "HELLO carries an invalid node name");
    if (CRYPTO_memcmp(nonce, hs->nonce, NET_NONCE_LEN) == 0)
        return hs_fail(hs, err, -EPROTO, "peer reflected our nonce");
    memcpy(hs->peer_name, name, name_len);
    hs->peer_name[name_len] = '\0';
    hs->peer_id = id;
    if (id == 0) {
        hs->state = NET_HS_FAILED;
        return pb_error_set(err, -ECONNREFUSED, "handshake: peer %s claims node id 0",
                            hs->peer_name);
    }
    if (id == l->node_id) {
        hs->state = NET_HS_FAILED;
        return pb_error_set(
                err, -ECONNREFUSED,
                "handshake: peer %s claims our own node id %llu (connected to ourselves?)",
                hs->peer_name, (unsigned long long)id);
    }
    if (hs->expect_node_id != 0 && id != hs->expect_node_id) {
        hs->state = NET_HS_FAILED;
        return pb_error_set(
                err, -ECONNREFUSED, "handshake: dialed node %llu but node %llu (%s) answered",
                (unsigned long long)hs->expect_node_id, (unsigned long long)id, hs->peer_name);
    }
    hs->peer_has_cluster_id = cid_len != 0;
    if (cid_len != 0)
        memcpy(hs->peer_cluster_id, cid, NET_CLUSTER_ID_LEN);
    if (cid_len != 0 && l->has_cluster_id && memcmp(cid, l->cluster_id, NET_CLUSTER_ID_LEN) != 0) {
        hs->state = NET_HS_FAILED;
        return pb_error_set(err, -ECONNREFUSED,
                            "handshake: node %llu (%s) belongs to another cluster",
                            (unsigned long long)id, hs->peer_name);
    }
    hs_transcript(hs, p, len);
    hs_mac(hs, hs->initiator ? "auth initiator" : "auth responder", hs_reserve(reply, NET_MAC_LEN));
    *reply_type = NET_FRAME_AUTH;
    hs->state = NET_HS_WAIT_AUTH;
    return 0;
}

static int hs_on_auth(struct net_hs *hs, const uint8_t *p, size_t len, struct pb_error *err)
{
    uint8_t want[NET_MAC_LEN];
    if (len != NET_MAC_LEN)
        return hs_fail(hs, err, -EPROTO, "malformed AUTH");
    /* The peer's MAC is labelled with the peer's role, never ours. */
    hs_mac(hs, hs->initiator ? "auth responder" : "auth initiator", want);
    int bad = CRYPTO_memcmp(want, p, NET_MAC_LEN);
    OPENSSL_cleanse(want, sizeof(want));
    if (bad != 0) {
        hs->state = NET_HS_FAILED;
        return pb_error_set(
                err, -EACCES,
                "handshake: authentication failed with node %llu (%s): the cluster secrets "
                "differ",
                (unsigned long long)hs->peer_id, hs->peer_name);
    }
    hs_mac(hs, hs->initiator ? "key i2r" : "key r2i", hs->key_send);
    hs_mac(hs, hs->initiator ? "key r2i" : "key i2r", hs->key_recv);
    hs->state = NET_HS_DONE;
    return 0;
}

int net_hs_input(struct net_hs *hs, uint8_t type, const uint8_t *p, size_t len, struct buf *reply,
                 uint8_t *reply_type, struct pb_error *err)
{
    *reply_type = 0;
    switch (hs->state) {
    case NET_HS_WAIT_HELLO:
        if (type != NET_FRAME_HELLO)
            return hs_fail(hs, err, -EPROTO, "expected HELLO");
        return hs_on_hello(hs, p, len, reply, reply_type, err);
    case NET_HS_WAIT_AUTH:
        if (type != NET_FRAME_AUTH)
            return hs_fail(hs, err, -EPROTO, "expected AUTH");
        return hs_on_auth(hs, p, len, err);
    case NET_HS_START:
    case NET_HS_DONE:
    case NET_HS_FAILED:
        break;
    }
    return hs_fail(hs, err, -EPROTO, "unexpected handshake message");
}

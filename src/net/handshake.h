/*
 * handshake.h: the peer link's version handshake and mutual authentication,
 * as a pure state machine (no I/O, no clock, no randomness: the nonce is
 * passed in), so it can be unit-tested and fuzzed on its own.
 *
 * Both ends send HELLO as soon as the TCP connection exists, then AUTH as
 * soon as they have the other's HELLO; each end trusts the link only after
 * the other's AUTH verifies. Payloads (integers big-endian):
 *
 *   HELLO  u16 version_min, u16 version_max   protocol versions spoken (1..2)
 *          u64 node_id                        claimed id, never 0
 *          u32 n + n bytes cluster id          n = 16, or 0 while joining
 *          u32 n + n bytes node name           1..64 printable ASCII, no space
 *          32 bytes nonce                      fresh random per connection
 *          (trailing bytes: reserved for later versions, ignored but covered
 *          by the transcript)
 *   AUTH   32 bytes HMAC-SHA256(secret, "pickbox/net/1 auth " role || T)
 *          role is "initiator" or "responder" (the sender's role), and
 *          T = SHA-256("pickbox/net/1" || u32 len || HELLO_initiator ||
 *                      u32 len || HELLO_responder)
 *
 * The MAC covers both nonces, so a recorded AUTH never verifies again
 * (replay) and the role label stops a peer's AUTH from being reflected back
 * to it. After both AUTHs verify, each end derives two 32-byte frame keys:
 * K_i2r / K_r2i = HMAC-SHA256(secret, "pickbox/net/1 key i2r"/"r2i" || T),
 * which net.c uses to tag every later frame (frame.h), so nothing can be
 * injected into an authenticated connection either.
 *
 * Versions: the link speaks the highest version both ends speak (a 1..1
 * node and a 1..2 node talk version 1). Version 2 adds nothing to the
 * handshake or the frames: it says the node decodes the REFS op and handles
 * the PUSH / PUSH_ACK messages (doc/decisions.md D13), which the daemon uses
 * only while every member speaks it.
 *
 * Refusals: no common version (-EPROTONOSUPPORT), a node id of 0 or our own
 * id, a different id than the one dialed, or two different cluster ids
 * (-ECONNREFUSED), a malformed or out-of-order message (-EPROTO), a wrong
 * MAC (-EACCES). A node without a cluster id (joining) is accepted by and
 * accepts any node holding the secret: the secret is what authorizes a
 * join; the owner learns the other end's cluster id from the result.
 * Nothing derived from the secret is ever put into an error message.
 */
#ifndef PICKBOX_NET_HANDSHAKE_H
#define PICKBOX_NET_HANDSHAKE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "lib/buf.h"
#include "lib/error.h"

#define NET_PROTO_VERSION     2 /* the highest version this node speaks */
#define NET_PROTO_VERSION_MIN 1 /* the lowest */
#define NET_NONCE_LEN         32
#define NET_CLUSTER_ID_LEN    16
#define NET_NAME_MAX          64
#define NET_MAC_LEN           32
#define NET_KEY_LEN           32
#define NET_SECRET_MIN        16
#define NET_SECRET_MAX        1024
/* Upper bound of a HELLO payload we accept (room for later extensions). */
#define NET_HELLO_MAX 4096

/* What this node says about itself; borrowed by struct net_hs. */
struct net_hs_local {
    uint64_t node_id;
    const char *node_name; /* <= NET_NAME_MAX printable ASCII */
    const uint8_t *secret;
    size_t secret_len; /* NET_SECRET_MIN..NET_SECRET_MAX */
    bool has_cluster_id;
    uint8_t cluster_id[NET_CLUSTER_ID_LEN];
    /* Highest version spoken, NET_PROTO_VERSION_MIN..NET_PROTO_VERSION (0:
     * NET_PROTO_VERSION); lower only to test a mixed-version cluster. */
    uint16_t version_max;
};

enum net_hs_state {
    NET_HS_START,      /* net_hs_hello() not called yet */
    NET_HS_WAIT_HELLO, /* our HELLO is out */
    NET_HS_WAIT_AUTH,  /* our AUTH is out */
    NET_HS_DONE,       /* the peer proved the secret; keys are set */
    NET_HS_FAILED,
};

struct net_hs {
    enum net_hs_state state;
    bool initiator;
    const struct net_hs_local *local;
    uint64_t expect_node_id; /* 0: any */
    uint8_t nonce[NET_NONCE_LEN];
    struct buf hello; /* our HELLO payload, for the transcript */
    uint8_t transcript[32];
    /* The peer, valid once its HELLO was accepted (state >= WAIT_AUTH). */
    uint16_t version; /* of the link: the highest both ends speak */
    uint64_t peer_id;
    char peer_name[NET_NAME_MAX + 1];
    bool peer_has_cluster_id;
    uint8_t peer_cluster_id[NET_CLUSTER_ID_LEN];
    /* Frame keys, valid once state == NET_HS_DONE. */
    uint8_t key_send[NET_KEY_LEN];
    uint8_t key_recv[NET_KEY_LEN];
};

/* Starts a handshake. initiator: we dialed. expect_node_id: the id we
 * dialed (0 accepts any). local must outlive hs. */
void net_hs_init(struct net_hs *hs, const struct net_hs_local *local, bool initiator,
                 uint64_t expect_node_id, const uint8_t nonce[NET_NONCE_LEN]);

/* Wipes the keys and frees what hs holds; safe on a zeroed struct. */
void net_hs_free(struct net_hs *hs);

/* Appends our HELLO payload (frame type NET_FRAME_HELLO) to out. */
void net_hs_hello(struct net_hs *hs, struct buf *out);

/*
 * Feeds one handshake frame (type and payload) from the peer. Returns 0 and,
 * when *reply_type is not 0, a frame of that type whose payload was appended
 * to reply must be sent. state becomes NET_HS_DONE when the peer's AUTH
 * verifies. On error returns a negative errno (see the file comment), fills
 * err, and the state is NET_HS_FAILED for good.
 */
int net_hs_input(struct net_hs *hs, uint8_t type, const uint8_t *p, size_t len, struct buf *reply,
                 uint8_t *reply_type, struct pb_error *err);

/* True if name is 1..NET_NAME_MAX printable ASCII characters. */
bool net_hs_name_valid(const char *name, size_t len);

#endif

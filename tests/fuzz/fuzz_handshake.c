/*
 * fuzz_handshake.c: libFuzzer target for the handshake state machine
 * (src/net/handshake.c), fed as the peer would feed it.
 *
 * Input: one option byte (bit 0: we are the initiator; bit 1: we expect node
 * id 2; bit 2: we have a cluster id), then messages, each u8 type, u16 length
 * (big-endian), payload. Checks the state machine's promises: errors leave it
 * FAILED for good with a message, a success never skips a state, an AUTH
 * reply is one MAC, DONE is reached only from WAIT_AUTH.
 */
#include "config.h"

#include <assert.h>
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "lib/buf.h"
#include "net/frame.h"
#include "net/handshake.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static const uint8_t SECRET[] = "fuzz-secret-0123456789abcdef";
static const uint8_t CLUSTER[NET_CLUSTER_ID_LEN] = {1, 2,  3,  4,  5,  6,  7,  8,
                                                    9, 10, 11, 12, 13, 14, 15, 16};

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    uint8_t opt = data[0];
    struct net_hs_local local;
    memset(&local, 0, sizeof(local));
    local.node_id = 1;
    local.node_name = "fuzz";
    local.secret = SECRET;
    local.secret_len = sizeof(SECRET) - 1;
    if (opt & 4) {
        local.has_cluster_id = true;
        memcpy(local.cluster_id, CLUSTER, NET_CLUSTER_ID_LEN);
    }
    uint8_t nonce[NET_NONCE_LEN];
    memset(nonce, 0x42, sizeof(nonce));
    struct net_hs hs;
    struct buf out = BUF_INIT;
    net_hs_init(&hs, &local, opt & 1, (opt & 2) ? 2 : 0, nonce);
    net_hs_hello(&hs, &out);
    assert(hs.state == NET_HS_WAIT_HELLO);

    struct cursor c;
    cursor_init(&c, data + 1, size - 1);
    bool failed = false;
    while (cursor_remaining(&c) >= 3) {
        uint8_t type = cursor_u8(&c);
        uint16_t len = cursor_u16(&c);
        const uint8_t *p = cursor_take(&c, len);
        if (p == NULL)
            break;
        size_t plen = len;
        enum net_hs_state before = hs.state;
        struct pb_error err;
        uint8_t rt = 0xFF;
        buf_reset(&out);
        int r = net_hs_input(&hs, type, p, plen, &out, &rt, &err);
        if (r < 0) {
            assert(hs.state == NET_HS_FAILED);
            assert(err.code == r && err.msg[0] != '\0');
            assert(rt == 0);
            failed = true;
            continue;
        }
        assert(!failed);
        assert(r == 0);
        if (before == NET_HS_WAIT_HELLO) {
            assert(type == NET_FRAME_HELLO && hs.state == NET_HS_WAIT_AUTH);
            assert(rt == NET_FRAME_AUTH && out.len == NET_MAC_LEN);
            assert(hs.peer_id != 0 && hs.peer_id != local.node_id);
            assert(net_hs_name_valid(hs.peer_name, strlen(hs.peer_name)));
        } else {
            /* Only a verified AUTH gets here (the seed corpus has one). */
            assert(before == NET_HS_WAIT_AUTH && hs.state == NET_HS_DONE);
            assert(rt == 0);
        }
    }
    net_hs_free(&hs);
    buf_free(&out);
    return 0;
}

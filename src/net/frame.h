/*
 * frame.h: the peer link's frame codec (pure: no I/O, no allocation).
 *
 * Wire format of one frame (all integers big-endian):
 *
 *   offset 0  u8   magic    NET_FRAME_MAGIC (0xB7)
 *          1  u8   version  NET_FRAME_VERSION (1): the framing itself; the
 *                           protocol version is negotiated in HELLO
 *          2  u8   type     1 HELLO, 2 AUTH (handshake, see handshake.h);
 *                           3..15 reserved; 16..255 owner-defined
 *          3  u8   flags    bit 0 NET_FRAME_F_BULK: part of a bulk message
 *                           bit 1 NET_FRAME_F_MORE: more fragments of this
 *                                 bulk message follow (only with BULK)
 *                           other bits must be zero
 *          4  u32  length   payload length, at most NET_FRAME_MAX_PAYLOAD
 *          8  length bytes of payload
 *             tag_len bytes of tag: 0 during the handshake; after it,
 *             NET_FRAME_TAG_LEN bytes of HMAC-SHA256(direction key,
 *             u64 sequence || header || payload) truncated (see net.c)
 *
 * A bulk message larger than one frame travels as consecutive BULK frames
 * of the same type, all but the last with MORE set; control frames may be
 * interleaved between them. The receiver reassembles up to NET_MSG_MAX.
 */
#ifndef PICKBOX_NET_FRAME_H
#define PICKBOX_NET_FRAME_H

#include <stddef.h>
#include <stdint.h>

#include "lib/error.h"

#define NET_FRAME_MAGIC   0xB7
#define NET_FRAME_VERSION 1
#define NET_FRAME_HDR_LEN 8
#define NET_FRAME_TAG_LEN 16
/* The largest payload of one frame (and so of one control message). */
#define NET_FRAME_MAX_PAYLOAD (256u * 1024u)
/* The largest bulk message after reassembly. */
#define NET_MSG_MAX (16u * 1024u * 1024u)

#define NET_FRAME_F_BULK  0x01
#define NET_FRAME_F_MORE  0x02
#define NET_FRAME_F_KNOWN (NET_FRAME_F_BULK | NET_FRAME_F_MORE)

enum net_frame_type {
    NET_FRAME_HELLO = 1,
    NET_FRAME_AUTH = 2,
    /* Types below this one belong to the transport. */
    NET_FRAME_USER_MIN = 16,
};

struct net_frame {
    uint8_t type;
    uint8_t flags;
    uint32_t len;           /* payload length */
    const uint8_t *hdr;     /* the NET_FRAME_HDR_LEN header bytes inside the input */
    const uint8_t *payload; /* len bytes inside the input */
    const uint8_t *tag;     /* tag_len bytes inside the input, NULL when tag_len is 0 */
};

/* Writes a frame header into hdr. len must be at most NET_FRAME_MAX_PAYLOAD. */
void net_frame_encode_header(uint8_t hdr[NET_FRAME_HDR_LEN], uint8_t type, uint8_t flags,
                             uint32_t len);

/*
 * Decodes the frame at the start of p[0..n) whose payload may be at most
 * max_payload (<= NET_FRAME_MAX_PAYLOAD) bytes, followed by tag_len tag bytes.
 * Returns:
 *   > 0   the frame's total size (header + payload + tag); *f points into p;
 *   0     need more input; *need is set to the total size once the header is
 *         complete and valid (NET_FRAME_HDR_LEN before that);
 *   < 0   a protocol error (-EPROTO bad magic, flags or type/flags combination;
 *         -EPROTONOSUPPORT unknown framing version; -EMSGSIZE length over
 *         max_payload) with a message in err (may be NULL). The header is
 *         validated as soon as it is complete, before the payload arrives.
 */
long net_frame_decode(const uint8_t *p, size_t n, size_t max_payload, size_t tag_len,
                      struct net_frame *f, size_t *need, struct pb_error *err);

#endif

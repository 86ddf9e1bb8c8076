/*
 * frame.c: encode and decode peer frame headers (see frame.h for the format).
 *
 * Pure functions over byte buffers, so the decoder can be fuzzed on its own.
 */
#include "config.h"

#include "net/frame.h"

#include <errno.h>
#include <string.h>

#include "lib/buf.h"

void net_frame_encode_header(uint8_t hdr[NET_FRAME_HDR_LEN], uint8_t type, uint8_t flags,
                             uint32_t len)
{
    hdr[0] = NET_FRAME_MAGIC;
    hdr[1] = NET_FRAME_VERSION;
    hdr[2] = type;
    hdr[3] = flags;
    pb_store_u32(hdr + 4, len);
}

long net_frame_decode(const uint8_t *p, size_t n, size_t max_payload, size_t tag_len,
                      struct net_frame *f, size_t *need, struct pb_error *err)
{
    memset(f, 0, sizeof(*f));
    *need = NET_FRAME_HDR_LEN;
    if (max_payload > NET_FRAME_MAX_PAYLOAD)
        max_payload = NET_FRAME_MAX_PAYLOAD;
    if (n < NET_FRAME_HDR_LEN)
        return 0;
    if (p[0] != NET_FRAME_MAGIC)
        return pb_error_set(err, -EPROTO, "not a pickbox peer frame (magic 0x%02x)", p[0]);
    if (p[1] != NET_FRAME_VERSION)
        return pb_error_set(err, -EPROTONOSUPPORT,
                            "unsupported frame version %u (this node speaks %u)", p[1],
                            NET_FRAME_VERSION);
    uint8_t type = p[2];
    uint8_t flags = p[3];
    uint32_t len = pb_load_u32(p + 4);
    if (type == 0)
        return pb_error_set(err, -EPROTO, "frame type 0 is invalid");
    if ((flags & ~NET_FRAME_F_KNOWN) != 0)
        return pb_error_set(err, -EPROTO, "unknown frame flags 0x%02x", flags);
    if ((flags & NET_FRAME_F_MORE) && !(flags & NET_FRAME_F_BULK))
        return pb_error_set(err, -EPROTO, "MORE flag without BULK flag");
    if ((flags & NET_FRAME_F_BULK) && type < NET_FRAME_USER_MIN)
        return pb_error_set(err, -EPROTO, "transport frame type %u marked bulk", type);
    if (len > max_payload)
        return pb_error_set(err, -EMSGSIZE, "frame payload of %u bytes exceeds the limit of %zu",
                            len, max_payload);
    size_t total = NET_FRAME_HDR_LEN + (size_t)len + tag_len;
    *need = total;
    if (n < total)
        return 0;
    f->type = type;
    f->flags = flags;
    f->len = len;
    f->hdr = p;
    f->payload = p + NET_FRAME_HDR_LEN;
    f->tag = tag_len ? p + NET_FRAME_HDR_LEN + len : NULL;
    return (long)total;
}

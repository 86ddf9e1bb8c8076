/*
 * fuzz_frame.c: libFuzzer target for the peer frame decoder (src/net/frame.c).
 *
 * The first input byte picks the limits (payload cap, tag length); the rest
 * is a byte stream decoded frame after frame, as the transport does. Checks
 * that every decoded frame lies inside the input, respects the limits, and
 * re-encodes to the same header bytes. Built and run by tests/fuzz/run.sh.
 */
#include "config.h"

#include <assert.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "net/frame.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    static const size_t caps[4] = {0, 64, 4096, NET_FRAME_MAX_PAYLOAD};
    size_t max_payload = caps[data[0] & 3];
    size_t tag_len = (data[0] & 4) ? NET_FRAME_TAG_LEN : 0;
    const uint8_t *p = data + 1;
    size_t n = size - 1;
    while (n > 0) {
        struct net_frame f;
        struct pb_error err;
        size_t need = 0;
        long r = net_frame_decode(p, n, max_payload, tag_len, &f, &need, &err);
        if (r < 0) {
            assert(err.code == r && err.msg[0] != '\0');
            break;
        }
        if (r == 0) {
            assert(need > n);
            assert(need >= NET_FRAME_HDR_LEN);
            assert(need <= NET_FRAME_HDR_LEN + max_payload + tag_len);
            break;
        }
        assert((size_t)r <= n);
        assert((size_t)r == NET_FRAME_HDR_LEN + f.len + tag_len);
        assert(f.len <= max_payload);
        assert(f.hdr == p && f.payload == p + NET_FRAME_HDR_LEN);
        assert(tag_len == 0 ? f.tag == NULL : f.tag == f.payload + f.len);
        assert(f.type != 0 && (f.flags & ~NET_FRAME_F_KNOWN) == 0);
        uint8_t hdr[NET_FRAME_HDR_LEN];
        net_frame_encode_header(hdr, f.type, f.flags, f.len);
        assert(memcmp(hdr, p, NET_FRAME_HDR_LEN) == 0);
        p += r;
        n -= (size_t)r;
    }
    return 0;
}

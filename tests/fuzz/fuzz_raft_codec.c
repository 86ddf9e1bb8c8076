/*
 * fuzz_raft_codec.c: libFuzzer target for the Raft wire codec
 * (src/raft/codec.c, conf.c): messages, log entries and configurations,
 * which arrive from peers and from raft.db.
 *
 * The first input byte picks the decoder; the rest is untrusted input. A
 * decoded value must re-encode to bytes that decode again to the same
 * encoding (the codec is stable), and nothing may crash or leak. Built and
 * run by tests/fuzz/run.sh.
 */
#include "config.h"

#include <assert.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "lib/buf.h"
#include "raft/raft.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void fuzz_msg(const uint8_t *p, size_t n)
{
    struct raft_msg m;
    if (raft_msg_decode(p, n, &m) != 0)
        return;
    struct buf a = BUF_INIT, b = BUF_INIT;
    assert(raft_msg_encode(&m, &a) == 0);
    struct raft_msg m2;
    assert(raft_msg_decode(a.data, a.len, &m2) == 0);
    assert(raft_msg_encode(&m2, &b) == 0);
    assert(a.len == b.len && memcmp(a.data, b.data, a.len) == 0);
    raft_msg_clear(&m2);
    raft_msg_clear(&m);
    buf_free(&a);
    buf_free(&b);
}

static void fuzz_entry(const uint8_t *p, size_t n)
{
    struct raft_entry e;
    if (raft_entry_decode(p, n, &e) != 0)
        return;
    struct buf a = BUF_INIT, b = BUF_INIT;
    assert(raft_entry_encode(&e, &a) == 0);
    struct raft_entry e2;
    assert(raft_entry_decode(a.data, a.len, &e2) == 0);
    assert(raft_entry_encode(&e2, &b) == 0);
    assert(a.len == b.len && memcmp(a.data, b.data, a.len) == 0);
    free(e2.data);
    free(e.data);
    buf_free(&a);
    buf_free(&b);
}

static void fuzz_conf(const uint8_t *p, size_t n)
{
    struct raft_conf c;
    if (raft_conf_decode(p, n, &c) != 0)
        return;
    uint8_t *a = NULL, *b = NULL;
    size_t alen = 0, blen = 0;
    assert(raft_conf_encode(&c, &a, &alen) == 0);
    struct raft_conf c2;
    assert(raft_conf_decode(a, alen, &c2) == 0);
    assert(raft_conf_encode(&c2, &b, &blen) == 0);
    assert(alen == blen && memcmp(a, b, alen) == 0);
    raft_conf_clear(&c2);
    raft_conf_clear(&c);
    free(a);
    free(b);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    switch (data[0] % 3) {
    case 0:
        fuzz_msg(data + 1, size - 1);
        break;
    case 1:
        fuzz_entry(data + 1, size - 1);
        break;
    default:
        fuzz_conf(data + 1, size - 1);
        break;
    }
    return 0;
}

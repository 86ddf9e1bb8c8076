/*
 * check_fsm.c: unit tests for src/fsm/op (op encoding, decoding of untrusted
 * bytes, path and node id validation, content hashing).
 */
#include "config.h"

#include <check.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "fsm/op.h"
#include "lib/buf.h"
#include "lib/util.h"

/* ---- helpers ------------------------------------------------------------- */

static void fill_id(uint8_t id[FSM_CHUNK_ID_LEN], uint8_t seed)
{
    for (int i = 0; i < FSM_CHUNK_ID_LEN; i++)
        id[i] = (uint8_t)(seed * 31 + i);
}

/* A PUT of three chunks, the second carried, with real ids. */
static void make_put(struct fsm_op *op)
{
    fsm_op_init(op);
    op->type = FSM_OP_PUT;
    op->origin = pb_xstrdup("n1");
    op->path = pb_xstrdup("docs/report.tar.gz");
    op->base = 42;
    op->u.put.mode = 0644;
    op->u.put.mtime_ns = -5; /* before the epoch: must survive the trip */
    op->u.put.n_refs = 3;
    op->u.put.refs = pb_xcalloc(3, sizeof(*op->u.put.refs));
    static const char *bodies[3] = {"first chunk", "second", "3"};
    for (int i = 0; i < 3; i++) {
        op->u.put.refs[i].len = (uint32_t)strlen(bodies[i]);
        ck_assert_int_eq(fsm_sha256(bodies[i], strlen(bodies[i]), op->u.put.refs[i].id), 0);
        op->u.put.size += op->u.put.refs[i].len;
    }
    op->u.put.n_data = 1;
    op->u.put.data = pb_xcalloc(1, sizeof(*op->u.put.data));
    memcpy(op->u.put.data[0].id, op->u.put.refs[1].id, FSM_CHUNK_ID_LEN);
    op->u.put.data[0].len = 6;
    op->u.put.data[0].data = pb_xmalloc(6);
    memcpy(op->u.put.data[0].data, "second", 6);
}

static void make_simple(struct fsm_op *op, enum fsm_op_type t, const char *path)
{
    fsm_op_init(op);
    op->type = t;
    op->origin = pb_xstrdup("node-2");
    op->path = pb_xstrdup(path);
    op->base = 7;
    switch (t) {
    case FSM_OP_DELETE:
        op->u.del.is_dir = true;
        break;
    case FSM_OP_RENAME:
        op->u.rename.to = pb_xstrdup("b/new name");
        op->u.rename.base_to = 9;
        break;
    case FSM_OP_MKDIR:
        op->u.mkdir.mode = 0755;
        op->u.mkdir.mtime_ns = 1700000000123456789LL;
        break;
    case FSM_OP_SYMLINK:
        op->u.symlink.target = pb_xstrdup("../../etc/passwd"); /* stored, never followed */
        op->u.symlink.mtime_ns = 3;
        break;
    case FSM_OP_SETATTR:
        op->u.setattr.fields = FSM_ATTR_MODE | FSM_ATTR_MTIME;
        op->u.setattr.mode = 01750;
        op->u.setattr.mtime_ns = INT64_MIN;
        break;
    default:
        ck_abort_msg("not a simple op");
    }
}

static void make_batch(struct fsm_op *op)
{
    fsm_op_init(op);
    op->type = FSM_OP_BATCH;
    op->origin = pb_xstrdup("n3");
    op->u.batch.n_ops = 3;
    op->u.batch.ops = pb_xcalloc(3, sizeof(struct fsm_op));
    make_simple(&op->u.batch.ops[0], FSM_OP_MKDIR, "a");
    make_put(&op->u.batch.ops[1]);
    make_simple(&op->u.batch.ops[2], FSM_OP_DELETE, "old");
}

static void encode_ok(const struct fsm_op *op, struct buf *b)
{
    struct pb_error err;
    pb_error_clear(&err);
    ck_assert_msg(fsm_op_validate(op, &err) == 0, "validate: %s", err.msg);
    buf_init(b);
    ck_assert_int_eq(fsm_op_encode(op, b), 0);
}

static int decode_rc(const struct buf *b)
{
    struct fsm_op op;
    int rc = fsm_op_decode(b->data, b->len, &op, NULL);
    fsm_op_free(&op);
    return rc;
}

/* Encodes, decodes, re-encodes: the bytes must be identical. */
static void roundtrip(const struct fsm_op *op, struct fsm_op *out)
{
    struct buf a, b;
    struct pb_error err;
    encode_ok(op, &a);
    pb_error_clear(&err);
    int rc = fsm_op_decode(a.data, a.len, out, &err);
    ck_assert_msg(rc == 0, "decode: %d %s", rc, err.msg);
    buf_init(&b);
    ck_assert_int_eq(fsm_op_encode(out, &b), 0);
    ck_assert_uint_eq(a.len, b.len);
    ck_assert_mem_eq(a.data, b.data, a.len);
    buf_free(&a);
    buf_free(&b);
}

/* ---- round trips --------------------------------------------------------- */

START_TEST(test_op_roundtrip_put)
{
    struct fsm_op op, out;
    make_put(&op);
    roundtrip(&op, &out);
    ck_assert_int_eq(out.type, FSM_OP_PUT);
    ck_assert_str_eq(out.origin, "n1");
    ck_assert_str_eq(out.path, "docs/report.tar.gz");
    ck_assert_uint_eq(out.base, 42);
    ck_assert_uint_eq(out.u.put.mode, 0644);
    ck_assert(out.u.put.mtime_ns == -5);
    ck_assert_uint_eq(out.u.put.size, 11 + 6 + 1);
    ck_assert_uint_eq(out.u.put.n_refs, 3);
    ck_assert_mem_eq(out.u.put.refs[2].id, op.u.put.refs[2].id, FSM_CHUNK_ID_LEN);
    ck_assert_uint_eq(out.u.put.n_data, 1);
    ck_assert_mem_eq(out.u.put.data[0].data, "second", 6);
    ck_assert_int_eq(fsm_op_verify_chunks(&out, NULL), 0);
    fsm_op_free(&op);
    fsm_op_free(&out);
}
END_TEST

START_TEST(test_op_roundtrip_simple)
{
    static const enum fsm_op_type types[] = {FSM_OP_DELETE, FSM_OP_RENAME, FSM_OP_MKDIR,
                                             FSM_OP_SYMLINK, FSM_OP_SETATTR};
    for (size_t i = 0; i < PB_ARRAY_SIZE(types); i++) {
        struct fsm_op op, out;
        make_simple(&op, types[i], "dir/\xff\xfe not utf-8");
        roundtrip(&op, &out);
        ck_assert_int_eq(out.type, types[i]);
        ck_assert_str_eq(out.path, "dir/\xff\xfe not utf-8");
        ck_assert_str_eq(out.origin, "node-2");
        ck_assert_uint_eq(out.base, 7);
        switch (types[i]) {
        case FSM_OP_DELETE:
            ck_assert(out.u.del.is_dir);
            break;
        case FSM_OP_RENAME:
            ck_assert_str_eq(out.u.rename.to, "b/new name");
            ck_assert_uint_eq(out.u.rename.base_to, 9);
            break;
        case FSM_OP_MKDIR:
            ck_assert_uint_eq(out.u.mkdir.mode, 0755);
            ck_assert(out.u.mkdir.mtime_ns == 1700000000123456789LL);
            break;
        case FSM_OP_SYMLINK:
            ck_assert_str_eq(out.u.symlink.target, "../../etc/passwd");
            break;
        case FSM_OP_SETATTR:
            ck_assert_uint_eq(out.u.setattr.mode, 01750);
            ck_assert(out.u.setattr.mtime_ns == INT64_MIN);
            break;
        default:
            break;
        }
        fsm_op_free(&op);
        fsm_op_free(&out);
    }
}
END_TEST

START_TEST(test_op_roundtrip_batch_and_chunks)
{
    struct fsm_op op, out;
    make_batch(&op);
    roundtrip(&op, &out);
    ck_assert_int_eq(out.type, FSM_OP_BATCH);
    ck_assert_uint_eq(out.u.batch.n_ops, 3);
    ck_assert_int_eq(out.u.batch.ops[0].type, FSM_OP_MKDIR);
    ck_assert_int_eq(out.u.batch.ops[1].type, FSM_OP_PUT);
    ck_assert_str_eq(out.u.batch.ops[2].path, "old");
    fsm_op_free(&op);
    fsm_op_free(&out);

    fsm_op_init(&op);
    op.type = FSM_OP_CHUNKS;
    op.origin = pb_xstrdup("n1");
    op.u.chunks.n_data = 1;
    op.u.chunks.data = pb_xcalloc(1, sizeof(struct fsm_chunk_data));
    op.u.chunks.data[0].data = pb_xmalloc(4);
    memcpy(op.u.chunks.data[0].data, "abcd", 4);
    op.u.chunks.data[0].len = 4;
    ck_assert_int_eq(fsm_sha256("abcd", 4, op.u.chunks.data[0].id), 0);
    roundtrip(&op, &out);
    ck_assert_ptr_null(out.path);
    ck_assert_uint_eq(out.u.chunks.n_data, 1);
    ck_assert_int_eq(fsm_op_verify_chunks(&out, NULL), 0);
    out.u.chunks.data[0].data[0] ^= 1;
    ck_assert_int_eq(fsm_op_verify_chunks(&out, NULL), -EBADMSG);
    fsm_op_free(&op);
    fsm_op_free(&out);
}
END_TEST

START_TEST(test_op_empty_file_put)
{
    struct fsm_op op, out;
    fsm_op_init(&op);
    op.type = FSM_OP_PUT;
    op.origin = pb_xstrdup("n1");
    op.path = pb_xstrdup("empty");
    op.u.put.mode = 0600;
    roundtrip(&op, &out);
    ck_assert_uint_eq(out.u.put.size, 0);
    ck_assert_uint_eq(out.u.put.n_refs, 0);
    ck_assert_ptr_null(out.u.put.refs);
    fsm_op_free(&op);
    fsm_op_free(&out);
}
END_TEST

/* ---- decode errors ------------------------------------------------------- */

/* Every strict prefix of a valid encoding is rejected, without overreads. */
START_TEST(test_op_decode_truncated)
{
    struct fsm_op op;
    struct buf b;
    make_batch(&op);
    encode_ok(&op, &b);
    for (size_t n = 0; n < b.len; n++) {
        uint8_t *copy = pb_xmalloc(n ? n : 1); /* exact size: ASan sees overreads */
        memcpy(copy, b.data, n);
        struct fsm_op out;
        int rc = fsm_op_decode(copy, n, &out, NULL);
        ck_assert_msg(rc == -EINVAL, "prefix %zu of %zu: rc %d", n, b.len, rc);
        ck_assert_ptr_null(out.origin);
        fsm_op_free(&out);
        free(copy);
    }
    buf_free(&b);
    fsm_op_free(&op);
}
END_TEST

START_TEST(test_op_decode_trailing_and_version)
{
    struct fsm_op op;
    struct buf b;
    make_simple(&op, FSM_OP_MKDIR, "x");
    encode_ok(&op, &b);
    buf_put_u8(&b, 0);
    ck_assert_int_eq(decode_rc(&b), -EINVAL);
    b.len--;
    ck_assert_int_eq(decode_rc(&b), 0);
    ck_assert_uint_eq(b.data[0], 1); /* every op but REFS is written in format 1 */
    b.data[0] = 2;                   /* and reads in format 2 as well */
    ck_assert_int_eq(decode_rc(&b), 0);
    b.data[0] = FSM_OP_FORMAT_VERSION + 1; /* a future format */
    ck_assert_int_eq(decode_rc(&b), -EPROTONOSUPPORT);
    b.data[0] = 0;
    ck_assert_int_eq(decode_rc(&b), -EPROTONOSUPPORT);
    buf_free(&b);
    fsm_op_free(&op);
}
END_TEST

START_TEST(test_op_decode_oversized)
{
    size_t n = (size_t)FSM_OP_MAX_BYTES + 1;
    uint8_t *p = pb_xcalloc(1, n);
    struct fsm_op op;
    struct pb_error err;
    pb_error_clear(&err);
    ck_assert_int_eq(fsm_op_decode(p, n, &op, &err), -EMSGSIZE);
    ck_assert_int_eq(err.code, -EMSGSIZE);
    free(p);
}
END_TEST

/* Hand-made encodings with one field wrong each. */
static void raw_head(struct buf *b, uint8_t type, const char *origin, const char *path,
                     uint64_t base)
{
    buf_init(b);
    buf_put_u8(b, FSM_OP_FORMAT_VERSION);
    buf_put_u8(b, type);
    buf_put_str(b, origin);
    if (path != NULL) {
        buf_put_str(b, path);
        buf_put_u64(b, base);
    }
}

static void raw_put(struct buf *b, uint32_t mode, uint64_t size, uint32_t n_refs,
                    const uint32_t *lens)
{
    raw_head(b, FSM_OP_PUT, "n1", "f", 0);
    buf_put_u32(b, mode);
    buf_put_u64(b, 0);
    buf_put_u64(b, size);
    buf_put_u32(b, n_refs);
    for (uint32_t i = 0; i < n_refs; i++) {
        uint8_t id[FSM_CHUNK_ID_LEN];
        fill_id(id, (uint8_t)i);
        buf_put(b, id, sizeof(id));
        buf_put_u32(b, lens[i]);
    }
}

START_TEST(test_op_decode_bad_fields)
{
    struct buf b;
    struct pb_error err;
    uint32_t lens[2] = {10, 20};

    /* valid reference encoding first, so the cases below fail for their reason */
    raw_put(&b, 0644, 30, 2, lens);
    buf_put_u32(&b, 0);
    ck_assert_int_eq(decode_rc(&b), 0);
    buf_free(&b);

    raw_put(&b, 0644, 31, 2, lens); /* size != sum of chunks */
    buf_put_u32(&b, 0);
    ck_assert_int_eq(decode_rc(&b), -EINVAL);
    buf_free(&b);

    raw_put(&b, 010644, 30, 2, lens); /* file type bits in mode */
    buf_put_u32(&b, 0);
    ck_assert_int_eq(decode_rc(&b), -EINVAL);
    buf_free(&b);

    uint32_t zero[1] = {0};
    raw_put(&b, 0644, 0, 1, zero); /* empty chunk */
    buf_put_u32(&b, 0);
    ck_assert_int_eq(decode_rc(&b), -EINVAL);
    buf_free(&b);

    uint32_t big[1] = {FSM_CHUNK_MAX_LEN + 1};
    raw_put(&b, 0644, FSM_CHUNK_MAX_LEN + 1, 1, big); /* chunk over the max */
    buf_put_u32(&b, 0);
    ck_assert_int_eq(decode_rc(&b), -EINVAL);
    buf_free(&b);

    /* A count claiming 2^20 chunks with no bytes behind it: refused before
     * allocating, and a count over the limit is refused outright. */
    raw_put(&b, 0644, 0, 0, NULL);
    b.len -= 4;
    buf_put_u32(&b, FSM_OP_MAX_CHUNKS);
    ck_assert_int_eq(decode_rc(&b), -EINVAL);
    b.len -= 4;
    buf_put_u32(&b, FSM_OP_MAX_CHUNKS + 1);
    pb_error_clear(&err);
    struct fsm_op op;
    ck_assert_int_eq(fsm_op_decode(b.data, b.len, &op, &err), -EINVAL);
    ck_assert_ptr_nonnull(strstr(err.msg, "max"));
    buf_free(&b);

    /* Carried chunk not referenced; length differs from the reference;
     * carried twice; empty. */
    uint8_t id0[FSM_CHUNK_ID_LEN], other[FSM_CHUNK_ID_LEN];
    fill_id(id0, 0);
    fill_id(other, 77);
    struct {
        const uint8_t *id;
        uint32_t len;
        int copies;
    } cases[] = {{other, 10, 1}, {id0, 9, 1}, {id0, 10, 2}, {id0, 0, 1}};
    for (size_t i = 0; i < PB_ARRAY_SIZE(cases); i++) {
        raw_put(&b, 0644, 30, 2, lens);
        buf_put_u32(&b, (uint32_t)cases[i].copies);
        for (int k = 0; k < cases[i].copies; k++) {
            buf_put(&b, cases[i].id, FSM_CHUNK_ID_LEN);
            uint8_t *z = pb_xcalloc(1, cases[i].len + 1);
            buf_put_bytes(&b, z, cases[i].len);
            free(z);
        }
        ck_assert_msg(decode_rc(&b) == -EINVAL, "data case %zu", i);
        buf_free(&b);
    }

    /* the right carried chunk is accepted */
    raw_put(&b, 0644, 30, 2, lens);
    buf_put_u32(&b, 1);
    buf_put(&b, id0, FSM_CHUNK_ID_LEN);
    uint8_t ten[10] = {0};
    buf_put_bytes(&b, ten, 10);
    ck_assert_int_eq(decode_rc(&b), 0);
    buf_free(&b);

    /* unknown type; DELETE is_dir=2; SETATTR no fields; bad origin */
    raw_head(&b, 99, "n1", NULL, 0);
    ck_assert_int_eq(decode_rc(&b), -EINVAL);
    buf_free(&b);
    raw_head(&b, 0, "n1", NULL, 0);
    ck_assert_int_eq(decode_rc(&b), -EINVAL);
    buf_free(&b);
    raw_head(&b, FSM_OP_DELETE, "n1", "a", 1);
    buf_put_u8(&b, 2);
    ck_assert_int_eq(decode_rc(&b), -EINVAL);
    buf_free(&b);
    raw_head(&b, FSM_OP_SETATTR, "n1", "a", 1);
    buf_put_u32(&b, 0);
    buf_put_u32(&b, 0644);
    buf_put_u64(&b, 0);
    ck_assert_int_eq(decode_rc(&b), -EINVAL);
    buf_free(&b);
    static const char *bad_origins[] = {
            "",    ".n",  "-n",
            "n/1", "n 1", "01234567890123456789012345678901234567890123456789012345678901234"};
    for (size_t i = 0; i < PB_ARRAY_SIZE(bad_origins); i++) {
        raw_head(&b, FSM_OP_DELETE, bad_origins[i], "a", 1);
        buf_put_u8(&b, 0);
        ck_assert_msg(decode_rc(&b) == -EINVAL, "origin %s", bad_origins[i]);
        buf_free(&b);
    }
    /* RENAME onto itself; SYMLINK with an empty target */
    raw_head(&b, FSM_OP_RENAME, "n1", "a", 1);
    buf_put_str(&b, "a");
    buf_put_u64(&b, 0);
    ck_assert_int_eq(decode_rc(&b), -EINVAL);
    buf_free(&b);
    raw_head(&b, FSM_OP_SYMLINK, "n1", "a", 0);
    buf_put_str(&b, "");
    buf_put_u64(&b, 0);
    ck_assert_int_eq(decode_rc(&b), -EINVAL);
    buf_free(&b);
    /* a NUL inside a path */
    raw_head(&b, FSM_OP_DELETE, "n1", NULL, 0);
    buf_put_bytes(&b, "a\0b", 3);
    buf_put_u64(&b, 0);
    buf_put_u8(&b, 0);
    ck_assert_int_eq(decode_rc(&b), -EINVAL);
    buf_free(&b);
}
END_TEST

START_TEST(test_op_decode_bad_paths_and_nesting)
{
    static const char *bad[] = {"/etc/passwd",    "../x",     "a/../../x",
                                "a/./b",          "a//b",     "a/",
                                ".pickbox/state", ".pickbox", "d/.pickbox.tmp.1234"};
    struct buf b;
    for (size_t i = 0; i < PB_ARRAY_SIZE(bad); i++) {
        struct fsm_op op;
        make_simple(&op, FSM_OP_RENAME, "ok");
        free(op.u.rename.to);
        op.u.rename.to = pb_xstrdup(bad[i]);
        buf_init(&b);
        ck_assert_int_eq(fsm_op_encode(&op, &b), 0); /* encode does not judge */
        ck_assert_msg(decode_rc(&b) == -EINVAL, "rename to %s", bad[i]);
        buf_free(&b);
        fsm_op_free(&op);
    }
    /* over-long path is refused by the string bound itself */
    char *longp = pb_xmalloc(FSM_PATH_MAX + 2);
    memset(longp, 'a', FSM_PATH_MAX + 1);
    for (int i = 100; i < FSM_PATH_MAX; i += 100)
        longp[i] = '/';
    longp[FSM_PATH_MAX + 1] = '\0';
    raw_head(&b, FSM_OP_DELETE, "n1", longp, 0);
    buf_put_u8(&b, 0);
    ck_assert_int_eq(decode_rc(&b), -EINVAL);
    buf_free(&b);
    free(longp);

    /* nested BATCH and CHUNKS inside a BATCH */
    for (int t = 0; t < 2; t++) {
        raw_head(&b, FSM_OP_BATCH, "n1", NULL, 0);
        buf_put_u32(&b, 1);
        if (t == 0) {
            buf_put_u8(&b, FSM_OP_BATCH);
            buf_put_str(&b, "n1");
            buf_put_u32(&b, 0);
        } else {
            buf_put_u8(&b, FSM_OP_CHUNKS);
            buf_put_str(&b, "n1");
            buf_put_u32(&b, 0);
        }
        ck_assert_int_eq(decode_rc(&b), -EINVAL);
        buf_free(&b);
    }
    /* empty BATCH, and one claiming more ops than the limit */
    raw_head(&b, FSM_OP_BATCH, "n1", NULL, 0);
    buf_put_u32(&b, 0);
    ck_assert_int_eq(decode_rc(&b), -EINVAL);
    b.len -= 4;
    buf_put_u32(&b, FSM_BATCH_MAX + 1);
    ck_assert_int_eq(decode_rc(&b), -EINVAL);
    buf_free(&b);
}
END_TEST

/* REFS: ids and lengths only, 1..FSM_OP_MAX_REFS distinct chunks, never
 * inside a BATCH; it decodes whatever bytes a node holds. */
START_TEST(test_op_refs)
{
    struct fsm_op op, out;
    fsm_op_init(&op);
    op.type = FSM_OP_REFS;
    op.origin = pb_xstrdup("n1");
    op.u.refs.n_refs = 3;
    op.u.refs.refs = pb_xcalloc(3, sizeof(struct fsm_chunk_ref));
    for (uint32_t i = 0; i < 3; i++) {
        memset(op.u.refs.refs[i].id, (int)(i + 1), FSM_CHUNK_ID_LEN);
        op.u.refs.refs[i].len = 1000 * (i + 1);
    }
    roundtrip(&op, &out);
    ck_assert_int_eq(out.type, FSM_OP_REFS);
    {
        /* written in format 2: a node reading only format 1 stops on it;
         * a REFS claiming format 1 is malformed */
        struct buf e = BUF_INIT;
        ck_assert_int_eq(fsm_op_encode(&op, &e), 0);
        ck_assert_uint_eq(e.data[0], 2);
        e.data[0] = 1;
        ck_assert_int_eq(decode_rc(&e), -EINVAL);
        buf_free(&e);
    }
    ck_assert_ptr_null(out.path);
    ck_assert_uint_eq(out.u.refs.n_refs, 3);
    ck_assert_uint_eq(out.u.refs.refs[2].len, 3000);
    ck_assert_mem_eq(out.u.refs.refs[1].id, op.u.refs.refs[1].id, FSM_CHUNK_ID_LEN);
    ck_assert_str_eq(fsm_op_type_name(FSM_OP_REFS), "REFS");
    fsm_op_free(&out);

    /* invalid: a chunk twice, a length 0 or over the maximum, none at all */
    struct pb_error err;
    memcpy(op.u.refs.refs[2].id, op.u.refs.refs[0].id, FSM_CHUNK_ID_LEN);
    ck_assert_int_eq(fsm_op_validate(&op, &err), -EINVAL);
    ck_assert_ptr_nonnull(strstr(err.msg, "twice"));
    op.u.refs.refs[2].id[0] ^= 0xff;
    op.u.refs.refs[1].len = 0;
    ck_assert_int_eq(fsm_op_validate(&op, &err), -EINVAL);
    op.u.refs.refs[1].len = FSM_CHUNK_MAX_LEN + 1;
    ck_assert_int_eq(fsm_op_validate(&op, &err), -EINVAL);
    op.u.refs.refs[1].len = FSM_CHUNK_MAX_LEN;
    ck_assert_int_eq(fsm_op_validate(&op, &err), 0);
    op.u.refs.n_refs = 0;
    ck_assert_int_eq(fsm_op_validate(&op, &err), -EINVAL);
    op.u.refs.n_refs = 3;

    /* the wire: a count over the limit, a count over the input, a REFS in a
     * BATCH, trailing bytes */
    struct buf b;
    buf_init(&b);
    buf_put_u8(&b, 2);
    buf_put_u8(&b, FSM_OP_REFS);
    buf_put_str(&b, "n1");
    size_t head = b.len;
    buf_put_u32(&b, FSM_OP_MAX_REFS + 1);
    ck_assert_int_eq(decode_rc(&b), -EINVAL);
    b.len = head;
    buf_put_u32(&b, 2);
    buf_put(&b, op.u.refs.refs[0].id, FSM_CHUNK_ID_LEN);
    buf_put_u32(&b, 5);
    ck_assert_int_eq(decode_rc(&b), -EINVAL);
    buf_put(&b, op.u.refs.refs[1].id, FSM_CHUNK_ID_LEN);
    buf_put_u32(&b, 6);
    ck_assert_int_eq(decode_rc(&b), 0);
    buf_put_u8(&b, 0);
    ck_assert_int_eq(decode_rc(&b), -EINVAL);
    buf_free(&b);
    raw_head(&b, FSM_OP_BATCH, "n1", NULL, 0);
    buf_put_u32(&b, 1);
    buf_put_u8(&b, FSM_OP_REFS);
    buf_put_str(&b, "n1");
    buf_put_u32(&b, 1);
    buf_put(&b, op.u.refs.refs[0].id, FSM_CHUNK_ID_LEN);
    buf_put_u32(&b, 5);
    ck_assert_int_eq(decode_rc(&b), -EINVAL);
    buf_free(&b);
    fsm_op_free(&op);
}
END_TEST

/* Random corruption of valid encodings never crashes; whatever decodes
 * re-encodes to bytes that decode again (the decoder accepts only ops the
 * encoder can write). */
START_TEST(test_op_decode_fuzz)
{
    struct fsm_op ops[3];
    make_put(&ops[0]);
    make_batch(&ops[1]);
    make_simple(&ops[2], FSM_OP_SETATTR, "some/file");
    uint64_t x = 0x9e3779b97f4a7c15ull;
    int decoded = 0;
    for (int iter = 0; iter < 6000; iter++) {
        struct buf b;
        encode_ok(&ops[iter % 3], &b);
        int flips = 1 + iter % 4;
        for (int k = 0; k < flips; k++) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            size_t pos = (size_t)(x % b.len);
            b.data[pos] = (uint8_t)(x >> 32);
        }
        size_t len = (iter & 1) ? b.len : (size_t)(x >> 40) % (b.len + 1);
        uint8_t *copy = pb_xmalloc(len ? len : 1);
        memcpy(copy, b.data, len);
        struct fsm_op out;
        if (fsm_op_decode(copy, len, &out, NULL) == 0) {
            decoded++;
            struct buf again;
            buf_init(&again);
            ck_assert_int_eq(fsm_op_encode(&out, &again), 0);
            ck_assert_int_eq(decode_rc(&again), 0);
            buf_free(&again);
        }
        fsm_op_free(&out);
        free(copy);
        buf_free(&b);
    }
    ck_assert_int_gt(decoded, 0); /* some flips land in ids or names */
    for (int i = 0; i < 3; i++)
        fsm_op_free(&ops[i]);
}
END_TEST

/* ---- validation tables --------------------------------------------------- */

START_TEST(test_path_valid_table)
{
    static const struct {
        const char *path;
        bool ok;
    } rows[] = {
            {"a", true},
            {"a/b/c.txt", true},
            {".bashrc", true},
            {"..a", true},
            {"a..", true},
            {"...", true},
            {"dir/.pickbox", true}, /* only the root marker is reserved */
            {".pickboxes", true},   /* not the marker */
            {".pickbox.tmp", true}, /* not the temp prefix (no trailing dot) */
            {"a.pickbox-conflict-n1-5.txt", true},
            {"caf\xc3\xa9", true},        /* UTF-8 */
            {"bad\xff\xfeutf8", true},    /* bytes are kept as they are */
            {"tab\there\nnewline", true}, /* legal on Linux */
            {"", false},
            {"/", false},
            {"/abs", false},
            {"a/", false},
            {"a//b", false},
            {".", false},
            {"..", false},
            {"./a", false},
            {"a/.", false},
            {"a/../b", false},
            {"../etc/passwd", false},
            {".pickbox", false},
            {".pickbox/x", false},
            {".pickbox.tmp.abc", false},
            {"d/.pickbox.tmp.0123456789abcdef", false},
    };
    for (size_t i = 0; i < PB_ARRAY_SIZE(rows); i++)
        ck_assert_msg(fsm_path_valid(rows[i].path) == rows[i].ok, "row %zu \"%s\"", i,
                      rows[i].path);
    ck_assert(!fsm_path_valid(NULL));
    ck_assert(!fsm_path_valid_n("a\0b", 3));
    ck_assert(fsm_path_valid_n("ab", 2));

    /* name and path length limits, exactly at and one over */
    char name[FSM_NAME_MAX + 2];
    memset(name, 'n', sizeof(name));
    name[FSM_NAME_MAX] = '\0';
    ck_assert(fsm_path_valid(name));
    name[FSM_NAME_MAX] = 'n';
    name[FSM_NAME_MAX + 1] = '\0';
    ck_assert(!fsm_path_valid(name));

    char *p = pb_xmalloc(FSM_PATH_MAX + 2);
    for (size_t i = 0; i < FSM_PATH_MAX + 1; i++)
        p[i] = (i % 200 == 199) ? '/' : 'x';
    p[FSM_PATH_MAX] = '\0';
    ck_assert_int_ne(p[FSM_PATH_MAX - 1], '/');
    ck_assert(fsm_path_valid(p));
    p[FSM_PATH_MAX] = 'x';
    p[FSM_PATH_MAX + 1] = '\0';
    ck_assert(!fsm_path_valid(p));
    free(p);
}
END_TEST

START_TEST(test_node_valid_table)
{
    ck_assert(fsm_node_valid("n1"));
    ck_assert(fsm_node_valid("a.b_c-d"));
    ck_assert(!fsm_node_valid(""));
    ck_assert(!fsm_node_valid(NULL));
    ck_assert(!fsm_node_valid(".n"));
    ck_assert(!fsm_node_valid("-n"));
    ck_assert(!fsm_node_valid("n/1"));
    ck_assert(!fsm_node_valid("n\xc3\xa9"));
    char id[FSM_NODE_MAX + 2];
    memset(id, 'a', sizeof(id));
    id[FSM_NODE_MAX] = '\0';
    ck_assert(fsm_node_valid(id));
    id[FSM_NODE_MAX] = 'a';
    id[FSM_NODE_MAX + 1] = '\0';
    ck_assert(!fsm_node_valid(id));
}
END_TEST

START_TEST(test_content_hash)
{
    struct fsm_chunk_ref r[2];
    uint8_t h1[32], h2[32], h3[32], empty[32];
    fill_id(r[0].id, 1);
    fill_id(r[1].id, 2);
    r[0].len = 5;
    r[1].len = 6;
    ck_assert_int_eq(fsm_content_hash(r, 2, h1), 0);
    ck_assert_int_eq(fsm_content_hash(r, 2, h2), 0);
    ck_assert_mem_eq(h1, h2, 32);
    r[1].len = 7; /* the length is part of the identity */
    ck_assert_int_eq(fsm_content_hash(r, 2, h3), 0);
    ck_assert(memcmp(h1, h3, 32) != 0);
    /* empty list = SHA-256 of nothing */
    static const uint8_t sha_empty[32] = {0xe3, 0xb0, 0xc4, 0x42, 0x98, 0xfc, 0x1c, 0x14,
                                          0x9a, 0xfb, 0xf4, 0xc8, 0x99, 0x6f, 0xb9, 0x24,
                                          0x27, 0xae, 0x41, 0xe4, 0x64, 0x9b, 0x93, 0x4c,
                                          0xa4, 0x95, 0x99, 0x1b, 0x78, 0x52, 0xb8, 0x55};
    ck_assert_int_eq(fsm_content_hash(NULL, 0, empty), 0);
    ck_assert_mem_eq(empty, sha_empty, 32);
}
END_TEST

static Suite *fsm_op_suite(void)
{
    Suite *s = suite_create("fsm_op");
    TCase *tc = tcase_create("codec");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_op_roundtrip_put);
    tcase_add_test(tc, test_op_roundtrip_simple);
    tcase_add_test(tc, test_op_roundtrip_batch_and_chunks);
    tcase_add_test(tc, test_op_refs);
    tcase_add_test(tc, test_op_empty_file_put);
    tcase_add_test(tc, test_op_decode_truncated);
    tcase_add_test(tc, test_op_decode_trailing_and_version);
    tcase_add_test(tc, test_op_decode_oversized);
    tcase_add_test(tc, test_op_decode_bad_fields);
    tcase_add_test(tc, test_op_decode_bad_paths_and_nesting);
    tcase_add_test(tc, test_op_decode_fuzz);
    suite_add_tcase(s, tc);
    tc = tcase_create("validate");
    tcase_add_test(tc, test_path_valid_table);
    tcase_add_test(tc, test_node_valid_table);
    tcase_add_test(tc, test_content_hash);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(fsm_op_suite());
    srunner_run_all(sr, CK_ENV);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}

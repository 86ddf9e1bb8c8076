/*
 * op.c: encoding, decoding and validation of replicated-tree operations (see op.h).
 *
 * Wire layout, format versions 1 and 2 (integers big-endian, "str" = u32
 * length + bytes without NUL, "id" = 32 bytes):
 *
 *   op      := u8 version (2 for REFS, 1 for the others), body
 *   body    := u8 type, str origin, fields of the type:
 *   PUT     := str path, u64 base, u32 mode, u64 mtime_ns, u64 size,
 *              u32 n_refs, n_refs x (id, u32 len), data
 *   DELETE  := str path, u64 base, u8 is_dir (0|1)
 *   RENAME  := str path, u64 base, str to, u64 base_to
 *   MKDIR   := str path, u64 base, u32 mode, u64 mtime_ns
 *   SYMLINK := str path, u64 base, str target, u64 mtime_ns
 *   SETATTR := str path, u64 base, u32 fields, u32 mode, u64 mtime_ns
 *   BATCH   := u32 n_ops, n_ops x body (no BATCH, no CHUNKS, no REFS inside)
 *   CHUNKS  := data
 *   REFS    := u32 n_refs, n_refs x (id, u32 len)     (1..FSM_OP_MAX_REFS; version 2 only)
 *   data    := u32 n_data, n_data x (id, str bytes)
 *
 * mtime_ns is a signed 64-bit count of nanoseconds since the epoch, stored
 * two's complement. Trailing bytes after the op are an error.
 */
#include "config.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/evp.h>

#include "fsm/op.h"
#include "lib/util.h"

/* Bytes of one chunk reference and the smallest chunk data record. */
#define REF_WIRE_LEN  (FSM_CHUNK_ID_LEN + 4)
#define DATA_WIRE_MIN (FSM_CHUNK_ID_LEN + 4 + 1)

const char *fsm_op_type_name(enum fsm_op_type t)
{
    switch (t) {
    case FSM_OP_PUT:
        return "PUT";
    case FSM_OP_DELETE:
        return "DELETE";
    case FSM_OP_RENAME:
        return "RENAME";
    case FSM_OP_MKDIR:
        return "MKDIR";
    case FSM_OP_SYMLINK:
        return "SYMLINK";
    case FSM_OP_SETATTR:
        return "SETATTR";
    case FSM_OP_BATCH:
        return "BATCH";
    case FSM_OP_CHUNKS:
        return "CHUNKS";
    case FSM_OP_REFS:
        return "REFS";
    }
    return "?";
}

void fsm_op_init(struct fsm_op *op)
{
    memset(op, 0, sizeof(*op));
}

static void data_free(struct fsm_chunk_data *d, uint32_t n)
{
    if (d == NULL)
        return;
    for (uint32_t i = 0; i < n; i++)
        free(d[i].data);
    free(d);
}

void fsm_op_free(struct fsm_op *op)
{
    free(op->origin);
    free(op->path);
    switch (op->type) {
    case FSM_OP_PUT:
        free(op->u.put.refs);
        data_free(op->u.put.data, op->u.put.n_data);
        break;
    case FSM_OP_RENAME:
        free(op->u.rename.to);
        break;
    case FSM_OP_SYMLINK:
        free(op->u.symlink.target);
        break;
    case FSM_OP_BATCH:
        if (op->u.batch.ops != NULL) {
            for (uint32_t i = 0; i < op->u.batch.n_ops; i++)
                fsm_op_free(&op->u.batch.ops[i]);
            free(op->u.batch.ops);
        }
        break;
    case FSM_OP_CHUNKS:
        data_free(op->u.chunks.data, op->u.chunks.n_data);
        break;
    case FSM_OP_REFS:
        free(op->u.refs.refs);
        break;
    case FSM_OP_DELETE:
    case FSM_OP_MKDIR:
    case FSM_OP_SETATTR:
        break;
    }
    fsm_op_init(op);
}

/* ---- validation ---------------------------------------------------------- */

bool fsm_path_valid_n(const char *path, size_t len)
{
    if (path == NULL || len == 0 || len > FSM_PATH_MAX)
        return false;
    if (memchr(path, '\0', len) != NULL)
        return false;
    size_t start = 0;
    bool first = true;
    for (;;) {
        const char *slash = memchr(path + start, '/', len - start);
        size_t end = slash ? (size_t)(slash - path) : len;
        size_t n = end - start;
        const char *c = path + start;
        /* Empty component: leading '/', trailing '/', or "//". */
        if (n == 0 || n > FSM_NAME_MAX)
            return false;
        if ((n == 1 && c[0] == '.') || (n == 2 && c[0] == '.' && c[1] == '.'))
            return false;
        if (first && n == sizeof(FSM_MARKER_NAME) - 1 && memcmp(c, FSM_MARKER_NAME, n) == 0)
            return false;
        if (n >= sizeof(FSM_TMP_PREFIX) - 1 &&
            memcmp(c, FSM_TMP_PREFIX, sizeof(FSM_TMP_PREFIX) - 1) == 0)
            return false;
        if (slash == NULL)
            return true;
        start = end + 1;
        first = false;
    }
}

bool fsm_path_valid(const char *path)
{
    if (path == NULL)
        return false;
    /* strnlen bounds the scan: a longer string is invalid anyway. */
    size_t len = strnlen(path, FSM_PATH_MAX + 1);
    return fsm_path_valid_n(path, len);
}

bool fsm_node_valid(const char *s)
{
    if (s == NULL)
        return false;
    size_t n = strnlen(s, FSM_NODE_MAX + 1);
    if (n == 0 || n > FSM_NODE_MAX || s[0] == '.' || s[0] == '-')
        return false;
    for (size_t i = 0; i < n; i++) {
        char ch = s[i];
        bool ok = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') ||
                  (ch >= '0' && ch <= '9') || ch == '.' || ch == '_' || ch == '-';
        if (!ok)
            return false;
    }
    return true;
}

static int cmp_id(const void *a, const void *b)
{
    return memcmp(a, b, FSM_CHUNK_ID_LEN);
}

static int cmp_ref_ptr(const void *a, const void *b)
{
    const struct fsm_chunk_ref *const *x = a, *const *y = b;
    return memcmp((*x)->id, (*y)->id, FSM_CHUNK_ID_LEN);
}

/* Carried chunks: lengths in range, ids distinct. */
static int data_validate(const struct fsm_chunk_data *d, uint32_t n, struct pb_error *err)
{
    if (n == 0)
        return 0;
    if (d == NULL)
        return pb_error_set(err, -EINVAL, "chunk data list missing");
    uint8_t(*ids)[FSM_CHUNK_ID_LEN] = pb_xreallocarray(NULL, n, FSM_CHUNK_ID_LEN);
    int rc = 0;
    for (uint32_t i = 0; i < n && rc == 0; i++) {
        if (d[i].len == 0 || d[i].len > FSM_CHUNK_MAX_LEN || d[i].data == NULL)
            rc = pb_error_set(err, -EINVAL, "chunk data %u has bad length %u", i, d[i].len);
        memcpy(ids[i], d[i].id, FSM_CHUNK_ID_LEN);
    }
    if (rc == 0) {
        qsort(ids, n, FSM_CHUNK_ID_LEN, cmp_id);
        for (uint32_t i = 1; i < n; i++) {
            if (memcmp(ids[i - 1], ids[i], FSM_CHUNK_ID_LEN) == 0) {
                rc = pb_error_set(err, -EINVAL, "chunk data carried twice");
                break;
            }
        }
    }
    free(ids);
    return rc;
}

/* A REFS op's list: 1..FSM_OP_MAX_REFS chunks, lengths in range, ids distinct. */
static int refs_validate(const struct fsm_chunk_ref *r, uint32_t n, struct pb_error *err)
{
    if (n == 0 || n > FSM_OP_MAX_REFS || r == NULL)
        return pb_error_set(err, -EINVAL, "REFS of %u chunks (1..%u)", n, FSM_OP_MAX_REFS);
    uint8_t(*ids)[FSM_CHUNK_ID_LEN] = pb_xreallocarray(NULL, n, FSM_CHUNK_ID_LEN);
    int rc = 0;
    for (uint32_t i = 0; i < n && rc == 0; i++) {
        if (r[i].len == 0 || r[i].len > FSM_CHUNK_MAX_LEN)
            rc = pb_error_set(err, -EINVAL, "REFS chunk %u has bad length %u", i, r[i].len);
        memcpy(ids[i], r[i].id, FSM_CHUNK_ID_LEN);
    }
    if (rc == 0) {
        qsort(ids, n, FSM_CHUNK_ID_LEN, cmp_id);
        for (uint32_t i = 1; i < n; i++) {
            if (memcmp(ids[i - 1], ids[i], FSM_CHUNK_ID_LEN) == 0) {
                rc = pb_error_set(err, -EINVAL, "REFS names a chunk twice");
                break;
            }
        }
    }
    free(ids);
    return rc;
}

static int put_validate(const struct fsm_op *op, struct pb_error *err)
{
    uint64_t sum = 0;
    if (op->u.put.mode > FSM_MODE_MASK)
        return pb_error_set(err, -EINVAL, "PUT mode %o out of range", op->u.put.mode);
    if (op->u.put.n_refs > FSM_OP_MAX_CHUNKS)
        return pb_error_set(err, -EINVAL, "PUT has %u chunks (max %u)", op->u.put.n_refs,
                            FSM_OP_MAX_CHUNKS);
    if (op->u.put.n_refs > 0 && op->u.put.refs == NULL)
        return pb_error_set(err, -EINVAL, "PUT chunk list missing");
    for (uint32_t i = 0; i < op->u.put.n_refs; i++) {
        uint32_t l = op->u.put.refs[i].len;
        if (l == 0 || l > FSM_CHUNK_MAX_LEN)
            return pb_error_set(err, -EINVAL, "PUT chunk %u has bad length %u", i, l);
        sum += l;
    }
    if (sum != op->u.put.size)
        return pb_error_set(err, -EINVAL, "PUT size %llu does not match its chunks (%llu)",
                            (unsigned long long)op->u.put.size, (unsigned long long)sum);
    int rc = data_validate(op->u.put.data, op->u.put.n_data, err);
    if (rc < 0 || op->u.put.n_data == 0)
        return rc;
    /* Every carried chunk must be referenced, with the referenced length. */
    const struct fsm_chunk_ref **sorted =
            pb_xreallocarray(NULL, op->u.put.n_refs ? op->u.put.n_refs : 1, sizeof(*sorted));
    for (uint32_t i = 0; i < op->u.put.n_refs; i++)
        sorted[i] = &op->u.put.refs[i];
    qsort(sorted, op->u.put.n_refs, sizeof(*sorted), cmp_ref_ptr);
    for (uint32_t i = 0; i < op->u.put.n_data && rc == 0; i++) {
        const struct fsm_chunk_data *d = &op->u.put.data[i];
        struct fsm_chunk_ref key;
        const struct fsm_chunk_ref *kp = &key;
        memcpy(key.id, d->id, FSM_CHUNK_ID_LEN);
        const struct fsm_chunk_ref **hit =
                bsearch(&kp, sorted, op->u.put.n_refs, sizeof(*sorted), cmp_ref_ptr);
        if (hit == NULL)
            rc = pb_error_set(err, -EINVAL, "PUT carries chunk %u it does not reference", i);
        else if ((*hit)->len != d->len)
            rc = pb_error_set(err, -EINVAL, "PUT chunk %u length %u != referenced %u", i, d->len,
                              (*hit)->len);
    }
    free(sorted);
    return rc;
}

static int path_check(const char *what, const char *path, struct pb_error *err)
{
    if (!fsm_path_valid(path))
        return pb_error_set(err, -EINVAL, "invalid %s", what);
    return 0;
}

static int validate(const struct fsm_op *op, bool nested, struct pb_error *err)
{
    int rc;
    if (!fsm_node_valid(op->origin))
        return pb_error_set(err, -EINVAL, "%s: invalid origin node id", fsm_op_type_name(op->type));
    if (op->type != FSM_OP_BATCH && op->type != FSM_OP_CHUNKS && op->type != FSM_OP_REFS &&
        (rc = path_check("path", op->path, err)) < 0)
        return rc;
    switch (op->type) {
    case FSM_OP_PUT:
        return put_validate(op, err);
    case FSM_OP_DELETE:
        return 0;
    case FSM_OP_RENAME:
        if ((rc = path_check("rename target", op->u.rename.to, err)) < 0)
            return rc;
        if (strcmp(op->path, op->u.rename.to) == 0)
            return pb_error_set(err, -EINVAL, "RENAME onto itself");
        return 0;
    case FSM_OP_MKDIR:
        if (op->u.mkdir.mode > FSM_MODE_MASK)
            return pb_error_set(err, -EINVAL, "MKDIR mode %o out of range", op->u.mkdir.mode);
        return 0;
    case FSM_OP_SYMLINK:
        if (op->u.symlink.target == NULL || op->u.symlink.target[0] == '\0' ||
            strnlen(op->u.symlink.target, FSM_PATH_MAX + 1) > FSM_PATH_MAX)
            return pb_error_set(err, -EINVAL, "SYMLINK target empty or too long");
        return 0;
    case FSM_OP_SETATTR:
        if (op->u.setattr.fields == 0 ||
            (op->u.setattr.fields & ~(FSM_ATTR_MODE | FSM_ATTR_MTIME)) != 0)
            return pb_error_set(err, -EINVAL, "SETATTR fields 0x%x invalid", op->u.setattr.fields);
        if (op->u.setattr.mode > FSM_MODE_MASK)
            return pb_error_set(err, -EINVAL, "SETATTR mode %o out of range", op->u.setattr.mode);
        return 0;
    case FSM_OP_CHUNKS:
        if (nested)
            return pb_error_set(err, -EINVAL, "CHUNKS inside a BATCH");
        if (op->u.chunks.n_data == 0)
            return pb_error_set(err, -EINVAL, "CHUNKS carries no chunk");
        return data_validate(op->u.chunks.data, op->u.chunks.n_data, err);
    case FSM_OP_REFS:
        if (nested)
            return pb_error_set(err, -EINVAL, "REFS inside a BATCH");
        return refs_validate(op->u.refs.refs, op->u.refs.n_refs, err);
    case FSM_OP_BATCH:
        if (nested)
            return pb_error_set(err, -EINVAL, "nested BATCH");
        if (op->u.batch.n_ops == 0 || op->u.batch.n_ops > FSM_BATCH_MAX || op->u.batch.ops == NULL)
            return pb_error_set(err, -EINVAL, "BATCH of %u ops (1..%u)", op->u.batch.n_ops,
                                FSM_BATCH_MAX);
        for (uint32_t i = 0; i < op->u.batch.n_ops; i++) {
            if ((rc = validate(&op->u.batch.ops[i], true, err)) < 0) {
                pb_error_prefix(err, "BATCH op %u: ", i);
                return rc;
            }
        }
        return 0;
    }
    return pb_error_set(err, -EINVAL, "unknown op type %d", (int)op->type);
}

int fsm_op_validate(const struct fsm_op *op, struct pb_error *err)
{
    return validate(op, false, err);
}

/* ---- encoding ------------------------------------------------------------ */

static void put_data(struct buf *b, const struct fsm_chunk_data *d, uint32_t n)
{
    buf_put_u32(b, n);
    for (uint32_t i = 0; i < n; i++) {
        buf_put(b, d[i].id, FSM_CHUNK_ID_LEN);
        buf_put_bytes(b, d[i].data, d[i].len);
    }
}

static void encode_body(const struct fsm_op *op, struct buf *b)
{
    buf_put_u8(b, (uint8_t)op->type);
    buf_put_str(b, op->origin);
    if (op->type != FSM_OP_BATCH && op->type != FSM_OP_CHUNKS && op->type != FSM_OP_REFS) {
        buf_put_str(b, op->path);
        buf_put_u64(b, op->base);
    }
    switch (op->type) {
    case FSM_OP_PUT:
        buf_put_u32(b, op->u.put.mode);
        buf_put_u64(b, (uint64_t)op->u.put.mtime_ns);
        buf_put_u64(b, op->u.put.size);
        buf_put_u32(b, op->u.put.n_refs);
        for (uint32_t i = 0; i < op->u.put.n_refs; i++) {
            buf_put(b, op->u.put.refs[i].id, FSM_CHUNK_ID_LEN);
            buf_put_u32(b, op->u.put.refs[i].len);
        }
        put_data(b, op->u.put.data, op->u.put.n_data);
        break;
    case FSM_OP_DELETE:
        buf_put_u8(b, op->u.del.is_dir ? 1 : 0);
        break;
    case FSM_OP_RENAME:
        buf_put_str(b, op->u.rename.to);
        buf_put_u64(b, op->u.rename.base_to);
        break;
    case FSM_OP_MKDIR:
        buf_put_u32(b, op->u.mkdir.mode);
        buf_put_u64(b, (uint64_t)op->u.mkdir.mtime_ns);
        break;
    case FSM_OP_SYMLINK:
        buf_put_str(b, op->u.symlink.target);
        buf_put_u64(b, (uint64_t)op->u.symlink.mtime_ns);
        break;
    case FSM_OP_SETATTR:
        buf_put_u32(b, op->u.setattr.fields);
        buf_put_u32(b, op->u.setattr.mode);
        buf_put_u64(b, (uint64_t)op->u.setattr.mtime_ns);
        break;
    case FSM_OP_BATCH:
        buf_put_u32(b, op->u.batch.n_ops);
        for (uint32_t i = 0; i < op->u.batch.n_ops; i++)
            encode_body(&op->u.batch.ops[i], b);
        break;
    case FSM_OP_CHUNKS:
        put_data(b, op->u.chunks.data, op->u.chunks.n_data);
        break;
    case FSM_OP_REFS:
        buf_put_u32(b, op->u.refs.n_refs);
        for (uint32_t i = 0; i < op->u.refs.n_refs; i++) {
            buf_put(b, op->u.refs.refs[i].id, FSM_CHUNK_ID_LEN);
            buf_put_u32(b, op->u.refs.refs[i].len);
        }
        break;
    }
}

int fsm_op_encode(const struct fsm_op *op, struct buf *out)
{
    size_t start = out->len;
    buf_put_u8(out, op->type == FSM_OP_REFS ? 2 : FSM_OP_FORMAT_MIN);
    encode_body(op, out);
    if (out->len - start > FSM_OP_MAX_BYTES) {
        out->len = start;
        return -EMSGSIZE;
    }
    return 0;
}

/* ---- decoding ------------------------------------------------------------ */

static int get_data(struct cursor *c, struct fsm_chunk_data **out, uint32_t *out_n,
                    struct pb_error *err)
{
    uint32_t n = cursor_u32(c);
    if (!cursor_ok(c))
        return pb_error_set(err, -EINVAL, "truncated chunk data count");
    /* Bound the allocation by the bytes that are actually there. */
    if (n > cursor_remaining(c) / DATA_WIRE_MIN)
        return pb_error_set(err, -EINVAL, "chunk data count %u exceeds the input", n);
    if (n == 0)
        return 0;
    struct fsm_chunk_data *d = pb_xcalloc(n, sizeof(*d));
    *out = d;
    for (uint32_t i = 0; i < n; i++) {
        const uint8_t *id = cursor_take(c, FSM_CHUNK_ID_LEN);
        size_t len = 0;
        const uint8_t *p = cursor_bytes(c, FSM_CHUNK_MAX_LEN, &len);
        if (id == NULL || p == NULL)
            return pb_error_set(err, -EINVAL, "chunk data %u truncated or over %u bytes", i,
                                FSM_CHUNK_MAX_LEN);
        if (len == 0)
            return pb_error_set(err, -EINVAL, "chunk data %u is empty", i);
        memcpy(d[i].id, id, FSM_CHUNK_ID_LEN);
        d[i].data = pb_xmalloc(len);
        memcpy(d[i].data, p, len);
        d[i].len = (uint32_t)len;
        *out_n = i + 1;
    }
    return 0;
}

static int get_str(struct cursor *c, size_t max, char **out, const char *what, struct pb_error *err)
{
    *out = cursor_str(c, max);
    if (*out == NULL)
        return pb_error_set(err, -EINVAL, "%s truncated, too long or contains NUL", what);
    return 0;
}

static int decode_body(struct cursor *c, struct fsm_op *op, bool nested, struct pb_error *err)
{
    int rc;
    uint8_t type = cursor_u8(c);
    if (!cursor_ok(c))
        return pb_error_set(err, -EINVAL, "truncated op");
    if (type < FSM_OP_PUT || type > FSM_OP_REFS)
        return pb_error_set(err, -EINVAL, "unknown op type %u", type);
    if (nested && (type == FSM_OP_BATCH || type == FSM_OP_CHUNKS || type == FSM_OP_REFS))
        return pb_error_set(err, -EINVAL, "%s inside a BATCH", fsm_op_type_name(type));
    op->type = (enum fsm_op_type)type;
    if ((rc = get_str(c, FSM_NODE_MAX, &op->origin, "origin", err)) < 0)
        return rc;
    if (type != FSM_OP_BATCH && type != FSM_OP_CHUNKS && type != FSM_OP_REFS) {
        if ((rc = get_str(c, FSM_PATH_MAX, &op->path, "path", err)) < 0)
            return rc;
        op->base = cursor_u64(c);
    }
    switch (op->type) {
    case FSM_OP_PUT: {
        op->u.put.mode = cursor_u32(c);
        op->u.put.mtime_ns = (int64_t)cursor_u64(c);
        op->u.put.size = cursor_u64(c);
        uint32_t n = cursor_u32(c);
        if (!cursor_ok(c))
            return pb_error_set(err, -EINVAL, "truncated PUT");
        if (n > FSM_OP_MAX_CHUNKS)
            return pb_error_set(err, -EINVAL, "PUT has %u chunks (max %u)", n, FSM_OP_MAX_CHUNKS);
        if (n > cursor_remaining(c) / REF_WIRE_LEN)
            return pb_error_set(err, -EINVAL, "PUT chunk count %u exceeds the input", n);
        if (n > 0)
            op->u.put.refs = pb_xcalloc(n, sizeof(*op->u.put.refs));
        op->u.put.n_refs = n;
        for (uint32_t i = 0; i < n; i++) {
            const uint8_t *id = cursor_take(c, FSM_CHUNK_ID_LEN);
            if (id != NULL)
                memcpy(op->u.put.refs[i].id, id, FSM_CHUNK_ID_LEN);
            op->u.put.refs[i].len = cursor_u32(c);
        }
        if (!cursor_ok(c))
            return pb_error_set(err, -EINVAL, "truncated PUT chunk list");
        return get_data(c, &op->u.put.data, &op->u.put.n_data, err);
    }
    case FSM_OP_DELETE: {
        uint8_t d = cursor_u8(c);
        if (d > 1)
            return pb_error_set(err, -EINVAL, "DELETE is_dir %u", d);
        op->u.del.is_dir = d == 1;
        break;
    }
    case FSM_OP_RENAME:
        if ((rc = get_str(c, FSM_PATH_MAX, &op->u.rename.to, "rename target", err)) < 0)
            return rc;
        op->u.rename.base_to = cursor_u64(c);
        break;
    case FSM_OP_MKDIR:
        op->u.mkdir.mode = cursor_u32(c);
        op->u.mkdir.mtime_ns = (int64_t)cursor_u64(c);
        break;
    case FSM_OP_SYMLINK:
        if ((rc = get_str(c, FSM_PATH_MAX, &op->u.symlink.target, "symlink target", err)) < 0)
            return rc;
        op->u.symlink.mtime_ns = (int64_t)cursor_u64(c);
        break;
    case FSM_OP_SETATTR:
        op->u.setattr.fields = cursor_u32(c);
        op->u.setattr.mode = cursor_u32(c);
        op->u.setattr.mtime_ns = (int64_t)cursor_u64(c);
        break;
    case FSM_OP_BATCH: {
        uint32_t n = cursor_u32(c);
        if (!cursor_ok(c))
            return pb_error_set(err, -EINVAL, "truncated BATCH");
        if (n == 0 || n > FSM_BATCH_MAX)
            return pb_error_set(err, -EINVAL, "BATCH of %u ops (1..%u)", n, FSM_BATCH_MAX);
        /* The smallest body is well over 8 bytes; this bounds the array. */
        if (n > cursor_remaining(c) / 8)
            return pb_error_set(err, -EINVAL, "BATCH count %u exceeds the input", n);
        op->u.batch.ops = pb_xcalloc(n, sizeof(*op->u.batch.ops));
        op->u.batch.n_ops = n;
        for (uint32_t i = 0; i < n; i++) {
            if ((rc = decode_body(c, &op->u.batch.ops[i], true, err)) < 0) {
                pb_error_prefix(err, "BATCH op %u: ", i);
                return rc;
            }
        }
        break;
    }
    case FSM_OP_CHUNKS:
        return get_data(c, &op->u.chunks.data, &op->u.chunks.n_data, err);
    case FSM_OP_REFS: {
        uint32_t n = cursor_u32(c);
        if (!cursor_ok(c))
            return pb_error_set(err, -EINVAL, "truncated REFS");
        if (n == 0 || n > FSM_OP_MAX_REFS)
            return pb_error_set(err, -EINVAL, "REFS of %u chunks (1..%u)", n, FSM_OP_MAX_REFS);
        if (n > cursor_remaining(c) / REF_WIRE_LEN)
            return pb_error_set(err, -EINVAL, "REFS chunk count %u exceeds the input", n);
        op->u.refs.refs = pb_xcalloc(n, sizeof(*op->u.refs.refs));
        op->u.refs.n_refs = n;
        for (uint32_t i = 0; i < n; i++) {
            const uint8_t *id = cursor_take(c, FSM_CHUNK_ID_LEN);
            if (id != NULL)
                memcpy(op->u.refs.refs[i].id, id, FSM_CHUNK_ID_LEN);
            op->u.refs.refs[i].len = cursor_u32(c);
        }
        break;
    }
    }
    if (!cursor_ok(c))
        return pb_error_set(err, -EINVAL, "truncated %s", fsm_op_type_name(op->type));
    return 0;
}

int fsm_op_decode(const void *p, size_t len, struct fsm_op *op, struct pb_error *err)
{
    struct cursor c;
    int rc;
    fsm_op_init(op);
    if (len > FSM_OP_MAX_BYTES)
        return pb_error_set(err, -EMSGSIZE, "op of %zu bytes exceeds %u", len, FSM_OP_MAX_BYTES);
    cursor_init(&c, p, len);
    uint8_t version = cursor_u8(&c);
    if (!cursor_ok(&c))
        return pb_error_set(err, -EINVAL, "empty op");
    if (version > FSM_OP_FORMAT_VERSION)
        return pb_error_set(err, -EPROTONOSUPPORT,
                            "op format version %u is newer than version %u that this pickbox "
                            "reads (an entry from a newer pickbox: upgrade this node)",
                            version, FSM_OP_FORMAT_VERSION);
    if (version < FSM_OP_FORMAT_MIN)
        return pb_error_set(err, -EPROTONOSUPPORT,
                            "op format version %u not supported (this pickbox reads version %u)",
                            version, FSM_OP_FORMAT_VERSION);
    rc = decode_body(&c, op, false, err);
    if (rc == 0 && op->type == FSM_OP_REFS && version < 2)
        rc = pb_error_set(err, -EINVAL, "REFS in op format version %u", version);
    if (rc == 0 && cursor_remaining(&c) != 0)
        rc = pb_error_set(err, -EINVAL, "%zu trailing bytes after op", cursor_remaining(&c));
    if (rc == 0)
        rc = fsm_op_validate(op, err);
    if (rc < 0)
        fsm_op_free(op);
    return rc;
}

/* ---- hashing ------------------------------------------------------------- */

int fsm_sha256(const void *p, size_t len, uint8_t out[FSM_CHUNK_ID_LEN])
{
    unsigned int n = 0;
    if (EVP_Digest(p, len, out, &n, EVP_sha256(), NULL) != 1 || n != FSM_CHUNK_ID_LEN)
        return -EIO;
    return 0;
}

int fsm_content_hash(const struct fsm_chunk_ref *refs, uint32_t n, uint8_t out[FSM_CHUNK_ID_LEN])
{
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    unsigned int olen = 0;
    int rc = -EIO;
    if (ctx == NULL || EVP_DigestInit_ex(ctx, EVP_sha256(), NULL) != 1)
        goto out;
    for (uint32_t i = 0; i < n; i++) {
        uint8_t rec[REF_WIRE_LEN];
        memcpy(rec, refs[i].id, FSM_CHUNK_ID_LEN);
        pb_store_u32(rec + FSM_CHUNK_ID_LEN, refs[i].len);
        if (EVP_DigestUpdate(ctx, rec, sizeof(rec)) != 1)
            goto out;
    }
    if (EVP_DigestFinal_ex(ctx, out, &olen) == 1 && olen == FSM_CHUNK_ID_LEN)
        rc = 0;
out:
    EVP_MD_CTX_free(ctx);
    return rc;
}

static int verify_data(const struct fsm_chunk_data *d, uint32_t n, struct pb_error *err)
{
    for (uint32_t i = 0; i < n; i++) {
        uint8_t h[FSM_CHUNK_ID_LEN];
        if (fsm_sha256(d[i].data, d[i].len, h) < 0)
            return pb_error_set(err, -EIO, "SHA-256 failed");
        if (memcmp(h, d[i].id, FSM_CHUNK_ID_LEN) != 0)
            return pb_error_set(err, -EBADMSG, "chunk %u does not match its id", i);
    }
    return 0;
}

int fsm_op_verify_chunks(const struct fsm_op *op, struct pb_error *err)
{
    int rc;
    switch (op->type) {
    case FSM_OP_PUT:
        return verify_data(op->u.put.data, op->u.put.n_data, err);
    case FSM_OP_CHUNKS:
        return verify_data(op->u.chunks.data, op->u.chunks.n_data, err);
    case FSM_OP_BATCH:
        for (uint32_t i = 0; i < op->u.batch.n_ops; i++)
            if ((rc = fsm_op_verify_chunks(&op->u.batch.ops[i], err)) < 0)
                return rc;
        return 0;
    default:
        return 0;
    }
}

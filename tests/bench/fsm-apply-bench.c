/*
 * fsm-apply-bench.c: how fast one node applies committed entries (state.db
 * transaction + tree materialization, every fsync on), and how fast a
 * state.db snapshot streams and installs. Not run by make check.
 *
 *   tests/bench/fsm-apply-bench [dir] [entries]
 */
#include "config.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "fsm/apply.h"
#include "lib/buf.h"
#include "lib/util.h"
#include "store/statedb.h"

static void die(const char *what, int rc)
{
    fprintf(stderr, "fsm-apply-bench: %s: %s\n", what, strerror(-rc));
    exit(1);
}

static double secs(uint64_t us)
{
    return (double)us / 1e6;
}

/* Encodes a PUT of a new 4 KiB file (pseudo-random bytes, carried). */
static void put_op(struct buf *b, uint64_t index, uint64_t i, int variant)
{
    uint8_t data[4096];
    uint64_t x = (index * 0x9e3779b97f4a7c15ULL) | 1;
    for (size_t k = 0; k < sizeof(data); k += 8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        memcpy(data + k, &x, 8);
    }
    struct fsm_op op;
    struct fsm_chunk_ref ref = {.len = sizeof(data)};
    struct fsm_chunk_data cd = {.data = data, .len = sizeof(data)};
    fsm_sha256(data, sizeof(data), ref.id);
    memcpy(cd.id, ref.id, FSM_CHUNK_ID_LEN);
    fsm_op_init(&op);
    op.type = FSM_OP_PUT;
    char origin[] = "bench";
    char *path = pb_xasprintf("f%d-%06llu-%llu", variant, (unsigned long long)i,
                              (unsigned long long)index);
    op.origin = origin;
    op.path = path;
    op.u.put.mode = 0644;
    op.u.put.size = sizeof(data);
    op.u.put.refs = &ref;
    op.u.put.n_refs = 1;
    op.u.put.data = &cd;
    op.u.put.n_data = 1;
    int rc = fsm_op_encode(&op, b);
    free(path);
    if (rc < 0)
        die("encode", rc);
}

int main(int argc, char **argv)
{
    char tmpl[] = "/tmp/fsm-apply-bench.XXXXXX";
    const char *dir = argc > 1 ? argv[1] : mkdtemp(tmpl);
    uint64_t n_entries = 1000;
    if (dir == NULL || (argc > 2 && pb_parse_u64(argv[2], 1, 1000000, &n_entries) < 0)) {
        fprintf(stderr, "usage: fsm-apply-bench [dir] [entries]\n");
        return 2;
    }
    char *tree_dir = pb_xasprintf("%s/tree", dir);
    char *db_path = pb_xasprintf("%s/state.db", dir);
    char *db2_path = pb_xasprintf("%s/state2.db", dir);
    struct pb_error err;
    struct statedb *db, *db2;
    struct fsm_tree *t;
    int rc;
    mkdir(tree_dir, 0755);
    if ((rc = fsm_tree_init(tree_dir, &err)) < 0 || (rc = fsm_tree_open(tree_dir, &t, &err)) < 0)
        die(err.msg, rc);
    if ((rc = statedb_open(db_path, &db, &err)) < 0 ||
        (rc = statedb_open(db2_path, &db2, &err)) < 0)
        die(err.msg, rc);
    struct fsm_apply *ap = fsm_apply_new(db, t);
    struct statedb_applied a;
    if ((rc = statedb_applied_get(db, &a)) < 0)
        die("applied", rc);
    uint64_t index = a.index + 1;

    /* 1: one new 4 KiB file per entry; then the same in groups of 32
     * entries per state.db transaction */
    for (int grouped = 0; grouped < 2; grouped++) {
        const size_t group = grouped ? 32 : 1;
        struct buf *bufs = pb_xcalloc(group, sizeof(*bufs));
        struct fsm_apply_input *in = pb_xcalloc(group, sizeof(*in));
        struct fsm_apply_result *res = pb_xcalloc(group, sizeof(*res));
        uint64_t t0 = pb_now_us();
        for (uint64_t i = 0; i < n_entries;) {
            size_t k = 0;
            for (; k < group && i < n_entries; k++, i++) {
                buf_init(&bufs[k]);
                put_op(&bufs[k], index, i, grouped);
                in[k] = (struct fsm_apply_input){index++, 1, 0, 0, bufs[k].data, bufs[k].len};
            }
            if ((rc = fsm_apply_entries(ap, in, k, res, &err)) < 0)
                die(err.msg, rc);
            for (size_t j = 0; j < k; j++) {
                if (res[j].status != FSM_APPLY_DONE || res[j].tree_rc != 0)
                    die("apply result", res[j].tree_rc ? res[j].tree_rc : -EINVAL);
                buf_free(&bufs[j]);
            }
        }
        uint64_t t1 = pb_now_us();
        printf("PUT 4 KiB, %zu entr%s per transaction: %llu entries in %.2f s = %.0f entries/s "
               "(%.2f ms each)\n",
               group, group == 1 ? "y" : "ies", (unsigned long long)n_entries, secs(t1 - t0),
               (double)n_entries / secs(t1 - t0), secs(t1 - t0) * 1000.0 / (double)n_entries);
        free(bufs);
        free(in);
        free(res);
    }
    uint64_t t0, t1;

    /* 2: BATCHes of 100 MKDIRs */
    uint64_t n_batches = n_entries / 100 + 1;
    t0 = pb_now_us();
    for (uint64_t i = 0; i < n_batches; i++) {
        struct fsm_op op;
        fsm_op_init(&op);
        op.type = FSM_OP_BATCH;
        op.origin = pb_xstrdup("bench");
        op.u.batch.n_ops = 100;
        op.u.batch.ops = pb_xcalloc(100, sizeof(struct fsm_op));
        for (int k = 0; k < 100; k++) {
            struct fsm_op *o = &op.u.batch.ops[k];
            o->type = FSM_OP_MKDIR;
            o->origin = pb_xstrdup("bench");
            o->path = pb_xasprintf("d%llu-%llu-%d", (unsigned long long)i,
                                   (unsigned long long)index, k);
            o->u.mkdir.mode = 0755;
        }
        struct buf b = BUF_INIT;
        if ((rc = fsm_op_encode(&op, &b)) < 0)
            die("encode", rc);
        fsm_op_free(&op);
        struct fsm_apply_result r;
        if ((rc = fsm_apply_entry(ap, index++, 1, 0, 0, b.data, b.len, &r, &err)) < 0)
            die(err.msg, rc);
        buf_free(&b);
    }
    t1 = pb_now_us();
    printf("BATCH of 100 MKDIR: %llu ops in %.2f s = %.0f ops/s\n",
           (unsigned long long)n_batches * 100, secs(t1 - t0),
           (double)n_batches * 100 / secs(t1 - t0));

    /* 3: snapshot stream and install */
    struct statedb_snapshot *s;
    struct statedb_install *in;
    if ((rc = statedb_snapshot_begin(db, &s, &err)) < 0 ||
        (rc = statedb_install_begin(db2, &in, &err)) < 0)
        die(err.msg, rc);
    uint8_t *piece = pb_xmalloc(1 << 20);
    uint64_t off = 0;
    t0 = pb_now_us();
    for (;;) {
        size_t n;
        if ((rc = statedb_snapshot_read(s, off, piece, 1 << 20, &n, &err)) < 0 ||
            (rc = statedb_install_write(in, piece, n, &err)) < 0)
            die(err.msg, rc);
        off += n;
        if (n < (1 << 20))
            break;
    }
    uint64_t t2 = pb_now_us();
    if ((rc = statedb_install_finish(in, NULL, NULL, &err)) < 0)
        die(err.msg, rc);
    t1 = pb_now_us();
    printf("snapshot: %.1f MB streamed+staged in %.2f s (%.1f MB/s), switch-over %.2f s\n",
           (double)off / 1e6, secs(t2 - t0), (double)off / 1e6 / secs(t2 - t0), secs(t1 - t2));
    statedb_install_abort(in);
    statedb_snapshot_end(s);
    free(piece);
    fsm_apply_free(ap);
    fsm_tree_close(t);
    statedb_close(db);
    statedb_close(db2);
    printf("files left in %s\n", dir);
    free(tree_dir);
    free(db_path);
    free(db2_path);
    return 0;
}

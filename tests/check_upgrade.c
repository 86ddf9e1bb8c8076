/*
 * check_upgrade.c: on-disk formats across versions (doc/upgrades.md).
 *
 * tests/fixtures/v1/ is the state a real run of the format-1 pickboxd left
 * behind (tests/fixtures/make-fixtures.sh). This suite proves that today's
 * code still reads every piece of it with its content intact: raft.db (hard
 * state, snapshot record, log entries and the ops inside them), state.db
 * (manifest rows, chunk lists, chunk bytes that hash to their ids and to the
 * file hashes coreutils recorded), snapshot.pbs (installed into a fresh
 * state.db), the Raft entry and op encodings, the config file and the secret.
 * When a format is bumped, this is the test of its migration: the contents
 * are checked through the modules' APIs, not through today's schema.
 * tests/fixtures/v2/ is the same run by the format-2 pickboxd (state.db
 * format 2: chunk bytes in the chunk_data table; snapshot stream format 2):
 * its state.db migrates to format 3 (bytes into chunk packs) with every row
 * and every chunk's bytes kept, also after a migration that crashed.
 *
 * It also proves the other direction: a file or a message whose format
 * number is past what this build knows is refused with an error naming both
 * numbers, and a refused file is left byte for byte as it was.
 *
 * Every test works on copies in a private temp dir; the fixtures are read
 * only.
 */
#include "config.h"

#include <check.h>
#include <errno.h>
#include <event2/event.h>
#include <fcntl.h>
#include <ftw.h>
#include <inttypes.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "daemon/nodeconf.h"
#include "daemon/secret.h"
#include "daemon/sm.h"
#include "fsm/op.h"
#include "lib/buf.h"
#include "lib/error.h"
#include "lib/util.h"
#include "raft/raft.h"
#include "store/statedb.h"
#include "store/store.h"

#define FIXTURE_SNAP_MAGIC 0x50425332u /* "PBS2": daemon/sm.c's snapshot.pbs */
#define FIXTURE_SNAP_HDR   20u         /* magic, u64 index, u64 term */
#define MAX_EXPECT         64
/* The versions the v1 fixtures were written with (today's may be newer). */
#define FIXTURE_SNAP_FORMAT 1u
#define FIXTURE_RAFT_CODEC  1u
#define FIXTURE_OP_FORMAT   1u

/* ---- fixture access ------------------------------------------------------ */

static char fixdir[4096];
static char tmpdir[4096];

/* One line of tree.sha256: "KIND MODE SHA256 PATH". */
struct expect {
    char kind; /* f, d, l */
    unsigned mode;
    char sha[65];
    char path[256];
};

static struct expect expects[MAX_EXPECT];
static size_t n_expects;

struct info {
    uint64_t applied, term, snapshot;
    uint64_t files, dirs;
};
static struct info info;

static char *fixture_path(const char *name)
{
    return pb_xasprintf("%s/%s", fixdir, name);
}

static uint8_t *read_all(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    ck_assert_msg(f != NULL, "open %s: %s", path, strerror(errno));
    ck_assert_int_eq(fseek(f, 0, SEEK_END), 0);
    long n = ftell(f);
    ck_assert_int_ge(n, 0);
    rewind(f);
    uint8_t *p = pb_xmalloc((size_t)n + 1);
    ck_assert_uint_eq(fread(p, 1, (size_t)n, f), (size_t)n);
    fclose(f);
    *len = (size_t)n;
    return p;
}

static void write_all(const char *path, const void *p, size_t len)
{
    FILE *f = fopen(path, "wb");
    ck_assert_msg(f != NULL, "create %s: %s", path, strerror(errno));
    ck_assert_uint_eq(fwrite(p, 1, len, f), len);
    ck_assert_int_eq(fclose(f), 0);
}

/* Copies fixture state/<name> into the temp dir; returns the copy's path. */
static char *copy_state(const char *name)
{
    char *rel = pb_xasprintf("state/%s", name);
    char *src = fixture_path(rel);
    size_t len;
    uint8_t *p = read_all(src, &len);
    char *dst = pb_xasprintf("%s/%s", tmpdir, name);
    write_all(dst, p, len);
    free(p);
    free(src);
    free(rel);
    return dst;
}

static void hex_of(const uint8_t *p, size_t n, char *out)
{
    for (size_t i = 0; i < n; i++)
        snprintf(out + 2 * i, 3, "%02x", p[i]);
}

static void sha_hex(const void *p, size_t n, char out[65])
{
    uint8_t d[FSM_CHUNK_ID_LEN];
    ck_assert_int_eq(fsm_sha256(p, n, d), 0);
    hex_of(d, sizeof(d), out);
}

static void file_sha_hex(const char *path, char out[65])
{
    size_t len;
    uint8_t *p = read_all(path, &len);
    sha_hex(p, len, out);
    free(p);
}

static uint8_t *unhex(const char *s, size_t *len)
{
    size_t n = strlen(s) / 2;
    uint8_t *p = pb_xmalloc(n ? n : 1);
    for (size_t i = 0; i < n; i++) {
        unsigned v;
        ck_assert_int_eq(sscanf(s + 2 * i, "%2x", &v), 1);
        p[i] = (uint8_t)v;
    }
    *len = n;
    return p;
}

static void load_expectations(void)
{
    char *path = fixture_path("tree.sha256");
    FILE *f = fopen(path, "r");
    ck_assert_msg(f != NULL, "%s: %s", path, strerror(errno));
    char line[512];
    n_expects = 0;
    while (fgets(line, sizeof(line), f) != NULL) {
        ck_assert_uint_lt(n_expects, MAX_EXPECT);
        struct expect *e = &expects[n_expects++];
        char kind[2];
        ck_assert_int_eq(sscanf(line, "%1s %o %64s %255[^\n]", kind, &e->mode, e->sha, e->path), 4);
        e->kind = kind[0];
    }
    fclose(f);
    free(path);

    path = fixture_path("info.txt");
    f = fopen(path, "r");
    ck_assert_msg(f != NULL, "%s: %s", path, strerror(errno));
    char key[64];
    uint64_t v;
    memset(&info, 0, sizeof(info));
    while (fgets(line, sizeof(line), f) != NULL) {
        if (sscanf(line, "%63s %" SCNu64, key, &v) != 2)
            continue;
        if (strcmp(key, "applied_index") == 0)
            info.applied = v;
        else if (strcmp(key, "term") == 0)
            info.term = v;
        else if (strcmp(key, "snapshot_index") == 0)
            info.snapshot = v;
        else if (strcmp(key, "files") == 0)
            info.files = v;
        else if (strcmp(key, "dirs") == 0)
            info.dirs = v;
    }
    fclose(f);
    free(path);
    ck_assert_uint_gt(n_expects, 8);
    ck_assert_uint_gt(info.applied, 0);
    ck_assert_uint_gt(info.snapshot, 0);
}

static int rm_one(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st;
    (void)flag;
    (void)ftw;
    return remove(path);
}

static void setup_gen(const char *gen)
{
    const char *src = getenv("top_srcdir");
    snprintf(fixdir, sizeof(fixdir), "%s/tests/fixtures/%s", src ? src : ".", gen);
    const char *tmp = getenv("TMPDIR");
    snprintf(tmpdir, sizeof(tmpdir), "%s/check_upgrade.XXXXXX", tmp ? tmp : "/tmp");
    ck_assert_ptr_nonnull(mkdtemp(tmpdir));
    load_expectations();
}

static void setup(void)
{
    setup_gen("v1");
}

static void setup_v2(void)
{
    setup_gen("v2");
}

static void teardown(void)
{
    nftw(tmpdir, rm_one, 16, FTW_DEPTH | FTW_PHYS);
}

/* Runs one SQL statement on a file with the plain SQLite API (to bump a
 * format number the way a newer pickbox would have written it). */
static void sql_on(const char *path, const char *sql)
{
    sqlite3 *db = NULL;
    ck_assert_int_eq(sqlite3_open_v2(path, &db, SQLITE_OPEN_READWRITE, NULL), SQLITE_OK);
    char *msg = NULL;
    int rc = sqlite3_exec(db, sql, NULL, NULL, &msg);
    ck_assert_msg(rc == SQLITE_OK, "%s: %s", sql, msg ? msg : "?");
    sqlite3_free(msg);
    ck_assert_int_eq(sqlite3_close(db), SQLITE_OK);
}

static bool exists(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0;
}

/* The message names both versions: "format <theirs>" and "format <ours>". */
static void assert_names_versions(const char *msg, const char *word, unsigned theirs, unsigned ours)
{
    char a[64], b[64];
    snprintf(a, sizeof(a), "%s %u", word, theirs);
    snprintf(b, sizeof(b), "%s %u", word, ours);
    ck_assert_msg(strstr(msg, a) != NULL && strstr(msg, b) != NULL,
                  "message does not name '%s' and '%s': %s", a, b, msg);
}

/* ---- raft.db ------------------------------------------------------------- */

static void on_complete(void *arg, const struct store_completion *c)
{
    (void)arg;
    (void)c;
}

static int open_store(const char *dir, struct event_base *base, struct store **s,
                      struct pb_error *err)
{
    struct store_options o = {.dir = dir, .base = base, .on_complete = on_complete};
    pb_error_clear(err);
    return store_open(s, &o, err);
}

/* Counts per fsm op type over the op entries in (p, len) entries. */
struct op_census {
    unsigned by_type[FSM_OP_CHUNKS + 1];
    unsigned ops, probes, noops, confs;
};

static void census_entry(struct op_census *c, const struct raft_entry *e)
{
    if (e->type == RAFT_ENTRY_NOOP) {
        c->noops++;
        return;
    }
    if (e->type == RAFT_ENTRY_CONF) {
        struct raft_conf conf;
        ck_assert_int_eq(raft_conf_decode(e->data, e->len, &conf), 0);
        ck_assert_uint_eq(conf.n, 1);
        raft_conf_clear(&conf);
        c->confs++;
        return;
    }
    ck_assert_int_eq(e->type, RAFT_ENTRY_NORMAL);
    if (e->len == 0 || e->data[0] == 0) { /* a probe (pickboxctl probe/sync) */
        c->probes++;
        return;
    }
    struct fsm_op op;
    struct pb_error err;
    pb_error_clear(&err);
    int rc = fsm_op_decode(e->data, e->len, &op, &err);
    ck_assert_msg(rc == 0, "entry %" PRIu64 ": %s", e->index, err.msg);
    ck_assert_int_eq(fsm_op_verify_chunks(&op, &err), 0);
    ck_assert_str_eq(op.origin, "fx1");
    ck_assert_int_le(op.type, FSM_OP_CHUNKS);
    c->by_type[op.type]++;
    if (op.type == FSM_OP_BATCH)
        for (uint32_t i = 0; i < op.u.batch.n_ops; i++)
            c->by_type[op.u.batch.ops[i].type]++;
    c->ops++;
    fsm_op_free(&op);
}

/* The fixture's log holds every kind of change the script made. */
static void assert_census(const struct op_census *c)
{
    ck_assert_uint_ge(c->by_type[FSM_OP_PUT], 6);
    ck_assert_uint_ge(c->by_type[FSM_OP_MKDIR], 4);
    ck_assert_uint_ge(c->by_type[FSM_OP_SYMLINK], 1);
    ck_assert_uint_ge(c->by_type[FSM_OP_DELETE], 1);
    ck_assert_uint_ge(c->by_type[FSM_OP_RENAME], 1);
    ck_assert_uint_ge(c->noops, 1);
}

START_TEST(test_raft_db_v1_opens)
{
    char *db = copy_state("raft.db");
    struct event_base *base = event_base_new();
    struct store *s = NULL;
    struct pb_error err;
    int rc = open_store(tmpdir, base, &s, &err);
    ck_assert_msg(rc == 0, "store_open: %s", err.msg);

    struct store_state st;
    rc = store_load(s, 1, SIZE_MAX, &st, &err);
    ck_assert_msg(rc == 0, "store_load: %s", err.msg);
    ck_assert(st.has_cluster_id);
    ck_assert_uint_ne(st.node_id, 0);
    ck_assert_uint_eq(st.hard_state.term, info.term);
    ck_assert(st.has_snapshot);
    ck_assert_uint_eq(st.snapshot.last_index, info.snapshot);
    ck_assert_uint_ge(st.last_index, info.applied);
    ck_assert_uint_eq(st.last_term, info.term);
    /* The snapshot's membership: one voter. */
    struct raft_conf conf;
    ck_assert_int_eq(raft_conf_decode(st.snapshot.membership, st.snapshot.membership_len, &conf),
                     0);
    ck_assert_uint_eq(conf.n, 1);
    raft_conf_clear(&conf);

    /* Every stored entry decodes (Raft entry codec around the op codec). */
    struct op_census c;
    memset(&c, 0, sizeof(c));
    ck_assert_uint_eq(st.entries.n, st.last_index - st.first_index + 1);
    for (size_t i = 0; i < st.entries.n; i++) {
        const struct store_entry *se = &st.entries.v[i];
        struct raft_entry e;
        ck_assert_int_eq(raft_entry_decode(se->data, se->len, &e), 0);
        ck_assert_uint_eq(e.index, se->index);
        ck_assert_uint_eq(e.term, se->term);
        census_entry(&c, &e);
        free(e.data);
    }
    if (st.first_index == 1)
        assert_census(&c);
    store_state_free(&st);
    store_close(s);
    event_base_free(base);
    free(db);
}
END_TEST

START_TEST(test_raft_db_newer_refused)
{
    char *db = copy_state("raft.db");
    char *sql = pb_xasprintf("UPDATE raft_meta SET format = %d", STORE_FORMAT + 1);
    sql_on(db, sql);
    char before[65], after[65];
    file_sha_hex(db, before);

    struct event_base *base = event_base_new();
    struct store *s = NULL;
    struct pb_error err;
    int rc = open_store(tmpdir, base, &s, &err);
    ck_assert_int_eq(rc, -EPROTONOSUPPORT);
    ck_assert_ptr_null(s);
    assert_names_versions(err.msg, "format", STORE_FORMAT + 1, STORE_FORMAT);
    ck_assert_ptr_nonnull(strstr(err.msg, "raft.db"));

    file_sha_hex(db, after);
    ck_assert_str_eq(before, after);
    char *wal = pb_xasprintf("%s-wal", db);
    ck_assert_msg(!exists(wal), "%s left behind", wal);
    free(wal);
    event_base_free(base);
    free(sql);
    free(db);
}
END_TEST

/* ---- state.db ------------------------------------------------------------ */

/* Checks one file row: chunk bytes hash to their ids, the list to the row's
 * content hash, the bytes to want_sha (hex; NULL: not checked). Returns the
 * file's size. */
static uint64_t check_file(struct statedb *db, const char *path, const struct statedb_row *r,
                           const char *want_sha)
{
    struct statedb_ref *refs = NULL;
    uint32_t n = 0;
    ck_assert_int_eq(statedb_chunklist_get(db, path, &refs, &n), 0);
    uint8_t *all = NULL;
    size_t len = 0;
    struct fsm_chunk_ref *fr = pb_xcalloc(n ? n : 1, sizeof(*fr));
    for (uint32_t i = 0; i < n; i++) {
        all = pb_xrealloc(all, len + refs[i].len);
        ck_assert_int_eq(statedb_chunk_get(db, refs[i].id, all + len, refs[i].len), 0);
        uint8_t id[FSM_CHUNK_ID_LEN];
        ck_assert_int_eq(fsm_sha256(all + len, refs[i].len, id), 0);
        ck_assert_msg(memcmp(id, refs[i].id, sizeof(id)) == 0, "%s: chunk %u hash", path, i);
        memcpy(fr[i].id, refs[i].id, sizeof(fr[i].id));
        fr[i].len = refs[i].len;
        len += refs[i].len;
    }
    uint8_t content[FSM_CHUNK_ID_LEN];
    ck_assert_int_eq(fsm_content_hash(fr, n, content), 0);
    ck_assert_msg(memcmp(content, r->content, sizeof(content)) == 0, "%s: content hash", path);
    ck_assert_uint_eq(r->size, len);
    if (want_sha != NULL) {
        char got[65];
        sha_hex(all ? all : (const uint8_t *)"", len, got);
        ck_assert_msg(strcmp(got, want_sha) == 0, "%s: bytes hash %s, want %s", path, got,
                      want_sha);
    }
    free(fr);
    free(all);
    free(refs);
    return len;
}

struct walk {
    struct statedb *db;
    unsigned live, tombstones, files, checked;
};

static int walk_row(void *arg, const char *path, const struct statedb_row *r)
{
    struct walk *w = arg;
    if (r->deleted) {
        w->tombstones++;
        return 0;
    }
    w->live++;
    if (r->kind == FSM_KIND_FILE) {
        w->files++;
        /* Internal consistency of every file, even one not in tree.sha256. */
        check_file(w->db, path, r, NULL);
    }
    return 0;
}

/* db's live rows are exactly tree.sha256's entries, with their bytes; when
 * exact is false (a snapshot older than the end of the run), only the rows
 * present are checked, and those that changed after it are skipped. */
static void check_tree_rows(struct statedb *db, bool exact)
{
    unsigned matched = 0;
    for (size_t i = 0; i < n_expects; i++) {
        const struct expect *e = &expects[i];
        struct statedb_row r;
        char *target = NULL;
        int rc = statedb_row_get(db, e->path, &r, &target);
        if (!exact && (rc == -ENOENT || r.deleted)) {
            free(target);
            continue;
        }
        ck_assert_msg(rc == 0, "%s: no row (%d)", e->path, rc);
        ck_assert_msg(!r.deleted, "%s is a tombstone", e->path);
        switch (e->kind) {
        case 'f':
            ck_assert_int_eq(r.kind, FSM_KIND_FILE);
            ck_assert_uint_eq(r.mode & 0777, e->mode);
            if (exact || strcmp(e->path, "hello.txt") != 0) /* changed after the snapshot */
                check_file(db, e->path, &r, e->sha);
            break;
        case 'd':
            ck_assert_int_eq(r.kind, FSM_KIND_DIR);
            ck_assert_uint_eq(r.mode & 0777, e->mode);
            break;
        case 'l': {
            ck_assert_int_eq(r.kind, FSM_KIND_SYMLINK);
            ck_assert_ptr_nonnull(target);
            char got[65];
            sha_hex(target, strlen(target), got);
            ck_assert_str_eq(got, e->sha);
            break;
        }
        default:
            ck_abort_msg("tree.sha256: bad kind %c", e->kind);
        }
        ck_assert_str_eq(r.origin, "fx1");
        ck_assert_uint_gt(r.version, 0);
        free(target);
        matched++;
    }
    struct walk w = {.db = db};
    ck_assert_int_eq(statedb_row_foreach(db, walk_row, &w), 0);
    if (exact) {
        ck_assert_uint_eq(matched, n_expects);
        ck_assert_uint_eq(w.live, n_expects);
    } else {
        ck_assert_uint_ge(matched, 5);
    }
}

START_TEST(test_state_db_v1_content)
{
    char *path = copy_state("state.db");
    struct statedb *db = NULL;
    struct pb_error err;
    pb_error_clear(&err);
    int rc = statedb_open(path, &db, &err);
    ck_assert_msg(rc == 0, "statedb_open: %s", err.msg);

    struct statedb_applied a;
    ck_assert_int_eq(statedb_applied_get(db, &a), 0);
    ck_assert_uint_ge(a.index, info.applied);
    ck_assert_uint_eq(a.term, info.term);
    ck_assert_uint_eq(a.conflicts, 0);
    ck_assert_uint_eq(a.malformed, 0);

    check_tree_rows(db, true);

    /* The removed and the renamed-away paths are tombstones or gone. */
    const char *gone[] = {"gone.txt", "old.txt"};
    for (size_t i = 0; i < PB_ARRAY_SIZE(gone); i++) {
        struct statedb_row r;
        rc = statedb_row_get(db, gone[i], &r, NULL);
        ck_assert_msg(rc == -ENOENT || (rc == 0 && r.deleted), "%s is live", gone[i]);
    }

    /* big.bin and dup.bin share their chunks: each is referenced twice. */
    struct statedb_ref *refs = NULL;
    uint32_t n = 0;
    ck_assert_int_eq(statedb_chunklist_get(db, "big.bin", &refs, &n), 0);
    ck_assert_uint_ge(n, 2);
    for (uint32_t i = 0; i < n; i++) {
        uint64_t count = 0;
        ck_assert_int_eq(statedb_chunk_refs(db, refs[i].id, &count), 0);
        ck_assert_uint_eq(count, 2);
    }
    free(refs);

    struct statedb_status s;
    ck_assert_int_eq(statedb_status_get(db, FSM_KIND_FILE, FSM_KIND_DIR, &s), 0);
    ck_assert_uint_eq(s.files, info.files);
    ck_assert_uint_eq(s.dirs, info.dirs);
    ck_assert_uint_gt(s.chunks, 0);
    statedb_close(db);
    free(path);
}
END_TEST

START_TEST(test_state_db_newer_refused)
{
    char *path = copy_state("state.db");
    char *sql = pb_xasprintf("UPDATE statedb_meta SET format = %d", STATEDB_FORMAT + 1);
    sql_on(path, sql);
    char before[65], after[65];
    file_sha_hex(path, before);

    struct statedb *db = NULL;
    struct pb_error err;
    pb_error_clear(&err);
    ck_assert_int_eq(statedb_open(path, &db, &err), -EPROTONOSUPPORT);
    ck_assert_ptr_null(db);
    assert_names_versions(err.msg, "format", STATEDB_FORMAT + 1, STATEDB_FORMAT);
    ck_assert_ptr_nonnull(strstr(err.msg, "state.db"));
    pb_error_clear(&err);
    ck_assert_int_eq(statedb_open_reader(path, &db, &err), -EPROTONOSUPPORT);
    assert_names_versions(err.msg, "format", STATEDB_FORMAT + 1, STATEDB_FORMAT);

    file_sha_hex(path, after);
    ck_assert_str_eq(before, after);
    /* nothing created beside it either (the chunk packs' directory) */
    char *packs = pb_xasprintf("%s/chunks", tmpdir);
    ck_assert(!exists(packs));
    free(packs);
    free(sql);
    free(path);
}
END_TEST

/* The format and the number of chunk_data rows of a state.db (plain SQLite,
 * read-only). */
static void state_db_format(const char *path, int *format, int *chunk_data)
{
    sqlite3 *h = NULL;
    ck_assert_int_eq(sqlite3_open_v2(path, &h, SQLITE_OPEN_READONLY, NULL), SQLITE_OK);
    sqlite3_stmt *st;
    ck_assert_int_eq(sqlite3_prepare_v2(h,
                                        "SELECT (SELECT format FROM statedb_meta),"
                                        " (SELECT count(*) FROM chunk_data)",
                                        -1, &st, NULL),
                     SQLITE_OK);
    ck_assert_int_eq(sqlite3_step(st), SQLITE_ROW);
    *format = sqlite3_column_int(st, 0);
    *chunk_data = sqlite3_column_int(st, 1);
    sqlite3_finalize(st);
    sqlite3_close(h);
}

/* Opens the fixture's state.db copied to path: it is (now) of today's
 * format, every row and every chunk's bytes are there (checked against the
 * hashes coreutils wrote), nothing is missing, and the chunk_data rows are
 * as many as the fixture had. */
static void check_migrated(const char *path, int fixture_chunks)
{
    struct statedb *db = NULL;
    struct pb_error err;
    pb_error_clear(&err);
    int rc = statedb_open(path, &db, &err);
    ck_assert_msg(rc == 0, "statedb_open: %s", err.msg);
    check_tree_rows(db, true);
    struct statedb_status s;
    ck_assert_int_eq(statedb_status_get(db, FSM_KIND_FILE, FSM_KIND_DIR, &s), 0);
    ck_assert_uint_eq(s.files, info.files);
    ck_assert_uint_eq(s.dirs, info.dirs);
    ck_assert_uint_eq(s.missing, 0);
    statedb_close(db);
    int format, chunks;
    state_db_format(path, &format, &chunks);
    ck_assert_int_eq(format, STATEDB_FORMAT);
    ck_assert_int_eq(chunks, fixture_chunks);
}

START_TEST(test_state_db_v2_migrates)
{
    char *path = copy_state("state.db");
    int format, chunks;
    state_db_format(path, &format, &chunks);
    ck_assert_int_eq(format, 2);
    ck_assert_int_gt(chunks, 2);
    check_migrated(path, chunks);
    /* the bytes are in a pack beside state.db, once each */
    char *pack = pb_xasprintf("%s/chunks/00000001.pack", tmpdir);
    struct stat st;
    ck_assert_int_eq(stat(pack, &st), 0);
    ck_assert_int_gt(st.st_size, 200 * 1024);
    ck_assert_int_lt(st.st_size, 200 * 1024 + chunks * 4096);
    /* a second open finds format 3 and changes nothing */
    char before[65], after[65];
    file_sha_hex(pack, before);
    check_migrated(path, chunks);
    file_sha_hex(pack, after);
    ck_assert_str_eq(before, after);
    free(pack);
    free(path);
}
END_TEST

/* A migration that crashed after writing its pack (before its one commit)
 * left a format 2 file and a pack: the next open migrates again, from the
 * start, and the stale pack is not trusted. */
START_TEST(test_state_db_v2_migration_crashed)
{
    char *path = copy_state("state.db");
    int format, chunks;
    state_db_format(path, &format, &chunks);
    char *dir = pb_xasprintf("%s/chunks", tmpdir);
    ck_assert_int_eq(mkdir(dir, 0700), 0);
    char *junk = pb_xasprintf("%s/00000001.pack", dir),
         *junk2 = pb_xasprintf("%s/00000007.pack", dir);
    uint8_t garbage[70000];
    memset(garbage, 0x5a, sizeof(garbage));
    write_all(junk, garbage, sizeof(garbage));
    write_all(junk2, garbage, 100);
    check_migrated(path, chunks);
    ck_assert(!exists(junk2));
    free(junk);
    free(junk2);
    free(dir);
    free(path);
}
END_TEST

/* ---- snapshot.pbs / the snapshot stream ----------------------------------- */

/* Installs the stream of snapshot.pbs bytes p into a fresh state.db. */
static int install_stream(const uint8_t *p, size_t len, struct statedb **out, uint64_t *index,
                          struct pb_error *err)
{
    char *path = pb_xasprintf("%s/fresh.db", tmpdir);
    int rc = statedb_open(path, out, err);
    free(path);
    ck_assert_msg(rc == 0, "statedb_open: %s", err->msg);
    struct statedb_install *in = NULL;
    rc = statedb_install_begin(*out, &in, err);
    ck_assert_msg(rc == 0, "install_begin: %s", err->msg);
    /* In pieces, as they arrive from a leader. */
    for (size_t off = 0; rc == 0 && off < len; off += 4096)
        rc = statedb_install_write(in, p + off, PB_MIN(4096, len - off), err);
    if (rc == 0)
        rc = statedb_install_finish(in, index, NULL, err);
    statedb_install_abort(in);
    return rc;
}

START_TEST(test_snapshot_v1_installs)
{
    char *path = fixture_path("state/snapshot.pbs");
    size_t len;
    uint8_t *p = read_all(path, &len);
    ck_assert_uint_gt(len, FIXTURE_SNAP_HDR);
    ck_assert_uint_eq(pb_load_u32(p), FIXTURE_SNAP_MAGIC);
    ck_assert_uint_eq(pb_load_u64(p + 4), info.snapshot);
    ck_assert_uint_eq(pb_load_u64(p + 12), info.term);

    struct statedb *db = NULL;
    struct pb_error err;
    pb_error_clear(&err);
    uint64_t index = 0;
    int rc = install_stream(p + FIXTURE_SNAP_HDR, len - FIXTURE_SNAP_HDR, &db, &index, &err);
    ck_assert_msg(rc == 0, "install: %s", err.msg);
    ck_assert_uint_eq(index, info.snapshot);
    struct statedb_applied a;
    ck_assert_int_eq(statedb_applied_get(db, &a), 0);
    ck_assert_uint_eq(a.index, info.snapshot);
    check_tree_rows(db, false);
    statedb_close(db);
    free(p);
    free(path);
}
END_TEST

/* The v2 snapshot stream carries metadata only: installed, every chunk it
 * references is missing; stored through the packs (as fetch.c does), the
 * rows check out against the tree's hashes. */
START_TEST(test_snapshot_v2_installs)
{
    char *path = fixture_path("state/snapshot.pbs");
    size_t len;
    uint8_t *p = read_all(path, &len);
    ck_assert_uint_eq(pb_load_u32(p), FIXTURE_SNAP_MAGIC);
    ck_assert_uint_eq(pb_load_u32(p + FIXTURE_SNAP_HDR + 9), 2); /* stream format */
    struct statedb *db = NULL;
    struct pb_error err;
    pb_error_clear(&err);
    uint64_t index = 0;
    int rc = install_stream(p + FIXTURE_SNAP_HDR, len - FIXTURE_SNAP_HDR, &db, &index, &err);
    ck_assert_msg(rc == 0, "install: %s", err.msg);
    ck_assert_uint_eq(index, info.snapshot);
    struct statedb_status s;
    ck_assert_int_eq(statedb_status_get(db, FSM_KIND_FILE, FSM_KIND_DIR, &s), 0);
    ck_assert_uint_gt(s.missing, 0);
    /* the bytes, from the migrated fixture state.db */
    char *src_path = copy_state("state.db");
    struct statedb *src = NULL;
    rc = statedb_open(src_path, &src, &err);
    ck_assert_msg(rc == 0, "statedb_open: %s", err.msg);
    struct statedb_ref miss[64];
    size_t n = 0;
    ck_assert_int_eq(statedb_chunk_missing(db, NULL, miss, 64, &n), 0);
    ck_assert_uint_eq(n, s.missing);
    uint8_t *buf = pb_xmalloc(STATEDB_CHUNK_MAX);
    for (size_t i = 0; i < n; i++) {
        ck_assert_int_eq(statedb_chunk_get(src, miss[i].id, buf, miss[i].len), 0);
        struct statedb_chunk_in in = {miss[i].id, buf, miss[i].len};
        ck_assert_int_eq(statedb_chunk_data_put_many(db, &in, 1), 0);
    }
    free(buf);
    ck_assert_int_eq(statedb_status_get(db, FSM_KIND_FILE, FSM_KIND_DIR, &s), 0);
    ck_assert_uint_eq(s.missing, 0);
    check_tree_rows(db, false);
    statedb_close(src);
    statedb_close(db);
    free(src_path);
    free(p);
    free(path);
}
END_TEST

START_TEST(test_snapshot_newer_refused)
{
    char *path = fixture_path("state/snapshot.pbs");
    size_t len;
    uint8_t *p = read_all(path, &len);
    /* The stream's first record: u32 length, u8 'H', "PBSD", u32 format. */
    const size_t s = FIXTURE_SNAP_HDR;
    ck_assert_uint_eq(p[s + 4], 'H');
    ck_assert_int_eq(memcmp(p + s + 5, "PBSD", 4), 0);
    ck_assert_uint_eq(pb_load_u32(p + s + 9), FIXTURE_SNAP_FORMAT);
    pb_store_u32(p + s + 9, STATEDB_SNAP_FORMAT + 1);

    struct statedb *db = NULL;
    struct pb_error err;
    pb_error_clear(&err);
    int rc = install_stream(p + s, len - s, &db, NULL, &err);
    ck_assert_int_eq(rc, -EPROTONOSUPPORT);
    assert_names_versions(err.msg, "format", STATEDB_SNAP_FORMAT + 1, STATEDB_SNAP_FORMAT);
    /* Nothing was installed. */
    struct statedb_applied a;
    ck_assert_int_eq(statedb_applied_get(db, &a), 0);
    ck_assert_uint_eq(a.index, 0);
    struct statedb_status st;
    ck_assert_int_eq(statedb_status_get(db, FSM_KIND_FILE, FSM_KIND_DIR, &st), 0);
    ck_assert_uint_eq(st.files + st.dirs + st.chunks, 0);
    statedb_close(db);
    free(p);
    free(path);
}
END_TEST

/* ---- Raft entries and ops, without SQLite (raft-log.txt) ------------------- */

struct logline {
    uint64_t index, term;
    unsigned type;
    uint8_t *data;
    size_t len;
};

/* Calls fn for every line of raft-log.txt; returns how many. */
static unsigned each_logline(void (*fn)(void *arg, const struct logline *l), void *arg)
{
    char *path = fixture_path("raft-log.txt");
    FILE *f = fopen(path, "r");
    ck_assert_msg(f != NULL, "%s: %s", path, strerror(errno));
    static char hex[2 * 8192 + 2];
    unsigned n = 0;
    struct logline l;
    while (fscanf(f, "%" SCNu64 " %" SCNu64 " %u %16385s", &l.index, &l.term, &l.type, hex) == 4) {
        l.data = unhex(hex, &l.len);
        fn(arg, &l);
        free(l.data);
        n++;
    }
    fclose(f);
    free(path);
    return n;
}

static void decode_line(void *arg, const struct logline *l)
{
    struct raft_entry e;
    ck_assert_int_eq(raft_entry_decode(l->data, l->len, &e), 0);
    ck_assert_uint_eq(e.index, l->index);
    ck_assert_uint_eq(e.term, l->term);
    ck_assert_uint_eq(e.type, l->type);
    census_entry(arg, &e);
    free(e.data);
}

START_TEST(test_entries_and_ops_v1_decode)
{
    struct op_census c;
    memset(&c, 0, sizeof(c));
    unsigned n = each_logline(decode_line, &c);
    ck_assert_uint_ge(n, 10);
    ck_assert_uint_ge(c.confs, 1);
    assert_census(&c);
}
END_TEST

struct first_op {
    uint8_t *entry; /* the first op entry's encoding */
    size_t len;
};

static void find_op(void *arg, const struct logline *l)
{
    struct first_op *f = arg;
    struct raft_entry e;
    if (f->entry != NULL || raft_entry_decode(l->data, l->len, &e) != 0)
        return;
    if (e.type == RAFT_ENTRY_NORMAL && e.len > 0 && e.data[0] != 0) {
        f->entry = pb_xmalloc(l->len);
        memcpy(f->entry, l->data, l->len);
        f->len = l->len;
    }
    free(e.data);
}

START_TEST(test_entry_and_op_newer_refused)
{
    struct first_op f = {0};
    each_logline(find_op, &f);
    ck_assert_ptr_nonnull(f.entry);

    /* A Raft entry of a newer codec: -EPROTO, not "malformed" (-EINVAL). */
    struct raft_entry e;
    ck_assert_uint_eq(f.entry[0], FIXTURE_RAFT_CODEC);
    f.entry[0] = RAFT_CODEC_VERSION + 1;
    ck_assert_int_eq(raft_entry_decode(f.entry, f.len, &e), -EPROTO);
    f.entry[0] = FIXTURE_RAFT_CODEC;

    /* An op of a newer format inside a current entry. */
    ck_assert_int_eq(raft_entry_decode(f.entry, f.len, &e), 0);
    ck_assert_uint_eq(e.data[0], FIXTURE_OP_FORMAT);
    e.data[0] = FSM_OP_FORMAT_VERSION + 1;
    struct fsm_op op;
    struct pb_error err;
    pb_error_clear(&err);
    ck_assert_int_eq(fsm_op_decode(e.data, e.len, &op, &err), -EPROTONOSUPPORT);
    assert_names_versions(err.msg, "version", FSM_OP_FORMAT_VERSION + 1, FSM_OP_FORMAT_VERSION);
    free(e.data);
    free(f.entry);
}
END_TEST

/* ---- replaying the v1 log with today's applier ---------------------------- */

/* Describes the tree at root/rel like tree.sha256 and checks it against
 * expects[]; returns how many entries matched. */
static unsigned check_tree_on_disk(const char *root)
{
    unsigned matched = 0;
    for (size_t i = 0; i < n_expects; i++) {
        const struct expect *e = &expects[i];
        char *p = pb_xasprintf("%s/%s", root, e->path);
        struct stat st;
        ck_assert_msg(lstat(p, &st) == 0, "%s: %s", p, strerror(errno));
        char got[65];
        switch (e->kind) {
        case 'f':
            ck_assert_msg(S_ISREG(st.st_mode), "%s is not a file", p);
            ck_assert_uint_eq(st.st_mode & 0777, e->mode);
            file_sha_hex(p, got);
            ck_assert_msg(strcmp(got, e->sha) == 0, "%s: bytes differ", p);
            break;
        case 'd':
            ck_assert_msg(S_ISDIR(st.st_mode), "%s is not a dir", p);
            ck_assert_uint_eq(st.st_mode & 0777, e->mode);
            break;
        default: {
            ck_assert_msg(S_ISLNK(st.st_mode), "%s is not a symlink", p);
            char target[4096];
            ssize_t n = readlink(p, target, sizeof(target));
            ck_assert_int_gt(n, 0);
            sha_hex(target, (size_t)n, got);
            ck_assert_str_eq(got, e->sha);
            break;
        }
        }
        free(p);
        matched++;
    }
    return matched;
}

START_TEST(test_log_v1_replays_to_the_v1_tree)
{
    /* raft.db's log, from index 1, into a fresh state machine and tree. */
    char *db = copy_state("raft.db");
    struct event_base *base = event_base_new();
    struct store *s = NULL;
    struct pb_error err;
    ck_assert_int_eq(open_store(tmpdir, base, &s, &err), 0);
    struct store_state st;
    ck_assert_int_eq(store_load(s, 1, SIZE_MAX, &st, &err), 0);
    ck_assert_uint_eq(st.first_index, 1);
    struct raft_entry *ents = pb_xcalloc(st.entries.n + 1, sizeof(*ents));
    for (size_t i = 0; i < st.entries.n; i++)
        ck_assert_int_eq(raft_entry_decode(st.entries.v[i].data, st.entries.v[i].len, &ents[i]), 0);

    char *sdir = pb_xasprintf("%s/replay-state", tmpdir);
    char *tree = pb_xasprintf("%s/replay-tree", tmpdir);
    ck_assert_int_eq(mkdir(sdir, 0700), 0);
    ck_assert_int_eq(mkdir(tree, 0755), 0);
    struct sm *sm = NULL;
    pb_error_clear(&err);
    int rc = sm_open(&sm, sdir, tree, &err);
    ck_assert_msg(rc == 0, "sm_open: %s", err.msg);
    rc = sm_apply(sm, ents, st.entries.n, NULL, NULL, &err);
    ck_assert_msg(rc == 0, "sm_apply: %s", err.msg);
    ck_assert_uint_eq(sm_applied(sm), st.last_index);
    ck_assert_uint_eq(check_tree_on_disk(tree), n_expects);

    /* An older pickbox meeting an op of a newer format stops: the entry is
     * not applied (nor skipped), and the error names both versions. */
    const struct raft_entry *last_op = NULL;
    for (size_t i = 0; i < st.entries.n; i++)
        if (ents[i].type == RAFT_ENTRY_NORMAL && ents[i].len > 0 && ents[i].data[0] != 0)
            last_op = &ents[i];
    ck_assert_ptr_nonnull(last_op);
    struct raft_entry next = *last_op;
    next.index = st.last_index + 1;
    next.seq += 1000000; /* not a duplicate of the session's last seq */
    next.data = pb_xmalloc(next.len);
    memcpy(next.data, last_op->data, next.len);
    next.data[0] = FSM_OP_FORMAT_VERSION + 1;
    pb_error_clear(&err);
    for (int attempt = 0; attempt < 2; attempt++) { /* and again: it does not skip it */
        rc = sm_apply(sm, &next, 1, NULL, NULL, &err);
        ck_assert_int_eq(rc, -EPROTONOSUPPORT);
        assert_names_versions(err.msg, "version", FSM_OP_FORMAT_VERSION + 1, FSM_OP_FORMAT_VERSION);
        ck_assert_uint_eq(sm_applied(sm), st.last_index);
    }
    ck_assert_uint_eq(check_tree_on_disk(tree), n_expects);
    free(next.data);

    sm_close(sm);
    for (size_t i = 0; i < st.entries.n; i++)
        free(ents[i].data);
    free(ents);
    free(sdir);
    free(tree);
    store_state_free(&st);
    store_close(s);
    event_base_free(base);
    free(db);
}
END_TEST

/* ---- config and secret ------------------------------------------------------ */

START_TEST(test_config_v1_loads)
{
    char *path = fixture_path("node.conf");
    char *argv[] = {(char *)"pickboxd", (char *)"--config", path, NULL};
    struct pb_config cfg;
    struct pb_error err;
    int rc = config_load(&cfg, 3, argv, &err);
    ck_assert_msg(rc == 0, "config_load: %s", err.msg);
    ck_assert_str_eq(cfg.node_id, "fx1");
    ck_assert_uint_eq(cfg.port, 8010);
    ck_assert_str_eq(cfg.bind, "0.0.0.0");
    ck_assert_str_eq(cfg.advertise, "fx1.example.org:8010");
    ck_assert_str_eq(cfg.join, "fx2.example.org:8010");
    ck_assert_str_eq(cfg.data_dir, "/srv/pickbox/fx1");
    ck_assert_str_eq(cfg.state_dir, "/var/lib/pickbox/fx1");
    ck_assert_str_eq(cfg.control_socket, "/run/pickbox/fx1/control.sock");
    ck_assert_str_eq(cfg.secret_file, "/etc/pickbox/cluster.secret");
    ck_assert_int_eq(cfg.log_level, LOG_LEVEL_NOTICE);
    ck_assert_uint_eq(cfg.n_ignore, 3);
    ck_assert_str_eq(cfg.ignore[2], ".#*");
    ck_assert_str_eq(cfg.metrics_listen, "127.0.0.1:9110");
    ck_assert_uint_eq(cfg.election_timeout_ms, 2000);
    ck_assert_uint_eq(cfg.heartbeat_ms, 200);
    config_free(&cfg);
    free(path);
}
END_TEST

START_TEST(test_secret_v1_loads)
{
    char *path = fixture_path("state/secret");
    uint8_t *key = NULL;
    size_t len = 0;
    struct pb_error err;
    pb_error_clear(&err);
    int rc = secret_load(path, &key, &len, &err);
    ck_assert_msg(rc == 0, "secret_load: %s", err.msg);
    ck_assert_uint_eq(len, 2 * SECRET_GEN_BYTES); /* hex digits, newline stripped */
    free(key);
    free(path);
}
END_TEST

static Suite *upgrade_suite(void)
{
    Suite *s = suite_create("upgrade");
    TCase *tc = tcase_create("v1");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_raft_db_v1_opens);
    tcase_add_test(tc, test_raft_db_newer_refused);
    tcase_add_test(tc, test_state_db_v1_content);
    tcase_add_test(tc, test_state_db_newer_refused);
    tcase_add_test(tc, test_snapshot_v1_installs);
    tcase_add_test(tc, test_snapshot_newer_refused);
    tcase_add_test(tc, test_entries_and_ops_v1_decode);
    tcase_add_test(tc, test_entry_and_op_newer_refused);
    tcase_add_test(tc, test_log_v1_replays_to_the_v1_tree);
    tcase_add_test(tc, test_config_v1_loads);
    tcase_add_test(tc, test_secret_v1_loads);
    suite_add_tcase(s, tc);
    tc = tcase_create("v2");
    tcase_add_checked_fixture(tc, setup_v2, teardown);
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_state_db_v1_content);
    tcase_add_test(tc, test_state_db_newer_refused);
    tcase_add_test(tc, test_state_db_v2_migrates);
    tcase_add_test(tc, test_state_db_v2_migration_crashed);
    tcase_add_test(tc, test_snapshot_v2_installs);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(upgrade_suite());
    srunner_run_all(sr, CK_ENV);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}

/*
 * statedb.c: state.db, the replicated tree's state (see statedb.h).
 *
 * Schema (format 3; every table STRICT):
 *
 *   statedb_meta(id=1, format)                 node file's format
 *   applied(id=1, idx, term, malformed, conflicts, duplicates)   replicated
 *   manifest(path BLOB PK, kind, deleted, version, content_version, content,
 *            mode, mtime_ns, size, origin, target BLOB NULL)     replicated
 *   chunklist(path, seq, id, len; PK (path, seq))                replicated
 *   chunks(id BLOB PK, refs, keep_until, len)                    replicated
 *   chunk_data(id BLOB PK, pack, off, len, stored_ms)           node-local
 *   chunk_free(pack, off, len)                                   node-local
 *   chunk_unrowed(id BLOB PK)                                    node-local
 *   sessions(client_id PK, seq)                                  replicated
 *   disk(path PK, kind, mode, size, mtime_ns, ino, row_content,
 *        row_mode, row_mtime_ns)                                 node-local
 *   stage_manifest, stage_chunklist, stage_chunks, stage_sessions: a snapshot
 *        being received (node-local, emptied at every install)
 *
 * chunks.refs is kept by triggers on chunklist (insert +1, delete -1), and an
 * insert naming a chunk that is not stored aborts the statement: a chunk list
 * can never point at a missing chunk and refs cannot drift. uint64 values are
 * stored as SQLite's int64 (the same 64 bits).
 *
 * A chunk row is the replicated fact "this chunk exists in the state machine"
 * (what apply decisions and collection look at); its bytes are node-local,
 * present or not (a node that installed a snapshot fetches them from peers,
 * doc/fsm.md "Snapshots"). Deleting a chunk row deletes its bytes (trigger).
 *
 * The bytes live in append-only pack files beside state.db (STATE_DIR/chunks,
 * src/store/pack.h; doc/decisions.md D14): a chunk_data row is the index
 * entry "chunk id's bytes are here: pack, off, len" and exists exactly when
 * the bytes are here. Bytes may be here without a chunk row (pushed ahead of
 * the entry that names them, D13): chunk_unrowed lists those (triggers), and
 * statedb_chunk_data_collect_unrowed() removes them after a grace period.
 * Durability order: the pack is fdatasync'ed before any commit that inserts
 * index rows (sd_commit_packs), so an index row never outlives its bytes;
 * bytes appended by a transaction that rolls back are cut (pack_rewind),
 * except after a failed COMMIT (its frames may come back from the WAL:
 * sd_keep_failed_commit), and bytes past a pack's last indexed byte are cut
 * at open (a crash between the append and the commit), after one FULL
 * commit has made whatever the last process committed durable. A deleted index row records its range in
 * chunk_free (trigger, same transaction); after the commit the range is
 * punched out of its pack and a pack left without a chunk is removed
 * (sd_free_ranges), never before the commit: a rollback keeps the bytes;
 * a range some index row still names is never punched (sd_range_unused).
 * Pack numbers are never used twice (readers cache descriptors by number).
 * Format 1 kept the bytes in chunks.data, format 2 in chunk_data.data;
 * opening either migrates it (sd_migrate_1_2, sd_migrate_2_3).
 *
 * Status counts (statedb_status_get: live files and directories, their bytes,
 * tombstones, chunks, chunks missing here) are kept, not counted: the writer
 * connection holds them in TEMP tables (never in the file) that TEMP
 * triggers on manifest, chunks and chunk_data update inside the very
 * statement that changes a row, so they commit and roll back with it. They
 * are counted once at open, and again if another connection changed the file
 * meanwhile (PRAGMA data_version). A read-only handle counts every time.
 *
 * Snapshot stream (format 2). A sequence of records, each
 *   u32 length (of what follows), u8 tag, body
 * in this order: one 'H', the manifest rows ('M', by path), the chunk lists
 * ('L', by path and seq), the chunks ('C', by id), the sessions ('S', by
 * client id), one 'E'. Big-endian integers; bytes = u32 length + bytes.
 *   H: "PBSD", u32 format, u64 index, term, malformed, conflicts, duplicates
 *   M: bytes path, u8 kind, u8 deleted, u64 version, u64 content_version,
 *      32 content, u32 mode, u64 mtime_ns, u64 size, bytes origin,
 *      u8 has_target, [bytes target]
 *   L: bytes path, u32 seq, 32 id, u32 len
 *   C: 32 id, u64 keep_until, u32 len        (metadata only: chunk bytes
 *      never travel in a snapshot; refs are recomputed on install)
 *   S: u64 client_id, u64 seq
 *   E: u64 number of records before it, u32 CRC-32C of every byte before it
 * Equal replicated state gives equal bytes. Format 1 carried the bytes in C
 * records (C: 32 id, u64 keep_until, bytes data) and had K records (as C
 * above): a format 1 stream (from a node not yet upgraded) installs as
 * metadata plus the bytes (kept when they hash to their id).
 */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <unistd.h>
#include <fcntl.h>

#include <openssl/evp.h>

#include "lib/buf.h"
#include "lib/log.h"
#include "lib/util.h"
#include "store/crc32c.h"
#include "store/pack.h"
#include "store/statedb.h"
#include "store/store_int.h"

#define STATEDB_APPLICATION_ID 0x50425354 /* "PBST" */
#define STATEDB_BUSY_MS        5000
#define STATEDB_PATH_BYTES_MAX 4096

/* The format 3 chunk_data table's columns (CREATE TABLE name ...). */
#define SD_CHUNK_DATA_COLS                                                                         \
    "(id BLOB PRIMARY KEY NOT NULL, pack INTEGER NOT NULL, off INTEGER NOT NULL,"                  \
    " len INTEGER NOT NULL, stored_ms INTEGER NOT NULL, pushed INTEGER NOT NULL DEFAULT 0)"        \
    " STRICT, WITHOUT ROWID;"

/* What goes with the format 3 chunk_data table (sd_create, sd_migrate_2_3):
 * the pack index, the freed ranges, the bytes without a row, and the
 * triggers that keep them. */
#define SD_CHUNK_DATA_SCHEMA                                                                       \
    "CREATE INDEX chunk_data_pack ON chunk_data (pack, off);"                                      \
    "CREATE TABLE chunk_free (pack INTEGER NOT NULL, off INTEGER NOT NULL,"                        \
    " len INTEGER NOT NULL) STRICT;"                                                               \
    "CREATE TABLE chunk_unrowed (id BLOB PRIMARY KEY NOT NULL) STRICT, WITHOUT ROWID;"             \
    "CREATE TRIGGER chunks_gone AFTER DELETE ON chunks BEGIN"                                      \
    " DELETE FROM chunk_data WHERE id = OLD.id AND pushed = 0;"                                    \
    " INSERT OR IGNORE INTO chunk_unrowed SELECT id FROM chunk_data WHERE id = OLD.id; END;"       \
    "CREATE TRIGGER chunks_rowed AFTER INSERT ON chunks BEGIN"                                     \
    " DELETE FROM chunk_unrowed WHERE id = NEW.id; END;"                                           \
    "CREATE TRIGGER chunk_data_new AFTER INSERT ON chunk_data"                                     \
    " WHEN NOT EXISTS (SELECT 1 FROM chunks WHERE id = NEW.id) BEGIN"                              \
    " INSERT OR IGNORE INTO chunk_unrowed VALUES (NEW.id); END;"                                   \
    "CREATE TRIGGER chunk_data_gone AFTER DELETE ON chunk_data BEGIN"                              \
    " INSERT INTO chunk_free VALUES (OLD.pack, OLD.off, OLD.len);"                                 \
    " DELETE FROM chunk_unrowed WHERE id = OLD.id; END;"

static const char statedb_schema[] =
        "CREATE TABLE statedb_meta (id INTEGER PRIMARY KEY CHECK (id = 1),"
        " format INTEGER NOT NULL) STRICT;"
        "CREATE TABLE applied (id INTEGER PRIMARY KEY CHECK (id = 1),"
        " idx INTEGER NOT NULL, term INTEGER NOT NULL, malformed INTEGER NOT NULL,"
        " conflicts INTEGER NOT NULL, duplicates INTEGER NOT NULL) STRICT;"
        "CREATE TABLE manifest (path BLOB PRIMARY KEY NOT NULL, kind INTEGER NOT NULL,"
        " deleted INTEGER NOT NULL, version INTEGER NOT NULL,"
        " content_version INTEGER NOT NULL, content BLOB NOT NULL, mode INTEGER NOT NULL,"
        " mtime_ns INTEGER NOT NULL, size INTEGER NOT NULL, origin TEXT NOT NULL,"
        " target BLOB) STRICT, WITHOUT ROWID;"
        "CREATE TABLE chunklist (path BLOB NOT NULL, seq INTEGER NOT NULL, id BLOB NOT NULL,"
        " len INTEGER NOT NULL, PRIMARY KEY (path, seq)) STRICT, WITHOUT ROWID;"
        "CREATE TABLE chunks (id BLOB PRIMARY KEY NOT NULL, refs INTEGER NOT NULL,"
        " keep_until INTEGER NOT NULL, len INTEGER NOT NULL) STRICT;"
        "CREATE INDEX chunks_unreferenced ON chunks (keep_until) WHERE refs = 0;"
        "CREATE TABLE chunk_data " SD_CHUNK_DATA_COLS SD_CHUNK_DATA_SCHEMA
        "CREATE TRIGGER chunklist_ref AFTER INSERT ON chunklist BEGIN"
        " SELECT RAISE(ABORT, 'chunk list names a chunk that is not stored')"
        "  WHERE NOT EXISTS (SELECT 1 FROM chunks WHERE id = NEW.id);"
        " UPDATE chunks SET refs = refs + 1 WHERE id = NEW.id; END;"
        "CREATE TRIGGER chunklist_unref AFTER DELETE ON chunklist BEGIN"
        " UPDATE chunks SET refs = refs - 1 WHERE id = OLD.id; END;"
        "CREATE TABLE sessions (client_id INTEGER PRIMARY KEY, seq INTEGER NOT NULL) STRICT;"
        "CREATE TABLE disk (path BLOB PRIMARY KEY NOT NULL, kind INTEGER NOT NULL,"
        " mode INTEGER NOT NULL, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,"
        " ino INTEGER NOT NULL, row_content BLOB NOT NULL, row_mode INTEGER NOT NULL,"
        " row_mtime_ns INTEGER NOT NULL) STRICT, WITHOUT ROWID;"
        "CREATE TABLE stage_manifest (path BLOB PRIMARY KEY NOT NULL, kind INTEGER NOT NULL,"
        " deleted INTEGER NOT NULL, version INTEGER NOT NULL,"
        " content_version INTEGER NOT NULL, content BLOB NOT NULL, mode INTEGER NOT NULL,"
        " mtime_ns INTEGER NOT NULL, size INTEGER NOT NULL, origin TEXT NOT NULL,"
        " target BLOB) STRICT, WITHOUT ROWID;"
        "CREATE TABLE stage_chunklist (path BLOB NOT NULL, seq INTEGER NOT NULL,"
        " id BLOB NOT NULL, len INTEGER NOT NULL, PRIMARY KEY (path, seq)) STRICT,"
        " WITHOUT ROWID;"
        "CREATE TABLE stage_chunks (id BLOB PRIMARY KEY NOT NULL,"
        " keep_until INTEGER NOT NULL, len INTEGER NOT NULL) STRICT;"
        "CREATE TABLE stage_sessions (client_id INTEGER PRIMARY KEY,"
        " seq INTEGER NOT NULL) STRICT;";

/* A chunk row named c (an alias, NEW or OLD) whose bytes this node lacks
 * though a chunk list names it: the one definition behind
 * statedb_chunk_missing() and the status counts. */
#define SD_MISSING(c)                                                                              \
    "(" c ".refs > 0 AND NOT EXISTS (SELECT 1 FROM chunk_data d WHERE d.id = " c ".id))"

/* The status counts, counted: manifest rows by (kind, deleted), and the
 * chunks (rows, bytes, missing, missing bytes), each in one scan. */
#define SD_MANIFEST_COUNT                                                                          \
    "SELECT kind, deleted, count(*), sum(size) FROM manifest GROUP BY kind, deleted"
#define SD_CHUNKS_COUNT                                                                            \
    "SELECT count(*), coalesce(sum(len), 0), coalesce(sum(m), 0), coalesce(sum(m * len), 0)"       \
    " FROM (SELECT c.len AS len, " SD_MISSING("c") " AS m FROM chunks c)"

/* statedb_status_get's row, from mt(kind, deleted, n, bytes) and
 * ct(n, bytes, missing, missing_bytes); ?1 file kind, ?2 directory kind. */
#define SD_STATUS_SELECT                                                                           \
    "SELECT coalesce((SELECT n FROM mt WHERE deleted = 0 AND kind = ?1), 0),"                      \
    " coalesce((SELECT n FROM mt WHERE deleted = 0 AND kind = ?2), 0),"                            \
    " coalesce((SELECT bytes FROM mt WHERE deleted = 0 AND kind = ?1), 0),"                        \
    " n, bytes, coalesce((SELECT sum(n) FROM mt WHERE deleted = 1), 0), missing,"                  \
    " missing_bytes FROM ct"

/* The kept counts (writer connection only; see the file comment). A row's
 * contribution leaves with OLD and comes with NEW; WHEN clauses keep the
 * usual apply (a chunk stored with its bytes, then referenced) to the
 * cheapest statements (about 10 us of CPU per new file). A chunk row is
 * deleted only unreferenced (collection; an install drops the chunk lists
 * first), so whether chunks_gone took its bytes before sd_chunks_del looks
 * does not matter. chunk_data ids are never updated. */
/* clang-format off */
static const char statedb_totals_schema[] =
        "CREATE TEMP TABLE sd_manifest_totals (kind INTEGER NOT NULL, deleted INTEGER NOT NULL,"
        " n INTEGER NOT NULL, bytes INTEGER NOT NULL, PRIMARY KEY (kind, deleted));"
        "CREATE TEMP TABLE sd_chunk_totals (id INTEGER PRIMARY KEY CHECK (id = 1),"
        " n INTEGER NOT NULL, bytes INTEGER NOT NULL, missing INTEGER NOT NULL,"
        " missing_bytes INTEGER NOT NULL);"
        "CREATE TEMP TRIGGER sd_manifest_ins AFTER INSERT ON main.manifest BEGIN"
        " INSERT INTO sd_manifest_totals VALUES (NEW.kind, NEW.deleted, 1, NEW.size)"
        "  ON CONFLICT (kind, deleted) DO UPDATE SET n = n + 1, bytes = bytes + excluded.bytes;"
        " END;"
        "CREATE TEMP TRIGGER sd_manifest_del AFTER DELETE ON main.manifest BEGIN"
        " UPDATE sd_manifest_totals SET n = n - 1, bytes = bytes - OLD.size"
        "  WHERE kind = OLD.kind AND deleted = OLD.deleted; END;"
        "CREATE TEMP TRIGGER sd_manifest_upd AFTER UPDATE OF kind, deleted, size ON main.manifest"
        " WHEN OLD.kind IS NOT NEW.kind OR OLD.deleted IS NOT NEW.deleted"
        "  OR OLD.size IS NOT NEW.size BEGIN"
        " UPDATE sd_manifest_totals SET n = n - 1, bytes = bytes - OLD.size"
        "  WHERE kind = OLD.kind AND deleted = OLD.deleted;"
        " INSERT INTO sd_manifest_totals VALUES (NEW.kind, NEW.deleted, 1, NEW.size)"
        "  ON CONFLICT (kind, deleted) DO UPDATE SET n = n + 1, bytes = bytes + excluded.bytes;"
        " END;"
        "CREATE TEMP TRIGGER sd_chunks_ins AFTER INSERT ON main.chunks BEGIN"
        " UPDATE sd_chunk_totals SET n = n + 1, bytes = bytes + NEW.len; END;"
        "CREATE TEMP TRIGGER sd_chunks_ins_missing AFTER INSERT ON main.chunks"
        " WHEN " SD_MISSING("NEW") " BEGIN"
        " UPDATE sd_chunk_totals SET missing = missing + 1,"
        "  missing_bytes = missing_bytes + NEW.len; END;"
        "CREATE TEMP TRIGGER sd_chunks_del AFTER DELETE ON main.chunks BEGIN"
        " UPDATE sd_chunk_totals SET n = n - 1, bytes = bytes - OLD.len,"
        "  missing = missing - " SD_MISSING("OLD") ","
        "  missing_bytes = missing_bytes - " SD_MISSING("OLD") " * OLD.len; END;"
        "CREATE TEMP TRIGGER sd_chunks_upd AFTER UPDATE OF id, refs, len ON main.chunks"
        " WHEN OLD.id IS NOT NEW.id OR OLD.len IS NOT NEW.len"
        "  OR ((OLD.refs > 0) IS NOT (NEW.refs > 0)"
        "   AND NOT EXISTS (SELECT 1 FROM chunk_data d WHERE d.id = NEW.id)) BEGIN"
        " UPDATE sd_chunk_totals SET bytes = bytes - OLD.len + NEW.len,"
        "  missing = missing - " SD_MISSING("OLD") " + " SD_MISSING("NEW") ","
        "  missing_bytes = missing_bytes - " SD_MISSING("OLD") " * OLD.len"
        "   + " SD_MISSING("NEW") " * NEW.len; END;"
        "CREATE TEMP TRIGGER sd_data_ins AFTER INSERT ON main.chunk_data"
        " WHEN EXISTS (SELECT 1 FROM chunks WHERE id = NEW.id AND refs > 0) BEGIN"
        " UPDATE sd_chunk_totals SET missing = missing - 1,"
        "  missing_bytes = missing_bytes - (SELECT len FROM chunks WHERE id = NEW.id); END;"
        "CREATE TEMP TRIGGER sd_data_del AFTER DELETE ON main.chunk_data"
        " WHEN EXISTS (SELECT 1 FROM chunks WHERE id = OLD.id AND refs > 0) BEGIN"
        " UPDATE sd_chunk_totals SET missing = missing + 1,"
        "  missing_bytes = missing_bytes + (SELECT len FROM chunks WHERE id = OLD.id); END;";
/* clang-format on */

/* Counts the kept counts again (at open, and when another connection
 * changed the file). */
static const char statedb_totals_recount[] =
        "DELETE FROM sd_manifest_totals; DELETE FROM sd_chunk_totals;"
        "INSERT INTO sd_manifest_totals " SD_MANIFEST_COUNT ";"
        "INSERT INTO sd_chunk_totals SELECT 1, * FROM (" SD_CHUNKS_COUNT ");";

/* Cached statements of the writer connection. */
enum {
    Q_APPLIED_GET,
    Q_APPLIED_SET,
    Q_ROW_GET,
    Q_ROW_PUT,
    Q_ROW_DEL,
    Q_CL_DEL,
    Q_CL_GET,
    Q_CL_INS,
    Q_CHUNK_HAS,
    Q_CHUNK_GET,
    Q_DATA_INS,
    Q_DATA_HAS,
    Q_CHUNK_INS,
    Q_CHUNK_KEEP,
    Q_CHUNK_GC,
    Q_CHUNK_REFS,
    Q_SESS_GET,
    Q_SESS_SET,
    Q_DISK_GET,
    Q_DISK_SET,
    Q_DISK_DEL,
    Q_ROW_RENAME,
    Q_CL_RENAME,
    Q_DISK_RENAME,
    Q_CHUNK_MISSING,
    Q_STATUS,         /* from the kept counts (writer) */
    Q_STATUS_COUNTED, /* counted (a read-only handle) */
    Q_DATA_VERSION,
    Q_CHUNK_LEN,
    Q_DATA_DEL,
    Q_DATA_PIN,
    Q_FREE_ANY,
    Q_PACK_USED,
    Q_PACK_END,
    Q_PACK_BEFORE,
    Q_MAX
};

static const char *const statedb_sql[Q_MAX] = {
        [Q_APPLIED_GET] = "SELECT idx, term, malformed, conflicts, duplicates FROM applied "
                          "WHERE id = 1",
        [Q_APPLIED_SET] = "UPDATE applied SET idx = ?1, term = ?2, malformed = ?3, "
                          "conflicts = ?4, duplicates = ?5 WHERE id = 1",
        [Q_ROW_GET] = "SELECT kind, deleted, version, content_version, content, mode, "
                      "mtime_ns, size, origin, target FROM manifest WHERE path = ?1",
        [Q_ROW_PUT] = "INSERT INTO manifest (path, kind, deleted, version, content_version, "
                      "content, mode, mtime_ns, size, origin, target) VALUES "
                      "(?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11) ON CONFLICT (path) DO "
                      "UPDATE SET kind = ?2, deleted = ?3, version = ?4, content_version = ?5, "
                      "content = ?6, mode = ?7, mtime_ns = ?8, size = ?9, origin = ?10, "
                      "target = ?11",
        [Q_ROW_DEL] = "DELETE FROM manifest WHERE path = ?1",
        [Q_CL_DEL] = "DELETE FROM chunklist WHERE path = ?1",
        [Q_CL_GET] = "SELECT id, len FROM chunklist WHERE path = ?1 ORDER BY seq",
        [Q_CL_INS] = "INSERT INTO chunklist (path, seq, id, len) VALUES (?1, ?2, ?3, ?4)",
        [Q_CHUNK_HAS] = "SELECT 1 FROM chunks WHERE id = ?1",
        [Q_CHUNK_GET] = "SELECT pack, off, len FROM chunk_data WHERE id = ?1",
        [Q_DATA_INS] = "INSERT INTO chunk_data (id, pack, off, len, stored_ms)"
                       " VALUES (?1, ?2, ?3, ?4, ?5)",
        [Q_DATA_HAS] = "SELECT 1 FROM chunk_data WHERE id = ?1",
        [Q_CHUNK_INS] = "INSERT INTO chunks (id, refs, keep_until, len) VALUES (?1, 0, ?2, ?3) "
                        "ON CONFLICT (id) DO NOTHING",
        [Q_CHUNK_KEEP] = "UPDATE chunks SET keep_until = ?2 WHERE id = ?1 AND keep_until < ?2",
        [Q_CHUNK_GC] = "DELETE FROM chunks WHERE refs = 0 AND keep_until < ?1",
        [Q_CHUNK_REFS] = "SELECT refs FROM chunks WHERE id = ?1",
        [Q_SESS_GET] = "SELECT seq FROM sessions WHERE client_id = ?1",
        [Q_SESS_SET] = "INSERT INTO sessions (client_id, seq) VALUES (?1, ?2) ON CONFLICT "
                       "(client_id) DO UPDATE SET seq = ?2",
        [Q_DISK_GET] = "SELECT kind, mode, size, mtime_ns, ino, row_content, row_mode, "
                       "row_mtime_ns FROM disk WHERE path = ?1",
        [Q_DISK_SET] = "INSERT INTO disk (path, kind, mode, size, mtime_ns, ino, row_content, "
                       "row_mode, row_mtime_ns) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) "
                       "ON CONFLICT (path) DO UPDATE SET kind = ?2, mode = ?3, size = ?4, "
                       "mtime_ns = ?5, ino = ?6, row_content = ?7, row_mode = ?8, "
                       "row_mtime_ns = ?9",
        [Q_DISK_DEL] = "DELETE FROM disk WHERE path = ?1",
        [Q_ROW_RENAME] = "UPDATE manifest SET path = ?2, version = ?3, content_version = ?3 "
                         "WHERE path = ?1",
        [Q_CL_RENAME] = "UPDATE chunklist SET path = ?2 WHERE path = ?1",
        [Q_DISK_RENAME] = "UPDATE disk SET path = ?2 WHERE path = ?1",
        /* clang-format off */
        [Q_CHUNK_MISSING] = "SELECT c.id, c.len FROM chunks c"
                            " WHERE c.id > ?1 AND " SD_MISSING("c")
                            " ORDER BY c.id LIMIT ?2",
        [Q_STATUS] = "WITH mt AS (SELECT kind, deleted, n, bytes FROM temp.sd_manifest_totals),"
                     " ct AS (SELECT n, bytes, missing, missing_bytes FROM temp.sd_chunk_totals) "
                     SD_STATUS_SELECT,
        [Q_STATUS_COUNTED] = "WITH mt(kind, deleted, n, bytes) AS (" SD_MANIFEST_COUNT "),"
                             " ct(n, bytes, missing, missing_bytes) AS (" SD_CHUNKS_COUNT ") "
                             SD_STATUS_SELECT,
        /* clang-format on */
        [Q_DATA_VERSION] = "PRAGMA data_version",
        [Q_CHUNK_LEN] = "SELECT len FROM chunks WHERE id = ?1",
        [Q_DATA_DEL] = "DELETE FROM chunk_data WHERE id = ?1",
        [Q_DATA_PIN] = "UPDATE chunk_data SET pushed = 1, stored_ms = ?2 WHERE id = ?1",
        [Q_FREE_ANY] = "SELECT 1 FROM chunk_free LIMIT 1",
        [Q_PACK_USED] = "SELECT 1 FROM chunk_data WHERE pack = ?1 LIMIT 1",
        [Q_PACK_END] = "SELECT id, off, len FROM chunk_data WHERE pack = ?1 ORDER BY off DESC"
                       " LIMIT 1",
        [Q_PACK_BEFORE] = "SELECT off + len FROM chunk_data WHERE pack = ?1 AND off < ?2"
                          " ORDER BY off DESC LIMIT 1",
};

struct statedb {
    char *path;
    int lock_fd;
    bool reader; /* statedb_open_reader(): no writes */
    sqlite3 *db;
    struct pack_set *packs; /* the chunk bytes (NULL until the format is known) */
    struct store_fault_vfs *fvfs;
    sqlite3_stmt *q[Q_MAX];
    bool in_txn;
    bool lazy;       /* statedb_set_lazy(): write transactions commit with NORMAL */
    bool txn_lazy;   /* the open transaction commits with NORMAL */
    int sync_mode;   /* PRAGMA synchronous as set: 2 FULL, 1 NORMAL, 0 unknown */
    bool lazy_dirty; /* a lazy commit may not be durable yet (statedb_sync) */
    /* PRAGMA data_version when the kept status counts were counted */
    int64_t counted_version;
    char errmsg[512];
};

/* ---- helpers ------------------------------------------------------------- */

static int sd_fail(struct statedb *db, int rc, const char *what)
{
    int e = store_sqlite_errno(rc);
    if (e == 0)
        e = -EIO;
    snprintf(db->errmsg, sizeof(db->errmsg), "state.db: %s: %s (%s)", what, sqlite3_errmsg(db->db),
             sqlite3_errstr(rc));
    return e;
}

static int sd_exec(sqlite3 *h, const char *sql, struct pb_error *err)
{
    int rc = sqlite3_exec(h, sql, NULL, NULL, NULL);
    if (rc != SQLITE_OK)
        return pb_error_set(err, store_sqlite_errno(rc) ? store_sqlite_errno(rc) : -EIO,
                            "state.db: %s: %s", sql, sqlite3_errmsg(h));
    return 0;
}

/* The cached statement id, reset and unbound; NULL with db->errmsg set. */
static sqlite3_stmt *sd_q(struct statedb *db, int id, int *err)
{
    if (db->q[id] == NULL) {
        int rc = sqlite3_prepare_v3(db->db, statedb_sql[id], -1, SQLITE_PREPARE_PERSISTENT,
                                    &db->q[id], NULL);
        if (rc != SQLITE_OK) {
            *err = sd_fail(db, rc, statedb_sql[id]);
            return NULL;
        }
    }
    sqlite3_reset(db->q[id]);
    sqlite3_clear_bindings(db->q[id]);
    return db->q[id];
}

static void bind_path(sqlite3_stmt *st, int i, const char *path)
{
    size_t n = strlen(path);
    if (n == 0)
        sqlite3_bind_zeroblob(st, i, 0);
    else
        sqlite3_bind_blob(st, i, path, (int)n, SQLITE_STATIC);
}

/* Copies a BLOB column into a new NUL-terminated string. */
static char *col_str(sqlite3_stmt *st, int i)
{
    int n = sqlite3_column_bytes(st, i);
    const void *p = sqlite3_column_blob(st, i);
    char *s = pb_xmalloc((size_t)n + 1);
    if (n > 0)
        memcpy(s, p, (size_t)n);
    s[n] = '\0';
    return s;
}

/* Copies a fixed-size BLOB column (zeroes if it has another size). */
static void col_fixed(sqlite3_stmt *st, int i, uint8_t *out, size_t len)
{
    if ((size_t)sqlite3_column_bytes(st, i) == len)
        memcpy(out, sqlite3_column_blob(st, i), len);
    else
        memset(out, 0, len);
}

/* Steps a statement expecting no row. */
static int sd_done(struct statedb *db, sqlite3_stmt *st, const char *what)
{
    int rc = sqlite3_step(st);
    sqlite3_reset(st);
    if (rc != SQLITE_DONE)
        return sd_fail(db, rc, what);
    return 0;
}

static bool path_ok(const char *p)
{
    return p != NULL && strlen(p) <= STATEDB_PATH_BYTES_MAX;
}

/* Sets PRAGMA synchronous (FULL or NORMAL) unless it is set already (each
 * apply transaction would otherwise parse and run the PRAGMA twice). */
static int sd_set_sync(struct statedb *db, bool full)
{
    int want = full ? 2 : 1;
    if (db->sync_mode == want)
        return SQLITE_OK;
    int rc =
            sqlite3_exec(db->db, full ? "PRAGMA synchronous = FULL" : "PRAGMA synchronous = NORMAL",
                         NULL, NULL, NULL);
    db->sync_mode = rc == SQLITE_OK ? want : 0;
    return rc;
}

/*
 * Outside statedb_begin()/commit() only node-local rows are written (disk
 * records, one autocommit statement each, and snapshot staging), with
 * synchronous = NORMAL: in WAL mode such a commit survives a process crash
 * and is made durable by the next FULL commit (which syncs the WAL up to
 * its own frames); only a power loss right after it can drop it, which
 * leaves a record older than the tree: the same state as a crash between a
 * tree write and its record, which the watcher's comparison with the index
 * already handles. Apply transactions (the replicated state, the applied
 * index) commit with synchronous = FULL unless the caller made them lazy
 * (statedb_set_lazy, doc/decisions.md D8). This saves one fsync per
 * materialized path.
 */
static void sd_local_sync(struct statedb *db)
{
    sd_set_sync(db, false);
}

/* ---- open / close -------------------------------------------------------- */

static int sd_query_i64(sqlite3 *h, const char *sql, int64_t *out, struct pb_error *err)
{
    sqlite3_stmt *st;
    int rc = sqlite3_prepare_v2(h, sql, -1, &st, NULL);
    if (rc != SQLITE_OK)
        return pb_error_set(err, store_sqlite_errno(rc) ? store_sqlite_errno(rc) : -EIO,
                            "state.db: %s: %s", sql, sqlite3_errmsg(h));
    rc = sqlite3_step(st);
    *out = rc == SQLITE_ROW ? sqlite3_column_int64(st, 0) : 0;
    sqlite3_finalize(st);
    if (rc != SQLITE_ROW && rc != SQLITE_DONE)
        return pb_error_set(err, store_sqlite_errno(rc) ? store_sqlite_errno(rc) : -EIO,
                            "state.db: %s: %s", sql, sqlite3_errstr(rc));
    return 0;
}

static int sd_create(sqlite3 *h, struct pb_error *err)
{
    int rc = sd_exec(h, "PRAGMA page_size = 4096; PRAGMA auto_vacuum = INCREMENTAL;", err);
    if (rc == 0)
        rc = sd_exec(h, "PRAGMA journal_mode = WAL;", err);
    if (rc == 0)
        rc = sd_exec(h, "BEGIN IMMEDIATE", err);
    if (rc < 0)
        return rc;
    char *sql = pb_xasprintf("%s PRAGMA application_id = %d;"
                             "INSERT INTO statedb_meta (id, format) VALUES (1, %d);"
                             "INSERT INTO applied VALUES (1, 0, 0, 0, 0, 0);"
                             "COMMIT;",
                             statedb_schema, STATEDB_APPLICATION_ID, STATEDB_FORMAT);
    rc = sd_exec(h, sql, err);
    free(sql);
    if (rc < 0) {
        sqlite3_exec(h, "ROLLBACK", NULL, NULL, NULL);
        return rc;
    }
    log_info("created state.db format=%d", STATEDB_FORMAT);
    return 0;
}

/*
 * Format 1 -> 2, in one transaction: chunk bytes move from chunks.data to the
 * node-local chunk_data table, chunks gets len (the bytes' length) and loses
 * data, and the staging table for chunks takes the metadata-only shape
 * (staging is empty outside an install). Every row and every chunk's bytes
 * are kept. A failure rolls everything back and leaves a format 1 file.
 */
static int sd_migrate_1_2(sqlite3 *h, struct pb_error *err)
{
    int rc = sd_exec(h, "BEGIN IMMEDIATE", err);
    if (rc < 0)
        return rc;
    rc = sd_exec(h,
                 "CREATE TABLE chunk_data (id BLOB PRIMARY KEY NOT NULL, data BLOB NOT NULL)"
                 " STRICT;"
                 "INSERT INTO chunk_data (id, data) SELECT id, data FROM chunks;"
                 "ALTER TABLE chunks ADD COLUMN len INTEGER NOT NULL DEFAULT 0;"
                 "UPDATE chunks SET len = length(data);"
                 "ALTER TABLE chunks DROP COLUMN data;"
                 "CREATE TRIGGER chunks_gone AFTER DELETE ON chunks BEGIN"
                 " DELETE FROM chunk_data WHERE id = OLD.id; END;"
                 "DROP TABLE stage_chunks;"
                 "CREATE TABLE stage_chunks (id BLOB PRIMARY KEY NOT NULL,"
                 " keep_until INTEGER NOT NULL, len INTEGER NOT NULL) STRICT;"
                 "UPDATE statedb_meta SET format = 2 WHERE id = 1;",
                 err);
    if (rc == 0)
        rc = sd_exec(h, "COMMIT", err);
    if (rc < 0) {
        sqlite3_exec(h, "ROLLBACK", NULL, NULL, NULL);
        return rc;
    }
    log_notice("state.db: migrated from format 1 to format 2 (chunk bytes are node-local)");
    return 0;
}

/* ---- chunk packs ---------------------------------------------------------- */

/* Opens db's pack set (the writer creates its directory). */
static int sd_packs_open(struct statedb *db, struct pb_error *err)
{
    if (db->packs != NULL)
        return 0;
    char *dir = pack_dir_for(db->path);
    int rc = pack_set_open(dir, !db->reader, &db->packs);
    if (rc < 0)
        pb_error_set(err, rc, "state.db: chunk packs %s: %s", dir, strerror(-rc));
    free(dir);
    return rc;
}

/* Before a COMMIT that may index new bytes: the bytes are durable first. */
static int sd_commit_packs(struct statedb *db)
{
    if (db->packs == NULL || !pack_dirty(db->packs))
        return 0;
    int e = pack_sync(db->packs);
    if (e < 0)
        snprintf(db->errmsg, sizeof(db->errmsg), "state.db: fdatasync of a chunk pack: %s",
                 strerror(-e));
    return e;
}

/*
 * After a commit: the ranges of deleted index rows (chunk_free) are punched
 * out of their packs, forgotten, and a pack other than the current one left
 * without a chunk is removed. Never before the commit (a rollback would lose
 * bytes still indexed), and never while a lazy commit may not be durable
 * (a power loss could bring its deleted rows back, pointing at punched
 * bytes): the next FULL commit (statedb_sync) frees them. A crash before the
 * rows are forgotten punches again at the next open (the ranges are never
 * reused: packs only grow). Deletes outside statedb_begin() commit FULL.
 */
/* An index row's range can be one this store wrote (aligned, in range). */
static bool sd_range_ok(int64_t off, int64_t len)
{
    return off >= 0 && off % PACK_ALIGN == 0 && len >= 0 && len <= STATEDB_CHUNK_MAX &&
           off <= INT64_MAX - len;
}

/* A freed range may be punched: it is sane and no index row still names a
 * byte of it (two rows on one range would be a damaged index: the other
 * chunk keeps its bytes). Rows never overlap, so only the last row that
 * starts before the range's (aligned) end can reach into it. */
static bool sd_range_unused(struct statedb *db, uint32_t pack, int64_t off, int64_t len)
{
    if (!sd_range_ok(off, len))
        return false;
    int e = 0;
    sqlite3_stmt *st = sd_q(db, Q_PACK_BEFORE, &e);
    if (st == NULL)
        return false;
    int64_t end = off + (len + PACK_ALIGN - 1) / PACK_ALIGN * PACK_ALIGN;
    sqlite3_bind_int64(st, 1, pack);
    sqlite3_bind_int64(st, 2, end);
    int rc = sqlite3_step(st);
    bool unused = rc == SQLITE_DONE || (rc == SQLITE_ROW && sqlite3_column_int64(st, 0) <= off);
    sqlite3_reset(st);
    return unused;
}

static void sd_free_ranges(struct statedb *db)
{
    if (db->packs == NULL || db->reader || db->lazy_dirty)
        return;
    int e = 0;
    sqlite3_stmt *st = sd_q(db, Q_FREE_ANY, &e);
    if (st == NULL)
        return;
    int rc = sqlite3_step(st);
    sqlite3_reset(st);
    if (rc != SQLITE_ROW)
        return;
    rc = sqlite3_prepare_v2(db->db, "SELECT rowid, pack, off, len FROM chunk_free ORDER BY rowid",
                            -1, &st, NULL);
    if (rc != SQLITE_OK) {
        log_warning("state.db: freed chunk ranges: %s", sqlite3_errmsg(db->db));
        return;
    }
    uint32_t *packs = NULL;
    size_t n = 0, cap = 0, failed = 0;
    int64_t last = 0;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        last = sqlite3_column_int64(st, 0);
        uint32_t pack = (uint32_t)sqlite3_column_int64(st, 1);
        int64_t off = sqlite3_column_int64(st, 2), len = sqlite3_column_int64(st, 3);
        if (!sd_range_unused(db, pack, off, len))
            failed++;
        else if (pack_punch(db->packs, pack, (uint64_t)off, (uint32_t)len) < 0)
            failed++;
        if (n > 0 && packs[n - 1] == pack)
            continue;
        if (n == cap) {
            cap = cap ? 2 * cap : 8;
            packs = pb_xreallocarray(packs, cap, sizeof(*packs));
        }
        packs[n++] = pack;
    }
    sqlite3_finalize(st);
    if (failed > 0)
        log_warning("state.db: %zu freed chunk ranges could not be punched out of their packs",
                    failed);
    char *sql = pb_xasprintf("DELETE FROM chunk_free WHERE rowid <= %" PRId64, last);
    rc = sqlite3_exec(db->db, sql, NULL, NULL, NULL);
    free(sql);
    if (rc != SQLITE_OK) {
        /* the ranges stay listed: their packs stay too, or a pack made
         * later under the same number would be punched again */
        log_warning("state.db: freed chunk ranges: %s", sqlite3_errmsg(db->db));
        n = 0;
    }
    for (size_t i = 0; i < n; i++) {
        bool seen = false;
        for (size_t j = 0; j < i && !seen; j++)
            seen = packs[j] == packs[i];
        /* not before pack_start() (at open): sd_recover_pack removes an
         * empty pack then, and remembers its number as used */
        if (seen || packs[i] == pack_current(db->packs) || pack_current(db->packs) == 0 ||
            (st = sd_q(db, Q_PACK_USED, &e)) == NULL)
            continue;
        sqlite3_bind_int64(st, 1, packs[i]);
        rc = sqlite3_step(st);
        sqlite3_reset(st);
        if (rc == SQLITE_DONE && pack_unlink(db->packs, packs[i]) == 0)
            log_debug("state.db: removed chunk pack %" PRIu32 " (no chunk left in it)", packs[i]);
    }
    free(packs);
}

/* A transaction of node-local writes outside statedb_begin() (synchronous
 * NORMAL, see sd_local_sync), with the packs' durability order. */
static int sd_local_begin(struct statedb *db)
{
    int rc = sqlite3_exec(db->db, "BEGIN IMMEDIATE", NULL, NULL, NULL);
    if (rc != SQLITE_OK)
        return sd_fail(db, rc, "BEGIN");
    if (db->packs != NULL)
        pack_mark(db->packs);
    return 0;
}

static void sd_local_rollback(struct statedb *db)
{
    for (int i = 0; i < Q_MAX; i++)
        if (db->q[i] != NULL)
            sqlite3_reset(db->q[i]);
    if (!sqlite3_get_autocommit(db->db))
        sqlite3_exec(db->db, "ROLLBACK", NULL, NULL, NULL);
    if (db->packs != NULL)
        pack_rewind(db->packs);
}

/*
 * A COMMIT that failed may still be in the WAL file: its frames were
 * written and the sync (or a later step) failed. SQLite forgets it, but a
 * crash before the next commit overwrites those frames lets WAL recovery
 * bring it back, index rows included. Its bytes were synced before the
 * COMMIT (sd_commit_packs): they stay where they are instead of being cut
 * by the rollback, so no later append lands under such a row. Unindexed,
 * they are cut at the next open when they are a pack's tail, else they
 * only take space.
 */
static void sd_keep_failed_commit(struct statedb *db)
{
    if (db->packs != NULL)
        pack_mark(db->packs);
}

static int sd_local_commit(struct statedb *db)
{
    int e = sd_commit_packs(db);
    if (e == 0) {
        int rc = sqlite3_exec(db->db, "COMMIT", NULL, NULL, NULL);
        if (rc != SQLITE_OK) {
            e = sd_fail(db, rc, "COMMIT");
            sd_keep_failed_commit(db);
        }
    }
    if (e < 0) {
        sd_local_rollback(db);
        return e;
    }
    sd_free_ranges(db);
    return 0;
}

struct sd_recover {
    struct statedb *db;
    uint32_t high;
    int err;
};

/* Open-time check of one pack against the index: bytes past its last
 * indexed byte were never committed (cut); a pack without a chunk goes; an
 * index past the pack's end (the file was cut by something else) loses the
 * rows it cannot hold (they count as missing and are fetched again). */
static int sd_recover_pack(void *arg, uint32_t pack, uint64_t size)
{
    struct sd_recover *r = arg;
    struct statedb *db = r->db;
    int e = 0, rc;
    int64_t end;
    /* the last indexed byte: from the last row, unless that row cannot be
     * right (a damaged file), which goes instead of cutting good bytes */
    for (;;) {
        sqlite3_stmt *st = sd_q(db, Q_PACK_END, &e);
        if (st == NULL)
            return e;
        sqlite3_bind_int64(st, 1, pack);
        rc = sqlite3_step(st);
        uint8_t id[STATEDB_ID_LEN];
        int64_t off = rc == SQLITE_ROW ? sqlite3_column_int64(st, 1) : -1;
        int64_t len = rc == SQLITE_ROW ? sqlite3_column_int64(st, 2) : 0;
        if (rc == SQLITE_ROW)
            col_fixed(st, 0, id, STATEDB_ID_LEN);
        sqlite3_reset(st);
        if (rc != SQLITE_ROW && rc != SQLITE_DONE)
            return sd_fail(db, rc, "pack end");
        end = rc == SQLITE_ROW ? off + len : -1;
        if (rc != SQLITE_ROW || sd_range_ok(off, len))
            break;
        log_err("state.db: chunk pack %" PRIu32 ": an index row says %" PRId64 " bytes at %" PRId64
                ": dropped (the chunk counts as missing)",
                pack, len, off);
        if ((e = sd_local_begin(db)) < 0)
            return e;
        if ((st = sd_q(db, Q_DATA_DEL, &e)) == NULL ||
            (sqlite3_bind_blob(st, 1, id, STATEDB_ID_LEN, SQLITE_TRANSIENT),
             (e = sd_done(db, st, "drop chunk bytes")) < 0)) {
            sd_local_rollback(db);
            return e;
        }
        if ((e = sd_local_commit(db)) < 0)
            return e;
    }
    if (pack > r->high)
        r->high = pack;
    if (end < 0)
        return pack_unlink(db->packs, pack);
    if ((uint64_t)end < size) {
        log_info("state.db: cut %" PRIu64 " bytes never committed off chunk pack %" PRIu32,
                 size - (uint64_t)end, pack);
        return pack_truncate(db->packs, pack, (uint64_t)end);
    }
    if ((uint64_t)end > size) {
        log_err("state.db: chunk pack %" PRIu32 " is shorter (%" PRIu64 " bytes) than its index"
                " says (%" PRId64 "): the chunks past its end count as missing",
                pack, size, end);
        char *sql = pb_xasprintf("DELETE FROM chunk_data WHERE pack = %" PRIu32
                                 " AND off + len > %" PRIu64,
                                 pack, size);
        if ((e = sd_local_begin(db)) == 0) {
            rc = sqlite3_exec(db->db, sql, NULL, NULL, NULL);
            e = rc == SQLITE_OK ? sd_local_commit(db) : sd_fail(db, rc, "drop lost chunks");
            if (rc != SQLITE_OK)
                sd_local_rollback(db);
        }
        free(sql);
    }
    return e;
}

/* The writer's open-time recovery of the packs (see sd_recover_pack), then
 * the current pack. */
static int sd_packs_recover(struct statedb *db)
{
    struct sd_recover r = {db, 0, 0};
    sd_free_ranges(db);
    int e = pack_foreach(db->packs, sd_recover_pack, &r);
    if (e < 0)
        return e;
    /* packs the index names that are gone: their chunks count as missing */
    sqlite3_stmt *st;
    int rc = sqlite3_prepare_v2(db->db,
                                "WITH RECURSIVE p(n) AS (SELECT min(pack) FROM chunk_data"
                                " UNION ALL SELECT (SELECT min(pack) FROM chunk_data"
                                " WHERE pack > p.n) FROM p WHERE p.n IS NOT NULL)"
                                " SELECT n FROM p WHERE n IS NOT NULL",
                                -1, &st, NULL);
    if (rc != SQLITE_OK)
        return sd_fail(db, rc, "packs in the index");
    uint32_t *gone = NULL;
    size_t n_gone = 0, cap = 0;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        uint32_t pack = (uint32_t)sqlite3_column_int64(st, 0);
        uint64_t size;
        if (pack > r.high)
            r.high = pack;
        if (pack_size(db->packs, pack, &size) != -ENOENT)
            continue;
        if (n_gone == cap) {
            cap = cap ? 2 * cap : 16;
            gone = pb_xreallocarray(gone, cap, sizeof(*gone));
        }
        gone[n_gone++] = pack;
    }
    sqlite3_finalize(st);
    if (rc != SQLITE_DONE) {
        free(gone);
        return sd_fail(db, rc, "packs in the index");
    }
    for (size_t i = 0; i < n_gone && e == 0; i++) {
        log_err("state.db: chunk pack %" PRIu32 " is gone: its chunks count as missing", gone[i]);
        char *sql = pb_xasprintf("DELETE FROM chunk_data WHERE pack = %" PRIu32, gone[i]);
        if ((e = sd_local_begin(db)) == 0) {
            rc = sqlite3_exec(db->db, sql, NULL, NULL, NULL);
            if (rc != SQLITE_OK) {
                e = sd_fail(db, rc, "drop lost chunks");
                sd_local_rollback(db);
            } else {
                e = sd_local_commit(db);
            }
        }
        free(sql);
    }
    free(gone);
    return e < 0 ? e : pack_start(db->packs, r.high);
}

static int sd_unlink_pack(void *arg, uint32_t pack, uint64_t size)
{
    (void)size;
    return pack_unlink(arg, pack);
}

/*
 * Format 2 -> 3: the BLOBs of chunk_data are appended to a pack and
 * fdatasync'ed, then ONE transaction swaps chunk_data for the index
 * (pack, off, len, stored_ms), adds the tables and triggers of format 3 and
 * sets the format. The bytes are written inside that transaction, before
 * its commit, so a crash anywhere leaves a format 2 file (whose packs, if
 * any, are a crashed migration's: removed before it runs again).
 */
static int sd_migrate_2_3(struct statedb *db, struct pb_error *err)
{
    sqlite3 *h = db->db;
    int rc = pack_foreach(db->packs, sd_unlink_pack, db->packs);
    if (rc == 0)
        rc = pack_start(db->packs, 0);
    if (rc < 0)
        return pb_error_set(err, rc, "state.db: migration: chunk packs: %s", strerror(-rc));
    if ((rc = sd_exec(h, "BEGIN IMMEDIATE", err)) < 0)
        return rc;
    pack_mark(db->packs);
    sqlite3_stmt *sel = NULL, *ins = NULL;
    uint64_t n = 0, bytes = 0, now = pb_now_ms();
    rc = sd_exec(h, "CREATE TABLE chunk_data_v3 " SD_CHUNK_DATA_COLS, err);
    if (rc == 0 &&
        (sqlite3_prepare_v2(h, "SELECT id, data FROM chunk_data", -1, &sel, NULL) != SQLITE_OK ||
         sqlite3_prepare_v2(h,
                            "INSERT INTO chunk_data_v3 (id, pack, off, len, stored_ms)"
                            " VALUES (?1, ?2, ?3, ?4, ?5)",
                            -1, &ins, NULL) != SQLITE_OK))
        rc = pb_error_set(err, -EIO, "state.db: migration: %s", sqlite3_errmsg(h));
    int step;
    while (rc == 0 && (step = sqlite3_step(sel)) == SQLITE_ROW) {
        const void *data = sqlite3_column_blob(sel, 1);
        uint32_t len = (uint32_t)sqlite3_column_bytes(sel, 1);
        uint32_t pack;
        uint64_t off;
        if ((rc = pack_append(db->packs, data, len, &pack, &off)) < 0) {
            pb_error_set(err, rc, "state.db: migration: writing a chunk pack: %s", strerror(-rc));
            break;
        }
        sqlite3_reset(ins);
        sqlite3_bind_value(ins, 1, sqlite3_column_value(sel, 0));
        sqlite3_bind_int64(ins, 2, pack);
        sqlite3_bind_int64(ins, 3, (int64_t)off);
        sqlite3_bind_int64(ins, 4, len);
        sqlite3_bind_int64(ins, 5, (int64_t)now);
        if (sqlite3_step(ins) != SQLITE_DONE)
            rc = pb_error_set(err, -EIO, "state.db: migration: %s", sqlite3_errmsg(h));
        n++;
        bytes += len;
    }
    if (rc == 0 && step != SQLITE_DONE)
        rc = pb_error_set(err, -EIO, "state.db: migration: %s", sqlite3_errmsg(h));
    sqlite3_finalize(sel);
    sqlite3_finalize(ins);
    if (rc == 0 && (rc = pack_sync(db->packs)) < 0)
        pb_error_set(err, rc, "state.db: migration: fdatasync of a chunk pack: %s", strerror(-rc));
    if (rc == 0)
        rc = sd_exec(h,
                     "DROP TRIGGER chunks_gone; DROP TABLE chunk_data;"
                     "ALTER TABLE chunk_data_v3 RENAME TO chunk_data;" SD_CHUNK_DATA_SCHEMA
                     "INSERT INTO chunk_unrowed SELECT id FROM chunk_data"
                     " WHERE id NOT IN (SELECT id FROM chunks);"
                     "UPDATE statedb_meta SET format = 3 WHERE id = 1;",
                     err);
    bool committing = rc == 0;
    if (rc == 0)
        rc = sd_exec(h, "COMMIT", err);
    if (rc < 0) {
        sqlite3_exec(h, "ROLLBACK", NULL, NULL, NULL);
        if (!committing) /* else format 3 may come back: sd_keep_failed_commit */
            pack_rewind(db->packs);
        return rc;
    }
    /* the BLOBs' pages go back to the filesystem */
    sqlite3_exec(h, "PRAGMA incremental_vacuum", NULL, NULL, NULL);
    log_notice("state.db: migrated from format 2 to format 3 (%" PRIu64 " chunks, %" PRIu64
               " bytes moved into chunk packs)",
               n, bytes);
    return 0;
}

static int sd_init_schema(struct statedb *db, struct pb_error *err)
{
    sqlite3 *h = db->db;
    int64_t appid, tables, format;
    int rc = sd_query_i64(h, "PRAGMA application_id", &appid, err);
    if (rc == 0)
        rc = sd_query_i64(h, "SELECT count(*) FROM sqlite_schema", &tables, err);
    if (rc < 0)
        return rc;
    if (appid == 0 && tables == 0)
        return (rc = sd_packs_open(db, err)) < 0 ? rc : sd_create(h, err);
    if (appid != STATEDB_APPLICATION_ID)
        return pb_error_set(err, -EBADMSG,
                            "state.db: not a pickbox state database (application_id 0x%08" PRIx64
                            ", expected 0x%08x)",
                            (uint64_t)appid, STATEDB_APPLICATION_ID);
    rc = sd_query_i64(h, "SELECT format FROM statedb_meta WHERE id = 1", &format, err);
    if (rc < 0)
        return rc;
    if (format > STATEDB_FORMAT)
        return pb_error_set(err, -EPROTONOSUPPORT,
                            "state.db has format %" PRId64 ", newer than format %d that this "
                            "pickbox understands; refusing to open it (downgrades are not "
                            "supported: run the newer pickbox)",
                            format, STATEDB_FORMAT);
    /* only now: a refused file leaves the state directory as it was */
    if ((rc = sd_packs_open(db, err)) < 0)
        return rc;
    if (format == 1 && (rc = sd_migrate_1_2(h, err)) < 0)
        return rc;
    if (format == 1)
        format = 2;
    if (format == 2 && (rc = sd_migrate_2_3(db, err)) < 0)
        return rc;
    if (format == 2)
        format = 3;
    if (format < STATEDB_FORMAT)
        return pb_error_set(err, -EBADMSG,
                            "state.db has format %" PRId64 " but format %d has no migration "
                            "from it; the file is damaged",
                            format, STATEDB_FORMAT);
    return sd_exec(h, "PRAGMA journal_mode = WAL;", err);
}

/* PRAGMA data_version: changes when another connection commits. */
static int sd_data_version(struct statedb *db, int64_t *v)
{
    int e = 0;
    sqlite3_stmt *st = sd_q(db, Q_DATA_VERSION, &e);
    if (st == NULL)
        return e;
    int rc = sqlite3_step(st);
    if (rc == SQLITE_ROW)
        *v = sqlite3_column_int64(st, 0);
    else
        e = sd_fail(db, rc, "data version");
    sqlite3_reset(st);
    return e;
}

/* Counts the kept status counts (one read of the file: a savepoint). */
static int sd_totals_count(struct statedb *db)
{
    int rc = sqlite3_exec(db->db, "SAVEPOINT sd_count", NULL, NULL, NULL);
    if (rc != SQLITE_OK)
        return sd_fail(db, rc, "count status");
    rc = sqlite3_exec(db->db, statedb_totals_recount, NULL, NULL, NULL);
    int e = rc == SQLITE_OK ? sd_data_version(db, &db->counted_version)
                            : sd_fail(db, rc, "count status");
    if (e < 0)
        sqlite3_exec(db->db, "ROLLBACK TO sd_count", NULL, NULL, NULL);
    sqlite3_exec(db->db, "RELEASE sd_count", NULL, NULL, NULL);
    return e;
}

/* A reader: an existing state.db of this format, read-only, no flock. */
static int sd_open_reader(struct statedb *db, struct pb_error *err)
{
    int rc = sqlite3_open_v2(db->path, &db->db, SQLITE_OPEN_READONLY | SQLITE_OPEN_NOMUTEX, NULL);
    if (rc != SQLITE_OK)
        return pb_error_set(err, store_sqlite_errno(rc) ? store_sqlite_errno(rc) : -EIO,
                            "state.db: open %s: %s", db->path,
                            db->db ? sqlite3_errmsg(db->db) : sqlite3_errstr(rc));
    sqlite3_extended_result_codes(db->db, 1);
    sqlite3_busy_timeout(db->db, STATEDB_BUSY_MS);
    int64_t appid, format;
    if ((rc = sd_exec(db->db, "PRAGMA query_only = ON; PRAGMA trusted_schema = OFF;", err)) < 0 ||
        (rc = sd_query_i64(db->db, "PRAGMA application_id", &appid, err)) < 0)
        return rc;
    if (appid != STATEDB_APPLICATION_ID)
        return pb_error_set(err, -EBADMSG, "state.db: %s is not a pickbox state database",
                            db->path);
    if ((rc = sd_query_i64(db->db, "SELECT format FROM statedb_meta WHERE id = 1", &format, err)) <
        0)
        return rc;
    if (format != STATEDB_FORMAT)
        return pb_error_set(err, format > STATEDB_FORMAT ? -EPROTONOSUPPORT : -EBADMSG,
                            "state.db has format %" PRId64 ", this pickbox reads format %d", format,
                            STATEDB_FORMAT);
    return sd_packs_open(db, err);
}

int statedb_open_reader(const char *path, struct statedb **out, struct pb_error *err)
{
    struct statedb *db = pb_xcalloc(1, sizeof(*db));
    db->path = pb_xstrdup(path);
    db->lock_fd = -1;
    db->reader = true;
    *out = NULL;
    int rc = sd_open_reader(db, err);
    if (rc < 0) {
        statedb_close(db);
        return rc;
    }
    *out = db;
    return 0;
}

int statedb_open(const char *path, struct statedb **out, struct pb_error *err)
{
    struct statedb *db = pb_xcalloc(1, sizeof(*db));
    db->path = pb_xstrdup(path);
    db->lock_fd = -1;
    *out = NULL;
    /* One applier per state.db: two would apply every entry twice to one
     * tree. flock() is separate from SQLite's POSIX locks. */
    db->lock_fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (db->lock_fd < 0) {
        int e = pb_error_set(err, -errno, "%s: %s", path, strerror(errno));
        statedb_close(db);
        return e;
    }
    if (flock(db->lock_fd, LOCK_EX | LOCK_NB) < 0) {
        int e = errno == EWOULDBLOCK
                        ? pb_error_set(err, -EBUSY, "%s is in use by another process", path)
                        : pb_error_set(err, -errno, "%s: flock: %s", path, strerror(errno));
        statedb_close(db);
        return e;
    }
    db->fvfs = store_fault_vfs_new();
    if (db->fvfs == NULL) {
        statedb_close(db);
        return pb_error_set(err, -EIO, "state.db: cannot register the VFS shim");
    }
    int rc = sqlite3_open_v2(path, &db->db,
                             SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX,
                             store_fault_vfs_name(db->fvfs));
    if (rc != SQLITE_OK) {
        rc = pb_error_set(err, store_sqlite_errno(rc) ? store_sqlite_errno(rc) : -EIO,
                          "state.db: open %s: %s", path,
                          db->db ? sqlite3_errmsg(db->db) : sqlite3_errstr(rc));
        statedb_close(db);
        return rc;
    }
    sqlite3_extended_result_codes(db->db, 1);
    sqlite3_busy_timeout(db->db, STATEDB_BUSY_MS);
    /* FULL: the applied index must be exactly as durable as the effects. */
    rc = sd_exec(db->db,
                 "PRAGMA trusted_schema = OFF; PRAGMA cell_size_check = ON;"
                 "PRAGMA foreign_keys = OFF; PRAGMA recursive_triggers = OFF;"
                 "PRAGMA temp_store = MEMORY; PRAGMA cache_size = -16384;"
                 "PRAGMA synchronous = FULL; PRAGMA journal_size_limit = 67108864;"
                 /* a big file's chunk bytes are checkpointed 16 MiB at a
                  * time: a quarter of the fsyncs of the default 1000 */
                 "PRAGMA wal_autocheckpoint = 4096;",
                 err);
    if (rc == 0)
        rc = sd_init_schema(db, err);
    if (rc == 0)
        rc = sd_exec(db->db, statedb_totals_schema, err);
    if (rc == 0 && (rc = sd_totals_count(db)) < 0)
        pb_error_set(err, rc, "%s", db->errmsg);
    /* What the last process committed lazily (or with NORMAL) may still be
     * only in the page cache: a power loss could undo its deletes after
     * their ranges were punched or cut below. One FULL commit first. */
    db->lazy_dirty = true;
    if (rc == 0 && (rc = statedb_sync(db)) < 0)
        pb_error_set(err, rc, "state.db: sync at open: %s", db->errmsg);
    if (rc == 0 && (rc = sd_packs_recover(db)) < 0)
        pb_error_set(err, rc, "state.db: chunk packs: %s",
                     db->errmsg[0] ? db->errmsg : strerror(-rc));
    if (rc < 0) {
        pb_error_prefix(err, "%s: ", path);
        statedb_close(db);
        return rc;
    }
    sd_local_sync(db);
    *out = db;
    return 0;
}

void statedb_close(struct statedb *db)
{
    if (db == NULL)
        return;
    if (db->in_txn)
        statedb_rollback(db);
    for (int i = 0; i < Q_MAX; i++)
        sqlite3_finalize(db->q[i]);
    sqlite3_close(db->db);
    pack_set_close(db->packs);
    store_fault_vfs_free(db->fvfs);
    /* only after SQLite's: closing any descriptor of the file drops the
     * process's POSIX locks on it */
    if (db->lock_fd >= 0)
        close(db->lock_fd);
    free(db->path);
    free(db);
}

const char *statedb_errmsg(const struct statedb *db)
{
    return db->errmsg;
}

void statedb_pack_roll_bytes(struct statedb *db, uint64_t bytes)
{
    if (db->packs != NULL)
        pack_set_roll_bytes(db->packs, bytes);
}

void statedb_fault_inject(struct statedb *db, enum store_fault kind, unsigned n)
{
    if (db->fvfs != NULL)
        store_fault_vfs_arm(db->fvfs, kind, n);
}

/* ---- transactions -------------------------------------------------------- */

int statedb_begin(struct statedb *db)
{
    if (db->reader) {
        snprintf(db->errmsg, sizeof(db->errmsg), "state.db: a reader cannot write");
        return -EROFS;
    }
    if (db->in_txn) {
        snprintf(db->errmsg, sizeof(db->errmsg), "state.db: a transaction is already open");
        return -EBUSY;
    }
    /* FULL for the replicated state's transactions (see sd_local_sync),
     * unless the caller asked for a lazy commit (statedb_set_lazy) */
    int rc = sd_set_sync(db, !db->lazy);
    if (rc != SQLITE_OK)
        return sd_fail(db, rc, "PRAGMA synchronous");
    store_fault_vfs_begin(db->fvfs);
    rc = sqlite3_exec(db->db, "BEGIN IMMEDIATE", NULL, NULL, NULL);
    if (rc != SQLITE_OK) {
        store_fault_vfs_end(db->fvfs);
        return sd_fail(db, rc, "BEGIN");
    }
    db->in_txn = true;
    db->txn_lazy = db->lazy;
    if (db->packs != NULL)
        pack_mark(db->packs);
    return 0;
}

int statedb_commit(struct statedb *db)
{
    if (!db->in_txn)
        return -EINVAL;
    /* the chunk bytes this transaction indexes are durable before it is */
    int e = sd_commit_packs(db);
    if (e < 0) {
        statedb_rollback(db);
        return e;
    }
    int rc = sqlite3_exec(db->db, "COMMIT", NULL, NULL, NULL);
    if (rc != SQLITE_OK) {
        e = sd_fail(db, rc, "COMMIT");
        sd_keep_failed_commit(db);
        statedb_rollback(db);
        return e;
    }
    db->in_txn = false;
    /* A FULL commit syncs the WAL up to its own frames: every earlier lazy
     * commit is durable with it. */
    db->lazy_dirty = db->txn_lazy;
    store_fault_vfs_end(db->fvfs);
    sd_local_sync(db);
    sd_free_ranges(db);
    return 0;
}

void statedb_set_lazy(struct statedb *db, bool lazy)
{
    db->lazy = lazy;
}

bool statedb_lazy_pending(const struct statedb *db)
{
    return db->lazy_dirty;
}

/*
 * The durability barrier after lazy commits: one FULL commit. It must write
 * a page (a commit that changed nothing writes no WAL frame and syncs
 * nothing), so it moves the applied row's term and back in one transaction:
 * the row ends as it was, the page is dirty, and the commit appends its frame
 * and syncs the WAL. That makes every frame before it durable too: WAL frame
 * checksums are cumulative, so recovery can only reach this commit through
 * all the earlier ones, and frames already checkpointed are in the database
 * file, which a checkpoint syncs before the WAL is reused.
 */
int statedb_sync(struct statedb *db)
{
    if (!db->lazy_dirty)
        return 0;
    if (db->in_txn) {
        snprintf(db->errmsg, sizeof(db->errmsg), "state.db: sync inside a transaction");
        return -EBUSY;
    }
    bool lazy = db->lazy;
    db->lazy = false;
    int rc = statedb_begin(db);
    db->lazy = lazy;
    if (rc < 0)
        return rc;
    rc = sqlite3_exec(db->db,
                      "UPDATE applied SET term = term + 1 WHERE id = 1;"
                      "UPDATE applied SET term = term - 1 WHERE id = 1;",
                      NULL, NULL, NULL);
    if (rc != SQLITE_OK) {
        int e = sd_fail(db, rc, "sync");
        statedb_rollback(db);
        return e;
    }
    return statedb_commit(db); /* FULL: clears lazy_dirty */
}

void statedb_rollback(struct statedb *db)
{
    if (!db->in_txn)
        return;
    for (int i = 0; i < Q_MAX; i++)
        if (db->q[i] != NULL)
            sqlite3_reset(db->q[i]);
    /* After an I/O error SQLite may have rolled back already. */
    if (!sqlite3_get_autocommit(db->db))
        sqlite3_exec(db->db, "ROLLBACK", NULL, NULL, NULL);
    if (db->packs != NULL) /* bytes appended for rows that are not there */
        pack_rewind(db->packs);
    db->in_txn = false;
    store_fault_vfs_end(db->fvfs);
    sd_local_sync(db);
}

bool statedb_in_txn(const struct statedb *db)
{
    return db->in_txn;
}

/* ---- applied ------------------------------------------------------------- */

int statedb_applied_get(struct statedb *db, struct statedb_applied *a)
{
    int e = 0;
    sqlite3_stmt *st = sd_q(db, Q_APPLIED_GET, &e);
    if (st == NULL)
        return e;
    int rc = sqlite3_step(st);
    if (rc != SQLITE_ROW) {
        sqlite3_reset(st);
        if (rc == SQLITE_DONE) {
            snprintf(db->errmsg, sizeof(db->errmsg), "state.db: the applied row is missing");
            return -EBADMSG;
        }
        return sd_fail(db, rc, "read applied");
    }
    a->index = (uint64_t)sqlite3_column_int64(st, 0);
    a->term = (uint64_t)sqlite3_column_int64(st, 1);
    a->malformed = (uint64_t)sqlite3_column_int64(st, 2);
    a->conflicts = (uint64_t)sqlite3_column_int64(st, 3);
    a->duplicates = (uint64_t)sqlite3_column_int64(st, 4);
    sqlite3_reset(st);
    return 0;
}

int statedb_applied_set(struct statedb *db, const struct statedb_applied *a)
{
    int e = 0;
    sqlite3_stmt *st = sd_q(db, Q_APPLIED_SET, &e);
    if (st == NULL)
        return e;
    sqlite3_bind_int64(st, 1, (int64_t)a->index);
    sqlite3_bind_int64(st, 2, (int64_t)a->term);
    sqlite3_bind_int64(st, 3, (int64_t)a->malformed);
    sqlite3_bind_int64(st, 4, (int64_t)a->conflicts);
    sqlite3_bind_int64(st, 5, (int64_t)a->duplicates);
    return sd_done(db, st, "set applied");
}

/* ---- manifest ------------------------------------------------------------ */

static void read_row(sqlite3_stmt *st, int c, struct statedb_row *r)
{
    memset(r, 0, sizeof(*r));
    r->kind = (uint8_t)sqlite3_column_int(st, c);
    r->deleted = sqlite3_column_int(st, c + 1) != 0;
    r->version = (uint64_t)sqlite3_column_int64(st, c + 2);
    r->content_version = (uint64_t)sqlite3_column_int64(st, c + 3);
    col_fixed(st, c + 4, r->content, STATEDB_ID_LEN);
    r->mode = (uint32_t)sqlite3_column_int64(st, c + 5);
    r->mtime_ns = sqlite3_column_int64(st, c + 6);
    r->size = (uint64_t)sqlite3_column_int64(st, c + 7);
    const unsigned char *o = sqlite3_column_text(st, c + 8);
    snprintf(r->origin, sizeof(r->origin), "%s", o ? (const char *)o : "");
}

int statedb_row_get(struct statedb *db, const char *path, struct statedb_row *r, char **target)
{
    int e = 0;
    if (target != NULL)
        *target = NULL;
    if (!path_ok(path))
        return -EINVAL;
    sqlite3_stmt *st = sd_q(db, Q_ROW_GET, &e);
    if (st == NULL)
        return e;
    bind_path(st, 1, path);
    int rc = sqlite3_step(st);
    if (rc == SQLITE_DONE) {
        sqlite3_reset(st);
        return -ENOENT;
    }
    if (rc != SQLITE_ROW) {
        e = sd_fail(db, rc, "read manifest");
        sqlite3_reset(st);
        return e;
    }
    read_row(st, 0, r);
    if (target != NULL && sqlite3_column_type(st, 9) != SQLITE_NULL)
        *target = col_str(st, 9);
    sqlite3_reset(st);
    return 0;
}

int statedb_row_put(struct statedb *db, const char *path, const struct statedb_row *r,
                    const char *target)
{
    int e = 0;
    if (!path_ok(path) || path[0] == '\0')
        return -EINVAL;
    sqlite3_stmt *st = sd_q(db, Q_ROW_PUT, &e);
    if (st == NULL)
        return e;
    bind_path(st, 1, path);
    sqlite3_bind_int(st, 2, r->kind);
    sqlite3_bind_int(st, 3, r->deleted ? 1 : 0);
    sqlite3_bind_int64(st, 4, (int64_t)r->version);
    sqlite3_bind_int64(st, 5, (int64_t)r->content_version);
    sqlite3_bind_blob(st, 6, r->content, STATEDB_ID_LEN, SQLITE_STATIC);
    sqlite3_bind_int64(st, 7, r->mode);
    sqlite3_bind_int64(st, 8, r->mtime_ns);
    sqlite3_bind_int64(st, 9, (int64_t)r->size);
    sqlite3_bind_text(st, 10, r->origin, -1, SQLITE_STATIC);
    if (target != NULL)
        bind_path(st, 11, target);
    return sd_done(db, st, "write manifest");
}

int statedb_row_delete(struct statedb *db, const char *path)
{
    int e = 0;
    sqlite3_stmt *st = sd_q(db, Q_CL_DEL, &e);
    if (st == NULL)
        return e;
    bind_path(st, 1, path);
    if ((e = sd_done(db, st, "delete chunk list")) < 0)
        return e;
    if ((st = sd_q(db, Q_ROW_DEL, &e)) == NULL)
        return e;
    bind_path(st, 1, path);
    return sd_done(db, st, "delete manifest row");
}

/* Collects the paths of table `table` at from or below it (live only for the
 * manifest), in byte order. */
static int subtree_paths(struct statedb *db, const char *table, bool live_only, const char *from,
                         char ***out, size_t *n_out)
{
    char *sql = pb_xasprintf("SELECT path FROM %s WHERE (path = ?1 OR (path >= ?2 AND path < ?3))"
                             "%s ORDER BY path",
                             table, live_only ? " AND deleted = 0" : "");
    sqlite3_stmt *st;
    int rc = sqlite3_prepare_v2(db->db, sql, -1, &st, NULL);
    free(sql);
    if (rc != SQLITE_OK)
        return sd_fail(db, rc, "prepare subtree");
    size_t n = strlen(from);
    char *lo = pb_xasprintf("%s/", from), *hi = pb_xasprintf("%s0", from);
    bind_path(st, 1, from);
    sqlite3_bind_blob(st, 2, lo, (int)n + 1, SQLITE_STATIC);
    sqlite3_bind_blob(st, 3, hi, (int)n + 1, SQLITE_STATIC);
    char **v = NULL;
    size_t k = 0, cap = 0;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        if (k == cap) {
            cap = cap ? 2 * cap : 16;
            v = pb_xreallocarray(v, cap, sizeof(*v));
        }
        v[k++] = col_str(st, 0);
    }
    int e = rc == SQLITE_DONE ? 0 : sd_fail(db, rc, "read subtree");
    sqlite3_finalize(st);
    free(lo);
    free(hi);
    if (e < 0) {
        for (size_t i = 0; i < k; i++)
            free(v[i]);
        free(v);
        return e;
    }
    *out = v;
    *n_out = k;
    return 0;
}

static void free_paths(char **v, size_t n)
{
    for (size_t i = 0; i < n; i++)
        free(v[i]);
    free(v);
}

static bool inside(const char *a, const char *b)
{
    size_t n = strlen(b);
    return strncmp(a, b, n) == 0 && (a[n] == '/' || a[n] == '\0');
}

/* Renames rows of the subtree (table rows: manifest + chunk lists, or disk).
 * Rows at the new paths give way first. */
static int move_rows(struct statedb *db, bool manifest, const char *from, const char *to,
                     uint64_t version)
{
    if (!path_ok(from) || !path_ok(to) || inside(to, from) || inside(from, to)) {
        snprintf(db->errmsg, sizeof(db->errmsg), "state.db: cannot move a path into itself");
        return -EINVAL;
    }
    char **v = NULL;
    size_t n = 0;
    int e = subtree_paths(db, manifest ? "manifest" : "disk", manifest, from, &v, &n);
    if (e < 0)
        return e;
    size_t flen = strlen(from);
    char **nv = pb_xreallocarray(NULL, n ? n : 1, sizeof(*nv));
    for (size_t i = 0; i < n; i++)
        nv[i] = pb_xasprintf("%s%s", to, v[i] + flen);
    for (size_t i = 0; i < n && e == 0; i++) {
        if (strlen(nv[i]) > STATEDB_PATH_BYTES_MAX) {
            e = -ENAMETOOLONG;
            break;
        }
        if (manifest) {
            e = statedb_row_delete(db, nv[i]);
        } else {
            sqlite3_stmt *st = sd_q(db, Q_DISK_DEL, &e);
            if (st != NULL) {
                bind_path(st, 1, nv[i]);
                e = sd_done(db, st, "delete disk record");
            }
        }
    }
    for (size_t i = 0; i < n && e == 0; i++) {
        sqlite3_stmt *st = sd_q(db, manifest ? Q_ROW_RENAME : Q_DISK_RENAME, &e);
        if (st == NULL)
            break;
        bind_path(st, 1, v[i]);
        bind_path(st, 2, nv[i]);
        if (manifest)
            sqlite3_bind_int64(st, 3, (int64_t)version);
        if ((e = sd_done(db, st, "move row")) < 0 || !manifest)
            continue;
        if ((st = sd_q(db, Q_CL_RENAME, &e)) == NULL)
            break;
        bind_path(st, 1, v[i]);
        bind_path(st, 2, nv[i]);
        e = sd_done(db, st, "move chunk list");
    }
    free_paths(v, n);
    free_paths(nv, n);
    return e;
}

int statedb_row_move(struct statedb *db, const char *from, const char *to, uint64_t version)
{
    return move_rows(db, true, from, to, version);
}

int statedb_row_foreach(struct statedb *db,
                        int (*fn)(void *arg, const char *path, const struct statedb_row *r),
                        void *arg)
{
    sqlite3_stmt *st;
    int rc = sqlite3_prepare_v2(db->db,
                                "SELECT path, kind, deleted, version, content_version, content, "
                                "mode, mtime_ns, size, origin FROM manifest ORDER BY path",
                                -1, &st, NULL);
    if (rc != SQLITE_OK)
        return sd_fail(db, rc, "prepare foreach");
    int ret = 0;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        struct statedb_row r;
        char *p = col_str(st, 0);
        read_row(st, 1, &r);
        ret = fn(arg, p, &r);
        free(p);
        if (ret != 0)
            break;
    }
    if (ret == 0 && rc != SQLITE_DONE)
        ret = sd_fail(db, rc, "foreach");
    sqlite3_finalize(st);
    return ret;
}

int statedb_list_children(struct statedb *db, const char *dir,
                          int (*fn)(void *arg, const char *name), void *arg)
{
    size_t n = strlen(dir);
    sqlite3_stmt *st;
    const char *sql = n == 0 ? "SELECT path FROM manifest WHERE deleted = 0 AND "
                               "instr(path, x'2f') = 0 ORDER BY path"
                             : "SELECT path FROM manifest WHERE deleted = 0 AND path >= ?1 AND "
                               "path < ?2 AND instr(substr(path, ?3), x'2f') = 0 ORDER BY path";
    /* A statement of its own: fn may use db's cached ones. */
    int rc = sqlite3_prepare_v2(db->db, sql, -1, &st, NULL);
    if (rc != SQLITE_OK)
        return sd_fail(db, rc, "prepare list");
    char *lo = pb_xasprintf("%s/", dir), *hi = pb_xasprintf("%s0", dir);
    if (n > 0) {
        sqlite3_bind_blob(st, 1, lo, (int)n + 1, SQLITE_STATIC);
        sqlite3_bind_blob(st, 2, hi, (int)n + 1, SQLITE_STATIC);
        sqlite3_bind_int64(st, 3, (int64_t)n + 2);
    }
    int ret = 0;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        char *p = col_str(st, 0);
        ret = fn(arg, p + (n ? n + 1 : 0));
        free(p);
        if (ret != 0)
            break;
    }
    if (ret == 0 && rc != SQLITE_DONE)
        ret = sd_fail(db, rc, "list children");
    sqlite3_finalize(st);
    free(lo);
    free(hi);
    return ret;
}

/* ---- chunks -------------------------------------------------------------- */

int statedb_chunk_has(struct statedb *db, const uint8_t id[STATEDB_ID_LEN])
{
    int e = 0;
    sqlite3_stmt *st = sd_q(db, Q_CHUNK_HAS, &e);
    if (st == NULL)
        return e;
    sqlite3_bind_blob(st, 1, id, STATEDB_ID_LEN, SQLITE_STATIC);
    int rc = sqlite3_step(st);
    sqlite3_reset(st);
    if (rc == SQLITE_ROW)
        return 1;
    if (rc == SQLITE_DONE)
        return 0;
    return sd_fail(db, rc, "chunk lookup");
}

/* Where chunk id's bytes are: 0, -ENOENT (not here), or -errno. */
static int sd_data_locate(struct statedb *db, const uint8_t id[STATEDB_ID_LEN], uint32_t *pack,
                          uint64_t *off, uint32_t *len)
{
    int e = 0;
    sqlite3_stmt *st = sd_q(db, Q_CHUNK_GET, &e);
    if (st == NULL)
        return e;
    sqlite3_bind_blob(st, 1, id, STATEDB_ID_LEN, SQLITE_STATIC);
    int rc = sqlite3_step(st);
    if (rc == SQLITE_ROW &&
        !sd_range_ok(sqlite3_column_int64(st, 1), sqlite3_column_int64(st, 2))) {
        snprintf(db->errmsg, sizeof(db->errmsg), "state.db: a chunk's index row is damaged");
        e = -EIO;
    } else if (rc == SQLITE_ROW) {
        *pack = (uint32_t)sqlite3_column_int64(st, 0);
        *off = (uint64_t)sqlite3_column_int64(st, 1);
        *len = (uint32_t)sqlite3_column_int64(st, 2);
    } else {
        e = rc == SQLITE_DONE ? -ENOENT : sd_fail(db, rc, "read chunk index");
    }
    sqlite3_reset(st);
    return e;
}

/* Drops chunk id's index row (its bytes are gone), in the open transaction
 * or in one of its own. */
static int sd_data_drop(struct statedb *db, const uint8_t id[STATEDB_ID_LEN], uint32_t pack)
{
    log_err("state.db: chunk pack %" PRIu32 " lost a chunk's bytes (cut or removed by something "
            "else): the chunk counts as missing",
            pack);
    bool own = !db->in_txn;
    int e = own ? sd_local_begin(db) : 0;
    sqlite3_stmt *st = e == 0 ? sd_q(db, Q_DATA_DEL, &e) : NULL;
    if (st != NULL) {
        sqlite3_bind_blob(st, 1, id, STATEDB_ID_LEN, SQLITE_TRANSIENT);
        e = sd_done(db, st, "drop lost chunk bytes");
    }
    if (!own)
        return e;
    if (e < 0) {
        sd_local_rollback(db);
        return e;
    }
    return sd_local_commit(db);
}

/*
 * statedb_chunk_get/_copy: the bytes from their pack. A read-only handle
 * reads beside the writer, which may delete the index row and punch the
 * range out after the row was looked up here: it looks again afterwards,
 * and a row gone (or moved) means the bytes read may be zeroes: -ENOENT.
 * The writer's own deletes never race its reads.
 */
static int sd_data_read(struct statedb *db, const uint8_t id[STATEDB_ID_LEN], uint32_t len,
                        void *buf, int out_fd)
{
    uint32_t pack, have;
    uint64_t off;
    int e = sd_data_locate(db, id, &pack, &off, &have);
    if (e < 0)
        return e;
    if (have != len) {
        snprintf(db->errmsg, sizeof(db->errmsg), "state.db: a chunk has the wrong length");
        return -EBADMSG;
    }
    if (db->packs == NULL)
        return -EIO;
    e = buf != NULL ? pack_read(db->packs, pack, off, buf, len)
                    : pack_copy(db->packs, pack, off, len, out_fd);
    if (db->reader) {
        uint32_t pack2, len2;
        uint64_t off2;
        int again = sd_data_locate(db, id, &pack2, &off2, &len2);
        if (again == -ENOENT || (again == 0 && (pack2 != pack || off2 != off)))
            return -ENOENT;
    }
    if (e < 0) {
        snprintf(db->errmsg, sizeof(db->errmsg),
                 "state.db: chunk bytes in pack %" PRIu32 " at %" PRIu64 ": %s", pack, off,
                 strerror(-e));
        /* the pack is gone or cut (by something else): the writer drops
         * the index row, so the chunk counts as missing and is fetched
         * again (D10), as the open-time check would do */
        if ((e == -ENOENT || e == -ENODATA) && !db->reader && sd_data_drop(db, id, pack) == 0)
            return -ENOENT;
        /* else not -ENOENT: the index says they are here: damaged */
        return e == -ENOENT || e == -ENODATA ? -EIO : e;
    }
    return 0;
}

int statedb_chunk_get(struct statedb *db, const uint8_t id[STATEDB_ID_LEN], void *buf, uint32_t len)
{
    return sd_data_read(db, id, len, buf, -1);
}

int statedb_chunk_copy(struct statedb *db, const uint8_t id[STATEDB_ID_LEN], uint32_t len,
                       int out_fd)
{
    return sd_data_read(db, id, len, NULL, out_fd);
}

/* Inside a transaction: appends the bytes of chunk id to the current pack
 * and indexes them (nothing if they are here already). */
static int sd_data_add(struct statedb *db, const uint8_t id[STATEDB_ID_LEN], const void *data,
                       uint32_t len, bool pin)
{
    int has = statedb_chunk_data_has(db, id);
    if (has < 0)
        return has;
    if (has > 0 && !pin)
        return 0;
    if (has > 0) {
        /* Already here, and somebody counts on this node holding them (a
         * push acknowledged, a fetch): they outlive their row from now on
         * (chunks_gone turns them into bytes without a row, collected by
         * age), so a collection this node applies before the entry naming
         * them cannot take them (D13). */
        int e = 0;
        sqlite3_stmt *st = sd_q(db, Q_DATA_PIN, &e);
        if (st == NULL)
            return e;
        sqlite3_bind_blob(st, 1, id, STATEDB_ID_LEN, SQLITE_STATIC);
        sqlite3_bind_int64(st, 2, (int64_t)pb_now_ms());
        return sd_done(db, st, "keep chunk bytes");
    }
    if (db->packs == NULL)
        return -EROFS;
    uint32_t pack;
    uint64_t off;
    int e = pack_append(db->packs, data, len, &pack, &off);
    if (e < 0) {
        snprintf(db->errmsg, sizeof(db->errmsg), "state.db: writing a chunk pack: %s",
                 strerror(-e));
        return e;
    }
    sqlite3_stmt *st = sd_q(db, Q_DATA_INS, &e);
    if (st == NULL)
        return e;
    sqlite3_bind_blob(st, 1, id, STATEDB_ID_LEN, SQLITE_STATIC);
    sqlite3_bind_int64(st, 2, pack);
    sqlite3_bind_int64(st, 3, (int64_t)off);
    sqlite3_bind_int64(st, 4, len);
    sqlite3_bind_int64(st, 5, (int64_t)pb_now_ms());
    return sd_done(db, st, "index chunk bytes");
}

/* One integer column of chunk id's row by query q (what: for the error):
 * 0 and *v, -ENOENT (no row), -errno. */
static int sd_chunk_int(struct statedb *db, int q, const uint8_t id[STATEDB_ID_LEN], uint64_t *v,
                        const char *what)
{
    int e = 0;
    sqlite3_stmt *st = sd_q(db, q, &e);
    if (st == NULL)
        return e;
    sqlite3_bind_blob(st, 1, id, STATEDB_ID_LEN, SQLITE_STATIC);
    int rc = sqlite3_step(st);
    if (rc == SQLITE_ROW)
        *v = (uint64_t)sqlite3_column_int64(st, 0);
    else
        e = rc == SQLITE_DONE ? -ENOENT : sd_fail(db, rc, what);
    sqlite3_reset(st);
    return e;
}

/* The length of chunk id's row: 0 and *len, -ENOENT (no row), -errno. */
static int sd_chunk_len(struct statedb *db, const uint8_t id[STATEDB_ID_LEN], uint32_t *len)
{
    uint64_t v = 0;
    int e = sd_chunk_int(db, Q_CHUNK_LEN, id, &v, "chunk row lookup");
    if (e == 0)
        *len = (uint32_t)v;
    return e;
}

/* statedb_test_before_data_commit(): tests of crashes only. */
static void (*sd_before_data_commit)(void);

void statedb_test_before_data_commit(void (*fn)(void))
{
    sd_before_data_commit = fn;
}

/*
 * statedb_chunk_data_put/_put_many: every chunk checked first (length
 * bound, a row of the same length if there is a row), so -EINVAL stores
 * nothing; then appended and indexed, in the caller's transaction or in one
 * of their own: durable (FULL commit) for put_many, synchronous NORMAL for
 * a single put (a power loss may drop it, and it is fetched again). Either
 * way the pack is fdatasync'ed before the commit.
 */
static int sd_data_store(struct statedb *db, const struct statedb_chunk_in *in, size_t n,
                         bool durable)
{
    if (db->reader) {
        snprintf(db->errmsg, sizeof(db->errmsg), "state.db: a reader cannot write");
        return -EROFS;
    }
    for (size_t i = 0; i < n; i++) {
        uint32_t have;
        int e = in[i].len > STATEDB_CHUNK_MAX ? -EINVAL : sd_chunk_len(db, in[i].id, &have);
        if (e == 0 && have != in[i].len)
            e = -EINVAL;
        if (e == -EINVAL) {
            snprintf(db->errmsg, sizeof(db->errmsg), "state.db: chunk bytes of the wrong length");
            return e;
        }
        if (e < 0 && e != -ENOENT)
            return e;
    }
    bool own = !db->in_txn;
    int e = 0;
    if (own && durable) {
        bool lazy = db->lazy;
        db->lazy = false;
        e = statedb_begin(db);
        db->lazy = lazy;
    } else if (own) {
        e = sd_local_begin(db);
    }
    for (size_t i = 0; i < n && e == 0; i++)
        e = sd_data_add(db, in[i].id, in[i].data, in[i].len, durable);
    if (!own)
        return e;
    if (durable && e == 0 && sd_before_data_commit != NULL)
        sd_before_data_commit();
    if (durable)
        return e < 0 ? (statedb_rollback(db), e) : statedb_commit(db);
    if (e < 0) {
        sd_local_rollback(db);
        return e;
    }
    return sd_local_commit(db);
}

int statedb_chunk_put(struct statedb *db, const uint8_t id[STATEDB_ID_LEN], const void *data,
                      uint32_t len, uint64_t keep_until)
{
    int e = 0;
    sqlite3_stmt *st = sd_q(db, Q_CHUNK_INS, &e);
    if (st == NULL)
        return e;
    sqlite3_bind_blob(st, 1, id, STATEDB_ID_LEN, SQLITE_STATIC);
    sqlite3_bind_int64(st, 2, (int64_t)keep_until);
    sqlite3_bind_int64(st, 3, len);
    if ((e = sd_done(db, st, "store chunk")) < 0)
        return e;
    if (sqlite3_changes(db->db) == 0) {
        if ((st = sd_q(db, Q_CHUNK_KEEP, &e)) == NULL)
            return e;
        sqlite3_bind_blob(st, 1, id, STATEDB_ID_LEN, SQLITE_STATIC);
        sqlite3_bind_int64(st, 2, (int64_t)keep_until);
        if ((e = sd_done(db, st, "keep chunk")) < 0)
            return e;
    }
    /* the bytes, if this node lacks them (a chunk the op carries again) */
    return statedb_chunk_data_put(db, id, data, len);
}

int statedb_chunk_data_put(struct statedb *db, const uint8_t id[STATEDB_ID_LEN], const void *data,
                           uint32_t len)
{
    struct statedb_chunk_in in = {id, data, len};
    return sd_data_store(db, &in, 1, false);
}

int statedb_chunk_data_put_many(struct statedb *db, const struct statedb_chunk_in *in, size_t n)
{
    return sd_data_store(db, in, n, true);
}

int statedb_chunk_row_put(struct statedb *db, const uint8_t id[STATEDB_ID_LEN], uint32_t len,
                          uint64_t keep_until)
{
    uint32_t have;
    int e = sd_chunk_len(db, id, &have);
    if (e == 0 && have != len) {
        snprintf(db->errmsg, sizeof(db->errmsg), "state.db: a chunk row has another length");
        return -EINVAL;
    }
    if (e < 0 && e != -ENOENT)
        return e;
    bool absent = e == -ENOENT;
    e = 0;
    sqlite3_stmt *st = sd_q(db, absent ? Q_CHUNK_INS : Q_CHUNK_KEEP, &e);
    if (st == NULL)
        return e;
    sqlite3_bind_blob(st, 1, id, STATEDB_ID_LEN, SQLITE_STATIC);
    sqlite3_bind_int64(st, 2, (int64_t)keep_until);
    if (absent)
        sqlite3_bind_int64(st, 3, len);
    if ((e = sd_done(db, st, "add chunk row")) < 0)
        return e;
    /* Bytes here of another length cannot be this chunk (whose row is
     * replicated and wins): they go, and are fetched. */
    uint32_t pack, dlen;
    uint64_t off;
    e = sd_data_locate(db, id, &pack, &off, &dlen);
    if (e == -ENOENT || (e == 0 && dlen == len))
        return 0;
    if (e < 0)
        return e;
    if ((st = sd_q(db, Q_DATA_DEL, &e)) == NULL)
        return e;
    sqlite3_bind_blob(st, 1, id, STATEDB_ID_LEN, SQLITE_STATIC);
    return sd_done(db, st, "drop chunk bytes");
}

int statedb_chunk_data_collect_unrowed(struct statedb *db, uint64_t now_ms, uint64_t max_age_ms,
                                       uint64_t *n)
{
    if (n != NULL)
        *n = 0;
    if (db->reader) {
        snprintf(db->errmsg, sizeof(db->errmsg), "state.db: a reader cannot write");
        return -EROFS;
    }
    bool own = !db->in_txn, lazy = db->lazy;
    int e = 0;
    if (own) { /* FULL: the deletes are durable before their ranges are punched */
        db->lazy = false;
        e = statedb_begin(db);
        db->lazy = lazy;
    }
    if (e < 0)
        return e;
    /* Times stored under an earlier boot of the monotonic clock may lie
     * ahead of now: such bytes count as stored now. */
    char *sql = pb_xasprintf(
            "UPDATE chunk_data SET stored_ms = %" PRId64 " WHERE stored_ms > %" PRId64
            " AND id IN (SELECT id FROM chunk_unrowed);"
            "DELETE FROM chunk_data WHERE id IN (SELECT u.id FROM chunk_unrowed u"
            " JOIN chunk_data d ON d.id = u.id WHERE d.stored_ms + %" PRId64 " < %" PRId64 ");",
            (int64_t)now_ms, (int64_t)now_ms, (int64_t)max_age_ms, (int64_t)now_ms);
    int rc = sqlite3_exec(db->db, sql, NULL, NULL, NULL);
    free(sql);
    uint64_t k = rc == SQLITE_OK ? (uint64_t)sqlite3_changes(db->db) : 0;
    if (rc != SQLITE_OK) {
        e = sd_fail(db, rc, "collect chunk bytes without a row");
        if (own)
            statedb_rollback(db);
        return e;
    }
    if (own && (e = statedb_commit(db)) < 0)
        return e;
    if (n != NULL)
        *n = k;
    return 0;
}

int statedb_chunk_data_has(struct statedb *db, const uint8_t id[STATEDB_ID_LEN])
{
    int e = 0;
    sqlite3_stmt *st = sd_q(db, Q_DATA_HAS, &e);
    if (st == NULL)
        return e;
    sqlite3_bind_blob(st, 1, id, STATEDB_ID_LEN, SQLITE_STATIC);
    int rc = sqlite3_step(st);
    sqlite3_reset(st);
    if (rc == SQLITE_ROW)
        return 1;
    if (rc == SQLITE_DONE)
        return 0;
    return sd_fail(db, rc, "chunk bytes lookup");
}

int statedb_chunk_missing(struct statedb *db, const uint8_t *after, struct statedb_ref *out,
                          size_t max, size_t *n)
{
    *n = 0;
    int e = 0, rc;
    sqlite3_stmt *st = sd_q(db, Q_CHUNK_MISSING, &e);
    if (st == NULL)
        return e;
    if (after != NULL)
        sqlite3_bind_blob(st, 1, after, STATEDB_ID_LEN, SQLITE_STATIC);
    else
        sqlite3_bind_zeroblob(st, 1, 0);
    sqlite3_bind_int64(st, 2, (int64_t)max);
    while ((rc = sqlite3_step(st)) == SQLITE_ROW && *n < max) {
        col_fixed(st, 0, out[*n].id, STATEDB_ID_LEN);
        out[*n].len = (uint32_t)sqlite3_column_int64(st, 1);
        (*n)++;
    }
    if (rc != SQLITE_DONE && rc != SQLITE_ROW)
        e = sd_fail(db, rc, "missing chunks");
    sqlite3_reset(st);
    return e;
}

int statedb_chunk_collect(struct statedb *db, uint64_t index, uint64_t *n)
{
    int e = 0;
    sqlite3_stmt *st = sd_q(db, Q_CHUNK_GC, &e);
    if (st == NULL)
        return e;
    sqlite3_bind_int64(st, 1, (int64_t)index);
    if ((e = sd_done(db, st, "collect chunks")) < 0)
        return e;
    if (n != NULL)
        *n = (uint64_t)sqlite3_changes(db->db);
    return 0;
}

int statedb_chunk_refs(struct statedb *db, const uint8_t id[STATEDB_ID_LEN], uint64_t *refs)
{
    return sd_chunk_int(db, Q_CHUNK_REFS, id, refs, "chunk refs");
}

int statedb_chunklist_get(struct statedb *db, const char *path, struct statedb_ref **refs,
                          uint32_t *n)
{
    int e = 0;
    *refs = NULL;
    *n = 0;
    sqlite3_stmt *st = sd_q(db, Q_CL_GET, &e);
    if (st == NULL)
        return e;
    bind_path(st, 1, path);
    struct statedb_ref *v = NULL;
    size_t k = 0, cap = 0;
    int rc;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        if (k == cap) {
            cap = cap ? 2 * cap : 16;
            v = pb_xreallocarray(v, cap, sizeof(*v));
        }
        col_fixed(st, 0, v[k].id, STATEDB_ID_LEN);
        v[k].len = (uint32_t)sqlite3_column_int64(st, 1);
        k++;
    }
    if (rc != SQLITE_DONE) {
        e = sd_fail(db, rc, "read chunk list");
        free(v);
        v = NULL;
        k = 0;
    }
    sqlite3_reset(st);
    *refs = v;
    *n = (uint32_t)k;
    return e;
}

int statedb_chunklist_put(struct statedb *db, const char *path, const struct statedb_ref *refs,
                          uint32_t n)
{
    int e = 0;
    sqlite3_stmt *st = sd_q(db, Q_CL_DEL, &e);
    if (st == NULL)
        return e;
    bind_path(st, 1, path);
    if ((e = sd_done(db, st, "replace chunk list")) < 0)
        return e;
    for (uint32_t i = 0; i < n; i++) {
        if ((st = sd_q(db, Q_CL_INS, &e)) == NULL)
            return e;
        bind_path(st, 1, path);
        sqlite3_bind_int64(st, 2, i);
        sqlite3_bind_blob(st, 3, refs[i].id, STATEDB_ID_LEN, SQLITE_STATIC);
        sqlite3_bind_int64(st, 4, refs[i].len);
        if ((e = sd_done(db, st, "write chunk list")) < 0)
            return e;
    }
    return 0;
}

/* ---- sessions ------------------------------------------------------------ */

int statedb_session_get(struct statedb *db, uint64_t client_id, uint64_t *seq)
{
    int e = 0;
    sqlite3_stmt *st = sd_q(db, Q_SESS_GET, &e);
    if (st == NULL)
        return e;
    sqlite3_bind_int64(st, 1, (int64_t)client_id);
    int rc = sqlite3_step(st);
    *seq = rc == SQLITE_ROW ? (uint64_t)sqlite3_column_int64(st, 0) : 0;
    if (rc != SQLITE_ROW && rc != SQLITE_DONE)
        e = sd_fail(db, rc, "read session");
    sqlite3_reset(st);
    return e;
}

int statedb_session_set(struct statedb *db, uint64_t client_id, uint64_t seq)
{
    int e = 0;
    sqlite3_stmt *st = sd_q(db, Q_SESS_SET, &e);
    if (st == NULL)
        return e;
    sqlite3_bind_int64(st, 1, (int64_t)client_id);
    sqlite3_bind_int64(st, 2, (int64_t)seq);
    return sd_done(db, st, "write session");
}

/* ---- disk records -------------------------------------------------------- */

int statedb_disk_get(struct statedb *db, const char *path, struct statedb_disk *d)
{
    int e = 0;
    memset(d, 0, sizeof(*d));
    sqlite3_stmt *st = sd_q(db, Q_DISK_GET, &e);
    if (st == NULL)
        return e;
    bind_path(st, 1, path);
    int rc = sqlite3_step(st);
    if (rc == SQLITE_ROW) {
        d->kind = (uint8_t)sqlite3_column_int(st, 0);
        d->mode = (uint32_t)sqlite3_column_int64(st, 1);
        d->size = (uint64_t)sqlite3_column_int64(st, 2);
        d->mtime_ns = sqlite3_column_int64(st, 3);
        d->ino = (uint64_t)sqlite3_column_int64(st, 4);
        col_fixed(st, 5, d->row_content, STATEDB_ID_LEN);
        d->row_mode = (uint32_t)sqlite3_column_int64(st, 6);
        d->row_mtime_ns = sqlite3_column_int64(st, 7);
    } else if (rc != SQLITE_DONE) {
        e = sd_fail(db, rc, "read disk record");
    }
    sqlite3_reset(st);
    return e;
}

int statedb_disk_set(struct statedb *db, const char *path, const struct statedb_disk *d)
{
    int e = 0;
    if (!path_ok(path) || path[0] == '\0')
        return -EINVAL;
    sqlite3_stmt *st = sd_q(db, d->kind == 0 ? Q_DISK_DEL : Q_DISK_SET, &e);
    if (st == NULL)
        return e;
    bind_path(st, 1, path);
    if (d->kind != 0) {
        sqlite3_bind_int(st, 2, d->kind);
        sqlite3_bind_int64(st, 3, d->mode);
        sqlite3_bind_int64(st, 4, (int64_t)d->size);
        sqlite3_bind_int64(st, 5, d->mtime_ns);
        sqlite3_bind_int64(st, 6, (int64_t)d->ino);
        sqlite3_bind_blob(st, 7, d->row_content, STATEDB_ID_LEN, SQLITE_STATIC);
        sqlite3_bind_int64(st, 8, d->row_mode);
        sqlite3_bind_int64(st, 9, d->row_mtime_ns);
    }
    return sd_done(db, st, "write disk record");
}

int statedb_disk_move(struct statedb *db, const char *from, const char *to)
{
    return move_rows(db, false, from, to, 0);
}

int statedb_disk_mismatches(struct statedb *db, int (*fn)(void *arg, const char *path, bool remove),
                            void *arg)
{
    static const char *const sql[2] = {
            "SELECT m.path FROM manifest m LEFT JOIN disk d ON d.path = m.path WHERE "
            "m.deleted = 0 AND (d.path IS NULL OR d.kind <> m.kind OR d.row_content <> m.content "
            "OR d.row_mode <> m.mode OR d.row_mtime_ns <> m.mtime_ns) ORDER BY m.path",
            "SELECT d.path FROM disk d LEFT JOIN manifest m ON m.path = d.path WHERE "
            "m.path IS NULL OR m.deleted = 1 ORDER BY d.path DESC",
    };
    int ret = 0;
    for (int pass = 0; pass < 2 && ret == 0; pass++) {
        sqlite3_stmt *st;
        int rc = sqlite3_prepare_v2(db->db, sql[pass], -1, &st, NULL);
        if (rc != SQLITE_OK)
            return sd_fail(db, rc, "prepare mismatches");
        char **v = NULL;
        size_t k = 0, cap = 0;
        while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
            if (k == cap) {
                cap = cap ? 2 * cap : 16;
                v = pb_xreallocarray(v, cap, sizeof(*v));
            }
            v[k++] = col_str(st, 0);
        }
        if (rc != SQLITE_DONE)
            ret = sd_fail(db, rc, "read mismatches");
        sqlite3_finalize(st);
        for (size_t i = 0; i < k && ret == 0; i++)
            ret = fn(arg, v[i], pass == 1);
        free_paths(v, k);
    }
    return ret;
}

int statedb_status_get(struct statedb *db, uint8_t file_kind, uint8_t dir_kind,
                       struct statedb_status *s)
{
    memset(s, 0, sizeof(*s));
    int e = 0;
    if (!db->reader) {
        int64_t v = 0;
        if ((e = sd_data_version(db, &v)) < 0)
            return e;
        if (v != db->counted_version && (e = sd_totals_count(db)) < 0)
            return e;
    }
    sqlite3_stmt *st = sd_q(db, db->reader ? Q_STATUS_COUNTED : Q_STATUS, &e);
    if (st == NULL)
        return e;
    sqlite3_bind_int(st, 1, file_kind);
    sqlite3_bind_int(st, 2, dir_kind);
    int rc = sqlite3_step(st);
    if (rc == SQLITE_ROW) {
        s->files = (uint64_t)sqlite3_column_int64(st, 0);
        s->dirs = (uint64_t)sqlite3_column_int64(st, 1);
        s->bytes = (uint64_t)sqlite3_column_int64(st, 2);
        s->chunks = (uint64_t)sqlite3_column_int64(st, 3);
        s->chunk_bytes = (uint64_t)sqlite3_column_int64(st, 4);
        s->tombstones = (uint64_t)sqlite3_column_int64(st, 5);
        s->missing = (uint64_t)sqlite3_column_int64(st, 6);
        s->missing_bytes = (uint64_t)sqlite3_column_int64(st, 7);
    } else {
        e = sd_fail(db, rc, "status");
    }
    sqlite3_reset(st);
    return e;
}

/* ---- snapshot: the sender ------------------------------------------------ */

enum { SEC_HEADER, SEC_MANIFEST, SEC_CHUNKLIST, SEC_CHUNKS, SEC_SESSIONS, SEC_END, SEC_DONE };

static const char *const snap_sql[] = {
        [SEC_MANIFEST] = "SELECT path, kind, deleted, version, content_version, content, mode, "
                         "mtime_ns, size, origin, target FROM manifest ORDER BY path",
        [SEC_CHUNKLIST] = "SELECT path, seq, id, len FROM chunklist ORDER BY path, seq",
        [SEC_CHUNKS] = "SELECT id, keep_until, len FROM chunks ORDER BY id",
        [SEC_SESSIONS] = "SELECT client_id, seq FROM sessions ORDER BY client_id",
};

struct statedb_snapshot {
    sqlite3 *db;
    sqlite3_stmt *st[SEC_DONE];
    struct statedb_applied a;
    int section;
    uint64_t records;
    uint32_t crc;
    struct buf pend;   /* generated bytes not yet consumed */
    uint64_t pend_off; /* stream offset of pend.data[0] */
};

static void put_blob_col(struct buf *b, sqlite3_stmt *st, int i)
{
    const void *p = sqlite3_column_blob(st, i); /* before _bytes(), as SQLite asks */
    size_t n = (size_t)sqlite3_column_bytes(st, i);
    buf_put_bytes(b, p, n);
}

static void put_fixed_col(struct buf *b, sqlite3_stmt *st, int i)
{
    uint8_t id[STATEDB_ID_LEN];
    col_fixed(st, i, id, STATEDB_ID_LEN);
    buf_put(b, id, STATEDB_ID_LEN);
}

/* Appends the next record to s->pend (or moves to the next section). */
static int snap_gen(struct statedb_snapshot *s, struct pb_error *err)
{
    struct buf *b = &s->pend;
    size_t start = b->len;
    buf_put_u32(b, 0);
    if (s->section == SEC_HEADER) {
        buf_put_u8(b, 'H');
        buf_put(b, "PBSD", 4);
        buf_put_u32(b, STATEDB_SNAP_FORMAT);
        buf_put_u64(b, s->a.index);
        buf_put_u64(b, s->a.term);
        buf_put_u64(b, s->a.malformed);
        buf_put_u64(b, s->a.conflicts);
        buf_put_u64(b, s->a.duplicates);
        s->section = SEC_MANIFEST;
    } else if (s->section == SEC_END) {
        buf_put_u8(b, 'E');
        buf_put_u64(b, s->records);
        buf_put_u32(b, s->crc);
        s->section = SEC_DONE;
        pb_store_u32(b->data + start, (uint32_t)(b->len - start - 4));
        return 0;
    } else {
        sqlite3_stmt *st = s->st[s->section];
        int rc = sqlite3_step(st);
        if (rc == SQLITE_DONE) {
            b->len = start;
            s->section++;
            return 0;
        }
        if (rc != SQLITE_ROW) {
            b->len = start;
            return pb_error_set(err, store_sqlite_errno(rc) ? store_sqlite_errno(rc) : -EIO,
                                "state.db snapshot: %s", sqlite3_errmsg(s->db));
        }
        switch (s->section) {
        case SEC_MANIFEST:
            buf_put_u8(b, 'M');
            put_blob_col(b, st, 0);
            buf_put_u8(b, (uint8_t)sqlite3_column_int(st, 1));
            buf_put_u8(b, (uint8_t)sqlite3_column_int(st, 2));
            buf_put_u64(b, (uint64_t)sqlite3_column_int64(st, 3));
            buf_put_u64(b, (uint64_t)sqlite3_column_int64(st, 4));
            put_fixed_col(b, st, 5);
            buf_put_u32(b, (uint32_t)sqlite3_column_int64(st, 6));
            buf_put_u64(b, (uint64_t)sqlite3_column_int64(st, 7));
            buf_put_u64(b, (uint64_t)sqlite3_column_int64(st, 8));
            const unsigned char *origin = sqlite3_column_text(st, 9);
            buf_put_bytes(b, origin, (size_t)sqlite3_column_bytes(st, 9));
            if (sqlite3_column_type(st, 10) == SQLITE_NULL) {
                buf_put_u8(b, 0);
            } else {
                buf_put_u8(b, 1);
                put_blob_col(b, st, 10);
            }
            break;
        case SEC_CHUNKLIST:
            buf_put_u8(b, 'L');
            put_blob_col(b, st, 0);
            buf_put_u32(b, (uint32_t)sqlite3_column_int64(st, 1));
            put_fixed_col(b, st, 2);
            buf_put_u32(b, (uint32_t)sqlite3_column_int64(st, 3));
            break;
        case SEC_CHUNKS: /* metadata only: the bytes are node-local */
            buf_put_u8(b, 'C');
            put_fixed_col(b, st, 0);
            buf_put_u64(b, (uint64_t)sqlite3_column_int64(st, 1));
            buf_put_u32(b, (uint32_t)sqlite3_column_int64(st, 2));
            break;
        default:
            buf_put_u8(b, 'S');
            buf_put_u64(b, (uint64_t)sqlite3_column_int64(st, 0));
            buf_put_u64(b, (uint64_t)sqlite3_column_int64(st, 1));
            break;
        }
    }
    pb_store_u32(b->data + start, (uint32_t)(b->len - start - 4));
    s->records++;
    s->crc = pb_crc32c(s->crc, b->data + start, b->len - start);
    return 0;
}

static void snap_restart(struct statedb_snapshot *s)
{
    for (int i = SEC_MANIFEST; i <= SEC_SESSIONS; i++)
        sqlite3_reset(s->st[i]);
    s->section = SEC_HEADER;
    s->records = 0;
    s->crc = 0;
    buf_reset(&s->pend);
    s->pend_off = 0;
}

int statedb_snapshot_begin(struct statedb *db, struct statedb_snapshot **out, struct pb_error *err)
{
    struct statedb_snapshot *s = pb_xcalloc(1, sizeof(*s));
    *out = NULL;
    int rc = sqlite3_open_v2(db->path, &s->db, SQLITE_OPEN_READONLY | SQLITE_OPEN_NOMUTEX, NULL);
    int e = 0;
    if (rc != SQLITE_OK) {
        e = pb_error_set(err, -EIO, "state.db snapshot: open: %s", sqlite3_errstr(rc));
        goto fail;
    }
    sqlite3_busy_timeout(s->db, STATEDB_BUSY_MS);
    if ((e = sd_exec(s->db, "BEGIN", err)) < 0)
        goto fail;
    /* The first read fixes the snapshot the transaction sees. */
    sqlite3_stmt *st;
    rc = sqlite3_prepare_v2(s->db, statedb_sql[Q_APPLIED_GET], -1, &st, NULL);
    if (rc == SQLITE_OK && (rc = sqlite3_step(st)) == SQLITE_ROW) {
        s->a.index = (uint64_t)sqlite3_column_int64(st, 0);
        s->a.term = (uint64_t)sqlite3_column_int64(st, 1);
        s->a.malformed = (uint64_t)sqlite3_column_int64(st, 2);
        s->a.conflicts = (uint64_t)sqlite3_column_int64(st, 3);
        s->a.duplicates = (uint64_t)sqlite3_column_int64(st, 4);
        rc = SQLITE_OK;
    }
    sqlite3_finalize(st);
    if (rc != SQLITE_OK) {
        e = pb_error_set(err, -EIO, "state.db snapshot: read applied: %s", sqlite3_errstr(rc));
        goto fail;
    }
    for (int i = SEC_MANIFEST; i <= SEC_SESSIONS; i++) {
        rc = sqlite3_prepare_v2(s->db, snap_sql[i], -1, &s->st[i], NULL);
        if (rc != SQLITE_OK) {
            e = pb_error_set(err, -EIO, "state.db snapshot: %s", sqlite3_errmsg(s->db));
            goto fail;
        }
    }
    snap_restart(s);
    *out = s;
    return 0;
fail:
    statedb_snapshot_end(s);
    return e;
}

void statedb_snapshot_info(const struct statedb_snapshot *s, uint64_t *index, uint64_t *term)
{
    if (index != NULL)
        *index = s->a.index;
    if (term != NULL)
        *term = s->a.term;
}

int statedb_snapshot_read(struct statedb_snapshot *s, uint64_t offset, void *buf, size_t len,
                          size_t *n, struct pb_error *err)
{
    *n = 0;
    if (offset < s->pend_off)
        snap_restart(s);
    for (;;) {
        uint64_t end = s->pend_off + s->pend.len;
        if (end >= offset + len || s->section == SEC_DONE)
            break;
        if (end <= offset) { /* everything pending was consumed */
            s->pend_off = end;
            buf_reset(&s->pend);
        }
        int rc = snap_gen(s, err);
        if (rc < 0)
            return rc;
    }
    uint64_t end = s->pend_off + s->pend.len;
    if (offset >= end)
        return 0;
    size_t k = (size_t)PB_MIN((uint64_t)len, end - offset);
    memcpy(buf, s->pend.data + (offset - s->pend_off), k);
    *n = k;
    return 0;
}

void statedb_snapshot_end(struct statedb_snapshot *s)
{
    if (s == NULL)
        return;
    for (int i = 0; i < SEC_DONE; i++)
        sqlite3_finalize(s->st[i]);
    if (s->db != NULL) {
        sqlite3_exec(s->db, "ROLLBACK", NULL, NULL, NULL);
        sqlite3_close(s->db);
    }
    buf_free(&s->pend);
    free(s);
}

/* ---- snapshot: the receiver ---------------------------------------------- */

struct statedb_install {
    struct statedb *db;
    struct buf part; /* bytes of an incomplete record */
    bool have_header, have_end;
    uint32_t format; /* of the stream: STATEDB_SNAP_FORMAT, or 1 */
    int failed;      /* the first error: the stream cannot continue after it */
    struct statedb_applied a;
    uint64_t records;
    uint32_t crc;
    /* stage_manifest, stage_chunklist, stage_chunks, stage_sessions */
    sqlite3_stmt *ins[4];
};

static const char *const stage_sql[] = {
        "INSERT INTO stage_manifest VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
        "INSERT INTO stage_chunklist VALUES (?1, ?2, ?3, ?4)",
        "INSERT INTO stage_chunks VALUES (?1, ?2, ?3)",
        "INSERT INTO stage_sessions VALUES (?1, ?2)",
};

static const char stage_clear_sql[] = "DELETE FROM stage_manifest; DELETE FROM stage_chunklist;"
                                      "DELETE FROM stage_chunks; DELETE FROM stage_sessions;";

int statedb_install_begin(struct statedb *db, struct statedb_install **out, struct pb_error *err)
{
    *out = NULL;
    if (db->in_txn)
        return pb_error_set(err, -EBUSY, "state.db: install inside an apply transaction");
    int e = sd_exec(db->db, stage_clear_sql, err);
    if (e < 0)
        return e;
    struct statedb_install *in = pb_xcalloc(1, sizeof(*in));
    in->db = db;
    for (size_t i = 0; i < PB_ARRAY_SIZE(stage_sql); i++) {
        int rc = sqlite3_prepare_v2(db->db, stage_sql[i], -1, &in->ins[i], NULL);
        if (rc != SQLITE_OK) {
            e = pb_error_set(err, -EIO, "state.db: %s", sqlite3_errmsg(db->db));
            statedb_install_abort(in);
            return e;
        }
    }
    *out = in;
    return 0;
}

/* A string field that must be a path-like byte string (no NUL). */
static const uint8_t *take_path(struct cursor *c, size_t *n)
{
    const uint8_t *p = cursor_bytes(c, STATEDB_PATH_BYTES_MAX, n);
    if (p != NULL && memchr(p, 0, *n) != NULL) {
        cursor_fail(c);
        return NULL;
    }
    return p;
}

static int stage_step(struct statedb_install *in, sqlite3_stmt *st, struct pb_error *err)
{
    int rc = sqlite3_step(st);
    sqlite3_reset(st);
    sqlite3_clear_bindings(st);
    if (rc == SQLITE_DONE)
        return 0;
    if ((rc & 0xff) == SQLITE_CONSTRAINT)
        return pb_error_set(err, -EBADMSG, "snapshot: duplicate record (%s)",
                            sqlite3_errmsg(in->db->db));
    return pb_error_set(err, store_sqlite_errno(rc) ? store_sqlite_errno(rc) : -EIO,
                        "snapshot: staging: %s", sqlite3_errmsg(in->db->db));
}

/* Parses and stages one complete record (rec: tag + body). */
static int stage_record(struct statedb_install *in, const uint8_t *rec, size_t len,
                        struct pb_error *err)
{
    struct cursor c;
    cursor_init(&c, rec, len);
    uint8_t tag = cursor_u8(&c);
    if (in->have_end)
        return pb_error_set(err, -EBADMSG, "snapshot: bytes after the end record");
    if (!in->have_header && tag != 'H')
        return pb_error_set(err, -EBADMSG, "snapshot: does not start with a header");
    const uint8_t *p, *q;
    size_t n, m;
    sqlite3_stmt *st;
    switch (tag) {
    case 'H': {
        if (in->have_header)
            return pb_error_set(err, -EBADMSG, "snapshot: a second header");
        p = cursor_take(&c, 4);
        uint32_t fmt = cursor_u32(&c);
        in->a.index = cursor_u64(&c);
        in->a.term = cursor_u64(&c);
        in->a.malformed = cursor_u64(&c);
        in->a.conflicts = cursor_u64(&c);
        in->a.duplicates = cursor_u64(&c);
        if (!cursor_ok(&c) || cursor_remaining(&c) != 0 || memcmp(p, "PBSD", 4) != 0)
            return pb_error_set(err, -EBADMSG, "snapshot: bad header");
        if (fmt != STATEDB_SNAP_FORMAT && fmt != 1)
            return pb_error_set(err, -EPROTONOSUPPORT,
                                "snapshot stream has format %" PRIu32
                                ", this pickbox reads format %d",
                                fmt, STATEDB_SNAP_FORMAT);
        in->format = fmt;
        in->have_header = true;
        return 0;
    }
    case 'M': {
        st = in->ins[0];
        p = take_path(&c, &n);
        uint8_t kind = cursor_u8(&c), deleted = cursor_u8(&c);
        uint64_t version = cursor_u64(&c), cv = cursor_u64(&c);
        const uint8_t *content = cursor_take(&c, STATEDB_ID_LEN);
        uint32_t mode = cursor_u32(&c);
        uint64_t mtime = cursor_u64(&c), size = cursor_u64(&c);
        q = cursor_bytes(&c, STATEDB_NODE_MAX, &m);
        uint8_t has_target = cursor_u8(&c);
        size_t tn = 0;
        const uint8_t *t = has_target ? take_path(&c, &tn) : NULL;
        if (!cursor_ok(&c) || cursor_remaining(&c) != 0 || n == 0 || deleted > 1 || has_target > 1)
            return pb_error_set(err, -EBADMSG, "snapshot: bad manifest record");
        sqlite3_bind_blob(st, 1, p, (int)n, SQLITE_STATIC);
        sqlite3_bind_int(st, 2, kind);
        sqlite3_bind_int(st, 3, deleted);
        sqlite3_bind_int64(st, 4, (int64_t)version);
        sqlite3_bind_int64(st, 5, (int64_t)cv);
        sqlite3_bind_blob(st, 6, content, STATEDB_ID_LEN, SQLITE_STATIC);
        sqlite3_bind_int64(st, 7, mode);
        sqlite3_bind_int64(st, 8, (int64_t)mtime);
        sqlite3_bind_int64(st, 9, (int64_t)size);
        sqlite3_bind_text(st, 10, (const char *)q, (int)m, SQLITE_STATIC);
        if (has_target) {
            if (tn == 0)
                sqlite3_bind_zeroblob(st, 11, 0);
            else
                sqlite3_bind_blob(st, 11, t, (int)tn, SQLITE_STATIC);
        }
        break;
    }
    case 'L': {
        st = in->ins[1];
        p = take_path(&c, &n);
        uint32_t seq = cursor_u32(&c);
        q = cursor_take(&c, STATEDB_ID_LEN);
        uint32_t clen = cursor_u32(&c);
        if (!cursor_ok(&c) || cursor_remaining(&c) != 0 || n == 0)
            return pb_error_set(err, -EBADMSG, "snapshot: bad chunk-list record");
        sqlite3_bind_blob(st, 1, p, (int)n, SQLITE_STATIC);
        sqlite3_bind_int64(st, 2, seq);
        sqlite3_bind_blob(st, 3, q, STATEDB_ID_LEN, SQLITE_STATIC);
        sqlite3_bind_int64(st, 4, clen);
        break;
    }
    case 'C':
    case 'K': {
        st = in->ins[2];
        q = cursor_take(&c, STATEDB_ID_LEN);
        uint64_t keep = cursor_u64(&c);
        uint32_t clen;
        const uint8_t *bytes = NULL;
        if (in->format == 1 && tag == 'C') {
            /* format 1 carried the bytes */
            bytes = cursor_bytes(&c, STATEDB_SNAP_RECORD_MAX, &n);
            clen = (uint32_t)PB_MIN(n, (size_t)UINT32_MAX);
        } else {
            clen = cursor_u32(&c);
        }
        if ((tag == 'K' && in->format != 1) || !cursor_ok(&c) || cursor_remaining(&c) != 0 ||
            clen > STATEDB_CHUNK_MAX)
            return pb_error_set(err, -EBADMSG, "snapshot: bad chunk record");
        if (bytes != NULL) {
            /* Kept only if they hash to their id: node-local bytes are
             * trusted from then on. Stored ahead of their row, through the
             * packs (bytes without a row, like pushed ones); install_finish
             * drops the ones no row wants, so an aborted install leaves at
             * worst correct bytes, collected as never referenced. */
            uint8_t md[STATEDB_ID_LEN];
            if (EVP_Digest(bytes, clen, md, NULL, EVP_sha256(), NULL) != 1 ||
                memcmp(md, q, STATEDB_ID_LEN) != 0)
                return pb_error_set(err, -EBADMSG, "snapshot: chunk bytes do not match their id");
            int e = sd_data_add(in->db, q, bytes, clen, false);
            if (e < 0)
                return pb_error_set(err, e, "snapshot: %s", in->db->errmsg);
        }
        sqlite3_bind_blob(st, 1, q, STATEDB_ID_LEN, SQLITE_STATIC);
        sqlite3_bind_int64(st, 2, (int64_t)keep);
        sqlite3_bind_int64(st, 3, clen);
        break;
    }
    case 'S': {
        st = in->ins[3];
        uint64_t client = cursor_u64(&c), seq = cursor_u64(&c);
        if (!cursor_ok(&c) || cursor_remaining(&c) != 0)
            return pb_error_set(err, -EBADMSG, "snapshot: bad session record");
        sqlite3_bind_int64(st, 1, (int64_t)client);
        sqlite3_bind_int64(st, 2, (int64_t)seq);
        break;
    }
    case 'E': {
        uint64_t records = cursor_u64(&c);
        uint32_t crc = cursor_u32(&c);
        if (!cursor_ok(&c) || cursor_remaining(&c) != 0)
            return pb_error_set(err, -EBADMSG, "snapshot: bad end record");
        if (records != in->records || crc != in->crc)
            return pb_error_set(err, -EBADMSG,
                                "snapshot: end record says %" PRIu64 " records crc %08" PRIx32
                                ", received %" PRIu64 " records crc %08" PRIx32,
                                records, crc, in->records, in->crc);
        in->have_end = true;
        return 0;
    }
    default:
        return pb_error_set(err, -EBADMSG, "snapshot: unknown record type 0x%02x", tag);
    }
    return stage_step(in, st, err);
}

int statedb_install_write(struct statedb_install *in, const void *data, size_t len,
                          struct pb_error *err)
{
    struct statedb *db = in->db;
    const uint8_t *p = data;
    if (in->failed)
        return pb_error_set(err, in->failed, "snapshot: the stream already failed");
    if (db->in_txn)
        return pb_error_set(err, -EBUSY, "state.db: install inside an apply transaction");
    int e = sd_local_begin(db);
    if (e < 0)
        return pb_error_set(err, e, "%s", db->errmsg);
    while (len > 0 && e == 0) {
        /* Complete the record being assembled: length prefix first. */
        size_t need = 4;
        if (in->part.len >= 4) {
            uint32_t rl = pb_load_u32(in->part.data);
            if (rl == 0 || rl > STATEDB_SNAP_RECORD_MAX) {
                e = pb_error_set(err, -EBADMSG, "snapshot: record of %" PRIu32 " bytes", rl);
                break;
            }
            need = 4 + (size_t)rl;
        }
        size_t k = PB_MIN(need - in->part.len, len);
        buf_put(&in->part, p, k);
        p += k;
        len -= k;
        if (in->part.len < need || need == 4)
            continue;
        uint8_t tag = in->part.data[4];
        e = stage_record(in, in->part.data + 4, in->part.len - 4, err);
        if (e == 0 && tag != 'E') {
            in->records++;
            in->crc = pb_crc32c(in->crc, in->part.data, in->part.len);
        }
        buf_reset(&in->part);
    }
    if (e == 0 && (e = sd_local_commit(db)) < 0) /* rolled back */
        pb_error_set(err, e, "%s", db->errmsg);
    else if (e < 0)
        sd_local_rollback(db);
    if (e < 0)
        in->failed = e;
    return e;
}

int statedb_install_finish(struct statedb_install *in, uint64_t *index, uint64_t *term,
                           struct pb_error *err)
{
    struct statedb *db = in->db;
    if (in->failed)
        return pb_error_set(err, in->failed, "snapshot: the stream already failed");
    if (!in->have_end || in->part.len != 0)
        return pb_error_set(err, -EBADMSG, "snapshot: stream ends before its end record");
    int e = statedb_begin(db);
    if (e < 0)
        return pb_error_set(err, e, "%s", db->errmsg);
    /* The replicated tables become the staged ones. Chunk rows: those not
     * in the snapshot go (with their bytes, trigger chunks_gone), those in
     * both keep their bytes (if this node has them), new ones come without
     * bytes (the fetcher gets them from peers); refs are recounted by the
     * chunk-list triggers. */
    int rc = sqlite3_exec(db->db,
                          "DELETE FROM chunklist; DELETE FROM manifest; DELETE FROM sessions;"
                          "DELETE FROM chunks WHERE id NOT IN (SELECT id FROM stage_chunks);"
                          "UPDATE chunks SET refs = 0, (keep_until, len) ="
                          " (SELECT keep_until, len FROM stage_chunks s WHERE s.id = chunks.id);"
                          "DELETE FROM chunk_data WHERE id IN (SELECT c.id FROM chunks c"
                          " JOIN chunk_data d ON d.id = c.id WHERE d.len != c.len);"
                          "INSERT INTO chunks (id, refs, keep_until, len)"
                          " SELECT id, 0, keep_until, len FROM stage_chunks"
                          " WHERE id NOT IN (SELECT id FROM chunks);"
                          "INSERT INTO manifest SELECT * FROM stage_manifest;"
                          "INSERT INTO chunklist SELECT * FROM stage_chunklist;"
                          "INSERT INTO sessions SELECT * FROM stage_sessions;",
                          NULL, NULL, NULL);
    if (rc != SQLITE_OK) {
        if ((rc & 0xff) == SQLITE_CONSTRAINT)
            e = pb_error_set(err, -EBADMSG, "snapshot: inconsistent: %s", sqlite3_errmsg(db->db));
        else
            e = pb_error_set(err, store_sqlite_errno(rc) ? store_sqlite_errno(rc) : -EIO,
                             "snapshot: install: %s", sqlite3_errmsg(db->db));
        statedb_rollback(db);
        return e;
    }
    if ((e = statedb_applied_set(db, &in->a)) < 0) {
        statedb_rollback(db);
        return pb_error_set(err, e, "%s", db->errmsg);
    }
    if ((e = sd_exec(db->db, stage_clear_sql, err)) < 0) {
        statedb_rollback(db);
        return e;
    }
    if ((e = statedb_commit(db)) < 0)
        return pb_error_set(err, e, "%s", db->errmsg);
    if (index != NULL)
        *index = in->a.index;
    if (term != NULL)
        *term = in->a.term;
    log_info("state.db: installed snapshot at index %" PRIu64 " term %" PRIu64 " (%" PRIu64
             " records)",
             in->a.index, in->a.term, in->records);
    return 0;
}

void statedb_install_abort(struct statedb_install *in)
{
    if (in == NULL)
        return;
    for (size_t i = 0; i < PB_ARRAY_SIZE(in->ins); i++)
        sqlite3_finalize(in->ins[i]);
    sqlite3_exec(in->db->db, stage_clear_sql, NULL, NULL, NULL);
    buf_free(&in->part);
    free(in);
}

/*
 * pack.h: append-only pack files holding state.db's chunk bytes (format 3,
 * doc/decisions.md D14). Internal to src/store: statedb.c is the only user;
 * the index (which chunk is where) lives in state.db's chunk_data table.
 *
 * A pack set is one directory (STATE_DIR/chunks) of files NNNNNNNN.pack.
 * The writer appends at the current pack's tail (each chunk starts at a
 * PACK_ALIGN boundary, so freeing a chunk can give its blocks back with a
 * hole punch), starts a new pack when the current one passes
 * PACK_ROLL_BYTES, and makes what it appended durable with pack_sync()
 * before the state.db transaction that indexes it commits. pack_mark() /
 * pack_rewind() bracket a transaction: a rollback cuts the bytes appended
 * since the mark. Reads go through a small per-set cache of descriptors.
 *
 * Errors: 0 or a negative errno. Threading: a set is used by one thread at
 * a time (each statedb handle has its own).
 */
#ifndef PICKBOX_STORE_PACK_H
#define PICKBOX_STORE_PACK_H

#include <stdbool.h>
#include <stdint.h>

#define PACK_DIR_NAME   "chunks"
#define PACK_ALIGN      4096u
#define PACK_ROLL_BYTES (1024ull * 1024u * 1024u)

struct pack_set;

/* The pack directory for the state.db at db_path (malloc'ed): "chunks"
 * beside a file named state.db, else db_path + ".chunks". */
char *pack_dir_for(const char *db_path);
/* Opens the set in dir. writer: creates dir (0700, parent fsync'ed) if
 * missing and may write; else read-only (a missing dir reads as no packs).
 * *out is the caller's (pack_set_close). */
int pack_set_open(const char *dir, bool writer, struct pack_set **out);
void pack_set_close(struct pack_set *ps);
/* Test hook: packs roll over past roll bytes instead of PACK_ROLL_BYTES. */
void pack_set_roll_bytes(struct pack_set *ps, uint64_t roll);
/* Test hook (process-wide): fn runs after every hole punched (NULL: none). */
void pack_test_after_punch(void (*fn)(void));
/* Test hook (process-wide): the next n appends (write_err) or syncs
 * (sync_err) fail with that -errno, an append after writing half its bytes. */
void pack_test_fail(int write_err, int sync_err, unsigned n);

/* Calls fn(arg, pack, size) for every pack file of the directory, in
 * number order; stops at fn's nonzero (returned). */
int pack_foreach(struct pack_set *ps, int (*fn)(void *arg, uint32_t pack, uint64_t size),
                 void *arg);
/* Writer: the packs the index knows end where they are: the current pack
 * becomes the highest-numbered existing one (a new one past `above` if none
 * or it is full). Call after the open-time cleanup. */
int pack_start(struct pack_set *ps, uint32_t above);
/* *size gets pack's length; -ENOENT if there is no such pack. */
int pack_size(struct pack_set *ps, uint32_t pack, uint64_t *size);
/* Writer: cuts pack to size bytes (bytes never indexed), or removes it. */
int pack_truncate(struct pack_set *ps, uint32_t pack, uint64_t size);
int pack_unlink(struct pack_set *ps, uint32_t pack);
/* Writer: the current pack (its bytes are never unlinked). */
uint32_t pack_current(const struct pack_set *ps);

/* Writer: appends len bytes; *pack and *off get where they are. */
int pack_append(struct pack_set *ps, const void *data, uint32_t len, uint32_t *pack, uint64_t *off);
/* Writer: true if bytes were appended since the last pack_sync(). */
bool pack_dirty(const struct pack_set *ps);
/* Writer: fdatasync every pack appended to since the last sync (and the
 * directory after a new pack was created). */
int pack_sync(struct pack_set *ps);
/* Writer: remembers the tail; pack_rewind() cuts everything appended after
 * the last mark (new packs are removed). */
void pack_mark(struct pack_set *ps);
void pack_rewind(struct pack_set *ps);
/* Writer: gives a freed range back to the filesystem (hole punch; a pack
 * that no longer exists is fine). */
int pack_punch(struct pack_set *ps, uint32_t pack, uint64_t off, uint32_t len);

/* Reads len bytes at off of pack into buf (-ENODATA if the pack is
 * shorter, -ENOENT if there is no such pack). */
int pack_read(struct pack_set *ps, uint32_t pack, uint64_t off, void *buf, uint32_t len);
/* Copies len bytes at off of pack to out_fd at its current offset
 * (copy_file_range, falling back to pread + write); errors as pack_read. */
int pack_copy(struct pack_set *ps, uint32_t pack, uint64_t off, uint32_t len, int out_fd);

#endif

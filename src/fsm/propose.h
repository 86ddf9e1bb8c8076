/*
 * propose.h: building the ops that propose a local file's content.
 *
 * The watcher found that a file in the tree differs from the index; this
 * reads it once, cuts it into content-defined chunks, and produces the PUT
 * that carries the chunk list and the bytes of the chunks the cluster lacks.
 * A file whose new bytes do not fit in one log entry is proposed as CHUNKS
 * ops (each at most the caller's carry_max of chunk bytes) followed by the
 * PUT. The file is read in slices (fsm_propose_step), so a caller on an
 * event loop bounds both the time of one turn and, by stepping only when
 * what it emitted so far has drained, the memory: the proposal itself holds
 * one read block, the chunk list (36 bytes per ~64 KiB of file) and at most
 * carry_max carried bytes, whatever the file's size. A file that changes
 * while it is read is not proposed (-EAGAIN): the watcher tries again once
 * it is quiet (Syncthing's "file changed during hashing"); CHUNKS ops
 * already emitted for it are then merely unreferenced bytes.
 *
 * Note for the store: the chunks of a CHUNKS op are referenced only by a PUT
 * committed after it; they must not be collected as unreferenced before that
 * PUT had its chance (e.g. keep them until the applied index has moved a
 * bounded number of entries past them).
 */
#ifndef PICKBOX_FSM_PROPOSE_H
#define PICKBOX_FSM_PROPOSE_H

#include <stdint.h>

#include "fsm/op.h"
#include "fsm/tree.h"

/* Above this many carried bytes, they go out in a CHUNKS op of their own. */
#define FSM_PROPOSE_CARRY_MAX (16u * 1024u * 1024u)

/* 1 if the cluster lacks chunk id (its bytes must travel), 0 if it has it,
 * or a negative errno. */
typedef int (*fsm_lacks_fn)(void *arg, const uint8_t id[FSM_CHUNK_ID_LEN]);

/* Receives one op to propose (CHUNKS ops first, the PUT last). The op is
 * borrowed: it is freed after the call; encode or copy it. Returns 0 or a
 * negative errno, which stops the build. */
typedef int (*fsm_emit_fn)(void *arg, const struct fsm_op *op);

/* A file being proposed, one slice at a time (opaque). */
struct fsm_propose;

/*
 * Starts proposing the regular file at path in t: base is the version of
 * path the node had applied when it saw the change, origin the node id.
 * CHUNKS ops carry at most carry_max bytes of chunks each (0: the default
 * FSM_PROPOSE_CARRY_MAX). lacks, emit and arg are kept and called from
 * fsm_propose_step(); t must outlive *out. Returns 0 and *out (free it with
 * fsm_propose_free); -EINVAL if path is not a regular file; -EAGAIN if it
 * is being replaced; or -errno.
 */
int fsm_propose_begin(struct fsm_tree *t, const char *path, const char *origin, uint64_t base,
                      uint64_t carry_max, fsm_lacks_fn lacks, fsm_emit_fn emit, void *arg,
                      struct fsm_propose **out);

/*
 * Reads, chunks and hashes about max_bytes more of the file (whole read
 * blocks, at least one), emitting a CHUNKS op whenever carry_max bytes are
 * carried. At end of file, if the file is unchanged since begin (same
 * inode at the name, size, mtime, and that many bytes read), emits the PUT
 * with the full chunk list (and the last carried bytes when they fit) and
 * fills *st (may be NULL) with the stat of the content proposed.
 * After each slice the file is checked again (its fd and its name), so a
 * file rewritten, replaced or removed meanwhile stops early.
 * Returns 1 (more to read: call again), 0 (PUT emitted), -EAGAIN (the file
 * changed: nothing more is emitted, propose it again later), -EFBIG (its
 * chunk list does not fit in one op), lacks()'s or emit()'s error, or
 * -errno. After anything but 1, only fsm_propose_free() may follow.
 */
int fsm_propose_step(struct fsm_propose *p, uint64_t max_bytes, struct fsm_tree_stat *st);

/* Bytes of the file read so far. */
uint64_t fsm_propose_offset(const struct fsm_propose *p);

/* Bytes of chunk data emitted so far (in CHUNKS ops and the PUT). */
uint64_t fsm_propose_carried(const struct fsm_propose *p);

/* Closes the file and frees p (NULL is fine). */
void fsm_propose_free(struct fsm_propose *p);

#endif

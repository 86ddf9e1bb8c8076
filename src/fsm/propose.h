/*
 * propose.h: building the ops that propose a local file's content.
 *
 * The watcher found that a file in the tree differs from the index; this
 * reads it once, cuts it into content-defined chunks, and produces the PUT
 * that carries the chunk list and the bytes of the chunks the cluster lacks.
 * A file whose new bytes do not fit in one log entry is proposed as CHUNKS
 * ops (each well under FSM_OP_MAX_BYTES) followed by the PUT; the ops are
 * handed out one at a time, so memory stays bounded by one op whatever the
 * file's size. A file that changes while it is read is not proposed
 * (-EAGAIN): the watcher tries again once it is quiet (Syncthing's "file
 * changed during hashing").
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

/*
 * Proposes the regular file at path in t as of now: base is the version of
 * path the node had applied when it saw the change, origin the node id.
 * *st (may be NULL) gets the stat of the content proposed, to record as what
 * the tree holds at path. Returns 0; -EINVAL if path is not a regular file;
 * -EAGAIN if it changed while being read; -EFBIG if its chunk list does not
 * fit in one op; lacks()'s or emit()'s error; or -errno.
 */
int fsm_propose_put(struct fsm_tree *t, const char *path, const char *origin, uint64_t base,
                    fsm_lacks_fn lacks, fsm_emit_fn emit, void *arg, struct fsm_tree_stat *st);

#endif

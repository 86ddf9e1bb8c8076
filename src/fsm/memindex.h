/*
 * memindex.h: an in-memory index for fsm_decide(), and the reference
 * application of a decision to an index.
 *
 * This is what state.db's apply transaction must do, written as plainly as
 * possible: the unit tests of the conflict rules and the cluster simulator run
 * against it, and the SQLite implementation can be checked against it op by
 * op. Lookups are linear: it is meant for tests, not for large trees.
 */
#ifndef PICKBOX_FSM_MEMINDEX_H
#define PICKBOX_FSM_MEMINDEX_H

#include <stdint.h>

#include "fsm/fsm.h"
#include "lib/buf.h"

struct fsm_memindex;

struct fsm_memindex *fsm_memindex_new(void);
void fsm_memindex_free(struct fsm_memindex *m);

/* Fills ix with callbacks reading m (valid while m lives). */
void fsm_memindex_bind(struct fsm_memindex *m, struct fsm_index *ix);

/* Applies decision d, made by fsm_decide() for op at log index `index`, to m:
 * rows, versions, origins and carried chunks (see struct fsm_action). */
void fsm_memindex_apply(struct fsm_memindex *m, const struct fsm_op *op, uint64_t index,
                        const struct fsm_decision *d);

/* Decides and applies op at index (a BATCH op by op, CHUNKS by storing its
 * chunks). *last (may be NULL) gets the decision of the last op (the caller
 * frees it). Returns fsm_decide()'s error, else 0. */
int fsm_memindex_step(struct fsm_memindex *m, const struct fsm_op *op, uint64_t index,
                      struct fsm_decision *last);

/* Appends a canonical text of every row (sorted by path, one per line:
 * "path kind version content_version deleted mode origin content-hash") to
 * out: equal texts mean equal indexes. */
void fsm_memindex_dump(const struct fsm_memindex *m, struct buf *out);

#endif

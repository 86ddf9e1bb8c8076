/*
 * propose_file.h: a test helper shared by the fsm Check suites: proposes a
 * file of a tree the way the daemon's replica does, through
 * fsm_propose_begin() and fsm_propose_step() in bounded slices (so the
 * recheck between slices runs too), until the PUT or an error.
 */
#ifndef PICKBOX_TESTS_PROPOSE_FILE_H
#define PICKBOX_TESTS_PROPOSE_FILE_H

#include "fsm/propose.h"

/* Bytes read per fsm_propose_step() call. */
#define PROPOSE_FILE_SLICE (1u << 20)

/* Proposes path of t with the default carry_max; lacks, emit and arg as for
 * fsm_propose_begin(). Returns fsm_propose_begin()'s error, or the last
 * fsm_propose_step()'s result (0: the PUT was emitted and *st, may be NULL,
 * filled). */
static inline int propose_file(struct fsm_tree *t, const char *path, const char *origin,
                               uint64_t base, fsm_lacks_fn lacks, fsm_emit_fn emit, void *arg,
                               struct fsm_tree_stat *st)
{
    struct fsm_propose *p;
    int rc = fsm_propose_begin(t, path, origin, base, 0, lacks, emit, arg, &p);
    if (rc < 0)
        return rc;
    while ((rc = fsm_propose_step(p, PROPOSE_FILE_SLICE, st)) == 1)
        ;
    fsm_propose_free(p);
    return rc;
}

#endif

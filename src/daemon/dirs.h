/*
 * dirs.h: the directories pickboxd needs before it can run.
 */
#ifndef PICKBOX_DAEMON_DIRS_H
#define PICKBOX_DAEMON_DIRS_H

#include "lib/error.h"

struct pb_config;

/*
 * Creates, when missing: the tree (data_dir, 0755, with missing parents), its
 * root marker <data_dir>/.pickbox (0700) and the state dir (0700, missing
 * parents 0755). An existing path that is not a directory is an error. A
 * state dir that others can write to is refused (it will hold the cluster
 * secret and the Raft log). Returns 0 or a negative errno with err filled.
 */
int dirs_prepare(const struct pb_config *cfg, struct pb_error *err);

#endif

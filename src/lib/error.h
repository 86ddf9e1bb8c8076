/*
 * error.h: the one error idiom of the tree.
 *
 * Functions return 0 on success or a negative errno-style code (-EINVAL,
 * -ENOSPC, ...). Where a caller needs to tell a person what went wrong
 * (config files, peers, control requests), the function also takes a
 * struct pb_error and fills it with one human-readable line. The code and the
 * message always agree: pb_error_set() stores both and returns the code, so
 * `return pb_error_set(err, -EINVAL, "...")` is the usual form.
 */
#ifndef PICKBOX_LIB_ERROR_H
#define PICKBOX_LIB_ERROR_H

#include "lib/log.h"

struct pb_error {
    int code;      /* negative errno, 0 when no error was recorded */
    char msg[512]; /* one line, no trailing newline */
};

/* Resets err (may be NULL). */
void pb_error_clear(struct pb_error *err);

/* Records code and a formatted message in err (may be NULL) and returns code.
 * A later call overwrites an earlier one. */
int pb_error_set(struct pb_error *err, int code, const char *fmt, ...) PB_PRINTF(3, 4);

/* Prefixes the recorded message with a formatted context ("file:3: " + msg). */
void pb_error_prefix(struct pb_error *err, const char *fmt, ...) PB_PRINTF(2, 3);

#endif

/*
 * secret.h: the shared cluster secret that authenticates peer links.
 *
 * The secret is a file holding at least NET_SECRET_MIN bytes of text (a
 * trailing newline is not part of it); pickboxd generates one (32 random
 * bytes as 64 hex digits, mode 0600) when it bootstraps a new cluster and no
 * file exists. Every node of a cluster needs the same file.
 */
#ifndef PICKBOX_DAEMON_SECRET_H
#define PICKBOX_DAEMON_SECRET_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "lib/error.h"

#define SECRET_GEN_BYTES 32 /* random bytes in a generated secret */

/* Reads the secret from path into *out (caller frees) and *len. -ENOENT when
 * the file does not exist; -EINVAL (err filled) when it is too short or too
 * long, or readable by others than its owner's group (a warning only); other
 * negative errno on I/O errors. */
int secret_load(const char *path, uint8_t **out, size_t *len, struct pb_error *err);

/* Creates path (O_EXCL, mode 0600) holding a new random secret and loads it
 * into *out / *len like secret_load(). -EEXIST if the file exists. */
int secret_generate(const char *path, uint8_t **out, size_t *len, struct pb_error *err);

#endif

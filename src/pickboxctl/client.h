/*
 * client.h: pickboxctl's side of the control protocol (DESIGN.md section 8,
 * src/ctl/ctl.h): find the socket, connect, send one request line, read one
 * reply line within a deadline and check its shape.
 *
 * Threading: none; blocking calls bounded by the caller's timeout.
 */
#ifndef PICKBOX_PICKBOXCTL_CLIENT_H
#define PICKBOX_PICKBOXCTL_CLIENT_H

#include <jansson.h>

#include "lib/error.h"

/* Where the system units put control sockets: /run/pickbox/<node>/control.sock.
 * This is systemd's /run (the %t of system units), not the configure prefix. */
#define PBCTL_RUN_DIR "/run/pickbox"

/*
 * Chooses the control socket: socket_opt (-s) if given, else
 * <run_dir>/<node_opt>/control.sock (-n), else env_socket ($PICKBOX_SOCKET) if
 * non-empty, else the only <run_dir>/ * /control.sock that exists. Any of the
 * inputs may be NULL. On success *path is a new string (free() it). Returns 0,
 * or -EINVAL with a one-line usage message in err (both -s and -n, a bad node
 * name, no socket found, several found).
 */
int pbctl_socket_resolve(const char *socket_opt, const char *node_opt, const char *env_socket,
                         const char *run_dir, char **path, struct pb_error *err);

/*
 * Connects to the Unix stream socket at path, waiting at most timeout_ms
 * (0: no limit) while the daemon's listen backlog is full. Returns the fd
 * (close-on-exec), or a negative errno with err set to
 * "cannot connect to PATH: <strerror> (is pickboxd@NODE running?)"
 * (NODE is taken from a <run_dir>/NODE/control.sock path; otherwise the hint
 * is "is pickboxd running?"), or -ETIMEDOUT. run_dir may be NULL for
 * PBCTL_RUN_DIR.
 */
int pbctl_connect(const char *path, const char *run_dir, int timeout_ms, struct pb_error *err);

/*
 * Sends {"id":1,"method":method,"params":params} on fd (params borrowed; NULL
 * sends {}) and reads one reply line, waiting at most timeout_ms in total.
 * On success returns 0 and *reply is the reply object (caller json_decref()s),
 * which has "id":1 and exactly one of "result" (an object) or "error" (an
 * object with string "code" and "message"). Otherwise returns a negative errno
 * and err says what went wrong: -ETIMEDOUT, -ECONNRESET (closed before a full
 * line), -EMSGSIZE (line over CTL_MAX_LINE), -EBADMSG (not a valid reply).
 * fd is not closed.
 */
int pbctl_request(int fd, const char *method, const json_t *params, int timeout_ms, json_t **reply,
                  struct pb_error *err);

#endif

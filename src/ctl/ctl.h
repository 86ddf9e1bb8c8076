/*
 * ctl.h: the control socket server (DESIGN.md section 8).
 *
 * A Unix stream socket carrying one compact JSON object per line (NDJSON),
 * at most CTL_MAX_LINE bytes per line. A request is
 *     {"id":1,"method":"status","params":{}}
 * and gets exactly one reply line,
 *     {"id":1,"result":{...}}   or
 *     {"id":1,"error":{"code":"NOT_LEADER","message":"...","data":{...}}}
 * with the stable string codes below. "id" is echoed as given (any JSON
 * scalar, or null when absent or when the line was not a usable request);
 * "params" is optional and must be an object (null counts as {}). Other
 * top-level members are refused (BAD_REQUEST), so that a typo such as
 * "parms" is not silently ignored. Duplicate keys are refused. A trailing
 * "\r" is ignored and blank lines get no reply. When a client half-closes
 * (shutdown(SHUT_WR)), what it sent is answered, a last line without "\n"
 * included, and then the connection is closed.
 *
 * The server owns framing, limits and dispatch; the daemon registers a table
 * of methods and answers each request by calling ctl_reply_result() or
 * ctl_reply_error() exactly once, either inside the handler or later (for a
 * request that waits for a commit). Requests on one connection are answered
 * in order: the next line is not dispatched until the current request is
 * answered (meanwhile input is only buffered, up to CTL_MAX_LINE, so that a
 * client hanging up is noticed). A client that does not read its replies
 * makes the server stop reading from it once several MiB of replies wait.
 *
 * Bad input never stops the server: malformed JSON, a non-object, a missing
 * method or bad params get an error reply and the connection stays usable; a
 * line over CTL_MAX_LINE (also endless garbage without a newline) gets a
 * BAD_REQUEST reply and is disconnected; a client idle past its timeout
 * (between requests, or not reading a reply) is disconnected; a client beyond
 * the connection limit gets one BUSY line and is closed; when accept() runs
 * out of descriptors the listener pauses briefly instead of spinning. Other
 * clients are unaffected.
 *
 * Threading: everything runs on the event loop thread of the base given.
 */
#ifndef PICKBOX_CTL_CTL_H
#define PICKBOX_CTL_CTL_H

#include <stdbool.h>
#include <stddef.h>
#include <sys/types.h>

#include <jansson.h>

struct event_base;
struct ctl_server;
struct ctl_request;

#define CTL_MAX_LINE         (1024 * 1024)
#define CTL_PROTOCOL_VERSION 1

/* Stable error codes (the "code" member of an error reply). */
#define CTL_ERR_BAD_REQUEST       "BAD_REQUEST"
#define CTL_ERR_UNKNOWN_METHOD    "UNKNOWN_METHOD"
#define CTL_ERR_INVALID_PARAMS    "INVALID_PARAMS"
#define CTL_ERR_PERMISSION_DENIED "PERMISSION_DENIED"
#define CTL_ERR_NOT_LEADER        "NOT_LEADER"
#define CTL_ERR_NO_QUORUM         "NO_QUORUM"
#define CTL_ERR_TIMEOUT           "TIMEOUT"
#define CTL_ERR_BUSY              "BUSY"
#define CTL_ERR_UNAVAILABLE       "UNAVAILABLE"
#define CTL_ERR_INTERNAL          "INTERNAL"

/* Method flags. */
#define CTL_METHOD_MUTATING 0x1u /* changes the cluster: peer must be privileged */

/*
 * A method handler. params is the request's "params" object (an empty object
 * when absent), borrowed for the duration of the call; take a reference
 * (json_incref) to keep it. arg is the server's user pointer.
 */
typedef void (*ctl_handler_fn)(struct ctl_request *req, json_t *params, void *arg);

struct ctl_method {
    const char *name;
    ctl_handler_fn handler;
    unsigned flags;
};

struct ctl_options {
    size_t max_clients;      /* connections beyond this are closed at once; 0 = 512 */
    unsigned idle_timeout_s; /* close a client silent this long; 0 = 60 */
};

/*
 * Creates a server dispatching to methods (an array of n entries, borrowed:
 * it must outlive the server). opts may be NULL for defaults. Listens on
 * nothing until ctl_server_listen_*() is called. Never returns NULL.
 */
struct ctl_server *ctl_server_new(struct event_base *base, const struct ctl_method *methods,
                                  size_t n, void *arg, const struct ctl_options *opts);

/* Serves on an already-listening Unix stream socket (from systemd). On
 * success the server owns fd (closed by ctl_server_free(); a socket file
 * behind it is left alone); on failure fd stays the caller's. A server has
 * one listener: a second listen call fails with -EBUSY. Returns 0 or a
 * negative errno. */
int ctl_server_listen_fd(struct ctl_server *srv, int fd);

/* Binds and listens on path with the given mode (e.g. 0660), set before
 * listen() so that nobody connects under a laxer mode. A stale socket file
 * (nobody accepting) is replaced; a live one is refused with -EADDRINUSE; a
 * path that exists but is not a socket is left alone (-EEXIST); a path too
 * long for sun_path is -ENAMETOOLONG. The file is removed again by
 * ctl_server_free() if it is still the one we bound. Returns 0 or negative
 * errno. */
int ctl_server_listen_path(struct ctl_server *srv, const char *path, mode_t mode);

/* Closes listeners and connections; requests still pending become orphans
 * whose replies are dropped (their memory is freed when they are answered).
 * NULL is allowed. Must not be called from inside a method handler. */
void ctl_server_free(struct ctl_server *srv);

/* Number of connected clients (for status and tests). */
size_t ctl_server_clients(const struct ctl_server *srv);

/* Answers req with a result (reference stolen; NULL means {}) and frees req.
 * May be called inside the handler or later from any event callback; if the
 * client is gone the reply is dropped. A result that cannot be encoded is
 * answered with INTERNAL instead. */
void ctl_reply_result(struct ctl_request *req, json_t *result);

/* Answers req with an error: code is one of CTL_ERR_*, data (reference
 * stolen) may be NULL, the message is formatted. Frees req. */
void ctl_reply_error(struct ctl_request *req, const char *code, json_t *data, const char *fmt, ...)
        __attribute__((format(printf, 4, 5)));

/* The method name of req (valid until it is answered). */
const char *ctl_request_method(const struct ctl_request *req);

/* Credentials of the client that sent req (SO_PEERCRED, taken at connect;
 * uid (uid_t)-1 and pid 0 when the kernel would not tell). */
uid_t ctl_request_uid(const struct ctl_request *req);
pid_t ctl_request_pid(const struct ctl_request *req);

/* True when the client may call CTL_METHOD_MUTATING methods: it is root, the
 * daemon's effective user, or has the daemon's effective group as its
 * primary or a supplementary group (SO_PEERGROUPS). */
bool ctl_request_privileged(const struct ctl_request *req);

/* True while the client that sent req is still connected. */
bool ctl_request_connected(const struct ctl_request *req);

#endif

/*
 * check_ctl.c: unit tests for src/ctl, the control socket server.
 *
 * Each test runs a real ctl_server on a socket in a private temp dir and
 * talks to it through ordinary client sockets, driving the event loop by hand
 * (EVLOOP_NONBLOCK) while it waits for replies, always against a deadline.
 */
#include "config.h"

#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <event2/event.h>
#include <jansson.h>

#include "ctl/ctl.h"
#include "lib/util.h"

#define WAIT_MS 5000 /* generous deadline for anything that should happen */

/* ---- fixture ----------------------------------------------------------- */

static struct event_base *base;
static struct ctl_server *srv;
static char dir[64];
static char sock_path[128];

/* What the test handlers saw. */
static struct ctl_request *held; /* a request the "later" handler keeps */
static int handler_calls;
static struct event *reply_timer; /* answers held from the loop */

static void method_echo(struct ctl_request *req, json_t *params, void *arg)
{
    (void)arg;
    handler_calls++;
    ctl_reply_result(req, json_incref(params));
}

static void method_later(struct ctl_request *req, json_t *params, void *arg)
{
    (void)params;
    (void)arg;
    handler_calls++;
    ck_assert_ptr_null(held);
    held = req;
}

static void method_mut(struct ctl_request *req, json_t *params, void *arg)
{
    (void)params;
    (void)arg;
    handler_calls++;
    ctl_reply_result(req, json_pack("{s:b}", "done", 1));
}

static void method_whoami(struct ctl_request *req, json_t *params, void *arg)
{
    (void)params;
    (void)arg;
    handler_calls++;
    ctl_reply_result(req,
                     json_pack("{s:I,s:I,s:b,s:s}", "uid", (json_int_t)ctl_request_uid(req), "pid",
                               (json_int_t)ctl_request_pid(req), "privileged",
                               ctl_request_privileged(req), "method", ctl_request_method(req)));
}

static void method_fail(struct ctl_request *req, json_t *params, void *arg)
{
    (void)params;
    (void)arg;
    handler_calls++;
    ctl_reply_error(req, CTL_ERR_NOT_LEADER, json_pack("{s:s}", "leader", "n2"),
                    "this node is a follower of %s", "n2");
}

/* Replies that cannot be sent as they are: an error message that is not
 * UTF-8, and a result jansson cannot encode. */
static void method_badbytes(struct ctl_request *req, json_t *params, void *arg)
{
    (void)arg;
    handler_calls++;
    if (json_object_get(params, "result") != NULL)
        ctl_reply_result(req, json_pack("{s:o}", "s", json_string_nocheck("\xff\xfe")));
    else
        ctl_reply_error(req, CTL_ERR_UNAVAILABLE, NULL, "cannot open %s", "/tree/\xff.txt");
}

static const struct ctl_method test_methods[] = {
        {"echo", method_echo, 0},
        {"later", method_later, 0},
        {"mut", method_mut, CTL_METHOD_MUTATING},
        {"whoami", method_whoami, 0},
        {"fail", method_fail, 0},
        {"badbytes", method_badbytes, 0},
};

static void reply_timer_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    (void)arg;
    struct ctl_request *req = held;
    held = NULL;
    ck_assert_ptr_nonnull(req);
    ctl_reply_result(req, json_pack("{s:s}", "answered", "later"));
}

static void server_start(const struct ctl_options *opts, mode_t mode)
{
    srv = ctl_server_new(base, test_methods, PB_ARRAY_SIZE(test_methods), NULL, opts);
    ck_assert_ptr_nonnull(srv);
    ck_assert_int_eq(ctl_server_listen_path(srv, sock_path, mode), 0);
}

static void setup(void)
{
    signal(SIGPIPE, SIG_IGN);
    base = event_base_new();
    ck_assert_ptr_nonnull(base);
    snprintf(dir, sizeof(dir), "/tmp/check_ctl.XXXXXX");
    ck_assert_ptr_nonnull(mkdtemp(dir));
    snprintf(sock_path, sizeof(sock_path), "%s/ctl.sock", dir);
    held = NULL;
    handler_calls = 0;
    reply_timer = evtimer_new(base, reply_timer_cb, NULL);
    srv = NULL;
}

static void teardown(void)
{
    ctl_server_free(srv);
    if (held != NULL)
        ctl_reply_result(held, NULL); /* an orphan: must be freed quietly */
    event_free(reply_timer);
    event_base_free(base);
    unlink(sock_path);
    rmdir(dir);
}

/* ---- client helpers ---------------------------------------------------- */

static void sun_set(struct sockaddr_un *sun, const char *path)
{
    size_t n = strlen(path);
    ck_assert_uint_lt(n, sizeof(sun->sun_path));
    memcpy(sun->sun_path, path, n + 1);
}

struct client {
    int fd;
    char *buf; /* grows: a reply may be as long as a maximal line */
    size_t len, cap;
    bool eof;
};

static void pump(void)
{
    event_base_loop(base, EVLOOP_NONBLOCK);
}

static struct client *client_open(void)
{
    struct client *c = pb_xcalloc(1, sizeof(*c));
    c->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    ck_assert_int_ge(c->fd, 0);
    struct sockaddr_un sun = {.sun_family = AF_UNIX};
    sun_set(&sun, sock_path);
    ck_assert_int_eq(connect(c->fd, (struct sockaddr *)&sun, sizeof(sun)), 0);
    ck_assert_int_eq(fcntl(c->fd, F_SETFL, O_NONBLOCK), 0);
    return c;
}

static void client_close(struct client *c)
{
    if (c == NULL)
        return;
    close(c->fd);
    free(c->buf);
    free(c);
}

/* Sends everything, running the loop while the socket buffer is full. */
static void client_send(struct client *c, const void *data, size_t len)
{
    const char *p = data;
    uint64_t deadline = pb_now_ms() + WAIT_MS;
    while (len > 0) {
        ssize_t n = send(c->fd, p, len, MSG_NOSIGNAL);
        if (n > 0) {
            p += n;
            len -= (size_t)n;
            continue;
        }
        ck_assert_msg(n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK), "send: %s",
                      strerror(errno));
        ck_assert_msg(pb_now_ms() < deadline, "send timed out");
        pump();
        struct pollfd pfd = {.fd = c->fd, .events = POLLOUT};
        poll(&pfd, 1, 2);
    }
}

static void client_send_str(struct client *c, const char *s)
{
    client_send(c, s, strlen(s));
}

/* Reads what is available (c->eof set on EOF or error). Works on pipes too. */
static void client_fill(struct client *c)
{
    while (!c->eof) {
        if (c->cap - c->len < 65536) {
            c->cap = c->cap ? 2 * c->cap : 65536;
            c->buf = pb_xrealloc(c->buf, c->cap);
        }
        ssize_t n = read(c->fd, c->buf + c->len, c->cap - c->len);
        if (n > 0) {
            c->len += (size_t)n;
            continue;
        }
        if (n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK))
            c->eof = true;
        break;
    }
}

/* Takes a complete line out of c's buffer if there is one (malloc'd). */
static char *client_take_line(struct client *c)
{
    if (c->len == 0)
        return NULL;
    char *nl = memchr(c->buf, '\n', c->len);
    if (nl == NULL)
        return NULL;
    size_t n = (size_t)(nl - c->buf);
    char *line = pb_xmalloc(n + 1);
    memcpy(line, c->buf, n);
    line[n] = '\0';
    memmove(c->buf, nl + 1, c->len - n - 1);
    c->len -= n + 1;
    return line;
}

/* Waits up to ms for one reply line; returns it parsed, or NULL on EOF/timeout. */
static json_t *client_recv_within(struct client *c, unsigned ms)
{
    uint64_t deadline = pb_now_ms() + ms;
    for (;;) {
        pump();
        client_fill(c);
        char *line = client_take_line(c);
        if (line != NULL) {
            json_error_t jerr;
            json_t *j = json_loads(line, JSON_REJECT_DUPLICATES, &jerr);
            ck_assert_msg(j != NULL, "reply is not JSON: %s (%s)", line, jerr.text);
            free(line);
            return j;
        }
        if (c->eof || pb_now_ms() >= deadline)
            return NULL;
        struct pollfd pfd = {.fd = c->fd, .events = POLLIN};
        poll(&pfd, 1, 2);
    }
}

static json_t *client_recv(struct client *c)
{
    json_t *j = client_recv_within(c, WAIT_MS);
    ck_assert_msg(j != NULL, "no reply (eof=%d)", c->eof);
    return j;
}

/* Waits until the server closes c (after any pending output). */
static bool client_wait_eof(struct client *c, unsigned ms)
{
    uint64_t deadline = pb_now_ms() + ms;
    while (pb_now_ms() < deadline) {
        pump();
        client_fill(c);
        c->len = 0; /* discard */
        if (c->eof)
            return true;
        struct pollfd pfd = {.fd = c->fd, .events = POLLIN};
        poll(&pfd, 1, 2);
    }
    return false;
}

static void wait_clients(size_t n)
{
    uint64_t deadline = pb_now_ms() + WAIT_MS;
    while (ctl_server_clients(srv) != n) {
        ck_assert_msg(pb_now_ms() < deadline, "server has %zu clients, want %zu",
                      ctl_server_clients(srv), n);
        pump();
        poll(NULL, 0, 1);
    }
}

/* The error code of reply j (asserting it is an error). */
static const char *error_code(json_t *j)
{
    json_t *e = json_object_get(j, "error");
    ck_assert_msg(json_is_object(e), "not an error reply");
    ck_assert_ptr_null(json_object_get(j, "result"));
    ck_assert(json_is_string(json_object_get(e, "message")));
    return json_string_value(json_object_get(e, "code"));
}

/* One request, one reply; checks the code (NULL = success) and returns the reply. */
static json_t *roundtrip(struct client *c, const char *line, const char *want_code)
{
    client_send_str(c, line);
    json_t *j = client_recv(c);
    if (want_code == NULL)
        ck_assert_msg(json_object_get(j, "result") != NULL, "request %s failed", line);
    else
        ck_assert_str_eq(error_code(j), want_code);
    return j;
}

/* ---- tests ------------------------------------------------------------- */

START_TEST(test_echo_and_id)
{
    server_start(NULL, 0600);
    struct client *c = client_open();
    json_t *j = roundtrip(c, "{\"id\":1,\"method\":\"echo\",\"params\":{\"a\":[1,2]}}\n", NULL);
    ck_assert_int_eq(json_integer_value(json_object_get(j, "id")), 1);
    json_t *want = json_pack("{s:[i,i]}", "a", 1, 2);
    ck_assert(json_equal(json_object_get(j, "result"), want));
    json_decref(want);
    json_decref(j);

    /* The id comes back exactly as given, whatever its scalar type. */
    j = roundtrip(c, "{\"id\":\"abc\",\"method\":\"echo\"}\n", NULL);
    ck_assert_str_eq(json_string_value(json_object_get(j, "id")), "abc");
    json_t *empty = json_object();
    ck_assert(json_equal(json_object_get(j, "result"), empty)); /* params default {} */
    json_decref(empty);
    json_decref(j);
    j = roundtrip(c, "{\"id\":9007199254740993,\"method\":\"echo\"}\n", NULL);
    ck_assert_int_eq(json_integer_value(json_object_get(j, "id")), 9007199254740993LL);
    json_decref(j);
    j = roundtrip(c, "{\"id\":2.5,\"method\":\"echo\",\"params\":null}\n", NULL);
    ck_assert(json_real_value(json_object_get(j, "id")) == 2.5);
    json_decref(j);
    j = roundtrip(c, "{\"method\":\"echo\"}\n", NULL);
    ck_assert(json_is_null(json_object_get(j, "id")));
    json_decref(j);
    j = roundtrip(c, "{\"id\":true,\"method\":\"echo\"}\n", NULL);
    ck_assert(json_is_true(json_object_get(j, "id")));
    json_decref(j);
    ck_assert_int_eq(handler_calls, 6);
    client_close(c);
}
END_TEST

START_TEST(test_framing_several_in_one_write)
{
    server_start(NULL, 0600);
    struct client *c = client_open();
    client_send_str(c, "{\"id\":1,\"method\":\"echo\"}\n{\"id\":2,\"method\":\"echo\"}\r\n\n"
                       "{\"id\":3,\"method\":\"echo\"}\n");
    for (int i = 1; i <= 3; i++) {
        json_t *j = client_recv(c);
        ck_assert_int_eq(json_integer_value(json_object_get(j, "id")), i);
        json_decref(j);
    }
    /* The blank line got no reply of its own. */
    ck_assert_ptr_null(client_recv_within(c, 50));
    client_close(c);
}
END_TEST

START_TEST(test_framing_split_across_writes)
{
    server_start(NULL, 0600);
    struct client *c = client_open();
    client_send_str(c, "{\"id\":7,\"met");
    ck_assert_ptr_null(client_recv_within(c, 50));
    client_send_str(c, "hod\":\"ec");
    ck_assert_ptr_null(client_recv_within(c, 50));
    ck_assert_int_eq(handler_calls, 0);
    client_send_str(c, "ho\"}\n{\"id\":8,");
    json_t *j = client_recv(c);
    ck_assert_int_eq(json_integer_value(json_object_get(j, "id")), 7);
    json_decref(j);
    client_send_str(c, "\"method\":\"echo\"}\n");
    j = client_recv(c);
    ck_assert_int_eq(json_integer_value(json_object_get(j, "id")), 8);
    json_decref(j);
    client_close(c);
}
END_TEST

START_TEST(test_error_codes)
{
    server_start(NULL, 0600);
    struct client *c = client_open();
    json_t *j;

    /* Malformed JSON: BAD_REQUEST with a null id, and the connection lives on. */
    j = roundtrip(c, "{\"id\":1,\"method\":\n", CTL_ERR_BAD_REQUEST);
    ck_assert(json_is_null(json_object_get(j, "id")));
    json_decref(j);
    json_decref(roundtrip(c, "not json at all\n", CTL_ERR_BAD_REQUEST));
    json_decref(roundtrip(c, "[1,2,3]\n", CTL_ERR_BAD_REQUEST));
    json_decref(roundtrip(c, "\"status\"\n", CTL_ERR_BAD_REQUEST));
    json_decref(roundtrip(c, "{\"id\":1,\"id\":2,\"method\":\"echo\"}\n", CTL_ERR_BAD_REQUEST));
    json_decref(roundtrip(c, "{\"id\":{},\"method\":\"echo\"}\n", CTL_ERR_BAD_REQUEST));
    json_decref(roundtrip(c, "{\"id\":[1],\"method\":\"echo\"}\n", CTL_ERR_BAD_REQUEST));
    /* Not answerable as a request, but the id is known: it is echoed. */
    j = roundtrip(c, "{\"id\":3}\n", CTL_ERR_BAD_REQUEST);
    ck_assert_int_eq(json_integer_value(json_object_get(j, "id")), 3);
    json_decref(j);
    json_decref(roundtrip(c, "{\"id\":4,\"method\":5}\n", CTL_ERR_BAD_REQUEST));
    json_decref(roundtrip(c, "{\"id\":4,\"method\":\"\"}\n", CTL_ERR_BAD_REQUEST));
    json_decref(roundtrip(c, "{\"id\":4,\"method\":\"ec\\u0000ho\"}\n", CTL_ERR_BAD_REQUEST));
    j = roundtrip(c, "{\"id\":5,\"method\":\"echo\",\"parms\":{}}\n", CTL_ERR_BAD_REQUEST);
    ck_assert_str_eq(json_string_value(json_object_get(
                             json_object_get(json_object_get(j, "error"), "data"), "member")),
                     "parms");
    json_decref(j);

    j = roundtrip(c, "{\"id\":6,\"method\":\"echo\",\"params\":[1]}\n", CTL_ERR_INVALID_PARAMS);
    ck_assert_int_eq(json_integer_value(json_object_get(j, "id")), 6);
    json_decref(j);
    json_decref(roundtrip(c, "{\"id\":6,\"method\":\"echo\",\"params\":\"x\"}\n",
                          CTL_ERR_INVALID_PARAMS));

    j = roundtrip(c, "{\"id\":7,\"method\":\"nosuch\"}\n", CTL_ERR_UNKNOWN_METHOD);
    ck_assert_int_eq(json_integer_value(json_object_get(j, "id")), 7);
    ck_assert_str_eq(json_string_value(json_object_get(
                             json_object_get(json_object_get(j, "error"), "data"), "method")),
                     "nosuch");
    json_decref(j);

    /* A handler's own error, with data. */
    j = roundtrip(c, "{\"id\":8,\"method\":\"fail\"}\n", CTL_ERR_NOT_LEADER);
    json_t *err = json_object_get(j, "error");
    ck_assert_str_eq(json_string_value(json_object_get(err, "message")),
                     "this node is a follower of n2");
    ck_assert_str_eq(json_string_value(json_object_get(json_object_get(err, "data"), "leader")),
                     "n2");
    json_decref(j);

    /* Replies that cannot be encoded as given still come back as errors. */
    j = roundtrip(c, "{\"id\":11,\"method\":\"badbytes\"}\n", CTL_ERR_UNAVAILABLE);
    ck_assert_int_eq(json_integer_value(json_object_get(j, "id")), 11);
    json_decref(j);
    j = roundtrip(c, "{\"id\":12,\"method\":\"badbytes\",\"params\":{\"result\":1}}\n",
                  CTL_ERR_INTERNAL);
    ck_assert_int_eq(json_integer_value(json_object_get(j, "id")), 12);
    json_decref(j);

    /* Binary garbage with NULs and invalid UTF-8 in a line. */
    static const char garbage[] = "\x00\xff\xfe{\x01\x02\"\x80\n";
    client_send(c, garbage, sizeof(garbage) - 1);
    j = client_recv(c);
    ck_assert_str_eq(error_code(j), CTL_ERR_BAD_REQUEST);
    json_decref(j);
    /* A long unknown method name with multi-byte characters: the message is
     * truncated on a character boundary and still valid JSON. */
    char line[2048];
    char name[1200] = "";
    for (int i = 0; i < 300; i++)
        strcat(name, "\xc3\xa9"); /* é */
    snprintf(line, sizeof(line), "{\"id\":9,\"method\":\"%s\"}\n", name);
    json_decref(roundtrip(c, line, CTL_ERR_UNKNOWN_METHOD));

    /* Still usable after all of that, and no handler ran for bad input. */
    ck_assert_int_eq(handler_calls, 3);
    json_decref(roundtrip(c, "{\"id\":10,\"method\":\"echo\"}\n", NULL));
    ck_assert_uint_eq(ctl_server_clients(srv), 1);
    client_close(c);
}
END_TEST

START_TEST(test_async_reply_in_order)
{
    server_start(NULL, 0600);
    struct client *c = client_open();
    /* "later" waits; the echo behind it must not be answered first. */
    client_send_str(c, "{\"id\":1,\"method\":\"later\"}\n{\"id\":2,\"method\":\"echo\"}\n");
    ck_assert_ptr_null(client_recv_within(c, 100));
    ck_assert_ptr_nonnull(held);
    ck_assert_int_eq(handler_calls, 1);
    ck_assert(ctl_request_connected(held));
    ck_assert_str_eq(ctl_request_method(held), "later");

    struct timeval tv = {0, 1000};
    evtimer_add(reply_timer, &tv);
    json_t *j = client_recv(c);
    ck_assert_int_eq(json_integer_value(json_object_get(j, "id")), 1);
    ck_assert_str_eq(json_string_value(json_object_get(json_object_get(j, "result"), "answered")),
                     "later");
    json_decref(j);
    ck_assert_ptr_null(held);
    /* The buffered echo is answered without any new input from the client. */
    j = client_recv(c);
    ck_assert_int_eq(json_integer_value(json_object_get(j, "id")), 2);
    json_decref(j);
    ck_assert_int_eq(handler_calls, 2);
    client_close(c);
}
END_TEST

START_TEST(test_async_client_gone)
{
    server_start(NULL, 0600);
    struct client *c = client_open();
    client_send_str(c, "{\"id\":1,\"method\":\"later\"}\n");
    uint64_t deadline = pb_now_ms() + WAIT_MS;
    while (held == NULL && pb_now_ms() < deadline) {
        pump();
        poll(NULL, 0, 1);
    }
    ck_assert_ptr_nonnull(held);
    client_close(c);
    wait_clients(0);
    ck_assert(!ctl_request_connected(held));
    /* Answering the orphan is harmless (ASan/valgrind check the free). */
    struct timeval tv = {0, 0};
    evtimer_add(reply_timer, &tv);
    while (held != NULL && pb_now_ms() < deadline)
        pump();
    ck_assert_ptr_null(held);

    /* The server still serves others. */
    c = client_open();
    json_decref(roundtrip(c, "{\"id\":2,\"method\":\"echo\"}\n", NULL));
    client_close(c);
}
END_TEST

START_TEST(test_orphan_after_server_free)
{
    server_start(NULL, 0600);
    struct client *c = client_open();
    client_send_str(c, "{\"id\":1,\"method\":\"later\"}\n");
    uint64_t deadline = pb_now_ms() + WAIT_MS;
    while (held == NULL && pb_now_ms() < deadline) {
        pump();
        poll(NULL, 0, 1);
    }
    ck_assert_ptr_nonnull(held);
    ctl_server_free(srv);
    srv = NULL;
    ck_assert(!ctl_request_connected(held));
    /* The socket file went away with the server. */
    struct stat st;
    ck_assert_int_eq(lstat(sock_path, &st), -1);
    ck_assert_int_eq(errno, ENOENT);
    ck_assert(client_wait_eof(c, WAIT_MS));
    ctl_reply_result(held, NULL);
    held = NULL;
    client_close(c);
}
END_TEST

START_TEST(test_half_close_answers_then_closes)
{
    server_start(NULL, 0600);
    struct client *c = client_open();
    /* The last line needs no newline once the client has finished sending. */
    client_send_str(c, "{\"id\":1,\"method\":\"echo\"}\n{\"id\":2,\"method\":\"echo\"}");
    ck_assert_int_eq(shutdown(c->fd, SHUT_WR), 0);
    json_t *j = client_recv(c);
    ck_assert_int_eq(json_integer_value(json_object_get(j, "id")), 1);
    json_decref(j);
    j = client_recv(c);
    ck_assert_int_eq(json_integer_value(json_object_get(j, "id")), 2);
    json_decref(j);
    ck_assert(client_wait_eof(c, WAIT_MS));
    wait_clients(0);
    client_close(c);
}
END_TEST

static void wait_child(pid_t pid)
{
    int status = 0;
    uint64_t deadline = pb_now_ms() + WAIT_MS;
    for (;;) {
        pid_t r = waitpid(pid, &status, WNOHANG);
        if (r == pid)
            break;
        ck_assert_msg(pb_now_ms() < deadline, "child did not finish");
        pump();
        poll(NULL, 0, 1);
    }
    ck_assert(WIFEXITED(status));
    ck_assert_int_eq(WEXITSTATUS(status), 0);
}

START_TEST(test_permission_mutating)
{
    ck_assert_int_eq(chmod(dir, 0755), 0);
    server_start(NULL, 0666);

    /* Our own user (root or not) is privileged. */
    struct client *c = client_open();
    json_t *j = roundtrip(c, "{\"id\":1,\"method\":\"mut\"}\n", NULL);
    json_decref(j);
    j = roundtrip(c, "{\"id\":2,\"method\":\"whoami\"}\n", NULL);
    json_t *r = json_object_get(j, "result");
    ck_assert_int_eq(json_integer_value(json_object_get(r, "uid")), (json_int_t)geteuid());
    ck_assert_int_eq(json_integer_value(json_object_get(r, "pid")), (json_int_t)getpid());
    ck_assert(json_is_true(json_object_get(r, "privileged")));
    ck_assert_str_eq(json_string_value(json_object_get(r, "method")), "whoami");
    json_decref(j);
    client_close(c);

    if (geteuid() != 0)
        return; /* cannot become somebody else to test a refusal */

    /* A child that becomes nobody:nogroup may read but not mutate. Its
     * replies come back through a pipe while we run the server loop. */
    int pfd[2];
    ck_assert_int_eq(pipe(pfd), 0);
    pid_t pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        close(pfd[0]);
        alarm(10);
        if (setgroups(0, NULL) < 0 || setgid(65534) < 0 || setuid(65534) < 0)
            _exit(3);
        int fd = socket(AF_UNIX, SOCK_STREAM, 0);
        struct sockaddr_un sun = {.sun_family = AF_UNIX};
        sun_set(&sun, sock_path);
        if (connect(fd, (struct sockaddr *)&sun, sizeof(sun)) < 0)
            _exit(4);
        static const char req[] = "{\"id\":1,\"method\":\"mut\"}\n{\"id\":2,\"method\":\"echo\"}\n";
        if (write(fd, req, sizeof(req) - 1) != (ssize_t)(sizeof(req) - 1))
            _exit(5);
        char buf[1024];
        int lines = 0;
        while (lines < 2) {
            ssize_t n = read(fd, buf, sizeof(buf));
            if (n <= 0)
                _exit(6);
            for (ssize_t i = 0; i < n; i++)
                lines += buf[i] == '\n';
            if (write(pfd[1], buf, (size_t)n) != n)
                _exit(7);
        }
        _exit(0);
    }
    close(pfd[1]);
    wait_child(pid);
    struct client pc = {.fd = pfd[0]};
    ck_assert_int_eq(fcntl(pfd[0], F_SETFL, O_NONBLOCK), 0);
    j = client_recv(&pc);
    ck_assert_str_eq(error_code(j), CTL_ERR_PERMISSION_DENIED);
    ck_assert_int_eq(json_integer_value(json_object_get(j, "id")), 1);
    json_decref(j);
    j = client_recv(&pc);
    ck_assert_ptr_nonnull(json_object_get(j, "result"));
    json_decref(j);
    close(pfd[0]);
    free(pc.buf);
    /* mut ran once (for us), echo once (for the child), whoami once. */
    ck_assert_int_eq(handler_calls, 3);
}
END_TEST

START_TEST(test_line_cap)
{
    server_start(NULL, 0600);
    struct client *ok = client_open();
    struct client *c = client_open();
    wait_clients(2);

    /* A line of exactly CTL_MAX_LINE bytes is accepted. */
    static const char head[] = "{\"id\":1,\"method\":\"echo\",\"params\":{\"s\":\"";
    static const char tail[] = "\"}}";
    size_t n = CTL_MAX_LINE;
    char *line = pb_xmalloc(n + 1);
    memset(line, 'x', n);
    memcpy(line, head, sizeof(head) - 1);
    memcpy(line + n - (sizeof(tail) - 1), tail, sizeof(tail) - 1);
    line[n] = '\n';
    client_send(c, line, n + 1);
    json_t *j = client_recv(c);
    ck_assert_uint_eq(json_string_length(json_object_get(json_object_get(j, "result"), "s")),
                      n - (sizeof(head) - 1) - (sizeof(tail) - 1));
    json_decref(j);

    /* One byte more, and no newline: an error, then the connection is closed,
     * while the other client is served all along. */
    char *big = pb_xmalloc(n + 64);
    memset(big, 'y', n + 64);
    client_send(c, big, n / 2);
    json_decref(roundtrip(ok, "{\"id\":2,\"method\":\"echo\"}\n", NULL));
    client_send(c, big, n / 2 + 1);
    j = client_recv(c);
    ck_assert_str_eq(error_code(j), CTL_ERR_BAD_REQUEST);
    json_decref(j);
    ck_assert(client_wait_eof(c, WAIT_MS));
    json_decref(roundtrip(ok, "{\"id\":3,\"method\":\"echo\"}\n", NULL));
    wait_clients(1);
    free(big);
    free(line);
    client_close(c);
    client_close(ok);
}
END_TEST

START_TEST(test_connection_cap)
{
    struct ctl_options opts = {.max_clients = 3};
    server_start(&opts, 0600);
    struct client *c[3];
    for (int i = 0; i < 3; i++)
        c[i] = client_open();
    wait_clients(3);
    /* The fourth is told BUSY and closed at once. */
    struct client *extra = client_open();
    json_t *j = client_recv(extra);
    ck_assert_str_eq(error_code(j), CTL_ERR_BUSY);
    json_decref(j);
    ck_assert(client_wait_eof(extra, WAIT_MS));
    client_close(extra);
    ck_assert_uint_eq(ctl_server_clients(srv), 3);
    for (int i = 0; i < 3; i++)
        json_decref(roundtrip(c[i], "{\"method\":\"echo\"}\n", NULL));
    /* A slot freed is a slot available. */
    client_close(c[0]);
    wait_clients(2);
    c[0] = client_open();
    json_decref(roundtrip(c[0], "{\"method\":\"echo\"}\n", NULL));
    for (int i = 0; i < 3; i++)
        client_close(c[i]);
}
END_TEST

START_TEST(test_idle_timeout)
{
    struct ctl_options opts = {.idle_timeout_s = 1};
    server_start(&opts, 0600);
    struct client *stalled = client_open();
    client_send_str(stalled, "{\"id\":1,\"meth"); /* and nothing more */
    struct client *c = client_open();
    json_decref(roundtrip(c, "{\"id\":1,\"method\":\"echo\"}\n", NULL));
    /* The stalled client is dropped after its idle timeout (within a deadline). */
    uint64_t t0 = pb_now_ms();
    ck_assert(client_wait_eof(stalled, WAIT_MS));
    ck_assert_uint_ge(pb_now_ms() - t0, 500);
    client_close(stalled);
    client_close(c);
    wait_clients(0);
}
END_TEST

START_TEST(test_trickling_client_timeout)
{
    struct ctl_options opts = {.idle_timeout_s = 1};
    server_start(&opts, 0600);
    struct client *c = client_open();
    /* One byte every 50 ms is never idle for a second, but its line takes
     * too long: it is cut off about a second after its first byte. */
    static const char line[] = "{\"id\":1,\"method\":\"echo\",\"params\":{\"pad\":\""
                               "....................................................."
                               "....................................................."
                               "\"}}\n";
    uint64_t t0 = pb_now_ms();
    size_t i = 0;
    bool closed = false;
    while (!closed && pb_now_ms() - t0 < WAIT_MS) {
        if (i < sizeof(line) - 2 && send(c->fd, &line[i], 1, MSG_NOSIGNAL) == 1)
            i++;
        uint64_t next = pb_now_ms() + 50;
        while (!closed && pb_now_ms() < next) {
            pump();
            client_fill(c);
            closed = c->eof;
            poll(NULL, 0, 2);
        }
    }
    ck_assert(closed);
    ck_assert_uint_ge(pb_now_ms() - t0, 900);
    ck_assert_uint_lt(i, sizeof(line) - 2); /* cut off before the line was complete */
    ck_assert_int_eq(handler_calls, 0);
    client_close(c);
    wait_clients(0);
}
END_TEST

START_TEST(test_listen_path_rules)
{
    server_start(NULL, 0640);
    struct stat st;
    ck_assert_int_eq(lstat(sock_path, &st), 0);
    ck_assert(S_ISSOCK(st.st_mode));
    ck_assert_int_eq(st.st_mode & 07777, 0640);

    /* A live socket is refused, and a server listens only once. */
    struct ctl_server *other = ctl_server_new(base, test_methods, 1, NULL, NULL);
    ck_assert_int_eq(ctl_server_listen_path(other, sock_path, 0600), -EADDRINUSE);
    ck_assert_int_eq(ctl_server_listen_path(srv, sock_path, 0600), -EBUSY);

    /* A stale one (its server gone without removing it) is replaced. */
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    char stale[160];
    snprintf(stale, sizeof(stale), "%s/stale.sock", dir);
    struct sockaddr_un sun = {.sun_family = AF_UNIX};
    sun_set(&sun, stale);
    ck_assert_int_eq(bind(fd, (struct sockaddr *)&sun, sizeof(sun)), 0);
    close(fd);
    ck_assert_int_eq(ctl_server_listen_path(other, stale, 0600), 0);
    ctl_server_free(other);
    ck_assert_int_eq(lstat(stale, &st), -1);

    /* Something that is not a socket is never removed. */
    char file[160];
    snprintf(file, sizeof(file), "%s/file", dir);
    fd = open(file, O_CREAT | O_WRONLY, 0600);
    ck_assert_int_ge(fd, 0);
    close(fd);
    other = ctl_server_new(base, test_methods, 1, NULL, NULL);
    ck_assert_int_eq(ctl_server_listen_path(other, file, 0600), -EEXIST);
    ck_assert_int_eq(lstat(file, &st), 0);
    char longpath[300];
    memset(longpath, 'a', sizeof(longpath) - 1);
    longpath[0] = '/';
    longpath[sizeof(longpath) - 1] = '\0';
    ck_assert_int_eq(ctl_server_listen_path(other, longpath, 0600), -ENAMETOOLONG);
    ctl_server_free(other);
    unlink(file);

    /* The server removes its socket file when freed. */
    ctl_server_free(srv);
    srv = NULL;
    ck_assert_int_eq(lstat(sock_path, &st), -1);
}
END_TEST

START_TEST(test_listen_fd_keeps_file)
{
    /* As under systemd: the socket is bound by somebody else. */
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un sun = {.sun_family = AF_UNIX};
    sun_set(&sun, sock_path);
    ck_assert_int_eq(bind(fd, (struct sockaddr *)&sun, sizeof(sun)), 0);
    ck_assert_int_eq(listen(fd, 16), 0);
    srv = ctl_server_new(base, test_methods, PB_ARRAY_SIZE(test_methods), NULL, NULL);
    ck_assert_int_eq(ctl_server_listen_fd(srv, fd), 0);
    struct client *c = client_open();
    json_decref(roundtrip(c, "{\"id\":1,\"method\":\"echo\"}\n", NULL));
    client_close(c);
    ctl_server_free(srv);
    srv = NULL;
    struct stat st;
    ck_assert_int_eq(lstat(sock_path, &st), 0); /* not ours to remove */
    ck_assert_int_eq(fcntl(fd, F_GETFD), -1);   /* but the fd was ours to close */
}
END_TEST

START_TEST(test_many_clients)
{
    server_start(NULL, 0600);
    enum { N = 300 };
    struct client *c[N];
    for (int i = 0; i < N; i++) {
        c[i] = client_open();
        char line[64];
        snprintf(line, sizeof(line), "{\"id\":%d,\"method\":\"echo\"}\n", i);
        client_send_str(c[i], line);
        if (i % 50 == 0)
            pump(); /* keep the backlog drained */
    }
    for (int i = 0; i < N; i++) {
        json_t *j = client_recv(c[i]);
        ck_assert_int_eq(json_integer_value(json_object_get(j, "id")), i);
        json_decref(j);
    }
    ck_assert_uint_eq(ctl_server_clients(srv), N);
    for (int i = 0; i < N; i++)
        client_close(c[i]);
    wait_clients(0);
}
END_TEST

/* Sends what the socket takes right now; returns the bytes sent. */
static size_t client_send_some(struct client *c, const char *p, size_t len)
{
    ssize_t n = send(c->fd, p, len, MSG_NOSIGNAL | MSG_DONTWAIT);
    return n > 0 ? (size_t)n : 0;
}

START_TEST(test_slow_reader_backpressure)
{
    server_start(NULL, 0600);
    struct client *c = client_open();
    enum { N = 200, PAD = 64 * 1024 };
    /* N requests whose replies total ~13 MB, sent without reading any reply. */
    size_t linelen = PAD + 64;
    char *all = pb_xmalloc((size_t)N * linelen);
    size_t total = 0;
    for (int i = 0; i < N; i++) {
        char *line = all + total;
        int n = snprintf(line, 64, "{\"id\":%d,\"method\":\"echo\",\"params\":{\"s\":\"", i);
        memset(line + n, 'p', PAD);
        memcpy(line + n + PAD, "\"}}\n", 4);
        total += (size_t)n + PAD + 4;
    }
    size_t sent = 0;
    int idle = 0, last_calls = -1;
    while (idle < 200 && sent < total) {
        size_t n = client_send_some(c, all + sent, total - sent);
        sent += n;
        pump();
        idle = n == 0 && handler_calls == last_calls ? idle + 1 : 0;
        last_calls = handler_calls;
        poll(NULL, 0, 1);
    }
    /* The server stopped answering (and reading) while replies piled up. */
    ck_assert_int_gt(handler_calls, 0);
    ck_assert_int_lt(handler_calls, N);
    ck_assert_uint_lt(sent, total);

    /* Once the client reads, everything is answered, in order. */
    uint64_t deadline = pb_now_ms() + 4 * WAIT_MS;
    int got = 0;
    while (got < N) {
        ck_assert_msg(pb_now_ms() < deadline, "only %d replies", got);
        if (sent < total)
            sent += client_send_some(c, all + sent, total - sent);
        json_t *j = client_recv_within(c, 10);
        if (j == NULL)
            continue;
        ck_assert_int_eq(json_integer_value(json_object_get(j, "id")), got);
        json_decref(j);
        got++;
    }
    ck_assert_int_eq(handler_calls, N);
    free(all);
    client_close(c);
}
END_TEST

static int count_open_fds(void)
{
    int n = 0;
    for (int fd = 0; fd < 4096; fd++) {
        if (fcntl(fd, F_GETFD) >= 0)
            n = fd + 1;
    }
    return n;
}

/* valgrind checks descriptor limits itself, after accept() has already
 * taken the connection off the queue: there, the squeezed client is lost. */
static bool under_valgrind(void)
{
    const char *p = getenv("LD_PRELOAD");
    return p != NULL && strstr(p, "vgpreload") != NULL;
}

START_TEST(test_accept_out_of_fds)
{
    server_start(NULL, 0600);
    /* Room for two more descriptors on top of the ones in use, then squeeze:
     * two clients connect (one fd each on our side), so the server's accept()
     * finds no descriptor and must back off rather than spin or die. */
    struct client *a = client_open();
    struct client *b = client_open();
    wait_clients(2);
    struct rlimit old, lim;
    ck_assert_int_eq(getrlimit(RLIMIT_NOFILE, &old), 0);
    lim = old;
    lim.rlim_cur = (rlim_t)count_open_fds() + 1;
    ck_assert_int_eq(setrlimit(RLIMIT_NOFILE, &lim), 0);
    /* Fill every free descriptor below the limit, then give one back. */
    enum { MAX_FILLERS = 4096 };
    int *fillers = pb_xcalloc(MAX_FILLERS, sizeof(int));
    int n_fillers = 0;
    for (;;) {
        ck_assert_int_lt(n_fillers, MAX_FILLERS);
        int fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
        if (fd < 0) {
            ck_assert_int_eq(errno, EMFILE);
            break;
        }
        fillers[n_fillers++] = fd;
    }
    ck_assert_int_gt(n_fillers, 0);
    close(fillers[--n_fillers]);
    struct client *c = client_open(); /* takes the last descriptor */
    for (int i = 0; i < 20; i++) {
        pump();
        poll(NULL, 0, 1);
    }
    ck_assert_uint_eq(ctl_server_clients(srv), 2); /* not accepted: no descriptor */
    /* Descriptors free up: the listener, paused, starts accepting again;
     * the client that waited in the backlog is served, and so is a new one. */
    client_close(a);
    ck_assert_int_eq(setrlimit(RLIMIT_NOFILE, &old), 0);
    for (int i = 0; i < n_fillers; i++)
        close(fillers[i]);
    free(fillers);
    if (!under_valgrind())
        json_decref(roundtrip(c, "{\"id\":1,\"method\":\"echo\"}\n", NULL));
    struct client *d = client_open();
    json_decref(roundtrip(d, "{\"id\":2,\"method\":\"echo\"}\n", NULL));
    json_decref(roundtrip(b, "{\"id\":3,\"method\":\"echo\"}\n", NULL));
    client_close(b);
    client_close(c);
    client_close(d);
}
END_TEST

static Suite *ctl_suite(void)
{
    Suite *s = suite_create("ctl");
    TCase *tc = tcase_create("server");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 30);
    tcase_add_test(tc, test_echo_and_id);
    tcase_add_test(tc, test_framing_several_in_one_write);
    tcase_add_test(tc, test_framing_split_across_writes);
    tcase_add_test(tc, test_error_codes);
    tcase_add_test(tc, test_async_reply_in_order);
    tcase_add_test(tc, test_async_client_gone);
    tcase_add_test(tc, test_orphan_after_server_free);
    tcase_add_test(tc, test_half_close_answers_then_closes);
    tcase_add_test(tc, test_permission_mutating);
    tcase_add_test(tc, test_line_cap);
    tcase_add_test(tc, test_connection_cap);
    tcase_add_test(tc, test_idle_timeout);
    tcase_add_test(tc, test_trickling_client_timeout);
    tcase_add_test(tc, test_listen_path_rules);
    tcase_add_test(tc, test_listen_fd_keeps_file);
    tcase_add_test(tc, test_many_clients);
    tcase_add_test(tc, test_slow_reader_backpressure);
    tcase_add_test(tc, test_accept_out_of_fds);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(ctl_suite());
    srunner_run_all(sr, CK_ENV);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}

/*
 * check_pickboxctl.c: unit tests for src/pickboxctl: the renderer backends
 * (exact text and JSON for a sample status), argument parsing, socket
 * resolution, and exit codes against a tiny NDJSON server run by a thread of
 * this test on a temporary Unix socket (a fixture for the client).
 */
#include "config.h"

#include <check.h>
#include <errno.h>
#include <ftw.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include "lib/util.h"
#include "pickboxctl/client.h"
#include "pickboxctl/pickboxctl.h"
#include "pickboxctl/render.h"

static char tmpdir[64];

static void setup(void)
{
    snprintf(tmpdir, sizeof(tmpdir), "/tmp/check_pbctl.XXXXXX");
    ck_assert_ptr_nonnull(mkdtemp(tmpdir));
}

static int rm_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    return remove(path);
}

static void teardown(void)
{
    nftw(tmpdir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
}

static const char sample_status[] =
        "{\"node_id\":\"n1\",\"role\":\"leader\",\"term\":4,\"leader_id\":\"n1\","
        "\"commit_index\":120,\"applied_index\":119,\"uptime_s\":3725,\"extra_info\":\"e\","
        "\"members\":["
        "{\"id\":\"n1\",\"address\":\"127.0.0.1:8010\",\"voter\":true,\"match\":120,\"lag\":0},"
        "{\"id\":\"n2\",\"address\":\"127.0.0.1:8011\",\"voter\":true,\"reachable\":true,"
        "\"match\":118,\"lag\":2,\"last_contact_ms\":40},"
        "{\"id\":\"n3\",\"address\":\"[::1]:8012\",\"voter\":false,\"reachable\":false,"
        "\"match\":0,\"lag\":120,\"last_contact_ms\":12500,\"note\":\"x\"}]}";

static const char sample_status_text[] =
        "node:          n1\n"
        "role:          leader\n"
        "term:          4\n"
        "leader:        n1\n"
        "commit index:  120\n"
        "applied index: 119\n"
        "uptime:        1h2m5s\n"
        "extra info:    e\n"
        "members:\n"
        "  ID  ADDRESS         ROLE     REACHABLE  MATCH  LAG  LAST CONTACT  NOTE\n"
        "  n1  127.0.0.1:8010  voter    -          120    0    -             -\n"
        "  n2  127.0.0.1:8011  voter    yes        118    2    40ms ago      -\n"
        "  n3  [::1]:8012      learner  no         0      120  12.5s ago     x\n";

/* The JSON backend writes the view's keys first, then the others. */
static const char sample_status_json[] =
        "{\"node_id\":\"n1\",\"role\":\"leader\",\"term\":4,\"leader_id\":\"n1\","
        "\"commit_index\":120,\"applied_index\":119,\"uptime_s\":3725,"
        "\"members\":["
        "{\"id\":\"n1\",\"address\":\"127.0.0.1:8010\",\"voter\":true,\"match\":120,\"lag\":0},"
        "{\"id\":\"n2\",\"address\":\"127.0.0.1:8011\",\"voter\":true,\"reachable\":true,"
        "\"match\":118,\"lag\":2,\"last_contact_ms\":40},"
        "{\"id\":\"n3\",\"address\":\"[::1]:8012\",\"voter\":false,\"reachable\":false,"
        "\"match\":0,\"lag\":120,\"last_contact_ms\":12500,\"note\":\"x\"}],"
        "\"extra_info\":\"e\"}\n";

static json_t *parse(const char *s)
{
    json_error_t e;
    json_t *j = json_loads(s, 0, &e);
    ck_assert_msg(j != NULL, "bad test JSON: %s", e.text);
    return j;
}

/* Renders result (JSON text) with view through a backend; returns the output. */
static char *render(const struct pbctl_field_spec *view, const char *result, bool json)
{
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    ck_assert_ptr_nonnull(f);
    json_t *r = parse(result);
    struct pbctl_writer *w = json ? pbctl_writer_json_new(f) : pbctl_writer_text_new(f);
    ck_assert_int_eq(pbctl_render(view, r, w), 0);
    pbctl_writer_free(w);
    json_decref(r);
    fclose(f);
    return buf;
}

START_TEST(test_render_status_text)
{
    char *out = render(pbctl_command_find("status")->view, sample_status, false);
    ck_assert_str_eq(out, sample_status_text);
    free(out);
}
END_TEST

START_TEST(test_render_status_json_is_the_result)
{
    char *out = render(pbctl_command_find("status")->view, sample_status, true);
    ck_assert_str_eq(out, sample_status_json);
    json_t *a = parse(out), *b = parse(sample_status);
    ck_assert(json_equal(a, b));
    json_decref(a);
    json_decref(b);
    free(out);
}
END_TEST

START_TEST(test_render_generic_values)
{
    const char *in = "{\"name\":\"a\\u001b[31mb\",\"ratio\":0.5,\"off\":null,\"ok\":false,"
                     "\"tags\":[\"x\",1,true],\"none\":[],\"nested\":{\"k\":[1,2]},"
                     "\"rows\":[{\"b\":1},{\"a\":\"z\",\"b\":2}]}";
    char *out = render(NULL, in, false);
    ck_assert_str_eq(out, "name:   a?[31mb\n"
                          "ratio:  0.5\n"
                          "off:    -\n"
                          "ok:     no\n"
                          "tags:   x, 1, yes\n"
                          "none:   (none)\n"
                          "nested: {\"k\":[1,2]}\n"
                          "rows:\n"
                          "  B  A\n"
                          "  1  -\n"
                          "  2  z\n");
    free(out);
    out = render(NULL, in, true);
    json_t *a = parse(out), *b = parse(in);
    ck_assert(json_equal(a, b));
    json_decref(a);
    json_decref(b);
    free(out);
}
END_TEST

START_TEST(test_render_empty_members_table)
{
    const char *in = "{\"node_id\":\"n1\",\"members\":[]}";
    char *out = render(pbctl_command_find("status")->view, in, false);
    ck_assert_str_eq(out, "node: n1\nmembers: (none)\n");
    free(out);
    out = render(pbctl_command_find("status")->view, in, true);
    ck_assert_str_eq(out, "{\"node_id\":\"n1\",\"members\":[]}\n");
    free(out);
}
END_TEST

START_TEST(test_formatters)
{
    char buf[64];
    json_t *v = json_integer(999);
    pbctl_format_ms_ago(v, buf, sizeof(buf));
    ck_assert_str_eq(buf, "999ms ago");
    json_decref(v);
    v = json_integer(61000);
    pbctl_format_ms_ago(v, buf, sizeof(buf));
    ck_assert_str_eq(buf, "61.0s ago");
    json_decref(v);
    v = json_integer(90061);
    pbctl_format_duration_s(v, buf, sizeof(buf));
    ck_assert_str_eq(buf, "1d1h1m1s");
    json_decref(v);
    v = json_integer(59);
    pbctl_format_duration_s(v, buf, sizeof(buf));
    ck_assert_str_eq(buf, "59s");
    json_decref(v);
    v = json_integer(3600);
    pbctl_format_duration_s(v, buf, sizeof(buf));
    ck_assert_str_eq(buf, "1h0m0s");
    json_decref(v);
    v = json_string("later");
    pbctl_format_ms_ago(v, buf, sizeof(buf));
    ck_assert_str_eq(buf, "later");
    pbctl_format_voter(v, buf, sizeof(buf));
    ck_assert_str_eq(buf, "later");
    json_decref(v);
    pbctl_format_voter(json_false(), buf, sizeof(buf));
    ck_assert_str_eq(buf, "learner");
    /* A long array is cut at the buffer, still terminated. */
    v = parse("[\"aaaaaaaaaa\",\"bbbbbbbbbb\",\"cccccccccc\"]");
    pbctl_format_default(v, buf, 16);
    ck_assert_uint_lt(strlen(buf), 16);
    ck_assert(strncmp(buf, "aaaaaaaaaa, ", 12) == 0);
    json_decref(v);
}
END_TEST

/* ---- argument parsing ---------------------------------------------------------- */

static int parse_args(struct pbctl_options *o, struct pb_error *err, char **argv_store, ...)
{
    int argc = 0;
    argv_store[argc++] = (char *)"pickboxctl";
    va_list ap;
    va_start(ap, argv_store);
    const char *a;
    while ((a = va_arg(ap, const char *)) != NULL)
        argv_store[argc++] = (char *)a;
    va_end(ap);
    argv_store[argc] = NULL;
    return pbctl_parse_args(argc, argv_store, o, err);
}

START_TEST(test_parse_args)
{
    struct pbctl_options o;
    struct pb_error err;
    char *argv[32];
    ck_assert_int_eq(parse_args(&o, &err, argv, "status", NULL), 0);
    ck_assert_str_eq(o.cmd->name, "status");
    ck_assert(!o.json);
    ck_assert_int_eq(o.timeout_ms, PBCTL_DEFAULT_TIMEOUT_MS);
    ck_assert_ptr_null(o.socket);
    ck_assert_ptr_null(o.node);

    ck_assert_int_eq(
            parse_args(&o, &err, argv, "-s", "/x.sock", "status", "--json", "-t", "0.5", NULL), 0);
    ck_assert_str_eq(o.socket, "/x.sock");
    ck_assert(o.json);
    ck_assert_int_eq(o.timeout_ms, 500);
    ck_assert_int_eq(o.nargs, 0);

    ck_assert_int_eq(
            parse_args(&o, &err, argv, "--node=n2", "--timeout=1.0001", "-j", "hello", NULL), 0);
    ck_assert_str_eq(o.node, "n2");
    ck_assert_int_eq(o.timeout_ms, 1001);
    ck_assert_str_eq(o.cmd->method, "hello");

    ck_assert_int_eq(parse_args(&o, &err, argv, "--help", "bogus", NULL), 0);
    ck_assert(o.help);
    ck_assert_int_eq(parse_args(&o, &err, argv, "-V", NULL), 0);
    ck_assert(o.version);
}
END_TEST

START_TEST(test_parse_args_errors)
{
    static const struct {
        const char *a[6];
        const char *msg;
    } cases[] = {
            {{NULL}, "missing command (see pickboxctl --help)"},
            {{"-j", NULL}, "missing command (see pickboxctl --help)"},
            {{"stauts", NULL},
             "unknown command 'stauts' (commands: status, hello, sync, "
             "conflicts)"},
            {{"status", "extra", NULL},
             "wrong number of arguments for 'status' (usage: pickboxctl status)"},
            {{"--jsn", "status", NULL}, "unknown option '--jsn' (see pickboxctl --help)"},
            {{"-x", "status", NULL}, "unknown option '-x' (see pickboxctl --help)"},
            {{"status", "-s", NULL}, "option '-s' requires a value"},
            {{"-t", "0", "status", NULL}, "bad timeout '0' (expected seconds > 0, e.g. 5 or 0.5)"},
            {{"-t", "-1", "status", NULL},
             "bad timeout '-1' (expected seconds > 0, e.g. 5 or 0.5)"},
            {{"-t", "1e3", "status", NULL},
             "bad timeout '1e3' (expected seconds > 0, e.g. 5 or 0.5)"},
            {{"-t", "inf", "status", NULL},
             "bad timeout 'inf' (expected seconds > 0, e.g. 5 or 0.5)"},
            {{"-t", "86401", "status", NULL},
             "bad timeout '86401' (expected seconds > 0, e.g. 5 or 0.5)"},
            {{"-n", "a", "-n", "b", NULL}, "-n/--node given more than once"},
    };
    for (size_t i = 0; i < PB_ARRAY_SIZE(cases); i++) {
        char *argv[8];
        int argc = 0;
        argv[argc++] = (char *)"pickboxctl";
        for (size_t k = 0; cases[i].a[k] != NULL; k++)
            argv[argc++] = (char *)cases[i].a[k];
        argv[argc] = NULL;
        struct pbctl_options o;
        struct pb_error err;
        ck_assert_int_eq(pbctl_parse_args(argc, argv, &o, &err), -EINVAL);
        ck_assert_str_eq(err.msg, cases[i].msg);
    }
}
END_TEST

START_TEST(test_params_from_arguments)
{
    /* A command with arguments, as future rows of the table will have. */
    static const struct pbctl_command join = {
            .name = "join",
            .args = {"id", "address"},
            .min_args = 1,
            .method = "join",
            .help = "add a member",
    };
    char *args[] = {(char *)"n3", (char *)"10.0.0.3:8010"};
    struct pbctl_options o = {.cmd = &join, .args = args, .nargs = 2};
    json_t *p = pbctl_params(&o);
    json_t *want = parse("{\"id\":\"n3\",\"address\":\"10.0.0.3:8010\"}");
    ck_assert(json_equal(p, want));
    json_decref(p);
    json_decref(want);
}
END_TEST

/* ---- socket resolution --------------------------------------------------------- */

static void touch(const char *rel)
{
    char path[PATH_MAX + 64];
    snprintf(path, sizeof(path), "%s/%s", tmpdir, rel);
    char *slash = strrchr(path, '/');
    *slash = '\0';
    mkdir(path, 0755);
    *slash = '/';
    FILE *f = fopen(path, "w");
    ck_assert_ptr_nonnull(f);
    fclose(f);
}

START_TEST(test_socket_resolution)
{
    struct pb_error err;
    char *path;
    char want[PATH_MAX + 64];
    ck_assert_int_eq(pbctl_socket_resolve("/a.sock", NULL, "/env.sock", tmpdir, &path, &err), 0);
    ck_assert_str_eq(path, "/a.sock");
    free(path);
    ck_assert_int_eq(pbctl_socket_resolve(NULL, "node1", "/env.sock", tmpdir, &path, &err), 0);
    snprintf(want, sizeof(want), "%s/node1/control.sock", tmpdir);
    ck_assert_str_eq(path, want);
    free(path);
    ck_assert_int_eq(pbctl_socket_resolve(NULL, "node1", NULL, NULL, &path, &err), 0);
    ck_assert_str_eq(path, "/run/pickbox/node1/control.sock");
    free(path);
    ck_assert_int_eq(pbctl_socket_resolve(NULL, NULL, "/env.sock", tmpdir, &path, &err), 0);
    ck_assert_str_eq(path, "/env.sock");
    free(path);

    ck_assert_int_eq(pbctl_socket_resolve("/a", "n1", NULL, tmpdir, &path, &err), -EINVAL);
    ck_assert_str_eq(err.msg, "use either -s PATH or -n NAME, not both");
    ck_assert_int_eq(pbctl_socket_resolve(NULL, "../etc", NULL, tmpdir, &path, &err), -EINVAL);
    ck_assert_str_eq(err.msg, "-n: bad node name '../etc' (1-64 of A-Z a-z 0-9 . _ -, not "
                              "starting with '.' or '-')");
    ck_assert_ptr_null(path);

    /* Nothing there, one node, two nodes. An empty $PICKBOX_SOCKET counts as unset. */
    ck_assert_int_eq(pbctl_socket_resolve(NULL, NULL, "", tmpdir, &path, &err), -EINVAL);
    snprintf(want, sizeof(want),
             "no control socket found in %s; choose one with -s PATH or -n NAME (or set "
             "PICKBOX_SOCKET)",
             tmpdir);
    ck_assert_str_eq(err.msg, want);
    touch("n1/control.sock");
    touch("n2/other.sock");
    ck_assert_int_eq(pbctl_socket_resolve(NULL, NULL, NULL, tmpdir, &path, &err), 0);
    snprintf(want, sizeof(want), "%s/n1/control.sock", tmpdir);
    ck_assert_str_eq(path, want);
    free(path);
    touch("n2/control.sock");
    ck_assert_int_eq(pbctl_socket_resolve(NULL, NULL, NULL, tmpdir, &path, &err), -EINVAL);
    snprintf(want, sizeof(want),
             "2 nodes run here (%s/*/control.sock); choose one with -n NAME or -s PATH", tmpdir);
    ck_assert_str_eq(err.msg, want);
}
END_TEST

/* ---- exit codes against a fixture server ----------------------------------------- */

enum srv_mode {
    SRV_REPLY,     /* send reply, close */
    SRV_CLOSE,     /* close without replying */
    SRV_HANG,      /* never reply; wait for the client to go away */
    SRV_BIG,       /* send more than CTL_MAX_LINE bytes without a newline */
    SRV_NO_ACCEPT, /* never accept: the client times out connected */
};

struct srv {
    char path[108];
    int lfd;
    enum srv_mode mode;
    const char *reply;
    char got[4096]; /* the request line received */
    pthread_t thread;
};

static void *srv_main(void *arg)
{
    struct srv *s = arg;
    int fd = accept(s->lfd, NULL, NULL);
    if (fd < 0)
        return NULL;
    size_t used = 0;
    while (used + 1 < sizeof(s->got)) {
        ssize_t n = read(fd, s->got + used, 1);
        if (n <= 0 || s->got[used] == '\n')
            break;
        used++;
    }
    s->got[used] = '\0';
    switch (s->mode) {
    case SRV_REPLY:
        (void)!send(fd, s->reply, strlen(s->reply), MSG_NOSIGNAL);
        break;
    case SRV_BIG: {
        char *big = pb_xmalloc(64 * 1024);
        memset(big, 'x', 64 * 1024);
        for (int i = 0; i < 20; i++) {
            if (send(fd, big, 64 * 1024, MSG_NOSIGNAL) < 0)
                break;
        }
        free(big);
        break;
    }
    case SRV_HANG: {
        char c;
        while (read(fd, &c, 1) > 0) {
        }
        break;
    }
    default:
        break;
    }
    close(fd);
    return NULL;
}

static void srv_start(struct srv *s, const char *rel, enum srv_mode mode, const char *reply)
{
    memset(s, 0, sizeof(*s));
    snprintf(s->path, sizeof(s->path), "%s/%s", tmpdir, rel);
    char dir[sizeof(s->path)];
    snprintf(dir, sizeof(dir), "%s", s->path);
    *strrchr(dir, '/') = '\0';
    mkdir(dir, 0755);
    s->mode = mode;
    s->reply = reply;
    s->lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    ck_assert_int_ge(s->lfd, 0);
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", s->path);
    ck_assert_int_eq(bind(s->lfd, (struct sockaddr *)&sa, sizeof(sa)), 0);
    ck_assert_int_eq(listen(s->lfd, 4), 0);
    if (mode != SRV_NO_ACCEPT)
        ck_assert_int_eq(pthread_create(&s->thread, NULL, srv_main, s), 0);
}

static void srv_stop(struct srv *s)
{
    if (s->mode != SRV_NO_ACCEPT)
        pthread_join(s->thread, NULL);
    close(s->lfd);
    unlink(s->path);
}

struct run_out {
    int rc;
    char *out;
    char *err;
};

/* Runs pickboxctl with run_dir = tmpdir and the given arguments. */
static struct run_out run(const char *env_socket, ...)
{
    char *argv[32];
    int argc = 0;
    argv[argc++] = (char *)"pickboxctl";
    va_list ap;
    va_start(ap, env_socket);
    const char *a;
    while ((a = va_arg(ap, const char *)) != NULL)
        argv[argc++] = (char *)a;
    va_end(ap);
    argv[argc] = NULL;

    struct run_out r = {0};
    size_t ol = 0, el = 0;
    FILE *out = open_memstream(&r.out, &ol);
    FILE *err = open_memstream(&r.err, &el);
    struct pbctl_env env = {.out = out, .err = err, .run_dir = tmpdir, .env_socket = env_socket};
    r.rc = pbctl_run(argc, argv, &env);
    fclose(out);
    fclose(err);
    return r;
}

static void run_free(struct run_out *r)
{
    free(r->out);
    free(r->err);
}

START_TEST(test_exit_ok_text_and_json)
{
    struct srv s;
    char reply[sizeof(sample_status) + 64];
    snprintf(reply, sizeof(reply), "{\"id\":1,\"result\":%s}\n", sample_status);
    srv_start(&s, "n1/control.sock", SRV_REPLY, reply);
    struct run_out r = run(NULL, "-n", "n1", "status", NULL);
    srv_stop(&s);
    ck_assert_int_eq(r.rc, PBCTL_EXIT_OK);
    ck_assert_str_eq(r.out, sample_status_text);
    ck_assert_str_eq(r.err, "");
    ck_assert_str_eq(s.got, "{\"id\":1,\"method\":\"status\",\"params\":{}}");
    run_free(&r);

    /* Found as the only socket under the run directory, --json after the command. */
    srv_start(&s, "n1/control.sock", SRV_REPLY, reply);
    r = run(NULL, "status", "--json", NULL);
    srv_stop(&s);
    ck_assert_int_eq(r.rc, PBCTL_EXIT_OK);
    ck_assert_str_eq(r.out, sample_status_json);
    run_free(&r);
}
END_TEST

START_TEST(test_exit_hello_via_env_socket)
{
    struct srv s;
    srv_start(&s, "x/ctl.sock", SRV_REPLY,
              "{\"id\":1,\"result\":{\"protocol\":1,\"version\":\"0.1.0\",\"node_id\":\"n9\"}}\n");
    struct run_out r = run(s.path, "hello", NULL);
    srv_stop(&s);
    ck_assert_int_eq(r.rc, PBCTL_EXIT_OK);
    ck_assert_str_eq(r.out, "node:     n9\nversion:  0.1.0\nprotocol: 1\n");
    ck_assert_str_eq(s.got, "{\"id\":1,\"method\":\"hello\",\"params\":{}}");
    run_free(&r);
}
END_TEST

START_TEST(test_exit_daemon_error)
{
    struct srv s;
    const char *reply = "{\"id\":1,\"error\":{\"code\":\"NOT_LEADER\",\"message\":\"n1 is a "
                        "follower\",\"data\":{\"leader\":\"n2\"}}}\n";
    srv_start(&s, "n1/control.sock", SRV_REPLY, reply);
    struct run_out r = run(NULL, "-n", "n1", "status", NULL);
    srv_stop(&s);
    ck_assert_int_eq(r.rc, PBCTL_EXIT_DAEMON);
    ck_assert_str_eq(r.out, "");
    ck_assert_str_eq(r.err, "pickboxctl: n1 is a follower (NOT_LEADER)\n");
    run_free(&r);

    srv_start(&s, "n1/control.sock", SRV_REPLY, reply);
    r = run(NULL, "-n", "n1", "--json", "status", NULL);
    srv_stop(&s);
    ck_assert_int_eq(r.rc, PBCTL_EXIT_DAEMON);
    ck_assert_str_eq(r.out, "{\"code\":\"NOT_LEADER\",\"message\":\"n1 is a follower\","
                            "\"data\":{\"leader\":\"n2\"}}\n");
    ck_assert_str_eq(r.err, "pickboxctl: n1 is a follower (NOT_LEADER)\n");
    run_free(&r);
}
END_TEST

START_TEST(test_exit_bad_replies)
{
    static const struct {
        const char *reply;
        const char *err;
    } cases[] = {
            {"garbage\n", "pickboxctl: bad reply from pickboxd: not JSON ("},
            {"[1]\n", "pickboxctl: bad reply from pickboxd: not a JSON object\n"},
            {"{\"id\":2,\"result\":{}}\n",
             "pickboxctl: bad reply from pickboxd: missing or unexpected \"id\"\n"},
            {"{\"id\":1}\n", "pickboxctl: bad reply from pickboxd: expected exactly one of "
                             "\"result\" and \"error\"\n"},
            {"{\"id\":1,\"result\":{},\"error\":{}}\n",
             "pickboxctl: bad reply from pickboxd: expected exactly one of \"result\" and "
             "\"error\"\n"},
            {"{\"id\":1,\"result\":[]}\n",
             "pickboxctl: bad reply from pickboxd: \"result\" is not an object\n"},
            {"{\"id\":1,\"error\":{\"code\":1}}\n",
             "pickboxctl: bad reply from pickboxd: \"error\" lacks a string code and message\n"},
            {"{\"id\":1,\"result\":{},\"result\":{}}\n",
             "pickboxctl: bad reply from pickboxd: not JSON ("},
            {"{\"id\":1,\"result\":{}}", /* no newline, then closed */
             "pickboxctl: pickboxd closed the connection in the middle of a reply\n"},
    };
    for (size_t i = 0; i < PB_ARRAY_SIZE(cases); i++) {
        struct srv s;
        srv_start(&s, "n1/control.sock", SRV_REPLY, cases[i].reply);
        struct run_out r = run(NULL, "-n", "n1", "status", NULL);
        srv_stop(&s);
        ck_assert_int_eq(r.rc, PBCTL_EXIT_DAEMON);
        ck_assert_str_eq(r.out, "");
        ck_assert_msg(strncmp(r.err, cases[i].err, strlen(cases[i].err)) == 0, "case %zu: got '%s'",
                      i, r.err);
        /* One line. */
        ck_assert_ptr_eq(strchr(r.err, '\n'), r.err + strlen(r.err) - 1);
        run_free(&r);
    }
}
END_TEST

START_TEST(test_exit_closed_and_oversized)
{
    struct srv s;
    srv_start(&s, "n1/control.sock", SRV_CLOSE, NULL);
    struct run_out r = run(NULL, "-n", "n1", "status", NULL);
    srv_stop(&s);
    ck_assert_int_eq(r.rc, PBCTL_EXIT_DAEMON);
    ck_assert_str_eq(r.err, "pickboxctl: pickboxd closed the connection without replying\n");
    run_free(&r);

    srv_start(&s, "n1/control.sock", SRV_BIG, NULL);
    r = run(NULL, "-n", "n1", "status", NULL);
    srv_stop(&s);
    ck_assert_int_eq(r.rc, PBCTL_EXIT_DAEMON);
    ck_assert_str_eq(r.err, "pickboxctl: bad reply from pickboxd: longer than 1048576 bytes\n");
    run_free(&r);
}
END_TEST

START_TEST(test_exit_timeout)
{
    struct srv s;
    srv_start(&s, "n1/control.sock", SRV_HANG, NULL);
    uint64_t t0 = pb_now_ms();
    struct run_out r = run(NULL, "-n", "n1", "-t", "0.2", "status", NULL);
    uint64_t took = pb_now_ms() - t0;
    srv_stop(&s); /* the client closed its end, so the fixture's read ends */
    ck_assert_int_eq(r.rc, PBCTL_EXIT_DAEMON);
    ck_assert_str_eq(r.err, "pickboxctl: no reply from pickboxd within 200 ms\n");
    ck_assert_uint_ge(took, 200);
    ck_assert_uint_lt(took, 5000);
    run_free(&r);

    /* Connected but never accepted: the request fits the socket buffer, the reply never comes. */
    srv_start(&s, "n1/control.sock", SRV_NO_ACCEPT, NULL);
    r = run(NULL, "-n", "n1", "-t", "0.1", "status", NULL);
    srv_stop(&s);
    ck_assert_int_eq(r.rc, PBCTL_EXIT_DAEMON);
    ck_assert_str_eq(r.err, "pickboxctl: no reply from pickboxd within 100 ms\n");
    run_free(&r);
}
END_TEST

START_TEST(test_exit_cannot_connect)
{
    struct run_out r = run(NULL, "-n", "node1", "status", NULL);
    ck_assert_int_eq(r.rc, PBCTL_EXIT_CONNECT);
    char want[PATH_MAX + 200];
    snprintf(want, sizeof(want),
             "pickboxctl: cannot connect to %s/node1/control.sock: No such file or directory "
             "(is pickboxd@node1 running?)\n",
             tmpdir);
    ck_assert_str_eq(r.err, want);
    ck_assert_str_eq(r.out, "");
    run_free(&r);

    /* A socket file nobody listens on. */
    struct srv s;
    srv_start(&s, "n1/control.sock", SRV_NO_ACCEPT, NULL);
    close(s.lfd); /* the file stays, nobody listens */
    r = run(NULL, "-s", s.path, "status", NULL);
    ck_assert_int_eq(r.rc, PBCTL_EXIT_CONNECT);
    snprintf(want, sizeof(want),
             "pickboxctl: cannot connect to %s: Connection refused (is pickboxd@n1 running?)\n",
             s.path);
    ck_assert_str_eq(r.err, want);
    run_free(&r);

    r = run(NULL, "-s", "/nonexistent/x.sock", "status", NULL);
    ck_assert_int_eq(r.rc, PBCTL_EXIT_CONNECT);
    ck_assert_str_eq(r.err, "pickboxctl: cannot connect to /nonexistent/x.sock: No such file or "
                            "directory (is pickboxd running?)\n");
    run_free(&r);
}
END_TEST

START_TEST(test_exit_connect_backlog_full)
{
    struct srv s;
    srv_start(&s, "n1/control.sock", SRV_NO_ACCEPT, NULL);
    /* Fill the backlog of 4 (and the one extra Linux allows) with idle clients. */
    int idle[8];
    size_t n_idle = 0;
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", s.path);
    for (; n_idle < PB_ARRAY_SIZE(idle); n_idle++) {
        idle[n_idle] = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0);
        ck_assert_int_ge(idle[n_idle], 0);
        if (connect(idle[n_idle], (struct sockaddr *)&sa, sizeof(sa)) < 0) {
            ck_assert_int_eq(errno, EAGAIN);
            close(idle[n_idle]);
            break;
        }
    }
    ck_assert_uint_lt(n_idle, PB_ARRAY_SIZE(idle));
    uint64_t t0 = pb_now_ms();
    struct run_out r = run(NULL, "-n", "n1", "-t", "0.2", "status", NULL);
    uint64_t took = pb_now_ms() - t0;
    for (size_t i = 0; i < n_idle; i++)
        close(idle[i]);
    srv_stop(&s);
    ck_assert_int_eq(r.rc, PBCTL_EXIT_CONNECT);
    char want[PATH_MAX + 200];
    snprintf(want, sizeof(want),
             "pickboxctl: cannot connect to %s: not accepting connections within 200 ms (is "
             "pickboxd@n1 stuck?)\n",
             s.path);
    ck_assert_str_eq(r.err, want);
    ck_assert_uint_ge(took, 190);
    ck_assert_uint_lt(took, 5000);
    run_free(&r);
}
END_TEST

START_TEST(test_exit_usage)
{
    struct run_out r = run(NULL, "status", NULL); /* empty run dir, no env */
    ck_assert_int_eq(r.rc, PBCTL_EXIT_USAGE);
    ck_assert(strncmp(r.err, "pickboxctl: no control socket found in ", 39) == 0);
    run_free(&r);
    r = run(NULL, "-s", "/a", "-n", "b", "status", NULL);
    ck_assert_int_eq(r.rc, PBCTL_EXIT_USAGE);
    ck_assert_str_eq(r.err, "pickboxctl: use either -s PATH or -n NAME, not both\n");
    run_free(&r);
    r = run(NULL, "frobnicate", NULL);
    ck_assert_int_eq(r.rc, PBCTL_EXIT_USAGE);
    ck_assert_str_eq(r.err, "pickboxctl: unknown command 'frobnicate' (commands: status, "
                            "hello, sync, conflicts)\n");
    run_free(&r);
}
END_TEST

START_TEST(test_help_and_version)
{
    struct run_out r = run(NULL, "--help", NULL);
    ck_assert_int_eq(r.rc, PBCTL_EXIT_OK);
    for (const struct pbctl_command *c = pbctl_commands; c->name != NULL; c++) {
        ck_assert_msg(strstr(r.out, c->name) != NULL, "help lacks %s", c->name);
        ck_assert_msg(strstr(r.out, c->help) != NULL, "help lacks %s's help", c->name);
    }
    static const char *const opts[] = {"--socket", "--node", "--json",   "--timeout",
                                       "[10]",     "--help", "--version"};
    for (size_t i = 0; i < PB_ARRAY_SIZE(opts); i++)
        ck_assert_msg(strstr(r.out, opts[i]) != NULL, "help lacks %s", opts[i]);
    ck_assert_str_eq(r.err, "");
    run_free(&r);
    r = run(NULL, "--version", NULL);
    ck_assert_int_eq(r.rc, PBCTL_EXIT_OK);
    ck_assert_str_eq(r.out, "pickboxctl " PACKAGE_VERSION "\n");
    run_free(&r);
}
END_TEST

/* Runs the built program with PICKBOX_SOCKET=env_socket (NULL: unset);
 * returns its exit status and its stderr (in errbuf). */
static int run_binary(const char *env_socket, char *errbuf, size_t errlen, const char *arg1,
                      const char *arg2)
{
    const char *builddir = getenv("top_builddir");
    ck_assert_msg(builddir != NULL, "top_builddir is not set (run through make check)");
    char bin[PATH_MAX];
    snprintf(bin, sizeof(bin), "%s/src/pickboxctl/pickboxctl", builddir);
    char errpath[128];
    snprintf(errpath, sizeof(errpath), "%s/stderr", tmpdir);
    pid_t pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        FILE *e = freopen(errpath, "w", stderr);
        FILE *o = freopen("/dev/null", "w", stdout);
        if (e == NULL || o == NULL)
            _exit(120);
        if (env_socket)
            setenv("PICKBOX_SOCKET", env_socket, 1);
        else
            unsetenv("PICKBOX_SOCKET");
        execl(bin, "pickboxctl", arg1, arg2, (char *)NULL);
        _exit(127);
    }
    int status;
    ck_assert_int_eq(waitpid(pid, &status, 0), pid);
    ck_assert(WIFEXITED(status));
    FILE *f = fopen(errpath, "r");
    ck_assert_ptr_nonnull(f);
    size_t n = fread(errbuf, 1, errlen - 1, f);
    errbuf[n] = '\0';
    fclose(f);
    return WEXITSTATUS(status);
}

START_TEST(test_binary_exit_codes)
{
    char err[1024];
    ck_assert_int_eq(run_binary(NULL, err, sizeof(err), "--version", NULL), PBCTL_EXIT_OK);
    ck_assert_str_eq(err, "");
    ck_assert_int_eq(run_binary(NULL, err, sizeof(err), "-s", NULL), PBCTL_EXIT_USAGE);
    ck_assert_str_eq(err, "pickboxctl: option '-s' requires a value\n");
    /* $PICKBOX_SOCKET reaches the program. */
    ck_assert_int_eq(run_binary("/nonexistent/ctl.sock", err, sizeof(err), "status", NULL),
                     PBCTL_EXIT_CONNECT);
    ck_assert_str_eq(err, "pickboxctl: cannot connect to /nonexistent/ctl.sock: No such file or "
                          "directory (is pickboxd running?)\n");
}
END_TEST

static Suite *pickboxctl_suite(void)
{
    Suite *s = suite_create("pickboxctl");
    TCase *tc = tcase_create("render");
    tcase_add_test(tc, test_render_status_text);
    tcase_add_test(tc, test_render_status_json_is_the_result);
    tcase_add_test(tc, test_render_generic_values);
    tcase_add_test(tc, test_render_empty_members_table);
    tcase_add_test(tc, test_formatters);
    suite_add_tcase(s, tc);

    tc = tcase_create("args");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, test_parse_args);
    tcase_add_test(tc, test_parse_args_errors);
    tcase_add_test(tc, test_params_from_arguments);
    tcase_add_test(tc, test_socket_resolution);
    suite_add_tcase(s, tc);

    tc = tcase_create("run");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, test_exit_ok_text_and_json);
    tcase_add_test(tc, test_exit_hello_via_env_socket);
    tcase_add_test(tc, test_exit_daemon_error);
    tcase_add_test(tc, test_exit_bad_replies);
    tcase_add_test(tc, test_exit_closed_and_oversized);
    tcase_add_test(tc, test_exit_timeout);
    tcase_add_test(tc, test_exit_cannot_connect);
    tcase_add_test(tc, test_exit_connect_backlog_full);
    tcase_add_test(tc, test_exit_usage);
    tcase_add_test(tc, test_help_and_version);
    tcase_add_test(tc, test_binary_exit_codes);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(pickboxctl_suite());
    srunner_run_all(sr, CK_ENV);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}

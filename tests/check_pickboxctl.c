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
#include <poll.h>
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
#include "pickboxctl/bench.h"
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
        "{\"node_id\":\"n1\",\"raft_id\":\"00c0ffee00c0ffee\",\"cluster_id\":"
        "\"0123456789abcdef0123456789abcde"
        "f\",\"role\":\"leader\",\"term\":4,\"leader_id\":\"n1\",\"commit_index\":120,\"applied_"
        "index\":119,\"last_"
        "index\":121,\"snapshot_index\":100,\"joining\":false,\"storage_error\":null,\"uptime_s\":"
        "3725,\"extr"
        "a_info\":\"e\",\"members\":[{\"id\":\"n1\",\"raft_id\":\"00c0ffee00c0ffee\",\"address\":"
        "\"127.0.0.1:8010\","
        "\"voter\":true,\"self\":true,\"reachable\":null,\"match_index\":120,\"lag\":0,\"last_"
        "contact_ms\":null"
        "},{\"id\":\"n2\",\"raft_id\":\"1111111111111111\",\"address\":\"127.0.0.1:8011\","
        "\"voter\":true,\"self\":f"
        "alse,\"reachable\":true,\"match_index\":118,\"lag\":2,\"last_contact_ms\":40},{\"id\":"
        "\"n3\",\"raft_id\""
        ":\"2222222222222222\",\"address\":\"[::1]:8012\",\"voter\":false,\"self\":false,"
        "\"reachable\":false,\"m"
        "atch_index\":0,\"lag\":120,\"last_contact_ms\":12500,\"note\":\"x\"}]}";

static const char sample_status_text[] = "node:           n1\n"
                                         "raft id:        00c0ffee00c0ffee\n"
                                         "cluster id:     0123456789abcdef0123456789abcdef\n"
                                         "role:           leader\n"
                                         "joining:        no\n"
                                         "term:           4\n"
                                         "leader:         n1\n"
                                         "commit index:   120\n"
                                         "applied index:  119\n"
                                         "last log index: 121\n"
                                         "snapshot index: 100\n"
                                         "uptime:         1h2m5s\n"
                                         "storage error:  none\n"
                                         "extra info:     e\n"
                                         "members:\n"
                                         "  ID  SELF  ADDRESS         ROLE     REACHABLE  MATCH  "
                                         "LAG  LAST CONTACT  RAFT ID           NOTE\n"
                                         "  n1  *     127.0.0.1:8010  voter    -          120    0 "
                                         "   -             00c0ffee00c0ffee  -\n"
                                         "  n2        127.0.0.1:8011  voter    yes        118    2 "
                                         "   40ms ago      1111111111111111  -\n"
                                         "  n3        [::1]:8012      learner  no         0      "
                                         "120  12.5s ago     2222222222222222  x\n";

/* The JSON backend writes the view's keys first, then the others. */
static const char sample_status_json[] =
        "{\"node_id\":\"n1\",\"raft_id\":\"00c0ffee00c0ffee\",\"cluster_id\":"
        "\"0123456789abcdef0123456789abcde"
        "f\",\"role\":\"leader\",\"joining\":false,\"term\":4,\"leader_id\":\"n1\",\"commit_"
        "index\":120,\"applied_i"
        "ndex\":119,\"last_index\":121,\"snapshot_index\":100,\"uptime_s\":3725,\"storage_error\":"
        "null,\"memb"
        "ers\":[{\"id\":\"n1\",\"self\":true,\"address\":\"127.0.0.1:8010\",\"voter\":true,"
        "\"reachable\":null,\"mat"
        "ch_index\":120,\"lag\":0,\"last_contact_ms\":null,\"raft_id\":\"00c0ffee00c0ffee\"},{"
        "\"id\":\"n2\",\"sel"
        "f\":false,\"address\":\"127.0.0.1:8011\",\"voter\":true,\"reachable\":true,\"match_"
        "index\":118,\"lag\":"
        "2,\"last_contact_ms\":40,\"raft_id\":\"1111111111111111\"},{\"id\":\"n3\",\"self\":false,"
        "\"address\":\"[:"
        ":1]:8012\",\"voter\":false,\"reachable\":false,\"match_index\":0,\"lag\":120,\"last_"
        "contact_ms\":1250"
        "0,\"raft_id\":\"2222222222222222\",\"note\":\"x\"}],\"extra_info\":\"e\"}\n";

static const char sample_status_failing_text[] =
        "STORAGE ERROR:  FAILING for 1m15s: disk I/O error (not acknowledging writes)\n"
        "node:           n1\n"
        "raft id:        00c0ffee00c0ffee\n"
        "cluster id:     0123456789abcdef0123456789abcdef\n"
        "role:           leader\n"
        "joining:        no\n"
        "term:           4\n"
        "leader:         n1\n"
        "commit index:   120\n"
        "applied index:  119\n"
        "last log index: 121\n"
        "snapshot index: 100\n"
        "uptime:         1h2m5s\n"
        "extra info:     e\n"
        "members:\n"
        "  ID  SELF  ADDRESS         ROLE     REACHABLE  MATCH  LAG  LAST CONTACT  RAFT ID         "
        "  NOTE\n"
        "  n1  *     127.0.0.1:8010  voter    -          120    0    -             "
        "00c0ffee00c0ffee  -\n"
        "  n2        127.0.0.1:8011  voter    yes        118    2    40ms ago      "
        "1111111111111111  -\n"
        "  n3        [::1]:8012      learner  no         0      120  12.5s ago     "
        "2222222222222222  x\n";

static const char sample_members[] =
        "{\"members\":[{\"id\":\"n1\",\"raft_id\":\"00c0ffee00c0ffee\",\"address\":\"127.0.0.1:"
        "8010\",\"voter\":tru"
        "e,\"self\":true,\"reachable\":null,\"match_index\":120,\"lag\":0,\"last_contact_ms\":null}"
        ",{\"id\":\"n2"
        "\",\"raft_id\":\"1111111111111111\",\"address\":\"127.0.0.1:8011\",\"voter\":true,"
        "\"self\":false,\"reach"
        "able\":true,\"match_index\":118,\"lag\":2,\"last_contact_ms\":40},{\"id\":\"n3\",\"raft_"
        "id\":\"222222222"
        "2222222\",\"address\":\"[::1]:8012\",\"voter\":false,\"self\":false,\"reachable\":false,"
        "\"match_index\""
        ":0,\"lag\":120,\"last_contact_ms\":12500,\"note\":\"x\"}]}";

static const char sample_members_text[] = "members:\n"
                                          "  ID  SELF  ADDRESS         ROLE     REACHABLE  MATCH  "
                                          "LAG  LAST CONTACT  RAFT ID           NOTE\n"
                                          "  n1  *     127.0.0.1:8010  voter    -          120    "
                                          "0    -             00c0ffee00c0ffee  -\n"
                                          "  n2        127.0.0.1:8011  voter    yes        118    "
                                          "2    40ms ago      1111111111111111  -\n"
                                          "  n3        [::1]:8012      learner  no         0      "
                                          "120  12.5s ago     2222222222222222  x\n";

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
    ck_assert_str_eq(out, "name:     a?[31mb\n"
                          "ratio:    0.5\n"
                          "off:      -\n"
                          "ok:       no\n"
                          "tags:     x, 1, yes\n"
                          "none:     (none)\n"
                          "nested k: 1, 2\n"
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
             "unknown command 'stauts' (commands: status, hello, members, join, leave, remove, "
             "transfer, probe, bench, sync, conflicts, metrics)"},
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

/* metrics prints the exposition as is; --json keeps it in a string. */
START_TEST(test_metrics_raw_and_json)
{
    static const char reply[] =
            "{\"id\":1,\"result\":{\"text\":\"# TYPE a gauge\\na{p=\\\"x\\\"} 1\\n\"}}\n";
    struct srv s;
    srv_start(&s, "n1/control.sock", SRV_REPLY, reply);
    struct run_out r = run(NULL, "metrics", NULL);
    srv_stop(&s);
    ck_assert_int_eq(r.rc, PBCTL_EXIT_OK);
    ck_assert_str_eq(r.out, "# TYPE a gauge\na{p=\"x\"} 1\n");
    ck_assert_str_eq(s.got, "{\"id\":1,\"method\":\"metrics\",\"params\":{}}");
    run_free(&r);

    srv_start(&s, "n1/control.sock", SRV_REPLY, reply);
    r = run(NULL, "--json", "metrics", NULL);
    srv_stop(&s);
    ck_assert_int_eq(r.rc, PBCTL_EXIT_OK);
    json_t *j = json_loads(r.out, 0, NULL);
    ck_assert_ptr_nonnull(j);
    ck_assert_str_eq(json_string_value(json_object_get(j, "text")),
                     "# TYPE a gauge\na{p=\"x\"} 1\n");
    json_decref(j);
    run_free(&r);
}
END_TEST

/* What render_metrics asks to choose between the two. */
START_TEST(test_writer_is_text)
{
    struct pbctl_writer *t = pbctl_writer_text_new(stdout), *j = pbctl_writer_json_new(stdout);
    ck_assert(pbctl_writer_is_text(t));
    ck_assert(!pbctl_writer_is_text(j));
    pbctl_writer_free(t);
    pbctl_writer_free(j);
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
                            "hello, members, join, leave, remove, transfer, probe, bench, "
                            "sync, conflicts, metrics)\n");
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

/* ---- cluster commands: status with a storage error, members ------------------- */

/* Renders result with the command's own render function and view. */
static char *render_cmd(const char *name, const json_t *r, bool json)
{
    const struct pbctl_command *c = pbctl_command_find(name);
    ck_assert_ptr_nonnull(c);
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    ck_assert_ptr_nonnull(f);
    struct pbctl_writer *w = json ? pbctl_writer_json_new(f) : pbctl_writer_text_new(f);
    pbctl_render_fn fn = c->render ? c->render : pbctl_render;
    ck_assert_int_eq(fn(c->view, r, w), 0);
    pbctl_writer_free(w);
    fclose(f);
    return buf;
}

START_TEST(test_render_status_storage_error_first)
{
    json_t *st = parse(sample_status);
    json_object_set_new(st, "storage_error",
                        parse("{\"message\":\"disk I/O error\",\"since_s\":75}"));
    char *out = render_cmd("status", st, false);
    ck_assert_str_eq(out, sample_status_failing_text);
    free(out);
    out = render_cmd("status", st, true);
    json_t *back = parse(out);
    ck_assert(json_equal(back, st));
    ck_assert_str_eq(json_object_iter_key(json_object_iter(back)), "storage_error");
    json_decref(back);
    free(out);
    /* Healthy: the same command renders the sample as the plain view does. */
    json_object_set_new(st, "storage_error", json_null());
    out = render_cmd("status", st, false);
    ck_assert_str_eq(out, sample_status_text);
    ck_assert_ptr_null(strstr(out, "STORAGE ERROR"));
    ck_assert_ptr_nonnull(strstr(out, "storage error:  none\n"));
    free(out);
    json_decref(st);
}
END_TEST

START_TEST(test_render_members)
{
    json_t *m = parse(sample_members);
    char *out = render_cmd("members", m, false);
    ck_assert_str_eq(out, sample_members_text);
    free(out);
    out = render_cmd("members", m, true);
    json_t *back = parse(out);
    ck_assert(json_equal(back, m));
    json_decref(back);
    free(out);
    json_decref(m);
}
END_TEST

START_TEST(test_parse_cluster_commands)
{
    struct pbctl_options o;
    struct pb_error err;
    char *argv[32];
    json_t *p, *want;

    ck_assert_int_eq(parse_args(&o, &err, argv, "join", "10.0.0.1:8010", NULL), 0);
    ck_assert_str_eq(o.cmd->method, "join");
    ck_assert_int_eq(o.timeout_ms, 35000); /* joining waits for catch-up */
    p = pbctl_params(&o);
    want = parse("{\"address\":\"10.0.0.1:8010\"}");
    ck_assert(json_equal(p, want));
    json_decref(p);
    json_decref(want);
    /* -t: our wait, and the daemon's one second shorter. */
    ck_assert_int_eq(parse_args(&o, &err, argv, "-t", "60", "join", "h:1", NULL), 0);
    ck_assert_int_eq(o.timeout_ms, 60000);
    p = pbctl_params(&o);
    want = parse("{\"address\":\"h:1\",\"timeout_s\":59}");
    ck_assert(json_equal(p, want));
    json_decref(p);
    json_decref(want);

    ck_assert_int_eq(parse_args(&o, &err, argv, "transfer", NULL), 0);
    p = pbctl_params(&o);
    ck_assert_int_eq(json_object_size(p), 0);
    json_decref(p);
    ck_assert_int_eq(parse_args(&o, &err, argv, "transfer", "n2", NULL), 0);
    p = pbctl_params(&o);
    ck_assert_str_eq(json_string_value(json_object_get(p, "node")), "n2");
    json_decref(p);
    ck_assert_int_eq(parse_args(&o, &err, argv, "remove", "n3", NULL), 0);
    p = pbctl_params(&o);
    ck_assert_str_eq(json_string_value(json_object_get(p, "node")), "n3");
    json_decref(p);
    ck_assert_int_eq(parse_args(&o, &err, argv, "leave", NULL), 0);
    ck_assert_str_eq(o.cmd->method, "leave");
    ck_assert_int_eq(parse_args(&o, &err, argv, "members", NULL), 0);

    /* probe: --size is an integer param, before or after the command. */
    ck_assert_int_eq(parse_args(&o, &err, argv, "--size", "100", "probe", NULL), 0);
    p = pbctl_params(&o);
    want = parse("{\"size\":100}");
    ck_assert(json_equal(p, want));
    json_decref(p);
    json_decref(want);
    ck_assert_int_eq(parse_args(&o, &err, argv, "probe", "--size=0", "-t", "0.5", NULL), 0);
    p = pbctl_params(&o);
    want = parse("{\"size\":0,\"timeout_s\":1}");
    ck_assert(json_equal(p, want));
    json_decref(p);
    json_decref(want);

    ck_assert_int_eq(parse_args(&o, &err, argv, "bench", NULL), 0);
    ck_assert_ptr_nonnull(o.cmd->run);
    ck_assert_uint_eq(o.opts_set, 0);
    ck_assert_int_eq(parse_args(&o, &err, argv, "bench", "--concurrency", "16", "--duration", "2.5",
                                "--size", "65536", "--json", NULL),
                     0);
    ck_assert_uint_eq(o.concurrency, 16);
    ck_assert_uint_eq(o.duration_ms, 2500);
    ck_assert_uint_eq(o.size, 65536);
    ck_assert(o.json);
}
END_TEST

START_TEST(test_parse_cluster_commands_errors)
{
    static const struct {
        const char *a[6];
        const char *msg;
    } cases[] = {
            {{"join", NULL},
             "wrong number of arguments for 'join' (usage: pickboxctl join ADDRESS)"},
            {{"remove", NULL},
             "wrong number of arguments for 'remove' (usage: pickboxctl remove NODE)"},
            {{"transfer", "a", "b", NULL},
             "wrong number of arguments for 'transfer' (usage: pickboxctl transfer [NODE])"},
            {{"leave", "now", NULL},
             "wrong number of arguments for 'leave' (usage: pickboxctl leave)"},
            {{"status", "--size", "1", NULL}, "option --size does not apply to 'status'"},
            {{"probe", "--concurrency", "2", NULL},
             "option --concurrency does not apply to 'probe'"},
            {{"--duration", "1", "join", "h:1", NULL},
             "option --duration does not apply to 'join'"},
            {{"probe", "--size", "65537", NULL}, "bad --size '65537' (expected 0..65536 bytes)"},
            {{"probe", "--size", "-1", NULL}, "bad --size '-1' (expected 0..65536 bytes)"},
            {{"bench", "--concurrency", "0", NULL},
             "bad --concurrency '0' (expected 1..512 connections)"},
            {{"bench", "--concurrency", "513", NULL},
             "bad --concurrency '513' (expected 1..512 connections)"},
            {{"bench", "--duration", "0", NULL},
             "bad --duration '0' (expected seconds > 0, e.g. 10 or 2.5)"},
            {{"bench", "--duration", "x", NULL},
             "bad --duration 'x' (expected seconds > 0, e.g. 10 or 2.5)"},
            {{"bench", "--size", NULL}, "option '--size' requires a value"},
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

/* ---- bench: statistics, configuration, a run against a fixture ------------------ */

START_TEST(test_hist_percentiles_exact_range)
{
    struct pbctl_hist h;
    pbctl_hist_init(&h);
    ck_assert_uint_eq(pbctl_hist_percentile(&h, 50), 0);
    /* 1..100 us, recorded in reverse: exact below 128 us. */
    for (uint64_t v = 100; v >= 1; v--)
        pbctl_hist_record(&h, v);
    ck_assert_uint_eq(h.count, 100);
    ck_assert_uint_eq(h.min_us, 1);
    ck_assert_uint_eq(h.max_us, 100);
    ck_assert_uint_eq(pbctl_hist_percentile(&h, 50), 50);
    ck_assert_uint_eq(pbctl_hist_percentile(&h, 90), 90);
    ck_assert_uint_eq(pbctl_hist_percentile(&h, 99), 99);
    ck_assert_uint_eq(pbctl_hist_percentile(&h, 99.5), 100);
    ck_assert_uint_eq(pbctl_hist_percentile(&h, 100), 100);
    ck_assert_uint_eq(pbctl_hist_percentile(&h, 0.1), 1);

    /* One value: every percentile is it. */
    pbctl_hist_init(&h);
    pbctl_hist_record(&h, 36600);
    ck_assert_uint_eq(pbctl_hist_percentile(&h, 50), 36600);
    ck_assert_uint_eq(pbctl_hist_percentile(&h, 99), 36600);
}
END_TEST

START_TEST(test_hist_percentiles_relative_error)
{
    struct pbctl_hist *h = pb_xmalloc(sizeof(*h));
    pbctl_hist_init(h);
    /* 1 ms .. 1000 ms in steps of 1 ms, plus 9,000 values at 0.5 ms: 10,000 samples. */
    for (uint64_t ms = 1; ms <= 1000; ms++)
        pbctl_hist_record(h, ms * 1000);
    for (int i = 0; i < 9000; i++)
        pbctl_hist_record(h, 500);
    ck_assert_uint_eq(h->count, 10000);
    ck_assert_uint_eq(h->sum_us, 500500000ull + 9000ull * 500);
    /* Ranks: p50 = 5000th (0.5 ms); p95 = 9500th = 500 ms; p99 = 9900th = 900 ms. */
    const struct {
        double p;
        uint64_t want;
    } cases[] = {{50, 500}, {90, 500}, {95, 500000}, {99, 900000}, {99.99, 999000}};
    for (size_t i = 0; i < PB_ARRAY_SIZE(cases); i++) {
        uint64_t got = pbctl_hist_percentile(h, cases[i].p);
        ck_assert_msg(got >= cases[i].want && got <= cases[i].want + cases[i].want / 64,
                      "p%g: got %llu, want %llu (+1/64)", cases[i].p, (unsigned long long)got,
                      (unsigned long long)cases[i].want);
    }
    ck_assert_uint_eq(pbctl_hist_percentile(h, 100), 1000000);
    /* Huge values land in the last bucket; max stays exact. */
    pbctl_hist_record(h, UINT64_MAX / 2);
    ck_assert_uint_eq(h->max_us, UINT64_MAX / 2);
    ck_assert_uint_eq(pbctl_hist_percentile(h, 100), UINT64_MAX / 2);
    ck_assert_uint_eq(h->buckets[PBCTL_HIST_BUCKETS - 1], 1);
    free(h);
}
END_TEST

START_TEST(test_bench_config_and_errors)
{
    struct pbctl_options o;
    struct pb_error err;
    char *argv[32];
    struct pbctl_bench_config cfg;
    ck_assert_int_eq(parse_args(&o, &err, argv, "bench", NULL), 0);
    ck_assert_int_eq(pbctl_bench_config_from_options(&o, &cfg, &err), 0);
    ck_assert_uint_eq(cfg.size, 256);
    ck_assert_uint_eq(cfg.concurrency, 64);
    ck_assert_uint_eq(cfg.duration_ms, 10000);
    ck_assert_uint_eq(cfg.warmup_ms, PBCTL_BENCH_WARMUP_MS);
    ck_assert_int_eq(parse_args(&o, &err, argv, "bench", "--duration", "0.05", NULL), 0);
    ck_assert_int_eq(pbctl_bench_config_from_options(&o, &cfg, &err), -EINVAL);
    ck_assert_str_eq(err.msg, "--duration must be at least 0.1 seconds");

    struct pbctl_bench_result *r = pb_xcalloc(1, sizeof(*r));
    pbctl_bench_count_error(r, "TIMEOUT");
    pbctl_bench_count_error(r, "NO_QUORUM");
    pbctl_bench_count_error(r, "TIMEOUT");
    ck_assert_int_eq(r->n_errors, 2);
    ck_assert_str_eq(r->errors[0].code, "TIMEOUT");
    ck_assert_uint_eq(r->errors[0].n, 2);
    for (int i = 0; i < 40; i++) {
        char code[16];
        snprintf(code, sizeof(code), "E%d", i);
        pbctl_bench_count_error(r, code);
    }
    ck_assert_int_eq(r->n_errors, PBCTL_BENCH_MAX_CODES);
    ck_assert_str_eq(r->errors[PBCTL_BENCH_MAX_CODES - 1].code, "OTHER");
    ck_assert_uint_eq(r->errors[PBCTL_BENCH_MAX_CODES - 1].n, 40 - (PBCTL_BENCH_MAX_CODES - 3));
    free(r);
}
END_TEST

/* A probe server: answers every line on every connection with a result,
 * except every 4th with a BUSY error; stops when stop_fd becomes readable. */
struct probe_srv {
    char path[108];
    int lfd;
    int stop[2];
    unsigned long answered;
    unsigned close_every; /* nonzero: hang up right after every close_every-th answer */
    pthread_t thread;
};

static void *probe_srv_main(void *arg)
{
    struct probe_srv *s = arg;
    struct pollfd pf[16];
    char buf[16][512];
    size_t len[16] = {0};
    nfds_t n = 2;
    pf[0] = (struct pollfd){.fd = s->lfd, .events = POLLIN};
    pf[1] = (struct pollfd){.fd = s->stop[0], .events = POLLIN};
    for (;;) {
        if (poll(pf, n, 5000) <= 0 || pf[1].revents)
            break;
        if (pf[0].revents) {
            nfds_t slot = 2;
            while (slot < n && pf[slot].fd >= 0)
                slot++;
            int fd = slot < 16 ? accept(s->lfd, NULL, NULL) : -1;
            if (fd >= 0) {
                len[slot] = 0;
                pf[slot] = (struct pollfd){.fd = fd, .events = POLLIN};
                if (slot == n)
                    n++;
            }
        }
        for (nfds_t i = 2; i < n; i++) {
            if (!pf[i].revents || pf[i].fd < 0)
                continue;
            ssize_t k = read(pf[i].fd, buf[i] + len[i], sizeof(buf[i]) - len[i]);
            if (k <= 0) {
                close(pf[i].fd);
                pf[i].fd = -1;
                continue;
            }
            len[i] += (size_t)k;
            char *nl;
            while ((nl = memchr(buf[i], '\n', len[i])) != NULL) {
                *nl = '\0';
                const char *id = strstr(buf[i], "\"id\":");
                unsigned long long v = id ? strtoull(id + 5, NULL, 10) : 0;
                char out[160];
                s->answered++;
                if (s->answered % 4 == 0)
                    snprintf(out, sizeof(out),
                             "{\"id\":%llu,\"error\":{\"code\":\"BUSY\",\"message\":\"b\"}}\n", v);
                else
                    snprintf(out, sizeof(out),
                             "{\"id\":%llu,\"result\":{\"index\":%lu,\"term\":1}}\n", v,
                             s->answered);
                (void)!send(pf[i].fd, out, strlen(out), MSG_NOSIGNAL);
                size_t used = (size_t)(nl - buf[i]) + 1;
                memmove(buf[i], nl + 1, len[i] - used);
                len[i] -= used;
                if (s->close_every != 0 && s->answered % s->close_every == 0) {
                    close(pf[i].fd);
                    pf[i].fd = -1;
                    break;
                }
            }
        }
    }
    for (nfds_t i = 2; i < n; i++) {
        if (pf[i].fd >= 0)
            close(pf[i].fd);
    }
    return NULL;
}

static void probe_srv_start(struct probe_srv *s, unsigned close_every)
{
    memset(s, 0, sizeof(*s));
    s->close_every = close_every;
    snprintf(s->path, sizeof(s->path), "%s/probe.sock", tmpdir);
    s->lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", s->path);
    ck_assert_int_eq(bind(s->lfd, (struct sockaddr *)&sa, sizeof(sa)), 0);
    ck_assert_int_eq(listen(s->lfd, 16), 0);
    ck_assert_int_eq(pipe(s->stop), 0);
    ck_assert_int_eq(pthread_create(&s->thread, NULL, probe_srv_main, s), 0);
}

static void probe_srv_stop(struct probe_srv *s)
{
    (void)!write(s->stop[1], "x", 1);
    pthread_join(s->thread, NULL);
    close(s->lfd);
    close(s->stop[0]);
    close(s->stop[1]);
    unlink(s->path);
}

START_TEST(test_bench_reconnects_after_hangup)
{
    /* The server hangs up after every 7th answer: the connection is counted
     * CLOSED, reopened, and the load goes on. */
    struct probe_srv s;
    probe_srv_start(&s, 7);
    struct pbctl_bench_config cfg = {
            .size = 0, .concurrency = 3, .duration_ms = 200, .warmup_ms = 20};
    struct pbctl_bench_result *r = pb_xmalloc(sizeof(*r));
    struct pb_error err;
    pb_error_clear(&err);
    int rc = pbctl_bench_run(s.path, &cfg, r, &err);
    probe_srv_stop(&s);
    ck_assert_msg(rc == 0, "bench: %s", err.msg);
    ck_assert_uint_gt(r->commits, 20);
    uint64_t closed = 0, connect = 0;
    for (int i = 0; i < r->n_errors; i++) {
        if (strcmp(r->errors[i].code, "CLOSED") == 0)
            closed = r->errors[i].n;
        if (strcmp(r->errors[i].code, "CONNECT") == 0)
            connect = r->errors[i].n;
    }
    ck_assert_uint_gt(closed, 3);
    ck_assert_uint_eq(connect, 0);
    free(r);
}
END_TEST

START_TEST(test_bench_run_against_fixture)
{
    struct probe_srv s;
    probe_srv_start(&s, 0);

    struct pbctl_bench_config cfg = {
            .size = 64, .concurrency = 4, .duration_ms = 300, .warmup_ms = 50};
    struct pbctl_bench_result *r = pb_xmalloc(sizeof(*r));
    struct pb_error err;
    pb_error_clear(&err);
    int rc = pbctl_bench_run(s.path, &cfg, r, &err);
    probe_srv_stop(&s);
    ck_assert_msg(rc == 0, "bench: %s", err.msg);
    ck_assert_uint_gt(r->commits, 10);
    ck_assert_uint_eq(r->latency.count, r->commits);
    ck_assert(r->elapsed_s > 0.29 && r->elapsed_s < 0.5);
    ck_assert_int_eq(r->n_errors, 1);
    ck_assert_str_eq(r->errors[0].code, "BUSY");
    /* Every 4th answer is BUSY: about a third as many errors as commits. */
    ck_assert_uint_gt(r->errors[0].n * 4, r->commits);
    ck_assert_uint_lt(r->errors[0].n * 2, r->commits);

    char *buf = NULL;
    size_t blen = 0;
    FILE *f = open_memstream(&buf, &blen);
    pbctl_bench_print(&cfg, r, true, f);
    fclose(f);
    json_t *j = parse(buf);
    ck_assert_int_eq(json_integer_value(json_object_get(j, "commits")), (json_int_t)r->commits);
    ck_assert_int_eq(json_integer_value(json_object_get(j, "concurrency")), 4);
    ck_assert_int_eq(json_integer_value(json_object_get(json_object_get(j, "errors"), "BUSY")),
                     (json_int_t)r->errors[0].n);
    const json_t *lat = json_object_get(j, "latency_ms");
    ck_assert(json_real_value(json_object_get(lat, "p50")) <=
              json_real_value(json_object_get(lat, "p99")));
    ck_assert(json_real_value(json_object_get(lat, "p99")) <=
              json_real_value(json_object_get(lat, "max")));
    ck_assert(json_real_value(json_object_get(j, "commits_per_s")) > 0);
    json_decref(j);
    free(buf);

    buf = NULL;
    f = open_memstream(&buf, &blen);
    pbctl_bench_print(&cfg, r, false, f);
    fclose(f);
    ck_assert_ptr_nonnull(strstr(buf, "latency ms: p50 "));
    ck_assert_ptr_nonnull(strstr(buf, "errors: BUSY "));
    free(buf);
    free(r);
}
END_TEST

START_TEST(test_bench_cannot_connect)
{
    char path[PATH_MAX];
    snprintf(path, sizeof(path), "%s/nobody.sock", tmpdir);
    struct run_out r = run(NULL, "-s", path, "bench", "--duration", "0.2", NULL);
    ck_assert_int_eq(r.rc, PBCTL_EXIT_CONNECT);
    ck_assert_ptr_nonnull(strstr(r.err, "pickboxctl: cannot connect to "));
    ck_assert_ptr_null(strchr(strchr(r.err, '\n') + 1, '\n')); /* one line */
    ck_assert_str_eq(r.out, "");
    run_free(&r);
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
    tcase_add_test(tc, test_render_status_storage_error_first);
    tcase_add_test(tc, test_render_members);
    tcase_add_test(tc, test_formatters);
    suite_add_tcase(s, tc);

    tc = tcase_create("args");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, test_parse_args);
    tcase_add_test(tc, test_parse_args_errors);
    tcase_add_test(tc, test_params_from_arguments);
    tcase_add_test(tc, test_socket_resolution);
    tcase_add_test(tc, test_parse_cluster_commands);
    tcase_add_test(tc, test_parse_cluster_commands_errors);
    suite_add_tcase(s, tc);

    tc = tcase_create("bench");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, test_hist_percentiles_exact_range);
    tcase_add_test(tc, test_hist_percentiles_relative_error);
    tcase_add_test(tc, test_bench_config_and_errors);
    tcase_add_test(tc, test_bench_run_against_fixture);
    tcase_add_test(tc, test_bench_reconnects_after_hangup);
    tcase_add_test(tc, test_bench_cannot_connect);
    suite_add_tcase(s, tc);

    tc = tcase_create("run");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, test_exit_ok_text_and_json);
    tcase_add_test(tc, test_metrics_raw_and_json);
    tcase_add_test(tc, test_writer_is_text);
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

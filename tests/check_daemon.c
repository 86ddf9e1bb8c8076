/*
 * check_daemon.c: unit tests for src/daemon (all but nodeconf.c, which has
 * check_config): the node state and how it is reported, the directories,
 * the listening sockets (bound here or passed by systemd) and the control
 * methods served over a real ctl server.
 */
#include <config.h>

#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <event2/event.h>
#include <jansson.h>

#include "ctl/ctl.h"
#include "daemon/nodeconf.h"
#include "daemon/daemon.h"
#include "daemon/dirs.h"
#include "daemon/listen.h"
#include "daemon/methods.h"
#include "daemon/node.h"
#include "lib/util.h"
#include "ctlcall.h"

static char tmp[64];

static void setup(void)
{
    snprintf(tmp, sizeof(tmp), "/tmp/check_daemon.XXXXXX");
    ck_assert_ptr_nonnull(mkdtemp(tmp));
    umask(022);
}

static void teardown(void)
{
    char *cmd = pb_xasprintf("rm -rf '%s'", tmp);
    ck_assert_int_eq(system(cmd), 0);
    free(cmd);
}

/* A configuration as config_load() would leave it (strings owned by cfg). */
static void cfg_fill(struct pb_config *cfg, const char *join)
{
    memset(cfg, 0, sizeof(*cfg));
    cfg->node_id = pb_xstrdup("n1");
    cfg->bind = pb_xstrdup("127.0.0.1");
    cfg->port = 8010;
    cfg->advertise = pb_xstrdup("127.0.0.1:8010");
    cfg->join = join ? pb_xstrdup(join) : NULL;
    cfg->data_dir = pb_xasprintf("%s/a/b/tree", tmp);
    cfg->state_dir = pb_xasprintf("%s/a/b/tree/.pickbox/state", tmp);
    cfg->control_socket = pb_xasprintf("%s/control.sock", cfg->state_dir);
    cfg->log_level = LOG_LEVEL_INFO;
}

/* ---- node -------------------------------------------------------------- */

START_TEST(test_node_bootstrap_status)
{
    struct pb_config cfg;
    cfg_fill(&cfg, NULL);
    struct node_state st;
    node_state_init(&st, &cfg, 1000);
    json_t *j = node_status_json(&st, 6999);
    json_t *want = json_pack("{s:s,s:s,s:i,s:n,s:i,s:i,s:[{s:s,s:s,s:b}],s:b,s:n,s:s,s:s,s:s,"
                             "s:i,s:s}",
                             "node_id", "n1", "role", "follower", "term", 0, "leader_id",
                             "commit_index", 0, "applied_index", 0, "members", "id", "n1",
                             "address", "127.0.0.1:8010", "voter", 1, "consensus_running", 0,
                             "join", "advertise", "127.0.0.1:8010", "data_dir", cfg.data_dir,
                             "state_dir", cfg.state_dir, "uptime_s", 5, "version", PACKAGE_VERSION);
    ck_assert_ptr_nonnull(want);
    char *got_s = json_dumps(j, JSON_SORT_KEYS);
    ck_assert_msg(json_equal(j, want), "status was %s", got_s);
    free(got_s);
    json_decref(want);
    json_decref(j);
    node_state_free(&st);
    node_state_free(&st); /* freeing twice is harmless: it was zeroed */
    config_free(&cfg);
}
END_TEST

START_TEST(test_node_join_status)
{
    struct pb_config cfg;
    cfg_fill(&cfg, "10.0.0.1:8010");
    struct node_state st;
    node_state_init(&st, &cfg, 0);
    json_t *j = node_status_json(&st, 0);
    ck_assert_str_eq(json_string_value(json_object_get(j, "role")), "follower");
    ck_assert(json_is_null(json_object_get(j, "leader_id")));
    ck_assert_uint_eq(json_array_size(json_object_get(j, "members")), 0);
    ck_assert_str_eq(json_string_value(json_object_get(j, "join")), "10.0.0.1:8010");
    json_decref(j);
    char line[256];
    node_status_line(&st, line, sizeof(line));
    ck_assert_str_eq(line, "follower, term 0, no leader (consensus not running yet), join via "
                           "10.0.0.1:8010");
    node_state_free(&st);
    config_free(&cfg);
}
END_TEST

START_TEST(test_node_status_line)
{
    struct pb_config cfg;
    cfg_fill(&cfg, NULL);
    struct node_state st;
    node_state_init(&st, &cfg, 0);
    char line[256];
    node_status_line(&st, line, sizeof(line));
    ck_assert_str_eq(line, "follower, term 0, no leader (consensus not running yet)");

    /* As Raft will report it once wired in. */
    st.consensus_running = true;
    st.term = 3;
    st.commit_index = 7;
    node_status_line(&st, line, sizeof(line));
    ck_assert_str_eq(line, "follower of (no leader), term 3, commit 7");
    st.leader_id = pb_xstrdup("n2");
    node_status_line(&st, line, sizeof(line));
    ck_assert_str_eq(line, "follower of n2, term 3, commit 7");
    st.role = NODE_ROLE_LEADER;
    node_status_line(&st, line, sizeof(line));
    ck_assert_str_eq(line, "leader, term 3, commit 7");
    /* A short buffer is cut, never overrun. */
    char small[8];
    node_status_line(&st, small, sizeof(small));
    ck_assert_str_eq(small, "leader,");

    ck_assert_str_eq(node_role_name(NODE_ROLE_FOLLOWER), "follower");
    ck_assert_str_eq(node_role_name(NODE_ROLE_CANDIDATE), "candidate");
    ck_assert_str_eq(node_role_name(NODE_ROLE_LEADER), "leader");
    ck_assert_str_eq(node_role_name(NODE_ROLE_LEARNER), "learner");
    node_state_free(&st);
    config_free(&cfg);
}
END_TEST

/* ---- dirs -------------------------------------------------------------- */

static mode_t mode_of(const char *path)
{
    struct stat st;
    ck_assert_int_eq(stat(path, &st), 0);
    ck_assert(S_ISDIR(st.st_mode));
    return st.st_mode & 07777;
}

START_TEST(test_dirs_prepare_creates)
{
    struct pb_config cfg;
    cfg_fill(&cfg, NULL);
    struct pb_error err;
    pb_error_clear(&err);
    ck_assert_int_eq(dirs_prepare(&cfg, &err), 0);
    ck_assert_int_eq(mode_of(cfg.data_dir), 0755);
    char *marker = pb_xasprintf("%s/.pickbox", cfg.data_dir);
    ck_assert_int_eq(mode_of(marker), 0700);
    ck_assert_int_eq(mode_of(cfg.state_dir), 0700);
    /* Again: everything exists, nothing changes. */
    ck_assert_int_eq(dirs_prepare(&cfg, &err), 0);
    ck_assert_int_eq(mode_of(marker), 0700);
    free(marker);

    /* A state dir elsewhere still gets the tree's marker. */
    free(cfg.state_dir);
    cfg.state_dir = pb_xasprintf("%s/state/n1", tmp);
    ck_assert_int_eq(dirs_prepare(&cfg, &err), 0);
    ck_assert_int_eq(mode_of(cfg.state_dir), 0700);
    config_free(&cfg);
}
END_TEST

START_TEST(test_dirs_prepare_refuses)
{
    struct pb_config cfg;
    cfg_fill(&cfg, NULL);
    struct pb_error err;
    pb_error_clear(&err);

    /* A file where the tree should be. */
    char *ab = pb_xasprintf("%s/a/b", tmp);
    char *a = pb_xasprintf("%s/a", tmp);
    ck_assert_int_eq(mkdir(a, 0755), 0);
    ck_assert_int_eq(mkdir(ab, 0755), 0);
    int fd = open(cfg.data_dir, O_CREAT | O_WRONLY, 0644);
    ck_assert_int_ge(fd, 0);
    close(fd);
    ck_assert_int_eq(dirs_prepare(&cfg, &err), -ENOTDIR);
    ck_assert_ptr_nonnull(strstr(err.msg, cfg.data_dir));
    ck_assert_ptr_nonnull(strstr(err.msg, "cannot create directory"));
    unlink(cfg.data_dir);

    /* A state dir anybody may write to. */
    ck_assert_int_eq(dirs_prepare(&cfg, &err), 0);
    ck_assert_int_eq(chmod(cfg.state_dir, 0777), 0);
    ck_assert_int_eq(dirs_prepare(&cfg, &err), -EPERM);
    ck_assert_ptr_nonnull(strstr(err.msg, "writable by others"));
    free(ab);
    free(a);
    config_free(&cfg);
}
END_TEST

/* ---- listen ------------------------------------------------------------ */

static uint16_t port_of(int fd)
{
    struct sockaddr_in sin;
    socklen_t len = sizeof(sin);
    ck_assert_int_eq(getsockname(fd, (struct sockaddr *)&sin, &len), 0);
    return ntohs(sin.sin_port);
}

START_TEST(test_listen_tcp)
{
    struct pb_error err;
    pb_error_clear(&err);
    int fd = -1;
    ck_assert_int_eq(listen_tcp("127.0.0.1", 0, &fd, &err), 0);
    ck_assert_int_ge(fd, 0);
    ck_assert(fcntl(fd, F_GETFL) & O_NONBLOCK);
    ck_assert(fcntl(fd, F_GETFD) & FD_CLOEXEC);
    uint16_t port = port_of(fd);
    ck_assert_uint_gt(port, 0);

    /* The port is owned: a second bind fails with a message naming it. */
    int fd2 = -1;
    ck_assert_int_eq(listen_tcp("127.0.0.1", port, &fd2, &err), -EADDRINUSE);
    ck_assert_int_eq(fd2, -1);
    char want[64];
    snprintf(want, sizeof(want), "127.0.0.1:%u", (unsigned)port);
    ck_assert_msg(strstr(err.msg, want) != NULL, "message: %s", err.msg);

    ck_assert_int_eq(listen_tcp("no-such-host.invalid", port, &fd2, &err), -EINVAL);
    ck_assert_ptr_nonnull(strstr(err.msg, "cannot resolve"));
    close(fd);
}
END_TEST

static int unix_listener(const char *path)
{
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un sun = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof(sun.sun_path))
        return -1;
    memcpy(sun.sun_path, path, strlen(path) + 1);
    if (bind(fd, (struct sockaddr *)&sun, sizeof(sun)) < 0 || listen(fd, 4) < 0)
        return -1;
    return fd;
}

/*
 * Runs listen_from_systemd() in a child whose fds 3.. are the given sockets,
 * with LISTEN_* set as systemd does. The child reports through its exit code:
 * 0 = result as expected. (fd 3 belongs to Check in the parent.)
 */
static int run_systemd_child(const int *socks, int n, const char *names, int want_control,
                             int want_peer, int want_rc)
{
    pid_t pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        int moved[8];
        for (int i = 0; i < n; i++)
            moved[i] = fcntl(socks[i], F_DUPFD_CLOEXEC, 100);
        for (int i = 0; i < n; i++) {
            if (dup2(moved[i], 3 + i) < 0)
                _exit(10);
            close(moved[i]);
        }
        char buf[32];
        snprintf(buf, sizeof(buf), "%d", n);
        setenv("LISTEN_FDS", buf, 1);
        snprintf(buf, sizeof(buf), "%ld", (long)getpid());
        setenv("LISTEN_PID", buf, 1);
        setenv("LISTEN_FDNAMES", names, 1);
        struct listen_fds fds;
        struct pb_error err;
        pb_error_clear(&err);
        int rc = listen_from_systemd(&fds, &err);
        if ((rc < 0) != (want_rc < 0))
            _exit(11);
        if (rc < 0 && err.msg[0] == '\0')
            _exit(12);
        if (fds.control != want_control || fds.peer != want_peer)
            _exit(13);
        if (getenv("LISTEN_FDS") != NULL || getenv("LISTEN_PID") != NULL)
            _exit(14); /* must not leak to children */
        /* Every passed fd not handed out is closed. */
        for (int fd = 3; fd < 3 + n; fd++) {
            bool kept = fd == fds.control || fd == fds.peer;
            if (kept != (fcntl(fd, F_GETFD) >= 0))
                _exit(15);
        }
        _exit(0);
    }
    int status;
    ck_assert_int_eq(waitpid(pid, &status, 0), pid);
    ck_assert(WIFEXITED(status));
    return WEXITSTATUS(status);
}

START_TEST(test_listen_from_systemd)
{
    char *path = pb_xasprintf("%s/ctl.sock", tmp);
    int socks[3];
    socks[0] = unix_listener(path);
    ck_assert_int_ge(socks[0], 0);
    struct pb_error err;
    ck_assert_int_eq(listen_tcp("127.0.0.1", 0, &socks[1], &err), 0);
    ck_assert_int_eq(listen_tcp("127.0.0.1", 0, &socks[2], &err), 0);

    /* Named control and peer (in either order); an unknown name is closed. */
    ck_assert_int_eq(run_systemd_child(socks, 3, "control:peer:metrics", 3, 4, 0), 0);
    int swapped[2] = {socks[1], socks[0]};
    ck_assert_int_eq(run_systemd_child(swapped, 2, "peer:control", 4, 3, 0), 0);
    ck_assert_int_eq(run_systemd_child(socks, 1, "control", 3, -1, 0), 0);
    /* Wrong kinds and duplicates are errors, and then nothing is kept. */
    ck_assert_int_eq(run_systemd_child(socks + 1, 1, "control", -1, -1, -EINVAL), 0);
    ck_assert_int_eq(run_systemd_child(socks, 1, "peer", -1, -1, -EINVAL), 0);
    ck_assert_int_eq(run_systemd_child(socks + 1, 2, "peer:peer", -1, -1, -EINVAL), 0);

    /* Not activated: nothing passed, no error. */
    unsetenv("LISTEN_FDS");
    unsetenv("LISTEN_PID");
    struct listen_fds fds;
    ck_assert_int_eq(listen_from_systemd(&fds, &err), 0);
    ck_assert_int_eq(fds.control, -1);
    ck_assert_int_eq(fds.peer, -1);
    for (int i = 0; i < 3; i++)
        close(socks[i]);
    free(path);
}
END_TEST

/* ---- methods ----------------------------------------------------------- */

START_TEST(test_methods_hello_status)
{
    struct pb_config cfg;
    cfg_fill(&cfg, NULL);
    struct daemon d = {.cfg = &cfg, .peer_fd = -1};
    d.base = event_base_new();
    node_state_init(&d.node, &cfg, pb_now_ms());
    size_t n;
    const struct ctl_method *m = methods_table(&n);
    ck_assert_uint_eq(n, 12);
    for (size_t i = 0; i < n; i++) {
        /* Reading is for everyone; changing the cluster is privileged. */
        bool reading = strcmp(m[i].name, "hello") == 0 || strcmp(m[i].name, "status") == 0 ||
                       strcmp(m[i].name, "members") == 0 || strcmp(m[i].name, "sync") == 0 ||
                       strcmp(m[i].name, "conflicts") == 0 || strcmp(m[i].name, "metrics") == 0;
        ck_assert_uint_eq(m[i].flags & CTL_METHOD_MUTATING, reading ? 0 : CTL_METHOD_MUTATING);
    }
    d.ctl = ctl_server_new(d.base, m, n, &d, NULL);
    char *path = pb_xasprintf("%s/ctl.sock", tmp);
    ck_assert_int_eq(ctl_server_listen_path(d.ctl, path, 0600), 0);

    json_t *j = ctlcall(d.base, path, "{\"id\":1,\"method\":\"hello\"}\n");
    json_t *want = json_pack("{s:i,s:{s:i,s:s,s:s}}", "id", 1, "result", "protocol", 1, "version",
                             PACKAGE_VERSION, "node_id", "n1");
    ck_assert(json_equal(j, want));
    json_decref(want);
    json_decref(j);

    j = ctlcall(d.base, path, "{\"id\":2,\"method\":\"status\",\"params\":{}}\n");
    json_t *r = json_object_get(j, "result");
    json_t *expect = node_status_json(&d.node, pb_now_ms());
    ck_assert_int_eq(json_integer_value(json_object_get(r, "control_clients")), 1);
    json_object_del(r, "control_clients");
    json_object_del(r, "uptime_s");
    json_object_del(expect, "uptime_s");
    ck_assert(json_equal(r, expect));
    json_decref(expect);
    json_decref(j);

    ctl_server_free(d.ctl);
    node_state_free(&d.node);
    event_base_free(d.base);
    free(path);
    config_free(&cfg);
}
END_TEST

static Suite *daemon_suite(void)
{
    Suite *s = suite_create("daemon");
    TCase *tc = tcase_create("daemon");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, test_node_bootstrap_status);
    tcase_add_test(tc, test_node_join_status);
    tcase_add_test(tc, test_node_status_line);
    tcase_add_test(tc, test_dirs_prepare_creates);
    tcase_add_test(tc, test_dirs_prepare_refuses);
    tcase_add_test(tc, test_listen_tcp);
    tcase_add_test(tc, test_listen_from_systemd);
    tcase_add_test(tc, test_methods_hello_status);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(daemon_suite());
    srunner_run_all(sr, CK_ENV);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}

/*
 * check_config.c: unit tests for src/daemon/nodeconf.c (pickboxd's command line
 * and config file): defaults, precedence, every error message, --help.
 */
#include "config.h"

#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "daemon/nodeconf.h"
#include "lib/util.h"

static char tmpdir[PATH_MAX];

static void setup(void)
{
    snprintf(tmpdir, sizeof(tmpdir), "/tmp/check_config.XXXXXX");
    ck_assert_ptr_nonnull(mkdtemp(tmpdir));
    unsetenv("LISTEN_PID");
    unsetenv("LISTEN_FDNAMES");
}

static int rm_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    return remove(path);
}

static void teardown(void)
{
    nftw(tmpdir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
}

/* Writes content (len bytes, or strlen when len is 0) to tmpdir/name and
 * returns the path (static buffer). */
static const char *write_file_n(const char *name, const char *content, size_t len)
{
    static char path[PATH_MAX + 64];
    snprintf(path, sizeof(path), "%s/%s", tmpdir, name);
    FILE *f = fopen(path, "wb");
    ck_assert_ptr_nonnull(f);
    if (len == 0)
        len = strlen(content);
    ck_assert_uint_eq(fwrite(content, 1, len, f), len);
    fclose(f);
    return path;
}

static const char *write_file(const char *name, const char *content)
{
    return write_file_n(name, content, 0);
}

/* Runs config_load on "pickboxd" + the NULL-terminated arguments. */
static int load(struct pb_config *cfg, struct pb_error *err, ...)
{
    char *argv[64];
    int argc = 0;
    argv[argc++] = pb_xstrdup("pickboxd");
    va_list ap;
    va_start(ap, err);
    const char *a;
    while ((a = va_arg(ap, const char *)) != NULL) {
        ck_assert_int_lt(argc, 63);
        argv[argc++] = pb_xstrdup(a);
    }
    va_end(ap);
    argv[argc] = NULL;
    int rc = config_load(cfg, argc, argv, err);
    for (int i = 0; i < argc; i++)
        free(argv[i]);
    return rc;
}

/* Loads a config file holding content plus the given extra arguments and
 * expects an error whose message is exactly "<file>:<suffix>". */
static void expect_file_error(const char *content, const char *suffix)
{
    const char *path = write_file("bad.conf", content);
    char want[PATH_MAX + 600];
    snprintf(want, sizeof(want), "%s:%s", path, suffix);
    struct pb_config cfg;
    struct pb_error err;
    ck_assert_int_lt(load(&cfg, &err, "--config", path, NULL), 0);
    ck_assert_str_eq(err.msg, want);
    ck_assert_int_lt(err.code, 0);
    config_free(&cfg);
}

#define BASE "node_id = n1\nport = 8010\ndata_dir = /srv/pickbox/n1\n"

START_TEST(test_defaults_from_command_line)
{
    struct pb_config cfg;
    struct pb_error err;
    ck_assert_int_eq(
            load(&cfg, &err, "--node-id", "n1", "--port", "8010", "--data-dir", "/srv/t", NULL), 0);
    ck_assert_str_eq(cfg.node_id, "n1");
    ck_assert_uint_eq(cfg.port, 8010);
    ck_assert_str_eq(cfg.bind, "127.0.0.1");
    ck_assert_str_eq(cfg.advertise, "127.0.0.1:8010");
    ck_assert_ptr_null(cfg.join);
    ck_assert_str_eq(cfg.data_dir, "/srv/t");
    ck_assert_str_eq(cfg.state_dir, "/srv/t/.pickbox/state");
    ck_assert_str_eq(cfg.control_socket, "/srv/t/.pickbox/state/control.sock");
    ck_assert_ptr_null(cfg.secret_file);
    ck_assert_ptr_null(cfg.config_file);
    ck_assert_ptr_null(cfg.metrics_listen);
    ck_assert_int_eq(cfg.log_level, LOG_LEVEL_INFO);
    ck_assert(!cfg.check_config);
    ck_assert_uint_eq(cfg.n_ignore, 0);
    ck_assert_uint_eq(cfg.election_timeout_ms, 1000);
    ck_assert_uint_eq(cfg.heartbeat_ms, 100);
    config_free(&cfg);
    ck_assert_ptr_null(cfg.node_id);
    config_free(&cfg); /* a freed config may be freed again */
    config_free(NULL);
}
END_TEST

START_TEST(test_equals_form_and_all_flags)
{
    struct pb_config cfg;
    struct pb_error err;
    int rc = load(&cfg, &err, "--node-id=node-2.a_b", "--port=1", "--data-dir=/d/", "--bind=::1",
                  "--join=10.0.0.1:8010", "--secret-file=/etc/pickbox/secret",
                  "--state-dir=/var/lib/pickbox/n2", "--control-socket=/run/pickbox/n2/c.sock",
                  "--log-level=debug", "--ignore=*.swp, *~", "--ignore", "build/",
                  "--metrics-listen=127.0.0.1:9100", "--election-timeout-ms=300",
                  "--heartbeat-ms=149", "--check-config", NULL);
    ck_assert_msg(rc == 0, "rc %d: %s", rc, err.msg);
    ck_assert_str_eq(cfg.node_id, "node-2.a_b");
    ck_assert_uint_eq(cfg.port, 1);
    ck_assert_str_eq(cfg.data_dir, "/d");
    ck_assert_str_eq(cfg.bind, "::1");
    ck_assert_str_eq(cfg.advertise, "[::1]:1");
    ck_assert_str_eq(cfg.join, "10.0.0.1:8010");
    ck_assert_str_eq(cfg.secret_file, "/etc/pickbox/secret");
    ck_assert_str_eq(cfg.state_dir, "/var/lib/pickbox/n2");
    ck_assert_str_eq(cfg.control_socket, "/run/pickbox/n2/c.sock");
    ck_assert_int_eq(cfg.log_level, LOG_LEVEL_DEBUG);
    ck_assert_uint_eq(cfg.n_ignore, 3);
    ck_assert_str_eq(cfg.ignore[0], "*.swp");
    ck_assert_str_eq(cfg.ignore[1], "*~");
    ck_assert_str_eq(cfg.ignore[2], "build/");
    ck_assert_str_eq(cfg.metrics_listen, "127.0.0.1:9100");
    ck_assert_uint_eq(cfg.election_timeout_ms, 300);
    ck_assert_uint_eq(cfg.heartbeat_ms, 149);
    ck_assert(cfg.check_config);
    config_free(&cfg);
}
END_TEST

START_TEST(test_relative_paths_on_command_line_use_cwd)
{
    char cwd[PATH_MAX];
    ck_assert_ptr_nonnull(getcwd(cwd, sizeof(cwd)));
    ck_assert_int_eq(chdir(tmpdir), 0);
    struct pb_config cfg;
    struct pb_error err;
    write_file("rel.conf", BASE);
    ck_assert_int_eq(load(&cfg, &err, "--config", "rel.conf", "--data-dir", "./data/n1/",
                          "--secret-file", "s", NULL),
                     0);
    char want[PATH_MAX + 64];
    snprintf(want, sizeof(want), "%s/data/n1", tmpdir);
    ck_assert_str_eq(cfg.data_dir, want);
    snprintf(want, sizeof(want), "%s/s", tmpdir);
    ck_assert_str_eq(cfg.secret_file, want);
    snprintf(want, sizeof(want), "%s/rel.conf", tmpdir);
    ck_assert_str_eq(cfg.config_file, want);
    config_free(&cfg);
    ck_assert_int_eq(chdir(cwd), 0);
}
END_TEST

START_TEST(test_file_full_syntax)
{
    const char *path = write_file("full.conf", "\xef\xbb\xbf# pickbox node n1\r\n"
                                               "[pickbox]\n"
                                               "; another comment style\n"
                                               "  node_id=n1  \n"
                                               "port = 8010\r\n"
                                               "\n"
                                               "\t bind = 0.0.0.0\n"
                                               "advertise = \"n1.example.org:8010\"\n"
                                               "join = [fe80::1]:8011\n"
                                               "data_dir = \"/srv/pickbox/with space \\\"q\\\"\"\n"
                                               "state_dir = /var/lib/pickbox/n1\n"
                                               "control_socket = /run/pickbox/n1/control.sock\n"
                                               "secret_file = /etc/pickbox/cluster.secret\n"
                                               "log_level = WARNING\n"
                                               "ignore = *.tmp\n"
                                               "ignore = .git, [ab]*.o\n"
                                               "metrics_listen = localhost:9100\n"
                                               "election_timeout_ms = 2000\n"
                                               "heartbeat_ms = 999\n");
    struct pb_config cfg;
    struct pb_error err;
    int rc = load(&cfg, &err, "--config", path, NULL);
    ck_assert_msg(rc == 0, "rc %d: %s", rc, err.msg);
    ck_assert_str_eq(cfg.config_file, path);
    ck_assert_str_eq(cfg.node_id, "n1");
    ck_assert_uint_eq(cfg.port, 8010);
    ck_assert_str_eq(cfg.bind, "0.0.0.0");
    ck_assert_str_eq(cfg.advertise, "n1.example.org:8010");
    ck_assert_str_eq(cfg.join, "[fe80::1]:8011");
    ck_assert_str_eq(cfg.data_dir, "/srv/pickbox/with space \"q\"");
    ck_assert_str_eq(cfg.state_dir, "/var/lib/pickbox/n1");
    ck_assert_str_eq(cfg.control_socket, "/run/pickbox/n1/control.sock");
    ck_assert_str_eq(cfg.secret_file, "/etc/pickbox/cluster.secret");
    ck_assert_int_eq(cfg.log_level, LOG_LEVEL_WARNING);
    ck_assert_uint_eq(cfg.n_ignore, 3);
    ck_assert_str_eq(cfg.ignore[0], "*.tmp");
    ck_assert_str_eq(cfg.ignore[1], ".git");
    ck_assert_str_eq(cfg.ignore[2], "[ab]*.o");
    ck_assert_str_eq(cfg.metrics_listen, "localhost:9100");
    ck_assert_uint_eq(cfg.election_timeout_ms, 2000);
    ck_assert_uint_eq(cfg.heartbeat_ms, 999);
    config_free(&cfg);
}
END_TEST

START_TEST(test_command_line_overrides_file)
{
    const char *path = write_file("n1.conf", BASE "log_level = debug\nignore = a\nignore = b\n"
                                                  "heartbeat_ms = 50\n");
    struct pb_config cfg;
    struct pb_error err;
    /* Flags before and after --config both win over the file. */
    int rc = load(&cfg, &err, "--port", "9000", "--config", path, "--node-id", "other",
                  "--log-level", "error", "--ignore", "c", NULL);
    ck_assert_msg(rc == 0, "%s", err.msg);
    ck_assert_str_eq(cfg.node_id, "other");
    ck_assert_uint_eq(cfg.port, 9000);
    ck_assert_str_eq(cfg.advertise, "127.0.0.1:9000");
    ck_assert_int_eq(cfg.log_level, LOG_LEVEL_ERR);
    ck_assert_str_eq(cfg.data_dir, "/srv/pickbox/n1");
    ck_assert_uint_eq(cfg.heartbeat_ms, 50); /* not on the command line: from the file */
    ck_assert_uint_eq(cfg.n_ignore, 1);      /* --ignore replaces the file's list */
    ck_assert_str_eq(cfg.ignore[0], "c");
    config_free(&cfg);
}
END_TEST

START_TEST(test_cli_bad_value_is_checked_even_if_file_is_good)
{
    const char *path = write_file("n1.conf", BASE);
    struct pb_config cfg;
    struct pb_error err;
    ck_assert_int_eq(load(&cfg, &err, "--config", path, "--port", "70000", NULL), -EINVAL);
    ck_assert_str_eq(err.msg, "--port: bad port '70000' (expected a number 1-65535)");
    config_free(&cfg);
}
END_TEST

START_TEST(test_file_errors)
{
    expect_file_error(BASE "prot = 1\n", "4: unknown key 'prot' (did you mean 'port'?)");
    expect_file_error(BASE "node-id = n1\n", "4: unknown key 'node-id' (did you mean 'node_id'?)");
    expect_file_error(BASE "frobnicate = 1\n", "4: unknown key 'frobnicate'");
    expect_file_error("port = 0\n", "1: bad port '0' (expected a number 1-65535)");
    expect_file_error("port = 65536\n", "1: bad port '65536' (expected a number 1-65535)");
    expect_file_error("port = 80 # http\n", "1: bad port '80 # http' (expected a number 1-65535)");
    expect_file_error("node_id = -n1\n",
                      "1: bad node_id '-n1' (1-64 of A-Z a-z 0-9 . _ -, not starting with '.' "
                      "or '-')");
    expect_file_error("node_id = n/1\n",
                      "1: bad node_id 'n/1' (1-64 of A-Z a-z 0-9 . _ -, not starting with '.' "
                      "or '-')");
    expect_file_error("data_dir = data/n1\n",
                      "1: data_dir 'data/n1' is a relative path (paths in a config file must "
                      "be absolute)");
    expect_file_error("port = 1\n\nport = 2\n", "3: duplicate key 'port' (first set at line 1)");
    expect_file_error("\n\nport 8010\n", "3: expected 'key = value', found 'port 8010'");
    expect_file_error("= 8010\n", "1: missing key before '='");
    expect_file_error("port =\n", "1: missing value for 'port'");
    expect_file_error("join = \"\"\n", "1: missing value for 'join'");
    expect_file_error("[node]\n", "1: unknown section '[node]' (only [pickbox] is allowed)");
    expect_file_error("data_dir = \"/x\n", "1: unterminated quoted value");
    expect_file_error("data_dir = \"/x\" y\n", "1: text after the closing quote");
    expect_file_error("data_dir = \"/x\\n\"\n",
                      "1: bad escape in quoted value (only \\\" and \\\\ are allowed)");
    expect_file_error("data_dir = /a\x01"
                      "b\n",
                      "1: control character 0x01 in line");
    expect_file_error("bind = localhost\n",
                      "1: bad bind 'localhost' (expected an IPv4 or IPv6 address, e.g. "
                      "127.0.0.1, 0.0.0.0 or ::)");
    expect_file_error("advertise = n1\n", "1: bad advertise 'n1' (expected HOST:PORT or "
                                          "[IPv6]:PORT, port 1-65535)");
    expect_file_error("join = a_b:1\n", "1: bad join 'a_b:1': 'a_b' is not a valid host");
    expect_file_error("join = [n1]:1\n", "1: bad join '[n1]:1': 'n1' is not a valid host");
    expect_file_error("metrics_listen = 1.2.3.4:0\n",
                      "1: bad metrics_listen '1.2.3.4:0' (expected HOST:PORT or [IPv6]:PORT, "
                      "port 1-65535)");
    expect_file_error("log_level = loud\n", "1: bad log_level 'loud' (expected error, warning, "
                                            "notice, info or debug)");
    expect_file_error("ignore = a,,b\n", "1: empty ignore pattern");
    expect_file_error("ignore = [abc\n", "1: bad ignore pattern '[abc': unclosed '['");
    expect_file_error("ignore = abc\\\n", "1: bad ignore pattern 'abc\\': trailing '\\'");
    expect_file_error("election_timeout_ms = 5\n",
                      "1: bad election_timeout_ms '5' (expected a number 10-600000)");
    expect_file_error("heartbeat_ms = -1\n", "1: bad heartbeat_ms '-1' (expected a number "
                                             "1-60000)");
}
END_TEST

START_TEST(test_file_nul_and_long_line)
{
    const char nul[] = "node_id = n1\nport = 80\0 10\n";
    const char *path = write_file_n("nul.conf", nul, sizeof(nul) - 1);
    struct pb_config cfg;
    struct pb_error err;
    ck_assert_int_eq(load(&cfg, &err, "--config", path, NULL), -EINVAL);
    char want[PATH_MAX + 100];
    snprintf(want, sizeof(want), "%s:2: NUL byte in line", path);
    ck_assert_str_eq(err.msg, want);
    config_free(&cfg);

    size_t n = CONFIG_MAX_LINE + 100;
    char *big = pb_xmalloc(n + 64);
    strcpy(big, "# ok\ndata_dir = /");
    size_t len = strlen(big);
    memset(big + len, 'a', n - len);
    strcpy(big + n, "\n");
    path = write_file("long.conf", big);
    free(big);
    ck_assert_int_eq(load(&cfg, &err, "--config", path, NULL), -EINVAL);
    snprintf(want, sizeof(want), "%s:2: line too long (%zu bytes, max %d)", path, n - 5,
             CONFIG_MAX_LINE);
    ck_assert_str_eq(err.msg, want);
    config_free(&cfg);

    /* A line of exactly CONFIG_MAX_LINE bytes is fine. */
    big = pb_xmalloc(CONFIG_MAX_LINE + 64);
    strcpy(big, BASE "# ");
    len = strlen(big);
    memset(big + len, 'c', CONFIG_MAX_LINE - 2);
    strcpy(big + len + CONFIG_MAX_LINE - 2, "\n");
    path = write_file("edge.conf", big);
    free(big);
    ck_assert_int_eq(load(&cfg, &err, "--config", path, NULL), 0);
    config_free(&cfg);
}
END_TEST

START_TEST(test_file_missing_and_not_regular)
{
    struct pb_config cfg;
    struct pb_error err;
    char path[PATH_MAX + 32];
    snprintf(path, sizeof(path), "%s/absent.conf", tmpdir);
    ck_assert_int_eq(load(&cfg, &err, "--config", path, NULL), -ENOENT);
    char want[PATH_MAX + 100];
    snprintf(want, sizeof(want), "cannot read config file %s: No such file or directory", path);
    ck_assert_str_eq(err.msg, want);
    config_free(&cfg);

    ck_assert_int_eq(load(&cfg, &err, "--config", tmpdir, NULL), -EINVAL);
    snprintf(want, sizeof(want), "config file %s is not a regular file", tmpdir);
    ck_assert_str_eq(err.msg, want);
    config_free(&cfg);
}
END_TEST

START_TEST(test_file_too_large)
{
    const char *path = write_file("big.conf", BASE);
    ck_assert_int_eq(truncate(path, CONFIG_MAX_FILE + 1), 0);
    struct pb_config cfg;
    struct pb_error err;
    ck_assert_int_eq(load(&cfg, &err, "--config", path, NULL), -EFBIG);
    char want[PATH_MAX + 100];
    snprintf(want, sizeof(want), "config file %s is too large (%d bytes, max %d)", path,
             CONFIG_MAX_FILE + 1, CONFIG_MAX_FILE);
    ck_assert_str_eq(err.msg, want);
    config_free(&cfg);
}
END_TEST

START_TEST(test_missing_required)
{
    struct pb_config cfg;
    struct pb_error err;
    ck_assert_int_eq(load(&cfg, &err, "--port", "1", "--data-dir", "/d", NULL), -EINVAL);
    ck_assert_str_eq(err.msg, "node_id is required (set --node-id ID, or use --config FILE)");
    config_free(&cfg);
    ck_assert_int_eq(load(&cfg, &err, "--port", "1", "--node-id", "n1", NULL), -EINVAL);
    ck_assert_str_eq(err.msg, "data_dir is required (set --data-dir DIR, or use --config FILE)");
    config_free(&cfg);

    const char *path = write_file("noport.conf", "node_id = n1\ndata_dir = /d\n");
    ck_assert_int_eq(load(&cfg, &err, "--config", path, NULL), -EINVAL);
    char want[PATH_MAX + 100];
    snprintf(want, sizeof(want), "port is required (set --port or port in %s)", path);
    ck_assert_str_eq(err.msg, want);
    config_free(&cfg);
}
END_TEST

START_TEST(test_port_optional_with_systemd_peer_socket)
{
    struct pb_config cfg;
    struct pb_error err;
    char pid[32];
    snprintf(pid, sizeof(pid), "%ld", (long)getpid());
    setenv("LISTEN_PID", pid, 1);
    setenv("LISTEN_FDNAMES", "control:peer", 1);
    ck_assert_int_eq(load(&cfg, &err, "--node-id", "n1", "--data-dir", "/d", NULL), 0);
    ck_assert_uint_eq(cfg.port, 0);
    ck_assert_ptr_null(cfg.advertise);
    char *printed = NULL;
    size_t plen = 0;
    FILE *f = open_memstream(&printed, &plen);
    config_print(&cfg, f);
    fclose(f);
    ck_assert_ptr_nonnull(strstr(printed, "\n# port: from the systemd socket named 'peer'\n"));
    ck_assert_ptr_null(strstr(printed, "advertise"));
    ck_assert_ptr_nonnull(strstr(printed, "\n# join: none\n"));
    ck_assert_ptr_nonnull(strstr(printed, "\n# secret_file: /d/.pickbox/state/secret\n"));
    free(printed);
    config_free(&cfg);

    /* Another process's LISTEN_PID or no "peer" name: port is required. */
    setenv("LISTEN_FDNAMES", "control", 1);
    ck_assert_int_eq(load(&cfg, &err, "--node-id", "n1", "--data-dir", "/d", NULL), -EINVAL);
    config_free(&cfg);
    setenv("LISTEN_FDNAMES", "peer", 1);
    setenv("LISTEN_PID", "1", 1);
    ck_assert_int_eq(load(&cfg, &err, "--node-id", "n1", "--data-dir", "/d", NULL), -EINVAL);
    ck_assert_str_eq(err.msg, "port is required (set --port PORT, or use --config FILE)");
    config_free(&cfg);
}
END_TEST

START_TEST(test_command_line_errors)
{
    struct pb_config cfg;
    struct pb_error err;
    ck_assert_int_eq(load(&cfg, &err, "--prot", "1", NULL), -EINVAL);
    ck_assert_str_eq(err.msg, "unknown or ambiguous option '--prot' (did you mean '--port'?)");
    config_free(&cfg);
    ck_assert_int_eq(load(&cfg, &err, "--node_id=n1", NULL), -EINVAL);
    ck_assert_str_eq(err.msg,
                     "unknown or ambiguous option '--node_id' (did you mean '--node-id'?)");
    config_free(&cfg);
    ck_assert_int_eq(load(&cfg, &err, "--zzzzzzzz", NULL), -EINVAL);
    ck_assert_str_eq(err.msg, "unknown or ambiguous option '--zzzzzzzz' (see --help)");
    config_free(&cfg);
    ck_assert_int_eq(load(&cfg, &err, "-x", NULL), -EINVAL);
    ck_assert_str_eq(err.msg, "unknown option '-x' (see --help)");
    config_free(&cfg);
    ck_assert_int_eq(load(&cfg, &err, "--node-id", "n1", "--port", NULL), -EINVAL);
    ck_assert_str_eq(err.msg, "option '--port' requires a value");
    config_free(&cfg);
    ck_assert_int_eq(load(&cfg, &err, "--port", "1", "--port", "2", NULL), -EINVAL);
    ck_assert_str_eq(err.msg, "--port: given more than once");
    config_free(&cfg);
    ck_assert_int_eq(load(&cfg, &err, "--join=", NULL), -EINVAL);
    ck_assert_str_eq(err.msg, "--join: empty value");
    config_free(&cfg);
    ck_assert_int_eq(load(&cfg, &err, "--node-id", "n1", "stray", NULL), -EINVAL);
    ck_assert_str_eq(err.msg, "unexpected argument 'stray' (see --help)");
    config_free(&cfg);
    ck_assert_int_eq(load(&cfg, &err, "--node-id", "a b", "--port", "1", "--data-dir", "/d", NULL),
                     -EINVAL);
    ck_assert_str_eq(err.msg, "--node-id: bad node_id 'a b' (1-64 of A-Z a-z 0-9 . _ -, not "
                              "starting with '.' or '-')");
    config_free(&cfg);
    ck_assert_int_eq(load(&cfg, &err, "--check-config=yes", NULL), -EINVAL);
    ck_assert_str_eq(err.msg, "option '--check-config' does not take a value");
    config_free(&cfg);
    ck_assert_int_eq(load(&cfg, &err, "--config", "/x", "--config", "/y", NULL), -EINVAL);
    ck_assert_str_eq(err.msg, "--config: given more than once");
    config_free(&cfg);
}
END_TEST

START_TEST(test_node_id_length)
{
    struct pb_config cfg;
    struct pb_error err;
    char id[80];
    memset(id, 'a', 64);
    id[64] = '\0';
    ck_assert_int_eq(load(&cfg, &err, "--node-id", id, "--port", "1", "--data-dir", "/d", NULL), 0);
    config_free(&cfg);
    strcat(id, "a");
    ck_assert_int_eq(load(&cfg, &err, "--node-id", id, "--port", "1", "--data-dir", "/d", NULL),
                     -EINVAL);
    config_free(&cfg);
}
END_TEST

START_TEST(test_heartbeat_relation)
{
    const char *path = write_file("hb.conf", BASE "election_timeout_ms = 200\n");
    struct pb_config cfg;
    struct pb_error err;
    ck_assert_int_eq(load(&cfg, &err, "--config", path, "--heartbeat-ms", "100", NULL), -EINVAL);
    char want[PATH_MAX + 200];
    snprintf(want, sizeof(want),
             "heartbeat_ms (100, from --heartbeat-ms) must be less than half of "
             "election_timeout_ms (200, from %s:4)",
             path);
    ck_assert_str_eq(err.msg, want);
    config_free(&cfg);
    ck_assert_int_eq(load(&cfg, &err, "--config", path, "--heartbeat-ms", "99", NULL), 0);
    config_free(&cfg);
    ck_assert_int_eq(load(&cfg, &err, "--config", path, "--election-timeout-ms", "199", NULL),
                     -EINVAL);
    ck_assert_str_eq(err.msg, "heartbeat_ms (100, from default) must be less than half of "
                              "election_timeout_ms (199, from --election-timeout-ms)");
    config_free(&cfg);
}
END_TEST

START_TEST(test_wildcard_bind_needs_advertise)
{
    struct pb_config cfg;
    struct pb_error err;
    ck_assert_int_eq(load(&cfg, &err, "--node-id", "n1", "--port", "1", "--data-dir", "/d",
                          "--bind", "[::]", NULL),
                     -EINVAL);
    ck_assert_str_eq(err.msg, "advertise is required when bind is the wildcard address :: (bind "
                              "from --bind)");
    config_free(&cfg);
    ck_assert_int_eq(load(&cfg, &err, "--node-id", "n1", "--port", "1", "--data-dir", "/d",
                          "--bind", "::", "--advertise", "[2001:db8::1]:1", NULL),
                     0);
    ck_assert_str_eq(cfg.bind, "::");
    ck_assert_str_eq(cfg.advertise, "[2001:db8::1]:1");
    config_free(&cfg);
}
END_TEST

START_TEST(test_control_socket_too_long)
{
    char dir[200];
    memset(dir, 'd', sizeof(dir) - 1);
    dir[0] = '/';
    dir[sizeof(dir) - 1] = '\0';
    struct pb_config cfg;
    struct pb_error err;
    ck_assert_int_eq(load(&cfg, &err, "--node-id", "n1", "--port", "1", "--data-dir", dir, NULL),
                     -ENAMETOOLONG);
    ck_assert_msg(strstr(err.msg, "control socket path") == err.msg, "%s", err.msg);
    ck_assert_msg(strstr(err.msg, "max 107; from default)") != NULL, "%s", err.msg);
    config_free(&cfg);
    /* An explicit short socket path fixes it. */
    ck_assert_int_eq(load(&cfg, &err, "--node-id", "n1", "--port", "1", "--data-dir", dir,
                          "--control-socket", "/run/x.sock", NULL),
                     0);
    config_free(&cfg);
}
END_TEST

/* Runs config_load with stdout redirected to a file; returns what was printed. */
static char *load_capturing_stdout(int *rc, const char *arg)
{
    char path[PATH_MAX + 32];
    snprintf(path, sizeof(path), "%s/stdout", tmpdir);
    fflush(stdout);
    int saved = dup(STDOUT_FILENO);
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    ck_assert_int_ge(fd, 0);
    dup2(fd, STDOUT_FILENO);
    close(fd);
    struct pb_config cfg;
    struct pb_error err;
    *rc = load(&cfg, &err, "--node-id", "n1", arg, "--port", NULL);
    fflush(stdout);
    dup2(saved, STDOUT_FILENO);
    close(saved);
    config_free(&cfg);
    FILE *f = fopen(path, "r");
    ck_assert_ptr_nonnull(f);
    char *out = pb_xcalloc(1, 16384);
    size_t n = fread(out, 1, 16383, f);
    out[n] = '\0';
    fclose(f);
    return out;
}

START_TEST(test_help_and_version)
{
    int rc;
    /* --help wins even before a bad later argument is seen. */
    char *out = load_capturing_stdout(&rc, "--help");
    ck_assert_int_eq(rc, 1);
    static const char *const flags[] = {
            "--node-id ID",
            "--port PORT",
            "--bind ADDR",
            "--advertise HOST:PORT",
            "--join HOST:PORT",
            "--data-dir DIR",
            "--state-dir DIR",
            "--control-socket",
            "--secret-file FILE",
            "--log-level LEVEL",
            "--ignore",
            "--metrics-listen",
            "--election-timeout-ms",
            "--heartbeat-ms",
            "--config FILE",
            "--check-config",
            "--help",
            "--version",
            "[127.0.0.1]",
            "[DATA_DIR/.pickbox/state]",
            "[1000]",
            "[100]",
            "[info]",
    };
    for (size_t i = 0; i < PB_ARRAY_SIZE(flags); i++)
        ck_assert_msg(strstr(out, flags[i]) != NULL, "--help lacks '%s'", flags[i]);
    for (const char *line = out; *line != '\0';) {
        size_t len = strcspn(line, "\n");
        ck_assert_msg(len <= 80, "--help line longer than 80 columns: %.*s", (int)len, line);
        line += len + (line[len] == '\n');
    }
    free(out);
    out = load_capturing_stdout(&rc, "-V");
    ck_assert_int_eq(rc, 1);
    ck_assert_str_eq(out, "pickboxd " PACKAGE_VERSION "\n");
    free(out);
}
END_TEST

START_TEST(test_print_round_trips)
{
    const char *path = write_file("rt.conf", BASE "bind = ::1\nadvertise = h.example:1\n"
                                                  "join = 10.1.1.1:2\n"
                                                  "secret_file = \"/etc/a \\\"b\\\\ \"\n"
                                                  "ignore = \" lead\"\nignore = *.o\n"
                                                  "metrics_listen = [::1]:9\n"
                                                  "log_level = notice\n"
                                                  "heartbeat_ms = 10\n"
                                                  "election_timeout_ms = 21\n");
    struct pb_config a, b;
    struct pb_error err;
    ck_assert_int_eq(load(&a, &err, "--config", path, NULL), 0);
    char out[PATH_MAX + 32];
    snprintf(out, sizeof(out), "%s/printed.conf", tmpdir);
    FILE *f = fopen(out, "w");
    ck_assert_ptr_nonnull(f);
    config_print(&a, f);
    fclose(f);
    int rc = load(&b, &err, "--config", out, NULL);
    ck_assert_msg(rc == 0, "%s", err.msg);
    ck_assert_str_eq(a.node_id, b.node_id);
    ck_assert_uint_eq(a.port, b.port);
    ck_assert_str_eq(a.bind, b.bind);
    ck_assert_str_eq(a.advertise, b.advertise);
    ck_assert_str_eq(a.join, b.join);
    ck_assert_str_eq(a.data_dir, b.data_dir);
    ck_assert_str_eq(a.state_dir, b.state_dir);
    ck_assert_str_eq(a.control_socket, b.control_socket);
    ck_assert_str_eq(a.secret_file, "/etc/a \"b\\ ");
    ck_assert_str_eq(a.secret_file, b.secret_file);
    ck_assert_str_eq(a.metrics_listen, b.metrics_listen);
    ck_assert_int_eq(a.log_level, b.log_level);
    ck_assert_uint_eq(a.n_ignore, 2);
    ck_assert_uint_eq(b.n_ignore, 2);
    ck_assert_str_eq(a.ignore[0], "lead"); /* trimmed as a list element */
    ck_assert_str_eq(b.ignore[0], "lead");
    ck_assert_str_eq(b.ignore[1], "*.o");
    ck_assert_uint_eq(b.election_timeout_ms, 21);
    ck_assert_uint_eq(b.heartbeat_ms, 10);
    config_free(&a);
    config_free(&b);
}
END_TEST

/* The shipped example loads, and documents every key (set or commented out). */
START_TEST(test_example_conf)
{
    const char *srcdir = getenv("top_srcdir");
    ck_assert_msg(srcdir != NULL, "top_srcdir is not set (run through make check)");
    char path[PATH_MAX];
    snprintf(path, sizeof(path), "%s/etc/pickbox/example.conf", srcdir);
    struct pb_config cfg;
    struct pb_error err;
    int rc = load(&cfg, &err, "--config", path, NULL);
    ck_assert_msg(rc == 0, "%s", err.msg);
    ck_assert_str_eq(cfg.node_id, "node1");
    ck_assert_str_eq(cfg.data_dir, "/srv/pickbox/node1");
    config_free(&cfg);

    FILE *f = fopen(path, "r");
    ck_assert_ptr_nonnull(f);
    char *text = pb_xcalloc(1, 65536);
    size_t n = fread(text, 1, 65535, f);
    text[n] = '\0';
    fclose(f);
    static const char *const keys[] = {
            "node_id",
            "port",
            "bind",
            "advertise",
            "join",
            "data_dir",
            "state_dir",
            "secret_file",
            "control_socket",
            "log_level",
            "ignore",
            "metrics_listen",
            "election_timeout_ms",
            "heartbeat_ms",
    };
    for (size_t i = 0; i < PB_ARRAY_SIZE(keys); i++) {
        char set[64], commented[64];
        snprintf(set, sizeof(set), "\n%s = ", keys[i]);
        snprintf(commented, sizeof(commented), "\n#%s = ", keys[i]);
        ck_assert_msg(strstr(text, set) || strstr(text, commented),
                      "example.conf does not document %s", keys[i]);
    }
    free(text);
}
END_TEST

/* config_diff names exactly the keys whose values differ (what a SIGHUP
 * reload reports as waiting for a restart). */
START_TEST(test_diff_names_changed_keys)
{
    struct pb_config a, b;
    struct pb_error err;
    ck_assert_int_eq(load(&a, &err, "--node-id", "n1", "--port", "8010", "--data-dir", "/srv/t",
                          "--ignore", "*.o", NULL),
                     0);
    ck_assert_int_eq(load(&b, &err, "--node-id", "n1", "--port", "8010", "--data-dir", "/srv/t",
                          "--ignore", "*.o", NULL),
                     0);
    char out[256];
    ck_assert_uint_eq(config_diff(&a, &b, out, sizeof(out)), 0);
    ck_assert_str_eq(out, "");
    config_free(&b);
    ck_assert_int_eq(load(&b, &err, "--node-id", "n1", "--port", "8011", "--data-dir", "/srv/t",
                          "--ignore", "*.tmp", "--log-level", "debug", NULL),
                     0);
    ck_assert_uint_eq(config_diff(&a, &b, out, sizeof(out)), 4);
    /* port changes advertise (bind:port) too */
    ck_assert_str_eq(out, "port, advertise, log_level, ignore");
    /* a short buffer is cut, terminated, and the count stays right */
    char tiny[6];
    ck_assert_uint_eq(config_diff(&a, &b, tiny, sizeof(tiny)), 4);
    ck_assert_uint_eq(strlen(tiny), 5);
    config_free(&a);
    config_free(&b);
}
END_TEST

static Suite *config_suite(void)
{
    Suite *s = suite_create("config");
    TCase *tc = tcase_create("config");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, test_defaults_from_command_line);
    tcase_add_test(tc, test_equals_form_and_all_flags);
    tcase_add_test(tc, test_relative_paths_on_command_line_use_cwd);
    tcase_add_test(tc, test_file_full_syntax);
    tcase_add_test(tc, test_command_line_overrides_file);
    tcase_add_test(tc, test_cli_bad_value_is_checked_even_if_file_is_good);
    tcase_add_test(tc, test_file_errors);
    tcase_add_test(tc, test_file_nul_and_long_line);
    tcase_add_test(tc, test_file_missing_and_not_regular);
    tcase_add_test(tc, test_file_too_large);
    tcase_add_test(tc, test_missing_required);
    tcase_add_test(tc, test_port_optional_with_systemd_peer_socket);
    tcase_add_test(tc, test_command_line_errors);
    tcase_add_test(tc, test_node_id_length);
    tcase_add_test(tc, test_heartbeat_relation);
    tcase_add_test(tc, test_wildcard_bind_needs_advertise);
    tcase_add_test(tc, test_control_socket_too_long);
    tcase_add_test(tc, test_help_and_version);
    tcase_add_test(tc, test_print_round_trips);
    tcase_add_test(tc, test_example_conf);
    tcase_add_test(tc, test_diff_names_changed_keys);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(config_suite());
    srunner_run_all(sr, CK_ENV);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}

/*
 * cli.c: pickboxctl's argument parsing and its one run: resolve, connect,
 * request, render, exit code (see pickboxctl.h).
 */
#include "config.h"

#include "pickboxctl/pickboxctl.h"

#include <ctype.h>
#include <errno.h>
#include <getopt.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "pickboxctl/client.h"
#include "lib/util.h"

enum {
    OPT_SIZE = 256,
    OPT_CONCURRENCY,
    OPT_DURATION,
};

static const struct option pbctl_long_options[] = {
        {"size", required_argument, NULL, OPT_SIZE},
        {"concurrency", required_argument, NULL, OPT_CONCURRENCY},
        {"duration", required_argument, NULL, OPT_DURATION},
        {"socket", required_argument, NULL, 's'},
        {"node", required_argument, NULL, 'n'},
        {"json", no_argument, NULL, 'j'},
        {"timeout", required_argument, NULL, 't'},
        {"help", no_argument, NULL, 'h'},
        {"version", no_argument, NULL, 'V'},
        {NULL, 0, NULL, 0},
};

/* Seconds, decimal, > 0 and at most a day, into milliseconds (rounded up). */
static int parse_timeout(const char *s, int *ms)
{
    if (!(isdigit((unsigned char)s[0]) || (s[0] == '.' && isdigit((unsigned char)s[1]))))
        return -EINVAL;
    for (const char *p = s; *p; p++) {
        if (!isdigit((unsigned char)*p) && *p != '.')
            return -EINVAL;
    }
    errno = 0;
    char *end = NULL;
    double d = strtod(s, &end);
    if (*end != '\0' || errno != 0 || !(d > 0) || d > 86400.0)
        return -EINVAL;
    double v = d * 1000.0;
    int r = (int)v;
    if ((double)r < v)
        r++;
    *ms = r;
    return 0;
}

static int command_args_max(const struct pbctl_command *c)
{
    int n = 0;
    while (n < PBCTL_MAX_ARGS && c->args[n] != NULL)
        n++;
    return n;
}

/* "join NODE ADDRESS [X]" into buf. */
static void command_synopsis(const struct pbctl_command *c, char *buf, size_t len)
{
    size_t used = (size_t)snprintf(buf, len, "%s", c->name);
    for (int i = 0; c->args[i] != NULL && i < PBCTL_MAX_ARGS && used < len; i++) {
        bool opt = i >= c->min_args;
        used += (size_t)snprintf(buf + used, len - used, " %s", opt ? "[" : "");
        for (const char *p = c->args[i]; *p && used + 1 < len; p++)
            buf[used++] = (char)toupper((unsigned char)*p);
        buf[used < len ? used : len - 1] = '\0';
        if (opt && used < len)
            used += (size_t)snprintf(buf + used, len - used, "]");
    }
}

static const char *opt_name(unsigned bit)
{
    switch (bit) {
    case PBCTL_OPT_SIZE:
        return "--size";
    case PBCTL_OPT_CONCURRENCY:
        return "--concurrency";
    default:
        return "--duration";
    }
}

/* --size / --concurrency / --duration into opts. */
static int parse_numeric_option(int c, const char *arg, struct pbctl_options *opts,
                                struct pb_error *err)
{
    uint64_t v = 0;
    switch (c) {
    case OPT_SIZE:
        if (pb_parse_u64(arg, 0, PBCTL_SIZE_MAX, &v) < 0)
            return pb_error_set(err, -EINVAL, "bad --size '%.32s' (expected 0..%u bytes)", arg,
                                PBCTL_SIZE_MAX);
        opts->size = (unsigned)v;
        opts->opts_set |= PBCTL_OPT_SIZE;
        return 0;
    case OPT_CONCURRENCY:
        if (pb_parse_u64(arg, 1, PBCTL_CONCURRENCY_MAX, &v) < 0)
            return pb_error_set(err, -EINVAL,
                                "bad --concurrency '%.32s' (expected 1..%u connections)", arg,
                                PBCTL_CONCURRENCY_MAX);
        opts->concurrency = (unsigned)v;
        opts->opts_set |= PBCTL_OPT_CONCURRENCY;
        return 0;
    default: {
        int ms = 0;
        if (parse_timeout(arg, &ms) < 0 || ms > (int)PBCTL_DURATION_MAX_S * 1000)
            return pb_error_set(err, -EINVAL,
                                "bad --duration '%.32s' (expected seconds > 0, e.g. 10 or 2.5)",
                                arg);
        opts->duration_ms = (unsigned)ms;
        opts->opts_set |= PBCTL_OPT_DURATION;
        return 0;
    }
    }
}

int pbctl_parse_args(int argc, char **argv, struct pbctl_options *opts, struct pb_error *err)
{
    memset(opts, 0, sizeof(*opts));
    opts->timeout_ms = PBCTL_DEFAULT_TIMEOUT_MS;
    optind = 0; /* glibc: reinitialise; this may run more than once per process */
    opterr = 0;
    int c;
    while ((c = getopt_long(argc, argv, ":s:n:jt:hV", pbctl_long_options, NULL)) != -1) {
        switch (c) {
        case 's':
            if (opts->socket != NULL)
                return pb_error_set(err, -EINVAL, "-s/--socket given more than once");
            opts->socket = optarg;
            break;
        case 'n':
            if (opts->node != NULL)
                return pb_error_set(err, -EINVAL, "-n/--node given more than once");
            opts->node = optarg;
            break;
        case 'j':
            opts->json = true;
            break;
        case 't':
            if (parse_timeout(optarg, &opts->timeout_ms) < 0)
                return pb_error_set(err, -EINVAL,
                                    "bad timeout '%.32s' (expected seconds > 0, e.g. 5 or 0.5)",
                                    optarg);
            opts->timeout_set = true;
            break;
        case OPT_SIZE:
        case OPT_CONCURRENCY:
        case OPT_DURATION:
            if (parse_numeric_option(c, optarg, opts, err) < 0)
                return -EINVAL;
            break;
        case 'h':
            opts->help = true;
            return 0;
        case 'V':
            opts->version = true;
            return 0;
        case ':':
            return pb_error_set(err, -EINVAL, "option '%.64s' requires a value", argv[optind - 1]);
        default:
            if (optopt != 0 && strncmp(argv[optind - 1], "--", 2) != 0)
                return pb_error_set(err, -EINVAL, "unknown option '-%c' (see pickboxctl --help)",
                                    optopt);
            return pb_error_set(err, -EINVAL, "unknown option '%.64s' (see pickboxctl --help)",
                                argv[optind - 1]);
        }
    }
    if (optind >= argc)
        return pb_error_set(err, -EINVAL, "missing command (see pickboxctl --help)");
    const char *name = argv[optind];
    opts->cmd = pbctl_command_find(name);
    if (opts->cmd == NULL) {
        char list[256] = "";
        size_t used = 0;
        for (const struct pbctl_command *k = pbctl_commands; k->name && used < sizeof(list); k++)
            used += (size_t)snprintf(list + used, sizeof(list) - used, "%s%s",
                                     k == pbctl_commands ? "" : ", ", k->name);
        return pb_error_set(err, -EINVAL, "unknown command '%.64s' (commands: %s)", name, list);
    }
    unsigned extra = opts->opts_set & ~opts->cmd->opts;
    if (extra != 0)
        return pb_error_set(err, -EINVAL, "option %s does not apply to '%s'",
                            opt_name(extra & (~extra + 1u)), opts->cmd->name);
    if (!opts->timeout_set && opts->cmd->timeout_ms > 0)
        opts->timeout_ms = opts->cmd->timeout_ms;
    opts->args = argv + optind + 1;
    opts->nargs = argc - optind - 1;
    if (opts->nargs < opts->cmd->min_args || opts->nargs > command_args_max(opts->cmd)) {
        char syn[128];
        command_synopsis(opts->cmd, syn, sizeof(syn));
        return pb_error_set(err, -EINVAL,
                            "wrong number of arguments for '%s' (usage: pickboxctl %s)",
                            opts->cmd->name, syn);
    }
    return 0;
}

json_t *pbctl_params(const struct pbctl_options *opts)
{
    json_t *params = json_object();
    for (int i = 0; i < opts->nargs && opts->cmd->args[i] != NULL; i++)
        json_object_set_new(params, opts->cmd->args[i], json_string(opts->args[i]));
    if (opts->opts_set & PBCTL_OPT_SIZE)
        json_object_set_new(params, "size", json_integer(opts->size));
    if ((opts->cmd->opts & PBCTL_OPT_SEND_TIMEOUT) && opts->timeout_set) {
        int s = opts->timeout_ms / 1000 - 1;
        json_object_set_new(params, "timeout_s", json_integer(s < 1 ? 1 : s));
    }
    return params;
}

void pbctl_usage(FILE *out)
{
    fprintf(out,
            "Usage: pickboxctl [-s PATH | -n NAME] [--json] [-t SECONDS] COMMAND [ARGS]\n"
            "Operates one pickboxd node through its control socket.\n\n"
            "Options:\n"
            "  -s, --socket PATH     control socket to use\n"
            "  -n, --node NAME       use %s/NAME/control.sock\n"
            "  -j, --json            print the reply as JSON (one line)\n"
            "  -t, --timeout SEC     wait at most SEC seconds for the reply [%d]\n"
            "      --size N          probe, bench: bytes per probe entry [bench: 256]\n"
            "      --concurrency N   bench: connections, one probe in flight each [64]\n"
            "      --duration SEC    bench: measuring time after a 1 s warm-up [10]\n"
            "  -h, --help            show this help and exit\n"
            "  -V, --version         show the version and exit\n\n"
            "Commands:\n",
            PBCTL_RUN_DIR, PBCTL_DEFAULT_TIMEOUT_MS / 1000);
    for (const struct pbctl_command *c = pbctl_commands; c->name != NULL; c++) {
        char syn[128];
        command_synopsis(c, syn, sizeof(syn));
        fprintf(out, "  %-20s  %s\n", syn, c->help);
    }
    fprintf(out,
            "\nWithout -s or -n: $PICKBOX_SOCKET, else the only %s/*/control.sock.\n"
            "Exit status: 0 ok, 1 error from pickboxd (or a failed exchange), 2 usage,\n"
            "3 cannot connect.\n",
            PBCTL_RUN_DIR);
}

static int pbctl_daemon_error(const struct pbctl_options *o, const struct pbctl_env *env,
                              const json_t *error)
{
    if (o->json) {
        json_dumpf(error, env->out, JSON_COMPACT);
        fputc('\n', env->out);
        fflush(env->out);
    }
    char msg[1024], code[128];
    pbctl_format_default(json_object_get(error, "message"), msg, sizeof(msg));
    pbctl_format_default(json_object_get(error, "code"), code, sizeof(code));
    fprintf(env->err, "pickboxctl: %s (%s)\n", msg, code);
    return PBCTL_EXIT_DAEMON;
}

int pbctl_run(int argc, char **argv, const struct pbctl_env *env)
{
    struct pbctl_options o;
    struct pb_error e;
    pb_error_clear(&e);
    if (pbctl_parse_args(argc, argv, &o, &e) < 0) {
        fprintf(env->err, "pickboxctl: %s\n", e.msg);
        return PBCTL_EXIT_USAGE;
    }
    if (o.help) {
        pbctl_usage(env->out);
        return PBCTL_EXIT_OK;
    }
    if (o.version) {
        fprintf(env->out, "pickboxctl %s\n", PACKAGE_VERSION);
        return PBCTL_EXIT_OK;
    }
    char *path = NULL;
    if (pbctl_socket_resolve(o.socket, o.node, env->env_socket, env->run_dir, &path, &e) < 0) {
        fprintf(env->err, "pickboxctl: %s\n", e.msg);
        return PBCTL_EXIT_USAGE;
    }
    if (o.cmd->run != NULL) {
        int code = o.cmd->run(&o, path, env);
        free(path);
        return code;
    }
    int fd = pbctl_connect(path, env->run_dir, o.timeout_ms, &e);
    free(path);
    if (fd < 0) {
        fprintf(env->err, "pickboxctl: %s\n", e.msg);
        return PBCTL_EXIT_CONNECT;
    }
    json_t *params = pbctl_params(&o);
    json_t *reply = NULL;
    int rc = pbctl_request(fd, o.cmd->method, params, o.timeout_ms, &reply, &e);
    close(fd);
    json_decref(params);
    if (rc < 0) {
        fprintf(env->err, "pickboxctl: %s\n", e.msg);
        return PBCTL_EXIT_DAEMON;
    }
    const json_t *error = json_object_get(reply, "error");
    if (error != NULL) {
        rc = pbctl_daemon_error(&o, env, error);
        json_decref(reply);
        return rc;
    }
    struct pbctl_writer *w =
            o.json ? pbctl_writer_json_new(env->out) : pbctl_writer_text_new(env->out);
    pbctl_render_fn render = o.cmd->render ? o.cmd->render : pbctl_render;
    rc = render(o.cmd->view, json_object_get(reply, "result"), w);
    pbctl_writer_free(w);
    json_decref(reply);
    if (rc < 0) {
        fprintf(env->err, "pickboxctl: cannot write the output: %s\n", strerror(-rc));
        return PBCTL_EXIT_DAEMON;
    }
    return PBCTL_EXIT_OK;
}

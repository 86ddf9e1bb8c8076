/*
 * pickboxctl.h: the pickboxctl command line (DESIGN.md section 8).
 *
 *   pickboxctl [-s PATH | -n NAME] [--json] [-t SECONDS] COMMAND [ARGS]
 *
 * One request per run: resolve the socket (client.h), send the command's
 * method with its arguments as params, render the result through render.h
 * (text table or --json), and map the outcome to an exit code.
 *
 * Commands are rows of pbctl_commands[] (commands.c). Adding one is one row:
 * its name, argument names (they become the params keys, in order), the
 * daemon method, a help line and optionally a view for labels and tables
 * (and, rarely, a render function of its own that still feeds the writer).
 * A row may also accept the numeric options --size / --concurrency /
 * --duration (PBCTL_OPT_*), have its own default timeout, or replace the one
 * request by a run function of its own (bench).
 *
 * Threading: none.
 */
#ifndef PICKBOX_PICKBOXCTL_PICKBOXCTL_H
#define PICKBOX_PICKBOXCTL_PICKBOXCTL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>

#include "lib/error.h"
#include "pickboxctl/render.h"

enum pbctl_exit {
    PBCTL_EXIT_OK = 0,
    PBCTL_EXIT_DAEMON = 1, /* pickboxd answered with an error, or the exchange failed */
    PBCTL_EXIT_USAGE = 2,
    PBCTL_EXIT_CONNECT = 3, /* the control socket could not be connected to */
};

#define PBCTL_DEFAULT_TIMEOUT_MS 10000
#define PBCTL_MAX_ARGS           4

/* Which numeric options a command accepts (struct pbctl_command.opts). */
#define PBCTL_OPT_SIZE        0x1u /* --size N: params.size (probe, bench) */
#define PBCTL_OPT_CONCURRENCY 0x2u /* --concurrency N (bench) */
#define PBCTL_OPT_DURATION    0x4u /* --duration SECONDS (bench) */
/* The command sends params.timeout_s when -t is given (the daemon's own wait,
 * one second less than ours so that its TIMEOUT reply still arrives). */
#define PBCTL_OPT_SEND_TIMEOUT 0x8u

/* Limits of the numeric options. */
#define PBCTL_SIZE_MAX        65536u
#define PBCTL_CONCURRENCY_MAX 512u /* the control socket's default client limit */
#define PBCTL_DURATION_MAX_S  86400u

struct pbctl_options;
struct pbctl_env;

/* A command that does more than one request (bench). path is the resolved
 * control socket. Returns the exit code (enum pbctl_exit). */
typedef int (*pbctl_run_fn)(const struct pbctl_options *opts, const char *path,
                            const struct pbctl_env *env);

struct pbctl_command {
    const char *name;
    /* Positional arguments: all of them become string members of params under
     * these names; the first min_args are required. NULL-terminated. */
    const char *args[PBCTL_MAX_ARGS + 1];
    int min_args;
    const char *method;                  /* the ctl method to call */
    const char *help;                    /* one line for --help */
    const struct pbctl_field_spec *view; /* NULL: generic rendering */
    pbctl_render_fn render;              /* NULL: pbctl_render */
    unsigned opts;                       /* PBCTL_OPT_* it accepts */
    int timeout_ms;                      /* default -t; 0: PBCTL_DEFAULT_TIMEOUT_MS */
    pbctl_run_fn run;                    /* NULL: one request through method */
};

/* The command table, terminated by a {NULL} entry. */
extern const struct pbctl_command pbctl_commands[];

/* The command called name, or NULL. */
const struct pbctl_command *pbctl_command_find(const char *name);

/* What the program needs from its surroundings (tests substitute them). */
struct pbctl_env {
    FILE *out;              /* results */
    FILE *err;              /* one line per failure */
    const char *run_dir;    /* NULL: PBCTL_RUN_DIR */
    const char *env_socket; /* the value of $PICKBOX_SOCKET, or NULL */
};

struct pbctl_options {
    const char *socket;   /* -s (borrowed from argv) */
    const char *node;     /* -n */
    bool json;            /* -j/--json */
    int timeout_ms;       /* -t; default the command's, else PBCTL_DEFAULT_TIMEOUT_MS */
    bool timeout_set;     /* -t was given */
    unsigned opts_set;    /* PBCTL_OPT_* given on the command line */
    unsigned size;        /* --size (when PBCTL_OPT_SIZE is set) */
    unsigned concurrency; /* --concurrency */
    unsigned duration_ms; /* --duration, in milliseconds */
    bool help, version;
    const struct pbctl_command *cmd;
    char **args; /* the command's arguments (into argv) */
    int nargs;
};

/*
 * Parses argv into opts (options may come before or after the command; "--"
 * ends them). Returns 0, or -EINVAL with a one-line usage message in err.
 * With --help or --version set, cmd may be NULL.
 */
int pbctl_parse_args(int argc, char **argv, struct pbctl_options *opts, struct pb_error *err);

/* Builds the request params for opts' command: {"<arg name>": "<value>", ...},
 * plus "size" (integer) when --size was given, and "timeout_s" (integer) for
 * PBCTL_OPT_SEND_TIMEOUT commands when -t was given. */
json_t *pbctl_params(const struct pbctl_options *opts);

/* Writes --help to out. */
void pbctl_usage(FILE *out);

/* The whole program; returns the exit code (enum pbctl_exit). */
int pbctl_run(int argc, char **argv, const struct pbctl_env *env);

#endif

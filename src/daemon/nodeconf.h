/*
 * nodeconf.h: pickboxd's configuration, from the command line and an INI
 * file (named apart from autoconf's config.h, which it used to shadow; its
 * functions and constants keep the config_ / CONFIG_ prefix).
 *
 * Every option is both a command-line flag (--node-id, --port, ...) and a key
 * in the config file (node_id = ..., port = ...). The file is INI style:
 * `key = value` lines, `#` comments, blank lines; the command line overrides
 * the file. An unknown key, a bad value or a missing required value is one
 * clear error naming file and line (or the flag), and pickboxd exits 2.
 */
#ifndef PICKBOX_DAEMON_NODECONF_H
#define PICKBOX_DAEMON_NODECONF_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "lib/error.h"
#include "lib/log.h"

#define CONFIG_DEFAULT_BIND                "127.0.0.1"
#define CONFIG_DEFAULT_ELECTION_TIMEOUT_MS 1000
#define CONFIG_DEFAULT_HEARTBEAT_MS        100
#define CONFIG_MAX_LINE                    4096 /* bytes per config file line */
#define CONFIG_MAX_FILE                    (1024 * 1024)

/*
 * Rules (the full list is in `pickboxd --help` and etc/pickbox/example.conf):
 * - Paths given on the command line may be relative: they are resolved
 *   against the current directory when the configuration is loaded. Paths in
 *   a config file must be absolute (the daemon usually runs with cwd "/", so a
 *   relative path there would be a trap).
 * - Each key may appear once per file and each flag once per command line,
 *   except ignore / --ignore, which may repeat. A command-line value replaces
 *   the file's value for that key; --ignore replaces the whole file list.
 * - Values may be wrapped in double quotes ("a b", with \" and \\ escapes);
 *   a `#` or `;` starts a comment only at the start of a line.
 */

struct pb_config {
    char *node_id;            /* required; 1-64 of [A-Za-z0-9._-], not starting with '.' or '-' */
    char *bind;               /* peer listen address; default CONFIG_DEFAULT_BIND */
    uint16_t port;            /* peer TCP port; required unless systemd passes a "peer" fd
                                 (LISTEN_FDNAMES), in which case it may be 0 */
    char *advertise;          /* "host:port" other members dial; default bind:port ("[v6]:port");
                                 required when bind is a wildcard; NULL only when port is 0 */
    char *join;               /* "host:port" of a member to join through; NULL = none */
    char *data_dir;           /* the replicated tree; required */
    char *state_dir;          /* default <data_dir>/.pickbox/state */
    char *control_socket;     /* default <state_dir>/control.sock */
    char *secret_file;        /* NULL = <state_dir>/secret, generated on bootstrap */
    char *config_file;        /* the file that was read (absolute), or NULL */
    enum log_level log_level; /* default LOG_LEVEL_INFO */
    bool check_config;        /* --check-config: validate, print a summary, exit */
    char **ignore;            /* n_ignore glob patterns (fnmatch(3)) the watcher skips */
    size_t n_ignore;
    char *metrics_listen;         /* "host:port" for a metrics endpoint; NULL = off */
    uint32_t election_timeout_ms; /* default 1000; 10..600000 */
    uint32_t heartbeat_ms;        /* default 100; 1..60000 and heartbeat_ms * 2 < election */
};

/*
 * Fills cfg from argv (and from the file named by --config, if any), applies
 * defaults and validates. Returns:
 *   0   run (cfg is complete and valid; cfg->check_config says whether to
 *       only check);
 *   1   --help or --version was printed to stdout: exit 0;
 *   <0  an error: err->msg is one line naming the file and line or the flag;
 *       the caller prints "pickboxd: <msg>" to stderr and exits 2.
 * cfg's previous contents are ignored (it is zeroed first) and it must be
 * released with config_free() in every case. Not thread-safe: it uses
 * getopt_long()'s globals (and resets them, so it may be called repeatedly).
 */
int config_load(struct pb_config *cfg, int argc, char **argv, struct pb_error *err);

/* Frees every string in cfg and zeroes it. NULL is allowed. */
void config_free(struct pb_config *cfg);

/* Writes the effective configuration of a loaded cfg to out in config file
 * syntax (every key, defaults included), e.g. for --check-config. The output
 * loads back to the same configuration. */
void config_print(const struct pb_config *cfg, FILE *out);

/* Writes into out (len bytes, always terminated) the names of the keys whose
 * values differ between a and b, separated by ", " ("" when none), e.g. to
 * tell what a reload could not apply. Returns how many keys differ. */
size_t config_diff(const struct pb_config *a, const struct pb_config *b, char *out, size_t len);

/* True when s is a valid node name: 1-64 of [A-Za-z0-9._-], not starting
 * with '.' or '-' (so it is safe as a path component and a unit instance). */
bool config_node_id_valid(const char *s);

/* Writes the --help text (every option with its default) to out. */
void config_usage(FILE *out);

#endif

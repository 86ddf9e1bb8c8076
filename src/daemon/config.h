/*
 * config.h: pickboxd's configuration, from the command line and an INI file.
 *
 * Every option is both a command-line flag (--node-id, --port, ...) and a key
 * in the config file (node_id = ..., port = ...). The file is INI style:
 * `key = value` lines, `#` comments, blank lines; the command line overrides
 * the file. An unknown key, a bad value or a missing required value is one
 * clear error naming file and line (or the flag), and pickboxd exits 2.
 */
#ifndef PICKBOX_DAEMON_CONFIG_H
#define PICKBOX_DAEMON_CONFIG_H

#include <stdbool.h>
#include <stdint.h>

#include "lib/error.h"
#include "lib/log.h"

#define CONFIG_DEFAULT_BIND "127.0.0.1"

struct pb_config {
    char *node_id;            /* required; 1-64 of [A-Za-z0-9._-], not starting with '.' or '-' */
    char *bind;               /* peer listen address; default CONFIG_DEFAULT_BIND */
    uint16_t port;            /* peer TCP port; required unless systemd passes a "peer" fd */
    char *advertise;          /* "host:port" other members dial; default bind:port */
    char *join;               /* "host:port" of a member to join through; NULL = none */
    char *data_dir;           /* the replicated tree; required */
    char *state_dir;          /* default <data_dir>/.pickbox/state */
    char *control_socket;     /* default <state_dir>/control.sock */
    char *secret_file;        /* NULL = <state_dir>/secret, generated on bootstrap */
    char *config_file;        /* the file that was read, or NULL */
    enum log_level log_level; /* default LOG_LEVEL_INFO */
    bool check_config;        /* --check-config: validate, print a summary, exit */
};

/*
 * Fills cfg from argv (and from the file named by --config, if any), applies
 * defaults and validates. Returns:
 *   0   run (cfg is complete and valid; cfg->check_config says whether to
 *       only check);
 *   1   --help or --version was printed to stdout: exit 0;
 *   <0  an error: err->msg is one line naming the file and line or the flag;
 *       the caller prints "pickboxd: <msg>" to stderr and exits 2.
 * cfg must be released with config_free() in every case.
 */
int config_load(struct pb_config *cfg, int argc, char **argv, struct pb_error *err);

/* Frees every string in cfg and zeroes it. NULL is allowed. */
void config_free(struct pb_config *cfg);

#endif

/*
 * nodeconf.c: pickboxd's configuration from the command line and an INI file
 * (the functions keep the config_ prefix of the module's first name).
 *
 * One table (config_keys) describes every setting: its file key, its flag,
 * its default and its help line. Loading happens in three steps:
 *   1. getopt_long collects raw command-line values (and --config);
 *   2. the config file, if any, is read and split into raw key = value
 *      settings, each remembering "file:line";
 *   3. for every key the command-line value wins over the file value; the
 *      winner is parsed and checked, and a failure is reported with the place
 *      it came from ("/etc/pickbox/n1.conf:7: ..." or "--port: ...").
 * Cross-key rules (required keys, heartbeat vs election timeout, advertise on
 * a wildcard bind) run last and name the places of the values involved.
 */
#include <config.h>

#include "daemon/nodeconf.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "lib/util.h"

enum config_key_id {
    KEY_NODE_ID,
    KEY_PORT,
    KEY_BIND,
    KEY_ADVERTISE,
    KEY_JOIN,
    KEY_DATA_DIR,
    KEY_STATE_DIR,
    KEY_CONTROL_SOCKET,
    KEY_SECRET_FILE,
    KEY_LOG_LEVEL,
    KEY_IGNORE,
    KEY_METRICS_LISTEN,
    KEY_ELECTION_TIMEOUT_MS,
    KEY_HEARTBEAT_MS,
    KEY_COUNT,
    /* Flags that are not file keys. */
    OPT_CONFIG = KEY_COUNT,
    OPT_CHECK_CONFIG,
    OPT_HELP,
    OPT_VERSION,
};

#define KEY_REPEAT 0x1u /* may be given more than once */

struct config_key {
    const char *name;    /* file key; the flag is the same with '-' for '_' */
    const char *flag;    /* "--node-id" */
    const char *metavar; /* "ID" */
    unsigned flags;
    const char *dflt; /* default, for --help */
    const char *help;
};

static const struct config_key config_keys[KEY_COUNT] = {
        [KEY_NODE_ID] = {"node_id", "--node-id", "ID", 0, "required",
                         "this node's name: 1-64 of A-Z a-z 0-9 . _ -"},
        [KEY_PORT] = {"port", "--port", "PORT", 0, "required",
                      "peer TCP port, unless systemd passes one (\"peer\")"},
        [KEY_BIND] = {"bind", "--bind", "ADDR", 0, CONFIG_DEFAULT_BIND,
                      "IPv4/IPv6 address the peer port listens on"},
        [KEY_ADVERTISE] = {"advertise", "--advertise", "HOST:PORT", 0, "BIND:PORT",
                           "address other members dial to reach this node"},
        [KEY_JOIN] = {"join", "--join", "HOST:PORT", 0, "none",
                      "an existing member to join the cluster through"},
        [KEY_DATA_DIR] = {"data_dir", "--data-dir", "DIR", 0, "required", "the replicated tree"},
        [KEY_STATE_DIR] = {"state_dir", "--state-dir", "DIR", 0, "DATA_DIR/.pickbox/state",
                           "Raft log, state database and secret"},
        [KEY_CONTROL_SOCKET] = {"control_socket", "--control-socket", "PATH", 0,
                                "STATE_DIR/control.sock",
                                "control socket, unless systemd passes one"},
        [KEY_SECRET_FILE] = {"secret_file", "--secret-file", "FILE", 0, "STATE_DIR/secret",
                             "shared cluster secret for peer authentication"},
        [KEY_LOG_LEVEL] = {"log_level", "--log-level", "LEVEL", 0, "info",
                           "error, warning, notice, info or debug"},
        [KEY_IGNORE] = {"ignore", "--ignore", "GLOB[,GLOB...]", KEY_REPEAT, "none",
                        "paths the watcher does not replicate; may repeat"},
        [KEY_METRICS_LISTEN] = {"metrics_listen", "--metrics-listen", "HOST:PORT", 0, "off",
                                "serve metrics on this address"},
        [KEY_ELECTION_TIMEOUT_MS] = {"election_timeout_ms", "--election-timeout-ms", "MS", 0,
                                     "1000", "Raft election timeout, 10-600000"},
        [KEY_HEARTBEAT_MS] = {"heartbeat_ms", "--heartbeat-ms", "MS", 0, "100",
                              "leader heartbeat, below election timeout / 2"},
};

#define WHERE_MAX 320

/* One raw value and the place it came from. */
struct setting {
    char *value;
    char where[WHERE_MAX]; /* "file:line" or "--flag" */
    bool from_file;
};

struct setting_list {
    struct setting *v;
    size_t n;
};

struct config_loader {
    struct setting_list cli[KEY_COUNT];
    struct setting_list file[KEY_COUNT];
    const struct setting_list *used[KEY_COUNT]; /* the winner per key, or NULL */
    char *config_arg;                           /* --config as given */
    bool help, version;
};

static void setting_list_add(struct setting_list *l, const char *value, size_t len,
                             const char *where, bool from_file)
{
    l->v = pb_xreallocarray(l->v, l->n + 1, sizeof(*l->v));
    struct setting *s = &l->v[l->n++];
    s->value = pb_xmalloc(len + 1);
    memcpy(s->value, value, len);
    s->value[len] = '\0';
    snprintf(s->where, sizeof(s->where), "%s", where);
    s->from_file = from_file;
}

static void setting_list_free(struct setting_list *l)
{
    for (size_t i = 0; i < l->n; i++)
        free(l->v[i].value);
    free(l->v);
    l->v = NULL;
    l->n = 0;
}

static void loader_free(struct config_loader *ld)
{
    for (size_t k = 0; k < KEY_COUNT; k++) {
        setting_list_free(&ld->cli[k]);
        setting_list_free(&ld->file[k]);
    }
    free(ld->config_arg);
}

/* ---- suggestions ---------------------------------------------------------- */

static size_t edit_distance(const char *a, const char *b)
{
    size_t la = strlen(a), lb = strlen(b);
    if (la > 64 || lb > 64)
        return SIZE_MAX;
    size_t row[65];
    for (size_t j = 0; j <= lb; j++)
        row[j] = j;
    for (size_t i = 1; i <= la; i++) {
        size_t diag = row[0];
        row[0] = i;
        for (size_t j = 1; j <= lb; j++) {
            size_t up = row[j];
            size_t cost = a[i - 1] == b[j - 1] ? 0 : 1;
            size_t best = PB_MIN(row[j] + 1, row[j - 1] + 1);
            row[j] = PB_MIN(best, diag + cost);
            diag = up;
        }
    }
    return row[lb];
}

/* The key closest to name (with '-' read as '_'), or NULL if none is close. */
static const char *config_suggest_key(const char *name)
{
    char norm[65];
    size_t n = strnlen(name, sizeof(norm));
    if (n >= sizeof(norm))
        return NULL;
    for (size_t i = 0; i <= n; i++)
        norm[i] = name[i] == '-' ? '_' : name[i];
    const char *best = NULL;
    size_t best_d = SIZE_MAX;
    for (size_t k = 0; k < KEY_COUNT; k++) {
        size_t d = edit_distance(norm, config_keys[k].name);
        if (d < best_d) {
            best_d = d;
            best = config_keys[k].name;
        }
    }
    /* Close enough to be a typo, not a different word. */
    if (best != NULL && best_d <= 2 && best_d < strlen(norm))
        return best;
    return NULL;
}

/* ---- value checks ------------------------------------------------------------ */

bool config_node_id_valid(const char *s)
{
    size_t n = strlen(s);
    if (n == 0 || n > 64 || s[0] == '.' || s[0] == '-')
        return false;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                  c == '.' || c == '_' || c == '-';
        if (!ok)
            return false;
    }
    return true;
}

static bool ip_literal(const char *s, int *family)
{
    unsigned char buf[sizeof(struct in6_addr)];
    if (inet_pton(AF_INET, s, buf) == 1) {
        *family = AF_INET;
        return true;
    }
    if (inet_pton(AF_INET6, s, buf) == 1) {
        *family = AF_INET6;
        return true;
    }
    return false;
}

/* A DNS name: dot-separated labels of [A-Za-z0-9-], 1-63 each, 253 total. */
static bool hostname_valid(const char *s)
{
    size_t n = strlen(s);
    if (n == 0 || n > 253)
        return false;
    size_t label = 0;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (c == '.') {
            if (label == 0)
                return false;
            label = 0;
            continue;
        }
        bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                  c == '-';
        if (!ok || ++label > 63 || (c == '-' && label == 1))
            return false;
    }
    return label > 0;
}

static int check_host_port(const char *key, const char *value, struct pb_error *err)
{
    char host[256];
    uint16_t port;
    int family;
    if (pb_split_host_port(value, host, sizeof(host), &port) < 0)
        return pb_error_set(err, -EINVAL,
                            "bad %s '%s' (expected HOST:PORT or [IPv6]:PORT, port 1-65535)", key,
                            value);
    bool bracketed = value[0] == '[';
    if (bracketed ? !(ip_literal(host, &family) && family == AF_INET6)
                  : !(ip_literal(host, &family) || hostname_valid(host)))
        return pb_error_set(err, -EINVAL, "bad %s '%s': '%s' is not a valid host", key, value,
                            host);
    return 0;
}

static int parse_u32_range(const char *key, const char *value, uint32_t min, uint32_t max,
                           uint32_t *out, struct pb_error *err)
{
    uint64_t v;
    if (pb_parse_u64(value, min, max, &v) < 0)
        return pb_error_set(err, -EINVAL, "bad %s '%s' (expected a number %u-%u)", key, value,
                            (unsigned)min, (unsigned)max);
    *out = (uint32_t)v;
    return 0;
}

/* Lexically tidies an absolute path: no "//", no "/./", no trailing '/'. */
static void path_tidy(char *p)
{
    char *w = p;
    for (const char *r = p; *r != '\0';) {
        if (r[0] == '/' && (r[1] == '/' || (r[1] == '.' && (r[2] == '/' || r[2] == '\0')))) {
            r += r[1] == '/' ? 1 : 2;
            continue;
        }
        *w++ = *r++;
    }
    *w = '\0';
    while (w - p > 1 && w[-1] == '/')
        *--w = '\0';
    if (p[0] == '\0') {
        p[0] = '/';
        p[1] = '\0';
    }
}

/* Makes an absolute copy of value into *out: relative paths are resolved
 * against the cwd when they come from the command line, refused in a file. */
static int parse_path(const char *key, const struct setting *s, char **out, struct pb_error *err)
{
    const char *v = s->value;
    if (v[0] == '/') {
        *out = pb_xstrdup(v);
    } else if (s->from_file) {
        return pb_error_set(err, -EINVAL,
                            "%s '%s' is a relative path (paths in a config file must be absolute)",
                            key, v);
    } else {
        char cwd[PATH_MAX];
        if (getcwd(cwd, sizeof(cwd)) == NULL)
            return pb_error_set(err, -errno, "cannot resolve relative %s '%s': getcwd: %s", key, v,
                                strerror(errno));
        *out = pb_xasprintf("%s/%s", cwd, v);
    }
    path_tidy(*out);
    if (strlen(*out) >= PATH_MAX) {
        free(*out);
        *out = NULL;
        return pb_error_set(err, -ENAMETOOLONG, "%s is too long", key);
    }
    return 0;
}

/* Glob syntax check: non-empty, printable, every '[' closed. */
static int check_glob(const char *pat, struct pb_error *err)
{
    size_t n = strlen(pat);
    if (n == 0)
        return pb_error_set(err, -EINVAL, "empty ignore pattern");
    if (n > 1024)
        return pb_error_set(err, -EINVAL, "ignore pattern is too long (%zu bytes, max 1024)", n);
    for (size_t i = 0; i < n; i++) {
        if (pat[i] == '\\') {
            if (++i == n)
                return pb_error_set(err, -EINVAL, "bad ignore pattern '%s': trailing '\\'", pat);
        } else if (pat[i] == '[') {
            size_t j = i + 1;
            if (j < n && (pat[j] == '!' || pat[j] == '^'))
                j++;
            if (j < n && pat[j] == ']')
                j++;
            while (j < n && pat[j] != ']')
                j++;
            if (j == n)
                return pb_error_set(err, -EINVAL, "bad ignore pattern '%s': unclosed '['", pat);
            i = j;
        }
    }
    return 0;
}

/* Appends the comma-separated patterns of list to cfg->ignore. */
static int ignore_add_list(struct pb_config *cfg, const char *list, struct pb_error *err)
{
    const char *p = list;
    for (;;) {
        const char *comma = strchr(p, ',');
        size_t len = comma ? (size_t)(comma - p) : strlen(p);
        while (len > 0 && (*p == ' ' || *p == '\t')) {
            p++;
            len--;
        }
        while (len > 0 && (p[len - 1] == ' ' || p[len - 1] == '\t'))
            len--;
        char *pat = pb_xmalloc(len + 1);
        memcpy(pat, p, len);
        pat[len] = '\0';
        int rc = check_glob(pat, err);
        if (rc < 0) {
            free(pat);
            return rc;
        }
        cfg->ignore = pb_xreallocarray(cfg->ignore, cfg->n_ignore + 1, sizeof(*cfg->ignore));
        cfg->ignore[cfg->n_ignore++] = pat;
        if (comma == NULL)
            return 0;
        p = comma + 1;
    }
}

/* Parses one winning setting of key k into cfg; err has no place prefix. */
static int config_apply(struct pb_config *cfg, enum config_key_id k, const struct setting *s,
                        struct pb_error *err)
{
    const char *name = config_keys[k].name;
    const char *v = s->value;
    uint32_t u = 0;
    int family;

    if (v[0] == '\0')
        return pb_error_set(err, -EINVAL, "empty value for %s", name);
    switch (k) {
    case KEY_NODE_ID:
        if (!config_node_id_valid(v))
            return pb_error_set(err, -EINVAL,
                                "bad node_id '%s' (1-64 of A-Z a-z 0-9 . _ -, "
                                "not starting with '.' or '-')",
                                v);
        cfg->node_id = pb_xstrdup(v);
        break;
    case KEY_PORT:
        if (parse_u32_range(name, v, 1, 65535, &u, err) < 0)
            return err->code;
        cfg->port = (uint16_t)u;
        break;
    case KEY_BIND: {
        char host[INET6_ADDRSTRLEN + 2];
        size_t n = strlen(v);
        const char *h = v;
        if (v[0] == '[' && n >= 2 && v[n - 1] == ']') {
            h = v + 1;
            n -= 2;
        }
        if (n >= sizeof(host))
            n = sizeof(host) - 1; /* too long for an address: fails below */
        memcpy(host, h, n);
        host[n] = '\0';
        if (strlen(v) >= sizeof(host) || !ip_literal(host, &family))
            return pb_error_set(err, -EINVAL,
                                "bad bind '%s' (expected an IPv4 or IPv6 address, "
                                "e.g. 127.0.0.1, 0.0.0.0 or ::)",
                                v);
        cfg->bind = pb_xstrdup(host);
        break;
    }
    case KEY_ADVERTISE:
    case KEY_JOIN:
    case KEY_METRICS_LISTEN:
        if (check_host_port(name, v, err) < 0)
            return err->code;
        char **dst = k == KEY_ADVERTISE ? &cfg->advertise
                     : k == KEY_JOIN    ? &cfg->join
                                        : &cfg->metrics_listen;
        *dst = pb_xstrdup(v);
        break;
    case KEY_DATA_DIR:
        return parse_path(name, s, &cfg->data_dir, err);
    case KEY_STATE_DIR:
        return parse_path(name, s, &cfg->state_dir, err);
    case KEY_SECRET_FILE:
        return parse_path(name, s, &cfg->secret_file, err);
    case KEY_CONTROL_SOCKET:
        return parse_path(name, s, &cfg->control_socket, err);
    case KEY_LOG_LEVEL:
        if (log_level_parse(v, &cfg->log_level) < 0)
            return pb_error_set(err, -EINVAL,
                                "bad log_level '%s' (expected error, warning, notice, info "
                                "or debug)",
                                v);
        break;
    case KEY_IGNORE:
        return ignore_add_list(cfg, v, err);
    case KEY_ELECTION_TIMEOUT_MS:
        return parse_u32_range(name, v, 10, 600000, &cfg->election_timeout_ms, err);
    case KEY_HEARTBEAT_MS:
        return parse_u32_range(name, v, 1, 60000, &cfg->heartbeat_ms, err);
    default:
        return pb_error_set(err, -EINVAL, "internal: unhandled key %d", (int)k);
    }
    return 0;
}

/* ---- the config file -------------------------------------------------------- */

/* Unquotes "..." (escapes \" and \\) in place. Returns NULL or what is wrong. */
static const char *unquote(char *v, size_t *len)
{
    if (*len == 0 || v[0] != '"')
        return NULL;
    char *w = v;
    size_t i = 1;
    for (; i < *len; i++) {
        if (v[i] == '\\') {
            if (i + 1 < *len && (v[i + 1] == '"' || v[i + 1] == '\\')) {
                *w++ = v[++i];
                continue;
            }
            return "bad escape in quoted value (only \\\" and \\\\ are allowed)";
        }
        if (v[i] == '"')
            break;
        *w++ = v[i];
    }
    if (i == *len)
        return "unterminated quoted value";
    if (i + 1 != *len)
        return "text after the closing quote";
    *len = (size_t)(w - v);
    return NULL;
}

static bool is_blank(char c)
{
    return c == ' ' || c == '\t';
}

/* Parses one line (without its newline) into ld->file. */
static int config_parse_line(struct config_loader *ld, const char *path, unsigned lineno,
                             char *line, size_t len, struct pb_error *err)
{
    char where[WHERE_MAX];
    snprintf(where, sizeof(where), "%s:%u", path, lineno);

    if (len > 0 && line[len - 1] == '\r')
        line[--len] = '\0';
    if (memchr(line, '\0', len) != NULL)
        return pb_error_set(err, -EINVAL, "%s: NUL byte in line", where);
    if (len > CONFIG_MAX_LINE)
        return pb_error_set(err, -EINVAL, "%s: line too long (%zu bytes, max %d)", where, len,
                            CONFIG_MAX_LINE);
    size_t b = 0, e = len;
    while (b < e && is_blank(line[b]))
        b++;
    while (e > b && is_blank(line[e - 1]))
        e--;
    if (b == e || line[b] == '#' || line[b] == ';')
        return 0;
    for (size_t i = b; i < e; i++) {
        if ((unsigned char)line[i] < 0x20 && line[i] != '\t')
            return pb_error_set(err, -EINVAL, "%s: control character 0x%02x in line", where,
                                (unsigned)(unsigned char)line[i]);
    }
    if (line[b] == '[') {
        if (e - b == 9 && memcmp(line + b, "[pickbox]", 9) == 0)
            return 0;
        return pb_error_set(err, -EINVAL, "%s: unknown section '%.*s' (only [pickbox] is allowed)",
                            where, (int)PB_MIN(e - b, 64), line + b);
    }
    char *eq = memchr(line + b, '=', e - b);
    if (eq == NULL)
        return pb_error_set(err, -EINVAL, "%s: expected 'key = value', found '%.*s'", where,
                            (int)PB_MIN(e - b, 64), line + b);
    size_t ke = (size_t)(eq - line);
    while (ke > b && is_blank(line[ke - 1]))
        ke--;
    if (ke == b)
        return pb_error_set(err, -EINVAL, "%s: missing key before '='", where);
    line[ke] = '\0';
    const char *key = line + b;

    size_t vb = (size_t)(eq - line) + 1;
    while (vb < e && is_blank(line[vb]))
        vb++;
    char *val = line + vb;
    size_t vlen = e - vb;
    const char *qerr = unquote(val, &vlen);
    if (qerr != NULL)
        return pb_error_set(err, -EINVAL, "%s: %s", where, qerr);
    val[vlen] = '\0';

    size_t k = 0;
    while (k < KEY_COUNT && strcmp(config_keys[k].name, key) != 0)
        k++;
    if (k == KEY_COUNT) {
        const char *sug = config_suggest_key(key);
        if (sug != NULL)
            return pb_error_set(err, -EINVAL, "%s: unknown key '%.64s' (did you mean '%s'?)", where,
                                key, sug);
        return pb_error_set(err, -EINVAL, "%s: unknown key '%.64s'", where, key);
    }
    struct setting_list *l = &ld->file[k];
    if (l->n > 0 && !(config_keys[k].flags & KEY_REPEAT))
        return pb_error_set(err, -EINVAL, "%s: duplicate key '%s' (first set at line %s)", where,
                            key, strrchr(l->v[0].where, ':') + 1);
    if (vlen == 0)
        return pb_error_set(err, -EINVAL, "%s: missing value for '%s'", where, key);
    setting_list_add(l, val, vlen, where, true);
    return 0;
}

static int config_read_file(struct config_loader *ld, const char *path, struct pb_error *err)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY);
    if (fd < 0)
        return pb_error_set(err, -errno, "cannot read config file %s: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return pb_error_set(err, -EINVAL, "config file %s is not a regular file", path);
    }
    if (st.st_size > CONFIG_MAX_FILE) {
        close(fd);
        return pb_error_set(err, -EFBIG, "config file %s is too large (%lld bytes, max %d)", path,
                            (long long)st.st_size, CONFIG_MAX_FILE);
    }
    /* Read up to one byte past the cap, in case the file grew meanwhile. */
    size_t cap = CONFIG_MAX_FILE + 1, len = 0;
    char *buf = pb_xmalloc(cap + 1);
    for (;;) {
        ssize_t n = read(fd, buf + len, cap - len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            int e = errno;
            free(buf);
            close(fd);
            return pb_error_set(err, -e, "cannot read config file %s: %s", path, strerror(e));
        }
        if (n == 0)
            break;
        len += (size_t)n;
        if (len == cap)
            break;
    }
    close(fd);
    if (len > CONFIG_MAX_FILE) {
        free(buf);
        return pb_error_set(err, -EFBIG, "config file %s is too large (max %d bytes)", path,
                            CONFIG_MAX_FILE);
    }
    buf[len] = '\0';

    size_t pos = 0;
    if (len >= 3 && memcmp(buf, "\xef\xbb\xbf", 3) == 0)
        pos = 3; /* UTF-8 byte order mark */
    unsigned lineno = 0;
    int rc = 0;
    while (pos < len && rc == 0) {
        char *nl = memchr(buf + pos, '\n', len - pos);
        size_t end = nl ? (size_t)(nl - buf) : len;
        buf[end] = '\0';
        rc = config_parse_line(ld, path, ++lineno, buf + pos, end - pos, err);
        pos = end + 1;
    }
    free(buf);
    return rc;
}

/* ---- command line ------------------------------------------------------------- */

static const struct option config_options[] = {
        {"node-id", required_argument, NULL, KEY_NODE_ID},
        {"port", required_argument, NULL, KEY_PORT},
        {"bind", required_argument, NULL, KEY_BIND},
        {"advertise", required_argument, NULL, KEY_ADVERTISE},
        {"join", required_argument, NULL, KEY_JOIN},
        {"data-dir", required_argument, NULL, KEY_DATA_DIR},
        {"state-dir", required_argument, NULL, KEY_STATE_DIR},
        {"control-socket", required_argument, NULL, KEY_CONTROL_SOCKET},
        {"secret-file", required_argument, NULL, KEY_SECRET_FILE},
        {"log-level", required_argument, NULL, KEY_LOG_LEVEL},
        {"ignore", required_argument, NULL, KEY_IGNORE},
        {"metrics-listen", required_argument, NULL, KEY_METRICS_LISTEN},
        {"election-timeout-ms", required_argument, NULL, KEY_ELECTION_TIMEOUT_MS},
        {"heartbeat-ms", required_argument, NULL, KEY_HEARTBEAT_MS},
        {"config", required_argument, NULL, OPT_CONFIG},
        {"check-config", no_argument, NULL, OPT_CHECK_CONFIG},
        {"help", no_argument, NULL, OPT_HELP},
        {"version", no_argument, NULL, OPT_VERSION},
        {NULL, 0, NULL, 0},
};

static int config_parse_args(struct config_loader *ld, struct pb_config *cfg, int argc, char **argv,
                             struct pb_error *err)
{
    /* optind = 0 makes glibc reinitialise getopt; this function may run many times. */
    optind = 0;
    opterr = 0;
    for (;;) {
        int c = getopt_long(argc, argv, ":hV", config_options, NULL);
        if (c == -1)
            break;
        switch (c) {
        case 'h':
        case OPT_HELP:
            ld->help = true;
            return 0;
        case 'V':
        case OPT_VERSION:
            ld->version = true;
            return 0;
        case OPT_CHECK_CONFIG:
            cfg->check_config = true;
            break;
        case OPT_CONFIG:
            if (ld->config_arg != NULL)
                return pb_error_set(err, -EINVAL, "--config: given more than once");
            if (optarg[0] == '\0')
                return pb_error_set(err, -EINVAL, "--config: empty value");
            ld->config_arg = pb_xstrdup(optarg);
            break;
        case ':':
            return pb_error_set(err, -EINVAL, "option '%s' requires a value", argv[optind - 1]);
        case '?': {
            const char *arg = argv[optind - 1];
            if (strncmp(arg, "--", 2) != 0)
                return pb_error_set(err, -EINVAL, "unknown option '-%c' (see --help)",
                                    optopt ? optopt : '?');
            char name[80];
            snprintf(name, sizeof(name), "%.*s", (int)strcspn(arg + 2, "="), arg + 2);
            for (size_t i = 0; config_options[i].name != NULL; i++) {
                if (config_options[i].has_arg == no_argument &&
                    strncmp(config_options[i].name, name, strlen(name)) == 0 &&
                    strchr(arg, '=') != NULL)
                    return pb_error_set(err, -EINVAL, "option '--%s' does not take a value",
                                        config_options[i].name);
            }
            const char *sug = config_suggest_key(name);
            if (sug != NULL) {
                char flag[64];
                snprintf(flag, sizeof(flag), "%s", sug);
                for (char *p = flag; *p; p++)
                    *p = *p == '_' ? '-' : *p;
                return pb_error_set(err, -EINVAL,
                                    "unknown or ambiguous option '--%s' (did you mean '--%s'?)",
                                    name, flag);
            }
            return pb_error_set(err, -EINVAL, "unknown or ambiguous option '--%s' (see --help)",
                                name);
        }
        default:
            if (c < 0 || c >= KEY_COUNT)
                return pb_error_set(err, -EINVAL, "internal: unexpected option %d", c);
            struct setting_list *l = &ld->cli[c];
            if (l->n > 0 && !(config_keys[c].flags & KEY_REPEAT))
                return pb_error_set(err, -EINVAL, "%s: given more than once", config_keys[c].flag);
            if (optarg[0] == '\0')
                return pb_error_set(err, -EINVAL, "%s: empty value", config_keys[c].flag);
            setting_list_add(l, optarg, strlen(optarg), config_keys[c].flag, false);
            break;
        }
    }
    if (optind < argc)
        return pb_error_set(err, -EINVAL, "unexpected argument '%s' (see --help)", argv[optind]);
    return 0;
}

/* ---- loading ------------------------------------------------------------------ */

/* True when systemd passed this process a socket named "peer". */
static bool config_systemd_peer_fd(void)
{
    const char *pid = getenv("LISTEN_PID");
    const char *names = getenv("LISTEN_FDNAMES");
    uint64_t p;
    if (pid == NULL || names == NULL || pb_parse_u64(pid, 1, UINT64_MAX, &p) < 0 ||
        p != (uint64_t)getpid())
        return false;
    for (const char *s = names; *s != '\0';) {
        size_t n = strcspn(s, ":");
        if (n == 4 && memcmp(s, "peer", 4) == 0)
            return true;
        s += n;
        if (*s == ':')
            s++;
    }
    return false;
}

/* The place a key's value came from, for cross-key messages. */
static const char *config_where(const struct config_loader *ld, enum config_key_id k)
{
    const struct setting_list *l = ld->used[k];
    return l != NULL && l->n > 0 ? l->v[0].where : "default";
}

static int config_require(const struct config_loader *ld, const struct pb_config *cfg,
                          enum config_key_id k, struct pb_error *err)
{
    if (ld->used[k] != NULL)
        return 0;
    const struct config_key *key = &config_keys[k];
    if (cfg->config_file != NULL)
        return pb_error_set(err, -EINVAL, "%s is required (set %s or %s in %s)", key->name,
                            key->flag, key->name, cfg->config_file);
    return pb_error_set(err, -EINVAL, "%s is required (set %s %s, or use --config FILE)", key->name,
                        key->flag, key->metavar);
}

static int config_finish(const struct config_loader *ld, struct pb_config *cfg,
                         struct pb_error *err)
{
    int rc;
    if ((rc = config_require(ld, cfg, KEY_NODE_ID, err)) < 0 ||
        (rc = config_require(ld, cfg, KEY_DATA_DIR, err)) < 0)
        return rc;
    bool peer_fd = config_systemd_peer_fd();
    if (!peer_fd && (rc = config_require(ld, cfg, KEY_PORT, err)) < 0)
        return rc;

    if (cfg->bind == NULL)
        cfg->bind = pb_xstrdup(CONFIG_DEFAULT_BIND);
    if (cfg->advertise == NULL && cfg->port != 0) {
        if (strcmp(cfg->bind, "0.0.0.0") == 0 || strcmp(cfg->bind, "::") == 0)
            return pb_error_set(err, -EINVAL,
                                "advertise is required when bind is the wildcard address %s "
                                "(bind from %s)",
                                cfg->bind, config_where(ld, KEY_BIND));
        if (strchr(cfg->bind, ':') != NULL)
            cfg->advertise = pb_xasprintf("[%s]:%u", cfg->bind, (unsigned)cfg->port);
        else
            cfg->advertise = pb_xasprintf("%s:%u", cfg->bind, (unsigned)cfg->port);
    }
    if (cfg->state_dir == NULL)
        cfg->state_dir = pb_xasprintf("%s/.pickbox/state",
                                      strcmp(cfg->data_dir, "/") == 0 ? "" : cfg->data_dir);
    if (cfg->control_socket == NULL)
        cfg->control_socket = pb_xasprintf("%s/control.sock",
                                           strcmp(cfg->state_dir, "/") == 0 ? "" : cfg->state_dir);
    size_t max_sun = sizeof(((struct sockaddr_un *)NULL)->sun_path) - 1;
    if (strlen(cfg->control_socket) > max_sun)
        return pb_error_set(err, -ENAMETOOLONG,
                            "control socket path %s is too long (%zu bytes, max %zu; from %s)",
                            cfg->control_socket, strlen(cfg->control_socket), max_sun,
                            config_where(ld, ld->used[KEY_CONTROL_SOCKET] ? KEY_CONTROL_SOCKET
                                                                          : KEY_STATE_DIR));
    if ((uint64_t)cfg->heartbeat_ms * 2 >= cfg->election_timeout_ms)
        return pb_error_set(err, -EINVAL,
                            "heartbeat_ms (%u, from %s) must be less than half of "
                            "election_timeout_ms (%u, from %s)",
                            (unsigned)cfg->heartbeat_ms, config_where(ld, KEY_HEARTBEAT_MS),
                            (unsigned)cfg->election_timeout_ms,
                            config_where(ld, KEY_ELECTION_TIMEOUT_MS));
    return 0;
}

static int config_load_loader(struct config_loader *ld, struct pb_config *cfg, int argc,
                              char **argv, struct pb_error *err)
{
    int rc = config_parse_args(ld, cfg, argc, argv, err);
    if (rc < 0)
        return rc;
    if (ld->help) {
        config_usage(stdout);
        return 1;
    }
    if (ld->version) {
        printf("pickboxd %s\n", PACKAGE_VERSION);
        return 1;
    }
    if (ld->config_arg != NULL) {
        struct setting s = {.value = ld->config_arg, .where = "--config", .from_file = false};
        if ((rc = parse_path("--config", &s, &cfg->config_file, err)) < 0)
            return rc;
        if ((rc = config_read_file(ld, cfg->config_file, err)) < 0)
            return rc;
    }

    cfg->log_level = LOG_LEVEL_INFO;
    cfg->election_timeout_ms = CONFIG_DEFAULT_ELECTION_TIMEOUT_MS;
    cfg->heartbeat_ms = CONFIG_DEFAULT_HEARTBEAT_MS;
    for (size_t k = 0; k < KEY_COUNT; k++) {
        const struct setting_list *l = ld->cli[k].n > 0    ? &ld->cli[k]
                                       : ld->file[k].n > 0 ? &ld->file[k]
                                                           : NULL;
        ld->used[k] = l;
        for (size_t i = 0; l != NULL && i < l->n; i++) {
            if ((rc = config_apply(cfg, (enum config_key_id)k, &l->v[i], err)) < 0) {
                pb_error_prefix(err, "%s: ", l->v[i].where);
                return rc;
            }
        }
    }
    return config_finish(ld, cfg, err);
}

int config_load(struct pb_config *cfg, int argc, char **argv, struct pb_error *err)
{
    struct config_loader ld;
    memset(&ld, 0, sizeof(ld));
    memset(cfg, 0, sizeof(*cfg));
    pb_error_clear(err);
    int rc = config_load_loader(&ld, cfg, argc, argv, err);
    loader_free(&ld);
    return rc;
}

void config_free(struct pb_config *cfg)
{
    if (cfg == NULL)
        return;
    free(cfg->node_id);
    free(cfg->bind);
    free(cfg->advertise);
    free(cfg->join);
    free(cfg->data_dir);
    free(cfg->state_dir);
    free(cfg->control_socket);
    free(cfg->secret_file);
    free(cfg->config_file);
    free(cfg->metrics_listen);
    for (size_t i = 0; i < cfg->n_ignore; i++)
        free(cfg->ignore[i]);
    free(cfg->ignore);
    memset(cfg, 0, sizeof(*cfg));
}

/* ---- output ------------------------------------------------------------------- */

/* Prints key = value, quoting when the value would not read back verbatim. */
static void print_kv(FILE *out, const char *key, const char *value)
{
    size_t n = strlen(value);
    bool quote = n == 0 || is_blank(value[0]) || is_blank(value[n - 1]) || value[0] == '"';
    if (!quote) {
        fprintf(out, "%s = %s\n", key, value);
        return;
    }
    fprintf(out, "%s = \"", key);
    for (const char *p = value; *p; p++) {
        if (*p == '"' || *p == '\\')
            fputc('\\', out);
        fputc(*p, out);
    }
    fputs("\"\n", out);
}

void config_print(const struct pb_config *cfg, FILE *out)
{
    fprintf(out, "# pickboxd %s effective configuration\n", PACKAGE_VERSION);
    if (cfg->config_file)
        fprintf(out, "# read from %s\n", cfg->config_file);
    print_kv(out, "node_id", cfg->node_id ? cfg->node_id : "");
    if (cfg->port != 0)
        fprintf(out, "port = %u\n", (unsigned)cfg->port);
    else
        fputs("# port: from the systemd socket named 'peer'\n", out);
    print_kv(out, "bind", cfg->bind ? cfg->bind : "");
    if (cfg->advertise)
        print_kv(out, "advertise", cfg->advertise);
    if (cfg->join)
        print_kv(out, "join", cfg->join);
    else
        fputs("# join: none\n", out);
    print_kv(out, "data_dir", cfg->data_dir ? cfg->data_dir : "");
    print_kv(out, "state_dir", cfg->state_dir ? cfg->state_dir : "");
    print_kv(out, "control_socket", cfg->control_socket ? cfg->control_socket : "");
    if (cfg->secret_file)
        print_kv(out, "secret_file", cfg->secret_file);
    else
        fprintf(out, "# secret_file: %s/secret\n", cfg->state_dir ? cfg->state_dir : "");
    fprintf(out, "log_level = %s\n", log_level_name(cfg->log_level));
    for (size_t i = 0; i < cfg->n_ignore; i++)
        print_kv(out, "ignore", cfg->ignore[i]);
    if (cfg->metrics_listen)
        print_kv(out, "metrics_listen", cfg->metrics_listen);
    fprintf(out, "election_timeout_ms = %u\n", (unsigned)cfg->election_timeout_ms);
    fprintf(out, "heartbeat_ms = %u\n", (unsigned)cfg->heartbeat_ms);
}

static bool str_same(const char *a, const char *b)
{
    return (a == NULL && b == NULL) || (a != NULL && b != NULL && strcmp(a, b) == 0);
}

static bool ignore_same(const struct pb_config *a, const struct pb_config *b)
{
    if (a->n_ignore != b->n_ignore)
        return false;
    for (size_t i = 0; i < a->n_ignore; i++) {
        if (strcmp(a->ignore[i], b->ignore[i]) != 0)
            return false;
    }
    return true;
}

size_t config_diff(const struct pb_config *a, const struct pb_config *b, char *out, size_t len)
{
    const struct {
        const char *key;
        bool same;
    } keys[] = {
            {"node_id", str_same(a->node_id, b->node_id)},
            {"bind", str_same(a->bind, b->bind)},
            {"port", a->port == b->port},
            {"advertise", str_same(a->advertise, b->advertise)},
            {"join", str_same(a->join, b->join)},
            {"data_dir", str_same(a->data_dir, b->data_dir)},
            {"state_dir", str_same(a->state_dir, b->state_dir)},
            {"control_socket", str_same(a->control_socket, b->control_socket)},
            {"secret_file", str_same(a->secret_file, b->secret_file)},
            {"log_level", a->log_level == b->log_level},
            {"ignore", ignore_same(a, b)},
            {"metrics_listen", str_same(a->metrics_listen, b->metrics_listen)},
            {"election_timeout_ms", a->election_timeout_ms == b->election_timeout_ms},
            {"heartbeat_ms", a->heartbeat_ms == b->heartbeat_ms},
    };
    size_t n = 0, used = 0;
    if (len > 0)
        out[0] = '\0';
    for (size_t i = 0; i < PB_ARRAY_SIZE(keys); i++) {
        if (keys[i].same)
            continue;
        if (used < len) {
            int w = snprintf(out + used, len - used, "%s%s", n > 0 ? ", " : "", keys[i].key);
            used += w > 0 ? (size_t)w : 0;
        }
        n++;
    }
    return n;
}

void config_usage(FILE *out)
{
    fputs("Usage: pickboxd --node-id ID --port PORT --data-dir DIR [OPTION]...\n"
          "Runs one pickbox cluster node in the foreground.\n\n",
          out);
    for (size_t k = 0; k < KEY_COUNT; k++) {
        const struct config_key *key = &config_keys[k];
        char left[64];
        snprintf(left, sizeof(left), "%s %s", key->flag, key->metavar);
        /* Keep within 80 columns: a long flag or help moves to the next line. */
        if (strlen(left) > 26)
            fprintf(out, "  %s\n  %-26s ", left, "");
        else
            fprintf(out, "  %-26s ", left);
        if (29 + strlen(key->help) + strlen(key->dflt) + 3 <= 80)
            fprintf(out, "%s [%s]\n", key->help, key->dflt);
        else
            fprintf(out, "%s\n  %-26s [%s]\n", key->help, "", key->dflt);
    }
    static const char *const extra[][2] = {
            {"--config FILE", "read settings from an INI file [none]"},
            {"--check-config", "validate the configuration, print it, exit"},
            {"-h, --help", "show this help and exit"},
            {"-V, --version", "show the version and exit"},
    };
    for (size_t i = 0; i < PB_ARRAY_SIZE(extra); i++)
        fprintf(out, "  %-26s %s\n", extra[i][0], extra[i][1]);
    fputs("\nEvery option but the last four is also a config file key, spelled with '_'\n"
          "(node_id = n1); the command line wins over the file. Relative paths are\n"
          "resolved against the current directory on the command line and refused in\n"
          "a file. Exit status: 0 ok, 1 runtime failure, 2 bad configuration.\n",
          out);
}

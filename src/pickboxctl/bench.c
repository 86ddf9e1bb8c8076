/*
 * bench.c: `pickboxctl bench` (see bench.h): concurrent closed-loop probes
 * over non-blocking control connections driven by one poll() loop, a
 * log-linear latency histogram, and the report.
 */
#include "config.h"

#include "pickboxctl/bench.h"

#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <jansson.h>

#include "lib/util.h"
#include "pickboxctl/client.h"
#include "pickboxctl/pickboxctl.h"

/* ---- histogram ---------------------------------------------------------- */

#define HIST_SUB    (1u << PBCTL_HIST_SUB_BITS) /* 64 */
#define HIST_LINEAR (2u * HIST_SUB)             /* values below are exact */

static size_t hist_index(uint64_t v)
{
    if (v > PBCTL_HIST_MAX_US)
        v = PBCTL_HIST_MAX_US;
    if (v < HIST_LINEAR)
        return (size_t)v;
    unsigned msb = 63u - (unsigned)__builtin_clzll(v);
    unsigned shift = msb - PBCTL_HIST_SUB_BITS;
    return (size_t)HIST_SUB * shift + (size_t)(v >> shift);
}

/* The highest value that falls into bucket idx. */
static uint64_t hist_bucket_high(size_t idx)
{
    if (idx < HIST_LINEAR)
        return idx;
    unsigned shift = (unsigned)(idx / HIST_SUB) - 1u;
    uint64_t m = idx - (uint64_t)HIST_SUB * shift;
    return ((m + 1) << shift) - 1;
}

void pbctl_hist_init(struct pbctl_hist *h)
{
    memset(h, 0, sizeof(*h));
}

void pbctl_hist_record(struct pbctl_hist *h, uint64_t us)
{
    size_t idx = hist_index(us);
    if (idx >= PBCTL_HIST_BUCKETS)
        idx = PBCTL_HIST_BUCKETS - 1;
    h->buckets[idx]++;
    if (h->count == 0 || us < h->min_us)
        h->min_us = us;
    if (us > h->max_us)
        h->max_us = us;
    h->count++;
    h->sum_us += us;
}

uint64_t pbctl_hist_percentile(const struct pbctl_hist *h, double p)
{
    if (h->count == 0)
        return 0;
    if (p >= 100.0)
        return h->max_us;
    double want = p / 100.0 * (double)h->count;
    uint64_t rank = (uint64_t)want;
    if ((double)rank < want)
        rank++;
    if (rank == 0)
        rank = 1;
    uint64_t seen = 0;
    for (size_t i = 0; i < PBCTL_HIST_BUCKETS; i++) {
        seen += h->buckets[i];
        if (seen >= rank) {
            uint64_t v = hist_bucket_high(i);
            if (v > h->max_us)
                v = h->max_us;
            if (v < h->min_us)
                v = h->min_us;
            return v;
        }
    }
    return h->max_us;
}

/* ---- configuration ------------------------------------------------------ */

int pbctl_bench_config_from_options(const struct pbctl_options *opts,
                                    struct pbctl_bench_config *cfg, struct pb_error *err)
{
    cfg->size = (opts->opts_set & PBCTL_OPT_SIZE) ? opts->size : PBCTL_BENCH_DEFAULT_SIZE;
    cfg->concurrency = (opts->opts_set & PBCTL_OPT_CONCURRENCY) ? opts->concurrency
                                                                : PBCTL_BENCH_DEFAULT_CONCURRENCY;
    cfg->duration_ms = (opts->opts_set & PBCTL_OPT_DURATION) ? opts->duration_ms
                                                             : PBCTL_BENCH_DEFAULT_DURATION_MS;
    cfg->warmup_ms = PBCTL_BENCH_WARMUP_MS;
    if (cfg->duration_ms < 100)
        return pb_error_set(err, -EINVAL, "--duration must be at least 0.1 seconds");
    if (cfg->concurrency < 1 || cfg->concurrency > PBCTL_CONCURRENCY_MAX)
        return pb_error_set(err, -EINVAL, "--concurrency must be 1..%u", PBCTL_CONCURRENCY_MAX);
    if (cfg->size > PBCTL_SIZE_MAX)
        return pb_error_set(err, -EINVAL, "--size must be 0..%u", PBCTL_SIZE_MAX);
    return 0;
}

void pbctl_bench_count_error(struct pbctl_bench_result *r, const char *code)
{
    for (int i = 0; i < r->n_errors; i++) {
        if (strncmp(r->errors[i].code, code, sizeof(r->errors[i].code) - 1) == 0) {
            r->errors[i].n++;
            return;
        }
    }
    if (r->n_errors < PBCTL_BENCH_MAX_CODES - 1) {
        struct pbctl_bench_error_count *e = &r->errors[r->n_errors++];
        snprintf(e->code, sizeof(e->code), "%s", code);
        e->n = 1;
        return;
    }
    /* The last slot collects every further code. */
    struct pbctl_bench_error_count *e = &r->errors[PBCTL_BENCH_MAX_CODES - 1];
    if (r->n_errors < PBCTL_BENCH_MAX_CODES) {
        snprintf(e->code, sizeof(e->code), "OTHER");
        e->n = 0;
        r->n_errors = PBCTL_BENCH_MAX_CODES;
    }
    e->n++;
}

/* ---- the load loop ------------------------------------------------------ */

#define BENCH_IN_MAX     8192
#define BENCH_CONNECT_MS 2000

struct bench_conn {
    int fd; /* -1: lost for good */
    uint64_t id;
    uint64_t sent_us;
    char out[128];
    size_t out_len, out_off;
    char in[BENCH_IN_MAX];
    size_t in_len;
};

struct bench {
    const char *path;
    const struct pbctl_bench_config *cfg;
    struct pbctl_bench_result *r;
    uint64_t window_start_us, window_end_us;
    uint64_t next_id;
    int live;
};

static bool bench_in_window(const struct bench *b, uint64_t t)
{
    return t >= b->window_start_us && t <= b->window_end_us;
}

static int conn_open(struct bench *b, struct bench_conn *c)
{
    struct pb_error e;
    pb_error_clear(&e);
    int fd = pbctl_connect(b->path, NULL, BENCH_CONNECT_MS, &e);
    if (fd < 0)
        return fd;
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) {
        int rc = -errno;
        close(fd);
        return rc;
    }
    c->fd = fd;
    c->in_len = 0;
    c->out_len = c->out_off = 0;
    return 0;
}

/* Writes what is pending; 0, or a negative errno when the connection broke. */
static int conn_flush(struct bench_conn *c)
{
    while (c->out_off < c->out_len) {
        ssize_t n = send(c->fd, c->out + c->out_off, c->out_len - c->out_off, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return 0;
            return -errno;
        }
        c->out_off += (size_t)n;
    }
    return 0;
}

static int conn_send_probe(struct bench *b, struct bench_conn *c, uint64_t now)
{
    c->id = ++b->next_id;
    int n = snprintf(c->out, sizeof(c->out),
                     "{\"id\":%" PRIu64 ",\"method\":\"probe\",\"params\":{\"size\":%u}}\n", c->id,
                     b->cfg->size);
    assert(n > 0 && (size_t)n < sizeof(c->out));
    c->out_len = (size_t)n;
    c->out_off = 0;
    c->sent_us = now;
    return conn_flush(c);
}

/* The connection broke: count it, reconnect once, or give it up. */
static void conn_lost(struct bench *b, struct bench_conn *c, const char *why, uint64_t now)
{
    pbctl_bench_count_error(b->r, why);
    close(c->fd);
    c->fd = -1;
    if (now >= b->window_end_us) {
        b->live--;
        return;
    }
    if (conn_open(b, c) < 0 || conn_send_probe(b, c, pb_now_us()) < 0) {
        if (c->fd >= 0) {
            close(c->fd);
            c->fd = -1;
        }
        pbctl_bench_count_error(b->r, "CONNECT");
        b->live--;
    }
}

/* One reply line; returns 0, or -EBADMSG when it is not a reply to our probe. */
static int conn_reply(struct bench *b, struct bench_conn *c, const char *line, size_t len,
                      uint64_t now)
{
    json_error_t je;
    json_t *reply = json_loadb(line, len, 0, &je);
    if (!json_is_object(reply)) {
        json_decref(reply);
        return -EBADMSG;
    }
    const json_t *id = json_object_get(reply, "id");
    const json_t *error = json_object_get(reply, "error");
    const json_t *result = json_object_get(reply, "result");
    int rc = 0;
    if (!json_is_integer(id) || (uint64_t)json_integer_value(id) != c->id ||
        (error == NULL) == (result == NULL)) {
        rc = -EBADMSG;
    } else if (bench_in_window(b, now)) {
        if (result != NULL) {
            b->r->commits++;
            pbctl_hist_record(&b->r->latency, now - c->sent_us);
        } else {
            const char *code = json_string_value(json_object_get(error, "code"));
            pbctl_bench_count_error(b->r, code ? code : "BAD_REPLY");
        }
    }
    json_decref(reply);
    return rc;
}

static void conn_readable(struct bench *b, struct bench_conn *c, uint64_t now)
{
    for (;;) {
        if (c->in_len == sizeof(c->in)) {
            conn_lost(b, c, "BAD_REPLY", now);
            return;
        }
        ssize_t n = recv(c->fd, c->in + c->in_len, sizeof(c->in) - c->in_len, 0);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return;
            conn_lost(b, c, "CLOSED", now);
            return;
        }
        if (n == 0) {
            conn_lost(b, c, "CLOSED", now);
            return;
        }
        c->in_len += (size_t)n;
        now = pb_now_us(); /* the reply's arrival, not the poll's return */
        char *nl;
        while ((nl = memchr(c->in, '\n', c->in_len)) != NULL) {
            size_t len = (size_t)(nl - c->in);
            int rc = conn_reply(b, c, c->in, len, now);
            memmove(c->in, nl + 1, c->in_len - len - 1);
            c->in_len -= len + 1;
            if (rc < 0) {
                conn_lost(b, c, "BAD_REPLY", now);
                return;
            }
            if (c->in_len != 0) {
                /* More than one reply to one request in flight. */
                conn_lost(b, c, "BAD_REPLY", now);
                return;
            }
            if (now >= b->window_end_us)
                return;
            if (conn_send_probe(b, c, now) < 0) {
                conn_lost(b, c, "CLOSED", now);
                return;
            }
        }
    }
}

int pbctl_bench_run(const char *path, const struct pbctl_bench_config *cfg,
                    struct pbctl_bench_result *r, struct pb_error *err)
{
    memset(r, 0, sizeof(*r));
    pbctl_hist_init(&r->latency);
    struct bench b = {.path = path, .cfg = cfg, .r = r};
    struct bench_conn *conns = pb_xcalloc(cfg->concurrency, sizeof(*conns));
    struct pollfd *pfds = pb_xcalloc(cfg->concurrency, sizeof(*pfds));
    unsigned *which = pb_xcalloc(cfg->concurrency, sizeof(*which)); /* pfds[j] is conns[which[j]] */
    int first_rc = 0;
    for (unsigned i = 0; i < cfg->concurrency; i++) {
        int rc = conn_open(&b, &conns[i]);
        if (rc < 0) {
            conns[i].fd = -1;
            pbctl_bench_count_error(r, "CONNECT");
            if (first_rc == 0)
                first_rc = rc;
            continue;
        }
        b.live++;
    }
    int ret = 0;
    if (b.live == 0) {
        ret = pb_error_set(err, first_rc ? first_rc : -ECONNREFUSED,
                           "cannot connect to %s: %s (is pickboxd running?)", path,
                           strerror(first_rc ? -first_rc : ECONNREFUSED));
        goto out;
    }
    uint64_t start = pb_now_us();
    b.window_start_us = start + (uint64_t)cfg->warmup_ms * 1000;
    b.window_end_us = b.window_start_us + (uint64_t)cfg->duration_ms * 1000;
    for (unsigned i = 0; i < cfg->concurrency; i++) {
        if (conns[i].fd >= 0 && conn_send_probe(&b, &conns[i], start) < 0)
            conn_lost(&b, &conns[i], "CLOSED", start);
    }
    uint64_t now = pb_now_us();
    while (now < b.window_end_us && b.live > 0) {
        nfds_t n = 0;
        for (unsigned i = 0; i < cfg->concurrency; i++) {
            if (conns[i].fd < 0)
                continue;
            pfds[n].fd = conns[i].fd;
            pfds[n].events = POLLIN;
            if (conns[i].out_off < conns[i].out_len)
                pfds[n].events |= POLLOUT;
            pfds[n].revents = 0;
            which[n++] = i;
        }
        int wait_ms = (int)((b.window_end_us - now) / 1000) + 1;
        int k = poll(pfds, n, wait_ms);
        if (k < 0 && errno != EINTR) {
            ret = pb_error_set(err, -errno, "poll: %s", strerror(errno));
            goto out;
        }
        now = pb_now_us();
        if (k <= 0)
            continue;
        for (nfds_t j = 0; j < n; j++) {
            struct bench_conn *c = &conns[which[j]];
            short re = pfds[j].revents;
            if (re == 0 || c->fd != pfds[j].fd)
                continue;
            if (re & POLLOUT) {
                if (conn_flush(c) < 0) {
                    conn_lost(&b, c, "CLOSED", now);
                    continue;
                }
            }
            if (re & (POLLIN | POLLHUP | POLLERR))
                conn_readable(&b, c, now);
        }
    }
    uint64_t stop = now < b.window_end_us ? now : b.window_end_us;
    r->elapsed_s = stop > b.window_start_us ? (double)(stop - b.window_start_us) / 1e6 : 0.0;
    if (b.live == 0 && now < b.window_end_us)
        ret = pb_error_set(err, -ECONNRESET, "lost every connection to %s", path);
out:
    for (unsigned i = 0; i < cfg->concurrency; i++) {
        if (conns[i].fd >= 0)
            close(conns[i].fd);
    }
    free(conns);
    free(pfds);
    free(which);
    return ret;
}

/* ---- report ------------------------------------------------------------- */

static double us_to_ms(uint64_t us)
{
    return (double)us / 1000.0;
}

void pbctl_bench_print(const struct pbctl_bench_config *cfg, const struct pbctl_bench_result *r,
                       bool json, FILE *out)
{
    double rate = r->elapsed_s > 0 ? (double)r->commits / r->elapsed_s : 0.0;
    const struct pbctl_hist *h = &r->latency;
    if (json) {
        json_t *errors = json_object();
        for (int i = 0; i < r->n_errors; i++)
            json_object_set_new(errors, r->errors[i].code,
                                json_integer((json_int_t)r->errors[i].n));
        json_t *o = json_pack("{s:i, s:i, s:f, s:I, s:f, s:{s:f, s:f, s:f, s:f}, s:o}", "size",
                              (int)cfg->size, "concurrency", (int)cfg->concurrency, "duration_s",
                              r->elapsed_s, "commits", (json_int_t)r->commits, "commits_per_s",
                              rate, "latency_ms", "p50", us_to_ms(pbctl_hist_percentile(h, 50)),
                              "p90", us_to_ms(pbctl_hist_percentile(h, 90)), "p99",
                              us_to_ms(pbctl_hist_percentile(h, 99)), "max", us_to_ms(h->max_us),
                              "errors", errors);
        json_dumpf(o, out, JSON_COMPACT | JSON_REAL_PRECISION(6));
        fputc('\n', out);
        json_decref(o);
        fflush(out);
        return;
    }
    fprintf(out, "probes: %u connections, %u bytes each, %.1f s measured after a %.1f s warm-up\n",
            cfg->concurrency, cfg->size, r->elapsed_s, cfg->warmup_ms / 1000.0);
    fprintf(out, "commits: %" PRIu64 " (%.1f/s)\n", r->commits, rate);
    fprintf(out, "latency ms: p50 %.3f  p90 %.3f  p99 %.3f  max %.3f\n",
            us_to_ms(pbctl_hist_percentile(h, 50)), us_to_ms(pbctl_hist_percentile(h, 90)),
            us_to_ms(pbctl_hist_percentile(h, 99)), us_to_ms(h->max_us));
    fprintf(out, "errors:");
    if (r->n_errors == 0)
        fprintf(out, " none");
    for (int i = 0; i < r->n_errors; i++)
        fprintf(out, "%s %s %" PRIu64, i ? "," : "", r->errors[i].code, r->errors[i].n);
    fputc('\n', out);
    fflush(out);
}

int pbctl_bench_command(const struct pbctl_options *opts, const char *path,
                        const struct pbctl_env *env)
{
    struct pbctl_bench_config cfg;
    struct pb_error e;
    pb_error_clear(&e);
    if (pbctl_bench_config_from_options(opts, &cfg, &e) < 0) {
        fprintf(env->err, "pickboxctl: %s\n", e.msg);
        return PBCTL_EXIT_USAGE;
    }
    struct pbctl_bench_result *r = pb_xmalloc(sizeof(*r));
    int rc = pbctl_bench_run(path, &cfg, r, &e);
    int code = PBCTL_EXIT_OK;
    if (rc < 0 && r->commits == 0 && r->elapsed_s == 0.0) {
        fprintf(env->err, "pickboxctl: %s\n", e.msg);
        code = PBCTL_EXIT_CONNECT;
    } else {
        pbctl_bench_print(&cfg, r, opts->json, env->out);
        if (rc < 0) {
            fprintf(env->err, "pickboxctl: %s\n", e.msg);
            code = PBCTL_EXIT_DAEMON;
        } else if (r->commits == 0) {
            fprintf(env->err, "pickboxctl: no probe committed in %.1f s (see errors)\n",
                    r->elapsed_s);
            code = PBCTL_EXIT_DAEMON;
        }
    }
    free(r);
    return code;
}

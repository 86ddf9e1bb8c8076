/*
 * metrics.c: the Prometheus text exposition of pickboxd (see metrics.h).
 *
 * The writer below is the only place that knows the format; metrics_render()
 * only says which families exist and where their values come from. Families
 * are written in a fixed order, each one whole (HELP, TYPE, samples), and the
 * same families appear on every scrape, so a missing series means a missing
 * peer, not a missing metric.
 */
#include <config.h>

#include "daemon/metrics.h"

#include <assert.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ctl/ctl.h"
#include "daemon/cluster.h"
#include "daemon/daemon.h"
#include "daemon/replica.h"
#include "lib/util.h"

/* ---- the writer ---- */

static bool name_char(char ch, bool first)
{
    return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || ch == '_' || ch == ':' ||
           (!first && ch >= '0' && ch <= '9');
}

bool metrics_name_valid(const char *s)
{
    if (s == NULL || *s == '\0')
        return false;
    for (const char *p = s; *p != '\0'; p++) {
        if (!name_char(*p, p == s))
            return false;
    }
    return true;
}

void metrics_writer_init(struct metrics_writer *w)
{
    buf_init(&w->out);
}

void metrics_writer_free(struct metrics_writer *w)
{
    buf_free(&w->out);
}

static void put_s(struct metrics_writer *w, const char *s)
{
    buf_put(&w->out, s, strlen(s));
}

/* Escapes \ and newline (HELP), and " too in label values. */
static void put_escaped(struct metrics_writer *w, const char *s, bool quote)
{
    for (const char *p = s; *p != '\0'; p++) {
        if (*p == '\\')
            put_s(w, "\\\\");
        else if (*p == '\n')
            put_s(w, "\\n");
        else if (*p == '"' && quote)
            put_s(w, "\\\"");
        else
            buf_put(&w->out, p, 1);
    }
}

void metrics_family(struct metrics_writer *w, const char *name, enum metrics_type type,
                    const char *help)
{
    assert(metrics_name_valid(name));
    static const char *const types[] = {
            [METRICS_COUNTER] = "counter",
            [METRICS_GAUGE] = "gauge",
            [METRICS_HISTOGRAM] = "histogram",
    };
    put_s(w, "# HELP ");
    put_s(w, name);
    put_s(w, " ");
    put_escaped(w, help, false);
    put_s(w, "\n# TYPE ");
    put_s(w, name);
    put_s(w, " ");
    put_s(w, types[type]);
    put_s(w, "\n");
}

/* "name{a="x",le="0.1"} " (extra: one more label, NULL for none). */
static void put_series(struct metrics_writer *w, const char *name,
                       const struct metrics_label *labels, size_t n,
                       const struct metrics_label *extra)
{
    assert(metrics_name_valid(name));
    put_s(w, name);
    if (n > 0 || extra != NULL) {
        put_s(w, "{");
        for (size_t i = 0; i < n + (extra != NULL); i++) {
            const struct metrics_label *l = i < n ? &labels[i] : extra;
            assert(metrics_name_valid(l->name) && strchr(l->name, ':') == NULL);
            if (i > 0)
                put_s(w, ",");
            put_s(w, l->name);
            put_s(w, "=\"");
            put_escaped(w, l->value, true);
            put_s(w, "\"");
        }
        put_s(w, "}");
    }
    put_s(w, " ");
}

void metrics_sample_u64(struct metrics_writer *w, const char *name,
                        const struct metrics_label *labels, size_t n, uint64_t v)
{
    char num[32];
    put_series(w, name, labels, n, NULL);
    snprintf(num, sizeof(num), "%" PRIu64 "\n", v);
    put_s(w, num);
}

void metrics_sample_double(struct metrics_writer *w, const char *name,
                           const struct metrics_label *labels, size_t n, double v)
{
    char num[64];
    put_series(w, name, labels, n, NULL);
    if (isnan(v))
        snprintf(num, sizeof(num), "NaN\n");
    else if (isinf(v))
        snprintf(num, sizeof(num), "%s\n", v > 0 ? "+Inf" : "-Inf");
    else
        snprintf(num, sizeof(num), "%.15g\n", v);
    put_s(w, num);
}

/* name + suffix, for the series of a histogram. */
static void suffixed(char *out, size_t len, const char *name, const char *suffix)
{
    int n = snprintf(out, len, "%s%s", name, suffix);
    assert(n > 0 && (size_t)n < len);
    (void)n;
}

void metrics_sample_hist(struct metrics_writer *w, const char *name,
                         const struct metrics_label *labels, size_t n, const struct pb_hist *h)
{
    char series[128], le[32], num[48];
    suffixed(series, sizeof(series), name, "_bucket");
    uint64_t cum = 0;
    for (size_t i = 0; i <= PB_HIST_BUCKETS; i++) {
        cum += h->bucket[i];
        if (i < PB_HIST_BUCKETS)
            snprintf(le, sizeof(le), "%g", (double)pb_hist_bounds_us[i] / 1e6);
        else
            snprintf(le, sizeof(le), "+Inf");
        struct metrics_label l = {"le", le};
        put_series(w, series, labels, n, &l);
        snprintf(num, sizeof(num), "%" PRIu64 "\n", cum);
        put_s(w, num);
    }
    /* Exact decimal seconds from microseconds. */
    suffixed(series, sizeof(series), name, "_sum");
    put_series(w, series, labels, n, NULL);
    snprintf(num, sizeof(num), "%" PRIu64 ".%06" PRIu64 "\n", h->sum_us / 1000000,
             h->sum_us % 1000000);
    put_s(w, num);
    suffixed(series, sizeof(series), name, "_count");
    metrics_sample_u64(w, series, labels, n, cum);
}

void metrics_counter(struct metrics_writer *w, const char *name, const char *help, uint64_t v)
{
    metrics_family(w, name, METRICS_COUNTER, help);
    metrics_sample_u64(w, name, NULL, 0, v);
}

void metrics_gauge(struct metrics_writer *w, const char *name, const char *help, double v)
{
    metrics_family(w, name, METRICS_GAUGE, help);
    metrics_sample_double(w, name, NULL, 0, v);
}

char *metrics_writer_finish(struct metrics_writer *w, size_t *len)
{
    buf_put(&w->out, "", 1);
    size_t n;
    char *text = (char *)buf_steal(&w->out, &n);
    *len = n - 1;
    return text;
}

/* ---- what pickboxd exposes ---- */

static void render_cluster(struct metrics_writer *w, struct cluster *c)
{
    struct cluster_metrics *m = pb_xmalloc(sizeof(*m)); /* ~3 KiB: off the stack */
    cluster_metrics_get(c, m);
    metrics_gauge(w, "pickbox_raft_term", "Current Raft term.", (double)m->term);
    metrics_gauge(w, "pickbox_raft_commit_index", "Highest log index known to be committed.",
                  (double)m->commit);
    metrics_gauge(w, "pickbox_raft_applied_index",
                  "Highest log index applied to the state machine (state.db).", (double)m->applied);
    metrics_gauge(w, "pickbox_raft_last_index", "Index of the last entry in the local log.",
                  (double)m->last_index);
    metrics_gauge(w, "pickbox_raft_snapshot_index", "Index of the latest snapshot.",
                  (double)m->snapshot_index);
    metrics_gauge(w, "pickbox_raft_leader", "1 if this node is the leader, else 0.",
                  m->leader ? 1 : 0);
    metrics_counter(w, "pickbox_raft_leader_changes_total",
                    "Times this node saw a new leader (itself included).", m->leader_changes);
    metrics_gauge(w, "pickbox_raft_apply_lag_entries",
                  "Committed entries not applied yet (commit index - applied index).",
                  (double)m->apply_lag);
    metrics_gauge(w, "pickbox_raft_apply_lag_seconds",
                  "Age of the oldest committed entry not applied yet; 0 when none.",
                  m->apply_lag_s);
    metrics_gauge(w, "pickbox_raft_storage_error",
                  "1 while raft.db writes fail (the node acknowledges nothing).",
                  m->storage_error ? 1 : 0);
    metrics_counter(w, "pickbox_raft_batches_total",
                    "raft.db batches submitted (group commit: one per loop iteration).",
                    m->batches);
    metrics_counter(w, "pickbox_raft_batch_entries_total", "Log entries written by those batches.",
                    m->batch_entries);
    metrics_family(w, "pickbox_raft_fsync_seconds", METRICS_HISTOGRAM,
                   "Duration of raft.db COMMITs (WAL write and fsync), on the storage thread.");
    metrics_sample_hist(w, "pickbox_raft_fsync_seconds", NULL, 0, &m->fsync);
    /* big files' chunk bytes pushed beside the log (push.h, D13) */
    metrics_counter(w, "pickbox_push_sent_bytes_total",
                    "Chunk bytes this node pushed to peers (once per peer).", m->push.sent_bytes);
    metrics_counter(w, "pickbox_push_acked_bytes_total",
                    "Chunk bytes pushed by this node that peers stored and acknowledged.",
                    m->push.acked_bytes);
    metrics_counter(w, "pickbox_push_received_bytes_total",
                    "Chunk bytes pushed to this node by peers and stored.", m->push.received_bytes);
    metrics_counter(w, "pickbox_push_received_frames_total", "PUSH messages from peers stored.",
                    m->push.received_frames);
    metrics_counter(w, "pickbox_push_rejected_frames_total",
                    "PUSH messages from peers rejected (malformed or a chunk not matching its id).",
                    m->push.rejected_frames);

    static const struct {
        const char *name, *help;
        int what; /* 0 sent, 1 received, 2 up */
    } peer_families[] = {
            {"pickbox_peer_sent_bytes_total", "Frame bytes sent to the peer since startup.", 0},
            {"pickbox_peer_received_bytes_total",
             "Frame bytes received from the peer since startup.", 1},
            {"pickbox_peer_up", "1 if the authenticated link to the peer is up.", 2},
    };
    for (size_t f = 0; f < PB_ARRAY_SIZE(peer_families); f++) {
        metrics_family(w, peer_families[f].name,
                       peer_families[f].what == 2 ? METRICS_GAUGE : METRICS_COUNTER,
                       peer_families[f].help);
        for (size_t i = 0; i < m->n_peers; i++) {
            const struct cluster_peer_metrics *p = &m->peers[i];
            struct metrics_label l = {"peer", p->name};
            uint64_t v = peer_families[f].what == 0   ? p->bytes_sent
                         : peer_families[f].what == 1 ? p->bytes_recv
                                                      : p->connected;
            metrics_sample_u64(w, peer_families[f].name, &l, 1, v);
        }
    }
    free(m);
}

static void render_replica(struct metrics_writer *w, struct replica *r)
{
    struct replica_metrics m;
    replica_metrics_get(r, &m);
    metrics_counter(w, "pickbox_proposals_total",
                    "Operations from this node's tree proposed (retries not counted).", m.proposed);
    metrics_counter(w, "pickbox_proposals_applied_total",
                    "Operations of this node that were committed and applied.", m.applied);
    metrics_counter(w, "pickbox_proposals_lost_total",
                    "Operations of this node lost (e.g. with a leader) and built again.", m.lost);
    metrics_gauge(w, "pickbox_proposals_pending",
                  "Operations of this node queued or in flight, not applied yet.",
                  (double)m.pending);
    metrics_family(w, "pickbox_proposal_duration_seconds", METRICS_HISTOGRAM,
                   "Time from the first proposal of an operation to its apply on this node.");
    metrics_sample_hist(w, "pickbox_proposal_duration_seconds", NULL, 0, &m.latency);
    metrics_counter(w, "pickbox_chunks_sent_total",
                    "Chunks whose bytes this node's proposals carried.", m.chunks_sent);
    metrics_counter(w, "pickbox_chunks_deduplicated_total",
                    "Chunks left out of proposals because the cluster already had them.",
                    m.chunks_dedup);
    metrics_counter(w, "pickbox_conflicts_total",
                    "Applied operations that created a conflict copy.", m.conflicts);
    metrics_counter(w, "pickbox_watch_events_total", "inotify events read.", m.watch.events);
    metrics_counter(w, "pickbox_watch_rescans_total",
                    "Rescans of the tree (full, periodic and retries).", m.watch.rescans);
    metrics_counter(w, "pickbox_watch_overflows_total", "inotify queue overflows.",
                    m.watch.overflows);
    metrics_counter(w, "pickbox_watch_failures_total", "inotify_add_watch failures.",
                    m.watch.watch_failures);
    metrics_gauge(w, "pickbox_watch_directories", "Directories watched now.",
                  (double)m.watch.watches);
    metrics_gauge(w, "pickbox_watch_unwatched_directories",
                  "Directories without a watch now (retried).", (double)m.watch.unwatched);
    metrics_gauge(w, "pickbox_tree_files", "Files in the replicated tree (state.db).",
                  (double)m.files);
    metrics_gauge(w, "pickbox_tree_directories", "Directories in the replicated tree (state.db).",
                  (double)m.dirs);
    metrics_gauge(w, "pickbox_tree_bytes", "Bytes of the files in the replicated tree.",
                  (double)m.bytes);
    metrics_gauge(w, "pickbox_tree_chunks_missing",
                  "Chunks the tree references whose bytes this node lacks (being fetched).",
                  (double)m.chunks_missing);
    metrics_gauge(w, "pickbox_tree_chunk_bytes_missing", "Bytes of those chunks.",
                  (double)m.chunk_bytes_missing);
    metrics_gauge(w, "pickbox_tree_writing", "Big files being written into the tree now.",
                  (double)m.writing);
}

char *metrics_render(struct daemon *d, size_t *len)
{
    struct metrics_writer w;
    metrics_writer_init(&w);
    metrics_family(&w, "pickbox_info", METRICS_GAUGE, "Always 1; the labels say which node.");
    struct metrics_label info[] = {{"node", d->node.node_id}, {"version", PACKAGE_VERSION}};
    metrics_sample_u64(&w, "pickbox_info", info, PB_ARRAY_SIZE(info), 1);
    metrics_gauge(&w, "pickbox_uptime_seconds", "Seconds since the daemon started.",
                  (double)(pb_now_ms() - d->node.started_ms) / 1000.0);
    if (d->ctl != NULL)
        metrics_gauge(&w, "pickbox_control_clients", "Clients on the control socket.",
                      (double)ctl_server_clients(d->ctl));
    if (d->cluster != NULL)
        render_cluster(&w, d->cluster);
    if (d->replica != NULL)
        render_replica(&w, d->replica);
    return metrics_writer_finish(&w, len);
}

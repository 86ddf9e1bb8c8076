/*
 * check_metrics.c: unit tests for the Prometheus text writer (src/daemon/
 * metrics.c) and the latency histogram it renders (src/lib/hist.c): exact
 * output of families, samples, escaping, float spellings and histogram
 * series, and the shape of a daemon's exposition without cluster or tree.
 */
#include "config.h"

#include <check.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "daemon/daemon.h"
#include "daemon/metrics.h"
#include "lib/hist.h"
#include "lib/util.h"

/* Finishes w and compares its text with want. */
static void expect_text(struct metrics_writer *w, const char *want)
{
    size_t len;
    char *text = metrics_writer_finish(w, &len);
    ck_assert_uint_eq(len, strlen(text));
    ck_assert_str_eq(text, want);
    free(text);
}

START_TEST(test_name_valid)
{
    ck_assert(metrics_name_valid("pickbox_raft_term"));
    ck_assert(metrics_name_valid("a:b_C9"));
    ck_assert(metrics_name_valid("_x"));
    ck_assert(!metrics_name_valid(""));
    ck_assert(!metrics_name_valid(NULL));
    ck_assert(!metrics_name_valid("9lives"));
    ck_assert(!metrics_name_valid("with-dash"));
    ck_assert(!metrics_name_valid("with space"));
    ck_assert(!metrics_name_valid("pickbox_é"));
}
END_TEST

START_TEST(test_counter_and_gauge)
{
    struct metrics_writer w;
    metrics_writer_init(&w);
    metrics_counter(&w, "pickbox_x_total", "Things.", 18446744073709551615ull);
    metrics_gauge(&w, "pickbox_y", "A level.", 42);
    expect_text(&w, "# HELP pickbox_x_total Things.\n"
                    "# TYPE pickbox_x_total counter\n"
                    "pickbox_x_total 18446744073709551615\n"
                    "# HELP pickbox_y A level.\n"
                    "# TYPE pickbox_y gauge\n"
                    "pickbox_y 42\n");
    /* The writer is empty again and reusable. */
    metrics_gauge(&w, "pickbox_z", "z", 0.5);
    expect_text(&w, "# HELP pickbox_z z\n# TYPE pickbox_z gauge\npickbox_z 0.5\n");
    metrics_writer_free(&w);
}
END_TEST

START_TEST(test_escaping)
{
    struct metrics_writer w;
    metrics_writer_init(&w);
    /* HELP escapes backslash and newline, not quotes. */
    metrics_family(&w, "pickbox_peer_up", METRICS_GAUGE, "a \\ b\nc \"q\"");
    struct metrics_label l[] = {{"peer", "n\"1\\x\ny"}, {"zone", ""}};
    metrics_sample_u64(&w, "pickbox_peer_up", l, 2, 1);
    expect_text(&w, "# HELP pickbox_peer_up a \\\\ b\\nc \"q\"\n"
                    "# TYPE pickbox_peer_up gauge\n"
                    "pickbox_peer_up{peer=\"n\\\"1\\\\x\\ny\",zone=\"\"} 1\n");
    metrics_writer_free(&w);
}
END_TEST

START_TEST(test_float_spelling)
{
    struct metrics_writer w;
    metrics_writer_init(&w);
    metrics_sample_double(&w, "a", NULL, 0, NAN);
    metrics_sample_double(&w, "a", NULL, 0, INFINITY);
    metrics_sample_double(&w, "a", NULL, 0, -INFINITY);
    metrics_sample_double(&w, "a", NULL, 0, 0.001);
    metrics_sample_double(&w, "a", NULL, 0, -2.5);
    metrics_sample_double(&w, "a", NULL, 0, 1e20);
    metrics_sample_double(&w, "a", NULL, 0, 123456789012.0);
    expect_text(&w, "a NaN\na +Inf\na -Inf\na 0.001\na -2.5\na 1e+20\na 123456789012\n");
    metrics_writer_free(&w);
}
END_TEST

START_TEST(test_hist_observe_buckets)
{
    struct pb_hist h;
    memset(&h, 0, sizeof(h));
    pb_hist_observe_us(&h, 0);
    pb_hist_observe_us(&h, 100); /* on the bound: in that bucket (le) */
    pb_hist_observe_us(&h, 101);
    pb_hist_observe_us(&h, 10000000);
    pb_hist_observe_us(&h, 10000001); /* above the last bound */
    ck_assert_uint_eq(h.bucket[0], 2);
    ck_assert_uint_eq(h.bucket[1], 1);
    ck_assert_uint_eq(h.bucket[PB_HIST_BUCKETS - 1], 1);
    ck_assert_uint_eq(h.bucket[PB_HIST_BUCKETS], 1);
    ck_assert_uint_eq(h.count, 5);
    ck_assert_uint_eq(h.sum_us, 20000202);
    for (size_t i = 1; i < PB_HIST_BUCKETS; i++)
        ck_assert_uint_gt(pb_hist_bounds_us[i], pb_hist_bounds_us[i - 1]);
}
END_TEST

START_TEST(test_hist_series)
{
    struct pb_hist h;
    memset(&h, 0, sizeof(h));
    pb_hist_observe_us(&h, 80);      /* le 0.0001 */
    pb_hist_observe_us(&h, 3000);    /* le 0.005 */
    pb_hist_observe_us(&h, 3000);    /* le 0.005 */
    pb_hist_observe_us(&h, 2000000); /* le 2.5 */
    pb_hist_observe_us(&h, 60000000);
    struct metrics_writer w;
    metrics_writer_init(&w);
    metrics_family(&w, "pickbox_t_seconds", METRICS_HISTOGRAM, "T.");
    struct metrics_label l = {"peer", "n2"};
    metrics_sample_hist(&w, "pickbox_t_seconds", &l, 1, &h);
    expect_text(&w, "# HELP pickbox_t_seconds T.\n"
                    "# TYPE pickbox_t_seconds histogram\n"
                    "pickbox_t_seconds_bucket{peer=\"n2\",le=\"0.0001\"} 1\n"
                    "pickbox_t_seconds_bucket{peer=\"n2\",le=\"0.00025\"} 1\n"
                    "pickbox_t_seconds_bucket{peer=\"n2\",le=\"0.0005\"} 1\n"
                    "pickbox_t_seconds_bucket{peer=\"n2\",le=\"0.001\"} 1\n"
                    "pickbox_t_seconds_bucket{peer=\"n2\",le=\"0.0025\"} 1\n"
                    "pickbox_t_seconds_bucket{peer=\"n2\",le=\"0.005\"} 3\n"
                    "pickbox_t_seconds_bucket{peer=\"n2\",le=\"0.01\"} 3\n"
                    "pickbox_t_seconds_bucket{peer=\"n2\",le=\"0.025\"} 3\n"
                    "pickbox_t_seconds_bucket{peer=\"n2\",le=\"0.05\"} 3\n"
                    "pickbox_t_seconds_bucket{peer=\"n2\",le=\"0.1\"} 3\n"
                    "pickbox_t_seconds_bucket{peer=\"n2\",le=\"0.25\"} 3\n"
                    "pickbox_t_seconds_bucket{peer=\"n2\",le=\"0.5\"} 3\n"
                    "pickbox_t_seconds_bucket{peer=\"n2\",le=\"1\"} 3\n"
                    "pickbox_t_seconds_bucket{peer=\"n2\",le=\"2.5\"} 4\n"
                    "pickbox_t_seconds_bucket{peer=\"n2\",le=\"5\"} 4\n"
                    "pickbox_t_seconds_bucket{peer=\"n2\",le=\"10\"} 4\n"
                    "pickbox_t_seconds_bucket{peer=\"n2\",le=\"+Inf\"} 5\n"
                    "pickbox_t_seconds_sum{peer=\"n2\"} 62.006080\n"
                    "pickbox_t_seconds_count{peer=\"n2\"} 5\n");
    metrics_writer_free(&w);
}
END_TEST

START_TEST(test_hist_empty)
{
    struct pb_hist h;
    memset(&h, 0, sizeof(h));
    struct metrics_writer w;
    metrics_writer_init(&w);
    metrics_sample_hist(&w, "h", NULL, 0, &h);
    size_t len;
    char *text = metrics_writer_finish(&w, &len);
    ck_assert_ptr_nonnull(strstr(text, "h_bucket{le=\"0.0001\"} 0\n"));
    ck_assert_ptr_nonnull(strstr(text, "h_bucket{le=\"+Inf\"} 0\nh_sum 0.000000\nh_count 0\n"));
    free(text);
    metrics_writer_free(&w);
}
END_TEST

/* The name of the series on a sample line (up to '{' or ' '). */
static void series_name(const char *line, char *out, size_t len)
{
    size_t n = strcspn(line, "{ ");
    ck_assert_uint_lt(n, len);
    memcpy(out, line, n);
    out[n] = '\0';
}

START_TEST(test_render_daemon_without_cluster)
{
    struct daemon d;
    memset(&d, 0, sizeof(d));
    char node[] = "n\"1";
    d.node.node_id = node;
    d.node.started_ms = pb_now_ms();
    size_t len;
    char *text = metrics_render(&d, &len);
    ck_assert_uint_eq(len, strlen(text));
    ck_assert_ptr_nonnull(strstr(text, "# TYPE pickbox_info gauge\n"));
    ck_assert_ptr_nonnull(
            strstr(text, "pickbox_info{node=\"n\\\"1\",version=\"" PACKAGE_VERSION "\"} 1\n"));
    ck_assert_ptr_nonnull(strstr(text, "# TYPE pickbox_uptime_seconds gauge\n"));
    /* No cluster, no tree: their families are absent, not zero. */
    ck_assert_ptr_null(strstr(text, "pickbox_raft_term"));
    ck_assert_ptr_null(strstr(text, "pickbox_tree_files"));
    /* Every sample line belongs to a family declared before it. */
    ck_assert_int_eq(text[len - 1], '\n');
    char *save = NULL, typed[8][128];
    size_t n_typed = 0, samples = 0;
    for (char *line = strtok_r(text, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        if (strncmp(line, "# TYPE ", 7) == 0) {
            ck_assert_uint_lt(n_typed, 8);
            series_name(line + 7, typed[n_typed++], sizeof(typed[0]));
        } else if (line[0] != '#') {
            char name[128];
            series_name(line, name, sizeof(name));
            ck_assert(metrics_name_valid(name));
            ck_assert_uint_gt(n_typed, 0);
            ck_assert_str_eq(name, typed[n_typed - 1]);
            samples++;
        }
    }
    ck_assert_uint_eq(samples, 2);
    free(text);
}
END_TEST

static Suite *metrics_suite(void)
{
    Suite *s = suite_create("metrics");
    TCase *tc = tcase_create("core");
    tcase_add_test(tc, test_name_valid);
    tcase_add_test(tc, test_counter_and_gauge);
    tcase_add_test(tc, test_escaping);
    tcase_add_test(tc, test_float_spelling);
    tcase_add_test(tc, test_hist_observe_buckets);
    tcase_add_test(tc, test_hist_series);
    tcase_add_test(tc, test_hist_empty);
    tcase_add_test(tc, test_render_daemon_without_cluster);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(metrics_suite());
    srunner_run_all(sr, CK_ENV);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}

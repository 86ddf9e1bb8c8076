/*
 * check_lib.c: unit tests for src/lib (buffers, cursors, parsing, writing, errors, log
 * levels).
 */
#include "config.h"

#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "lib/buf.h"
#include "lib/error.h"
#include "lib/log.h"
#include "lib/util.h"

START_TEST(test_buf_roundtrip)
{
    struct buf b = BUF_INIT;
    buf_put_u8(&b, 0xab);
    buf_put_u16(&b, 0x1234);
    buf_put_u32(&b, 0xdeadbeef);
    buf_put_u64(&b, 0x0102030405060708ull);
    buf_put_str(&b, "hello");
    buf_put_bytes(&b, "\0\1\2", 3);
    ck_assert_uint_eq(b.len, 1 + 2 + 4 + 8 + 4 + 5 + 4 + 3);

    struct cursor c;
    cursor_init(&c, b.data, b.len);
    ck_assert_uint_eq(cursor_u8(&c), 0xab);
    ck_assert_uint_eq(cursor_u16(&c), 0x1234);
    ck_assert_uint_eq(cursor_u32(&c), 0xdeadbeef);
    ck_assert_uint_eq(cursor_u64(&c), 0x0102030405060708ull);
    char *s = cursor_str(&c, 100);
    ck_assert_str_eq(s, "hello");
    free(s);
    size_t n;
    const uint8_t *p = cursor_bytes(&c, 100, &n);
    ck_assert_ptr_nonnull(p);
    ck_assert_uint_eq(n, 3);
    ck_assert_mem_eq(p, "\0\1\2", 3);
    ck_assert(cursor_ok(&c));
    ck_assert_uint_eq(cursor_remaining(&c), 0);
    buf_free(&b);
}
END_TEST

START_TEST(test_cursor_short_input_fails)
{
    uint8_t in[3] = {1, 2, 3};
    struct cursor c;
    cursor_init(&c, in, sizeof(in));
    ck_assert_uint_eq(cursor_u32(&c), 0);
    ck_assert(!cursor_ok(&c));
    /* Once failed, everything reads as zero and stays failed. */
    ck_assert_uint_eq(cursor_u8(&c), 0);
    ck_assert(!cursor_ok(&c));
}
END_TEST

START_TEST(test_cursor_bytes_limits)
{
    struct buf b = BUF_INIT;
    buf_put_u32(&b, 1000); /* claims 1000 bytes, has 2 */
    buf_put(&b, "ab", 2);
    struct cursor c;
    size_t n = 99;
    cursor_init(&c, b.data, b.len);
    ck_assert_ptr_null(cursor_bytes(&c, 5000, &n));
    ck_assert_uint_eq(n, 0);
    ck_assert(!cursor_ok(&c));

    /* Over the caller's maximum. */
    cursor_init(&c, b.data, b.len);
    ck_assert_ptr_null(cursor_bytes(&c, 10, &n));
    ck_assert(!cursor_ok(&c));

    /* A string with an embedded NUL is refused. */
    buf_reset(&b);
    buf_put_bytes(&b, "a\0b", 3);
    cursor_init(&c, b.data, b.len);
    ck_assert_ptr_null(cursor_str(&c, 10));
    ck_assert(!cursor_ok(&c));
    buf_free(&b);
}
END_TEST

START_TEST(test_buf_growth_and_steal)
{
    struct buf b = BUF_INIT;
    for (int i = 0; i < 10000; i++)
        buf_put_u8(&b, (uint8_t)i);
    ck_assert_uint_eq(b.len, 10000);
    ck_assert_uint_ge(b.cap, 10000);
    size_t len;
    uint8_t *p = buf_steal(&b, &len);
    ck_assert_uint_eq(len, 10000);
    ck_assert_uint_eq(p[9999], (uint8_t)9999);
    ck_assert_ptr_null(b.data);
    ck_assert_uint_eq(b.len, 0);
    free(p);
}
END_TEST

START_TEST(test_parse_u64)
{
    uint64_t v;
    ck_assert_int_eq(pb_parse_u64("8010", 1, 65535, &v), 0);
    ck_assert_uint_eq(v, 8010);
    ck_assert_int_eq(pb_parse_u64("0", 1, 65535, &v), -ERANGE);
    ck_assert_int_eq(pb_parse_u64("65536", 1, 65535, &v), -ERANGE);
    ck_assert_int_eq(pb_parse_u64("12a", 0, 100, &v), -EINVAL);
    ck_assert_int_eq(pb_parse_u64("", 0, 100, &v), -EINVAL);
    ck_assert_int_eq(pb_parse_u64("-1", 0, 100, &v), -EINVAL);
    ck_assert_int_eq(pb_parse_u64(" 1", 0, 100, &v), -EINVAL);
    ck_assert_int_eq(pb_parse_u64("99999999999999999999999", 0, UINT64_MAX, &v), -ERANGE);
}
END_TEST

/* pb_write_all: everything reaches a file; a short write is continued (a
 * non-blocking pipe takes what fits, then the next write says EAGAIN); the
 * failing write's errno comes back. */
START_TEST(test_write_all)
{
    size_t n = 1u << 20;
    uint8_t *p = pb_xmalloc(n), *back = pb_xmalloc(n + 1); /* + 1: nothing past n */
    for (size_t i = 0; i < n; i++)
        p[i] = (uint8_t)(i * 131 + (i >> 9));

    char tmpl[] = "/tmp/check_lib.XXXXXX";
    int fd = mkstemp(tmpl);
    ck_assert_int_ge(fd, 0);
    unlink(tmpl);
    ck_assert_int_eq(pb_write_all(fd, p, n), 0);
    ck_assert_int_eq(pb_write_all(fd, p, 0), 0);
    ck_assert_int_eq(pread(fd, back, n + 1, 0), (ssize_t)n);
    ck_assert_mem_eq(back, p, n);
    close(fd);

    int pfd[2];
    ck_assert_int_eq(pipe2(pfd, O_NONBLOCK), 0);
    ck_assert_int_eq(pb_write_all(pfd[1], p, n), -EAGAIN);
    ssize_t got = read(pfd[0], back, n);
    ck_assert_int_gt(got, 0);
    ck_assert_int_lt(got, (ssize_t)n);
    ck_assert_mem_eq(back, p, (size_t)got); /* the part that fitted, in order */
    close(pfd[0]);
    close(pfd[1]);

    fd = open("/dev/full", O_WRONLY | O_CLOEXEC);
    if (fd >= 0) {
        ck_assert_int_eq(pb_write_all(fd, p, 10), -ENOSPC);
        close(fd);
    }
    ck_assert_int_eq(pb_write_all(-1, p, 10), -EBADF);
    ck_assert_int_eq(pb_write_all(-1, p, 0), 0); /* nothing to write: no call */
    free(p);
    free(back);
}
END_TEST

START_TEST(test_split_host_port)
{
    char host[64];
    uint16_t port;
    ck_assert_int_eq(pb_split_host_port("127.0.0.1:8010", host, sizeof(host), &port), 0);
    ck_assert_str_eq(host, "127.0.0.1");
    ck_assert_uint_eq(port, 8010);
    ck_assert_int_eq(pb_split_host_port("[::1]:9", host, sizeof(host), &port), 0);
    ck_assert_str_eq(host, "::1");
    ck_assert_uint_eq(port, 9);
    ck_assert_int_eq(pb_split_host_port("node2.example:1", host, sizeof(host), &port), 0);
    ck_assert_str_eq(host, "node2.example");
    ck_assert_int_eq(pb_split_host_port("noport", host, sizeof(host), &port), -EINVAL);
    ck_assert_int_eq(pb_split_host_port(":80", host, sizeof(host), &port), -EINVAL);
    ck_assert_int_eq(pb_split_host_port("a:0", host, sizeof(host), &port), -EINVAL);
    ck_assert_int_eq(pb_split_host_port("::1:80", host, sizeof(host), &port), -EINVAL);
    ck_assert_int_eq(pb_split_host_port("[::1]80", host, sizeof(host), &port), -EINVAL);
}
END_TEST

START_TEST(test_error_idiom)
{
    struct pb_error err;
    pb_error_clear(&err);
    ck_assert_int_eq(err.code, 0);
    ck_assert_int_eq(pb_error_set(&err, -EINVAL, "bad value '%s'", "x"), -EINVAL);
    ck_assert_int_eq(err.code, -EINVAL);
    ck_assert_str_eq(err.msg, "bad value 'x'");
    pb_error_prefix(&err, "%s:%d: ", "node1.conf", 3);
    ck_assert_str_eq(err.msg, "node1.conf:3: bad value 'x'");
    /* A NULL error pointer is allowed and still returns the code. */
    ck_assert_int_eq(pb_error_set(NULL, -ENOENT, "x"), -ENOENT);
}
END_TEST

START_TEST(test_log_level_parse)
{
    enum log_level l;
    ck_assert_int_eq(log_level_parse("debug", &l), 0);
    ck_assert_int_eq(l, LOG_LEVEL_DEBUG);
    ck_assert_int_eq(log_level_parse("WARNING", &l), 0);
    ck_assert_int_eq(l, LOG_LEVEL_WARNING);
    ck_assert_int_eq(log_level_parse("err", &l), 0);
    ck_assert_int_eq(l, LOG_LEVEL_ERR);
    ck_assert_int_eq(log_level_parse("loud", &l), -EINVAL);
    ck_assert_str_eq(log_level_name(LOG_LEVEL_NOTICE), "notice");
}
END_TEST

static Suite *lib_suite(void)
{
    Suite *s = suite_create("lib");
    TCase *tc = tcase_create("core");
    tcase_add_test(tc, test_buf_roundtrip);
    tcase_add_test(tc, test_cursor_short_input_fails);
    tcase_add_test(tc, test_cursor_bytes_limits);
    tcase_add_test(tc, test_buf_growth_and_steal);
    tcase_add_test(tc, test_parse_u64);
    tcase_add_test(tc, test_split_host_port);
    tcase_add_test(tc, test_write_all);
    tcase_add_test(tc, test_error_idiom);
    tcase_add_test(tc, test_log_level_parse);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(lib_suite());
    srunner_run_all(sr, CK_ENV);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}

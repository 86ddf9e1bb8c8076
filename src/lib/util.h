/*
 * util.h: allocation that cannot fail quietly, monotonic time, small helpers.
 *
 * pb_xmalloc() and friends log and abort on out-of-memory: memory exhaustion
 * is not input from outside, and every caller would otherwise need a path that
 * cannot be tested. Input sizes are bounded before they reach an allocation.
 */
#ifndef PICKBOX_LIB_UTIL_H
#define PICKBOX_LIB_UTIL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define PB_ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))
#define PB_MIN(a, b)     ((a) < (b) ? (a) : (b))
#define PB_MAX(a, b)     ((a) > (b) ? (a) : (b))

void *pb_xmalloc(size_t n);
void *pb_xcalloc(size_t nmemb, size_t size);
void *pb_xrealloc(void *p, size_t n);
/* Grows an array of nmemb elements of size to at least need elements. */
void *pb_xreallocarray(void *p, size_t nmemb, size_t size);
char *pb_xstrdup(const char *s);
char *pb_xasprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* CLOCK_MONOTONIC in milliseconds / microseconds. */
uint64_t pb_now_ms(void);
uint64_t pb_now_us(void);

/* Parses a decimal unsigned integer in [min, max]; the whole string must be a
 * number. Returns 0 or -EINVAL / -ERANGE. */
int pb_parse_u64(const char *s, uint64_t min, uint64_t max, uint64_t *out);

/* Splits "host:port" or "[v6]:port"; host is copied into host (size hostlen).
 * Returns 0 or -EINVAL. */
int pb_split_host_port(const char *s, char *host, size_t hostlen, uint16_t *port);

/* Writes all n bytes of p to fd, again after EINTR and short writes.
 * Returns 0, -errno of the failed write(2) (what came before it stays
 * written), or -EIO if write(2) returned 0. */
int pb_write_all(int fd, const void *p, size_t n);

#endif

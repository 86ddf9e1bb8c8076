/*
 * secret.c: loading and generating the cluster secret (see secret.h).
 */
#include <config.h>

#include "daemon/secret.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include "lib/util.h"
#include "net/handshake.h"

int secret_load(const char *path, uint8_t **out, size_t *len, struct pb_error *err)
{
    *out = NULL;
    *len = 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY);
    if (fd < 0) {
        int e = errno;
        return pb_error_set(err, -e, "cannot read cluster secret %s: %s", path, strerror(e));
    }
    struct stat st;
    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return pb_error_set(err, -EINVAL, "cluster secret %s is not a regular file", path);
    }
    if ((st.st_mode & 0007) != 0)
        log_warning("cluster secret %s is readable by others: chmod 600 it", path);
    uint8_t buf[NET_SECRET_MAX + 2];
    size_t n = 0;
    while (n < sizeof(buf)) {
        ssize_t r = read(fd, buf + n, sizeof(buf) - n);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            int e = errno;
            close(fd);
            return pb_error_set(err, -e, "cannot read cluster secret %s: %s", path, strerror(e));
        }
        if (r == 0)
            break;
        n += (size_t)r;
    }
    close(fd);
    while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == '\r'))
        n--;
    if (n < NET_SECRET_MIN || n > NET_SECRET_MAX)
        return pb_error_set(err, -EINVAL, "cluster secret %s must hold %u to %u bytes (it has %zu)",
                            path, (unsigned)NET_SECRET_MIN, (unsigned)NET_SECRET_MAX, n);
    *out = pb_xmalloc(n);
    memcpy(*out, buf, n);
    *len = n;
    return 0;
}

int secret_generate(const char *path, uint8_t **out, size_t *len, struct pb_error *err)
{
    uint8_t raw[SECRET_GEN_BYTES];
    size_t got = 0;
    while (got < sizeof(raw)) {
        ssize_t r = getrandom(raw + got, sizeof(raw) - got, 0);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            return pb_error_set(err, -errno, "getrandom: %s", strerror(errno));
        got += (size_t)r;
    }
    char text[2 * SECRET_GEN_BYTES + 2];
    for (size_t i = 0; i < sizeof(raw); i++)
        snprintf(text + 2 * i, 3, "%02x", raw[i]);
    text[2 * SECRET_GEN_BYTES] = '\n';
    text[2 * SECRET_GEN_BYTES + 1] = '\0';
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOCTTY, 0600);
    if (fd < 0) {
        int e = errno;
        return pb_error_set(err, -e, "cannot create cluster secret %s: %s", path, strerror(e));
    }
    size_t n = strlen(text);
    ssize_t w = write(fd, text, n);
    int e = w < 0 ? errno : EIO;
    if (w != (ssize_t)n || fsync(fd) < 0) {
        close(fd);
        unlink(path);
        return pb_error_set(err, -e, "cannot write cluster secret %s: %s", path, strerror(e));
    }
    close(fd);
    return secret_load(path, out, len, err);
}

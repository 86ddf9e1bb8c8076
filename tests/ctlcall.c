/*
 * ctlcall.c: one control-socket request from a Check test (see ctlcall.h).
 */
#include <config.h>
#include "ctlcall.h"
#include <check.h>
#include <fcntl.h>
#include <poll.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>
#include "lib/util.h"

json_t *ctlcall(struct event_base *base, const char *path, const char *line)
{
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    ck_assert_int_ge(fd, 0);
    struct sockaddr_un sun = {.sun_family = AF_UNIX};
    ck_assert_uint_lt(strlen(path), sizeof(sun.sun_path));
    memcpy(sun.sun_path, path, strlen(path) + 1);
    ck_assert_int_eq(connect(fd, (struct sockaddr *)&sun, sizeof(sun)), 0);
    ck_assert_int_eq(write(fd, line, strlen(line)), (ssize_t)strlen(line));
    ck_assert_int_eq(fcntl(fd, F_SETFL, O_NONBLOCK), 0);
    char buf[16384];
    size_t len = 0;
    uint64_t deadline = pb_now_ms() + 10000;
    while (memchr(buf, '\n', len) == NULL) {
        ck_assert_msg(pb_now_ms() < deadline, "no reply");
        ck_assert_msg(len < sizeof(buf) - 1, "reply longer than %zu bytes", sizeof(buf) - 1);
        event_base_loop(base, EVLOOP_NONBLOCK);
        ssize_t n = read(fd, buf + len, sizeof(buf) - 1 - len);
        if (n > 0)
            len += (size_t)n;
        else
            poll(NULL, 0, 1);
    }
    close(fd);
    buf[len] = '\0';
    json_t *j = json_loads(buf, 0, NULL);
    ck_assert_ptr_nonnull(j);
    return j;
}

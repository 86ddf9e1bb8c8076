/*
 * log.c: stderr logging with syslog priority prefixes (see log.h).
 */
#include "config.h"

#include "lib/log.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

static enum log_level log_level_max = LOG_LEVEL_INFO;
static int log_prefix_mode = -1;
static char log_ident[64];

static const struct {
    const char *name;
    enum log_level level;
} log_level_names[] = {
        {"error", LOG_LEVEL_ERR},    {"err", LOG_LEVEL_ERR},       {"warning", LOG_LEVEL_WARNING},
        {"warn", LOG_LEVEL_WARNING}, {"notice", LOG_LEVEL_NOTICE}, {"info", LOG_LEVEL_INFO},
        {"debug", LOG_LEVEL_DEBUG},
};

void log_set_level(enum log_level level)
{
    log_level_max = level;
}

enum log_level log_get_level(void)
{
    return log_level_max;
}

int log_level_parse(const char *s, enum log_level *level)
{
    for (size_t i = 0; i < sizeof(log_level_names) / sizeof(log_level_names[0]); i++) {
        if (strcasecmp(s, log_level_names[i].name) == 0) {
            *level = log_level_names[i].level;
            return 0;
        }
    }
    return -EINVAL;
}

const char *log_level_name(enum log_level level)
{
    for (size_t i = 0; i < sizeof(log_level_names) / sizeof(log_level_names[0]); i++) {
        if (log_level_names[i].level == level)
            return log_level_names[i].name;
    }
    return "unknown";
}

void log_set_ident(const char *ident)
{
    if (ident == NULL)
        log_ident[0] = '\0';
    else
        snprintf(log_ident, sizeof(log_ident), "%s", ident);
}

void log_set_prefix_mode(int mode)
{
    log_prefix_mode = mode;
}

void log_vmsg(enum log_level level, const char *fmt, va_list ap)
{
    if (level > log_level_max)
        return;

    int saved_errno = errno;
    char line[4096];
    size_t n = 0;
    int prefix = log_prefix_mode;
    if (prefix < 0)
        prefix = !isatty(STDERR_FILENO);

    if (prefix) {
        n = (size_t)snprintf(line, sizeof(line), "<%d>", (int)level);
    } else {
        struct timespec ts;
        struct tm tm;
        clock_gettime(CLOCK_REALTIME, &ts);
        localtime_r(&ts.tv_sec, &tm);
        n = (size_t)snprintf(line, sizeof(line), "%02d:%02d:%02d.%03ld %-7s ", tm.tm_hour,
                             tm.tm_min, tm.tm_sec, ts.tv_nsec / 1000000, log_level_name(level));
    }
    if (log_ident[0] != '\0' && n < sizeof(line))
        n += (size_t)snprintf(line + n, sizeof(line) - n, "%s: ", log_ident);
    if (n < sizeof(line)) {
        int m = vsnprintf(line + n, sizeof(line) - n, fmt, ap);
        if (m > 0)
            n += (size_t)m;
    }
    /* One line per event: a message never spans lines, and a long one is cut. */
    if (n > sizeof(line) - 2)
        n = sizeof(line) - 2;
    for (size_t i = 0; i < n; i++) {
        if (line[i] == '\n' || line[i] == '\r')
            line[i] = ' ';
    }
    line[n++] = '\n';
    ssize_t w = write(STDERR_FILENO, line, n);
    (void)w;
    errno = saved_errno;
}

void log_msg(enum log_level level, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    log_vmsg(level, fmt, ap);
    va_end(ap);
}

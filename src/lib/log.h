/*
 * log.h: one line per event on stderr.
 *
 * Lines carry syslog priority prefixes ("<6>...", daemon(7)) so that journald
 * assigns priorities when pickboxd runs under systemd. On a terminal the
 * prefix is replaced by a readable timestamp and level name. Machines grep the
 * stable key=value tail that callers append to messages.
 *
 * Threading: safe to call from any thread (each line is one write(2)).
 */
#ifndef PICKBOX_LIB_LOG_H
#define PICKBOX_LIB_LOG_H

#include <stdarg.h>

enum log_level {
    LOG_LEVEL_ERR = 3,
    LOG_LEVEL_WARNING = 4,
    LOG_LEVEL_NOTICE = 5,
    LOG_LEVEL_INFO = 6,
    LOG_LEVEL_DEBUG = 7,
};

/* Messages above this level are dropped. Default LOG_LEVEL_INFO. */
void log_set_level(enum log_level level);
enum log_level log_get_level(void);

/* Parses "error", "warning", "notice", "info", "debug" (also "err", "warn").
 * Returns 0 and sets *level, or -EINVAL. */
int log_level_parse(const char *s, enum log_level *level);
const char *log_level_name(enum log_level level);

/* An optional short tag printed before each message ("n1: ..."); NULL clears.
 * The string is copied. */
void log_set_ident(const char *ident);

/* Force the output style: 1 = priority prefixes (journal), 0 = terminal style,
 * -1 = decide from isatty(stderr) (the default). */
void log_set_prefix_mode(int mode);

#define PB_PRINTF(a, b) __attribute__((format(printf, a, b)))

void log_msg(enum log_level level, const char *fmt, ...) PB_PRINTF(2, 3);
void log_vmsg(enum log_level level, const char *fmt, va_list ap) PB_PRINTF(2, 0);

#define log_err(...)     log_msg(LOG_LEVEL_ERR, __VA_ARGS__)
#define log_warning(...) log_msg(LOG_LEVEL_WARNING, __VA_ARGS__)
#define log_notice(...)  log_msg(LOG_LEVEL_NOTICE, __VA_ARGS__)
#define log_info(...)    log_msg(LOG_LEVEL_INFO, __VA_ARGS__)
#define log_debug(...)   log_msg(LOG_LEVEL_DEBUG, __VA_ARGS__)

#endif

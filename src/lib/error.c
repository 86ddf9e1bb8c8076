/*
 * error.c: struct pb_error helpers (see error.h).
 */
#include "config.h"

#include "lib/error.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

void pb_error_clear(struct pb_error *err)
{
    if (err == NULL)
        return;
    err->code = 0;
    err->msg[0] = '\0';
}

int pb_error_set(struct pb_error *err, int code, const char *fmt, ...)
{
    if (err == NULL)
        return code;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err->msg, sizeof(err->msg), fmt, ap);
    va_end(ap);
    err->code = code;
    return code;
}

void pb_error_prefix(struct pb_error *err, const char *fmt, ...)
{
    if (err == NULL)
        return;
    char prefix[sizeof(err->msg)];
    char old[sizeof(err->msg)];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(prefix, sizeof(prefix), fmt, ap);
    va_end(ap);
    memcpy(old, err->msg, sizeof(old));
    /* Truncation is intended: the message stays one bounded line. */
    size_t pl = strnlen(prefix, sizeof(err->msg) - 1);
    size_t ol = strnlen(old, sizeof(old) - 1);
    if (ol > sizeof(err->msg) - 1 - pl)
        ol = sizeof(err->msg) - 1 - pl;
    memcpy(err->msg, prefix, pl);
    memcpy(err->msg + pl, old, ol);
    err->msg[pl + ol] = '\0';
}

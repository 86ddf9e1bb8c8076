/*
 * render.c: the result walker and the text and JSON writer backends (see
 * render.h). The walker decides what is a field and what is a table and how a
 * value reads for humans; backends only lay out what they are given.
 */
#include "config.h"

#include "pickboxctl/render.h"

#include <ctype.h>
#include <errno.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "lib/util.h"

#define RENDER_TEXT_MAX 4096 /* longest human-readable value; longer ones are cut */

/* ---- formatters ---------------------------------------------------------------- */

/* Copies s into buf, replacing control characters so a reply cannot drive the terminal. */
static void copy_printable(const char *s, char *buf, size_t len)
{
    size_t i = 0;
    for (; s[i] != '\0' && i + 1 < len; i++) {
        unsigned char c = (unsigned char)s[i];
        buf[i] = c < 0x20 || c == 0x7f ? '?' : (char)c;
    }
    buf[i] = '\0';
}

void pbctl_format_default(const json_t *v, char *buf, size_t len)
{
    switch (json_typeof(v)) {
    case JSON_STRING:
        copy_printable(json_string_value(v), buf, len);
        break;
    case JSON_INTEGER:
        snprintf(buf, len, "%" JSON_INTEGER_FORMAT, json_integer_value(v));
        break;
    case JSON_REAL:
        snprintf(buf, len, "%g", json_real_value(v));
        break;
    case JSON_TRUE:
        snprintf(buf, len, "yes");
        break;
    case JSON_FALSE:
        snprintf(buf, len, "no");
        break;
    case JSON_NULL:
        snprintf(buf, len, "-");
        break;
    case JSON_ARRAY: {
        if (json_array_size(v) == 0) {
            snprintf(buf, len, "(none)");
            break;
        }
        size_t used = 0;
        buf[0] = '\0';
        size_t i;
        const json_t *e;
        json_array_foreach(v, i, e)
        {
            if (used + 3 >= len)
                break;
            if (i > 0) {
                memcpy(buf + used, ", ", 3);
                used += 2;
            }
            pbctl_format_default(e, buf + used, len - used);
            used += strlen(buf + used);
        }
        break;
    }
    case JSON_OBJECT: {
        char *s = json_dumps(v, JSON_COMPACT | JSON_ENCODE_ANY);
        copy_printable(s ? s : "?", buf, len);
        free(s);
        break;
    }
    }
}

void pbctl_format_voter(const json_t *v, char *buf, size_t len)
{
    if (json_is_boolean(v))
        snprintf(buf, len, "%s", json_is_true(v) ? "voter" : "learner");
    else
        pbctl_format_default(v, buf, len);
}

void pbctl_format_ms_ago(const json_t *v, char *buf, size_t len)
{
    if (!json_is_integer(v) || json_integer_value(v) < 0) {
        pbctl_format_default(v, buf, len);
        return;
    }
    json_int_t ms = json_integer_value(v);
    if (ms < 1000)
        snprintf(buf, len, "%" JSON_INTEGER_FORMAT "ms ago", ms);
    else
        snprintf(buf, len, "%.1fs ago", (double)ms / 1000.0);
}

void pbctl_format_duration_s(const json_t *v, char *buf, size_t len)
{
    if (!json_is_integer(v) || json_integer_value(v) < 0) {
        pbctl_format_default(v, buf, len);
        return;
    }
    json_int_t s = json_integer_value(v);
    json_int_t d = s / 86400, h = s / 3600 % 24, m = s / 60 % 60;
    size_t used = 0;
    buf[0] = '\0';
    if (d > 0)
        used += (size_t)snprintf(buf + used, len - used, "%" JSON_INTEGER_FORMAT "d", d);
    if (used < len && (d > 0 || h > 0))
        used += (size_t)snprintf(buf + used, len - used, "%" JSON_INTEGER_FORMAT "h", h);
    if (used < len && (d > 0 || h > 0 || m > 0))
        used += (size_t)snprintf(buf + used, len - used, "%" JSON_INTEGER_FORMAT "m", m);
    if (used < len)
        snprintf(buf + used, len - used, "%" JSON_INTEGER_FORMAT "s", s % 60);
}

/* ---- the walker ------------------------------------------------------------------- */

static char *label_from_key(const char *key, bool upper)
{
    char *s = pb_xstrdup(key);
    for (char *p = s; *p; p++) {
        if (*p == '_')
            *p = ' ';
        else if (upper)
            *p = (char)toupper((unsigned char)*p);
    }
    return s;
}

static char *label_upper(const char *label)
{
    char *s = pb_xstrdup(label);
    for (char *p = s; *p; p++)
        *p = (char)toupper((unsigned char)*p);
    return s;
}

static const struct pbctl_field_spec *spec_find(const struct pbctl_field_spec *specs,
                                                const char *key)
{
    for (size_t i = 0; specs != NULL && specs[i].key != NULL; i++) {
        if (strcmp(specs[i].key, key) == 0)
            return &specs[i];
    }
    return NULL;
}

static bool array_of_objects(const json_t *v)
{
    if (!json_is_array(v))
        return false;
    size_t i;
    const json_t *e;
    json_array_foreach(v, i, e)
    {
        if (!json_is_object(e))
            return false;
    }
    return true;
}

static void format_with(const struct pbctl_field_spec *spec, const json_t *v, char *buf, size_t len)
{
    if (spec != NULL && spec->format != NULL)
        spec->format(v, buf, len);
    else
        pbctl_format_default(v, buf, len);
}

static bool row_has(const json_t *rows, const char *key)
{
    size_t i;
    const json_t *row;
    json_array_foreach(rows, i, row)
    {
        if (json_object_get(row, key) != NULL)
            return true;
    }
    return false;
}

static void render_table(struct pbctl_writer *w, const struct pbctl_field_spec *spec,
                         const char *key, const char *label, const json_t *rows)
{
    const struct pbctl_field_spec *known = spec ? spec->columns : NULL;
    size_t n = 0, cap = 8;
    struct pbctl_column *cols = pb_xreallocarray(NULL, cap, sizeof(*cols));
    const struct pbctl_field_spec **colspec = pb_xreallocarray(NULL, cap, sizeof(*colspec));

    for (size_t i = 0; known != NULL && known[i].key != NULL; i++) {
        if (!row_has(rows, known[i].key))
            continue;
        if (n == cap) {
            cap *= 2;
            cols = pb_xreallocarray(cols, cap, sizeof(*cols));
            colspec = pb_xreallocarray(colspec, cap, sizeof(*colspec));
        }
        cols[n].key = known[i].key;
        cols[n].label =
                known[i].label ? label_upper(known[i].label) : label_from_key(known[i].key, true);
        colspec[n++] = &known[i];
    }
    size_t r;
    const json_t *row;
    json_array_foreach(rows, r, row)
    {
        const char *k;
        const json_t *v;
        json_object_foreach((json_t *)row, k, v)
        {
            bool seen = false;
            for (size_t c = 0; c < n && !seen; c++)
                seen = strcmp(cols[c].key, k) == 0;
            if (seen)
                continue;
            if (n == cap) {
                cap *= 2;
                cols = pb_xreallocarray(cols, cap, sizeof(*cols));
                colspec = pb_xreallocarray(colspec, cap, sizeof(*colspec));
            }
            cols[n].key = k;
            cols[n].label = label_from_key(k, true);
            colspec[n++] = NULL;
        }
    }

    w->ops->table_begin(w, key, label, cols, n);
    const json_t **values = pb_xcalloc(n ? n : 1, sizeof(*values));
    char **texts = pb_xcalloc(n ? n : 1, sizeof(*texts));
    for (size_t c = 0; c < n; c++)
        texts[c] = pb_xmalloc(RENDER_TEXT_MAX);
    json_array_foreach(rows, r, row)
    {
        for (size_t c = 0; c < n; c++) {
            values[c] = json_object_get(row, cols[c].key);
            if (values[c] != NULL)
                format_with(colspec[c], values[c], texts[c], RENDER_TEXT_MAX);
            else
                snprintf(texts[c], RENDER_TEXT_MAX, "-");
        }
        w->ops->table_row(w, values, (const char *const *)texts);
    }
    w->ops->table_end(w);

    for (size_t c = 0; c < n; c++) {
        free(texts[c]);
        free((char *)cols[c].label);
    }
    free(texts);
    free(values);
    free(colspec);
    free(cols);
}

static void render_one(struct pbctl_writer *w, const struct pbctl_field_spec *spec, const char *key,
                       const json_t *v)
{
    char *label = spec && spec->label ? pb_xstrdup(spec->label) : label_from_key(key, false);
    bool table = array_of_objects(v) && (json_array_size(v) > 0 || (spec && spec->columns));
    if (table) {
        render_table(w, spec, key, label, v);
    } else if (json_is_object(v) && json_object_size(v) > 0 && (spec == NULL || !spec->format)) {
        w->ops->field(w, key, label, v, NULL); /* the backend lays out its members */
    } else {
        char *text = pb_xmalloc(RENDER_TEXT_MAX);
        format_with(spec, v, text, RENDER_TEXT_MAX);
        w->ops->field(w, key, label, v, text);
        free(text);
    }
    free(label);
}

int pbctl_render(const struct pbctl_field_spec *view, const json_t *result, struct pbctl_writer *w)
{
    for (size_t i = 0; view != NULL && view[i].key != NULL; i++) {
        const json_t *v = json_object_get(result, view[i].key);
        if (v != NULL)
            render_one(w, &view[i], view[i].key, v);
    }
    const char *key;
    const json_t *v;
    json_object_foreach((json_t *)result, key, v)
    {
        if (spec_find(view, key) == NULL)
            render_one(w, NULL, key, v);
    }
    return w->ops->finish(w);
}

void pbctl_writer_free(struct pbctl_writer *w)
{
    if (w != NULL)
        w->ops->free(w);
}

/* ---- text backend ------------------------------------------------------------------ */

struct text_item {
    char *label;
    char *text;   /* a field's value; NULL for a table */
    size_t ncols; /* table: columns */
    char **cells; /* table: (1 + nrows) * ncols strings, headers first */
    size_t nrows;
};

struct text_writer {
    struct pbctl_writer base;
    struct text_item *items;
    size_t n;
};

static struct text_item *text_add(struct text_writer *t, const char *label)
{
    t->items = pb_xreallocarray(t->items, t->n + 1, sizeof(*t->items));
    struct text_item *it = &t->items[t->n++];
    memset(it, 0, sizeof(*it));
    it->label = pb_xstrdup(label);
    return it;
}

static void text_field(struct pbctl_writer *w, const char *key, const char *label,
                       const json_t *value, const char *text)
{
    struct text_writer *t = (struct text_writer *)w;
    if (text != NULL) {
        text_add(t, label)->text = pb_xstrdup(text);
        return;
    }
    /* An object ("tree": {...}): one line per member, "tree files: 3",
     * rather than its JSON on one line (nested objects stay JSON). */
    const char *sub;
    const json_t *v;
    json_object_foreach((json_t *)value, sub, v)
    {
        char *sublabel = label_from_key(sub, false);
        char *full = pb_xasprintf("%s %s", label, sublabel);
        char *buf = pb_xmalloc(RENDER_TEXT_MAX);
        format_with(NULL, v, buf, RENDER_TEXT_MAX);
        text_add(t, full)->text = buf;
        free(full);
        free(sublabel);
    }
    (void)key;
}

static void text_table_begin(struct pbctl_writer *w, const char *key, const char *label,
                             const struct pbctl_column *cols, size_t ncols)
{
    struct text_writer *t = (struct text_writer *)w;
    struct text_item *it = text_add(t, label);
    it->ncols = ncols;
    it->cells = pb_xcalloc(ncols ? ncols : 1, sizeof(char *));
    for (size_t c = 0; c < ncols; c++)
        it->cells[c] = pb_xstrdup(cols[c].label);
}

static void text_table_row(struct pbctl_writer *w, const json_t *const *values,
                           const char *const *texts)
{
    struct text_writer *t = (struct text_writer *)w;
    struct text_item *it = &t->items[t->n - 1];
    size_t at = (1 + it->nrows) * it->ncols;
    it->cells = pb_xreallocarray(it->cells, at + (it->ncols ? it->ncols : 1), sizeof(char *));
    for (size_t c = 0; c < it->ncols; c++)
        it->cells[at + c] = pb_xstrdup(texts[c]);
    it->nrows++;
}

static void text_table_end(struct pbctl_writer *w)
{
}

static void text_print_table(FILE *out, const struct text_item *it)
{
    size_t *width = pb_xcalloc(it->ncols, sizeof(*width));
    for (size_t r = 0; r <= it->nrows; r++) {
        for (size_t c = 0; c < it->ncols; c++)
            width[c] = PB_MAX(width[c], strlen(it->cells[r * it->ncols + c]));
    }
    for (size_t r = 0; r <= it->nrows; r++) {
        fputs("  ", out);
        for (size_t c = 0; c < it->ncols; c++) {
            const char *cell = it->cells[r * it->ncols + c];
            if (c + 1 == it->ncols)
                fputs(cell, out);
            else
                fprintf(out, "%-*s  ", (int)width[c], cell);
        }
        fputc('\n', out);
    }
    free(width);
}

static int text_finish(struct pbctl_writer *w)
{
    struct text_writer *t = (struct text_writer *)w;
    size_t lw = 0;
    for (size_t i = 0; i < t->n; i++) {
        if (t->items[i].text != NULL)
            lw = PB_MAX(lw, strlen(t->items[i].label) + 1);
    }
    /* "key: value lines, then the tables": fields first, each group in order. */
    for (size_t i = 0; i < t->n; i++) {
        const struct text_item *it = &t->items[i];
        if (it->text != NULL)
            fprintf(w->out, "%s:%*s %s\n", it->label, (int)(lw - strlen(it->label) - 1), "",
                    it->text);
    }
    for (size_t i = 0; i < t->n; i++) {
        const struct text_item *it = &t->items[i];
        if (it->text != NULL)
            continue;
        if (it->nrows == 0) {
            fprintf(w->out, "%s: (none)\n", it->label);
        } else {
            fprintf(w->out, "%s:\n", it->label);
            text_print_table(w->out, it);
        }
    }
    if (fflush(w->out) != 0 || ferror(w->out))
        return -EIO;
    return 0;
}

static void text_free(struct pbctl_writer *w)
{
    struct text_writer *t = (struct text_writer *)w;
    for (size_t i = 0; i < t->n; i++) {
        struct text_item *it = &t->items[i];
        free(it->label);
        free(it->text);
        if (it->text == NULL) {
            for (size_t c = 0; c < (1 + it->nrows) * it->ncols; c++)
                free(it->cells[c]);
        }
        free(it->cells);
    }
    free(t->items);
    free(t);
}

static const struct pbctl_writer_ops text_ops = {
        .field = text_field,
        .table_begin = text_table_begin,
        .table_row = text_table_row,
        .table_end = text_table_end,
        .finish = text_finish,
        .free = text_free,
};

struct pbctl_writer *pbctl_writer_text_new(FILE *out)
{
    struct text_writer *t = pb_xcalloc(1, sizeof(*t));
    t->base.ops = &text_ops;
    t->base.out = out;
    return &t->base;
}

bool pbctl_writer_is_text(const struct pbctl_writer *w)
{
    return w->ops == &text_ops;
}

/* ---- JSON backend ------------------------------------------------------------------- */

struct json_writer {
    struct pbctl_writer base;
    json_t *root;
    json_t *table; /* the array being filled */
    char *table_key;
    struct pbctl_column *cols;
    size_t ncols;
};

static void json_w_field(struct pbctl_writer *w, const char *key, const char *label,
                         const json_t *value, const char *text)
{
    struct json_writer *j = (struct json_writer *)w;
    json_object_set_new(j->root, key, json_deep_copy(value));
}

static void json_w_table_begin(struct pbctl_writer *w, const char *key, const char *label,
                               const struct pbctl_column *cols, size_t ncols)
{
    struct json_writer *j = (struct json_writer *)w;
    j->table = json_array();
    j->table_key = pb_xstrdup(key);
    j->cols = pb_xcalloc(ncols ? ncols : 1, sizeof(*j->cols));
    for (size_t c = 0; c < ncols; c++)
        j->cols[c].key = pb_xstrdup(cols[c].key);
    j->ncols = ncols;
}

static void json_w_table_row(struct pbctl_writer *w, const json_t *const *values,
                             const char *const *texts)
{
    struct json_writer *j = (struct json_writer *)w;
    json_t *row = json_object();
    for (size_t c = 0; c < j->ncols; c++) {
        if (values[c] != NULL)
            json_object_set_new(row, j->cols[c].key, json_deep_copy(values[c]));
    }
    json_array_append_new(j->table, row);
}

static void json_w_table_end(struct pbctl_writer *w)
{
    struct json_writer *j = (struct json_writer *)w;
    json_object_set_new(j->root, j->table_key, j->table);
    j->table = NULL;
    for (size_t c = 0; c < j->ncols; c++)
        free((char *)j->cols[c].key);
    free(j->cols);
    free(j->table_key);
    j->cols = NULL;
    j->table_key = NULL;
    j->ncols = 0;
}

static int json_w_finish(struct pbctl_writer *w)
{
    struct json_writer *j = (struct json_writer *)w;
    if (json_dumpf(j->root, w->out, JSON_COMPACT) < 0)
        return -EIO;
    fputc('\n', w->out);
    if (fflush(w->out) != 0 || ferror(w->out))
        return -EIO;
    return 0;
}

static void json_w_free(struct pbctl_writer *w)
{
    struct json_writer *j = (struct json_writer *)w;
    json_decref(j->root);
    json_decref(j->table);
    for (size_t c = 0; c < j->ncols; c++)
        free((char *)j->cols[c].key);
    free(j->cols);
    free(j->table_key);
    free(j);
}

static const struct pbctl_writer_ops json_ops = {
        .field = json_w_field,
        .table_begin = json_w_table_begin,
        .table_row = json_w_table_row,
        .table_end = json_w_table_end,
        .finish = json_w_finish,
        .free = json_w_free,
};

struct pbctl_writer *pbctl_writer_json_new(FILE *out)
{
    struct json_writer *j = pb_xcalloc(1, sizeof(*j));
    j->base.ops = &json_ops;
    j->base.out = out;
    j->root = json_object();
    return &j->base;
}

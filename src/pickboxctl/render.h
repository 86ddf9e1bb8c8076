/*
 * render.h: pickboxctl's one output path (after lldpd's writer and bgpctl's
 * output vtable).
 *
 * A reply's result object is walked once by pbctl_render(), guided by a view
 * (labels, order, formatters, table columns). The walk calls a writer through
 * struct pbctl_writer_ops; the text backend prints "label: value" lines and
 * aligned tables, the JSON backend rebuilds the object from the same calls.
 * Fields the view does not name are still walked (after the named ones, with
 * labels derived from their keys), so the JSON output always equals the result
 * (json_equal; key order follows the view) and the table shows every field:
 * the two cannot drift apart.
 *
 * Value mapping: an array of objects is a table (columns = the view's columns
 * present in some row, then any other keys in first-seen order); every other
 * value is a field. Text: strings as is (control characters shown as '?'),
 * integers in decimal, true/false as yes/no, null as '-', arrays of scalars
 * comma-separated, an empty array as "(none)", nested objects as compact JSON.
 *
 * Threading: none; a writer is used by one thread.
 */
#ifndef PICKBOX_PICKBOXCTL_RENDER_H
#define PICKBOX_PICKBOXCTL_RENDER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>

#include <jansson.h>

struct pbctl_writer;

/* Formats v (never NULL) for humans into buf (always NUL-terminated). */
typedef void (*pbctl_format_fn)(const json_t *v, char *buf, size_t len);

/* One named field (or table column) of a view. */
struct pbctl_field_spec {
    const char *key;
    const char *label;      /* NULL: derived from key ("commit_index" -> "commit index") */
    pbctl_format_fn format; /* NULL: the default text mapping */
    const struct pbctl_field_spec *columns; /* for an array of objects: known columns,
                                               terminated by a {NULL} entry; may be NULL */
};

/* A column handed to the writer (labels are final: upper case for tables). */
struct pbctl_column {
    const char *key;
    const char *label;
};

struct pbctl_writer_ops {
    /* A scalar, scalar-array or object field; text is its human form, or
     * NULL for a non-empty object with no formatter (the backend lays out
     * its members: the text backend one line each, "tree files: 3"). */
    void (*field)(struct pbctl_writer *w, const char *key, const char *label, const json_t *value,
                  const char *text);
    /* A table of ncols columns follows, then table_row() per row, then table_end(). */
    void (*table_begin)(struct pbctl_writer *w, const char *key, const char *label,
                        const struct pbctl_column *cols, size_t ncols);
    /* values[i]/texts[i] belong to cols[i]; values[i] == NULL: absent in this row. */
    void (*table_row)(struct pbctl_writer *w, const json_t *const *values,
                      const char *const *texts);
    void (*table_end)(struct pbctl_writer *w);
    /* Writes everything to the stream. Returns 0 or a negative errno. */
    int (*finish)(struct pbctl_writer *w);
    void (*free)(struct pbctl_writer *w);
};

struct pbctl_writer {
    const struct pbctl_writer_ops *ops;
    FILE *out; /* borrowed */
};

/* Backends. out is borrowed; nothing is written before finish(). Never NULL. */
struct pbctl_writer *pbctl_writer_text_new(FILE *out);
struct pbctl_writer *pbctl_writer_json_new(FILE *out);
/* Frees w (NULL allowed). */
void pbctl_writer_free(struct pbctl_writer *w);
/* True if w is the text backend (a command may then print preformatted
 * text as is). */
bool pbctl_writer_is_text(const struct pbctl_writer *w);

/* Walks result (an object) along view (a {NULL}-terminated array, or NULL for
 * no named fields) into w, then calls finish. Returns finish's result. */
int pbctl_render(const struct pbctl_field_spec *view, const json_t *result, struct pbctl_writer *w);

/* The shape of pbctl_render(), for commands that need their own walk. */
typedef int (*pbctl_render_fn)(const struct pbctl_field_spec *view, const json_t *result,
                               struct pbctl_writer *w);

/* Formatters for views. */
void pbctl_format_default(const json_t *v, char *buf, size_t len);
void pbctl_format_voter(const json_t *v, char *buf, size_t len);  /* true: voter, false: learner */
void pbctl_format_ms_ago(const json_t *v, char *buf, size_t len); /* 1500 -> "1.5s ago" */
void pbctl_format_duration_s(const json_t *v, char *buf, size_t len); /* 3725 -> "1h2m5s" */

#endif

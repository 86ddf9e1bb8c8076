/*
 * watch.c: inotify -> candidate changes, see watch.h for the contract.
 *
 * The model is a tree of nodes, one per path the watcher knows (directories
 * carry their inotify watch descriptor). A node's name and parent change on
 * rename, so the wd -> path map of a renamed directory's whole subtree is
 * fixed up by moving one node. Each node remembers what was last reported to
 * the owner (`rep`, `reported`). Events only mark nodes dirty; when a node's
 * debounce expires it is lstat'ed and compared with `rep`, and a candidate is
 * emitted only for a difference. Renames of reported nodes become records in
 * a FIFO, emitted when due or before any other candidate; a record's paths
 * are computed in the owner's view (ancestors whose own renames are still
 * pending use their old location).
 *
 * Collapsing (why editor saves give one candidate): an unreported node
 * renamed over a reported one inherits its `rep` (temp file over target ->
 * one UPSERT); a reported node deleted or moved out while its own rename is
 * still pending hands its `rep` back to its old slot (vim: "f -> f~, new f,
 * rm f~" -> the new f inherits -> one UPSERT), unless the rename replaced a
 * known path or other pending renames involve it; then everything pending is
 * emitted in order instead. The randomized test in check_watch.c checks that
 * an owner applying the candidates always ends up with the tree on disk.
 *
 * Every lookup into the tree goes through openat2(RESOLVE_BENEATH |
 * RESOLVE_NO_SYMLINKS) when available, and watches are added on the opened
 * directory (/proc/self/fd), so a symlink swapped in is never followed.
 *
 * Invariant: a node referenced by a pending rename record (as the renamed
 * node or as its old parent) or by a stash entry (a MOVED_FROM waiting for
 * its MOVED_TO) is never freed before the record is emitted or dropped and
 * the stash entry is resolved; node_free_tree() enforces it.
 */
#include "config.h"

#include "watch/watch.h"

#include <assert.h>
#include <dirent.h>
#include <errno.h>
#include <event2/event.h>
#include <fcntl.h>
#include <fnmatch.h>
#include <inttypes.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/inotify.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>
#if defined(__has_include)
#if __has_include(<linux/openat2.h>)
#include <linux/openat2.h>
#define WATCH_HAVE_OPENAT2 1
#endif
#endif

#include "lib/log.h"
#include "lib/util.h"

#define WATCH_DIR_MASK                                                                             \
    (IN_CLOSE_WRITE | IN_MODIFY | IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO |            \
     IN_ATTRIB | IN_DELETE_SELF | IN_MOVE_SELF | IN_DONT_FOLLOW | IN_EXCL_UNLINK | IN_ONLYDIR)

/* Why a node is dirty. */
enum {
    R_CREATE = 1u << 0,
    R_CONTENT = 1u << 1,
    R_ATTRIB = 1u << 2,
    R_MOVED = 1u << 3,
    R_GONE = 1u << 4,
    R_RESCAN = 1u << 5,
};

/* Reads per inotify callback before yielding to the loop (level-triggered,
 * so the rest is read on the next iteration). */
#define WATCH_MAX_READS 256
/* A sliced scan yields after this long even when its slice is not used up. */
#define WATCH_SCAN_SLICE_MS 5
#define WATCH_TMP_PREFIX    ".pickbox.tmp."
#define WATCH_MARKER_DIR    ".pickbox"

struct wnode;

enum walk_mode {
    WALK_NEW,  /* a new directory: everything inside is marked dirty */
    WALK_FULL, /* full rescan: everything emitted (nodes were reset) */
    WALK_DIFF, /* safety rescan: differences emitted, missing ones removed */
};

/* A stack of nodes (directories still to read). */
struct wstack {
    struct wnode **v;
    size_t n, cap;
};

/* A sliced walk in progress (see "sliced scans" below). */
struct wscan {
    bool active;
    bool root; /* of the whole tree */
    enum walk_mode mode;
    char *end_path; /* RESCAN_END path of a full rescan, else NULL */
    struct wstack stack;
    struct wnode *cur; /* the directory being read, as dir */
    DIR *dir;
    uint64_t gen, t0, candidates0;
};

struct wlist {
    struct wnode *head, *tail;
    size_t n;
};

struct wrec {
    struct wrec *next, *prev;
    struct wnode *node;        /* renamed node (its current location is the new path) */
    struct wnode *from_parent; /* old location, as the owner knows it */
    char *from_name;
    uint64_t due_ms;
    bool replaced; /* the rename replaced something the owner knows */
};

struct wstash {
    struct wstash *next;
    uint32_t cookie;
    struct wnode *node;   /* detached node (parent/name = old location), or NULL */
    struct wnode *parent; /* node == NULL: where the unknown name was */
    char *name;
    uint64_t due_ms;
};

struct wnode {
    struct wnode *parent;
    struct wnode *hnext;                       /* name hash chain */
    struct wnode *wnext;                       /* wd hash chain */
    struct wnode *child, *sib_next, *sib_prev; /* children */
    struct wnode *dnext, *dprev;               /* dirty / ready list */
    struct wlist *dlist;                       /* the list it is on, or NULL */
    struct wrec *rec;                          /* pending rename */
    char *name;
    size_t namelen;
    char *target; /* reported symlink target */
    struct watch_stat rep;
    uint64_t first_ms, last_ms;
    uint64_t seen_gen;
    int wd;
    unsigned reasons;
    bool reported, attached, write_open, unwatched;
    bool closed;      /* its last event was IN_CLOSE_WRITE: settle_ms applies */
    bool scan_queued; /* on the sliced scan's stack, or being read by it */
};

struct whold {
    char *path;
    unsigned count;
};

struct wpattern {
    char *glob;
    bool has_slash;
    bool dir_only;
};

struct wpath {
    char *p;
    size_t cap;
};

struct watch {
    struct event_base *base;
    char *root; /* absolute, no trailing '/' (except "/") */
    int rootfd;
    int ifd;
    struct event *ev_read, *ev_timer, *ev_periodic, *ev_retry, *ev_deferred, *ev_scan;
    watch_cb cb;
    void *arg;
    struct watch_options o;
    struct wpattern *pats;
    size_t npats;

    struct wnode *rootn;
    struct wnode **nb; /* name hash */
    size_t nb_n, nnodes;
    struct wnode **wb; /* wd hash */
    size_t wb_n, nwatches;

    struct wlist dirty, ready;
    struct wrec *rec_head, *rec_tail;
    struct wstash *stash;
    struct whold *holds;
    size_t nholds;
    char **rescan_req;
    size_t nrescan_req;
    bool need_full;

    struct wpath pb[3];
    const char **comps;
    size_t * compl ;
    size_t comps_cap;
    struct wstack stack;
    struct wscan scan;

    uint64_t gen;
    uint64_t timer_due;
    bool timer_armed;
    uint32_t retry_ms;
    bool retry_armed;
    bool warned_watch;
    bool in_cb;
    bool freeing;
    unsigned rec_emitting;
    unsigned walking;
    uint64_t full_end_ms, full_dur_ms; /* the last full rescan of the root */
    struct watch_stats st;

    _Alignas(struct inotify_event) char ibuf[64 * 1024];
};

/* ---- small helpers ---------------------------------------------------- */

static uint64_t hash_bytes(const void *p, size_t n, uint64_t h)
{
    const unsigned char *s = p;
    for (size_t i = 0; i < n; i++) {
        h ^= s[i];
        h *= 0x100000001b3ull;
    }
    return h;
}

static size_t name_hash(const struct wnode *parent, const char *name, size_t len, size_t nb)
{
    uintptr_t pv = (uintptr_t)parent;
    uint64_t h = hash_bytes(&pv, sizeof(pv), 0xcbf29ce484222325ull);
    h = hash_bytes(name, len, h);
    return (size_t)(h ^ (h >> 29)) & (nb - 1);
}

static size_t wd_hash(int wd, size_t nb)
{
    return ((size_t)(unsigned)wd * 0x9e3779b1u) & (nb - 1);
}

void watch_stat_from_stat(struct watch_stat *ws, const struct stat *st)
{
    memset(ws, 0, sizeof(*ws));
    if (S_ISREG(st->st_mode))
        ws->type = WATCH_TYPE_FILE;
    else if (S_ISDIR(st->st_mode))
        ws->type = WATCH_TYPE_DIR;
    else if (S_ISLNK(st->st_mode))
        ws->type = WATCH_TYPE_SYMLINK;
    else
        ws->type = WATCH_TYPE_OTHER;
    ws->mode = (uint32_t)st->st_mode;
    ws->size = (uint64_t)st->st_size;
    ws->ino = (uint64_t)st->st_ino;
    ws->nlink = (uint64_t)st->st_nlink;
    ws->mtime_ns = (int64_t)st->st_mtim.tv_sec * 1000000000 + st->st_mtim.tv_nsec;
    ws->ctime_ns = (int64_t)st->st_ctim.tv_sec * 1000000000 + st->st_ctim.tv_nsec;
}

void watch_options_init(struct watch_options *o)
{
    memset(o, 0, sizeof(*o));
    o->debounce_ms = 30;
    o->write_hold_ms = 1000;
    o->max_delay_ms = 5000;
    o->rename_window_ms = 10;
    o->rescan_interval_ms = 600000;
    o->retry_min_ms = 1000;
    o->retry_max_ms = 300000;
    o->scan_slice = 1024;
    o->settle_ms = 5;
}

/* ---- lists ------------------------------------------------------------ */

static void list_unlink(struct wnode *n)
{
    struct wlist *l = n->dlist;
    if (!l)
        return;
    if (n->dprev)
        n->dprev->dnext = n->dnext;
    else
        l->head = n->dnext;
    if (n->dnext)
        n->dnext->dprev = n->dprev;
    else
        l->tail = n->dprev;
    n->dnext = n->dprev = NULL;
    n->dlist = NULL;
    l->n--;
}

static void list_append(struct wlist *l, struct wnode *n)
{
    assert(!n->dlist);
    n->dprev = l->tail;
    n->dnext = NULL;
    if (l->tail)
        l->tail->dnext = n;
    else
        l->head = n;
    l->tail = n;
    n->dlist = l;
    l->n++;
}

/* ---- paths ------------------------------------------------------------ */

static char *wpath_reserve(struct wpath *b, size_t n)
{
    if (n + 1 > b->cap) {
        b->cap = PB_MAX(n + 1, b->cap * 2);
        b->p = pb_xrealloc(b->p, b->cap);
    }
    return b->p;
}

/* Builds "<path of parent>/<leaf>" into slot. With owner_view, ancestors
 * whose rename is still pending contribute their old location. parent NULL
 * or the root gives just the leaf; leaf NULL gives the parent's own path. */
static const char *path_build(struct watch *w, int slot, const struct wnode *parent,
                              const char *leaf, size_t leaflen, bool owner_view)
{
    size_t nc = 0, total = 0;
    if (leaf) {
        if (nc == w->comps_cap) {
            w->comps_cap = w->comps_cap ? w->comps_cap * 2 : 32;
            w->comps = pb_xreallocarray(w->comps, w->comps_cap, sizeof(*w->comps));
            w->compl = pb_xreallocarray(w->compl, w->comps_cap, sizeof(*w->compl ));
        }
        w->comps[nc] = leaf;
        w->compl [nc++] = leaflen;
        total += leaflen;
    }
    const struct wnode *x = parent;
    while (x && x != w->rootn) {
        const char *c;
        size_t cl;
        if (owner_view && x->rec) {
            c = x->rec->from_name;
            cl = strlen(c);
            x = x->rec->from_parent;
        } else {
            c = x->name;
            cl = x->namelen;
            x = x->parent;
        }
        if (nc == w->comps_cap) {
            w->comps_cap = w->comps_cap ? w->comps_cap * 2 : 32;
            w->comps = pb_xreallocarray(w->comps, w->comps_cap, sizeof(*w->comps));
            w->compl = pb_xreallocarray(w->compl, w->comps_cap, sizeof(*w->compl ));
        }
        w->comps[nc] = c;
        w->compl [nc++] = cl;
        total += cl;
    }
    if (nc > 1)
        total += nc - 1;
    char *out = wpath_reserve(&w->pb[slot], total);
    size_t off = 0;
    for (size_t i = nc; i-- > 0;) {
        memcpy(out + off, w->comps[i], w->compl [i]);
        off += w->compl [i];
        if (i)
            out[off++] = '/';
    }
    out[off] = '\0';
    return out;
}

static const char *node_path(struct watch *w, int slot, const struct wnode *n)
{
    if (n == w->rootn) {
        wpath_reserve(&w->pb[slot], 0)[0] = '\0';
        return w->pb[slot].p;
    }
    return path_build(w, slot, n->parent, n->name, n->namelen, false);
}

/* For syscalls relative to rootfd. */
static const char *rel_or_dot(const char *p)
{
    return *p ? p : ".";
}

/* ---- hash tables and the tree ----------------------------------------- */

static struct wnode *node_lookup(struct watch *w, const struct wnode *parent, const char *name,
                                 size_t len)
{
    for (struct wnode *n = w->nb[name_hash(parent, name, len, w->nb_n)]; n; n = n->hnext)
        if (n->parent == parent && n->namelen == len && memcmp(n->name, name, len) == 0)
            return n;
    return NULL;
}

static void nhash_grow(struct watch *w)
{
    size_t nn = w->nb_n * 2;
    struct wnode **nb = pb_xcalloc(nn, sizeof(*nb));
    for (size_t i = 0; i < w->nb_n; i++) {
        struct wnode *n = w->nb[i];
        while (n) {
            struct wnode *next = n->hnext;
            size_t h = name_hash(n->parent, n->name, n->namelen, nn);
            n->hnext = nb[h];
            nb[h] = n;
            n = next;
        }
    }
    free(w->nb);
    w->nb = nb;
    w->nb_n = nn;
}

/* Links n under parent with its current name. */
static void node_attach(struct watch *w, struct wnode *n, struct wnode *parent)
{
    assert(!n->attached);
    n->parent = parent;
    size_t h = name_hash(parent, n->name, n->namelen, w->nb_n);
    n->hnext = w->nb[h];
    w->nb[h] = n;
    n->sib_prev = NULL;
    n->sib_next = parent->child;
    if (parent->child)
        parent->child->sib_prev = n;
    parent->child = n;
    n->attached = true;
}

/* Unlinks n from its parent; n->parent and n->name still say where it was. */
static void node_detach(struct watch *w, struct wnode *n)
{
    if (!n->attached)
        return;
    struct wnode **pp = &w->nb[name_hash(n->parent, n->name, n->namelen, w->nb_n)];
    while (*pp != n)
        pp = &(*pp)->hnext;
    *pp = n->hnext;
    n->hnext = NULL;
    if (n->sib_prev)
        n->sib_prev->sib_next = n->sib_next;
    else
        n->parent->child = n->sib_next;
    if (n->sib_next)
        n->sib_next->sib_prev = n->sib_prev;
    n->sib_next = n->sib_prev = NULL;
    n->attached = false;
}

static struct wnode *node_new(struct watch *w, struct wnode *parent, const char *name, size_t len)
{
    struct wnode *n = pb_xcalloc(1, sizeof(*n));
    n->name = pb_xmalloc(len + 1);
    memcpy(n->name, name, len);
    n->name[len] = '\0';
    n->namelen = len;
    n->wd = -1;
    if (w->nnodes + 1 > w->nb_n)
        nhash_grow(w);
    node_attach(w, n, parent);
    w->nnodes++;
    return n;
}

static void node_rename(struct wnode *n, const char *name, size_t len)
{
    free(n->name);
    n->name = pb_xmalloc(len + 1);
    memcpy(n->name, name, len);
    n->name[len] = '\0';
    n->namelen = len;
}

static struct wnode *wd_lookup(struct watch *w, int wd)
{
    for (struct wnode *n = w->wb[wd_hash(wd, w->wb_n)]; n; n = n->wnext)
        if (n->wd == wd)
            return n;
    return NULL;
}

static void wd_insert(struct watch *w, struct wnode *n)
{
    if (w->nwatches + 1 > w->wb_n) {
        size_t nn = w->wb_n * 2;
        struct wnode **nb = pb_xcalloc(nn, sizeof(*nb));
        for (size_t i = 0; i < w->wb_n; i++) {
            struct wnode *x = w->wb[i];
            while (x) {
                struct wnode *next = x->wnext;
                size_t h = wd_hash(x->wd, nn);
                x->wnext = nb[h];
                nb[h] = x;
                x = next;
            }
        }
        free(w->wb);
        w->wb = nb;
        w->wb_n = nn;
    }
    size_t h = wd_hash(n->wd, w->wb_n);
    n->wnext = w->wb[h];
    w->wb[h] = n;
    w->nwatches++;
}

/* Forgets n's wd (the kernel removed the watch or will). */
static void wd_remove(struct watch *w, struct wnode *n)
{
    if (n->wd < 0)
        return;
    struct wnode **pp = &w->wb[wd_hash(n->wd, w->wb_n)];
    while (*pp && *pp != n)
        pp = &(*pp)->wnext;
    if (*pp) {
        *pp = n->wnext;
        w->nwatches--;
    }
    n->wnext = NULL;
    n->wd = -1;
}

static bool node_within(const struct wnode *x, const struct wnode *top)
{
    for (; x; x = x->parent)
        if (x == top)
            return true;
    return false;
}

static unsigned node_depth(const struct wnode *n)
{
    unsigned d = 0;
    for (; n && n->parent; n = n->parent)
        d++;
    return d;
}

/* ---- emission --------------------------------------------------------- */

static void deliver(struct watch *w, const struct watch_change *c)
{
    w->st.candidates++;
    if (c->kind == WATCH_UNSUPPORTED)
        w->st.unsupported++;
    w->in_cb = true;
    w->cb(c, w->arg);
    w->in_cb = false;
}

static void rec_unlink(struct watch *w, struct wrec *r)
{
    if (r->prev)
        r->prev->next = r->next;
    else
        w->rec_head = r->next;
    if (r->next)
        r->next->prev = r->prev;
    else
        w->rec_tail = r->prev;
    r->node->rec = NULL;
    free(r->from_name);
    free(r);
}

static void rec_new(struct watch *w, struct wnode *n, struct wnode *from_parent,
                    const char *from_name, uint64_t now)
{
    struct wrec *r = pb_xcalloc(1, sizeof(*r));
    r->node = n;
    r->from_parent = from_parent;
    r->from_name = pb_xstrdup(from_name);
    r->due_ms = now + w->o.debounce_ms;
    r->prev = w->rec_tail;
    if (w->rec_tail)
        w->rec_tail->next = r;
    else
        w->rec_head = r;
    w->rec_tail = r;
    n->rec = r;
}

/* Emits the oldest pending rename. Earlier records are already emitted, so
 * the owner's view is "current state minus the still pending records". */
static void node_sync(struct watch *w, struct wnode *n, const struct stat *st, char *target,
                      unsigned reasons, bool rescan);
static void wstack_push(struct wstack *s, struct wnode *n);
static void scan_push(struct watch *w, struct wnode *n);
static void scan_forget(struct watch *w, struct wnode *n);
static void subtree_unreport(struct wnode *n);
static int tree_lstat(struct watch *w, const char *rel, struct stat *st, char **target);

/* Before a rename into a directory the owner does not know as a directory
 * yet (created or replaced since), report that directory. false when a
 * destination ancestor is no directory on disk any more. */
static bool rec_settle_dest(struct watch *w, struct wnode *n)
{
    size_t base = w->stack.n;
    for (struct wnode *x = n->parent; x && x != w->rootn; x = x->parent)
        wstack_push(&w->stack, x);
    bool ok = true;
    while (w->stack.n > base) {
        struct wnode *x = w->stack.v[--w->stack.n]; /* top-most first */
        if (!ok || (x->reported && x->rep.type == WATCH_TYPE_DIR))
            continue;
        struct stat st;
        if (tree_lstat(w, node_path(w, 0, x), &st, NULL) < 0 || !S_ISDIR(st.st_mode)) {
            ok = false;
            continue;
        }
        size_t keep = w->stack.n;
        node_sync(w, x, &st, NULL, R_RESCAN, false);
        assert(w->stack.n == keep);
        (void)keep;
    }
    return ok;
}

/* Emits the oldest pending rename. Earlier records are already emitted, so
 * the owner's view is "current state minus the still pending records". */
static void rec_emit(struct watch *w, struct wrec *r)
{
    assert(r == w->rec_head);
    struct wnode *n = r->node;
    w->rec_emitting++;
    bool ok = rec_settle_dest(w, n);
    w->rec_emitting--;
    assert(r == w->rec_head);
    const char *from = path_build(w, 1, r->from_parent, r->from_name, strlen(r->from_name), true);
    const char *to = path_build(w, 2, n->parent, n->name, n->namelen, true);
    bool same = strcmp(from, to) == 0;
    struct watch_change c = {.kind = WATCH_RENAME, .path = to, .from = from, .st = n->rep};
    if (n->rep.type == WATCH_TYPE_SYMLINK)
        c.target = n->target;
    rec_unlink(w, r);
    if (!ok) {
        /* Moved into a directory that is gone again: for the owner, the
         * old path is gone; what is left is found by later flushes. */
        struct watch_change rm = {.kind = WATCH_REMOVE, .path = from};
        subtree_unreport(n);
        deliver(w, &rm);
    } else if (!same) {
        deliver(w, &c);
    }
}

static void rec_flush_all(struct watch *w)
{
    while (w->rec_head)
        rec_emit(w, w->rec_head);
}

static bool rec_refs_subtree(struct watch *w, const struct wnode *top)
{
    for (struct wrec *r = w->rec_head; r; r = r->next)
        if (node_within(r->node, top) || node_within(r->from_parent, top))
            return true;
    return false;
}

static void emit_node(struct watch *w, enum watch_kind kind, struct wnode *n,
                      const struct watch_stat *ws, const char *target, bool rescan)
{
    if (!w->rec_emitting)
        rec_flush_all(w);
    /* In the owner's view (the same as the current one unless a rename is
     * being emitted and later ones are pending). */
    const char *p = n == w->rootn ? "" : path_build(w, 0, n->parent, n->name, n->namelen, true);
    struct watch_change c = {.kind = kind, .path = p, .target = target, .rescan = rescan};
    if (ws)
        c.st = *ws;
    deliver(w, &c);
}

static void emit_marker(struct watch *w, enum watch_kind kind, const char *path)
{
    struct watch_change c = {.kind = kind, .path = path};
    deliver(w, &c);
}

/* ---- timers ----------------------------------------------------------- */

static void timer_arm(struct watch *w, uint64_t due)
{
    if (w->freeing)
        return;
    if (w->timer_armed && w->timer_due <= due)
        return;
    uint64_t now = pb_now_ms();
    uint64_t delta = due > now ? due - now : 0;
    struct timeval tv = {.tv_sec = (time_t)(delta / 1000),
                         .tv_usec = (suseconds_t)((delta % 1000) * 1000 + 500)};
    evtimer_add(w->ev_timer, &tv);
    w->timer_armed = true;
    w->timer_due = due;
}

static void retry_arm(struct watch *w)
{
    if (w->retry_armed || w->freeing)
        return;
    if (!w->retry_ms)
        w->retry_ms = w->o.retry_min_ms;
    struct timeval tv = {.tv_sec = w->retry_ms / 1000, .tv_usec = (w->retry_ms % 1000) * 1000};
    evtimer_add(w->ev_retry, &tv);
    w->retry_armed = true;
}

static uint64_t node_due(const struct watch *w, const struct wnode *n)
{
    /* A file its writer just closed needs only long enough for a rename
     * that follows the close at once (editors: write temp, close, rename)
     * to be read, unless renames are pending (vim's backup dance). */
    uint64_t wait = n->write_open                            ? w->o.write_hold_ms
                    : n->closed && !w->rec_head && !w->stash ? w->o.settle_ms
                                                             : w->o.debounce_ms;
    uint64_t d = n->last_ms + wait;
    uint64_t cap = n->first_ms + w->o.max_delay_ms;
    return d < cap ? d : cap;
}

static void mark_dirty(struct watch *w, struct wnode *n, unsigned reasons)
{
    uint64_t now = pb_now_ms();
    n->reasons |= reasons;
    n->last_ms = now;
    n->closed = false;
    if (!n->dlist) {
        n->first_ms = now;
        list_append(&w->dirty, n);
    }
    timer_arm(w, node_due(w, n));
}

/* ---- holds (echo suppression) ----------------------------------------- */

static bool path_held(const struct watch *w, const char *p)
{
    for (size_t i = 0; i < w->nholds; i++) {
        const char *h = w->holds[i].path;
        size_t hl = strlen(h);
        if (hl == 0 || (strncmp(p, h, hl) == 0 && (p[hl] == '\0' || p[hl] == '/')))
            return true;
    }
    return false;
}

static bool node_held(struct watch *w, const struct wnode *n)
{
    /* Held paths are the owner's, so compare in its view. */
    return w->nholds &&
           path_held(w,
                     n == w->rootn ? "" : path_build(w, 0, n->parent, n->name, n->namelen, true));
}

/* ---- freeing ---------------------------------------------------------- */

static void node_moved_out(struct watch *w, struct wnode *m);

static void stash_free(struct wstash *s)
{
    free(s->name);
    free(s);
}

/* Resolves (as "moved out of the tree") the stash entries that reference a
 * node inside top, so that top can be freed. */
static void stash_release_subtree(struct watch *w, const struct wnode *top)
{
    bool again = true;
    while (again) {
        again = false;
        for (struct wstash **pp = &w->stash; *pp; pp = &(*pp)->next) {
            struct wstash *s = *pp;
            const struct wnode *ref = s->node ? s->node->parent : s->parent;
            if (!node_within(ref, top) && !(s->node && node_within(s->node, top)))
                continue;
            *pp = s->next;
            struct wnode *m = s->node;
            stash_free(s);
            if (m)
                node_moved_out(w, m);
            again = true;
            break;
        }
    }
}

static void node_free_one(struct watch *w, struct wnode *x)
{
    if (x->scan_queued)
        scan_forget(w, x);
    if (x->wd >= 0) {
        if (!w->freeing)
            inotify_rm_watch(w->ifd, x->wd);
        wd_remove(w, x);
    }
    if (x->unwatched)
        w->st.unwatched--;
    list_unlink(x);
    node_detach(w, x);
    if (x->rec)
        rec_unlink(w, x->rec);
    free(x->name);
    free(x->target);
    free(x);
    w->nnodes--;
}

static void node_free_rec(struct watch *w, struct wnode *n)
{
    while (n->child)
        node_free_rec(w, n->child);
    node_free_one(w, n);
}

/* Frees n and its subtree silently (no candidates about them), removing
 * their watches. Pending renames that involve the subtree are emitted first
 * (they must reach the owner before anything about these paths). */
static void node_free_tree(struct watch *w, struct wnode *n)
{
    assert(n != w->rootn);
    if (!w->freeing) {
        stash_release_subtree(w, n);
        if (rec_refs_subtree(w, n))
            rec_flush_all(w);
    }
    node_free_rec(w, n);
}

static void node_free_children(struct watch *w, struct wnode *n)
{
    while (n->child)
        node_free_tree(w, n->child);
}

static void subtree_unreport(struct wnode *n)
{
    n->reported = false;
    for (struct wnode *c = n->child; c; c = c->sib_next)
        subtree_unreport(c);
}

/* Nothing below n is known to the owner any more: check it all again. */
static void subtree_redo(struct watch *w, struct wnode *n)
{
    n->reported = false;
    mark_dirty(w, n, R_GONE | R_RESCAN);
    for (struct wnode *c = n->child; c; c = c->sib_next)
        subtree_redo(w, c);
}

static bool subtree_has_reported_below(const struct wnode *n)
{
    for (const struct wnode *c = n->child; c; c = c->sib_next)
        if (c->reported || subtree_has_reported_below(c))
            return true;
    return false;
}

/* ---- ignore patterns -------------------------------------------------- */

static bool name_ignored(struct watch *w, const struct wnode *parent, const char *name, size_t len,
                         bool isdir)
{
    if (parent == w->rootn && len == strlen(WATCH_MARKER_DIR) &&
        memcmp(name, WATCH_MARKER_DIR, len) == 0)
        return true;
    if (len >= strlen(WATCH_TMP_PREFIX) &&
        memcmp(name, WATCH_TMP_PREFIX, strlen(WATCH_TMP_PREFIX)) == 0)
        return true;
    const char *full = NULL;
    for (size_t i = 0; i < w->npats; i++) {
        const struct wpattern *p = &w->pats[i];
        if (p->dir_only && !isdir)
            continue;
        if (!p->has_slash) {
            if (fnmatch(p->glob, name, 0) == 0)
                return true;
            continue;
        }
        if (!full)
            full = path_build(w, 0, parent, name, len, false);
        if (fnmatch(p->glob, full, FNM_PATHNAME) == 0)
            return true;
    }
    return false;
}

/* ---- reaching into the tree without following symlinks ---------------- */

static char *read_target(struct watch *w, int dfd, const char *name, size_t size_hint);

/* "Not there as a path of the tree": gone, or a symlink on the way. */
static int errno_norm(int e)
{
    return (e == ENOENT || e == ENOTDIR || e == ELOOP || e == EXDEV) ? -ENOENT : -e;
}

/* Opens directory rel ("" = the root) of the tree without following any
 * symlink on the way (openat2 RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS where
 * the kernel has it; else only the last component is checked). */
static int dir_open(struct watch *w, const char *rel)
{
#ifdef WATCH_HAVE_OPENAT2
    static bool no_openat2;
    if (!no_openat2) {
        struct open_how how = {.flags = O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC,
                               .resolve = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
                                          RESOLVE_NO_MAGICLINKS};
        long fd = syscall(SYS_openat2, w->rootfd, rel_or_dot(rel), &how, sizeof(how));
        if (fd >= 0 || (errno != ENOSYS && errno != EPERM))
            return (int)fd;
        no_openat2 = true; /* old kernel or a seccomp filter */
    }
#endif
    return openat(w->rootfd, rel_or_dot(rel), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
}

/* lstat of rel inside the tree, never through a symlink; *target gets a
 * symlink's target (caller frees) when target is not NULL. 0 or a negative
 * errno, -ENOENT when rel is not there as a tree path. */
static int tree_lstat(struct watch *w, const char *rel, struct stat *st, char **target)
{
    if (target)
        *target = NULL;
    const char *slash = strrchr(rel, '/');
    int pfd = w->rootfd;
    const char *name = *rel ? rel : ".";
    if (slash) {
        size_t dl = (size_t)(slash - rel);
        char *dir = pb_xmalloc(dl + 1);
        memcpy(dir, rel, dl);
        dir[dl] = '\0';
        pfd = dir_open(w, dir);
        free(dir);
        if (pfd < 0)
            return errno_norm(errno);
        name = slash + 1;
    }
    int r = fstatat(pfd, name, st, AT_SYMLINK_NOFOLLOW);
    int e = errno;
    if (r == 0 && target && S_ISLNK(st->st_mode))
        *target = read_target(w, pfd, name, (size_t)st->st_size);
    if (pfd != w->rootfd)
        close(pfd);
    return r < 0 ? errno_norm(e) : 0;
}

/* ---- watches ---------------------------------------------------------- */

/* Adds (or confirms) the watch of directory node d. 0, or a negative errno;
 * -ENOENT / -ENOTDIR mean the directory vanished (quietly). */
static int node_add_watch(struct watch *w, struct wnode *d, int dfd)
{
    const char *rel = node_path(w, 0, d);
    size_t rl = strlen(w->root), pl = strlen(rel);
    char *abs = wpath_reserve(&w->pb[2], rl + 1 + pl);
    memcpy(abs, w->root, rl);
    size_t off = rl;
    if (pl) {
        if (off == 0 || abs[off - 1] != '/')
            abs[off++] = '/';
        memcpy(abs + off, rel, pl);
        off += pl;
    }
    abs[off] = '\0';
    int wd;
    if (w->o.add_watch) {
        wd = w->o.add_watch(w->ifd, abs, WATCH_DIR_MASK, w->o.add_watch_arg);
    } else {
        /* Watch exactly the directory that was opened (beneath the root, no
         * symlinks): through its /proc/self/fd link, which must be followed. */
        int fd = dfd >= 0 ? dfd : dir_open(w, rel);
        if (fd < 0)
            return errno_norm(errno);
        char proc[64];
        snprintf(proc, sizeof(proc), "/proc/self/fd/%d", fd);
        wd = inotify_add_watch(w->ifd, proc, WATCH_DIR_MASK & ~(uint32_t)IN_DONT_FOLLOW);
        if (wd < 0 && errno == ENOENT) /* no /proc */
            wd = inotify_add_watch(w->ifd, abs, WATCH_DIR_MASK);
        int e = errno;
        if (fd != dfd)
            close(fd);
        errno = e;
    }
    if (wd < 0) {
        int e = errno;
        if (e == ENOENT || e == ENOTDIR || e == ELOOP)
            return -e;
        w->st.watch_failures++;
        if (!d->unwatched) {
            d->unwatched = true;
            w->st.unwatched++;
        }
        if (!w->warned_watch) {
            log_warning("watch: cannot watch %s: %s%s; changes there are found by a rescan, "
                        "retrying with backoff failures=%" PRIu64,
                        abs, strerror(e), e == ENOSPC ? " (raise fs.inotify.max_user_watches)" : "",
                        w->st.watch_failures);
            w->warned_watch = true;
        }
        retry_arm(w);
        return -e;
    }
    struct wnode *other = wd_lookup(w, wd);
    if (other == d)
        return 0;
    if (other) {
        /* The same directory is known under another path: a rename we did not
         * see (events lost). The stale node loses the watch; a rescan finds
         * it gone. */
        log_debug("watch: wd %d moved to %s", wd, abs);
        wd_remove(w, other);
    }
    if (d->wd >= 0)
        wd_remove(w, d);
    d->wd = wd;
    wd_insert(w, d);
    if (d->unwatched) {
        d->unwatched = false;
        w->st.unwatched--;
    }
    return 0;
}

/* ---- syncing a node with the disk ------------------------------------- */

static char *read_target(struct watch *w, int dfd, const char *name, size_t size_hint)
{
    size_t cap = size_hint + 2 > 64 ? size_hint + 2 : 64;
    for (int i = 0; i < 8; i++) {
        char *b = pb_xmalloc(cap);
        ssize_t n = readlinkat(dfd, name, b, cap);
        if (n < 0) {
            free(b);
            w->st.errors++;
            return NULL;
        }
        if ((size_t)n < cap) {
            b[n] = '\0';
            return b;
        }
        free(b);
        cap *= 2;
    }
    return NULL;
}

/* What changed in a regular file since it was reported: 0 nothing, else a
 * kind. ctime alone moves on a rename, chown or xattr change (not worth a
 * candidate), but also on a write that restored mtime (cp -p, rsync -t):
 * then an IN_CLOSE_WRITE or a rescan says so. */
static enum watch_kind file_change(const struct watch_stat *a, const struct watch_stat *b,
                                   unsigned reasons)
{
    bool core = a->ino != b->ino || a->size != b->size || a->mtime_ns != b->mtime_ns ||
                a->mode != b->mode || a->nlink != b->nlink;
    if (!core && a->ctime_ns == b->ctime_ns)
        return 0;
    if (!core && !(reasons & (R_CONTENT | R_CREATE | R_RESCAN)))
        return 0;
    if (reasons == R_ATTRIB && a->ino == b->ino && a->size == b->size)
        return WATCH_ATTR;
    return WATCH_UPSERT_FILE;
}

static void dir_added(struct watch *w, struct wnode *d);
static void stash_release_slot(struct watch *w, const struct wnode *d, const char *name,
                               size_t len);

/*
 * Compares node n with what lstat said (st NULL: nothing there) and emits
 * what differs from what was last reported. May free n (when gone).
 * target: for a symlink, its readlink value (ownership passes to n).
 */
/* What node_sync() would emit for n given ws (0 = nothing). */
static enum watch_kind node_decide(const struct wnode *n, const struct watch_stat *ws,
                                   const char *target, unsigned reasons, bool *type_change)
{
    *type_change = n->reported && n->rep.type != ws->type;
    bool known = n->reported && !*type_change;
    switch (ws->type) {
    case WATCH_TYPE_FILE:
        return !known ? WATCH_UPSERT_FILE : file_change(&n->rep, ws, reasons);
    case WATCH_TYPE_DIR:
        return !known ? WATCH_MKDIR : n->rep.mode != ws->mode ? WATCH_ATTR : 0;
    case WATCH_TYPE_SYMLINK:
        return (!known || !n->target || !target || strcmp(n->target, target) != 0) ? WATCH_SYMLINK
                                                                                   : 0;
    default:
        return (!known || n->rep.ino != ws->ino || n->rep.mode != ws->mode) ? WATCH_UNSUPPORTED : 0;
    }
}

static void node_sync(struct watch *w, struct wnode *n, const struct stat *st, char *target,
                      unsigned reasons, bool rescan)
{
    /* Pending renames go first; emitting them may report an ancestor (or n
     * itself, as the destination directory of a rename), so decide after. */
    if (w->rec_head && !w->rec_emitting) {
        bool tc;
        struct watch_stat tmp;
        if (st)
            watch_stat_from_stat(&tmp, st);
        if (st ? node_decide(n, &tmp, target, reasons, &tc) != 0 : n->reported)
            rec_flush_all(w);
    }
    if (!st) {
        free(target);
        if (n == w->rootn)
            return;
        if (n->reported)
            emit_node(w, WATCH_REMOVE, n, NULL, NULL, rescan);
        node_free_tree(w, n);
        return;
    }
    struct watch_stat ws;
    watch_stat_from_stat(&ws, st);
    bool type_change;
    enum watch_kind kind = node_decide(n, &ws, target, reasons, &type_change);
    if (type_change) {
        emit_node(w, WATCH_REMOVE, n, NULL, NULL, rescan);
        n->reported = false;
        if (n->rep.type == WATCH_TYPE_DIR)
            node_free_children(w, n); /* children of the new one are kept */
        if (ws.type != WATCH_TYPE_DIR && n->wd >= 0) {
            inotify_rm_watch(w->ifd, n->wd);
            wd_remove(w, n);
        }
    }
    if (kind)
        emit_node(w, kind, n, &ws, ws.type == WATCH_TYPE_SYMLINK ? (target ? target : "") : NULL,
                  rescan);
    n->rep = ws;
    n->reported = true;
    free(n->target);
    n->target = target;
    if (ws.type == WATCH_TYPE_DIR && n->wd < 0 && !n->unwatched && !w->walking)
        dir_added(w, n);
}

/* lstat's n and syncs it. */
static void node_check(struct watch *w, struct wnode *n, unsigned reasons)
{
    const char *p = node_path(w, 0, n);
    struct stat st;
    char *target;
    int r = tree_lstat(w, p, &st, &target);
    if (r == -ENOENT) {
        node_sync(w, n, NULL, NULL, reasons, false);
    } else if (r < 0) {
        w->st.errors++;
        log_debug("watch: lstat %s: %s", p, strerror(-r));
    } else {
        node_sync(w, n, &st, target, reasons, false);
    }
}

/* ---- walking (scans) -------------------------------------------------- */

static void wstack_push(struct wstack *s, struct wnode *n)
{
    if (s->n == s->cap) {
        s->cap = s->cap ? s->cap * 2 : 64;
        s->v = pb_xreallocarray(s->v, s->cap, sizeof(*s->v));
    }
    s->v[s->n++] = n;
}

/* Starts reading directory d for a walk: watch first, then read (whatever is
 * created after the watch is an event, whatever before it is in the
 * listing). NULL when it cannot be read (vanished, unreadable). */
static DIR *walk_open(struct watch *w, struct wnode *d)
{
    const char *p = node_path(w, 0, d);
    int dfd = dir_open(w, p);
    if (dfd < 0) {
        if (errno_norm(errno) != -ENOENT) {
            w->st.errors++;
            log_warning("watch: cannot read directory %s: %s", rel_or_dot(p), strerror(errno));
        }
        return NULL;
    }
    if (d->wd < 0 && node_add_watch(w, d, dfd) < 0 && !d->unwatched) {
        close(dfd);
        return NULL; /* vanished */
    }
    DIR *dir = fdopendir(dfd);
    if (!dir) {
        close(dfd);
        w->st.errors++;
    }
    return dir;
}

/* One entry de of directory d (open as dir). Subdirectories to walk go to
 * the sliced scan's stack when sliced, else to w->stack. */
static void walk_entry(struct watch *w, struct wnode *d, DIR *dir, const struct dirent *de,
                       enum walk_mode mode, uint64_t gen, bool sliced)
{
    const char *nm = de->d_name;
    if (nm[0] == '.' && (nm[1] == '\0' || (nm[1] == '.' && nm[2] == '\0')))
        return;
    int dfd = dirfd(dir);
    size_t len = strlen(nm);
    struct stat st;
    bool have_st = false;
    bool isdir = de->d_type == DT_DIR;
    if (de->d_type == DT_UNKNOWN || mode != WALK_NEW) {
        if (fstatat(dfd, nm, &st, AT_SYMLINK_NOFOLLOW) < 0)
            return;
        have_st = true;
        isdir = S_ISDIR(st.st_mode);
    }
    if (name_ignored(w, d, nm, len, isdir))
        return;
    struct wnode *c = node_lookup(w, d, nm, len);
    if (!c && w->stash)
        stash_release_slot(w, d, nm, len);
    if (!c)
        c = node_new(w, d, nm, len);
    c->seen_gen = gen;
    if (mode == WALK_NEW) {
        mark_dirty(w, c, R_CREATE);
        if (isdir && c->wd < 0)
            wstack_push(&w->stack, c);
        return;
    }
    assert(have_st);
    if (mode == WALK_DIFF && w->nholds && node_held(w, c)) {
        /* The owner is applying there: look again after its end. */
        mark_dirty(w, c, R_RESCAN);
        if (isdir)
            sliced ? scan_push(w, c) : wstack_push(&w->stack, c);
        return;
    }
    char *target = NULL;
    if (S_ISLNK(st.st_mode))
        target = read_target(w, dfd, nm, (size_t)st.st_size);
    node_sync(w, c, &st, target, R_RESCAN, mode == WALK_FULL);
    if (isdir)
        sliced ? scan_push(w, c) : wstack_push(&w->stack, c);
}

/* After the listing of d: children not seen in it are gone, unless the
 * debounce or the owner is busy with them. They are looked at again first:
 * a sliced scan's listing may predate a child the owner created since. */
static void walk_close(struct watch *w, struct wnode *d, enum walk_mode mode, uint64_t gen,
                       bool sliced)
{
    if (mode == WALK_NEW)
        return;
    struct wnode *c = d->child;
    while (c) {
        struct wnode *next = c->sib_next;
        if (c->seen_gen != gen && !c->dlist && !c->rec && !(w->nholds && node_held(w, c))) {
            struct stat st;
            char *target = NULL;
            int r = tree_lstat(w, node_path(w, 0, c), &st, &target);
            if (r == 0 && !name_ignored(w, d, c->name, c->namelen, S_ISDIR(st.st_mode))) {
                c->seen_gen = gen;
                node_sync(w, c, &st, target, R_RESCAN, mode == WALK_FULL);
                if (S_ISDIR(st.st_mode))
                    sliced ? scan_push(w, c) : wstack_push(&w->stack, c);
            } else if (r == 0 || r == -ENOENT) {
                free(target);
                node_sync(w, c, NULL, NULL, R_RESCAN, mode == WALK_FULL);
            } else {
                mark_dirty(w, c, R_RESCAN);
            }
        } else if (c->seen_gen != gen) {
            mark_dirty(w, c, R_RESCAN); /* busy: let the debounce decide */
        }
        c = next;
    }
}

static void walk(struct watch *w, struct wnode *top, enum walk_mode mode)
{
    size_t base = w->stack.n;
    uint64_t gen = ++w->gen;
    w->walking++;
    wstack_push(&w->stack, top);
    while (w->stack.n > base) {
        struct wnode *d = w->stack.v[--w->stack.n];
        DIR *dir = walk_open(w, d);
        if (!dir)
            continue;
        struct dirent *de;
        while ((de = readdir(dir)))
            walk_entry(w, d, dir, de, mode, gen, false);
        closedir(dir);
        walk_close(w, d, mode, gen, false);
    }
    w->walking--;
}

/* ---- sliced scans ------------------------------------------------------
 * A full rescan or a safety rescan of a big tree must not hold the loop: it
 * runs in steps of at most scan_slice entries (and WATCH_SCAN_SLICE_MS) per
 * loop turn, yielding through a zero timeout so that I/O is served between
 * steps. Its state: a stack of directories still to read and the directory
 * being read (kept open across turns). While it runs, inotify is not read
 * (events wait in the kernel queue; an overflow means one more rescan) and
 * nothing is flushed, so the owner sees exactly what a scan in one go would
 * show; only the owner's own suppress calls change the model meanwhile. A
 * node freed meanwhile is taken off the stack (wnode.scan_queued). */

static void scan_push(struct watch *w, struct wnode *n)
{
    wstack_push(&w->scan.stack, n);
    n->scan_queued = true;
}

/* n is about to be freed: forget it in the scan. */
static void scan_forget(struct watch *w, struct wnode *n)
{
    struct wscan *s = &w->scan;
    if (s->cur == n) {
        closedir(s->dir);
        s->dir = NULL;
        s->cur = NULL;
    }
    for (size_t i = s->stack.n; i-- > 0;)
        if (s->stack.v[i] == n)
            s->stack.v[i] = NULL;
    n->scan_queued = false;
}

static void rearm(struct watch *w);

static void scan_yield(struct watch *w)
{
    struct timeval zero = {0, 0};
    evtimer_add(w->ev_scan, &zero);
}

/* Starts a sliced walk of top (mode WALK_FULL or WALK_DIFF); end_path (owned,
 * or NULL) is emitted as RESCAN_END when it is done. */
static void scan_start(struct watch *w, struct wnode *top, enum walk_mode mode, char *end_path)
{
    struct wscan *s = &w->scan;
    assert(!s->active);
    s->active = true;
    s->mode = mode;
    s->end_path = end_path;
    s->root = top == w->rootn;
    s->gen = ++w->gen;
    s->t0 = pb_now_ms();
    s->candidates0 = w->st.candidates;
    scan_push(w, top);
    event_del(w->ev_read);
    scan_yield(w);
}

static void scan_finish(struct watch *w)
{
    struct wscan *s = &w->scan;
    s->active = false;
    uint64_t now = pb_now_ms();
    if (s->end_path) {
        emit_marker(w, WATCH_RESCAN_END, s->end_path);
        free(s->end_path);
        s->end_path = NULL;
    }
    if (s->mode == WALK_FULL && s->root) {
        w->full_end_ms = now;
        w->full_dur_ms = now - s->t0;
    }
    if (s->mode == WALK_DIFF && w->st.candidates != s->candidates0)
        log_info("watch: safety rescan found %" PRIu64 " changes the events missed",
                 w->st.candidates - s->candidates0);
    if (!w->freeing && event_add(w->ev_read, NULL) < 0)
        log_err("watch: cannot listen to inotify again");
    if (w->need_full || w->nrescan_req)
        event_active(w->ev_deferred, EV_TIMEOUT, 0);
    rearm(w);
}

static void on_scan(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct watch *w = arg;
    struct wscan *s = &w->scan;
    uint64_t t0 = pb_now_ms();
    size_t done = 0;
    w->walking++;
    while (done < w->o.scan_slice) {
        if (!s->dir) {
            if (!s->stack.n)
                break;
            struct wnode *d = s->stack.v[--s->stack.n];
            if (!d)
                continue;
            d->scan_queued = false;
            done++;
            s->dir = walk_open(w, d);
            if (!s->dir)
                continue;
            s->cur = d;
            d->scan_queued = true; /* being read: scan_forget() closes it */
        }
        struct wnode *d = s->cur;
        struct dirent *de = readdir(s->dir);
        if (!de) {
            closedir(s->dir);
            s->dir = NULL;
            s->cur = NULL;
            d->scan_queued = false;
            walk_close(w, d, s->mode, s->gen, true);
            continue;
        }
        walk_entry(w, d, s->dir, de, s->mode, s->gen, true);
        done++;
        if (done % 64 == 0 && pb_now_ms() - t0 >= WATCH_SCAN_SLICE_MS)
            break;
    }
    w->walking--;
    if (s->dir || s->stack.n)
        scan_yield(w);
    else
        scan_finish(w);
}

/* A directory appeared (created or moved in): watch it, then mark all it
 * holds as created. */
static void dir_added(struct watch *w, struct wnode *d)
{
    if (d->wd >= 0)
        return;
    walk(w, d, WALK_NEW);
}

static void full_rescan(struct watch *w, struct wnode *top)
{
    w->st.rescans++;
    /* Resolve everything in flight: a full rescan tells the owner the truth. */
    while (w->stash) {
        struct wstash *s = w->stash;
        w->stash = s->next;
        struct wnode *m = s->node;
        stash_free(s);
        if (m)
            node_moved_out(w, m);
    }
    if (top == w->rootn) {
        while (w->rec_head)
            rec_unlink(w, w->rec_head);
    } else {
        rec_flush_all(w);
    }
    char *tp = pb_xstrdup(node_path(w, 0, top));
    log_info("watch: full rescan of %s", *tp ? tp : "/");
    emit_marker(w, WATCH_RESCAN_BEGIN, tp);
    subtree_unreport(top);
    /* Pending debounces inside are covered by the rescan. */
    for (struct wnode *n = w->dirty.head; n;) {
        struct wnode *next = n->dnext;
        if (node_within(n, top) && !n->write_open) {
            list_unlink(n);
            n->reasons = 0;
        }
        n = next;
    }
    bool exists = true;
    if (top != w->rootn) {
        struct stat st;
        const char *p = node_path(w, 0, top);
        char *target;
        if (tree_lstat(w, p, &st, &target) < 0) {
            node_free_tree(w, top);
            exists = false;
        } else {
            node_sync(w, top, &st, target, R_RESCAN, true);
            exists = S_ISDIR(st.st_mode);
        }
    }
    if (exists) {
        scan_start(w, top, WALK_FULL, tp); /* RESCAN_END when it is done */
        return;
    }
    emit_marker(w, WATCH_RESCAN_END, tp);
    free(tp);
}

/* ---- rename pairing and deletions ------------------------------------- */

/* m (reported, with a pending rename) is gone before the rename was
 * reported. Can the rename simply be forgotten, i.e. the owner told that the
 * old path changed (or is gone) instead? */
static bool collapse_ok(struct watch *w, struct wnode *m)
{
    struct wrec *r = m->rec;
    if (r->replaced)
        return false;
    for (struct wrec *o = w->rec_head; o; o = o->next)
        if (o != r && (node_within(o->node, m) || node_within(o->from_parent, m)))
            return false;
    struct wnode *s = node_lookup(w, r->from_parent, r->from_name, strlen(r->from_name));
    if (!s)
        return true;
    return !s->reported && !s->rec && !subtree_has_reported_below(m);
}

/* Moves what the owner knows about m back to m's old location: a tombstone
 * there (to be found gone -> REMOVE) or the node that replaced it (-> one
 * UPSERT, the editor-save case). m is then forgotten by the caller. */
static void collapse(struct watch *w, struct wnode *m)
{
    struct wrec *r = m->rec;
    size_t len = strlen(r->from_name);
    struct wnode *s = node_lookup(w, r->from_parent, r->from_name, len);
    if (!s)
        s = node_new(w, r->from_parent, r->from_name, len);
    s->reported = true;
    s->rep = m->rep;
    free(s->target);
    s->target = m->target;
    m->target = NULL;
    m->reported = false;
    rec_unlink(w, r);
    mark_dirty(w, s, R_GONE);
}

/* m (detached) left the tree. */
static void node_moved_out(struct watch *w, struct wnode *m)
{
    if (m->rec && collapse_ok(w, m)) {
        collapse(w, m);
        node_free_tree(w, m);
        return;
    }
    if (m->reported)
        emit_node(w, WATCH_REMOVE, m, NULL, NULL, false);
    node_free_tree(w, m);
}

/* IN_DELETE of c. */
static void node_deleted(struct watch *w, struct wnode *c)
{
    c->write_open = false;
    if (c->rec && collapse_ok(w, c)) {
        node_detach(w, c);
        collapse(w, c);
        node_free_tree(w, c);
        return;
    }
    if (c->rec || rec_refs_subtree(w, c))
        rec_flush_all(w);
    mark_dirty(w, c, R_GONE);
}

static void stash_expire(struct watch *w, uint64_t now)
{
    struct wstash **pp = &w->stash;
    while (*pp) {
        struct wstash *s = *pp;
        if (s->due_ms > now) {
            pp = &s->next;
            continue;
        }
        *pp = s->next;
        struct wnode *m = s->node;
        if (!m) {
            struct wnode *x = node_lookup(w, s->parent, s->name, strlen(s->name));
            if (x)
                mark_dirty(w, x, R_MOVED);
            stash_free(s);
        } else {
            stash_free(s);
            node_moved_out(w, m);
        }
        pp = &w->stash; /* the list may have changed */
    }
}

/* Something new appears at (d, name): a MOVED_FROM still waiting there for
 * its MOVED_TO is from an earlier rename out of the tree (the pair of a
 * rename is adjacent in the queue), so it must reach the owner first. */
static void stash_release_slot(struct watch *w, const struct wnode *d, const char *name, size_t len)
{
    for (struct wstash **pp = &w->stash; *pp;) {
        struct wstash *s = *pp;
        const struct wnode *par = s->node ? s->node->parent : s->parent;
        const char *nm = s->node ? s->node->name : s->name;
        if (par != d || strlen(nm) != len || memcmp(nm, name, len) != 0) {
            pp = &s->next;
            continue;
        }
        *pp = s->next;
        struct wnode *m = s->node;
        stash_free(s);
        if (m)
            node_moved_out(w, m);
        pp = &w->stash;
    }
}

static void moved_from(struct watch *w, struct wnode *d, const char *name, size_t len,
                       uint32_t cookie)
{
    uint64_t now = pb_now_ms();
    struct wstash *s = pb_xcalloc(1, sizeof(*s));
    s->cookie = cookie;
    s->due_ms = now + w->o.rename_window_ms;
    struct wnode *m = node_lookup(w, d, name, len);
    if (m) {
        node_detach(w, m);
        list_unlink(m);
        s->node = m;
    } else {
        s->parent = d;
        s->name = pb_xmalloc(len + 1);
        memcpy(s->name, name, len);
        s->name[len] = '\0';
    }
    struct wstash **pp = &w->stash;
    while (*pp)
        pp = &(*pp)->next;
    *pp = s;
    timer_arm(w, s->due_ms);
}

/* Something was renamed over t: t's own children (t was an empty directory
 * on disk, but removals may still be pending) are gone, and t's watch
 * belongs to the replaced inode. */
static void slot_replaced(struct watch *w, struct wnode *t)
{
    if (t->rec || rec_refs_subtree(w, t))
        rec_flush_all(w);
    for (struct wnode *c = t->child; c;) {
        struct wnode *next = c->sib_next;
        if (c->reported)
            emit_node(w, WATCH_REMOVE, c, NULL, NULL, false);
        node_free_tree(w, c);
        c = next;
    }
    if (t->wd >= 0) {
        inotify_rm_watch(w->ifd, t->wd);
        wd_remove(w, t);
    }
}

static void moved_to(struct watch *w, struct wnode *d, const char *name, size_t len,
                     uint32_t cookie, bool isdir)
{
    struct wstash *s = NULL;
    for (struct wstash **pp = &w->stash; *pp; pp = &(*pp)->next) {
        if ((*pp)->cookie == cookie) {
            s = *pp;
            *pp = s->next;
            break;
        }
    }
    struct wnode *m = s ? s->node : NULL;
    bool paired = s != NULL;
    if (s) {
        if (!m) {
            struct wnode *x = node_lookup(w, s->parent, s->name, strlen(s->name));
            if (x)
                mark_dirty(w, x, R_MOVED);
        }
        stash_free(s);
    }
    if (w->stash)
        stash_release_slot(w, d, name, len);
    struct wnode *t = node_lookup(w, d, name, len);
    if (!m) {
        /* Moved in from outside (or from an ignored name), or from a name we
         * do not know (the owner already moved its model: the flush
         * compares). */
        if (t && !paired)
            slot_replaced(w, t);
        else if (!t)
            t = node_new(w, d, name, len);
        if (isdir)
            dir_added(w, t);
        mark_dirty(w, t, R_MOVED | R_CONTENT);
        return;
    }
    /* A pending rename that replaced something cannot be merged with this
     * one (the owner must learn what it replaced): report it now; m's
     * parent and name still say where it was. */
    if (m->rec && m->rec->replaced)
        rec_flush_all(w);
    t = node_lookup(w, d, name, len);
    bool need_rec = m->reported && !m->rec;
    bool replaced = t && t->reported;
    if (t) {
        /* m replaces t. */
        slot_replaced(w, t);
        if (!m->reported && t->reported) {
            /* An unreported file (a temp) renamed over a known one: the owner
             * sees one update of the target. */
            m->reported = true;
            m->rep = t->rep;
            free(m->target);
            m->target = t->target;
            t->target = NULL;
        }
        t->reported = false;
        node_free_tree(w, t);
    }
    if (need_rec)
        rec_new(w, m, m->parent, m->name, pb_now_ms());
    if (m->rec && replaced)
        m->rec->replaced = true;
    node_rename(m, name, len);
    node_attach(w, m, d);
    if (m->rec && m->rec->from_parent == d && strlen(m->rec->from_name) == len &&
        memcmp(m->rec->from_name, name, len) == 0)
        rec_unlink(w, m->rec); /* moved back where the owner knows it */
    if (m->rec)
        timer_arm(w, m->rec->due_ms);
    mark_dirty(w, m, R_MOVED);
}

/* ---- events ----------------------------------------------------------- */

static void root_lost(struct watch *w, const char *why)
{
    if (!w->st.root_lost)
        log_warning("watch: the tree root %s was %s; no more changes are seen", w->root, why);
    w->st.root_lost = true;
}

static void handle_event(struct watch *w, int wd, uint32_t mask, uint32_t cookie, const char *name)
{
    w->st.events++;
    if (mask & IN_Q_OVERFLOW) {
        w->st.overflows++;
        log_warning("watch: inotify queue overflow, rescanning the whole tree overflows=%" PRIu64,
                    w->st.overflows);
        w->need_full = true;
        /* Under a storm of changes on a big tree, rescanning may itself
         * take long enough to overflow again: space full rescans out to
         * twice their duration rather than loop on them. */
        uint64_t now = pb_now_ms(), gap = 2 * w->full_dur_ms;
        if (gap > 60000)
            gap = 60000;
        if (w->full_end_ms && now < w->full_end_ms + gap) {
            uint64_t delay = w->full_end_ms + gap - now;
            struct timeval tv = {.tv_sec = (time_t)(delay / 1000),
                                 .tv_usec = (suseconds_t)((delay % 1000) * 1000)};
            event_add(w->ev_deferred, &tv);
            log_info("watch: next full rescan in %" PRIu64 " ms", delay);
        } else {
            event_active(w->ev_deferred, EV_TIMEOUT, 0);
        }
        return;
    }
    struct wnode *d = wd_lookup(w, wd);
    if (!d)
        return;
    if (mask & IN_IGNORED) {
        wd_remove(w, d);
        if (d == w->rootn)
            root_lost(w, "removed");
        return;
    }
    if (mask & IN_UNMOUNT) {
        if (d == w->rootn) {
            root_lost(w, "unmounted");
        } else {
            /* A filesystem mounted inside the tree went away: what is at
             * that path now is different. */
            char *p = pb_xstrdup(node_path(w, 0, d));
            watch_rescan(w, p);
            free(p);
        }
        return;
    }
    if (!name || !*name) {
        if (d == w->rootn && (mask & (IN_DELETE_SELF | IN_MOVE_SELF)))
            root_lost(w, (mask & IN_DELETE_SELF) ? "deleted" : "moved");
        return;
    }
    size_t len = strlen(name);
    bool isdir = (mask & IN_ISDIR) != 0;
    if (log_get_level() >= LOG_LEVEL_DEBUG)
        log_debug("watch: event %s/%s mask=%#x cookie=%u", node_path(w, 0, d), name, mask, cookie);
    if (name_ignored(w, d, name, len, isdir))
        return;
    if (mask & IN_MOVED_FROM) {
        moved_from(w, d, name, len, cookie);
        return;
    }
    if (mask & IN_MOVED_TO) {
        moved_to(w, d, name, len, cookie, isdir);
        return;
    }
    if ((mask & IN_CREATE) && w->stash)
        stash_release_slot(w, d, name, len);
    struct wnode *c = node_lookup(w, d, name, len);
    if (mask & IN_DELETE) {
        if (c)
            node_deleted(w, c);
        return;
    }
    if (!c)
        c = node_new(w, d, name, len);
    if (mask & IN_CREATE) {
        if (isdir) {
            dir_added(w, c);
        } else {
            struct stat st;
            /* A regular file being created is usually still being written:
             * wait for its IN_CLOSE_WRITE (up to write_hold_ms). */
            if (tree_lstat(w, node_path(w, 0, c), &st, NULL) == 0 && S_ISREG(st.st_mode) &&
                st.st_nlink == 1)
                c->write_open = true;
        }
        mark_dirty(w, c, R_CREATE);
    }
    if (mask & IN_MODIFY) {
        c->write_open = true;
        mark_dirty(w, c, R_CONTENT);
    }
    if (mask & IN_CLOSE_WRITE) {
        c->write_open = false;
        mark_dirty(w, c, R_CONTENT);
        c->closed = true;
        timer_arm(w, node_due(w, c));
    }
    if (mask & IN_ATTRIB)
        mark_dirty(w, c, R_ATTRIB);
}

static void rearm(struct watch *w)
{
    uint64_t best = UINT64_MAX;
    for (struct wnode *n = w->dirty.head; n; n = n->dnext) {
        if (w->nholds && node_held(w, n))
            continue;
        uint64_t d = node_due(w, n);
        if (d < best)
            best = d;
    }
    if (w->rec_head && w->rec_head->due_ms < best)
        best = w->rec_head->due_ms;
    for (struct wstash *s = w->stash; s; s = s->next)
        if (s->due_ms < best)
            best = s->due_ms;
    if (best != UINT64_MAX)
        timer_arm(w, best);
}

static int ready_cmp(const void *a, const void *b)
{
    const struct wnode *const *x = a, *const *y = b;
    unsigned da = node_depth(*x), db = node_depth(*y);
    if (da != db)
        return da < db ? -1 : 1;
    /* Stable: keep the dirty-list order (first_ms, then address as a tie
     * break keeps qsort deterministic enough). */
    if ((*x)->first_ms != (*y)->first_ms)
        return (*x)->first_ms < (*y)->first_ms ? -1 : 1;
    return 0;
}

static void flush_pass(struct watch *w)
{
    if (w->scan.active)
        return; /* scan_finish() rearms */
    uint64_t now = pb_now_ms();
    stash_expire(w, now);
    while (w->rec_head && w->rec_head->due_ms <= now)
        rec_emit(w, w->rec_head);
    for (struct wnode *n = w->dirty.head; n;) {
        struct wnode *next = n->dnext;
        if (node_due(w, n) <= now && !(w->nholds && node_held(w, n))) {
            list_unlink(n);
            list_append(&w->ready, n);
            /* Parents before children: a dirty ancestor goes too. */
            for (struct wnode *a = n->parent; a; a = a->parent)
                if (a->dlist == &w->dirty) {
                    if (a == next)
                        next = a->dnext;
                    list_unlink(a);
                    list_append(&w->ready, a);
                }
        }
        n = next;
    }
    if (w->ready.n > 1) {
        size_t cnt = w->ready.n, i = 0;
        struct wnode **arr = pb_xreallocarray(NULL, cnt, sizeof(*arr));
        while (w->ready.head) {
            arr[i] = w->ready.head;
            list_unlink(arr[i++]);
        }
        qsort(arr, cnt, sizeof(*arr), ready_cmp);
        for (i = 0; i < cnt; i++)
            list_append(&w->ready, arr[i]);
        free(arr);
    }
    /* Bounded per loop turn like a scan (the owner's work per candidate can
     * be large): what is left stays ready for the next turn. */
    uint64_t t0 = pb_now_ms();
    size_t done = 0;
    while (w->ready.head) {
        struct wnode *n = w->ready.head;
        list_unlink(n);
        if (w->nholds && node_held(w, n)) {
            list_append(&w->dirty, n); /* held since it got ready: after the end */
            continue;
        }
        unsigned reasons = n->reasons;
        n->reasons = 0;
        n->write_open = false;
        n->closed = false;
        node_check(w, n, reasons);
        if (++done >= w->o.scan_slice || pb_now_ms() - t0 >= WATCH_SCAN_SLICE_MS)
            break;
    }
    if (w->ready.head)
        timer_arm(w, 0); /* the rest on the next turn, after I/O */
    rearm(w);
}

static void on_timer(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct watch *w = arg;
    w->timer_armed = false;
    flush_pass(w);
}

static void on_inotify(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct watch *w = arg;
    for (int i = 0; i < WATCH_MAX_READS; i++) {
        ssize_t n = read(w->ifd, w->ibuf, sizeof(w->ibuf));
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno != EAGAIN)
                log_warning("watch: reading inotify: %s", strerror(errno));
            break;
        }
        if (n == 0)
            break;
        for (char *p = w->ibuf; p < w->ibuf + n;) {
            const struct inotify_event *ev = (const struct inotify_event *)(void *)p;
            handle_event(w, ev->wd, ev->mask, ev->cookie, ev->len ? ev->name : NULL);
            p += sizeof(*ev) + ev->len;
        }
    }
    if (w->stash || w->rec_head)
        rearm(w);
}

static struct wnode *resolve_path(struct watch *w, const char *path, bool create);

static void on_deferred(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct watch *w = arg;
    if (w->scan.active)
        return; /* scan_finish() comes back here */
    if (w->need_full) {
        w->need_full = false;
        for (size_t i = 0; i < w->nrescan_req; i++)
            free(w->rescan_req[i]);
        w->nrescan_req = 0;
        full_rescan(w, w->rootn);
    }
    /* One sliced scan at a time: the rest when it is done. */
    while (w->nrescan_req && !w->scan.active) {
        char *p = w->rescan_req[0];
        memmove(w->rescan_req, w->rescan_req + 1, --w->nrescan_req * sizeof(char *));
        struct wnode *n = resolve_path(w, p, true);
        if (n) {
            full_rescan(w, n);
        } else {
            /* Ignored: nothing exists there for the owner. */
            emit_marker(w, WATCH_RESCAN_BEGIN, p);
            emit_marker(w, WATCH_RESCAN_END, p);
        }
        free(p);
    }
    rearm(w);
}

static void on_periodic(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct watch *w = arg;
    if (w->scan.active)
        return; /* a rescan is running anyway */
    w->st.rescans++;
    rec_flush_all(w);
    scan_start(w, w->rootn, WALK_DIFF, NULL);
}

static void collect_unwatched(struct watch *w, struct wnode *n, char ***list, size_t *cnt)
{
    if (n->unwatched) {
        *list = pb_xreallocarray(*list, *cnt + 1, sizeof(**list));
        (*list)[(*cnt)++] = pb_xstrdup(node_path(w, 0, n));
    }
    for (struct wnode *c = n->child; c; c = c->sib_next)
        collect_unwatched(w, c, list, cnt);
}

static void on_retry(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct watch *w = arg;
    w->retry_armed = false;
    if (w->scan.active) {
        retry_arm(w); /* after the scan */
        return;
    }
    char **list = NULL;
    size_t cnt = 0;
    collect_unwatched(w, w->rootn, &list, &cnt);
    uint64_t fails = w->st.watch_failures;
    w->warned_watch = true; /* one warning per failure episode */
    rec_flush_all(w);
    for (size_t i = 0; i < cnt; i++) {
        /* Looked up again: an earlier walk may have freed it. */
        struct wnode *n = resolve_path(w, list[i], false);
        free(list[i]);
        if (!n || !n->unwatched)
            continue;
        w->st.rescans++;
        n->unwatched = false;
        w->st.unwatched--;
        walk(w, n, WALK_DIFF);
    }
    free(list);
    if (w->st.watch_failures != fails || w->st.unwatched) {
        w->retry_ms = PB_MIN(w->retry_ms * 2, w->o.retry_max_ms);
        retry_arm(w);
    } else {
        if (cnt)
            log_notice("watch: all directories are watched again");
        w->retry_ms = 0;
        w->warned_watch = false;
    }
    rearm(w);
}

/* ---- public API ------------------------------------------------------- */

/* A tree-relative path: no leading or trailing '/', no empty, "." or ".."
 * component. "" is the root. */
static bool path_valid(const char *p)
{
    if (!p)
        return false;
    if (!*p)
        return true;
    const char *c = p;
    for (;;) {
        const char *e = strchr(c, '/');
        size_t l = e ? (size_t)(e - c) : strlen(c);
        if (l == 0 || (l == 1 && c[0] == '.') || (l == 2 && c[0] == '.' && c[1] == '.'))
            return false;
        if (!e)
            return true;
        c = e + 1;
    }
}

/* Finds the node of path; with create, missing nodes are made (and marked
 * dirty so that a flush checks them). NULL if missing (or ignored). */
static struct wnode *resolve_path(struct watch *w, const char *path, bool create)
{
    struct wnode *n = w->rootn;
    const char *c = path;
    while (*c) {
        const char *e = strchr(c, '/');
        size_t l = e ? (size_t)(e - c) : strlen(c);
        struct wnode *x = node_lookup(w, n, c, l);
        if (!x) {
            if (!create || name_ignored(w, n, c, l, e != NULL))
                return NULL;
            x = node_new(w, n, c, l);
            mark_dirty(w, x, R_RESCAN);
        }
        n = x;
        if (!e)
            break;
        c = e + 1;
    }
    return n;
}

/* Like resolve_path(), for a path as the owner knows it: a directory whose
 * rename is still pending is found at its old path. Where that is ambiguous
 * (the old slot is taken by another renamed node), the pending renames are
 * emitted first and the path resolved as it is now. */
static struct wnode *resolve_owner_path(struct watch *w, const char *path, bool create)
{
    if (!w->rec_head)
        return resolve_path(w, path, create);
    struct wnode *n = w->rootn;
    const char *c = path;
    while (*c) {
        const char *e = strchr(c, '/');
        size_t l = e ? (size_t)(e - c) : strlen(c);
        struct wnode *next = NULL;
        for (struct wrec *r = w->rec_head; r && !next; r = r->next)
            if (r->from_parent == n && strlen(r->from_name) == l && memcmp(r->from_name, c, l) == 0)
                next = r->node;
        if (!next) {
            struct wnode *x = node_lookup(w, n, c, l);
            if (x && x->rec) {
                rec_flush_all(w);
                return resolve_path(w, path, create);
            }
            if (!x) {
                if (!create || name_ignored(w, n, c, l, e != NULL))
                    return NULL;
                x = node_new(w, n, c, l);
                mark_dirty(w, x, R_RESCAN);
            }
            next = x;
        }
        n = next;
        if (!e)
            break;
        c = e + 1;
    }
    return n;
}

static int pattern_add(struct watch *w, const char *glob, struct pb_error *err)
{
    size_t l = strlen(glob);
    while (l && glob[0] == '/') {
        glob++;
        l--;
    }
    bool dir_only = false;
    while (l && glob[l - 1] == '/') {
        l--;
        dir_only = true;
    }
    if (!l)
        return pb_error_set(err, -EINVAL, "empty ignore pattern");
    struct wpattern *p = &w->pats[w->npats++];
    p->glob = pb_xmalloc(l + 1);
    memcpy(p->glob, glob, l);
    p->glob[l] = '\0';
    p->has_slash = memchr(p->glob, '/', l) != NULL;
    p->dir_only = dir_only;
    return 0;
}

struct watch *watch_new(struct event_base *base, const char *root, const struct watch_options *opts,
                        watch_cb cb, void *arg, struct pb_error *err)
{
    if (!base || !root || !cb) {
        pb_error_set(err, -EINVAL, "watch: missing base, root or callback");
        return NULL;
    }
    struct watch *w = pb_xcalloc(1, sizeof(*w));
    w->base = base;
    w->cb = cb;
    w->arg = arg;
    w->rootfd = -1;
    w->ifd = -1;
    watch_options_init(&w->o);
    if (opts) {
        w->o = *opts;
        if (!w->o.debounce_ms)
            w->o.debounce_ms = 30;
        if (!w->o.write_hold_ms)
            w->o.write_hold_ms = 1000;
        if (!w->o.max_delay_ms)
            w->o.max_delay_ms = 5000;
        if (!w->o.rename_window_ms)
            w->o.rename_window_ms = 10;
        if (!w->o.retry_min_ms)
            w->o.retry_min_ms = 1000;
        if (!w->o.retry_max_ms)
            w->o.retry_max_ms = 300000;
        if (!w->o.scan_slice)
            w->o.scan_slice = 1024;
        if (!w->o.settle_ms)
            w->o.settle_ms = 5;
    }
    /* A MOVED_FROM must be resolved before its neighbours are flushed. */
    if (w->o.rename_window_ms >= w->o.debounce_ms)
        w->o.rename_window_ms = w->o.debounce_ms > 1 ? w->o.debounce_ms / 2 : 1;
    if (w->o.settle_ms > w->o.debounce_ms)
        w->o.settle_ms = w->o.debounce_ms;
    if (w->o.write_hold_ms < w->o.debounce_ms)
        w->o.write_hold_ms = w->o.debounce_ms;
    if (w->o.max_delay_ms < w->o.debounce_ms)
        w->o.max_delay_ms = w->o.debounce_ms;
    if (w->o.retry_max_ms < w->o.retry_min_ms)
        w->o.retry_max_ms = w->o.retry_min_ms;
    w->o.ignore = NULL;
    w->o.n_ignore = 0;
    size_t nign = opts ? opts->n_ignore : 0;
    w->pats = pb_xcalloc(nign ? nign : 1, sizeof(*w->pats));
    for (size_t i = 0; i < nign; i++) {
        if (!opts->ignore[i] || pattern_add(w, opts->ignore[i], err) < 0) {
            if (!opts->ignore[i])
                pb_error_set(err, -EINVAL, "watch: NULL ignore pattern");
            goto fail;
        }
    }
    w->rootfd = open(root, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (w->rootfd < 0) {
        int e = errno;
        struct stat st;
        bool link = lstat(root, &st) == 0 && S_ISLNK(st.st_mode);
        pb_error_set(err, -e, "watch: cannot open tree root %s: %s", root,
                     link ? "it is a symlink" : strerror(e));
        goto fail;
    }
    char *rp = realpath(root, NULL);
    if (!rp) {
        pb_error_set(err, -errno, "watch: cannot resolve %s: %s", root, strerror(errno));
        goto fail;
    }
    w->root = rp;
    w->ifd = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
    if (w->ifd < 0) {
        pb_error_set(err, -errno, "watch: inotify_init1: %s%s", strerror(errno),
                     errno == EMFILE ? " (raise fs.inotify.max_user_instances)" : "");
        goto fail;
    }
    w->nb_n = 64;
    w->nb = pb_xcalloc(w->nb_n, sizeof(*w->nb));
    w->wb_n = 64;
    w->wb = pb_xcalloc(w->wb_n, sizeof(*w->wb));
    w->rootn = pb_xcalloc(1, sizeof(*w->rootn));
    w->rootn->name = pb_xstrdup("");
    w->rootn->wd = -1;
    w->rootn->attached = true;
    w->rootn->reported = true;
    w->rootn->rep.type = WATCH_TYPE_DIR;
    w->ev_read = event_new(base, w->ifd, EV_READ | EV_PERSIST, on_inotify, w);
    w->ev_timer = evtimer_new(base, on_timer, w);
    w->ev_retry = evtimer_new(base, on_retry, w);
    w->ev_deferred = event_new(base, -1, 0, on_deferred, w);
    w->ev_scan = evtimer_new(base, on_scan, w);
    if (w->o.rescan_interval_ms)
        w->ev_periodic = event_new(base, -1, EV_PERSIST, on_periodic, w);
    if (!w->ev_read || !w->ev_timer || !w->ev_retry || !w->ev_deferred || !w->ev_scan ||
        (w->o.rescan_interval_ms && !w->ev_periodic) || event_add(w->ev_read, NULL) < 0) {
        pb_error_set(err, -ENOMEM, "watch: cannot create libevent events");
        goto fail;
    }
    if (w->ev_periodic) {
        struct timeval tv = {.tv_sec = w->o.rescan_interval_ms / 1000,
                             .tv_usec = (w->o.rescan_interval_ms % 1000) * 1000};
        event_add(w->ev_periodic, &tv);
    }
    w->need_full = true;
    event_active(w->ev_deferred, EV_TIMEOUT, 0);
    return w;
fail:
    watch_free(w);
    return NULL;
}

void watch_free(struct watch *w)
{
    if (!w)
        return;
    w->freeing = true;
    if (w->scan.dir)
        closedir(w->scan.dir);
    free(w->scan.stack.v);
    free(w->scan.end_path);
    w->scan.stack = (struct wstack){0};
    w->scan.dir = NULL;
    w->scan.cur = NULL;
    while (w->stash) {
        struct wstash *s = w->stash;
        w->stash = s->next;
        if (s->node)
            node_free_rec(w, s->node);
        stash_free(s);
    }
    while (w->rec_head)
        rec_unlink(w, w->rec_head);
    if (w->rootn) {
        while (w->rootn->child)
            node_free_rec(w, w->rootn->child);
        wd_remove(w, w->rootn);
        free(w->rootn->name);
        free(w->rootn->target);
        free(w->rootn);
    }
    if (w->ev_read)
        event_free(w->ev_read);
    if (w->ev_timer)
        event_free(w->ev_timer);
    if (w->ev_retry)
        event_free(w->ev_retry);
    if (w->ev_deferred)
        event_free(w->ev_deferred);
    if (w->ev_scan)
        event_free(w->ev_scan);
    if (w->ev_periodic)
        event_free(w->ev_periodic);
    if (w->ifd >= 0)
        close(w->ifd);
    if (w->rootfd >= 0)
        close(w->rootfd);
    for (size_t i = 0; i < w->npats; i++)
        free(w->pats[i].glob);
    free(w->pats);
    for (size_t i = 0; i < w->nholds; i++)
        free(w->holds[i].path);
    free(w->holds);
    for (size_t i = 0; i < w->nrescan_req; i++)
        free(w->rescan_req[i]);
    free(w->rescan_req);
    for (size_t i = 0; i < PB_ARRAY_SIZE(w->pb); i++)
        free(w->pb[i].p);
    free(w->comps);
    free(w->compl );
    free(w->stack.v);
    free(w->nb);
    free(w->wb);
    free(w->root);
    free(w);
}

int watch_rescan(struct watch *w, const char *subpath)
{
    if (!subpath)
        subpath = "";
    if (!path_valid(subpath))
        return -EINVAL;
    if (!*subpath) {
        w->need_full = true;
    } else {
        w->rescan_req = pb_xreallocarray(w->rescan_req, w->nrescan_req + 1, sizeof(char *));
        w->rescan_req[w->nrescan_req++] = pb_xstrdup(subpath);
    }
    event_active(w->ev_deferred, EV_TIMEOUT, 0);
    return 0;
}

int watch_suppress_begin(struct watch *w, const char *path)
{
    if (!path_valid(path) || !*path)
        return -EINVAL;
    for (size_t i = 0; i < w->nholds; i++)
        if (strcmp(w->holds[i].path, path) == 0) {
            w->holds[i].count++;
            return 0;
        }
    w->holds = pb_xreallocarray(w->holds, w->nholds + 1, sizeof(*w->holds));
    w->holds[w->nholds].path = pb_xstrdup(path);
    w->holds[w->nholds++].count = 1;
    return 0;
}

int watch_suppress_end(struct watch *w, const char *path, const struct watch_stat *st)
{
    if (!path_valid(path) || !*path)
        return -EINVAL;
    if (w->in_cb)
        return -EBUSY;
    int rc = -ENOENT;
    for (size_t i = 0; i < w->nholds; i++) {
        if (strcmp(w->holds[i].path, path) != 0)
            continue;
        rc = 0;
        if (--w->holds[i].count == 0) {
            free(w->holds[i].path);
            w->holds[i] = w->holds[--w->nholds];
        }
        break;
    }
    struct wnode *n = resolve_owner_path(w, path, st != NULL);
    if (n && st) {
        if (n->reported && n->rep.type == WATCH_TYPE_DIR && st->type != WATCH_TYPE_DIR)
            node_free_children(w, n);
        n->reported = true;
        n->rep = *st;
        free(n->target);
        n->target = NULL;
        struct stat lst;
        if (st->type == WATCH_TYPE_SYMLINK && tree_lstat(w, path, &lst, &n->target) < 0)
            n->target = NULL;
        if (st->type == WATCH_TYPE_DIR && n->wd < 0 && !n->unwatched)
            dir_added(w, n);
    } else if (n) {
        /* The owner removed it (or knows it is absent): forget what it knew,
         * and let flushes report whatever is still there. A rename of it
         * that is still pending (the user moved it away meanwhile) becomes
         * a creation at its new path. */
        for (struct wrec *r = w->rec_head; r;) {
            struct wrec *next = r->next;
            if (node_within(r->node, n) || node_within(r->from_parent, n)) {
                struct wnode *m = r->node;
                rec_unlink(w, r);
                if (!node_within(m, n))
                    subtree_redo(w, m);
            }
            r = next;
        }
        subtree_redo(w, n);
    }
    /* Released paths are flushed (and the timer set) on the next loop
     * turn: one pass for a whole batch of applies, not one per path. */
    timer_arm(w, pb_now_ms());
    return rc;
}

int watch_suppress_rename(struct watch *w, const char *from, const char *to)
{
    if (!path_valid(from) || !path_valid(to) || !*from || !*to)
        return -EINVAL;
    if (w->in_cb)
        return -EBUSY;
    struct wnode *m = resolve_owner_path(w, from, false);
    if (!m)
        return 0;
    const char *slash = strrchr(to, '/');
    struct wnode *parent = w->rootn;
    const char *name = to;
    if (slash) {
        char *pp = pb_xmalloc((size_t)(slash - to) + 1);
        memcpy(pp, to, (size_t)(slash - to));
        pp[slash - to] = '\0';
        parent = resolve_owner_path(w, pp, true);
        free(pp);
        name = slash + 1;
        if (!parent)
            return 0;
    }
    if (node_within(parent, m))
        return -EINVAL;
    struct wnode *t = node_lookup(w, parent, name, strlen(name));
    if (t == m)
        return 0;
    if (t)
        node_free_tree(w, t);
    node_detach(w, m);
    node_rename(m, name, strlen(name));
    node_attach(w, m, parent);
    return 0;
}

void watch_get_stats(const struct watch *w, struct watch_stats *out)
{
    *out = w->st;
    out->watches = w->nwatches;
    out->nodes = w->nnodes;
    out->pending = w->dirty.n + w->ready.n;
    for (const struct wrec *r = w->rec_head; r; r = r->next)
        out->pending++;
    for (const struct wstash *s = w->stash; s; s = s->next)
        out->pending++;
    if (w->scan.active)
        out->pending++; /* the rescan itself */
}

void watch_test_inject_overflow(struct watch *w)
{
    handle_event(w, -1, IN_Q_OVERFLOW, 0, NULL);
}

void watch_test_discard_events(struct watch *w)
{
    while (read(w->ifd, w->ibuf, sizeof(w->ibuf)) > 0)
        ;
}

/*
 * dirs.c: creating the tree, its marker and the state dir (see dirs.h).
 */
#include <config.h>

#include "daemon/dirs.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "daemon/nodeconf.h"
#include "lib/log.h"
#include "lib/util.h"

/* mkdir(path, mode) unless it is already a directory. Sets *created. */
static int dirs_make_one(const char *path, mode_t mode, bool *created)
{
    *created = false;
    if (mkdir(path, mode) == 0) {
        *created = true;
        return 0;
    }
    int e = errno;
    struct stat st;
    if (e == EEXIST && stat(path, &st) == 0)
        return S_ISDIR(st.st_mode) ? 0 : -ENOTDIR;
    return -e;
}

/* mkdir -p: parents get parent_mode, the last component mode. */
static int dirs_make_path(const char *path, mode_t parent_mode, mode_t mode, bool *created,
                          struct pb_error *err)
{
    char *p = pb_xstrdup(path);
    int rc = 0;
    bool made = false;
    for (char *s = p + 1; *s != '\0'; s++) {
        if (*s != '/')
            continue;
        *s = '\0';
        rc = dirs_make_one(p, parent_mode, &made);
        *s = '/';
        if (rc < 0)
            break;
    }
    if (rc == 0)
        rc = dirs_make_one(p, mode, created);
    if (rc < 0)
        pb_error_set(err, rc, "cannot create directory %s: %s", path, strerror(-rc));
    free(p);
    return rc;
}

int dirs_prepare(const struct pb_config *cfg, struct pb_error *err)
{
    bool created;
    int rc = dirs_make_path(cfg->data_dir, 0755, 0755, &created, err);
    if (rc < 0)
        return rc;
    if (created)
        log_notice("created data dir %s", cfg->data_dir);

    /* The marker is made for a new node only: an existing node (raft.db in
     * its state dir) whose tree lost it must see that (sm.h), not get a
     * fresh one on an empty, unmounted directory. */
    char *raftdb = pb_xasprintf("%s/raft.db", cfg->state_dir);
    bool existing = access(raftdb, F_OK) == 0;
    free(raftdb);
    if (!existing) {
        char *marker = pb_xasprintf("%s/.pickbox", cfg->data_dir);
        rc = dirs_make_path(marker, 0755, 0700, &created, err);
        free(marker);
        if (rc < 0)
            return rc;
    }

    rc = dirs_make_path(cfg->state_dir, 0755, 0700, &created, err);
    if (rc < 0)
        return rc;
    struct stat st;
    if (stat(cfg->state_dir, &st) < 0)
        return pb_error_set(err, -errno, "cannot stat state dir %s: %s", cfg->state_dir,
                            strerror(errno));
    if (st.st_mode & S_IWOTH)
        return pb_error_set(err, -EPERM, "state dir %s is writable by others (mode %04o)",
                            cfg->state_dir, (unsigned)(st.st_mode & 07777));
    return 0;
}

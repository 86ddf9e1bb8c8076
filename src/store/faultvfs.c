/*
 * faultvfs.c: a fault-injection shim over SQLite's default ("unix") VFS.
 *
 * Every method forwards to the real VFS. While a transaction armed by
 * store_fault_inject() runs, xWrite fails with SQLITE_FULL or
 * SQLITE_IOERR_WRITE, or xSync with SQLITE_IOERR_FSYNC, exactly as the real
 * VFS reports ENOSPC or EIO. SQLite then takes its own error and rollback
 * path, which is what the store's failure handling must survive. Unarmed, the
 * cost is one indirect call per I/O.
 *
 * Each store registers its own instance under a unique name and uses it for
 * its writer connection only, so faults never leak into another connection.
 */
#include "config.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lib/util.h"
#include "store/store_int.h"

struct store_fault_vfs {
    sqlite3_vfs vfs; /* registered; pAppData points back here */
    sqlite3_vfs *real;
    char name[48];
    atomic_int armed_kind;
    atomic_uint armed_n;
    int active; /* kind failing now; only the transaction's thread touches it */
};

struct fault_file {
    sqlite3_file base;
    struct store_fault_vfs *fv;
    sqlite3_file *real; /* lives right after this struct */
};

#define REAL(f) (((struct fault_file *)(f))->real)
#define FV(f)   (((struct fault_file *)(f))->fv)

static int fault_close(sqlite3_file *f)
{
    return REAL(f)->pMethods->xClose(REAL(f));
}

static int fault_read(sqlite3_file *f, void *p, int n, sqlite3_int64 off)
{
    return REAL(f)->pMethods->xRead(REAL(f), p, n, off);
}

static int fault_write(sqlite3_file *f, const void *p, int n, sqlite3_int64 off)
{
    if (FV(f)->active == STORE_FAULT_FULL)
        return SQLITE_FULL;
    if (FV(f)->active == STORE_FAULT_IOERR_WRITE)
        return SQLITE_IOERR_WRITE;
    return REAL(f)->pMethods->xWrite(REAL(f), p, n, off);
}

static int fault_truncate(sqlite3_file *f, sqlite3_int64 size)
{
    return REAL(f)->pMethods->xTruncate(REAL(f), size);
}

static int fault_sync(sqlite3_file *f, int flags)
{
    if (FV(f)->active == STORE_FAULT_IOERR_FSYNC)
        return SQLITE_IOERR_FSYNC;
    return REAL(f)->pMethods->xSync(REAL(f), flags);
}

static int fault_file_size(sqlite3_file *f, sqlite3_int64 *size)
{
    return REAL(f)->pMethods->xFileSize(REAL(f), size);
}

static int fault_lock(sqlite3_file *f, int l)
{
    return REAL(f)->pMethods->xLock(REAL(f), l);
}

static int fault_unlock(sqlite3_file *f, int l)
{
    return REAL(f)->pMethods->xUnlock(REAL(f), l);
}

static int fault_check_reserved_lock(sqlite3_file *f, int *out)
{
    return REAL(f)->pMethods->xCheckReservedLock(REAL(f), out);
}

static int fault_file_control(sqlite3_file *f, int op, void *arg)
{
    return REAL(f)->pMethods->xFileControl(REAL(f), op, arg);
}

static int fault_sector_size(sqlite3_file *f)
{
    return REAL(f)->pMethods->xSectorSize(REAL(f));
}

static int fault_device_characteristics(sqlite3_file *f)
{
    return REAL(f)->pMethods->xDeviceCharacteristics(REAL(f));
}

static int fault_shm_map(sqlite3_file *f, int pg, int pgsz, int extend, void volatile **pp)
{
    return REAL(f)->pMethods->xShmMap(REAL(f), pg, pgsz, extend, pp);
}

static int fault_shm_lock(sqlite3_file *f, int offset, int n, int flags)
{
    return REAL(f)->pMethods->xShmLock(REAL(f), offset, n, flags);
}

static void fault_shm_barrier(sqlite3_file *f)
{
    REAL(f)->pMethods->xShmBarrier(REAL(f));
}

static int fault_shm_unmap(sqlite3_file *f, int del)
{
    return REAL(f)->pMethods->xShmUnmap(REAL(f), del);
}

static int fault_fetch(sqlite3_file *f, sqlite3_int64 off, int n, void **pp)
{
    return REAL(f)->pMethods->xFetch(REAL(f), off, n, pp);
}

static int fault_unfetch(sqlite3_file *f, sqlite3_int64 off, void *p)
{
    return REAL(f)->pMethods->xUnfetch(REAL(f), off, p);
}

/* Version 3 methods; used only over a real file that has version 3 too
 * ("unix" does), else the version-1 table below. */
static const sqlite3_io_methods fault_methods_v3 = {
        3,
        fault_close,
        fault_read,
        fault_write,
        fault_truncate,
        fault_sync,
        fault_file_size,
        fault_lock,
        fault_unlock,
        fault_check_reserved_lock,
        fault_file_control,
        fault_sector_size,
        fault_device_characteristics,
        fault_shm_map,
        fault_shm_lock,
        fault_shm_barrier,
        fault_shm_unmap,
        fault_fetch,
        fault_unfetch,
};

static const sqlite3_io_methods fault_methods_v1 = {
        1,
        fault_close,
        fault_read,
        fault_write,
        fault_truncate,
        fault_sync,
        fault_file_size,
        fault_lock,
        fault_unlock,
        fault_check_reserved_lock,
        fault_file_control,
        fault_sector_size,
        fault_device_characteristics,
        NULL,
        NULL,
        NULL,
        NULL,
        NULL,
        NULL,
};

static int fault_open(sqlite3_vfs *vfs, sqlite3_filename name, sqlite3_file *file, int flags,
                      int *out_flags)
{
    struct store_fault_vfs *fv = vfs->pAppData;
    struct fault_file *ff = (struct fault_file *)file;
    ff->fv = fv;
    ff->real = (sqlite3_file *)(ff + 1);
    ff->base.pMethods = NULL;
    int rc = fv->real->xOpen(fv->real, name, ff->real, flags, out_flags);
    if (ff->real->pMethods != NULL)
        ff->base.pMethods =
                ff->real->pMethods->iVersion >= 3 ? &fault_methods_v3 : &fault_methods_v1;
    return rc;
}

static int fault_delete(sqlite3_vfs *vfs, const char *name, int sync_dir)
{
    struct store_fault_vfs *fv = vfs->pAppData;
    return fv->real->xDelete(fv->real, name, sync_dir);
}

static int fault_access(sqlite3_vfs *vfs, const char *name, int flags, int *out)
{
    struct store_fault_vfs *fv = vfs->pAppData;
    return fv->real->xAccess(fv->real, name, flags, out);
}

static int fault_full_pathname(sqlite3_vfs *vfs, const char *name, int n, char *out)
{
    struct store_fault_vfs *fv = vfs->pAppData;
    return fv->real->xFullPathname(fv->real, name, n, out);
}

static void *fault_dlopen(sqlite3_vfs *vfs, const char *name)
{
    struct store_fault_vfs *fv = vfs->pAppData;
    return fv->real->xDlOpen(fv->real, name);
}

static void fault_dlerror(sqlite3_vfs *vfs, int n, char *msg)
{
    struct store_fault_vfs *fv = vfs->pAppData;
    fv->real->xDlError(fv->real, n, msg);
}

static void (*fault_dlsym(sqlite3_vfs *vfs, void *h, const char *sym))(void)
{
    struct store_fault_vfs *fv = vfs->pAppData;
    return fv->real->xDlSym(fv->real, h, sym);
}

static void fault_dlclose(sqlite3_vfs *vfs, void *h)
{
    struct store_fault_vfs *fv = vfs->pAppData;
    fv->real->xDlClose(fv->real, h);
}

static int fault_randomness(sqlite3_vfs *vfs, int n, char *out)
{
    struct store_fault_vfs *fv = vfs->pAppData;
    return fv->real->xRandomness(fv->real, n, out);
}

static int fault_sleep(sqlite3_vfs *vfs, int us)
{
    struct store_fault_vfs *fv = vfs->pAppData;
    return fv->real->xSleep(fv->real, us);
}

static int fault_current_time(sqlite3_vfs *vfs, double *t)
{
    struct store_fault_vfs *fv = vfs->pAppData;
    return fv->real->xCurrentTime(fv->real, t);
}

static int fault_get_last_error(sqlite3_vfs *vfs, int n, char *out)
{
    struct store_fault_vfs *fv = vfs->pAppData;
    return fv->real->xGetLastError(fv->real, n, out);
}

static int fault_current_time_int64(sqlite3_vfs *vfs, sqlite3_int64 *t)
{
    struct store_fault_vfs *fv = vfs->pAppData;
    return fv->real->xCurrentTimeInt64(fv->real, t);
}

struct store_fault_vfs *store_fault_vfs_new(void)
{
    static atomic_uint instance;
    sqlite3_vfs *real = sqlite3_vfs_find(NULL);
    if (real == NULL || real->iVersion < 2)
        return NULL;
    struct store_fault_vfs *fv = pb_xcalloc(1, sizeof(*fv));
    fv->real = real;
    snprintf(fv->name, sizeof(fv->name), "pickbox-fault-%u", atomic_fetch_add(&instance, 1));
    sqlite3_vfs *v = &fv->vfs;
    v->iVersion = 2;
    v->szOsFile = (int)sizeof(struct fault_file) + real->szOsFile;
    v->mxPathname = real->mxPathname;
    v->zName = fv->name;
    v->pAppData = fv;
    v->xOpen = fault_open;
    v->xDelete = fault_delete;
    v->xAccess = fault_access;
    v->xFullPathname = fault_full_pathname;
    v->xDlOpen = fault_dlopen;
    v->xDlError = fault_dlerror;
    v->xDlSym = fault_dlsym;
    v->xDlClose = fault_dlclose;
    v->xRandomness = fault_randomness;
    v->xSleep = fault_sleep;
    v->xCurrentTime = fault_current_time;
    v->xGetLastError = fault_get_last_error;
    v->xCurrentTimeInt64 = fault_current_time_int64;
    if (sqlite3_vfs_register(v, 0) != SQLITE_OK) {
        free(fv);
        return NULL;
    }
    return fv;
}

const char *store_fault_vfs_name(const struct store_fault_vfs *f)
{
    return f->name;
}

void store_fault_vfs_free(struct store_fault_vfs *f)
{
    if (f == NULL)
        return;
    sqlite3_vfs_unregister(&f->vfs);
    free(f);
}

void store_fault_vfs_arm(struct store_fault_vfs *f, enum store_fault kind, unsigned n)
{
    atomic_store(&f->armed_kind, (int)kind);
    atomic_store(&f->armed_n, kind == STORE_FAULT_NONE ? 0 : n);
}

void store_fault_vfs_begin(struct store_fault_vfs *f)
{
    unsigned n = atomic_load(&f->armed_n);
    while (n > 0) {
        if (atomic_compare_exchange_weak(&f->armed_n, &n, n - 1)) {
            f->active = atomic_load(&f->armed_kind);
            return;
        }
    }
    f->active = STORE_FAULT_NONE;
}

void store_fault_vfs_end(struct store_fault_vfs *f)
{
    f->active = STORE_FAULT_NONE;
}

/* Compiled fast path for the commonest tar members: plain files, directories, symlinks.
 *
 * Unpacking spends most of its time on per-member work, and in Python that
 * work costs more than the kernel's.  extract_files() takes the tar reader's
 * buffer and creates, in one call, every consecutive member that needs no
 * judgement: a checksummed ustar/GNU header for a regular file whose name is
 * clean (no "..", ".", "//", ".wh."), whose parent directory is already open
 * in the caller's fd cache, and whose data lies entirely in the buffer.  The
 * first member that is anything else stops the batch; Python handles it with
 * the full rules and calls back.  So this file adds speed, never semantics:
 * whatever it does not understand it leaves alone.
 *
 * Headers are parsed with the GIL held (names become str keys for the fd
 * cache), then the GIL is released for the syscalls and SHA-256 of the whole
 * batch, so the decompression thread runs meanwhile.  A member whose syscalls
 * fail is unlinked and the batch stops before it: Python redoes it and raises
 * its own, precise error.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <openssl/evp.h>
#include <pthread.h>
#include <string.h>
#include <sys/stat.h>
#include <limits.h>
#include <unistd.h>

#define BLOCK 512
#define MAX_BATCH 512
#define PARALLEL_MIN 16
#define MAX_WALK_DEPTH 256
#define NAME_MAX_LEN (155 + 1 + 100)

typedef struct {
    int pfd;
    char kind;               /* 'f' file, 'd' directory, 'l' symlink */
    char base[NAME_MAX_LEN + 1];
    char link[101];
    int dirfd;               /* a directory's fd after creation, for the cache (or -1) */
    PyObject *key;           /* a directory's archive path: its cache key (new reference) */
    unsigned int mode;
    long long uid, gid, mtime, size;
    const unsigned char *data;
    Py_ssize_t end;          /* offset just past this member (data + padding) */
    PyObject *real;          /* rootfs-relative real path (new reference) */
    PyObject *parent_real;   /* new reference: cache_dir may evict its dict entry */
    unsigned char digest[32];
} member;

/* Octal field: optional leading spaces, digits, then only spaces/NULs.
 * Returns 0 and sets *out, or -1 for anything Python must judge (base-256, junk). */
static int octal(const unsigned char *p, int n, long long *out) {
    int i = 0;
    long long v = 0;
    if (n > 0 && (p[0] & 0x80))
        return -1;
    while (i < n && p[i] == ' ')
        i++;
    for (; i < n && p[i] >= '0' && p[i] <= '7'; i++) {
        if (v > (LLONG_MAX >> 3))
            return -1;
        v = (v << 3) | (p[i] - '0');
    }
    for (; i < n; i++)
        if (p[i] != ' ' && p[i] != '\0')
            return -1;
    *out = v;
    return 0;
}

static size_t field_len(const unsigned char *p, size_t n) {
    const unsigned char *z = memchr(p, 0, n);
    return z ? (size_t)(z - p) : n;
}

/* Parse one header at buf[pos]; 1 = fast member filled in, 0 = stop (Python's turn),
 * 2 = stop because the member's data is not all in the buffer yet, 3 = stop because
 * its parent directory is not open (yet: it may be created by this very batch). */
static int parse_member(const unsigned char *buf, Py_ssize_t len, Py_ssize_t pos,
                        PyObject *dirs, int rootless, member *m, Py_ssize_t *need) {
    const unsigned char *h = buf + pos;
    long long chk, sum = 0;
    char full[NAME_MAX_LEN + 1];
    size_t flen = 0;
    if (len - pos < BLOCK) {
        *need = BLOCK;
        return 2;
    }
    char t = (char)h[156];
    m->kind = (t == '0' || t == '\0') ? 'f' : t == '5' ? 'd' : t == '2' ? 'l' : 0;
    if (!m->kind)
        return 0;
    if (octal(h + 148, 8, &chk) < 0)
        return 0;
    for (int i = 0; i < BLOCK; i++)
        sum += (i >= 148 && i < 156) ? ' ' : h[i];
    if (sum != chk)
        return 0;
    int posix = memcmp(h + 257, "ustar\0", 6) == 0;
    if (!posix && memcmp(h + 257, "ustar  \0", 8) != 0)
        return 0;
    long long mode;
    if (octal(h + 100, 8, &mode) < 0 || octal(h + 108, 8, &m->uid) < 0 ||
        octal(h + 116, 8, &m->gid) < 0 || octal(h + 124, 12, &m->size) < 0 ||
        octal(h + 136, 12, &m->mtime) < 0)
        return 0;
    m->mode = (unsigned int)(mode & 07777);
    if (m->mtime > 9000000000LL)
        return 0;   /* its nanoseconds would overflow; Python copes */
    if (rootless && (m->uid || m->gid))
        return 0;   /* ownership goes to an xattr: Python's job */
    if (posix) {
        size_t plen = field_len(h + 345, 155);
        if (plen) {
            memcpy(full, h + 345, plen);
            full[plen] = '/';
            flen = plen + 1;
        }
    }
    size_t nlen = field_len(h, 100);
    memcpy(full + flen, h, nlen);
    flen += nlen;
    full[flen] = '\0';
    if (m->kind == 'd')
        while (flen > 1 && full[flen - 1] == '/')
            full[--flen] = '\0';   /* "usr/lib/": the usual spelling of a directory */
    if (flen == 0 || full[flen - 1] == '/' || strstr(full, ".wh.") != NULL)
        return 0;
    if (m->kind == 'l') {
        size_t llen = field_len(h + 157, 100);
        if (llen == 0)
            return 0;
        memcpy(m->link, h + 157, llen);
        m->link[llen] = '\0';
    }
    if (m->kind != 'f')
        m->size = 0;   /* header-only types carry no data, whatever the size field says */
    /* components: drop a leading "./" or "/" only; anything else irregular goes to Python */
    const char *name = full;
    if (name[0] == '/')
        name++;
    else if (name[0] == '.' && name[1] == '/')
        name += 2;
    if (*name == '\0' || strstr(name, "//") || strstr(name, "/./") || strstr(name, "/../") ||
        strncmp(name, "./", 2) == 0 || strncmp(name, "../", 3) == 0)
        return 0;
    const char *slash = strrchr(name, '/');
    const char *base = slash ? slash + 1 : name;
    if (strcmp(base, ".") == 0 || strcmp(base, "..") == 0)
        return 0;
    Py_ssize_t end = pos + BLOCK + (Py_ssize_t)((m->size + BLOCK - 1) / BLOCK * BLOCK);
    if (end > len) {
        *need = end - pos;
        return 2;
    }
    PyObject *key = PyUnicode_DecodeUTF8(name, slash ? slash - name : 0, "surrogateescape");
    if (key == NULL)
        return -1;
    PyObject *val = PyDict_GetItemWithError(dirs, key);
    Py_DECREF(key);
    if (val == NULL)
        return PyErr_Occurred() ? -1 : 3;
    if (!PyTuple_Check(val) || PyTuple_GET_SIZE(val) != 2)
        return 0;
    long pfd = PyLong_AsLong(PyTuple_GET_ITEM(val, 0));
    if (pfd == -1 && PyErr_Occurred())
        return -1;
    if (pfd < 0 || pfd > INT_MAX)
        return 0;
    PyObject *preal = PyTuple_GET_ITEM(val, 1);
    if (!PyUnicode_Check(preal))
        return 0;
    PyObject *bstr = PyUnicode_DecodeUTF8(base, (Py_ssize_t)strlen(base), "surrogateescape");
    if (bstr == NULL)
        return -1;
    if (PyUnicode_GET_LENGTH(preal) > 0) {
        m->real = PyUnicode_FromFormat("%U/%U", preal, bstr);
        Py_DECREF(bstr);
    } else {
        m->real = bstr;
    }
    if (m->real == NULL)
        return -1;
    m->key = NULL;
    m->dirfd = -1;
    if (m->kind == 'd') {
        m->key = PyUnicode_DecodeUTF8(name, (Py_ssize_t)strlen(name), "surrogateescape");
        if (m->key == NULL) {
            Py_CLEAR(m->real);
            return -1;
        }
    }
    m->pfd = (int)pfd;
    m->parent_real = Py_NewRef(preal);
    strcpy(m->base, base);
    m->data = h + BLOCK;
    m->end = end;
    return 1;
}

typedef struct {
    int rootless;
    long long euid, egid;
    unsigned int umask;
} opts;

static int write_all(int fd, const unsigned char *p, long long n) {
    while (n > 0) {
        ssize_t w = write(fd, p, n > (1 << 30) ? (1 << 30) : (size_t)n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        p += w;
        n -= w;
    }
    return 0;
}

static int owner_differs(const member *m, const opts *o) {
    return !o->rootless && (m->uid != o->euid || m->gid != o->egid);
}

/* A directory or symlink, as RootfsWriter._apply_entry makes a fresh one: directories
 * 0700 now, their mode and mtime applied by finish(); symlinks get owner and mtime. */
static int create_other(member *m, const opts *o) {
    if (m->kind == 'd') {
        if (mkdirat(m->pfd, m->base, 0700) < 0)
            return -1;
        if (owner_differs(m, o) &&
            fchownat(m->pfd, m->base, (uid_t)m->uid, (gid_t)m->gid, AT_SYMLINK_NOFOLLOW) < 0) {
            unlinkat(m->pfd, m->base, AT_REMOVEDIR);
            return -1;
        }
        m->dirfd = openat(m->pfd, m->base, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        return 0;
    }
    if (symlinkat(m->link, m->pfd, m->base) < 0)
        return -1;
    struct timespec ts[2] = {{(time_t)m->mtime, 0}, {(time_t)m->mtime, 0}};
    if ((owner_differs(m, o) &&
         fchownat(m->pfd, m->base, (uid_t)m->uid, (gid_t)m->gid, AT_SYMLINK_NOFOLLOW) < 0) ||
        utimensat(m->pfd, m->base, ts, AT_SYMLINK_NOFOLLOW) < 0) {
        unlinkat(m->pfd, m->base, 0);
        return -1;
    }
    return 0;
}

/* The syscalls for one member, mirroring RootfsWriter._apply_entry/_write_file
 * (chown first: it clears setuid bits; chmod only where creation left it wrong). */
static int create_member(member *m, const opts *o) {
    if (m->kind != 'f')
        return create_other(m, o);
    unsigned int cmode = (m->mode & 0777) | (o->rootless ? 0600 : 0);
    int fd = openat(m->pfd, m->base, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, cmode);
    if (fd < 0)
        return -1;
    int chowned = 0;
    if (write_all(fd, m->data, m->size) < 0)
        goto fail;
    if (owner_differs(m, o)) {
        if (fchown(fd, (uid_t)m->uid, (gid_t)m->gid) < 0)
            goto fail;
        chowned = 1;
    }
    if (chowned || o->rootless || (m->mode & (07000 | o->umask))) {
        if (fchmod(fd, m->mode) < 0)
            goto fail;
    }
    struct timespec ts[2] = {{(time_t)m->mtime, 0}, {(time_t)m->mtime, 0}};
    if (futimens(fd, ts) < 0)
        goto fail;
    if (EVP_Digest(m->data, (size_t)m->size, m->digest, NULL, EVP_sha256(), NULL) != 1)
        goto fail;
    if (close(fd) < 0) {
        fd = -1;
        goto fail;
    }
    return 0;
fail:
    if (fd >= 0)
        close(fd);
    unlinkat(m->pfd, m->base, 0);
    return -1;
}

typedef struct {
    member *ms;
    int from, to, done;   /* done: index of the first member not created */
    const opts *o;
} range;

static void *create_range(void *arg) {
    range *r = arg;
    for (r->done = r->from; r->done < r->to; r->done++)
        if (create_member(&r->ms[r->done], r->o) < 0)
            break;
    return NULL;
}

/* Create ms[0:n] on two threads (the kernel's share of creating a file is most of
 * its cost and runs in parallel outside the directory lock).  Returns the length of
 * the prefix that was created; members after it may exist too, and are redone (and
 * so replaced) by Python like any member that finds its name taken. */
static int create_members(member *ms, int n, const opts *o) {
    range a = {ms, 0, n, 0, o}, b;
    pthread_t t;
    if (n >= PARALLEL_MIN) {
        a.to = n / 2;
        b = (range){ms, n / 2, n, n / 2, o};
        if (pthread_create(&t, NULL, create_range, &b) == 0) {
            create_range(&a);
            pthread_join(t, NULL);
            return a.done < a.to ? a.done : b.done;
        }
        a.to = n;
    }
    create_range(&a);
    return a.done;
}

/* Put a directory made by this batch in the caller's cache of open directories,
 * evicting the oldest entry but the root (always first) when full; evicted fds go to
 * *stale* for the caller to close between members.  Takes ownership of m->dirfd. */
static int cache_dir(PyObject *dirs, PyObject *stale, Py_ssize_t limit, member *m) {
    int fd = m->dirfd;
    m->dirfd = -1;
    if (fd < 0)
        return 0;
    if (PyDict_GET_SIZE(dirs) > limit) {
        Py_ssize_t it = 0;
        PyObject *k = NULL, *v = NULL;
        while (PyDict_Next(dirs, &it, &k, &v))
            if (PyUnicode_GET_LENGTH(k) > 0)
                break;
        if (k != NULL && PyUnicode_GET_LENGTH(k) > 0 && PyTuple_Check(v)) {
            if (PyList_Append(stale, PyTuple_GET_ITEM(v, 0)) < 0 || PyDict_DelItem(dirs, k) < 0) {
                close(fd);
                return -1;
            }
        }
    }
    PyObject *val = Py_BuildValue("(iO)", fd, m->real);
    if (val == NULL || PyDict_SetItem(dirs, m->key, val) < 0) {
        Py_XDECREF(val);
        close(fd);
        return -1;
    }
    Py_DECREF(val);
    return 0;
}

PyDoc_STRVAR(extract_files_doc,
"extract_files(buf, pos, dirs, stale, limit, hashes, layer_paths, dir_meta, rootless,\n"
"              euid, egid, umask) -> (pos, entries, files, nbytes, parents, need)\n\n"
"Create the consecutive plain file, directory and symlink members of the tar data\n"
"in buf[pos:].  dirs maps an archive parent path ('a/b', '' for the root, first) to\n"
"(dir fd, real path); directories made here are added to it (at most limit + 1\n"
"entries; evicted fds are appended to stale, for the caller to close).  Each created\n"
"member's real path joins layer_paths, a file's gets its\n"
"SHA-256 in hashes, a directory's gets (mode, mtime_ns) in dir_meta.  Returns the\n"
"offset of the first member left to the caller, how many members and files were\n"
"made, the files' data bytes, the distinct parent real paths, and, when the batch\n"
"stopped at a member whose data is not in buf yet, that member's length (else 0).");

static PyObject *extract_files(PyObject *self, PyObject *args) {
    Py_buffer view;
    Py_ssize_t pos;
    PyObject *dirs, *stale, *hashes, *paths, *dir_meta;
    Py_ssize_t limit;
    opts o;
    if (!PyArg_ParseTuple(args, "y*nO!O!nO!O!O!pLLI", &view, &pos, &PyDict_Type, &dirs,
                          &PyList_Type, &stale, &limit, &PyDict_Type, &hashes, &PySet_Type,
                          &paths, &PyDict_Type, &dir_meta, &o.rootless, &o.euid, &o.egid,
                          &o.umask))
        return NULL;
    const unsigned char *buf = view.buf;
    Py_ssize_t len = view.len;
    member *ms = PyMem_Malloc(sizeof(member) * MAX_BATCH);
    PyObject *parents = PyList_New(0);
    PyObject *result = NULL;
    Py_ssize_t need = 0, files = 0, entries = 0;
    long long nbytes = 0;
    if (ms == NULL || parents == NULL) {
        PyErr_NoMemory();
        goto out;
    }
    if (pos < 0 || pos > len) {
        PyErr_SetString(PyExc_ValueError, "pos out of range");
        goto out;
    }
    for (;;) {
        int n = 0, why = 1, made_dirs = 0;
        Py_ssize_t p = pos;
        need = 0;
        while (n < MAX_BATCH) {
            why = parse_member(buf, len, p, dirs, o.rootless, &ms[n], &need);
            if (why < 0) {
                for (int i = 0; i < n; i++) {
                    Py_DECREF(ms[i].real);
                    Py_DECREF(ms[i].parent_real);
                    Py_XDECREF(ms[i].key);
                }
                goto out;
            }
            if (why != 1)
                break;
            made_dirs |= ms[n].kind == 'd';
            p = ms[n].end;
            n++;
        }
        if (why != 2)
            need = 0;
        int done;
        Py_BEGIN_ALLOW_THREADS
        done = create_members(ms, n, &o);
        Py_END_ALLOW_THREADS
        int err = 0;
        PyObject *last = NULL;
        for (int i = 0; i < n; i++) {
            if (i < done && !err) {
                PyObject *d;
                if (ms[i].kind == 'f')
                    d = PyBytes_FromStringAndSize((const char *)ms[i].digest, 32);
                else if (ms[i].kind == 'd')
                    d = Py_BuildValue("(IL)", ms[i].mode, ms[i].mtime * 1000000000LL);
                else
                    d = Py_NewRef(Py_None);
                if (d == NULL || PySet_Add(paths, ms[i].real) < 0 ||
                    (ms[i].kind == 'f' && PyDict_SetItem(hashes, ms[i].real, d) < 0) ||
                    (ms[i].kind == 'd' && (PyDict_SetItem(dir_meta, ms[i].real, d) < 0 ||
                                           cache_dir(dirs, stale, limit, &ms[i]) < 0)))
                    err = 1;
                Py_XDECREF(d);
                if (!err && ms[i].parent_real != last) {
                    last = ms[i].parent_real;
                    if (PyList_Append(parents, last) < 0)
                        err = 1;
                }
                if (!err) {
                    pos = ms[i].end;
                    entries++;
                    if (ms[i].kind == 'f') {
                        files++;
                        nbytes += ms[i].size;
                    }
                }
            }
            if (ms[i].dirfd >= 0)   /* not cached: made after a failure, or on error */
                close(ms[i].dirfd);
            Py_DECREF(ms[i].real);
            Py_XDECREF(ms[i].key);
        }
        for (int i = 0; i < n; i++)   /* after the loop: 'last' compares these pointers */
            Py_DECREF(ms[i].parent_real);
        if (err)
            goto out;
        if (done < n) {
            need = 0;   /* a syscall failed: Python redoes that member */
            break;
        }
        /* stopped at a member inside a directory this batch made: go on with it */
        if (why == 3 && made_dirs)
            continue;
        if (why != 1)
            break;
    }
    result = Py_BuildValue("nnnLOn", pos, entries, files, nbytes, parents, need);
out:
    PyMem_Free(ms);
    Py_XDECREF(parents);
    PyBuffer_Release(&view);
    return result;
}

/* ---- the stat snapshot (lamina.layer.snapshot) ------------------------------ */

static char type_code(mode_t m) {
    switch (m & S_IFMT) {
    case S_IFREG: return 'f';
    case S_IFDIR: return 'd';
    case S_IFLNK: return 'l';
    case S_IFCHR: return 'c';
    case S_IFBLK: return 'b';
    case S_IFIFO: return 'p';
    case S_IFSOCK: return 's';
    default: return '?';
    }
}

static long long ns(struct timespec t) { return (long long)t.tv_sec * 1000000000LL + t.tv_nsec; }

/* Rows of every entry beneath dfd (which this consumes), paths prefixed by prefix. */
static int walk_dir(int dfd, PyObject *prefix, PyObject *hashes, PyObject *rows, int depth) {
    if (depth > MAX_WALK_DEPTH) {   /* hostile nesting: Python's iterative walk copes */
        close(dfd);
        PyErr_SetString(PyExc_RecursionError, "directory tree too deep for the fast walk");
        return -1;
    }
    DIR *d = fdopendir(dfd);
    if (d == NULL) {
        close(dfd);
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    int rc = 0;
    struct dirent *de;
    for (;;) {
        errno = 0;
        de = readdir(d);
        if (de == NULL) {
            if (errno) {
                PyErr_SetFromErrno(PyExc_OSError);
                rc = -1;
            }
            break;
        }
        const char *n = de->d_name;
        if (n[0] == '.' && (n[1] == '\0' || (n[1] == '.' && n[2] == '\0')))
            continue;
        struct stat st;
        if (fstatat(dirfd(d), n, &st, AT_SYMLINK_NOFOLLOW) < 0) {
            PyErr_SetFromErrno(PyExc_OSError);
            rc = -1;
            break;
        }
        PyObject *name = PyUnicode_DecodeFSDefault(n);
        PyObject *path = name == NULL ? NULL
            : PyUnicode_GET_LENGTH(prefix) ? PyUnicode_FromFormat("%U/%U", prefix, name)
                                           : Py_NewRef(name);
        Py_XDECREF(name);
        if (path == NULL) {
            rc = -1;
            break;
        }
        char t = type_code(st.st_mode);
        PyObject *extra;
        if (t == 'f') {
            extra = PyDict_GetItemWithError(hashes, path);
            extra = extra ? Py_NewRef(extra) : PyErr_Occurred() ? NULL : PyBytes_FromString("");
        } else if (t == 'l') {
            static char buf[PATH_MAX + 1];   /* the GIL is held throughout */
            ssize_t k = readlinkat(dirfd(d), n, buf, PATH_MAX);
            extra = k < 0 ? PyErr_SetFromErrno(PyExc_OSError)
                          : PyUnicode_DecodeFSDefaultAndSize(buf, k);
        } else {
            extra = PyUnicode_FromString("");
        }
        PyObject *row = extra == NULL ? NULL : Py_BuildValue(
            "(OC" "IIILLLKO)", path, (int)t, (unsigned)st.st_mode, (unsigned)st.st_uid,
            (unsigned)st.st_gid, (long long)st.st_size, ns(st.st_mtim), ns(st.st_ctim),
            (unsigned long long)st.st_ino, extra);
        Py_XDECREF(extra);
        if (row == NULL || PyList_Append(rows, row) < 0) {
            Py_XDECREF(row);
            Py_DECREF(path);
            rc = -1;
            break;
        }
        Py_DECREF(row);
        if (t == 'd') {
            int sub = openat(dirfd(d), n, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
            if (sub < 0) {
                PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, path);
                Py_DECREF(path);
                rc = -1;
                break;
            }
            rc = walk_dir(sub, path, hashes, rows, depth + 1);
        }
        Py_DECREF(path);
        if (rc < 0)
            break;
    }
    closedir(d);
    return rc;
}

PyDoc_STRVAR(snapshot_rows_doc,
"snapshot_rows(dir_fd, hashes) -> list of rows\n\n"
"lamina.layer.snapshot rows of every entry beneath the directory dir_fd (not itself;\n"
"the fd is not consumed), never following symlinks.  A file's row carries\n"
"hashes.get(path, b''), a symlink's its target.  Raises OSError (PermissionError for a\n"
"directory it may not read: the caller falls back to a walk that can fix modes).");

static PyObject *snapshot_rows(PyObject *self, PyObject *args) {
    int fd;
    PyObject *hashes;
    if (!PyArg_ParseTuple(args, "iO!", &fd, &PyDict_Type, &hashes))
        return NULL;
    PyObject *rows = PyList_New(0);
    PyObject *empty = PyUnicode_FromString("");
    if (rows == NULL || empty == NULL)
        goto fail;
    int dfd = openat(fd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        goto fail;
    }
    if (walk_dir(dfd, empty, hashes, rows, 0) < 0)
        goto fail;
    Py_DECREF(empty);
    return rows;
fail:
    Py_XDECREF(rows);
    Py_XDECREF(empty);
    return NULL;
}

static PyMethodDef methods[] = {
    {"extract_files", extract_files, METH_VARARGS, extract_files_doc},
    {"snapshot_rows", snapshot_rows, METH_VARARGS, snapshot_rows_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    .m_base = PyModuleDef_HEAD_INIT,
    .m_name = "lamina._fastpath",
    .m_doc = "Compiled fast path for plain members while unpacking (see extract.py).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__fastpath(void) { return PyModule_Create(&module); }

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

#include <errno.h>
#include <fcntl.h>
#include <openssl/evp.h>
#include <pthread.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define BLOCK 512
#define MAX_BATCH 512
#define PARALLEL_MIN 16
#define NAME_MAX_LEN (155 + 1 + 100)

typedef struct {
    int pfd;
    char kind;               /* 'f' file, 'd' directory, 'l' symlink */
    char base[NAME_MAX_LEN + 1];
    char link[101];
    unsigned int mode;
    long long uid, gid, mtime, size;
    const unsigned char *data;
    Py_ssize_t end;          /* offset just past this member (data + padding) */
    PyObject *real;          /* rootfs-relative real path (new reference) */
    PyObject *parent_real;   /* borrowed from the dirs dict value */
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
 * 2 = stop because the member's data is not all in the buffer yet. */
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
        return PyErr_Occurred() ? -1 : 0;
    if (!PyTuple_Check(val) || PyTuple_GET_SIZE(val) != 2)
        return 0;
    long pfd = PyLong_AsLong(PyTuple_GET_ITEM(val, 0));
    if (pfd == -1 && PyErr_Occurred())
        return -1;
    if (pfd < 0 || pfd > INT_MAX)
        return 0;
    PyObject *preal = PyTuple_GET_ITEM(val, 1);
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
    m->pfd = (int)pfd;
    m->parent_real = preal;
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

PyDoc_STRVAR(extract_files_doc,
"extract_files(buf, pos, dirs, hashes, layer_paths, dir_meta, rootless, euid, egid,\n"
"              umask) -> (pos, entries, files, nbytes, parents, need)\n\n"
"Create the consecutive plain file, directory and symlink members of the tar data\n"
"in buf[pos:].  dirs maps an archive parent path ('a/b', '' for the root) to (dir fd,\n"
"real path); each created member's real path joins layer_paths, a file's gets its\n"
"SHA-256 in hashes, a directory's gets (mode, mtime_ns) in dir_meta.  Returns the\n"
"offset of the first member left to the caller, how many members and files were\n"
"made, the files' data bytes, the distinct parent real paths, and, when the batch\n"
"stopped at a member whose data is not in buf yet, that member's length (else 0).");

static PyObject *extract_files(PyObject *self, PyObject *args) {
    Py_buffer view;
    Py_ssize_t pos;
    PyObject *dirs, *hashes, *paths, *dir_meta;
    opts o;
    if (!PyArg_ParseTuple(args, "y*nO!O!O!O!pLLI", &view, &pos, &PyDict_Type, &dirs,
                          &PyDict_Type, &hashes, &PySet_Type, &paths, &PyDict_Type, &dir_meta,
                          &o.rootless, &o.euid, &o.egid, &o.umask))
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
        int n = 0, stopped = 0;
        Py_ssize_t p = pos;
        while (n < MAX_BATCH) {
            int r = parse_member(buf, len, p, dirs, o.rootless, &ms[n], &need);
            if (r < 0) {
                for (int i = 0; i < n; i++)
                    Py_DECREF(ms[i].real);
                goto out;
            }
            if (r != 1) {
                stopped = 1;
                break;
            }
            p = ms[n].end;
            n++;
        }
        if (!stopped)
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
                    (ms[i].kind == 'd' && PyDict_SetItem(dir_meta, ms[i].real, d) < 0))
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
            Py_DECREF(ms[i].real);
        }
        if (err)
            goto out;
        if (done < n) {
            need = 0;   /* a syscall failed: Python redoes that member */
            break;
        }
        if (stopped)
            break;
    }
    result = Py_BuildValue("nnnLOn", pos, entries, files, nbytes, parents, need);
out:
    PyMem_Free(ms);
    Py_XDECREF(parents);
    PyBuffer_Release(&view);
    return result;
}

static PyMethodDef methods[] = {
    {"extract_files", extract_files, METH_VARARGS, extract_files_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "lamina._fastpath",
    "Compiled fast path for plain regular files while unpacking (see extract.py).", -1,
    methods,
};

PyMODINIT_FUNC PyInit__fastpath(void) { return PyModule_Create(&module); }

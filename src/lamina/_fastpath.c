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
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/xattr.h>
#include <limits.h>
#include <unistd.h>

#define BLOCK 512
#define MAX_BATCH 512
#define PARALLEL_MIN 16
#define MAX_WALK_DEPTH 256
#define NAME_MAX_LEN (155 + 1 + 100)
#ifndef FICLONE
#define FICLONE 0x40049409
#endif

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
    /* split streams (place_files): the content is a store object, not in buf */
    int chunk;               /* took a file chunk (the next object of the stream) */
    char obj[72];            /* that object's name below objects_fd: "ab/cdef..." */
    int placed;              /* 1 cloned, 2 copied, 3 linked to a farm inode */
    int farm_new;            /* made the farm inode fname */
    int adopted;             /* ... from the store object's own inode */
    char fname[65];          /* the farm inode's name (link placement) */
    int idx;                 /* position in the batch: a unique temporary farm name */
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
/* The file chunks of a split stream (place_files): files[fi] is the next unconsumed
 * Chunk (or None: inline data, Python's case). */
typedef struct {
    PyObject *files;
    Py_ssize_t fi;
} split_src;

static int hexval(int c) {
    return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
}

/* Take the next file chunk for a member of size m->size: 1 done, 0 Python's turn
 * (inline data, a name that is no digest, a size that disagrees), 2 not read yet,
 * -1 error. */
static int take_chunk(split_src *sp, member *m) {
    if (sp->fi >= PyList_GET_SIZE(sp->files))
        return 2;
    PyObject *c = PyList_GET_ITEM(sp->files, sp->fi);
    if (c == Py_None)
        return 0;
    PyObject *size = PyObject_GetAttrString(c, "size");
    if (size == NULL)
        return -1;
    long long n = PyLong_AsLongLong(size);
    Py_DECREF(size);
    if (n == -1 && PyErr_Occurred())
        return -1;
    if (n != m->size)
        return 0;
    PyObject *dix = PyObject_GetAttrString(c, "dirfd_index");
    if (dix == NULL)
        return -1;
    long ix = PyLong_AsLong(dix);
    Py_DECREF(dix);
    if (ix == -1 && PyErr_Occurred())
        return -1;
    if (ix != 0)
        return 0;   /* not below objects/: Python's open_ref judges it */
    PyObject *name = PyObject_GetAttrString(c, "name");
    if (name == NULL)
        return -1;
    int ok = PyBytes_Check(name) && PyBytes_GET_SIZE(name) == 65 &&
             PyBytes_AS_STRING(name)[2] == '/';
    if (ok) {
        const char *t = PyBytes_AS_STRING(name);
        for (int i = 0, j = 0; i < 65 && ok; i++) {
            if (i == 2)
                continue;
            int v = hexval((unsigned char)t[i]);
            if (v < 0) {
                ok = 0;
                break;
            }
            if (j % 2 == 0)
                m->digest[j / 2] = (unsigned char)(v << 4);
            else
                m->digest[j / 2] |= (unsigned char)v;
            j++;
        }
        if (ok)
            memcpy(m->obj, t, 66);
    }
    Py_DECREF(name);
    if (!ok)
        return 0;   /* a split made elsewhere: Python opens it by name */
    m->chunk = 1;
    sp->fi++;
    return 1;
}

static int parse_member(const unsigned char *buf, Py_ssize_t len, Py_ssize_t pos,
                        PyObject *dirs, int rootless, member *m, Py_ssize_t *need,
                        split_src *sp) {
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
    m->chunk = 0;
    m->placed = 0;
    m->farm_new = 0;
    m->adopted = 0;
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
    if (sp != NULL && m->kind == 'f' && m->size > 0)
        end -= (Py_ssize_t)m->size;   /* only the padding is in the stream */
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
    if (sp != NULL && m->kind == 'f' && m->size > 0) {
        int got = take_chunk(sp, m);
        if (got != 1) {
            if (got == 2)
                *need = end - pos + BLOCK;   /* the chunk comes with the next read */
            return got;
        }
    }
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
    /* place_files: file contents are store objects */
    int objects_fd;
    int copy_only;           /* never FICLONE (copy placement) */
    int farm_fd;             /* link placement: the layer's link farm, else -1 */
    const char *farm_key;    /* prefix of every farm inode name's hash */
    Py_ssize_t farm_key_len;
    int adopt;               /* no reflinks: a farm inode is the object's inode if free */
    volatile int *no_clone;
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

/* Fill dst with a store object's content: FICLONE (shared extents), else
 * copy_file_range, else read/write.  *no_clone remembers a refused FICLONE. */
static int fill_object(int src, int dst, long long size, int copy_only, volatile int *no_clone,
                       int *cloned) {
    *cloned = 0;
    if (!copy_only && !*no_clone) {
        if (ioctl(dst, FICLONE, src) == 0) {
            *cloned = 1;
            return 0;
        }
        if (errno != EOPNOTSUPP && errno != ENOTTY && errno != EXDEV && errno != EINVAL &&
            errno != ENOSYS && errno != EPERM && errno != EBADF && errno != ETXTBSY)
            return -1;
        *no_clone = 1;
    }
    off_t off = 0;
    while (off < size) {
        off_t in = off, out = off;
        ssize_t n = copy_file_range(src, &in, dst, &out, (size_t)(size - off), 0);
        if (n < 0 && (errno == EXDEV || errno == EINVAL || errno == ENOSYS ||
                      errno == EOPNOTSUPP)) {
            char buf[1 << 16];
            n = pread(src, buf, sizeof buf < (size_t)(size - off) ? sizeof buf
                                                                  : (size_t)(size - off), off);
            if (n > 0 && pwrite(dst, buf, (size_t)n, off) != n)
                return -1;
        }
        if (n < 0)
            return -1;
        if (n == 0) {
            errno = EIO;   /* the object shrank: the store is damaged */
            return -1;
        }
        off += n;
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

/* A new inode at dfd/name with the member's content and metadata, mirroring
 * RootfsWriter._write_file (chown first: it clears setuid bits; chmod only where
 * creation left it wrong).  Removed again on failure. */
static int make_file(member *m, const opts *o, int dfd, const char *name) {
    unsigned int cmode = (m->mode & 0777) | (o->rootless ? 0600 : 0);
    int fd = openat(dfd, name, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, cmode);
    if (fd < 0)
        return -1;
    int chowned = 0, src = -1;
    if (m->chunk) {
        int cloned;
        src = openat(o->objects_fd, m->obj, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK);
        if (src < 0 || lseek(src, 0, SEEK_END) != m->size)
            goto fail;   /* Python redoes it and says what is wrong with the store */
        if (fill_object(src, fd, m->size, o->copy_only, o->no_clone, &cloned) < 0)
            goto fail;
        close(src);
        src = -1;
        m->placed = cloned ? 1 : 2;
    } else if (write_all(fd, m->data, m->size) < 0) {
        goto fail;
    }
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
    if (!m->chunk &&
        EVP_Digest(m->data, (size_t)m->size, m->digest, NULL, EVP_sha256(), NULL) != 1)
        goto fail;
    if (close(fd) < 0) {
        fd = -1;
        goto fail;
    }
    return 0;
fail:
    if (src >= 0)
        close(src);
    if (fd >= 0)
        close(fd);
    unlinkat(dfd, name, 0);
    m->placed = 0;
    return -1;
}

/* Link placement: a hardlink to the farm inode with the member's content and
 * metadata, made (under a temporary name, renamed when complete) if the farm has
 * none yet.  As StoreRootfsWriter._farm_inode names it. */
/* The object's inode as the farm inode tmp (StoreRootfsWriter._adopt_object): 1 done,
 * 0 not ours alone (nothing changed), -1 failed. */
static int adopt_object(member *m, const opts *o, const char *tmp) {
    if (linkat(o->objects_fd, m->obj, o->farm_fd, tmp, 0) < 0)
        return 0;
    struct stat st;
    int fd = openat(o->farm_fd, tmp, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0 || fstat(fd, &st) < 0 || st.st_nlink != 2 || st.st_uid != (uid_t)o->euid ||
        !S_ISREG(st.st_mode) || st.st_size != m->size) {
        if (fd >= 0)
            close(fd);
        unlinkat(o->farm_fd, tmp, 0);
        return 0;
    }
    struct timespec ts[2] = {{(time_t)m->mtime, 0}, {(time_t)m->mtime, 0}};
    if ((!o->rootless && fchown(fd, (uid_t)m->uid, (gid_t)m->gid) < 0) ||
        fchmod(fd, m->mode) < 0 || futimens(fd, ts) < 0) {
        close(fd);
        unlinkat(o->farm_fd, tmp, 0);
        return -1;
    }
    close(fd);
    return 1;
}

static int link_member(member *m, const opts *o) {
    if (linkat(o->farm_fd, m->fname, m->pfd, m->base, 0) == 0) {
        m->placed = 3;
        return 0;
    }
    if (errno != ENOENT)
        return -1;   /* EEXIST: the path is taken, Python replaces what is there */
    char tmp[128];
    snprintf(tmp, sizeof tmp, ".%s.%d.%d", m->fname, (int)getpid(), m->idx);
    unlinkat(o->farm_fd, tmp, 0);   /* a leftover of a killed run with the same pid */
    int adopted = o->adopt ? adopt_object(m, o, tmp) : 0;
    if (adopted < 0 || (!adopted && make_file(m, o, o->farm_fd, tmp) < 0))
        return -1;
    if (renameat2(o->farm_fd, tmp, o->farm_fd, m->fname, RENAME_NOREPLACE) == 0) {
        m->farm_new = 1;
        m->adopted = adopted;
    }
    else if (errno == EEXIST)   /* the other thread made the same inode meanwhile */
        unlinkat(o->farm_fd, tmp, 0);
    else {
        unlinkat(o->farm_fd, tmp, 0);
        return -1;
    }
    if (linkat(o->farm_fd, m->fname, m->pfd, m->base, 0) < 0)
        return -1;
    m->placed = 3;
    return 0;
}

static int create_member(member *m, const opts *o) {
    if (m->kind != 'f')
        return create_other(m, o);
    if (m->chunk && o->farm_fd >= 0)
        return link_member(m, o);
    return make_file(m, o, m->pfd, m->base);
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

/* The batches of extract_files and place_files (sp != NULL: a split stream).
 * Returns (pos, entries, files, nbytes, parents, need) plus, for place_files, the
 * placement counts and the farm inodes made. */
typedef struct {
    Py_ssize_t entries, files;
    long long nbytes, cloned, copied, linked, adopted;
    PyObject *parents, *farm_made;
} batch_out;

static int farm_name(member *m, const opts *o) {
    char tail[160];
    unsigned char d[32];
    int n = snprintf(tail, sizeof tail, "%s|%u|%lld|%lld|%lld", m->obj, m->mode, m->uid,
                     m->gid, m->mtime * 1000000000LL);
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    int ok = ctx != NULL && EVP_DigestInit_ex(ctx, EVP_sha256(), NULL) == 1 &&
             EVP_DigestUpdate(ctx, o->farm_key, (size_t)o->farm_key_len) == 1 &&
             EVP_DigestUpdate(ctx, tail, (size_t)n) == 1 &&
             EVP_DigestFinal_ex(ctx, d, NULL) == 1;
    EVP_MD_CTX_free(ctx);
    if (!ok) {
        PyErr_SetString(PyExc_RuntimeError, "sha256 failed");
        return -1;
    }
    static const char hx[] = "0123456789abcdef";
    for (int i = 0; i < 32; i++) {
        m->fname[2 * i] = hx[d[i] >> 4];
        m->fname[2 * i + 1] = hx[d[i] & 15];
    }
    m->fname[64] = '\0';
    return 0;
}

static int run_batches(const unsigned char *buf, Py_ssize_t len, Py_ssize_t *posp,
                       PyObject *dirs, PyObject *stale, Py_ssize_t limit, PyObject *hashes,
                       PyObject *paths, PyObject *dir_meta, opts *o, split_src *sp,
                       Py_ssize_t *needp, batch_out *out) {
    member *ms = PyMem_Malloc(sizeof(member) * MAX_BATCH);
    Py_ssize_t pos = *posp, need = 0;
    int rc = -1;
    if (ms == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    if (pos < 0 || pos > len) {
        PyErr_SetString(PyExc_ValueError, "pos out of range");
        goto out;
    }
    for (;;) {
        int n = 0, why = 1, made_dirs = 0;
        Py_ssize_t p = pos, fi0 = sp ? sp->fi : 0;
        need = 0;
        while (n < MAX_BATCH) {
            why = parse_member(buf, len, p, dirs, o->rootless, &ms[n], &need, sp);
            if (why == 1 && ms[n].chunk && o->farm_fd >= 0 && farm_name(&ms[n], o) < 0)
                why = -1, n++;   /* release this member's references below */
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
            ms[n].idx = n;
            made_dirs |= ms[n].kind == 'd';
            p = ms[n].end;
            n++;
        }
        if (why != 2)
            need = 0;
        int done;
        Py_BEGIN_ALLOW_THREADS
        done = create_members(ms, n, o);
        Py_END_ALLOW_THREADS
        int err = 0;
        PyObject *last = NULL;
        Py_ssize_t used = 0;   /* file chunks of the created members */
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
                out->adopted += ms[i].adopted;
                if (!err && ms[i].farm_new) {
                    PyObject *f = PyUnicode_FromString(ms[i].fname);
                    if (f == NULL || PyList_Append(out->farm_made, f) < 0)
                        err = 1;
                    Py_XDECREF(f);
                }
                if (!err && ms[i].parent_real != last) {
                    last = ms[i].parent_real;
                    if (PyList_Append(out->parents, last) < 0)
                        err = 1;
                }
                if (!err) {
                    pos = ms[i].end;
                    out->entries++;
                    used += ms[i].chunk;
                    if (ms[i].kind == 'f') {
                        out->files++;
                        out->nbytes += ms[i].size;
                        out->cloned += ms[i].placed == 1;
                        out->copied += ms[i].placed == 2;
                        out->linked += ms[i].placed == 3;
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
        if (sp)
            sp->fi = fi0 + used;   /* members not created give their chunks back */
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
    rc = 0;
out:
    *posp = pos;
    *needp = need;
    PyMem_Free(ms);
    return rc;
}

static PyObject *extract_files(PyObject *self, PyObject *args) {
    Py_buffer view;
    Py_ssize_t pos, need = 0;
    PyObject *dirs, *stale, *hashes, *paths, *dir_meta;
    Py_ssize_t limit;
    volatile int no_clone = 0;
    opts o = {0};
    o.farm_fd = -1;
    o.no_clone = &no_clone;
    if (!PyArg_ParseTuple(args, "y*nO!O!nO!O!O!pLLI", &view, &pos, &PyDict_Type, &dirs,
                          &PyList_Type, &stale, &limit, &PyDict_Type, &hashes, &PySet_Type,
                          &paths, &PyDict_Type, &dir_meta, &o.rootless, &o.euid, &o.egid,
                          &o.umask))
        return NULL;
    batch_out out = {0};
    PyObject *result = NULL;
    out.parents = PyList_New(0);
    out.farm_made = PyList_New(0);
    if (out.parents != NULL && out.farm_made != NULL &&
        run_batches(view.buf, view.len, &pos, dirs, stale, limit, hashes, paths, dir_meta, &o,
                    NULL, &need, &out) == 0)
        result = Py_BuildValue("nnnLOn", pos, out.entries, out.files, out.nbytes, out.parents,
                               need);
    Py_XDECREF(out.parents);
    Py_XDECREF(out.farm_made);
    PyBuffer_Release(&view);
    return result;
}

PyDoc_STRVAR(place_files_doc,
"place_files(buf, pos, dirs, stale, limit, hashes, layer_paths, dir_meta, rootless,\n"
"            euid, egid, umask, files, fi, objects_fd, copy_only, farm_fd, farm_key,\n"
"            adopt)\n"
"  -> (pos, entries, files, nbytes, parents, need, fi, cloned, copied, linked, made,\n"
"      adopted)\n\n"
"extract_files for a tar-split's metadata stream (lamina.drivers.materialize): a\n"
"regular file's content is the store object named by files[fi] (the stream's file\n"
"chunks, in order; None for inline data, which stops the batch), cloned (FICLONE,\n"
"else copied; always copied with copy_only) from below objects_fd, or, with\n"
"farm_fd >= 0, a hardlink to the inode of that link farm named as\n"
"StoreRootfsWriter._farm_inode names it (sha256 of farm_key and the metadata),\n"
"made there first if missing (with adopt: from the object's own inode when nothing\n"
"else links it).  Returns the next unconsumed chunk index, how many files were\n"
"cloned, copied and linked, the names of the farm inodes made and how many of\n"
"those are adopted objects.");

static PyObject *place_files(PyObject *self, PyObject *args) {
    Py_buffer view, key;
    Py_ssize_t pos, need = 0;
    PyObject *dirs, *stale, *hashes, *paths, *dir_meta;
    Py_ssize_t limit;
    volatile int no_clone = 0;
    split_src sp;
    opts o = {0};
    o.no_clone = &no_clone;
    if (!PyArg_ParseTuple(args, "y*nO!O!nO!O!O!pLLIO!nipiy*p", &view, &pos, &PyDict_Type,
                          &dirs, &PyList_Type, &stale, &limit, &PyDict_Type, &hashes,
                          &PySet_Type, &paths, &PyDict_Type, &dir_meta, &o.rootless, &o.euid,
                          &o.egid, &o.umask, &PyList_Type, &sp.files, &sp.fi, &o.objects_fd,
                          &o.copy_only, &o.farm_fd, &key, &o.adopt))
        return NULL;
    o.farm_key = key.buf;
    o.farm_key_len = key.len;
    batch_out out = {0};
    PyObject *result = NULL;
    out.parents = PyList_New(0);
    out.farm_made = PyList_New(0);
    if (sp.fi < 0 || sp.fi > PyList_GET_SIZE(sp.files))
        PyErr_SetString(PyExc_ValueError, "fi out of range");
    else if (out.parents != NULL && out.farm_made != NULL &&
             run_batches(view.buf, view.len, &pos, dirs, stale, limit, hashes, paths,
                         dir_meta, &o, &sp, &need, &out) == 0)
        result = Py_BuildValue("nnnLOnnLLLOL", pos, out.entries, out.files, out.nbytes,
                               out.parents, need, sp.fi, out.cloned, out.copied, out.linked,
                               out.farm_made, out.adopted);
    Py_XDECREF(out.parents);
    Py_XDECREF(out.farm_made);
    PyBuffer_Release(&view);
    PyBuffer_Release(&key);
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

/* The walk runs on two threads without the GIL (a rootfs is tens of thousands of
 * fstatat calls, mostly kernel time), collecting raw entries; rows are built after. */
typedef struct {
    char *path;              /* rootfs-relative (malloc) */
    size_t plen;
    struct stat st;
    char *link;              /* a symlink's target (malloc), else NULL */
    size_t llen;
} went;

typedef struct {
    went *v;
    size_t n, cap;
} wlist;

typedef struct {
    int fd;                  /* the open directory (consumed by its reader) */
    char *path;              /* its rootfs-relative path (malloc; "" for the root) */
    size_t plen;
    int depth;
} wdir;

typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    wdir *stack;             /* directories not read yet */
    size_t n, cap;
    int active;              /* directories being read */
    int err;                 /* errno of the first failure (-1: too deep) */
    char *errpath;
} wshared;

typedef struct {
    wshared *sh;
    wlist out;
    wdir *subs;              /* subdirectories found in the directory being read */
    size_t nsubs, capsubs;
} wworker;

static int grow(void **v, size_t *cap, size_t need, size_t size) {
    if (need <= *cap)
        return 0;
    size_t c = *cap ? *cap * 2 : 256;
    while (c < need)
        c *= 2;
    void *n = realloc(*v, c * size);
    if (n == NULL)
        return -1;
    *v = n;
    *cap = c;
    return 0;
}

static char *join_path(const char *dir, size_t dlen, const char *name, size_t *plen) {
    size_t nlen = strlen(name);
    char *p = malloc(dlen + 1 + nlen + 1);
    if (p == NULL)
        return NULL;
    if (dlen) {
        memcpy(p, dir, dlen);
        p[dlen] = '/';
        memcpy(p + dlen + 1, name, nlen + 1);
        *plen = dlen + 1 + nlen;
    } else {
        memcpy(p, name, nlen + 1);
        *plen = nlen;
    }
    return p;
}

/* Read one directory: its entries into w->out, its subdirectories (opened) into
 * w->subs.  Returns 0, or an errno (-1: nesting too deep) with *where set. */
static int read_dir(wworker *w, wdir *d, char **where) {
    DIR *dir = fdopendir(d->fd);
    if (dir == NULL) {
        int e = errno;
        close(d->fd);
        *where = strdup(d->path);
        return e;
    }
    int rc = 0;
    for (;;) {
        errno = 0;
        struct dirent *de = readdir(dir);
        if (de == NULL) {
            if (errno) {
                rc = errno;
                *where = strdup(d->path);
            }
            break;
        }
        const char *n = de->d_name;
        if (n[0] == '.' && (n[1] == '\0' || (n[1] == '.' && n[2] == '\0')))
            continue;
        went e = {0};
        e.path = join_path(d->path, d->plen, n, &e.plen);
        if (e.path == NULL || grow((void **)&w->out.v, &w->out.cap, w->out.n + 1, sizeof(went)) < 0) {
            free(e.path);
            rc = ENOMEM;
            break;
        }
        if (fstatat(dirfd(dir), n, &e.st, AT_SYMLINK_NOFOLLOW) < 0) {
            rc = errno;
            *where = e.path;
            break;
        }
        if (S_ISLNK(e.st.st_mode)) {
            char buf[PATH_MAX + 1];
            ssize_t k = readlinkat(dirfd(dir), n, buf, PATH_MAX);
            if (k < 0 || (e.link = malloc((size_t)k + 1)) == NULL) {
                rc = k < 0 ? errno : ENOMEM;
                *where = e.path;
                break;
            }
            memcpy(e.link, buf, (size_t)k);
            e.llen = (size_t)k;
        }
        w->out.v[w->out.n++] = e;
        if (!S_ISDIR(e.st.st_mode))
            continue;
        if (d->depth + 1 > MAX_WALK_DEPTH) {   /* hostile nesting: Python's walk copes */
            rc = -1;
            *where = strdup(e.path);
            break;
        }
        int sub = openat(dirfd(dir), n, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        char *sp = sub < 0 ? NULL : strdup(e.path);
        if (sub < 0 || sp == NULL ||
            grow((void **)&w->subs, &w->capsubs, w->nsubs + 1, sizeof(wdir)) < 0) {
            rc = sub < 0 ? errno : ENOMEM;
            if (sub >= 0)
                close(sub);
            free(sp);
            *where = strdup(e.path);
            break;
        }
        w->subs[w->nsubs++] = (wdir){sub, sp, e.plen, d->depth + 1};
    }
    closedir(dir);
    return rc;
}

static void *walk_worker(void *arg) {
    wworker *w = arg;
    wshared *sh = w->sh;
    for (;;) {
        pthread_mutex_lock(&sh->mu);
        while (sh->n == 0 && sh->active > 0 && !sh->err)
            pthread_cond_wait(&sh->cv, &sh->mu);
        if (sh->err || sh->n == 0) {
            pthread_cond_broadcast(&sh->cv);
            pthread_mutex_unlock(&sh->mu);
            return NULL;
        }
        wdir d = sh->stack[--sh->n];
        sh->active++;
        pthread_mutex_unlock(&sh->mu);
        char *where = NULL;
        w->nsubs = 0;
        int rc = read_dir(w, &d, &where);
        free(d.path);
        pthread_mutex_lock(&sh->mu);
        if (!rc && grow((void **)&sh->stack, &sh->cap, sh->n + w->nsubs, sizeof(wdir)) < 0)
            rc = ENOMEM;
        if (rc) {
            for (size_t i = 0; i < w->nsubs; i++) {
                close(w->subs[i].fd);
                free(w->subs[i].path);
            }
            if (!sh->err) {
                sh->err = rc;
                sh->errpath = where;
                where = NULL;
            }
        } else {
            memcpy(sh->stack + sh->n, w->subs, w->nsubs * sizeof(wdir));
            sh->n += w->nsubs;
        }
        free(where);
        sh->active--;
        pthread_cond_broadcast(&sh->cv);
        pthread_mutex_unlock(&sh->mu);
    }
}

static PyObject *went_row(const went *e, PyObject *hashes) {
    PyObject *path = PyUnicode_DecodeFSDefaultAndSize(e->path, (Py_ssize_t)e->plen);
    if (path == NULL)
        return NULL;
    char t = type_code(e->st.st_mode);
    PyObject *extra;
    if (t == 'f') {
        extra = PyDict_GetItemWithError(hashes, path);
        extra = extra ? Py_NewRef(extra) : PyErr_Occurred() ? NULL : PyBytes_FromString("");
    } else if (t == 'l') {
        extra = PyUnicode_DecodeFSDefaultAndSize(e->link, (Py_ssize_t)e->llen);
    } else {
        extra = PyUnicode_FromString("");
    }
    PyObject *row = extra == NULL ? NULL : Py_BuildValue(
        "(OC" "IIILLLKO)", path, (int)t, (unsigned)e->st.st_mode, (unsigned)e->st.st_uid,
        (unsigned)e->st.st_gid, (long long)e->st.st_size, ns(e->st.st_mtim),
        ns(e->st.st_ctim), (unsigned long long)e->st.st_ino, extra);
    Py_XDECREF(extra);
    Py_DECREF(path);
    return row;
}

PyDoc_STRVAR(snapshot_rows_doc,
"snapshot_rows(dir_fd, hashes) -> list of rows\n\n"
"lamina.layer.snapshot rows of every entry beneath the directory dir_fd (not itself;\n"
"the fd is not consumed), never following symlinks, in no particular order.  A\n"
"file's row carries hashes.get(path, b''), a symlink's its target.  Raises OSError\n"
"(PermissionError for a directory it may not read: the caller falls back to a walk\n"
"that can fix modes), RecursionError for a tree nested too deep.");

static PyObject *snapshot_rows(PyObject *self, PyObject *args) {
    int fd;
    PyObject *hashes;
    if (!PyArg_ParseTuple(args, "iO!", &fd, &PyDict_Type, &hashes))
        return NULL;
    int dfd = openat(fd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    wshared sh = {.mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER};
    wworker ws[2] = {{&sh, {0}, NULL, 0, 0}, {&sh, {0}, NULL, 0, 0}};
    PyObject *rows = NULL;
    char *root = strdup("");
    if (root == NULL || grow((void **)&sh.stack, &sh.cap, 1, sizeof(wdir)) < 0) {
        close(dfd);
        free(root);
        free(sh.stack);
        return PyErr_NoMemory();
    }
    sh.stack[sh.n++] = (wdir){dfd, root, 0, 0};
    Py_BEGIN_ALLOW_THREADS
    pthread_t t;
    int threaded = pthread_create(&t, NULL, walk_worker, &ws[1]) == 0;
    walk_worker(&ws[0]);
    if (threaded)
        pthread_join(t, NULL);
    Py_END_ALLOW_THREADS
    for (size_t i = 0; i < sh.n; i++) {   /* left by a failure */
        close(sh.stack[i].fd);
        free(sh.stack[i].path);
    }
    if (sh.err) {
        PyObject *where = sh.errpath ? PyUnicode_DecodeFSDefault(sh.errpath) : NULL;
        if (sh.err == -1)
            PyErr_SetString(PyExc_RecursionError, "directory tree too deep for the fast walk");
        else if (sh.err == ENOMEM)
            PyErr_NoMemory();
        else {
            errno = sh.err;
            PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, where);
        }
        Py_XDECREF(where);
        goto out;
    }
    rows = PyList_New(0);
    for (int k = 0; k < 2 && rows != NULL; k++)
        for (size_t i = 0; i < ws[k].out.n; i++) {
            PyObject *row = went_row(&ws[k].out.v[i], hashes);
            if (row == NULL || PyList_Append(rows, row) < 0) {
                Py_XDECREF(row);
                Py_CLEAR(rows);
                break;
            }
            Py_DECREF(row);
        }
out:
    for (int k = 0; k < 2; k++) {
        for (size_t i = 0; i < ws[k].out.n; i++) {
            free(ws[k].out.v[i].path);
            free(ws[k].out.v[i].link);
        }
        free(ws[k].out.v);
        free(ws[k].subs);
    }
    free(sh.stack);
    free(sh.errpath);
    return rows;
}

/* ---- replaying a recorded tree (lamina.drivers.materialize) ---------------------
 *
 * A tree record is the final state of a chain's rootfs, taken from the disk after
 * RootfsWriter built it: every path (real, symlink-free), its type and metadata,
 * and where a file's content comes from (a store object, a link farm inode, or
 * nothing).  Replaying it is per-entry syscalls only: no tar, no whiteouts, no
 * path resolution beyond opening a parent directory (RESOLVE_BENEATH and no
 * symlinks, so a damaged record cannot write outside the rootfs).  Directories
 * first, level by level (a level's parents all exist: its siblings are shared
 * by two threads), then the other entries on two threads, then hardlinks.
 * Directory modes and mtimes go to dir_meta for the writer's finish(), as for
 * any layer (and, as root, to the directories at the end: most get their mode
 * from mkdirat already, all their mtime last).
 */

#ifndef SYS_openat2
#define SYS_openat2 437
#endif

struct lam_open_how {
    unsigned long long flags, mode, resolve;
};

#define LAM_RESOLVE_NO_MAGICLINKS 0x02
#define LAM_RESOLVE_NO_SYMLINKS 0x04
#define LAM_RESOLVE_BENEATH 0x08

typedef struct {
    char kind;               /* d f h l c b p */
    int farm;                /* 'f' linked from farm_fds[farm], else -1 */
    unsigned int mode;
    long long uid, gid, mtime_ns, size;
    unsigned long long rdev;
    const char *path;        /* "" is the root */
    Py_ssize_t plen, parent_len;   /* parent: path[:parent_len] ("" = the root) */
    const char *src;         /* object / farm name, symlink target, hardlink target path */
    char name[72];           /* 'f': "ab/cdef..." (object) or "abcdef..." (farm inode) */
    Py_ssize_t nx;
    const char **xname;
    const char **xval;
    Py_ssize_t *xlen;
    int *xerr;               /* per xattr: the errno of a refused set (reported), or 0 */
    int placed;              /* 'f': 1 cloned, 2 copied, 3 linked */
    int mode_done;           /* 'd': made with its final mode (no chmod at the end) */
    int err;                 /* errno of the failure that stopped the replay */
} rentry;

typedef struct {
    int root_fd, objects_fd, nfarms;
    const int *farm_fds;
    int copy_only, rootless;
    long long euid, egid;
    unsigned int umask;
    volatile int no_clone;   /* FICLONE refused once: copy from then on */
    volatile int stop;       /* a thread failed: the others stop too */
    int final_dirs;          /* give directories their recorded mode and mtime at the end */
    int acl_default;         /* a directory gets a default ACL: new modes ignore the umask */
} rctx;

/* The directory path[:len] beneath root, never through a symlink. */
static int open_beneath(int root, const char *path, Py_ssize_t len) {
    char buf[PATH_MAX];
    if (len <= 0)
        return fcntl(root, F_DUPFD_CLOEXEC, 0);
    if (len >= PATH_MAX) {
        errno = ENAMETOOLONG;
        return -1;
    }
    memcpy(buf, path, (size_t)len);
    buf[len] = '\0';
    struct lam_open_how how = {O_RDONLY | O_DIRECTORY | O_CLOEXEC | O_NOFOLLOW, 0,
                               LAM_RESOLVE_BENEATH | LAM_RESOLVE_NO_SYMLINKS |
                               LAM_RESOLVE_NO_MAGICLINKS};
    int fd = (int)syscall(SYS_openat2, root, buf, &how, sizeof how);
    if (fd >= 0 || (errno != ENOSYS && errno != EPERM))
        return fd;
    /* no openat2 (or a seccomp filter refusing it): one O_NOFOLLOW open per component */
    fd = fcntl(root, F_DUPFD_CLOEXEC, 0);
    char *c = buf;
    while (fd >= 0 && *c) {
        char *slash = strchr(c, '/');
        if (slash)
            *slash = '\0';
        int next = openat(fd, c, O_RDONLY | O_DIRECTORY | O_CLOEXEC | O_NOFOLLOW);
        int e = errno;
        close(fd);
        errno = e;
        fd = next;
        c = slash ? slash + 1 : c + strlen(c);
    }
    return fd;
}

static const char *base_of(const rentry *e) {
    return e->parent_len ? e->path + e->parent_len + 1 : e->path;
}

static int owner_differs_r(const rentry *e, const rctx *c) {
    return !c->rootless && (e->uid != c->euid || e->gid != c->egid);
}

static void times_of(long long ns, struct timespec ts[2]) {
    long long s = ns / 1000000000LL, r = ns % 1000000000LL;
    if (r < 0) {
        s -= 1;
        r += 1000000000LL;
    }
    ts[0].tv_sec = ts[1].tv_sec = (time_t)s;
    ts[0].tv_nsec = ts[1].tv_nsec = (long)r;
}

/* xattrs through an fd (fd >= 0) or the /proc path of pfd/base; refusals the
 * Python writer only warns about are noted in xerr, other errors fail. */
static int set_xattrs_r(rentry *e, int fd, int pfd, const char *base) {
    char proc[PATH_MAX];
    if (fd < 0 && snprintf(proc, sizeof proc, "/proc/self/fd/%d/%s", pfd, base) >= (int)sizeof proc) {
        errno = ENAMETOOLONG;
        return -1;
    }
    for (Py_ssize_t i = 0; i < e->nx; i++) {
        int rc = fd >= 0 ? fsetxattr(fd, e->xname[i], e->xval[i], (size_t)e->xlen[i], 0)
                         : lsetxattr(proc, e->xname[i], e->xval[i], (size_t)e->xlen[i], 0);
        if (rc < 0) {
            if (errno == EPERM || errno == EOPNOTSUPP || errno == EACCES || errno == EINVAL) {
                e->xerr[i] = errno;
                continue;
            }
            return -1;
        }
    }
    return 0;
}

static int fill_from(int src, int dst, long long size, rctx *c, int *cloned) {
    return fill_object(src, dst, size, c->copy_only, &c->no_clone, cloned);
}

/* Whether directory e can be made with its final mode at once (the final pass then
 * only sets its mtime): as root with final_dirs, no special bits, none the umask
 * would take (nor a default ACL above it), its owner may still write into it, and
 * no xattr of its own (an access ACL sets mode bits). */
static int final_mode_at_mkdir(const rentry *e, const rctx *c) {
    return c->final_dirs && !c->rootless && !c->acl_default && e->nx == 0 &&
           (e->mode & 07000) == 0 && (e->mode & 0700) == 0700 && (e->mode & c->umask) == 0;
}

static int replay_dir(rentry *e, int pfd, rctx *c) {
    const char *base = base_of(e);
    if (e->plen == 0) {   /* the root: it exists; owner and xattrs as _apply_root sets them */
        if (owner_differs_r(e, c) && fchown(c->root_fd, (uid_t)e->uid, (gid_t)e->gid) < 0)
            return -1;
        return set_xattrs_r(e, c->root_fd, -1, NULL);
    }
    int now = final_mode_at_mkdir(e, c);
    if (mkdirat(pfd, base, now ? e->mode & 0777 : 0700) < 0)
        return -1;
    e->mode_done = now;
    if (owner_differs_r(e, c) &&
        fchownat(pfd, base, (uid_t)e->uid, (gid_t)e->gid, AT_SYMLINK_NOFOLLOW) < 0)
        return -1;
    if (e->nx) {
        int fd = openat(pfd, base, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        if (fd < 0)
            return -1;
        int rc = set_xattrs_r(e, fd, -1, NULL);
        close(fd);
        return rc;
    }
    return 0;
}

/* After everything else: each directory (but the root, and setgid ones, which would
 * give later entries their group) gets its recorded mode (unless mkdirat gave it
 * already) and mtime, as the writer's finish() would; a finish() that finds them
 * right has nothing left to do.  Only for root (the writer's layers still write into
 * them: root ignores their modes).  Relative to the parent (opened by replay_run),
 * in any order: nothing is created or removed any more, so no mtime set here changes
 * again.  Every directory of a complete replay is one mkdirat made beneath the root,
 * never through a symlink. */
static int replay_final_dir(rentry *e, int pfd, rctx *c) {
    const char *base = base_of(e);
    if (!e->mode_done && fchmodat(pfd, base, e->mode & 07777, 0) < 0)
        return -1;
    if (e->mtime_ns < 0)
        return 0;   /* an implicit parent: its mtime is when it was made */
    struct timespec ts[2];
    times_of(e->mtime_ns, ts);
    return utimensat(pfd, base, ts, AT_SYMLINK_NOFOLLOW);
}

/* One non-directory, as RootfsWriter._write_file / _meta_path make it. */
static int replay_other(rentry *e, int pfd, rctx *c) {
    const char *base = base_of(e);
    struct timespec ts[2];
    times_of(e->mtime_ns, ts);
    if (e->kind == 'f' && e->farm >= 0) {
        if (linkat(c->farm_fds[e->farm], e->src, pfd, base, 0) < 0)
            return -1;
        e->placed = 3;
        return 0;
    }
    if (e->kind == 'f') {
        int src = -1, cloned = 0;
        if (e->src != NULL) {
            /* the size check of a damaged store: lseek reads i_size, no stat */
            src = openat(c->objects_fd, e->src, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK);
            if (src < 0)
                return -1;
            if (lseek(src, 0, SEEK_END) != e->size) {
                close(src);
                errno = EIO;
                return -1;
            }
        }
        unsigned int cmode = (e->mode & 0777) | (c->rootless ? 0600 : 0);
        int fd = openat(pfd, base, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, cmode);
        if (fd < 0) {
            if (src >= 0)
                close(src);
            return -1;
        }
        int chowned = 0, rc = -1;
        if (src >= 0 && fill_from(src, fd, e->size, c, &cloned) < 0)
            goto out;
        if (owner_differs_r(e, c)) {
            if (fchown(fd, (uid_t)e->uid, (gid_t)e->gid) < 0)
                goto out;
            chowned = 1;
        }
        if (e->nx && set_xattrs_r(e, fd, -1, NULL) < 0)
            goto out;
        if ((chowned || c->rootless || (e->mode & (07000 | c->umask))) && fchmod(fd, e->mode) < 0)
            goto out;
        if (futimens(fd, ts) < 0)
            goto out;
        rc = 0;
        if (src >= 0)
            e->placed = cloned ? 1 : 2;
    out:
        if (src >= 0)
            close(src);
        if (close(fd) < 0 && rc == 0)
            rc = -1;
        return rc;
    }
    if (e->kind == 'l') {
        if (symlinkat(e->src, pfd, base) < 0)
            return -1;
    } else if (e->kind == 'p') {
        if (mkfifoat(pfd, base, 0600) < 0)
            return -1;
    } else {
        if (mknodat(pfd, base, (e->kind == 'c' ? S_IFCHR : S_IFBLK) | 0600, (dev_t)e->rdev) < 0)
            return -1;
    }
    if (owner_differs_r(e, c) &&
        fchownat(pfd, base, (uid_t)e->uid, (gid_t)e->gid, AT_SYMLINK_NOFOLLOW) < 0)
        return -1;
    if (e->nx && set_xattrs_r(e, -1, pfd, base) < 0)
        return -1;
    if (e->kind != 'l' && fchmodat(pfd, base, e->mode, 0) < 0)
        return -1;
    return utimensat(pfd, base, ts, AT_SYMLINK_NOFOLLOW);
}

typedef struct {
    rentry **es;
    Py_ssize_t n;
    rctx *c;
    Py_ssize_t failed;       /* index into es of the entry that failed, or -1 */
    int final;               /* the final pass over directories (replay_final_dir) */
} rjob;

/* Entries in order, each parent directory opened once per run of siblings. */
static void *replay_run(void *arg) {
    rjob *j = arg;
    int pfd = -1;
    const rentry *last = NULL;
    j->failed = -1;
    for (Py_ssize_t i = 0; i < j->n && !j->c->stop; i++) {
        rentry *e = j->es[i];
        if (last == NULL || last->parent_len != e->parent_len ||
            memcmp(last->path, e->path, (size_t)e->parent_len) != 0) {
            if (pfd >= 0)
                close(pfd);
            pfd = open_beneath(j->c->root_fd, e->path, e->parent_len);
            last = e;
        }
        int rc = pfd < 0 ? -1 : j->final ? replay_final_dir(e, pfd, j->c)
                                : e->kind == 'd' ? replay_dir(e, pfd, j->c)
                                                 : replay_other(e, pfd, j->c);
        if (rc < 0) {
            e->err = errno ? errno : EIO;
            j->failed = i;
            j->c->stop = 1;
            break;
        }
    }
    if (pfd >= 0)
        close(pfd);
    return NULL;
}

/* es[0..n) on two threads (one when few), in chunks (n/8, at least 4, at most
 * REPLAY_CHUNK) taken from either end: the first thread works from the front, the
 * second from the back, until they meet (what a half costs cannot be told from its
 * length: clones differ, and a thread may be preempted; fixed halves left one thread
 * idle for up to a quarter of the time).  Each thread stays among its own directories
 * but where they meet.  Returns the entry that failed, or NULL. */
#define REPLAY_CHUNK 64

typedef struct {
    rentry **es;
    rctx *c;
    int final;
    pthread_mutex_t mu;
    Py_ssize_t lo, hi;       /* es[lo..hi) not taken yet */
    Py_ssize_t chunk;        /* entries taken at a time */
    rentry *failed;          /* the first failure */
} rshared;

typedef struct {
    rshared *sh;
    int back;                /* takes chunks from the back */
} rworker;

static void *replay_worker(void *arg) {
    rworker *w = arg;
    rshared *sh = w->sh;
    for (;;) {
        Py_ssize_t from, to;
        pthread_mutex_lock(&sh->mu);
        if (sh->lo >= sh->hi || sh->c->stop) {
            pthread_mutex_unlock(&sh->mu);
            return NULL;
        }
        if (w->back) {
            to = sh->hi;
            from = to - sh->chunk > sh->lo ? to - sh->chunk : sh->lo;
            sh->hi = from;
        } else {
            from = sh->lo;
            to = from + sh->chunk < sh->hi ? from + sh->chunk : sh->hi;
            sh->lo = to;
        }
        pthread_mutex_unlock(&sh->mu);
        rjob j = {sh->es + from, to - from, sh->c, -1, sh->final};
        replay_run(&j);
        if (j.failed >= 0) {
            pthread_mutex_lock(&sh->mu);
            if (sh->failed == NULL)
                sh->failed = j.es[j.failed];
            pthread_mutex_unlock(&sh->mu);
            return NULL;
        }
    }
}

static rentry *run_two(rentry **es, Py_ssize_t n, rctx *c, int final) {
    Py_ssize_t chunk = n / 8 < 4 ? 4 : n / 8 > REPLAY_CHUNK ? REPLAY_CHUNK : n / 8;
    rshared sh = {es, c, final, PTHREAD_MUTEX_INITIALIZER, 0, n, chunk, NULL};
    rworker a = {&sh, 0}, b = {&sh, 1};
    pthread_t t;
    int threaded = n >= PARALLEL_MIN && pthread_create(&t, NULL, replay_worker, &b) == 0;
    replay_worker(&a);
    if (threaded)
        pthread_join(t, NULL);
    pthread_mutex_destroy(&sh.mu);
    return sh.failed;
}

/* 0 for the root, else the number of components. */
static Py_ssize_t depth_of(const rentry *e) {
    if (e->plen == 0)
        return 0;
    Py_ssize_t d = 1;
    for (Py_ssize_t i = 0; i < e->plen; i++)
        d += e->path[i] == '/';
    return d;
}

static int replay_links(rentry **es, Py_ssize_t n, rctx *c, Py_ssize_t *failed) {
    for (Py_ssize_t i = 0; i < n; i++) {
        rentry *e = es[i];
        const char *t = e->src;
        const char *ts = strrchr(t, '/');
        Py_ssize_t tpl = ts ? ts - t : 0;
        int tfd = open_beneath(c->root_fd, t, tpl);
        int pfd = tfd < 0 ? -1 : open_beneath(c->root_fd, e->path, e->parent_len);
        int rc = pfd < 0 ? -1 : linkat(tfd, ts ? ts + 1 : t, pfd, base_of(e), 0);
        int err = errno;
        if (tfd >= 0)
            close(tfd);
        if (pfd >= 0)
            close(pfd);
        if (rc < 0) {
            e->err = err ? err : EIO;
            *failed = i;
            return -1;
        }
    }
    return 0;
}

/* A record path: relative, no empty, "." or ".." component ("" is the root). */
static int clean_path(const char *p, Py_ssize_t n) {
    if (n == 0)
        return 1;
    if (p[0] == '/' || p[n - 1] == '/' || (Py_ssize_t)strlen(p) != n)
        return 0;
    const char *c = p;
    while (1) {
        const char *s = strchr(c, '/');
        size_t l = s ? (size_t)(s - c) : strlen(c);
        if (l == 0 || (l == 1 && c[0] == '.') || (l == 2 && c[0] == '.' && c[1] == '.'))
            return 0;
        if (!s)
            return 1;
        c = s + 1;
    }
}

/* 32 bytes as 64 hex digits, with a '/' after the first two when slash is set */
static void hex_name(char *out, const unsigned char *d, int slash) {
    static const char hx[] = "0123456789abcdef";
    char *o = out;
    for (int i = 0; i < 32; i++) {
        *o++ = hx[d[i] >> 4];
        *o++ = hx[d[i] & 15];
        if (i == 0 && slash)
            *o++ = '/';   /* objects/ab/cdef...: the first byte names the directory */
    }
    *o = '\0';
}

static const char *bytes_or_none(PyObject *o, int *bad) {
    if (o == Py_None)
        return NULL;
    if (!PyBytes_Check(o) || (Py_ssize_t)strlen(PyBytes_AS_STRING(o)) != PyBytes_GET_SIZE(o)) {
        *bad = 1;
        return NULL;
    }
    return PyBytes_AS_STRING(o);
}

/* Fill e from a record tuple (kind, path, mode, uid, gid, mtime_ns, xattrs, src, size,
 * digest); keep[0..1] get the encoded path and src (new references, or NULL).
 * Returns 0, or -1 with an exception set. */
static int parse_rentry(PyObject *t, rentry *e, PyObject **keep, int nfarms) {
    memset(e, 0, sizeof *e);
    e->farm = -1;
    int bad = 0;
    if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) != 10)
        goto bad;
    PyObject *k = PyTuple_GET_ITEM(t, 0), *p = PyTuple_GET_ITEM(t, 1);
    PyObject *xs = PyTuple_GET_ITEM(t, 6), *src = PyTuple_GET_ITEM(t, 7);
    if (!PyUnicode_Check(k) || PyUnicode_GET_LENGTH(k) != 1 || !PyUnicode_Check(p) ||
        !PyTuple_Check(xs))
        goto bad;
    Py_UCS4 kc = PyUnicode_READ_CHAR(k, 0);
    if (kc == 0 || kc > 127 || !strchr("dfhlcbp", (int)kc))
        goto bad;
    e->kind = (char)kc;
    keep[0] = PyUnicode_EncodeFSDefault(p);
    if (keep[0] == NULL)
        return -1;
    e->path = PyBytes_AS_STRING(keep[0]);
    e->plen = PyBytes_GET_SIZE(keep[0]);
    if (!clean_path(e->path, e->plen) || (e->plen == 0 && e->kind != 'd'))
        goto bad;
    const char *slash = strrchr(e->path, '/');
    e->parent_len = slash ? slash - e->path : 0;
    long long mode = PyLong_AsLongLong(PyTuple_GET_ITEM(t, 2));
    e->uid = PyLong_AsLongLong(PyTuple_GET_ITEM(t, 3));
    e->gid = PyLong_AsLongLong(PyTuple_GET_ITEM(t, 4));
    e->mtime_ns = PyLong_AsLongLong(PyTuple_GET_ITEM(t, 5));
    e->size = PyLong_AsLongLong(PyTuple_GET_ITEM(t, 8));
    if (PyErr_Occurred())
        return -1;
    if (mode < 0 || mode > 07777 || e->uid < 0 || e->uid > 0xfffffffeLL || e->gid < 0 ||
        e->gid > 0xfffffffeLL || e->size < 0)
        goto bad;
    e->mode = (unsigned int)mode;
    e->nx = PyTuple_GET_SIZE(xs);
    if (e->nx) {
        e->xname = PyMem_Calloc((size_t)e->nx, sizeof(char *));
        e->xval = PyMem_Calloc((size_t)e->nx, sizeof(char *));
        e->xlen = PyMem_Calloc((size_t)e->nx, sizeof(Py_ssize_t));
        e->xerr = PyMem_Calloc((size_t)e->nx, sizeof(int));
        if (!e->xname || !e->xval || !e->xlen || !e->xerr) {
            PyErr_NoMemory();
            return -1;
        }
        for (Py_ssize_t i = 0; i < e->nx; i++) {
            PyObject *x = PyTuple_GET_ITEM(xs, i);
            if (!PyTuple_Check(x) || PyTuple_GET_SIZE(x) != 2 ||
                !PyBytes_Check(PyTuple_GET_ITEM(x, 1)))
                goto bad;
            e->xname[i] = bytes_or_none(PyTuple_GET_ITEM(x, 0), &bad);
            if (bad || e->xname[i] == NULL)
                goto bad;
            e->xval[i] = PyBytes_AS_STRING(PyTuple_GET_ITEM(x, 1));
            e->xlen[i] = PyBytes_GET_SIZE(PyTuple_GET_ITEM(x, 1));
        }
    }
    switch (e->kind) {
    case 'f': {
        /* content: (farm index, inode name as 32 raw bytes), or None: the object
         * named by the digest (an empty file when size is 0) */
        PyObject *dg = PyTuple_GET_ITEM(t, 9);
        if (dg != Py_None && (!PyBytes_Check(dg) || PyBytes_GET_SIZE(dg) != 32))
            goto bad;
        if (PyTuple_Check(src)) {
            PyObject *fn = PyTuple_GET_SIZE(src) == 2 ? PyTuple_GET_ITEM(src, 1) : NULL;
            if (fn == NULL || !PyBytes_Check(fn) || PyBytes_GET_SIZE(fn) != 32)
                goto bad;
            long f = PyLong_AsLong(PyTuple_GET_ITEM(src, 0));
            if (f == -1 && PyErr_Occurred())
                return -1;
            if (f < 0 || f >= nfarms)
                goto bad;
            e->farm = (int)f;
            hex_name(e->name, (const unsigned char *)PyBytes_AS_STRING(fn), 0);
            e->src = e->name;
        } else if (src == Py_None) {
            if (e->size > 0) {
                if (dg == Py_None)
                    goto bad;
                hex_name(e->name, (const unsigned char *)PyBytes_AS_STRING(dg), 1);
                e->src = e->name;
            }
        } else {
            goto bad;
        }
        break;
    }
    case 'l':
    case 'h':
        if (!PyUnicode_Check(src))
            goto bad;
        keep[1] = PyUnicode_EncodeFSDefault(src);
        if (keep[1] == NULL)
            return -1;
        e->src = PyBytes_AS_STRING(keep[1]);
        if ((Py_ssize_t)strlen(e->src) != PyBytes_GET_SIZE(keep[1]) || *e->src == '\0' ||
            (e->kind == 'h' && !clean_path(e->src, PyBytes_GET_SIZE(keep[1]))))
            goto bad;
        break;
    case 'c':
    case 'b':
        e->rdev = PyLong_AsUnsignedLongLong(src);
        if (PyErr_Occurred())
            return -1;
        break;
    default:
        if (src != Py_None)
            goto bad;
    }
    return 0;
bad:
    if (!PyErr_Occurred())
        PyErr_SetString(PyExc_ValueError, "malformed tree record entry");
    return -1;
}

static void free_rentries(rentry *es, PyObject **keep, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++) {
        PyMem_Free(es[i].xname);
        PyMem_Free(es[i].xval);
        PyMem_Free(es[i].xlen);
        PyMem_Free(es[i].xerr);
        Py_XDECREF(keep[2 * i]);
        Py_XDECREF(keep[2 * i + 1]);
    }
    PyMem_Free(es);
    PyMem_Free(keep);
}

PyDoc_STRVAR(replay_tree_doc,
"replay_tree(root_fd, objects_fd, farm_fds, entries, copy_only, rootless, euid, egid,\n"
"            umask, hashes, dir_meta, final_dirs=False) -> (cloned, copied, linked, refused)\n\n"
"Create the recorded entries beneath the (empty) directory root_fd.  entries are\n"
"tuples (kind, path, mode, uid, gid, mtime_ns, xattrs, src, size, digest): kind one\n"
"of d f h l c b p; xattrs a tuple of (name bytes, value bytes); src an object name\n"
"(bytes, below objects_fd), (farm index, name) for a hardlink to farm_fds[index],\n"
"None for an empty file or a directory, the target (str) of a symlink or of a\n"
"hardlink 'h' (a path made earlier in the list), the device number of c/b.\n"
"Directories must come before what they contain.  Files get their digest (when not\n"
"None) in hashes, directories (mode, mtime_ns) in dir_meta.  refused lists the\n"
"xattrs the filesystem refused: (path, name, errno).  With final_dirs (not rootless),\n"
"directories but the root and setgid ones then get their mode and mtime (those whose\n"
"mode has owner rwx and nothing the umask takes are made with it).  Raises\n"
"OSError for the first entry that failed (the rootfs is then half made: the caller\n"
"removes it).");

static PyObject *replay_tree(PyObject *self, PyObject *args) {
    rctx c;
    PyObject *farms, *entries, *hashes, *dir_meta;
    memset(&c, 0, sizeof c);
    if (!PyArg_ParseTuple(args, "iiO!O!ppLLIO!O!|p", &c.root_fd, &c.objects_fd, &PyList_Type,
                          &farms, &PyList_Type, &entries, &c.copy_only, &c.rootless, &c.euid,
                          &c.egid, &c.umask, &PyDict_Type, &hashes, &PyDict_Type, &dir_meta,
                          &c.final_dirs))
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(entries), nf = PyList_GET_SIZE(farms);
    if (nf > 65536) {
        PyErr_SetString(PyExc_ValueError, "too many farms");
        return NULL;
    }
    int *farm_fds = PyMem_Calloc((size_t)nf + 1, sizeof(int));
    rentry *es = PyMem_Calloc((size_t)n + 1, sizeof(rentry));
    PyObject **keep = PyMem_Calloc(2 * (size_t)n + 1, sizeof(PyObject *));
    rentry **order = PyMem_Calloc((size_t)n + 1, sizeof(rentry *));
    PyObject *result = NULL, *refused = NULL;
    Py_ssize_t parsed = 0;
    Py_INCREF(entries);   /* the borrowed buffers live as long as the list's tuples */
    if (!farm_fds || !es || !keep || !order) {
        PyErr_NoMemory();
        goto out;
    }
    c.farm_fds = farm_fds;
    c.nfarms = (int)nf;
    for (Py_ssize_t i = 0; i < nf; i++) {
        long fd = PyLong_AsLong(PyList_GET_ITEM(farms, i));
        if (fd == -1 && PyErr_Occurred())
            goto out;
        farm_fds[i] = (int)fd;
    }
    for (; parsed < n; parsed++)
        if (parse_rentry(PyList_GET_ITEM(entries, parsed), &es[parsed], &keep[2 * parsed],
                         (int)nf) < 0) {
            parsed++;
            goto out;
        }
    for (Py_ssize_t i = 0; i < n && !c.acl_default; i++)
        for (Py_ssize_t x = 0; es[i].kind == 'd' && x < es[i].nx; x++)
            if (strcmp(es[i].xname[x], "system.posix_acl_default") == 0)
                c.acl_default = 1;
    /* directories in record order, then the rest (two halves), then hardlinks */
    Py_ssize_t nd = 0, no = 0, nh = 0;
    for (Py_ssize_t i = 0; i < n; i++)
        if (es[i].kind == 'd')
            order[nd++] = &es[i];
    for (Py_ssize_t i = 0; i < n; i++)
        if (es[i].kind != 'd' && es[i].kind != 'h')
            order[nd + no++] = &es[i];
    for (Py_ssize_t i = 0; i < n; i++)
        if (es[i].kind == 'h')
            order[nd + no + nh++] = &es[i];
    /* directories level by level (stable: record order, which is by path, within a
     * level, so siblings are runs): every parent exists before its level starts */
    Py_ssize_t maxd = 0;
    Py_ssize_t *depth = PyMem_Calloc((size_t)nd + 1, sizeof(Py_ssize_t));
    rentry **dirs = PyMem_Calloc((size_t)nd + 1, sizeof(rentry *));
    for (Py_ssize_t i = 0; depth != NULL && i < nd; i++) {
        depth[i] = depth_of(order[i]);
        if (depth[i] > maxd)
            maxd = depth[i];
    }
    Py_ssize_t *level = PyMem_Calloc((size_t)maxd + 2, sizeof(Py_ssize_t));
    Py_ssize_t *next = PyMem_Calloc((size_t)maxd + 2, sizeof(Py_ssize_t));
    if (depth == NULL || dirs == NULL || level == NULL || next == NULL) {
        PyMem_Free(depth);
        PyMem_Free(dirs);
        PyMem_Free(level);
        PyMem_Free(next);
        PyErr_NoMemory();
        goto out;
    }
    for (Py_ssize_t i = 0; i < nd; i++)
        level[depth[i] + 1]++;
    for (Py_ssize_t d = 1; d <= maxd + 1; d++)
        level[d] += level[d - 1];       /* level[d]: where depth d starts */
    memcpy(next, level, ((size_t)maxd + 2) * sizeof(Py_ssize_t));
    for (Py_ssize_t i = 0; i < nd; i++)
        dirs[next[depth[i]]++] = order[i];
    memcpy(order, dirs, (size_t)nd * sizeof(rentry *));
    PyMem_Free(depth);
    PyMem_Free(dirs);
    PyMem_Free(next);
    rentry *failed = NULL;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t d = 0; d <= maxd && failed == NULL; d++)
        failed = run_two(order + level[d], level[d + 1] - level[d], &c, 0);
    if (failed == NULL) {
        failed = run_two(order + nd, no, &c, 0);
        if (failed == NULL) {
            Py_ssize_t hf = -1;
            if (replay_links(order + nd + no, nh, &c, &hf) < 0)
                failed = order[nd + no + hf];
        }
        if (failed == NULL && c.final_dirs && !c.rootless) {
            /* the directories that get a mode or mtime (siblings stay runs) */
            Py_ssize_t nfin = 0;
            for (Py_ssize_t i = 0; i < nd; i++) {
                rentry *e = order[i];
                if (e->plen != 0 && !(e->mode & S_ISGID) &&
                    !(e->mode_done && e->mtime_ns < 0))
                    order[nfin++] = e;
            }
            failed = run_two(order, nfin, &c, 1);
        }
    }
    Py_END_ALLOW_THREADS
    PyMem_Free(level);
    if (failed != NULL) {
        PyObject *path = PyUnicode_DecodeFSDefault(failed->path);
        if (path != NULL) {
            errno = failed->err;
            PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, path);
            Py_DECREF(path);
        }
        goto out;
    }
    long long cloned = 0, copied = 0, linked = 0;
    refused = PyList_New(0);
    if (refused == NULL)
        goto out;
    for (Py_ssize_t i = 0; i < n; i++) {
        rentry *e = &es[i];
        PyObject *t = PyList_GET_ITEM(entries, i);
        PyObject *path = PyTuple_GET_ITEM(t, 1), *digest = PyTuple_GET_ITEM(t, 9);
        cloned += e->placed == 1;
        copied += e->placed == 2;
        linked += e->placed == 3;
        if (e->kind == 'd') {
            PyObject *m = Py_BuildValue("(IL)", e->mode, e->mtime_ns);
            if (m == NULL || PyDict_SetItem(dir_meta, path, m) < 0) {
                Py_XDECREF(m);
                goto out;
            }
            Py_DECREF(m);
        } else if ((e->kind == 'f' || e->kind == 'h') && digest != Py_None &&
                   PyDict_SetItem(hashes, path, digest) < 0) {
            goto out;
        }
        for (Py_ssize_t x = 0; x < e->nx; x++) {
            if (!e->xerr[x])
                continue;
            PyObject *r = Py_BuildValue("(Oy#i)", path, e->xname[x],
                                        (Py_ssize_t)strlen(e->xname[x]), e->xerr[x]);
            if (r == NULL || PyList_Append(refused, r) < 0) {
                Py_XDECREF(r);
                goto out;
            }
            Py_DECREF(r);
        }
    }
    result = Py_BuildValue("LLLO", cloned, copied, linked, refused);
out:
    Py_XDECREF(refused);
    if (es != NULL && keep != NULL)
        free_rentries(es, keep, parsed);
    else {
        PyMem_Free(es);
        PyMem_Free(keep);
    }
    PyMem_Free(order);
    PyMem_Free(farm_fds);
    Py_DECREF(entries);
    return result;
}

/* -- link_objects: a trusted store-to-store copy's hardlinks ------------------------ */

typedef struct {
    const char *hex;        /* 64 lowercase hex digits (checked by the caller's parse) */
    int status;             /* 0 linked, EEXIST present, else the errno of linkat */
} lobj;

typedef struct {
    lobj *os;
    Py_ssize_t from, to;
    int src;
    const int *dst;         /* 256 directory fds, by the digest's first byte */
} lrange;

static void *link_range(void *arg) {
    lrange *r = arg;
    char src[3 + 62 + 1];
    for (Py_ssize_t i = r->from; i < r->to; i++) {
        lobj *o = &r->os[i];
        memcpy(src, o->hex, 2);
        src[2] = '/';
        memcpy(src + 3, o->hex + 2, 62);
        src[65] = 0;
        int b = hexval(o->hex[0]) * 16 + hexval(o->hex[1]);
        o->status = linkat(r->src, src, r->dst[b], src + 3, 0) == 0 ? 0 : errno;
    }
    return NULL;
}

PyDoc_STRVAR(link_objects_doc,
"link_objects(src_objects_fd, dst_subdir_fds, hexes, /) -> list[int]\n\n"
"Hardlink objects/ab/<62 hex> beneath src_objects_fd to <62 hex> beneath\n"
"dst_subdir_fds[0xab], for each 64-hex digest; returns per digest 0 (linked),\n"
"EEXIST or another errno.  Two threads, GIL released: a big image is tens of\n"
"thousands of links, each mostly kernel time.");

static PyObject *link_objects(PyObject *self, PyObject *args) {
    int src;
    PyObject *fds, *hexes;
    if (!PyArg_ParseTuple(args, "iO!O!", &src, &PyList_Type, &fds, &PyList_Type, &hexes))
        return NULL;
    if (PyList_GET_SIZE(fds) != 256) {
        PyErr_SetString(PyExc_ValueError, "dst_subdir_fds must have 256 entries");
        return NULL;
    }
    int dst[256];
    for (int i = 0; i < 256; i++) {
        dst[i] = (int)PyLong_AsLong(PyList_GET_ITEM(fds, i));
        if (dst[i] == -1 && PyErr_Occurred())
            return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(hexes);
    lobj *os_ = PyMem_Calloc(n ? (size_t)n : 1, sizeof(lobj));
    if (os_ == NULL)
        return PyErr_NoMemory();
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_ssize_t len;
        const char *h = PyUnicode_AsUTF8AndSize(PyList_GET_ITEM(hexes, i), &len);
        int ok = h != NULL && len == 64;
        for (Py_ssize_t k = 0; ok && k < 64; k++)
            ok = (h[k] >= '0' && h[k] <= '9') || (h[k] >= 'a' && h[k] <= 'f');
        if (!ok) {
            PyMem_Free(os_);
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "not a sha256 hex digest");
            return NULL;
        }
        os_[i].hex = h;     /* borrowed from the list, which the caller keeps */
    }
    lrange a = {os_, 0, n, src, dst}, b = {os_, n / 2, n, src, dst};
    Py_BEGIN_ALLOW_THREADS
    pthread_t t;
    if (n >= 64 && pthread_create(&t, NULL, link_range, &b) == 0) {
        a.to = n / 2;
        link_range(&a);
        pthread_join(t, NULL);
    } else {
        link_range(&a);
    }
    Py_END_ALLOW_THREADS
    PyObject *out = PyList_New(n);
    for (Py_ssize_t i = 0; out != NULL && i < n; i++) {
        PyObject *v = PyLong_FromLong(os_[i].status);
        if (v == NULL) {
            Py_CLEAR(out);
            break;
        }
        PyList_SET_ITEM(out, i, v);
    }
    PyMem_Free(os_);
    return out;
}

static PyMethodDef methods[] = {
    {"extract_files", extract_files, METH_VARARGS, extract_files_doc},
    {"snapshot_rows", snapshot_rows, METH_VARARGS, snapshot_rows_doc},
    {"replay_tree", replay_tree, METH_VARARGS, replay_tree_doc},
    {"place_files", place_files, METH_VARARGS, place_files_doc},
    {"link_objects", link_objects, METH_VARARGS, link_objects_doc},
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

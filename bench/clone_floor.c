/* The kernel's cost per file of what the objects driver does, without lamina.
 *
 *     clone_floor OBJECTS_DIR DEST_DIR N THREADS
 *
 * Takes up to N store objects (OBJECTS_DIR/xx/...) and, for each operation,
 * makes N new entries in a fresh directory below DEST_DIR (100 per
 * subdirectory, as in a rootfs), split over THREADS threads, and prints
 *
 *     op threads n seconds us_per_entry
 *
 * create        openat(O_CREAT|O_EXCL) + close: an empty file
 * clone         create + open the object + FICLONE + close both
 * clone+meta    clone + fchown + fchmod + futimens: a replayed file
 * link          linkat of the object: a read-only bundle's file
 * mkdir         mkdirat
 *
 * Where the filesystem has no FICLONE (ext4) the clone lines say "- -".
 * (bench/drivers_store.py builds and runs it on the loop filesystems.)
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#ifndef FICLONE
#define FICLONE 0x40049409
#endif

enum { CREATE, CLONE, CLONE_META, LINK, MKDIR, NOPS };
static const char *names[NOPS] = {"create", "clone", "clone+meta", "link", "mkdir"};

static char (*objs)[72];
static int nobj, objdir;

typedef struct {
    int op, dst, from, to, unsupported;
} job;

static void die(const char *what) {
    perror(what);
    exit(1);
}

static void *run(void *arg) {
    job *j = arg;
    char name[64];
    struct timespec ts[2] = {{1000000000, 0}, {1000000000, 0}};
    for (int i = j->from; i < j->to; i++) {
        snprintf(name, sizeof name, "d%d/e%d", i / 100, i);
        if (j->op == MKDIR) {
            if (mkdirat(j->dst, name, 0755) < 0)
                die("mkdirat");
            continue;
        }
        if (j->op == LINK) {
            if (linkat(objdir, objs[i], j->dst, name, 0) < 0)
                die("linkat");
            continue;
        }
        int fd = openat(j->dst, name, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
        if (fd < 0)
            die("openat");
        if (j->op >= CLONE) {
            int src = openat(objdir, objs[i], O_RDONLY | O_CLOEXEC);
            if (src < 0)
                die("open object");
            if (ioctl(fd, FICLONE, src) < 0) {
                if (errno != EOPNOTSUPP && errno != EXDEV && errno != EINVAL && errno != ENOTTY)
                    die("FICLONE");
                j->unsupported = 1;   /* no reflinks here (ext4) */
                close(src);
                close(fd);
                return NULL;
            }
            close(src);
        }
        if (j->op == CLONE_META) {
            if (fchown(fd, 1, 1) < 0 || fchmod(fd, 0755) < 0 || futimens(fd, ts) < 0)
                die("metadata");
        }
        close(fd);
    }
    return NULL;
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s OBJECTS_DIR DEST_DIR N THREADS\n", argv[0]);
        return 2;
    }
    int want = atoi(argv[3]), threads = atoi(argv[4]);
    if (want <= 0 || threads <= 0 || threads > 16)
        return 2;
    objdir = open(argv[1], O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (objdir < 0)
        die(argv[1]);
    objs = calloc((size_t)want, sizeof *objs);
    for (int p = 0; p < 256 && nobj < want; p++) {   /* every object: a mix of sizes */
        char sub[3];
        snprintf(sub, sizeof sub, "%02x", p);
        int fd = openat(objdir, sub, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        DIR *d = fd < 0 ? NULL : fdopendir(fd);
        struct dirent *de;
        while (d && nobj < want && (de = readdir(d)) != NULL)
            if (de->d_name[0] != '.' && strlen(de->d_name) < 64)
                snprintf(objs[nobj++], 72, "%s/%s", sub, de->d_name);
        if (d)
            closedir(d);
    }
    if (nobj == 0) {
        fprintf(stderr, "no objects below %s\n", argv[1]);
        return 1;
    }
    if (mkdir(argv[2], 0755) < 0 && errno != EEXIST)
        die(argv[2]);
    int top = open(argv[2], O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    for (int op = 0; op < NOPS; op++) {
        char dir[32];
        snprintf(dir, sizeof dir, "%s-%d", names[op], threads);
        if (mkdirat(top, dir, 0755) < 0)
            die("mkdirat (run in an empty DEST_DIR)");
        int dst = openat(top, dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        for (int i = 0; i < (nobj + 99) / 100; i++) {
            char d[32];
            snprintf(d, sizeof d, "d%d", i);
            mkdirat(dst, d, 0755);
        }
        sync();
        pthread_t t[16];
        job js[16];
        double t0 = now();
        int unsupported = 0;
        for (int k = 0; k < threads; k++) {
            js[k] = (job){op, dst, nobj * k / threads, nobj * (k + 1) / threads, 0};
            if (pthread_create(&t[k], NULL, run, &js[k]) != 0)
                die("pthread_create");
        }
        for (int k = 0; k < threads; k++) {
            pthread_join(t[k], NULL);
            unsupported |= js[k].unsupported;
        }
        double s = now() - t0;
        if (unsupported)
            printf("%s %d %d - -\n", names[op], threads, nobj);
        else
            printf("%s %d %d %.4f %.2f\n", names[op], threads, nobj, s, s / nobj * 1e6);
        fflush(stdout);
        close(dst);
    }
    return 0;
}

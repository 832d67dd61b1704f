/* An LD_PRELOAD shim that keeps what a power cut would leave of a folder:
 * a file's bytes survive only as they were at its last fsync or fdatasync,
 * and a folder's entries (files created, renamed, removed) only as they
 * were at the folder's last fsync. Each such call under TERN_POWERCUT_DIR
 * records that state under TERN_POWERCUT_SHADOW, then does the real call:
 *
 *   ino/DEV-INO   the file's bytes at its last sync
 *   dir/DEV-INO   the folder's entries at its last sync, one per line:
 *                 "f DEV-INO NAME" or "d DEV-INO NAME"
 *
 * powercut.rs rebuilds the folder from these after killing the process
 * (the power cut), and records a fresh baseline. Used by powercut.rs only. */
#define _GNU_SOURCE
#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

static unsigned long counter;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

/* The path of fd if it lies under TERN_POWERCUT_DIR. */
static int watched(int fd, char *path, size_t len) {
    const char *root = getenv("TERN_POWERCUT_DIR");
    if (!root || !getenv("TERN_POWERCUT_SHADOW")) return 0;
    char link[64];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, len - 1);
    if (n < 0) return 0;
    path[n] = 0;
    size_t r = strlen(root);
    return strncmp(path, root, r) == 0 && (path[r] == 0 || path[r] == '/');
}

/* Writes via a temporary file and a rename, so a reader never sees half. */
static FILE *open_tmp(char *tmp, size_t len) {
    unsigned long c;
    pthread_mutex_lock(&lock);
    c = counter++;
    pthread_mutex_unlock(&lock);
    snprintf(tmp, len, "%s/tmp-%d-%ld-%lu", getenv("TERN_POWERCUT_SHADOW"), getpid(), (long)syscall(SYS_gettid), c);
    return fopen(tmp, "we");
}

static void finish(FILE *out, const char *tmp, const char *kind, const struct stat *st) {
    char dest[4096];
    snprintf(dest, sizeof dest, "%s/%s/%lu-%lu", getenv("TERN_POWERCUT_SHADOW"), kind,
             (unsigned long)st->st_dev, (unsigned long)st->st_ino);
    if (fclose(out) == 0) rename(tmp, dest); else unlink(tmp);
}

static void record_file(int fd, const struct stat *st) {
    /* Read through a descriptor of our own: fd may be write-only. */
    char link[64];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    int in = open(link, O_RDONLY | O_CLOEXEC);
    if (in < 0) return;
    char tmp[4096];
    FILE *out = open_tmp(tmp, sizeof tmp);
    if (!out) { close(in); return; }
    char buf[65536];
    off_t at = 0;
    for (;;) {
        ssize_t n = pread(in, buf, sizeof buf, at);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break;
        fwrite(buf, 1, (size_t)n, out);
        at += n;
    }
    close(in);
    finish(out, tmp, "ino", st);
}

static void record_dir(const char *path, const struct stat *st) {
    DIR *d = opendir(path);
    if (!d) return;
    char tmp[4096];
    FILE *out = open_tmp(tmp, sizeof tmp);
    if (!out) { closedir(d); return; }
    struct dirent *e;
    while ((e = readdir(d))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        struct stat es;
        if (fstatat(dirfd(d), e->d_name, &es, AT_SYMLINK_NOFOLLOW) != 0) continue;
        char kind = S_ISREG(es.st_mode) ? 'f' : S_ISDIR(es.st_mode) ? 'd' : 0;
        if (kind) fprintf(out, "%c %lu-%lu %s\n", kind, (unsigned long)es.st_dev, (unsigned long)es.st_ino, e->d_name);
    }
    closedir(d);
    finish(out, tmp, "dir", st);
}

static void record(int fd) {
    char path[4096];
    struct stat st;
    if (!watched(fd, path, sizeof path) || fstat(fd, &st) != 0) return;
    if (S_ISREG(st.st_mode)) record_file(fd, &st);
    else if (S_ISDIR(st.st_mode)) record_dir(path, &st);
}

int fsync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    record(fd);
    return real(fd);
}

int fdatasync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    record(fd);
    return real(fd);
}

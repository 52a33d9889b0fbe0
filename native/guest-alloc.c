/*
 * qlayer-guest-alloc: makes an app's placeholder files inside a running guest, in one process.
 *
 * Why a program and not a shell script: under TCG every process start costs tens of
 * milliseconds, and a script needs several per file (300 files took 33 s). This makes every
 * placeholder with fallocate(2) mode 0, which on ext4 records unwritten extents of the exact
 * size and writes no data; qlayer's offline side finds those extents and flips them once the
 * app's bytes sit under them.
 *
 * Input on stdin, every field ended by a NUL byte (paths may hold any other byte):
 *   qlayer-guest-alloc/1          header, once, first
 *   Z                             from here on, write real zeros instead of fallocate
 *   d PATH MODE UID GID           a folder: mkdir -p, then chown and chmod it
 *   f PATH SIZE MODE UID GID      a file of SIZE bytes, then chown and chmod it
 *   r PATH SIZE                   rollback: delete PATH if it is still an untouched placeholder
 *                                 (a regular file of SIZE bytes that reads as zeros)
 *   R PATH                        rollback: remove the folder PATH if it is empty
 * MODE is octal, SIZE/UID/GID/BYTES decimal. Records run in order, so folders come before their
 * files (and, for a rollback, files before their folders).
 *
 * Output on stdout: a NUL-ended record for everything created or rolled back, as it happens, so
 * that the host knows exactly what to undo even when a later step fails ("created", "d"|"f",
 * PATH; "removed"|"left"|"missing", "d"|"f", PATH), then one summary line.
 *
 * Exit codes (src/layers/guest-script.ts GUEST_EXIT): 0 done; 1 other error; 3 a path holds
 * something that is not our placeholder (refused, left untouched); 5 no space left; 6 bad input;
 * (7 is the host's space check before allocating, src/layers/allocate.ts.)
 * Every message on stderr starts with "qlayer-guest-alloc: ", so the host can tell our failures
 * from a shell that could not run us at all.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

enum { EXIT_OTHER = 1, EXIT_EXISTS = 3, EXIT_NO_SPACE = 5, EXIT_BAD_INPUT = 6 };

static char *input, *cursor, *end;
static long files, fallocated, zeros, empty, kept, dirs, removed, left, missing;

static void die(int code, const char *format, ...) {
  va_list args;
  va_start(args, format);
  fputs("qlayer-guest-alloc: ", stderr);
  vfprintf(stderr, format, args);
  fputc('\n', stderr);
  va_end(args);
  exit(code);
}

static void read_input(void) {
  size_t size = 0, capacity = 1 << 16;
  input = malloc(capacity);
  for (;;) {
    if (!input) die(EXIT_OTHER, "out of memory reading the manifest");
    ssize_t n = read(0, input + size, capacity - size);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) die(EXIT_OTHER, "reading the manifest: %s", strerror(errno));
    if (n == 0) break;
    size += (size_t)n;
    if (size == capacity) input = realloc(input, capacity *= 2);
  }
  cursor = input;
  end = input + size;
}

/* The next NUL-ended field; a manifest cut short is bad input, never a half-read path. */
static const char *field(void) {
  char *nul = memchr(cursor, '\0', (size_t)(end - cursor));
  if (!nul) die(EXIT_BAD_INPUT, "manifest ends inside a record");
  char *start = cursor;
  cursor = nul + 1;
  return start;
}

/* A path field: never empty (an empty path names nothing, and mkdir -p would walk past it). */
static const char *path_field(void) {
  const char *path = field();
  if (!*path) die(EXIT_BAD_INPUT, "empty path in the manifest");
  return path;
}

static unsigned long long number(int base, unsigned long long max) {
  const char *text = field();
  char *rest;
  errno = 0;
  unsigned long long value = strtoull(text, &rest, base);
  if (!*text || *rest || errno || value > max || text[0] == '-' || text[0] == '+' || text[0] == ' ')
    die(EXIT_BAD_INPUT, "bad number \"%s\" in the manifest", text);
  return value;
}

/* One NUL-ended output record: what was created or rolled back (stdio flushes it at any exit). */
static void report(const char *what, char kind, const char *path) {
  fputs(what, stdout);
  fputc('\0', stdout);
  fputc(kind, stdout);
  fputc('\0', stdout);
  fputs(path, stdout);
  fputc('\0', stdout);
}

/* Owner first: chown clears set-user/group-ID bits (root included), so chmod must come last. */
static void own(int fd, const char *path, mode_t mode, uid_t uid, gid_t gid) {
  if ((fd >= 0 ? fchown(fd, uid, gid) : chown(path, uid, gid)) != 0) die(EXIT_OTHER, "chown %s: %s", path, strerror(errno));
  if ((fd >= 0 ? fchmod(fd, mode) : chmod(path, mode)) != 0) die(EXIT_OTHER, "chmod %s: %s", path, strerror(errno));
}

static void directory(void) {
  const char *path = path_field();
  mode_t mode = (mode_t)number(8, 07777);
  uid_t uid = (uid_t)number(10, 0xfffffffeULL);
  gid_t gid = (gid_t)number(10, 0xfffffffeULL);
  struct stat st;
  if (lstat(path, &st) == 0 && !S_ISDIR(st.st_mode)) die(EXIT_EXISTS, "%s (not a folder)", path);
  /* mkdir -p: each leading component in turn; one that exists already is fine. */
  char *copy = strdup(path);
  if (!copy) die(EXIT_OTHER, "out of memory");
  for (char *slash = copy + 1;; slash++) {
    if (*slash != '/' && *slash != '\0') continue;
    char saved = *slash;
    *slash = '\0';
    /* 0755 like mkdir -p under umask 022: a parent outside the manifest must stay traversable. */
    if (mkdir(copy, 0755) == 0) report("created", 'd', copy);
    else if (errno != EEXIST) die(EXIT_OTHER, "mkdir %s: %s", copy, strerror(errno));
    *slash = saved;
    if (saved == '\0') break;
  }
  free(copy);
  if (lstat(path, &st) != 0 || !S_ISDIR(st.st_mode)) die(EXIT_EXISTS, "%s (not a folder)", path);
  own(-1, path, mode, uid, gid);
  dirs++;
}

/* A failure after we created the file removes it, so a rerun (after freeing space) starts clean. */
static void fail_new(const char *path, int error, unsigned long long size) {
  unlink(path);
  if (error == ENOSPC || error == EDQUOT)
    die(EXIT_NO_SPACE, "%s: no space for %llu bytes: %s", path, size, strerror(error));
  die(EXIT_OTHER, "%s: %s", path, strerror(error));
}

static void write_zeros(int fd, const char *path, unsigned long long size) {
  static char buffer[1 << 20]; /* zero-initialised; 1 MiB writes keep syscalls few */
  for (unsigned long long done = 0; done < size;) {
    size_t chunk = size - done < sizeof buffer ? (size_t)(size - done) : sizeof buffer;
    ssize_t n = write(fd, buffer, chunk);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) fail_new(path, n < 0 ? errno : ENOSPC, size);
    done += (unsigned long long)n;
  }
}

static void file(int force_zeros) {
  const char *path = path_field();
  unsigned long long size = number(10, 0x7fffffffffffffffULL);
  mode_t mode = (mode_t)number(8, 07777);
  uid_t uid = (uid_t)number(10, 0xfffffffeULL);
  gid_t gid = (gid_t)number(10, 0xfffffffeULL);
  files++;
  struct stat st;
  if (lstat(path, &st) == 0) {
    /* A regular file of the right size is a placeholder an interrupted assign left: keep it
       (locate re-checks its extents offline). Anything else may be the user's: refuse. */
    if (!S_ISREG(st.st_mode) || (unsigned long long)st.st_size != size) die(EXIT_EXISTS, "%s", path);
    int fd = open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) die(EXIT_OTHER, "%s: %s", path, strerror(errno));
    own(fd, path, mode, uid, gid);
    close(fd);
    kept++;
    return;
  }
  if (errno != ENOENT) die(EXIT_OTHER, "%s: %s", path, strerror(errno));
  int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
  if (fd < 0) die(errno == EEXIST ? EXIT_EXISTS : EXIT_OTHER, "%s: %s", path, strerror(errno));
  report("created", 'f', path);
  if (size == 0) {
    empty++;
  } else if (!force_zeros && fallocate(fd, 0, 0, (off_t)size) == 0) {
    fallocated++; /* mode 0, never FALLOC_FL_KEEP_SIZE: the size is set with the extents */
  } else if (force_zeros || errno == EOPNOTSUPP || errno == ENOSYS) {
    write_zeros(fd, path, size); /* a filesystem without fallocate: real zeros */
    zeros++;
  } else {
    fail_new(path, errno, size);
  }
  own(fd, path, mode, uid, gid);
  if (close(fd) != 0) fail_new(path, errno, size);
}

/* Is every byte of the open file zero? Unwritten extents and holes are skipped by SEEK_DATA. */
static int reads_as_zeros(int fd, unsigned long long size) {
  static char buffer[1 << 20];
  off_t at = 0;
  while ((unsigned long long)at < size) {
    off_t data = lseek(fd, at, SEEK_DATA);
    if (data < 0) return errno == ENXIO; /* nothing but holes from here on */
    off_t hole = lseek(fd, data, SEEK_HOLE);
    if (hole < 0) hole = (off_t)size;
    for (off_t pos = data; pos < hole;) {
      ssize_t n = pread(fd, buffer, (size_t)(hole - pos) < sizeof buffer ? (size_t)(hole - pos) : sizeof buffer, pos);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) return n == 0;
      for (ssize_t i = 0; i < n; i++)
        if (buffer[i]) return 0;
      pos += n;
    }
    at = hole;
  }
  return 1;
}

static void rollback_file(void) {
  const char *path = path_field();
  unsigned long long size = number(10, 0x7fffffffffffffffULL);
  struct stat st;
  if (lstat(path, &st) != 0) {
    report("missing", 'f', path);
    missing++;
    return;
  }
  int fd = S_ISREG(st.st_mode) && (unsigned long long)st.st_size == size ? open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK) : -1;
  int placeholder = fd >= 0 && reads_as_zeros(fd, size);
  if (fd >= 0) close(fd);
  /* Anything else is the user's now (they wrote into it, or replaced it): never deleted. */
  if (!placeholder || unlink(path) != 0) {
    report("left", 'f', path);
    left++;
    return;
  }
  report("removed", 'f', path);
  removed++;
}

static void rollback_directory(void) {
  const char *path = path_field();
  if (rmdir(path) == 0) {
    report("removed", 'd', path);
    dirs++;
  } else if (errno != ENOENT) {
    report("left", 'd', path);
  }
}

int main(void) {
  read_input();
  if (cursor == end || strcmp(field(), "qlayer-guest-alloc/1") != 0) die(EXIT_BAD_INPUT, "manifest does not start with qlayer-guest-alloc/1");
  int force_zeros = 0, rollback = 0;
  while (cursor < end) {
    const char *kind = field();
    if (strcmp(kind, "Z") == 0) force_zeros = 1;
    else if (strcmp(kind, "d") == 0) directory();
    else if (strcmp(kind, "f") == 0) file(force_zeros);
    else if (strcmp(kind, "r") == 0) rollback = 1, rollback_file();
    else if (strcmp(kind, "R") == 0) rollback = 1, rollback_directory();
    else die(EXIT_BAD_INPUT, "unknown record \"%s\" in the manifest", kind);
  }
  sync(); /* the placeholders' metadata reaches the virtual disk before the guest is stopped */
  if (rollback) printf("rolled back removed=%ld dirs=%ld left=%ld missing=%ld\n", removed, dirs, left, missing);
  else printf("allocated files=%ld fallocate=%ld zeros=%ld empty=%ld kept=%ld dirs=%ld\n", files, fallocated, zeros, empty, kept, dirs);
  return fflush(stdout) == 0 ? 0 : EXIT_OTHER;
}

/*
 * lockTest(fd, start, length) -> null when no other open file description holds a lock that
 * overlaps [start, start + length) (length 0: to the end of the file), else { type: "READ" |
 * "WRITE", pid, start, length } for one such lock (pid -1 for an OFD lock, the holder's for a
 * POSIX one). It is fcntl(F_OFD_GETLK) asking for a write lock, which conflicts with every lock
 * another holder has there; qlayer holds none itself while it asks.
 *
 * Why not /proc/locks: the first read of /proc/locks in a process waits for an RCU grace period
 * (locks_start takes the file-lock rwsem for writing), 5-30 ms on a busy host; `qlayer image
 * info` asks on every run. QEMU asks the same way (qemu_lock_fd_test).
 *
 * lockShared(fd, start, length) -> null when fcntl(F_OFD_SETLK) took a shared (read) lock on
 * [start, start + length) for the open file description of fd, else the errno name. QEMU holds
 * its permission bytes with such locks (qemu_lock_fd); they last until the description is closed.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>
#include <node_api.h>
#include <stdbool.h>

/* Read (fd, start, length) from a call; false (a TypeError thrown) when they are not three numbers. */
static bool lock_arguments(napi_env env, napi_callback_info info, const char *usage, int32_t *fd, int64_t *start, int64_t *length) {
  size_t argc = 3;
  napi_value argv[3];
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 3 || napi_get_value_int32(env, argv[0], fd) != napi_ok ||
      napi_get_value_int64(env, argv[1], start) != napi_ok || napi_get_value_int64(env, argv[2], length) != napi_ok) {
    napi_throw_type_error(env, NULL, usage);
    return false;
  }
  return true;
}


#ifdef F_OFD_GETLK
/* A lock request of `type` on [start, start + length) (length 0: to the end of the file). */
static struct flock byte_range(short type, int64_t start, int64_t length) {
  struct flock fl;
  memset(&fl, 0, sizeof fl);
  fl.l_type = type;
  fl.l_whence = SEEK_SET;
  fl.l_start = (off_t)start;
  fl.l_len = (off_t)length;
  return fl;
}
#endif

napi_value qlayer_lock_test(napi_env env, napi_callback_info info) {
  int32_t fd;
  int64_t start, length;
  if (!lock_arguments(env, info, "lockTest(fd, start, length) needs three numbers", &fd, &start, &length)) return NULL;
#ifdef F_OFD_GETLK
  struct flock fl = byte_range(F_WRLCK, start, length);
  if (fcntl(fd, F_OFD_GETLK, &fl) == -1) {
    int e = errno;
    napi_throw_error(env, e == EINVAL ? "EINVAL" : e == EBADF ? "EBADF" : "EIO", strerror(e));
    return NULL;
  }
  napi_value result;
  if (fl.l_type == F_UNLCK) {
    napi_get_null(env, &result);
    return result;
  }
  napi_value type, pid, at, len;
  napi_create_object(env, &result);
  napi_create_string_utf8(env, fl.l_type == F_RDLCK ? "READ" : "WRITE", NAPI_AUTO_LENGTH, &type);
  napi_create_int32(env, (int32_t)fl.l_pid, &pid);
  napi_create_int64(env, (int64_t)fl.l_start, &at);
  napi_create_int64(env, (int64_t)fl.l_len, &len);
  napi_set_named_property(env, result, "type", type);
  napi_set_named_property(env, result, "pid", pid);
  napi_set_named_property(env, result, "start", at);
  napi_set_named_property(env, result, "length", len);
  return result;
#else
  napi_throw_error(env, "ENOSYS", "F_OFD_GETLK is not available on this platform");
  return NULL;
#endif
}

napi_value qlayer_lock_shared(napi_env env, napi_callback_info info) {
  int32_t fd;
  int64_t start, length;
  if (!lock_arguments(env, info, "lockShared(fd, start, length) needs three numbers", &fd, &start, &length)) return NULL;
  napi_value result;
#ifdef F_OFD_SETLK
  struct flock fl = byte_range(F_RDLCK, start, length);
  if (fcntl(fd, F_OFD_SETLK, &fl) == 0) {
    napi_get_null(env, &result);
    return result;
  }
  int e = errno;
  napi_create_string_utf8(env, e == EAGAIN ? "EAGAIN" : e == EACCES ? "EACCES" : e == EBADF ? "EBADF" : e == EINVAL ? "EINVAL" : e == ENOLCK ? "ENOLCK" : "EIO", NAPI_AUTO_LENGTH, &result);
  return result;
#else
  napi_create_string_utf8(env, "ENOSYS", NAPI_AUTO_LENGTH, &result);
  return result;
#endif
}

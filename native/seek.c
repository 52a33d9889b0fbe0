/*
 * qlayer's optional native helper: lseek(fd, offset, SEEK_DATA | SEEK_HOLE), which Node's fs
 * API does not expose. Plain N-API (node_api.h), no other dependency.
 *
 *   seek(fd, offset, whence) -> new offset, or -1 when lseek fails with ENXIO (no data / hole
 *   at or after offset, or offset past end of file). Other errors throw an Error whose `code`
 *   is the errno name ("EINVAL" when the file system has no SEEK_DATA, ...).
 *   SEEK_DATA, SEEK_HOLE: the whence values of this platform.
 *   clone(...): FICLONERANGE, in clone.c.
 *   lockTest(...): fcntl(F_OFD_GETLK), in locks.c.
 *   lockShared(...): fcntl(F_OFD_SETLK) for a read lock, in locks.c.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>
#include <node_api.h>

static const char *errno_name(int e) {
  switch (e) {
    case EINVAL: return "EINVAL";
    case EBADF: return "EBADF";
    case ESPIPE: return "ESPIPE";
    case EOVERFLOW: return "EOVERFLOW";
    case ENXIO: return "ENXIO";
    default: return "EIO";
  }
}

static napi_value seek(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 3) {
    napi_throw_type_error(env, NULL, "seek(fd, offset, whence) needs three numbers");
    return NULL;
  }
  int32_t fd, whence;
  int64_t offset;
  if (napi_get_value_int32(env, argv[0], &fd) != napi_ok || napi_get_value_int64(env, argv[1], &offset) != napi_ok ||
      napi_get_value_int32(env, argv[2], &whence) != napi_ok) {
    napi_throw_type_error(env, NULL, "seek(fd, offset, whence) needs three numbers");
    return NULL;
  }
  off_t r = lseek(fd, (off_t)offset, whence);
  napi_value result;
  if (r == (off_t)-1) {
    int e = errno;
    if (e == ENXIO) {
      napi_create_int64(env, -1, &result);
      return result;
    }
    napi_throw_error(env, errno_name(e), strerror(e));
    return NULL;
  }
  napi_create_int64(env, (int64_t)r, &result);
  return result;
}

napi_value qlayer_clone_range(napi_env env, napi_callback_info info);
napi_value qlayer_lock_test(napi_env env, napi_callback_info info);
napi_value qlayer_lock_shared(napi_env env, napi_callback_info info);

static napi_value init(napi_env env, napi_value exports) {
  napi_value fn, data, hole;
  napi_create_function(env, "seek", NAPI_AUTO_LENGTH, seek, NULL, &fn);
  napi_set_named_property(env, exports, "seek", fn);
  napi_value clone;
  napi_create_function(env, "clone", NAPI_AUTO_LENGTH, qlayer_clone_range, NULL, &clone);
  napi_set_named_property(env, exports, "clone", clone);
  napi_value lockTest;
  napi_create_function(env, "lockTest", NAPI_AUTO_LENGTH, qlayer_lock_test, NULL, &lockTest);
  napi_set_named_property(env, exports, "lockTest", lockTest);
  napi_value lockShared;
  napi_create_function(env, "lockShared", NAPI_AUTO_LENGTH, qlayer_lock_shared, NULL, &lockShared);
  napi_set_named_property(env, exports, "lockShared", lockShared);
#if defined(SEEK_DATA) && defined(SEEK_HOLE)
  napi_create_int32(env, SEEK_DATA, &data);
  napi_create_int32(env, SEEK_HOLE, &hole);
#else
  napi_get_null(env, &data);
  napi_get_null(env, &hole);
#endif
  napi_set_named_property(env, exports, "SEEK_DATA", data);
  napi_set_named_property(env, exports, "SEEK_HOLE", hole);
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)

/*
 * clone(srcFd, srcOffset, length, dstFd, dstOffset) -> null, or the errno name when the kernel
 * refused: FICLONERANGE makes dst's range share src's blocks on file systems that can (XFS with
 * reflink, btrfs, OpenZFS >= 2.2), so many desktops' apps layers hold one copy of an app's
 * bytes. Offsets and length must be multiples of the file system block size. Callers treat
 * "EOPNOTSUPP", "EXDEV", "EINVAL" and "ENOTTY" as "cannot clone here" and copy instead.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <node_api.h>
#ifdef __linux__
#include <linux/fs.h>
#endif

static const char *clone_errno_name(int e) {
  switch (e) {
    case EOPNOTSUPP: return "EOPNOTSUPP";
    case EXDEV: return "EXDEV";
    case EINVAL: return "EINVAL";
    case ENOTTY: return "ENOTTY";
    case EBADF: return "EBADF";
    case ENOSPC: return "ENOSPC";
    case EISDIR: return "EISDIR";
    case ETXTBSY: return "ETXTBSY";
    case EPERM: return "EPERM";
    default: return "EIO";
  }
}

napi_value qlayer_clone_range(napi_env env, napi_callback_info info) {
  size_t argc = 5;
  napi_value argv[5];
  int32_t src_fd, dst_fd;
  int64_t src_offset, length, dst_offset;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 5 ||
      napi_get_value_int32(env, argv[0], &src_fd) != napi_ok || napi_get_value_int64(env, argv[1], &src_offset) != napi_ok ||
      napi_get_value_int64(env, argv[2], &length) != napi_ok || napi_get_value_int32(env, argv[3], &dst_fd) != napi_ok ||
      napi_get_value_int64(env, argv[4], &dst_offset) != napi_ok || src_offset < 0 || length <= 0 || dst_offset < 0) {
    napi_throw_type_error(env, NULL, "clone(srcFd, srcOffset, length, dstFd, dstOffset) needs five non-negative numbers");
    return NULL;
  }
  napi_value result;
#if defined(__linux__) && defined(FICLONERANGE)
  struct file_clone_range range = {
      .src_fd = src_fd, .src_offset = (uint64_t)src_offset, .src_length = (uint64_t)length, .dest_offset = (uint64_t)dst_offset};
  if (ioctl(dst_fd, FICLONERANGE, &range) == 0) {
    napi_get_null(env, &result);
    return result;
  }
  napi_create_string_utf8(env, clone_errno_name(errno), NAPI_AUTO_LENGTH, &result);
#else
  (void)src_fd; (void)dst_fd;
  napi_create_string_utf8(env, "EOPNOTSUPP", NAPI_AUTO_LENGTH, &result);
#endif
  return result;
}

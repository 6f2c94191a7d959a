// civetweb, the HTTP server under prometheus-cpp's metrics endpoint, starts its threads with a
// fixed 100 KiB stack. glibc takes the static TLS of every library loaded at start out of each
// thread's stack, and cuBLAS's alone is about 110 KiB, so in a CUDA build those threads fail to
// start (EINVAL) and the endpoint with them. This definition, in the executable, takes precedence
// over glibc's: stack sizes under 1 MiB are raised to 1 MiB; larger ones pass unchanged.
#include <dlfcn.h>
#include <pthread.h>

#include <algorithm>
#include <cstddef>

extern "C" int pthread_attr_setstacksize(pthread_attr_t* attr, std::size_t size) {
  using SetStackSize = int (*)(pthread_attr_t*, std::size_t);
  static const auto glibc = reinterpret_cast<SetStackSize>(dlsym(RTLD_NEXT, "pthread_attr_setstacksize"));
  return glibc(attr, std::max<std::size_t>(size, std::size_t{1} << 20));
}

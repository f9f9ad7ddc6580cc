# rewrite_launch.cmake (tests/emu): turns a .cu source into C++ for the CPU execution layer.
#   cmake -DIN=src/kernels/x.cu -DOUT=build/.../x.cc -P rewrite_launch.cmake
# Two rewrites, both within a line so that line numbers stay those of the source (a #line directive names it):
#   kernel<<<grid, block[, shmem[, stream]]>>>(args)  ->  emu::launcher(kernel, "kernel", emu::cfg(grid, block,
#       shmem, stream), __FILE__, __LINE__)(args); a template's instantiation, kernel<HS><<<...>>>, keeps its
#       arguments in the name ("kernel<HS>"), so that test_launch_resources can tell its instantiations apart
#   extern __shared__ T name[];  ->  T *name = (T *)emu_dynamic_shared();
# Everything else, the kernel bodies included, is compiled unchanged (with -include cuda_emu.h).
if(NOT IN OR NOT OUT)
  message(FATAL_ERROR "usage: cmake -DIN=<file.cu> -DOUT=<file.cc> -P rewrite_launch.cmake")
endif()
file(READ "${IN}" src)
string(REGEX REPLACE
  "extern[ \t]+__shared__[ \t]+([^;\\[]*[^ \t;\\[])[ \t]+([A-Za-z_][A-Za-z0-9_]*)[ \t]*\\[[ \t]*\\][ \t]*;"
  "\\1 *\\2 = (\\1 *)emu_dynamic_shared();" src "${src}")
string(REGEX REPLACE "([A-Za-z_][A-Za-z0-9_]*(<[A-Za-z0-9_, ]*>)?)[ \t]*<<<((>?[^>])*)>>>"
  "emu::launcher(\\1, \"\\1\", emu::cfg(\\3), __FILE__, __LINE__)" src "${src}")
set(content "#line 1 \"${IN}\"\n${src}")
if(EXISTS "${OUT}")
  file(READ "${OUT}" old)
  if(old STREQUAL content)
    return()
  endif()
endif()
file(WRITE "${OUT}" "${content}")

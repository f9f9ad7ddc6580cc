# ptxas_usage.cmake (tests/emu): ptxas's resource report of one .cu source (registers, static shared memory,
# constant bank, stack frame and spills of every kernel and device function) for each architecture in ARCHS,
# as tests/test_launch_resources.c reads it. Device code only (-fatbin: no host compilation).
#   cmake -DNVCC=nvcc -DIN=src/kernels/x.cu -DOUT=build/.../x.txt "-DARCHS=80|90" "-DINCLUDES=dir|dir" -P ptxas_usage.cmake
# (lists separated by '|', which survives the build tool's shell where ';' would not)
if(NOT NVCC OR NOT IN OR NOT OUT OR NOT ARCHS)
  message(FATAL_ERROR "usage: cmake -DNVCC=<nvcc> -DIN=<x.cu> -DOUT=<x.txt> -DARCHS=<80|90> [-DINCLUDES=<dir|dir>] -P ptxas_usage.cmake")
endif()
string(REPLACE "|" ";" ARCHS "${ARCHS}")
string(REPLACE "|" ";" INCLUDES "${INCLUDES}")
get_filename_component(out_dir "${OUT}" DIRECTORY)
file(MAKE_DIRECTORY "${out_dir}")
# The flags of mlm_cuda's device code (CMakeLists.txt), so that the report is that of the binary users run.
set(args -fatbin -std=c++17 --expt-relaxed-constexpr -lineinfo -DNDEBUG -Xptxas=-v -o "${OUT}.fatbin")
foreach(dir ${INCLUDES})
  list(APPEND args "-I${dir}")
endforeach()
foreach(arch ${ARCHS})
  list(APPEND args "-gencode=arch=compute_${arch},code=sm_${arch}")
endforeach()
execute_process(COMMAND "${NVCC}" ${args} "${IN}" RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
file(REMOVE "${OUT}.fatbin")
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "nvcc failed on ${IN} (exit ${rc}):\n${out}${err}")
endif()
# First line: the source, which the test matches to the launches recorded there.
file(WRITE "${OUT}" "source ${IN}\n${out}${err}")

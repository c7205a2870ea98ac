# Run by the ctest test `install_consumer` as `cmake -D... -P install_consumer.cmake`:
#   1. cmake --install <TPA_BUILD_DIR> --prefix <TPA_WORK_DIR>/prefix
#   2. configure tests/consumer with CMAKE_PREFIX_PATH=<prefix>
#   3. build it
#   4. run it
# Any failing step fails the test.
cmake_minimum_required(VERSION 3.20)

foreach(var TPA_BUILD_DIR TPA_WORK_DIR TPA_CONSUMER_SOURCE_DIR)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "install_consumer.cmake: -D${var}=... is required")
  endif()
endforeach()
if(NOT TPA_CONFIG)
  set(TPA_CONFIG Release)
endif()

set(prefix "${TPA_WORK_DIR}/prefix")
set(consumer_build "${TPA_WORK_DIR}/build")
file(REMOVE_RECURSE "${TPA_WORK_DIR}")
file(MAKE_DIRECTORY "${TPA_WORK_DIR}")

function(run_step what)
  message(STATUS "install_consumer: ${what}: ${ARGN}")
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "install_consumer: ${what} failed (${rc})")
  endif()
endfunction()

run_step("install" "${CMAKE_COMMAND}" --install "${TPA_BUILD_DIR}" --prefix "${prefix}" --config "${TPA_CONFIG}")

set(configure_args
  -S "${TPA_CONSUMER_SOURCE_DIR}" -B "${consumer_build}"
  "-DCMAKE_PREFIX_PATH=${prefix}"
  "-DCMAKE_BUILD_TYPE=${TPA_CONFIG}"
  "-DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF"
  "-DTPA_EXPECTED_PREFIX=${prefix}")
if(TPA_GENERATOR)
  list(APPEND configure_args -G "${TPA_GENERATOR}")
endif()
if(TPA_CXX_COMPILER)
  list(APPEND configure_args "-DCMAKE_CXX_COMPILER=${TPA_CXX_COMPILER}")
endif()
if(TPA_EXPECT_IO)
  list(APPEND configure_args -DTPA_CONSUMER_REQUIRE_IO=ON)
endif()
run_step("configure consumer" "${CMAKE_COMMAND}" ${configure_args})

run_step("build consumer" "${CMAKE_COMMAND}" --build "${consumer_build}" --config "${TPA_CONFIG}")

# Single-config generators put the program in the build root, multi-config ones in <config>/.
set(program "${consumer_build}/tpa_consumer")
if(NOT EXISTS "${program}")
  set(program "${consumer_build}/${TPA_CONFIG}/tpa_consumer")
endif()
run_step("run consumer" "${program}")
message(STATUS "install_consumer: OK")

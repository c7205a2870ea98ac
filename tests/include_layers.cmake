# Fails unless the includes between the folders of include/tpa/ run one way (README, "Code
# layout"): a header includes headers of its own folder and of the folders listed for it below,
# nothing else, so that, e.g., no micro-kernel (kernels/) includes a backend (backend/) or a
# scheduler (dispatch/). The umbrella tpa/tpa.hpp may include anything and nothing may include it.
# Before the tree, the check runs on a scratch tree with two backwards includes and must report
# exactly those, so that a broken pattern cannot make it pass vacuously.
#   cmake -DTPA_INCLUDE_DIR=<repo>/include/tpa -DTPA_WORK_DIR=<scratch dir> -P include_layers.cmake

cmake_minimum_required(VERSION 3.20)

set(allowed_core core)
set(allowed_cache core cache)
set(allowed_runtime core runtime)
set(allowed_kernels core cache kernels)
set(allowed_backend core cache kernels backend)
set(allowed_dispatch core cache runtime kernels backend dispatch)
set(allowed_layers core cache runtime kernels backend dispatch layers)
set(allowed_io core cache layers io)

# Sets out_var to one line per include under `root` that crosses the folders the wrong way.
function(tpa_layer_violations root out_var)
  file(GLOB_RECURSE headers RELATIVE "${root}" "${root}/*.hpp" "${root}/*.h")
  set(bad "")
  foreach(h IN LISTS headers)
    if(NOT h MATCHES "/")
      continue()  # the umbrella header
    endif()
    string(REGEX REPLACE "/.*" "" dir "${h}")
    if(NOT DEFINED allowed_${dir})
      list(APPEND bad "${h}: folder ${dir}/ has no entry in tests/include_layers.cmake")
      continue()
    endif()
    file(STRINGS "${root}/${h}" lines REGEX "^[ \t]*#[ \t]*include[ \t]*[<\"]tpa/")
    foreach(line IN LISTS lines)
      string(REGEX REPLACE "^[ \t]*#[ \t]*include[ \t]*[<\"]tpa/([^\">]*)[\">].*" "\\1" target
                           "${line}")
      if(target MATCHES "/")
        string(REGEX REPLACE "/.*" "" target_dir "${target}")
      else()
        set(target_dir "(umbrella)")
      endif()
      if(NOT target_dir IN_LIST allowed_${dir})
        string(REPLACE ";" ", " may "${allowed_${dir}}")
        list(APPEND bad "${h} includes tpa/${target} (${dir}/ may include only ${may})")
      endif()
    endforeach()
  endforeach()
  set(${out_var} "${bad}" PARENT_SCOPE)
endfunction()

# Self-check on a scratch tree: a kernel that includes a backend header and a backend header
# that includes a scheduler (angle brackets), beside allowed includes.
set(scratch "${TPA_WORK_DIR}/tpa")
file(REMOVE_RECURSE "${scratch}")
file(WRITE "${scratch}/kernels/k.hpp"
  "#include \"tpa/core/tensor.hpp\"\n#include \"tpa/kernels/params.hpp\"\n"
  "  #  include \"tpa/backend/tags.hpp\"\n")
file(WRITE "${scratch}/backend/b.hpp"
  "#include \"tpa/kernels/k.hpp\"\n#include <tpa/dispatch/split.hpp>\n")
file(WRITE "${scratch}/dispatch/d.hpp" "#include \"tpa/backend/b.hpp\"\n")
tpa_layer_violations("${scratch}" seeded)
list(LENGTH seeded n_seeded)
if(NOT n_seeded EQUAL 2 OR NOT seeded MATCHES "kernels/k.hpp includes tpa/backend/tags.hpp"
   OR NOT seeded MATCHES "backend/b.hpp includes tpa/dispatch/split.hpp")
  message(FATAL_ERROR "include_layers.cmake: the self-check on ${scratch} found [${seeded}], "
                      "not the two seeded backwards includes")
endif()

tpa_layer_violations("${TPA_INCLUDE_DIR}" found)
if(found)
  string(REPLACE ";" "\n  " lines "${found}")
  message(FATAL_ERROR "includes that run the wrong way between the folders of include/tpa/ "
                      "(README, \"Code layout\"):\n  ${lines}")
endif()

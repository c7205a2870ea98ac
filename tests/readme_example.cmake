# Fails unless README.md contains examples/tpa_usage.cpp verbatim from its first #include on, so
# the README's usage example is the compiled one. Run with -DTPA_SOURCE_DIR=<repo>.
file(READ "${TPA_SOURCE_DIR}/README.md" readme)
file(READ "${TPA_SOURCE_DIR}/examples/tpa_usage.cpp" example)
string(FIND "${example}" "#include" first)
string(SUBSTRING "${example}" ${first} -1 body)
string(FIND "${readme}" "${body}" pos)
if(pos EQUAL -1)
  message(FATAL_ERROR "README.md's TPA example differs from examples/tpa_usage.cpp: copy the "
                      "file from its first #include on into the README block")
endif()

# End-to-end run of the t6_model example binary on a checkpoint it wrote: for each attention kind,
# a run with seeded weights saves them (--save, F32), a second run loads that file (--weights) and
# must generate the same token ids; a third run with one layer fewer must fail naming the
# unexpected tensors of the extra layer.
# Run with -DT6_MODEL=<binary> -DWORK_DIR=<scratch directory>.
file(MAKE_DIRECTORY "${WORK_DIR}")
set(common --layers 2 --d-model 64 --heads 4 --vocab 97 --prompt 5,17,42,8,1 --tokens 8)

function(run_model out_var rc_var)
  execute_process(COMMAND "${T6_MODEL}" ${ARGN} OUTPUT_VARIABLE out ERROR_VARIABLE err
                  RESULT_VARIABLE rc)
  set(${out_var} "${out}${err}" PARENT_SCOPE)
  set(${rc_var} "${rc}" PARENT_SCOPE)
endfunction()

function(generated_ids text out_var)
  if(NOT text MATCHES "generated \\(8\\):([ 0-9]+)\n")
    message(FATAL_ERROR "no 'generated (8): ...' line in:\n${text}")
  endif()
  set(${out_var} "${CMAKE_MATCH_1}" PARENT_SCOPE)
endfunction()

foreach(kind mha gqa mqa mla tpa tpa-kv)
  set(file "${WORK_DIR}/t6_model_${kind}.safetensors")
  run_model(saved rc --kind ${kind} ${common} --save "${file}")
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "${kind}: t6_model --save failed (${rc}):\n${saved}")
  endif()
  run_model(loaded rc --kind ${kind} ${common} --weights "${file}")
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "${kind}: t6_model --weights failed (${rc}):\n${loaded}")
  endif()
  if(NOT loaded MATCHES "weights loaded from" OR NOT loaded MATCHES "bytes_per_token [1-9]")
    message(FATAL_ERROR "${kind}: unexpected output:\n${loaded}")
  endif()
  generated_ids("${saved}" a)
  generated_ids("${loaded}" b)
  if(NOT a STREQUAL b)
    message(FATAL_ERROR "${kind}: generated ids differ: seeded '${a}', loaded '${b}'")
  endif()
  run_model(shallow rc --kind ${kind} --layers 1 --d-model 64 --heads 4 --vocab 97 --weights "${file}")
  if(NOT rc EQUAL 1 OR NOT shallow MATCHES "unexpected tensor 'transformer\\.h\\.1\\.")
    message(FATAL_ERROR "${kind}: a 1-layer model accepted the 2-layer file (${rc}):\n${shallow}")
  endif()
  file(REMOVE "${file}")
  message(STATUS "${kind}: generated${a} (seeded and loaded)")
endforeach()

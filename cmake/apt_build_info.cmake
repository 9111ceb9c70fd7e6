# Writes OUTPUT, the Python module apt_kernels/_build_info.py, recording the git commit of SOURCE_DIR when the
# package was built (what `apt bench` reports as build_commit when it cannot ask a checkout).
#   cmake -DSOURCE_DIR=<checkout> -DOUTPUT=<file> -P apt_build_info.cmake
# Run by a build target on every build, not only at configure time, so a wheel never carries a stale commit; the
# file is rewritten only when its content changes. COMMIT is None when SOURCE_DIR is not the top of a git checkout
# (an sdist, no git): never the commit of some enclosing repository.
if(NOT SOURCE_DIR OR NOT OUTPUT)
  message(FATAL_ERROR "apt_build_info.cmake: pass -DSOURCE_DIR=<checkout> -DOUTPUT=<file>")
endif()

set(commit "")
set(dirty "False")
find_package(Git QUIET)
if(GIT_FOUND)
  execute_process(COMMAND "${GIT_EXECUTABLE}" -C "${SOURCE_DIR}" rev-parse --show-toplevel HEAD
                  OUTPUT_VARIABLE out RESULT_VARIABLE rc ERROR_QUIET OUTPUT_STRIP_TRAILING_WHITESPACE)
  if(rc EQUAL 0)
    string(REPLACE "\n" ";" out "${out}")
    list(GET out 0 top)
    list(GET out 1 sha)
    file(REAL_PATH "${top}" top)
    file(REAL_PATH "${SOURCE_DIR}" src)
    if(top STREQUAL src AND sha MATCHES "^[0-9a-f]+$")
      set(commit "${sha}")
      execute_process(COMMAND "${GIT_EXECUTABLE}" -C "${SOURCE_DIR}" status --porcelain --untracked-files=no
                      OUTPUT_VARIABLE st RESULT_VARIABLE rc ERROR_QUIET OUTPUT_STRIP_TRAILING_WHITESPACE)
      if(rc EQUAL 0 AND NOT st STREQUAL "")
        set(dirty "True")
      endif()
    endif()
  endif()
endif()

if(commit STREQUAL "")
  set(commit_py "None")
else()
  set(commit_py "\"${commit}\"")
endif()
set(text "\"\"\"Written when this package was built (cmake/apt_build_info.cmake); not part of the source tree.

GIT_COMMIT: the commit of the checkout the package was built from (None: not built from a git checkout);
GIT_DIRTY: whether tracked files had uncommitted changes then. The working tree may have changed since.
\"\"\"
GIT_COMMIT = ${commit_py}
GIT_DIRTY = ${dirty}
")
set(old "")
if(EXISTS "${OUTPUT}")
  file(READ "${OUTPUT}" old)
endif()
if(NOT old STREQUAL text)
  file(WRITE "${OUTPUT}" "${text}")
endif()

# CMake toolchain for cross-compiling llama.cpp (llama-cpp-python) to aarch64 Linux with Debian's
# gcc-aarch64-linux-gnu / g++-aarch64-linux-gnu. CMAKE_CROSSCOMPILING turns llama.cpp's native CPU
# detection off; the architecture comes from -DGGML_CPU_ARM_ARCH=... (arm/build_llama.sh).
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
set(CMAKE_FIND_ROOT_PATH /usr/aarch64-linux-gnu)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)

// Stand-in for the CUDA header of the same name in emulated builds (apt_cuda_emu.h).
#pragma once
#include "apt_cuda_emu.h"

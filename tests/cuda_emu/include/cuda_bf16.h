// Stand-in for the CUDA header of this name: tests/cuda_emu/emulator.h.
#pragma once
#include "../emulator.h"

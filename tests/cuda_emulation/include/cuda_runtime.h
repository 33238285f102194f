// Emulation stand-in: everything lives in emu_cuda.h (force-included).
#pragma once
#include "emu_cuda.h"

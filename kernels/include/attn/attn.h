// The kernel library's public API in one include.
#pragma once

#include "attn/dtype.h"
#include "attn/executor.h"
#include "attn/ops.h"
#include "attn/registry.h"
#include "attn/status.h"
#include "attn/tensor.h"
#include "attn/version.h"

"""The import-time lines of a dependency that trl_ext drops.

bitsandbytes, imported (through peft) by every `import trl_ext`, tries at import, on any CPU with AVX512-BF16, to
load an optional CPU kernel from the hub (`kernels-community/quantization-bitsandbytes`), whether or not 4-bit is
used. Where that fails it logs "Failed to load CPU gemm_4bit_forward from kernels-community ..." (a WARNING of the
logger `bitsandbytes.backends.cpu.ops`), and offline the `kernels` package first logs "Skipping publisher trust check
for 'kernels-community/quantization-bitsandbytes' ..." (a WARNING of `kernels._internals.hf_hub`); bitsandbytes then
runs its own CPU code, which computes the same. Only these two messages of these two loggers are dropped, and only
while bitsandbytes is imported by trl_ext: every other record passes, and so do these if bitsandbytes was imported
before trl_ext.
"""

import contextlib
import logging

# (logger, start of the message)
DROPPED = (
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
    ("kernels._internals.hf_hub", "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'"),
)


@contextlib.contextmanager
def without_bitsandbytes_cpu_kernel_notice():
    """Drops bitsandbytes' CPU-kernel notices (see the module) logged inside the block."""
    filters = []
    for name, start in DROPPED:
        def keep(record: logging.LogRecord, start=start) -> bool:
            return not str(record.msg).startswith(start)

        logging.getLogger(name).addFilter(keep)
        filters.append((name, keep))
    try:
        yield
    finally:
        for name, keep in filters:
            logging.getLogger(name).removeFilter(keep)

"""Units the harness counts in, defined once: bytes per MiB and per GiB (memory columns are in MiB,
memory limits in GiB)."""

MIB = 1024**2  # bytes in a mebibyte
GIB = 1024**3  # bytes in a gibibyte
